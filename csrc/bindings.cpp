// Python binding for the ring (sage_ray_comm._core).
//
// This file only moves bytes between Python objects and sage::Ring and turns
// sage::Status codes into the exception types defined in
// sage_ray_comm/errors.py. The GIL is released only around waits and copies,
// in inner blocks that touch no Python object.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <unistd.h>

#include <cerrno>
#include <cstddef>
#include <cstring>
#include <memory>
#include <new>
#include <string>
#include <vector>

#include "copy.hpp"
#include "oob.hpp"
#include "ring.hpp"
#include "slots.hpp"

namespace py = pybind11;

#ifndef SAGE_VERSION
#error "SAGE_VERSION must be defined by the build (csrc/CMakeLists.txt)"
#endif
using sage::Ring;
using sage::SlotStatus;
using sage::Status;

namespace {

py::object error_type(const char* name) {
  // Imported lazily: errors.py is plain Python and imports nothing from here.
  return py::module_::import("sage_ray_comm.errors").attr(name);
}

[[noreturn]] void raise(const char* type, const std::string& msg) {
  py::object exc = error_type(type)(msg);
  PyErr_SetObject(py::type::handle_of(exc).ptr(), exc.ptr());
  throw py::error_already_set();
}

std::string fmt_bytes(uint64_t n) {
  return std::to_string(n) + " bytes";
}

// Converts a failed status into the matching typed exception.
[[noreturn]] void raise_status(Status st, const std::string& label, const std::string& detail, int err, const char* op,
                               uint64_t size = 0, uint64_t limit = 0) {
  switch (st) {
    case Status::kTimeout:
      if (std::strcmp(op, "put") == 0)
        raise("QueueFull", label + " is full: no room for " + fmt_bytes(size) + " before the timeout");
      raise("QueueEmpty", label + " is empty: nothing arrived before the timeout");
    case Status::kClosed:
      raise("QueueClosed", label + " is closed" +
                               (std::strcmp(op, "get") == 0 ? " and drained" : "; " + std::string(op) + " refused"));
    case Status::kTooLarge:
      raise("MessageTooLarge", "message of " + fmt_bytes(size) + " exceeds the maximum frame of " + fmt_bytes(limit) +
                                   " for " + label +
                                   " (a frame may use at most half the ring; create the queue with a larger maxsize)");
    case Status::kCorrupt:
      raise("QueueCorrupted", label + " is corrupted: " + (detail.empty() ? "validation failed" : detail));
    case Status::kNotFound:
      raise("QueueNotFound", label + " does not exist (no shared-memory segment by that name on this node)");
    case Status::kExists:
      raise("QueueExists", label + " already exists");
    case Status::kBadMagic:
      raise("IncompatibleSegment", label + ": the segment is not a sage_ray_comm ring (bad magic number)");
    case Status::kBadVersion:
      raise("IncompatibleSegment", label + ": the segment uses another ring layout version (this build reads version " +
                                       std::to_string(sage::kVersion) + ")");
    case Status::kInvalidArg:
      raise("InvalidQueueArgument", label + ": invalid segment name or capacity for " + op);
    case Status::kSysError:
      if (err == ENOSPC)
        raise("SharedMemoryFull", label + ": " + op + " failed: /dev/shm has no room for " + fmt_bytes(size) + " (" +
                                      std::strerror(err) + ")");
      raise("SharedMemoryError", label + ": " + op + " failed: " + std::strerror(err));
    case Status::kBufferTooSmall:
    case Status::kOk:
      break;
  }
  raise("SageCommError", label + ": unexpected status from " + op);
}

int64_t to_ns(py::object timeout) {
  if (timeout.is_none()) return -1;
  double s = timeout.cast<double>();
  if (s < 0) throw py::value_error("'timeout' must be a non-negative number");
  if (s > 9.0e9) return -1;  // practically forever; avoids overflow
  return int64_t(s * 1e9);
}

// Holds one Py_buffer view for the duration of a put.
struct View {
  Py_buffer b;
  explicit View(PyObject* o) {
    if (PyObject_GetBuffer(o, &b, PyBUF_C_CONTIGUOUS) != 0) throw py::error_already_set();
  }
  ~View() { PyBuffer_Release(&b); }
  View(const View&) = delete;
  View& operator=(const View&) = delete;
};

// Holds several Py_buffer views for the duration of a put.
struct Views {
  std::vector<Py_buffer> bufs;
  ~Views() {
    for (auto& b : bufs) PyBuffer_Release(&b);
  }
  void add(PyObject* o) {
    Py_buffer b;
    if (PyObject_GetBuffer(o, &b, PyBUF_C_CONTIGUOUS) != 0) throw py::error_already_set();
    bufs.push_back(b);
  }
};

// Frame kinds the binding itself encodes or decodes (SageQueue's put and get);
// queue.py takes them from here. Other kinds are the Python side's business.
constexpr uint16_t kKindRaw = 1;     // the caller's bytes, as they are
constexpr uint16_t kKindPickle = 2;  // pickle protocol 5, no out-of-band buffers
constexpr int kPickleProtocol = 5;
// Pickle's STACK_GLOBAL opcode: protocol 5 writes every global (class,
// function) reference with it, so a pickle without this byte names none.
constexpr char kPickleStackGlobal = '\x93';

// A frame get_object() leaves to Python: another kind, or a pickle that
// failed to load (`error` is the exception, None otherwise).
struct Frame {
  py::object payload;
  uint16_t kind;
  py::object error;
};

// pickle.dumps and pickle.loads, looked up once (the module is never unloaded),
// and put_object's buffer_callback, which stops pickling at the first
// out-of-band buffer (raising is how a callback can stop it).
struct Pickle {
  py::object dumps, loads, protocol, dumps_kwnames, refuse_buffer;
};

const Pickle& pickle_fns() {
  static Pickle* fns = [] {
    py::module_ pickle = py::module_::import("pickle");
    py::cpp_function refuse([](py::handle) -> py::object { throw py::value_error("out-of-band buffer"); });
    return new Pickle{pickle.attr("dumps"), pickle.attr("loads"), py::int_(kPickleProtocol),
                      py::make_tuple("buffer_callback"), refuse};
  }();  // never freed: it must outlive every call and never run after finalisation
  return *fns;
}

class PyRing {
 public:
  PyRing(const std::string& shm_name, uint64_t capacity, int mode, std::string label) : label_(std::move(label)) {
    if (label_.empty()) label_ = "ring " + shm_name;
    Ring* r = nullptr;
    bool created = false;
    int err = 0;
    std::string detail;
    Status st;
    {
      py::gil_scoped_release nogil;  // may wait on a creator's flock
      st = Ring::open(shm_name, capacity, sage::OpenMode(mode), &r, &created, &err, &detail);
    }
    if (st != Status::kOk) raise_status(st, label_, detail, err, "open", capacity + sage::kHeaderSize);
    ring_.reset(r);
    created_ = created;
  }

  // Every operation holds its own reference while it runs (taken with the GIL
  // held), so release() from another thread never unmaps a segment under a
  // waiting get or put: the mapping goes when the last operation returns.
  std::shared_ptr<Ring> ring() {
    if (!ring_) raise("QueueClosed", label_ + " was released by this process");
    return ring_;
  }

  void put_parts(const py::sequence& parts, uint16_t kind, py::object timeout) {
    auto keep = ring();
    Ring& r = *keep;
    int64_t ns = to_ns(timeout);
    Views views;
    views.bufs.reserve(parts.size());
    for (auto item : parts) views.add(item.ptr());
    std::vector<sage::IoPart> io(views.bufs.size());
    uint64_t total = 0;
    for (size_t i = 0; i < io.size(); ++i) {
      io[i].data = views.bufs[i].buf;
      io[i].len = size_t(views.bufs[i].len);
      total += io[i].len;
    }
    do_put(r, io.data(), io.size(), total, kind, ns);
  }

  void put(py::handle data, uint16_t kind, py::object timeout) {
    auto keep = ring();
    Ring& r = *keep;
    int64_t ns = to_ns(timeout);
    View view(data.ptr());
    sage::IoPart part{view.b.buf, size_t(view.b.len)};
    do_put(r, &part, 1, part.len, kind, ns);
  }

  // Returns (payload, kind). Frames of kind `writable_kind` are returned in a
  // bytearray (numpy arrays rebuilt on it are writable), others as bytes.
  py::tuple get(py::object timeout, int writable_kind) {
    uint16_t kind = 0;
    py::object payload = read_frame(to_ns(timeout), writable_kind, &kind);
    return py::make_tuple(std::move(payload), kind);
  }

  // SageQueue.put's common case in one call: bytes are written raw; anything
  // else is pickled (protocol 5) and written as one pickle frame. Two cases
  // are left to Python, which has the policy for them (this only saves
  // calls): an object with out-of-band buffers (numpy arrays, bytearrays),
  // for which it returns False before any buffer is copied; and a pickle
  // that names a global (a class, a function), which may live in __main__
  // and then needs pickling by value: it returns that pickle. False also
  // when pickling fails: the general path pickles again and says why.
  // Returns None once the frame is written.
  py::object put_object(py::handle obj, py::object timeout) {
    auto keep = ring();
    Ring& r = *keep;
    int64_t ns = to_ns(timeout);
    if (PyBytes_CheckExact(obj.ptr())) {
      sage::IoPart part{PyBytes_AS_STRING(obj.ptr()), size_t(PyBytes_GET_SIZE(obj.ptr()))};
      do_put(r, &part, 1, part.len, kKindRaw, ns);
      return py::none();
    }
    const Pickle& pk = pickle_fns();
    PyObject* args[3] = {obj.ptr(), pk.protocol.ptr(), pk.refuse_buffer.ptr()};
    PyObject* data = PyObject_Vectorcall(pk.dumps.ptr(), args, 2, pk.dumps_kwnames.ptr());
    if (!data) {
      PyErr_Clear();
      return py::bool_(false);
    }
    py::object owned = py::reinterpret_steal<py::object>(data);
    const char* p = PyBytes_AS_STRING(data);
    size_t n = size_t(PyBytes_GET_SIZE(data));
    if (std::memchr(p, kPickleStackGlobal, n) != nullptr) return owned;
    sage::IoPart part{p, n};
    do_put(r, &part, 1, n, kKindPickle, ns);
    return py::none();
  }

  // SageQueue.get's common case in one call: a pickle frame comes back
  // unpickled, a raw frame as bytes. Any other kind, and a pickle that fails
  // to load, comes back as a Frame for Python to decode or to report (the
  // message is consumed either way; it is never unpickled twice).
  py::object get_object(py::object timeout, int writable_kind) {
    uint16_t kind = 0;
    py::object payload = read_frame(to_ns(timeout), writable_kind, &kind);
    if (kind == kKindRaw) return payload;
    if (kind != kKindPickle) return py::cast(Frame{payload, kind, py::none()});
    PyObject* args[1] = {payload.ptr()};
    PyObject* obj = PyObject_Vectorcall(pickle_fns().loads.ptr(), args, 1, nullptr);
    if (obj) return py::reinterpret_steal<py::object>(obj);
    py::error_already_set err;  // fetches and clears the exception
    return py::cast(Frame{payload, kind, err.value()});
  }

  py::tuple count() {
    auto keep = ring();
    Ring& r = *keep;
    uint64_t m = 0, b = 0;
    Status st;
    {
      py::gil_scoped_release nogil;
      st = r.count(&m, &b);
    }
    if (st != Status::kOk) raise_status(st, label_, r.detail(), r.last_errno(), "qsize");
    return py::make_tuple(m, b);
  }

  bool unblock() {
    auto keep = ring();
    Ring& r = *keep;
    bool skipped = false;
    Status st;
    {
      py::gil_scoped_release nogil;
      st = r.unblock(&skipped);
    }
    if (st != Status::kOk) raise_status(st, label_, r.detail(), r.last_errno(), "unblock");
    return skipped;
  }

  py::dict stats() {
    sage::Stats s;
    ring()->stats(&s);
    py::dict d;
    d["capacity"] = s.capacity;
    d["max_message_size"] = s.max_payload;
    d["head"] = s.head;
    d["tail"] = s.tail;
    d["messages_in"] = s.msgs_in;
    d["bytes_in"] = s.bytes_in;
    d["messages_out"] = s.msgs_out;
    d["bytes_out"] = s.bytes_out;
    d["frames_dropped"] = s.frames_dropped;
    d["lock_recoveries"] = s.lock_recoveries;
    d["creator_pid"] = s.creator_pid;
    d["closed"] = bool(s.closed);
    d["created_unix_ns"] = s.created_unix_ns;
    return d;
  }

  py::memoryview raw_view() {
    auto keep = ring();
    Ring& r = *keep;
    return py::memoryview::from_memory(r.base(), Py_ssize_t(r.map_size()), false);
  }

  // A claim table's words (see Ring::word_cas): the binding only converts
  // the status. word_cas returns what the word held (won: == expected).
  uint64_t word_cas(uint64_t index, uint64_t expected, uint64_t desired) {
    uint64_t seen = 0;
    Status st = ring()->word_cas(index, expected, desired, &seen);
    if (st != Status::kOk) raise_word(st, index);
    return seen;
  }
  uint64_t word_load(uint64_t index) {
    uint64_t v = 0;
    Status st = ring()->word_load(index, &v);
    if (st != Status::kOk) raise_word(st, index);
    return v;
  }
  void word_store(uint64_t index, uint64_t value) {
    Status st = ring()->word_store(index, value);
    if (st != Status::kOk) raise_word(st, index);
  }

  // Arena slots (slots.hpp); the binding only converts the outcomes.
  // slot_take: (slot, generation), or None when every slot is held.
  py::object slot_take(uint64_t slots, uint64_t pid) {
    uint64_t slot = 0, gen = 0;
    SlotStatus st = sage::slot_take(*ring(), slots, pid, &slot, &gen);
    if (st == SlotStatus::kOutOfRange) raise_word(Status::kInvalidArg, slots * sage::kSlotWords);
    if (st != SlotStatus::kOk) return py::none();
    return py::make_tuple(slot, gen);
  }
  // slot_hold / slot_release / slot_check: whether the slot was still at `gen` and held.
  bool slot_hold(uint64_t word, uint64_t gen, uint64_t pid) {
    SlotStatus st = sage::slot_hold(*ring(), word, gen, pid);
    if (st == SlotStatus::kOutOfRange) raise_word(Status::kInvalidArg, word);
    return st == SlotStatus::kOk;
  }
  bool slot_release(uint64_t word, uint64_t gen, uint64_t pid) {
    SlotStatus st = sage::slot_release(*ring(), word, gen, pid);
    if (st == SlotStatus::kOutOfRange) raise_word(Status::kInvalidArg, word);
    return st == SlotStatus::kOk;
  }
  bool slot_check(uint64_t word, uint64_t gen) {
    SlotStatus st = sage::slot_check(*ring(), word, gen);
    if (st == SlotStatus::kOutOfRange) raise_word(Status::kInvalidArg, word);
    return st == SlotStatus::kOk;
  }

  [[noreturn]] void raise_word(Status st, uint64_t index) {
    if (st == Status::kInvalidArg)
      raise("InvalidQueueArgument", label_ + ": word " + std::to_string(index) + " is past the table's " +
                                        std::to_string(ring()->word_count()) + " words");
    raise_status(st, label_, "", 0, "word");
  }

  void release() { ring_.reset(); }
  bool released() const { return !ring_; }
  bool created() const { return created_; }
  const std::string& label() const { return label_; }

 private:
  // Payloads up to this size are first tried once with the GIL held (a
  // trylock, never a wait): releasing and re-taking the GIL costs more than
  // copying them. Larger copies and every wait run with the GIL released.
  static constexpr size_t kSmall = 4 * 1024;

  // Takes the next frame into a new bytes (or, for `writable_kind`, bytearray)
  // object. Guesses size and type from the last message, so the common case
  // is one allocation and one copy straight from the ring into the result.
  py::object read_frame(int64_t ns, int writable_kind, uint16_t* kind_out) {
    auto keep = ring();
    Ring& r = *keep;
    size_t want = last_len_ < 64 ? 64 : last_len_;
    // writable_kind -1 asks for bytes always (and must not match last_kind_'s initial -1).
    bool writable = writable_kind >= 0 && last_kind_ == writable_kind;
    for (;;) {
      PyObject* obj = writable ? PyByteArray_FromStringAndSize(nullptr, Py_ssize_t(want))
                               : PyBytes_FromStringAndSize(nullptr, Py_ssize_t(want));
      if (!obj) throw py::error_already_set();
      char* dst = writable ? PyByteArray_AS_STRING(obj) : PyBytes_AS_STRING(obj);
      size_t got = 0;
      uint16_t kind = 0;
      Status st = Status::kTimeout;
      if (want <= kSmall) st = r.get(dst, want, &got, &kind, Ring::kTryOnce, writable_kind, writable);
      if (st == Status::kTimeout) {
        py::gil_scoped_release nogil;
        st = r.get(dst, want, &got, &kind, ns, writable_kind, writable);
      }
      if (st == Status::kBufferTooSmall) {
        // The frame at head is larger, or wants the other buffer type: retry
        // at once with exactly what it needs (it stays at head meanwhile,
        // unless another consumer takes it, which the loop also handles).
        Py_DECREF(obj);
        want = got;
        writable = writable_kind >= 0 && int(kind) == writable_kind;
        continue;
      }
      if (st != Status::kOk) {
        Py_DECREF(obj);
        raise_status(st, label_, r.detail(), r.last_errno(), "get");
      }
      last_len_ = got;
      last_kind_ = kind;
      if (got != want) {
        int rc = writable ? PyByteArray_Resize(obj, Py_ssize_t(got)) : _PyBytes_Resize(&obj, Py_ssize_t(got));
        if (rc != 0) throw py::error_already_set();
      }
      *kind_out = kind;
      return py::reinterpret_steal<py::object>(obj);
    }
  }

  void do_put(Ring& r, const sage::IoPart* io, size_t n, uint64_t total, uint16_t kind, int64_t ns) {
    Status st = Status::kTimeout;
    if (total <= kSmall) st = r.put(io, n, kind, Ring::kTryOnce);
    if (st == Status::kTimeout) {
      py::gil_scoped_release nogil;
      st = r.put(io, n, kind, ns);
    }
    if (st != Status::kOk) raise_status(st, label_, r.detail(), r.last_errno(), "put", total, r.max_payload());
  }

  std::shared_ptr<Ring> ring_;
  std::string label_;
  bool created_ = false;
  size_t last_len_ = 0;
  int last_kind_ = -1;
};

// Releases of an arena slot that found it already free, or reused by another
// message (a slot freed twice, or a stale view): counted, never applied.
std::atomic<uint64_t> g_stale_releases{0};

// Reads of a slot that began before its writer had filled it (slots.hpp):
// read as it filled (read_bytes), or waited for (a buffer made over it).
std::atomic<uint64_t> g_reads_while_filling{0};

// The pid is the cached one: getpid() is a system call, and on a host where
// those are dear (a VM that traps them) one per released view made the
// Python around it 1.7x slower (an array's encode and decode: 43.6 us in a
// loop, 24.4 without it).
void release_slot(Ring& r, uint64_t word, uint64_t gen) {
  if (sage::slot_release(r, word, gen, uint64_t(sage::this_pid())) != SlotStatus::kOk) g_stale_releases.fetch_add(1);
}

// How long a reader waits on a slot's writer that adds nothing before it
// asks whether the writer still runs, and how long it waits in all before it
// gives up on one that runs but never finishes (stopped, say).
constexpr int64_t kFillStallNs = 1'000'000;
constexpr int64_t kFillWaitMaxNs = 10'000'000'000LL;

// Waits (without the GIL) for `step` to finish reading a slot that its writer
// fills after sending (slots.hpp), through its stalls while the writer lives;
// raises DeserializationError if the writer died or never finishes.
template <typename Step>
void await_fill(Ring& r, uint64_t length, Step step) {
  SlotStatus st;
  int64_t waited = 0;
  {
    py::gil_scoped_release nogil;
    while ((st = step()) == SlotStatus::kStalled && r.creator_alive() && waited < kFillWaitMaxNs)
      waited += kFillStallNs;
  }
  if (st == SlotStatus::kOk) return;
  std::string why = st == SlotStatus::kStalled
                        ? (r.creator_alive() ? "its writer has not finished it after " +
                                                   std::to_string(kFillWaitMaxNs / 1'000'000'000) + " s"
                                             : "its writer died before it finished copying it in")
                        : "its words are past the slab's table";
  raise("DeserializationError", "a buffer of " + fmt_bytes(length) + " in " + r.name() + " cannot be read: " + why);
}

// A buffer over part of a segment's data region: an arena slot. Python
// buffers (numpy arrays, memoryviews, bytes) are made over it without a copy;
// it keeps the mapping alive, and when the last of them is released (by
// reference counting, never waiting for the garbage collector) it lets go of
// the slot: `word` >= 0 names the slot's word, released at generation `gen`.
// A slot its writer fills after sending is waited for before any buffer is
// made over it (info), or read as it fills (read_bytes).
class SlotView {
 public:
  SlotView(PyRing& ring, uint64_t offset, uint64_t length, bool readonly, int64_t word, uint64_t gen)
      : ring_(ring.ring()), offset_(offset), length_(length), readonly_(readonly), word_(word), gen_(gen) {
    uint64_t cap = ring_->capacity();
    if (offset > cap || length > cap - offset)
      raise("InvalidQueueArgument", ring.label() + ": a view of " + std::to_string(length) + " bytes at offset " +
                                        std::to_string(offset) + " is past the segment's " + std::to_string(cap) +
                                        " bytes");
  }
  ~SlotView() {
    if (word_ >= 0) release_slot(*ring_, uint64_t(word_), gen_);
  }
  SlotView(const SlotView&) = delete;
  SlotView& operator=(const SlotView&) = delete;

  py::buffer_info info() {
    if (word_ >= 0 && !filled()) {
      g_reads_while_filling.fetch_add(1, std::memory_order_relaxed);
      Ring& r = *ring_;
      uint64_t word = uint64_t(word_);
      await_fill(r, length_, [&] { return sage::slot_wait_filled(r, word, kFillStallNs); });
    }
    return py::buffer_info(ring_->data() + offset_, 1, py::format_descriptor<uint8_t>::format(), 1,
                           {py::ssize_t(length_)}, {py::ssize_t(1)}, readonly_);
  }
  // Copies `src` (any C-contiguous buffer) into this view at `at`, without the GIL.
  void write(const py::buffer& src, uint64_t at) {
    Views v;
    const Py_buffer& b = source(v, src, at, "write");
    py::gil_scoped_release nogil;
    sage::copy_for_reader(ring_->data() + offset_ + at, static_cast<const uint8_t*>(b.buf), uint64_t(b.len),
                          uint64_t(b.len));
  }
  // The view's bytes, copied out as its writer fills the slot (slots.hpp):
  // a reader of a bytes payload need not wait for all of it first.
  py::bytes read_bytes() {
    PyObject* obj = PyBytes_FromStringAndSize(nullptr, Py_ssize_t(length_));
    if (!obj) throw py::error_already_set();
    auto out = py::reinterpret_steal<py::bytes>(obj);
    auto* dst = reinterpret_cast<uint8_t*>(PyBytes_AS_STRING(obj));
    const uint8_t* src = ring_->data() + offset_;
    if (word_ < 0 || filled()) {
      py::gil_scoped_release nogil;
      std::memcpy(dst, src, length_);
      return out;
    }
    g_reads_while_filling.fetch_add(1, std::memory_order_relaxed);
    Ring& r = *ring_;
    uint64_t word = uint64_t(word_), done = 0;
    await_fill(r, length_, [&] { return sage::slot_copy_out(r, word, dst, src, length_, &done, kFillStallNs); });
    return out;
  }
  // Copies `src` into the slot whose words start at `word` (this view is the
  // slab's whole data region), at `at`, counting its unfilled word down as it
  // goes (slots.hpp): the message naming the slot is already on its way.
  void fill_slot(uint64_t word, const py::buffer& src, uint64_t at) {
    Views v;
    const Py_buffer& b = source(v, src, at, "fill");
    uint64_t probe = 0;
    if (ring_->word_load(word + sage::kSlotUnfilled, &probe) != Status::kOk)
      throw py::value_error("word " + std::to_string(word) + " is past the slab's word table");
    py::gil_scoped_release nogil;
    sage::slot_fill(*ring_, word, ring_->data() + offset_ + at, static_cast<const uint8_t*>(b.buf), uint64_t(b.len));
  }
  // One more holder, `pid`, of this view's slot, if the slot is still at the
  // view's generation: the view is sent on by location, without a copy.
  bool hold(uint64_t pid) {
    return word_ >= 0 && sage::slot_hold(*ring_, uint64_t(word_), gen_, pid) == SlotStatus::kOk;
  }
  // Where this view's slot is, as arena.Location's fields, in one call:
  // (slab name, slot, generation, offset, length).
  py::tuple location() const {
    return py::make_tuple(ring_->name(), word_ < 0 ? int64_t(-1) : word_ / int64_t(sage::kSlotWords), gen_, offset_,
                          length_);
  }
  // Touches every page (zeroes them), so later writes pay no page faults.
  void prefault() {
    py::gil_scoped_release nogil;
    std::memset(ring_->data() + offset_, 0, length_);
  }
  const std::string& shm_name() const { return ring_->name(); }
  uint64_t offset() const { return offset_; }
  uint64_t length() const { return length_; }
  int64_t word() const { return word_; }
  uint64_t gen() const { return gen_; }

 private:
  // `src`'s buffer (held by `v`), checked to fit this view at `at`.
  const Py_buffer& source(Views& v, const py::buffer& src, uint64_t at, const char* what) const {
    v.add(src.ptr());
    const Py_buffer& b = v.bufs[0];
    if (at > length_ || uint64_t(b.len) > length_ - at)
      throw py::value_error(std::string("a ") + what + " of " + std::to_string(b.len) + " bytes at " +
                            std::to_string(at) + " overruns a " + std::to_string(length_) + "-byte view");
    return b;
  }
  bool filled() const {
    uint64_t unfilled = 0;
    return ring_->word_load(uint64_t(word_) + sage::kSlotUnfilled, &unfilled) != Status::kOk || unfilled == 0;
  }

  std::shared_ptr<Ring> ring_;
  uint64_t offset_, length_;
  bool readonly_;
  int64_t word_;
  uint64_t gen_;
};

// How many exporters whole_slot looks through: an array's base chain (a
// reshaped array -> the array over the buffer -> a memoryview -> a SlotView).
constexpr int kWholeSlotDepth = 8;

// The SlotView that `raw` (a memoryview of a buffer about to be sent) covers
// exactly, found through the objects that export it, or None: whether the
// buffer already lives in an arena slot, and can be sent by location.
py::object whole_slot(py::handle raw) {
  if (!PyMemoryView_Check(raw.ptr())) return py::none();
  const Py_ssize_t nbytes = PyMemoryView_GET_BUFFER(raw.ptr())->len;
  // Looked up once: the type lives as long as the module, which is never unloaded.
  static auto* const slot_type = reinterpret_cast<PyTypeObject*>(py::type::of<SlotView>().ptr());
  py::object x = py::reinterpret_borrow<py::object>(PyMemoryView_GET_BUFFER(raw.ptr())->obj);
  for (int i = 0; i < kWholeSlotDepth && x && !x.is_none(); ++i) {
    if (PyObject_TypeCheck(x.ptr(), slot_type)) {
      return x.cast<SlotView&>().length() == uint64_t(nbytes) ? x : py::none();
    }
    if (PyMemoryView_Check(x.ptr())) {
      x = py::reinterpret_borrow<py::object>(PyMemoryView_GET_BUFFER(x.ptr())->obj);
      continue;
    }
    PyObject* base = PyObject_GetAttrString(x.ptr(), "base");
    if (!base) {
      if (!PyErr_ExceptionMatches(PyExc_AttributeError)) throw py::error_already_set();
      PyErr_Clear();
      return py::none();
    }
    x = py::reinterpret_steal<py::object>(base);
  }
  return py::none();
}

// The SlotView a location record names, if its slab is known and the record
// checks out (the checks of arena.SlabReader.view_at); else its fields.
py::object in_place(const py::dict& known, const py::object& name, const sage::oob::Record& r) {
  PyObject* entry = PyDict_GetItemWithError(known.ptr(), name.ptr());  // borrowed
  if (!entry && PyErr_Occurred()) throw py::error_already_set();
  if (entry && PyTuple_Check(entry) && PyTuple_GET_SIZE(entry) == 4) {
    auto& seg = py::handle(PyTuple_GET_ITEM(entry, 0)).cast<PyRing&>();
    auto slot_bytes = py::handle(PyTuple_GET_ITEM(entry, 1)).cast<uint64_t>();
    auto slots = py::handle(PyTuple_GET_ITEM(entry, 2)).cast<uint64_t>();
    auto base = py::handle(PyTuple_GET_ITEM(entry, 3)).cast<uint64_t>();
    if (!seg.released() && r.slot < slots && r.offset == base + r.slot * slot_bytes && r.length <= slot_bytes &&
        r.gen > 0) {
      std::shared_ptr<Ring> ring = seg.ring();
      uint64_t cap = ring->capacity(), word = r.slot * sage::kSlotWords;
      if (r.offset <= cap && r.length <= cap - r.offset && sage::slot_check(*ring, word, r.gen) == SlotStatus::kOk)
        return py::cast(std::make_unique<SlotView>(seg, r.offset, r.length, true, int64_t(word), r.gen));
    }
  }
  return py::make_tuple(name, r.slot, r.gen, r.offset, r.length);
}

// An out-of-band payload (_codec.py) split into its pickle and its buffers,
// for pickle.loads: (pickle, [buffer, ...]), each a memoryview of `payload`.
// A buffer that is a location record of an arena slot comes as a read-only
// SlotView of that slot when `known` (arena.SlabReader.known: slab name ->
// (Ring, slot bytes, slots, offset of slot 0)) has its slab and the record
// checks out: in range, and the slot still at its generation. Otherwise as
// the record's fields, (slab name, slot, generation, offset, length), for
// arena.py to open the slab, or to refuse the record with its reason and
// count it. A payload whose layout is broken raises ValueError.
py::tuple oob_buffers(py::handle payload, const py::dict& known) {
  py::object view = PyMemoryView_Check(payload.ptr())
                        ? py::reinterpret_borrow<py::object>(payload)
                        : py::reinterpret_steal<py::object>(PyMemoryView_FromObject(payload.ptr()));
  if (!view) throw py::error_already_set();
  View held(view.ptr());
  const auto* p = static_cast<const uint8_t*>(held.b.buf);
  const auto n = uint64_t(held.b.len);
  auto overruns = [n](const char* what, uint64_t len) {
    return py::value_error(std::string(what) + " of " + fmt_bytes(len) + " overruns the " + std::to_string(n) +
                           "-byte message");
  };
  sage::oob::Span pickle;
  std::vector<sage::oob::Span> spans;
  uint64_t detail = 0;
  switch (sage::oob::parse(p, n, &pickle, &spans, &detail)) {
    case sage::oob::Status::kOk:
      break;
    case sage::oob::Status::kTruncatedHead:
      throw py::value_error("truncated header (" + fmt_bytes(n) + ")");
    case sage::oob::Status::kPickleOverruns:
      throw overruns("pickle", detail);
    case sage::oob::Status::kBufferOverruns:
      throw overruns("buffer", detail);
    default:
      throw py::value_error("bad out-of-band header");
  }
  auto slice = [&](uint64_t pos, uint64_t len) {
    PyObject* s = PySequence_GetSlice(view.ptr(), Py_ssize_t(pos), Py_ssize_t(pos + len));
    if (!s) throw py::error_already_set();
    return py::reinterpret_steal<py::object>(s);
  };
  py::list out(spans.size());
  for (size_t i = 0; i < spans.size(); ++i) {
    const sage::oob::Span& sp = spans[i];
    if (!sp.located) {
      out[i] = slice(sp.pos, sp.len);
      continue;
    }
    sage::oob::Record r;
    sage::oob::Status st = sage::oob::parse_record(p + sp.pos, sp.len, &r);
    if (st == sage::oob::Status::kRecordTruncated)
      throw py::value_error("a buffer location of " + fmt_bytes(sp.len) + " is truncated");
    if (st != sage::oob::Status::kOk) throw py::value_error("a buffer location's slab name does not match its length");
    PyObject* name_ptr =
        PyUnicode_DecodeUTF8(reinterpret_cast<const char*>(p + sp.pos + r.name_pos), Py_ssize_t(r.name_len), "replace");
    if (!name_ptr) throw py::error_already_set();
    py::object name = py::reinterpret_steal<py::object>(name_ptr);
    out[i] = in_place(known, name, r);
  }
  return py::make_tuple(slice(pickle.pos, pickle.len), std::move(out));
}

// A location record's bytes (oob.hpp): the slot `slot` (at generation
// `gen`) of the slab `slab`, holding `length` bytes at `offset`.
py::bytes location_record(const std::string& slab, uint64_t slot, uint64_t gen, uint64_t offset, uint64_t length) {
  if (slab.size() > sage::oob::kMaxName)
    throw py::value_error("a slab name of " + std::to_string(slab.size()) + " bytes is too long for a location record");
  sage::oob::Record r;
  r.slot = slot;
  r.gen = gen;
  r.offset = offset;
  r.length = length;
  r.name_len = slab.size();
  std::string out(sage::oob::record_size(slab.size()), '\0');
  sage::oob::write_record(reinterpret_cast<uint8_t*>(out.data()), r, slab.data());
  return py::bytes(out);
}

// If `raw` is the buffer of a whole arena slot (see whole_slot): one more
// holder of the slot, for the receiver `pid`, and (location record, its
// fields as arena.Location's). None if it is not one, or its slot moved on
// (then the sender copies the buffer). One call, where Python took five.
py::object hold_slot(py::handle raw, uint64_t pid) {
  py::object v = whole_slot(raw);
  if (v.is_none()) return v;
  SlotView& view = v.cast<SlotView&>();
  if (view.shm_name().size() > sage::oob::kMaxName || !view.hold(pid)) return py::none();  // hold: a slot's view
  uint64_t slot = uint64_t(view.word()) / sage::kSlotWords;
  return py::make_tuple(location_record(view.shm_name(), slot, view.gen(), view.offset(), view.length()),
                        view.location());
}

// The parts of an out-of-band payload (oob.hpp's layout), to be written back
// to back: its pickle `data`, then `items`, each a location record (bytes)
// or a buffer to carry (anything else with the buffer protocol). Head,
// lengths, padding and records are joined into few bytes objects; a pickle
// above kJoinPickleMax and every carried buffer stay parts of their own, so
// nothing large is copied here (the ring copies them once).
constexpr Py_ssize_t kJoinPickleMax = 4096;

py::list oob_frame(const py::bytes& data, const py::list& items) {
  const size_t count = items.size();
  if (count > UINT32_MAX) throw py::value_error("too many buffers for one message: " + std::to_string(count));
  std::vector<uint64_t> lens(count);
  size_t joined = sage::oob::kHeadSize + count * (sage::oob::kLenSize + sage::oob::kAlign);  // head, lengths, padding
  for (size_t i = 0; i < count; ++i) {
    PyObject* it = PyList_GET_ITEM(items.ptr(), Py_ssize_t(i));
    if (PyBytes_CheckExact(it)) {
      lens[i] = uint64_t(PyBytes_GET_SIZE(it)) | sage::oob::kLocated;
      joined += size_t(PyBytes_GET_SIZE(it));
    } else if (PyMemoryView_Check(it)) {
      lens[i] = uint64_t(PyMemoryView_GET_BUFFER(it)->len);
    } else {
      View v(it);
      lens[i] = uint64_t(v.b.len);
    }
  }
  const Py_ssize_t plen = PyBytes_GET_SIZE(data.ptr());
  const bool join_pickle = plen <= kJoinPickleMax;
  std::string acc;
  acc.reserve(joined + (join_pickle ? size_t(plen) : 0));
  acc.resize(sage::oob::kHeadSize + count * sage::oob::kLenSize);
  auto* head = reinterpret_cast<uint8_t*>(acc.data());
  sage::oob::write_head(head, uint32_t(count), uint64_t(plen));
  for (size_t i = 0; i < count; ++i)
    sage::oob::store_u64(head + sage::oob::kHeadSize + i * sage::oob::kLenSize, lens[i]);
  py::list parts;
  auto flush = [&]() {
    if (!acc.empty()) parts.append(py::bytes(acc));
    acc.clear();
  };
  if (join_pickle) {
    acc.append(PyBytes_AS_STRING(data.ptr()), size_t(plen));
  } else {
    flush();
    parts.append(data);
  }
  uint64_t pos = sage::oob::kHeadSize + count * sage::oob::kLenSize + uint64_t(plen);
  for (size_t i = 0; i < count; ++i) {
    uint64_t p = sage::oob::pad(pos);
    acc.append(size_t(p), '\0');
    pos += p;
    PyObject* it = PyList_GET_ITEM(items.ptr(), Py_ssize_t(i));
    if (lens[i] & sage::oob::kLocated) {
      acc.append(PyBytes_AS_STRING(it), size_t(PyBytes_GET_SIZE(it)));
      pos += lens[i] & ~sage::oob::kLocated;
    } else {
      flush();
      parts.append(py::handle(it));
      pos += lens[i];
    }
  }
  flush();
  return parts;
}

// A bytes object's memory as a buffer that pickle does not see as read-only.
// A large bytes argument pickles as one out-of-band buffer over it; over a
// read-only buffer pickle adds a READONLY_BUFFER step, and that step makes
// the receiver export its slot view only to look at it, which waits for the
// whole slot to be filled (slots.hpp) before bytes_out_of can start copying
// it out as it fills. Nothing writes through this buffer: the sender only
// reads it (into a slot, or into the frame).
class BytesBuffer {
 public:
  explicit BytesBuffer(py::bytes data) : data_(std::move(data)) {}
  py::buffer_info info() const {
    return py::buffer_info(PyBytes_AS_STRING(data_.ptr()), 1, py::format_descriptor<uint8_t>::format(), 1,
                           {py::ssize_t(PyBytes_GET_SIZE(data_.ptr()))}, {py::ssize_t(1)}, false);
  }
  const py::bytes& data() const { return data_; }

 private:
  py::bytes data_;
};

// put_object and get_object again, as plain METH_FASTCALL functions bound to
// one ring: SageQueue calls them once per message, and pybind11's dispatch
// (argument conversion, overload resolution) costs as much as the ring itself.
// The capsule they are bound to holds a reference to the Ring object.
struct FastRing {
  PyObject* owner;  // the Python Ring object: keeps `ring` alive
  PyRing* ring;
};
constexpr const char* kFastRingCapsule = "sage_ray_comm._core.FastRing";

template <typename F>
PyObject* call_translating(F&& f) {
  try {
    return f().release().ptr();
  } catch (py::error_already_set& e) {
    e.restore();
  } catch (py::builtin_exception& e) {
    e.set_error();
  } catch (const std::bad_alloc&) {
    PyErr_NoMemory();
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
  }
  return nullptr;
}

PyRing* fast_ring(PyObject* capsule) {
  return static_cast<FastRing*>(PyCapsule_GetPointer(capsule, kFastRingCapsule))->ring;
}

// put_object(obj, timeout)
PyObject* fast_put_object(PyObject* capsule, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 2) {
    PyErr_Format(PyExc_TypeError, "put_object() takes 2 arguments (%zd given)", nargs);
    return nullptr;
  }
  PyRing* r = fast_ring(capsule);
  return call_translating(
      [&] { return r->put_object(py::handle(args[0]), py::reinterpret_borrow<py::object>(args[1])); });
}

// get_object(timeout, writable_kind)
PyObject* fast_get_object(PyObject* capsule, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 2) {
    PyErr_Format(PyExc_TypeError, "get_object() takes 2 arguments (%zd given)", nargs);
    return nullptr;
  }
  long writable_kind = PyLong_AsLong(args[1]);
  if (writable_kind == -1 && PyErr_Occurred()) return nullptr;
  PyRing* r = fast_ring(capsule);
  return call_translating(
      [&] { return r->get_object(py::reinterpret_borrow<py::object>(args[0]), int(writable_kind)); });
}

PyMethodDef kFastPutDef = {"put_object", reinterpret_cast<PyCFunction>(reinterpret_cast<void*>(fast_put_object)),
                           METH_FASTCALL, "put_object(obj, timeout): Ring.put_object without pybind11 dispatch."};
PyMethodDef kFastGetDef = {"get_object", reinterpret_cast<PyCFunction>(reinterpret_cast<void*>(fast_get_object)),
                           METH_FASTCALL,
                           "get_object(timeout, writable_kind): Ring.get_object without pybind11 dispatch."};

py::tuple fast_methods(py::object self) {
  auto* fr = new FastRing{self.ptr(), self.cast<PyRing*>()};
  Py_INCREF(fr->owner);
  PyObject* cap = PyCapsule_New(fr, kFastRingCapsule, [](PyObject* c) {
    auto* f = static_cast<FastRing*>(PyCapsule_GetPointer(c, kFastRingCapsule));
    Py_DECREF(f->owner);
    delete f;
  });
  if (!cap) {
    Py_DECREF(fr->owner);
    delete fr;
    throw py::error_already_set();
  }
  py::object capsule = py::reinterpret_steal<py::object>(cap);
  PyObject* put = PyCFunction_New(&kFastPutDef, cap);
  if (!put) throw py::error_already_set();
  py::object put_fn = py::reinterpret_steal<py::object>(put);
  PyObject* get = PyCFunction_New(&kFastGetDef, cap);
  if (!get) throw py::error_already_set();
  return py::make_tuple(put_fn, py::reinterpret_steal<py::object>(get));
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "Shared-memory MPMC ring buffer (private; use sage_ray_comm.SageQueue).";
  // The package version, from pyproject.toml through CMake (one source).
  m.attr("__version__") = SAGE_VERSION;
  m.attr("LAYOUT_VERSION") = sage::kVersion;
#ifdef SAGE_SANITIZED
  m.attr("SANITIZED") = true;
#else
  m.attr("SANITIZED") = false;
#endif
  m.attr("HEADER_SIZE") = sage::kHeaderSize;
  m.attr("FRAME_HEADER_SIZE") = sage::kFrameHeader;
  m.attr("MIN_CAPACITY") = sage::kMinCapacity;
  m.attr("MAX_CAPACITY") = sage::kMaxCapacity;
  m.attr("OPEN_OR_CREATE") = int(sage::OpenMode::kCreateOrOpen);
  m.attr("OPEN_ONLY") = int(sage::OpenMode::kOpenOnly);
  m.attr("CREATE_ONLY") = int(sage::OpenMode::kCreateOnly);
  // Where Ring._set_test_hook stops an operation, so a test can SIGKILL the
  // process there (tests/test_queue.py's crash tests).
  m.attr("HOOK_NONE") = int(Ring::kHookNone);
  m.attr("HOOK_AFTER_CLAIM") = int(Ring::kHookAfterClaim);
  m.attr("HOOK_IN_PRODUCER_LOCK") = int(Ring::kHookInProdLock);
  m.attr("HOOK_IN_CONSUMER_LOCK") = int(Ring::kHookInConsLock);

  // Byte offsets of header fields, for tests that corrupt a segment on purpose.
  py::dict offsets;
  offsets["magic"] = offsetof(sage::Header, magic);
  offsets["version"] = offsetof(sage::Header, version);
  offsets["capacity"] = offsetof(sage::Header, capacity);
  offsets["tail"] = offsetof(sage::Header, tail);
  offsets["head"] = offsetof(sage::Header, head);
  offsets["prod_lock"] = offsetof(sage::Header, prod_lock);
  offsets["cons_lock"] = offsetof(sage::Header, cons_lock);
  offsets["locks_end"] = offsetof(sage::Header, cons_lock) + sizeof(pthread_mutex_t);
  offsets["closed"] = offsetof(sage::Header, closed);
  offsets["data"] = sage::kHeaderSize;
  m.attr("_HEADER_OFFSETS") = offsets;

  m.attr("KIND_RAW") = kKindRaw;
  m.attr("KIND_PICKLE") = kKindPickle;
  m.attr("SLOT_WORDS") = sage::kSlotWords;
  m.attr("SLOT_NAMES") = sage::kSlotNames;
  m.attr("SLOT_UNFILLED") = sage::kSlotUnfilled;
  py::class_<Frame>(m, "Frame")
      .def_readonly("payload", &Frame::payload)
      .def_readonly("kind", &Frame::kind)
      .def_readonly("error", &Frame::error);

  py::class_<PyRing>(m, "Ring")
      .def(py::init<const std::string&, uint64_t, int, std::string>(), py::arg("shm_name"), py::arg("capacity"),
           py::arg("mode") = 0, py::arg("label") = "")
      .def("put", &PyRing::put, py::arg("data"), py::arg("kind") = 0, py::arg("timeout") = py::none())
      .def("put_parts", &PyRing::put_parts, py::arg("parts"), py::arg("kind") = 0, py::arg("timeout") = py::none())
      .def("get", &PyRing::get, py::arg("timeout") = py::none(), py::arg("writable_kind") = -1)
      .def("put_object", &PyRing::put_object, py::arg("obj"), py::arg("timeout") = py::none())
      .def("get_object", &PyRing::get_object, py::arg("timeout") = py::none(), py::arg("writable_kind") = -1)
      .def("fast_methods", &fast_methods)
      .def("count", &PyRing::count)
      .def(
          "would_block_put", [](PyRing& self, uint64_t n) { return self.ring()->would_block_put(n); }, py::arg("n"))
      .def("close_queue", [](PyRing& self) { self.ring()->close_queue(); })
      .def_property_readonly("closed", [](PyRing& self) { return self.ring()->is_closed(); })
      .def("unblock", &PyRing::unblock)
      .def("stats", &PyRing::stats)
      .def("reset_stats", [](PyRing& self) { self.ring()->reset_stats(); })
      .def(
          "set_spin_ns", [](PyRing& self, int64_t ns) { self.ring()->set_spin_ns(ns); }, py::arg("ns"))
      .def(
          "_set_test_hook", [](PyRing& self, int hook, int fd) { self.ring()->set_test_hook(hook, fd); },
          py::arg("hook"), py::arg("fd"))
      .def("word_count", [](PyRing& self) { return self.ring()->word_count(); })
      .def("word_cas", &PyRing::word_cas, py::arg("index"), py::arg("expected"), py::arg("desired"))
      .def("word_load", &PyRing::word_load, py::arg("index"))
      .def("word_store", &PyRing::word_store, py::arg("index"), py::arg("value"))
      .def("slot_take", &PyRing::slot_take, py::arg("slots"), py::arg("pid"))
      .def("slot_hold", &PyRing::slot_hold, py::arg("word"), py::arg("gen"), py::arg("pid"))
      .def("slot_release", &PyRing::slot_release, py::arg("word"), py::arg("gen"), py::arg("pid"))
      .def("slot_check", &PyRing::slot_check, py::arg("word"), py::arg("gen"))
      .def(
          "word_add",
          [](PyRing& self, uint64_t index, int64_t delta) {
            uint64_t after = 0;
            Status st = self.ring()->word_add(index, delta, &after);
            if (st != Status::kOk) self.raise_word(st, index);
            return after;
          },
          py::arg("index"), py::arg("delta"))
      .def("release", &PyRing::release)
      .def("raw_view", &PyRing::raw_view)
      .def_property_readonly("released", &PyRing::released)
      .def_property_readonly("created", &PyRing::created)
      .def_property_readonly("label", &PyRing::label)
      .def_property_readonly("shm_name", [](PyRing& self) { return self.ring()->name(); })
      .def_property_readonly("capacity", [](PyRing& self) { return self.ring()->capacity(); })
      .def_property_readonly("max_message_size", [](PyRing& self) { return self.ring()->max_payload(); });

  m.def(
      "unlink",
      [](const std::string& name) {
        int err = 0;
        Status st = Ring::unlink(name, &err);
        if (st == Status::kNotFound) return false;
        if (st != Status::kOk) raise_status(st, "segment " + name, "", err, "unlink");
        return true;
      },
      py::arg("name"));
  m.def(
      "inspect",
      [](const std::string& name) -> py::object {
        sage::Inspect in;
        int err = 0;
        Status st = Ring::inspect(name, &in, &err);
        if (st == Status::kNotFound) return py::none();
        if (st != Status::kOk) raise_status(st, "segment " + name, "", err, "inspect");
        py::dict d;
        d["valid"] = in.valid;
        d["initializing"] = in.initializing;
        d["file_size"] = in.file_size;
        d["creator_pid"] = in.creator_pid;
        d["creator_alive"] = in.creator_alive;
        d["live_attached"] = in.live_attached;
        d["attach_overflow"] = in.attach_overflow;
        return d;
      },
      py::arg("name"));
  py::class_<SlotView>(m, "SlotView", py::buffer_protocol())
      .def(py::init<PyRing&, uint64_t, uint64_t, bool, int64_t, uint64_t>(), py::arg("ring"), py::arg("offset"),
           py::arg("length"), py::arg("readonly") = true, py::arg("word") = -1, py::arg("gen") = 0)
      .def_buffer(&SlotView::info)
      .def("write", &SlotView::write, py::arg("src"), py::arg("at") = 0)
      .def("read_bytes", &SlotView::read_bytes)
      .def("fill_slot", &SlotView::fill_slot, py::arg("word"), py::arg("src"), py::arg("at"))
      .def("prefault", &SlotView::prefault)
      .def("hold", &SlotView::hold, py::arg("pid"))
      .def_property_readonly("location", &SlotView::location)
      .def_property_readonly("shm_name", &SlotView::shm_name)
      .def_property_readonly("offset", &SlotView::offset)
      .def_property_readonly("length", &SlotView::length)
      .def_property_readonly("word", &SlotView::word)
      .def_property_readonly("gen", &SlotView::gen);
  py::class_<BytesBuffer>(m, "BytesBuffer", py::buffer_protocol())
      .def(py::init<py::bytes>(), py::arg("data"))
      .def_buffer(&BytesBuffer::info)
      .def_property_readonly("data", &BytesBuffer::data);
  m.def("oob_buffers", &oob_buffers, py::arg("payload"), py::arg("known"));
  m.def("hold_slot", &hold_slot, py::arg("raw"), py::arg("pid"));
  m.def("oob_frame", &oob_frame, py::arg("data"), py::arg("items"));
  m.def("location_record", &location_record, py::arg("slab"), py::arg("slot"), py::arg("gen"), py::arg("offset"),
        py::arg("length"));
  m.def("stale_releases", []() { return g_stale_releases.load(); });
  m.def("reads_while_filling", []() { return g_reads_while_filling.load(); });
  m.def("process_alive", &sage::process_alive, py::arg("pid"), py::arg("start_time") = 0);
  m.def("process_start_time", &sage::process_start_time, py::arg("pid"));
}
