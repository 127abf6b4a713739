// sage_ray_comm shared-memory ring buffer: implementation. See ring.hpp for
// the layout and the protocol.
#include "ring.hpp"

#include <fcntl.h>
#include <linux/futex.h>
#include <sched.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cstdio>
#include <cstring>
#include <ctime>

#include "spin.hpp"

namespace sage {
namespace {

constexpr int64_t kForever = -1;
// A sleeping waiter re-checks at least this often. Short while the frame at
// head is claimed (its producer may die and never wake us), long otherwise
// (a wake always comes from commit, release or close).
constexpr int64_t kSliceClaimNs = 20'000'000;
constexpr int64_t kSliceNs = 500'000'000;

inline uint64_t align_up(uint64_t v, uint64_t a) {
  return (v + a - 1) & ~(a - 1);
}

uint64_t unix_ns() {
  timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return uint64_t(ts.tv_sec) * 1'000'000'000ULL + uint64_t(ts.tv_nsec);
}

int64_t deadline_from(int64_t timeout_ns) {
  if (timeout_ns < 0) return kForever;
  return now_ns() + timeout_ns;
}

// Time left before `deadline`, or kForever.
int64_t remaining(int64_t deadline) {
  if (deadline == kForever) return kForever;
  int64_t r = deadline - now_ns();
  return r < 0 ? 0 : r;
}

void futex_wait(std::atomic<uint32_t>* addr, uint32_t expected, int64_t timeout_ns) {
  timespec ts;
  timespec* tsp = nullptr;
  if (timeout_ns >= 0) {
    ts.tv_sec = timeout_ns / 1'000'000'000LL;
    ts.tv_nsec = timeout_ns % 1'000'000'000LL;
    tsp = &ts;
  }
  // Shared (not FUTEX_PRIVATE_FLAG): waiters live in other processes.
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(addr), FUTEX_WAIT, expected, tsp, nullptr, 0);
}

void futex_wake_all(std::atomic<uint32_t>* addr) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(addr), FUTEX_WAKE, INT_MAX, nullptr, nullptr, 0);
}

// Bumps `seq` and wakes its sleepers only if someone announced a sleep. The
// seq_cst pair (bump, then read waiters) against the waiter's (announce, then
// read seq) means one side always sees the other: no lost wake-up.
void signal(std::atomic<uint32_t>* seq, std::atomic<uint32_t>* waiters) {
  seq->fetch_add(1, std::memory_order_seq_cst);
  if (waiters->load(std::memory_order_seq_cst) != 0) futex_wake_all(seq);
}

uint64_t max_payload_for(uint64_t capacity) {
  // Any frame of at most capacity/2 bytes fits even when it needs a padding
  // record first, so a put of a legal size can always make progress.
  uint64_t half = (capacity / 2) & ~(kAlign - 1);
  uint64_t m = half - kFrameHeader;
  constexpr uint64_t kU32Max = 0xFFFFFFF0ULL - kFrameHeader;
  return m < kU32Max ? m : kU32Max;
}

bool valid_shm_name(const std::string& n) {
  if (n.size() < 2 || n.size() > 250 || n[0] != '/') return false;
  for (size_t i = 1; i < n.size(); ++i) {
    if (n[i] == '/' || n[i] == '\0') return false;
  }
  return true;
}

Status init_mutex(pthread_mutex_t* m) {
  pthread_mutexattr_t attr;
  if (pthread_mutexattr_init(&attr) != 0) return Status::kSysError;
  pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED);
  pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST);
  int rc = pthread_mutex_init(m, &attr);
  pthread_mutexattr_destroy(&attr);
  return rc == 0 ? Status::kOk : Status::kSysError;
}

// Lays out a fresh header in a zeroed segment. The magic is stored last, so a
// reader that sees it sees everything else.
Status init_header(Header* h, uint64_t capacity) {
  std::memset(static_cast<void*>(h), 0, sizeof(Header));
  h->version = kVersion;
  h->header_size = uint32_t(kHeaderSize);
  h->capacity = capacity;
  h->max_payload = max_payload_for(capacity);
  h->creator_pid = uint32_t(getpid());
  h->creator_start_time = process_start_time(uint32_t(getpid()));
  h->created_unix_ns = unix_ns();
  if (init_mutex(&h->prod_lock) != Status::kOk) return Status::kSysError;
  if (init_mutex(&h->cons_lock) != Status::kOk) return Status::kSysError;
  std::atomic_thread_fence(std::memory_order_release);
  reinterpret_cast<std::atomic<uint64_t>*>(&h->magic)->store(kMagic, std::memory_order_release);
  return Status::kOk;
}

uint64_t load_magic(const Header* h) {
  return reinterpret_cast<const std::atomic<uint64_t>*>(&h->magic)->load(std::memory_order_acquire);
}

// getpid() is a system call on current glibc; a put needs the pid for its
// claim, so cache it and refresh it in fork children.
std::atomic<uint32_t> g_pid{0};
void refresh_pid() {
  g_pid.store(uint32_t(getpid()), std::memory_order_relaxed);
}
uint32_t my_pid() {
  uint32_t p = g_pid.load(std::memory_order_relaxed);
  if (p == 0) {
    static bool registered = [] { return pthread_atfork(nullptr, nullptr, refresh_pid) == 0; }();
    (void)registered;
    refresh_pid();
    p = g_pid.load(std::memory_order_relaxed);
  }
  return p;
}

}  // namespace

uint32_t this_pid() {
  return my_pid();
}

const char* status_name(Status s) {
  switch (s) {
    case Status::kOk:
      return "ok";
    case Status::kTimeout:
      return "timeout";
    case Status::kClosed:
      return "closed";
    case Status::kTooLarge:
      return "too large";
    case Status::kBufferTooSmall:
      return "buffer too small";
    case Status::kCorrupt:
      return "corrupt";
    case Status::kNotFound:
      return "not found";
    case Status::kExists:
      return "exists";
    case Status::kBadMagic:
      return "bad magic";
    case Status::kBadVersion:
      return "bad version";
    case Status::kSysError:
      return "system error";
    case Status::kInvalidArg:
      return "invalid argument";
  }
  return "unknown";
}

uint64_t process_start_time(uint32_t pid) {
  if (pid == 0) return 0;
  char path[64];
  std::snprintf(path, sizeof path, "/proc/%u/stat", pid);
  int fd = ::open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return 0;
  char buf[1024];
  ssize_t n = ::read(fd, buf, sizeof buf - 1);
  ::close(fd);
  if (n <= 0) return 0;
  buf[n] = '\0';
  // comm may contain spaces and ')': fields resume after the last ')'.
  char* p = std::strrchr(buf, ')');
  if (!p) return 0;
  p += 2;  // ") "
  char state = *p;
  if (state == 'Z' || state == 'X' || state == 'x') return 0;  // zombie = dead
  // starttime is field 22; the state is field 3.
  int field = 3;
  while (*p && field < 22) {
    if (*p == ' ') ++field;
    ++p;
  }
  if (field != 22) return 0;
  uint64_t v = std::strtoull(p, nullptr, 10);
  return v == 0 ? 1 : v;
}

bool process_alive(uint32_t pid, uint64_t start_time) {
  if (pid == 0) return false;
  uint64_t st = process_start_time(pid);
  if (st == 0) {
    // Not visible in /proc (or a zombie). kill(0) distinguishes "no such
    // process" from "not ours to see"; only the first is proof of death.
    if (::kill(pid_t(pid), 0) == 0) {
      char path[64];
      std::snprintf(path, sizeof path, "/proc/%u", pid);
      struct stat sb;
      // Visible but zombie: dead. Invisible but signalable: alive elsewhere.
      return ::stat(path, &sb) != 0;
    }
    return errno == EPERM;
  }
  return start_time == 0 || st == start_time;
}

// ---------------------------------------------------------------- open/close

namespace {

enum class Probe { kEmpty, kValid, kBadMagic, kBadVersion, kBadGeometry, kError };

// Reads what a segment holds without mapping it for use. kEmpty: a creator
// has not finished (or died before finishing) laying it out.
Probe probe_segment(int fd, uint64_t* capacity) {
  struct stat sb;
  if (fstat(fd, &sb) != 0) return Probe::kError;
  if (uint64_t(sb.st_size) < kHeaderSize) return Probe::kEmpty;
  void* p = mmap(nullptr, kHeaderSize, PROT_READ, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) return Probe::kError;
  const Header* h = static_cast<const Header*>(p);
  uint64_t magic = load_magic(h);
  uint32_t version = h->version;
  uint32_t hsize = h->header_size;
  uint64_t cap = h->capacity;
  uint64_t maxp = h->max_payload;
  munmap(p, kHeaderSize);
  if (magic == 0) return Probe::kEmpty;
  if (magic != kMagic) return Probe::kBadMagic;
  if (version != kVersion) return Probe::kBadVersion;
  if (hsize != kHeaderSize || cap < kMinCapacity || cap > kMaxCapacity || cap % 64 != 0 ||
      uint64_t(sb.st_size) != kHeaderSize + cap || maxp != max_payload_for(cap))
    return Probe::kBadGeometry;
  *capacity = cap;
  return Probe::kValid;
}

}  // namespace

Status Ring::open(const std::string& shm_name, uint64_t capacity, OpenMode mode, Ring** out, bool* created, int* err,
                  std::string* detail) {
  *out = nullptr;
  *created = false;
  *err = 0;
  if (!valid_shm_name(shm_name)) return Status::kInvalidArg;
  if (mode != OpenMode::kOpenOnly) {
    capacity = align_up(capacity < kMinCapacity ? kMinCapacity : capacity, 64);
    if (capacity > kMaxCapacity) return Status::kInvalidArg;
  }

  int fd = -1;
  bool mine = false;
  for (int attempt = 0; attempt < 8 && fd < 0; ++attempt) {
    if (mode != OpenMode::kOpenOnly) {
      fd = shm_open(shm_name.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
      if (fd >= 0) {
        mine = true;
        break;
      }
      if (errno != EEXIST) {
        *err = errno;
        return Status::kSysError;
      }
      if (mode == OpenMode::kCreateOnly) return Status::kExists;
    }
    fd = shm_open(shm_name.c_str(), O_RDWR | O_CLOEXEC, 0);
    if (fd < 0 && errno != ENOENT) {
      *err = errno;
      return Status::kSysError;
    }
    if (fd < 0 && mode == OpenMode::kOpenOnly) return Status::kNotFound;
    // ENOENT: unlinked between our two calls; try creating again.
  }
  if (fd < 0) return Status::kNotFound;

  Ring* r = new Ring();
  r->name_ = shm_name;
  r->fd_ = fd;
  auto fail = [&](Status s, int e, const char* why) {
    flock(fd, LOCK_UN);
    *err = e;
    if (why && detail) *detail = why;
    delete r;  // closes fd
    return s;
  };

  // The creator holds an exclusive flock while it lays out the header;
  // openers take a shared one, so they never see a half-built segment. If
  // the creator dies, the kernel drops its lock and the segment is left
  // empty: an opener then lays it out itself, under the exclusive lock.
  bool need_init = mine;
  if (flock(fd, mine ? LOCK_EX : LOCK_SH) != 0) return fail(Status::kSysError, errno, nullptr);
  if (!mine) {
    uint64_t cap = 0;
    Probe pr = probe_segment(fd, &cap);
    if (pr == Probe::kEmpty) {
      if (mode == OpenMode::kOpenOnly) return fail(Status::kNotFound, 0, nullptr);
      flock(fd, LOCK_UN);
      if (flock(fd, LOCK_EX) != 0) return fail(Status::kSysError, errno, nullptr);
      pr = probe_segment(fd, &cap);  // another opener may have finished it
      need_init = pr == Probe::kEmpty;
    }
    switch (pr) {
      case Probe::kValid:
        capacity = cap;
        break;
      case Probe::kEmpty:
        break;
      case Probe::kBadMagic:
        return fail(Status::kBadMagic, 0, "not a sage_ray_comm ring (bad magic)");
      case Probe::kBadVersion:
        return fail(Status::kBadVersion, 0, "ring layout version differs");
      case Probe::kBadGeometry:
        return fail(Status::kCorrupt, 0, "segment header geometry is inconsistent");
      case Probe::kError:
        return fail(Status::kSysError, errno, nullptr);
    }
  }
  if (need_init) {
    if (ftruncate(fd, off_t(kHeaderSize + capacity)) != 0) return fail(Status::kSysError, errno, nullptr);
    // Reserve the pages now: on a full tmpfs a sparse segment would fault
    // with SIGBUS on first touch; reserved, the caller gets ENOSPC here.
    int fa = posix_fallocate(fd, 0, off_t(kHeaderSize + capacity));
    if (fa != 0 && fa != EOPNOTSUPP && fa != EINVAL) {
      if (mine) shm_unlink(shm_name.c_str());  // never leave an empty segment behind
      return fail(Status::kSysError, fa, nullptr);
    }
    fchmod(fd, 0600);
  }
  r->capacity_ = capacity;
  r->max_payload_ = max_payload_for(capacity);
  r->map_size_ = size_t(kHeaderSize + capacity);
  void* p = mmap(nullptr, r->map_size_, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) return fail(Status::kSysError, errno, nullptr);
  r->base_ = static_cast<uint8_t*>(p);
  r->hdr_ = reinterpret_cast<Header*>(r->base_);
  r->data_ = r->base_ + kHeaderSize;
  if (need_init) {
    Status st = init_header(r->hdr_, capacity);
    if (st != Status::kOk) return fail(st, errno, nullptr);
    *created = true;
  }
  flock(fd, LOCK_UN);
  r->attach();
  *out = r;
  return Status::kOk;
}

Status Ring::unlink(const std::string& shm_name, int* err) {
  *err = 0;
  if (!valid_shm_name(shm_name)) return Status::kInvalidArg;
  if (shm_unlink(shm_name.c_str()) != 0) {
    if (errno == ENOENT) return Status::kNotFound;
    *err = errno;
    return Status::kSysError;
  }
  return Status::kOk;
}

Status Ring::inspect(const std::string& shm_name, Inspect* out, int* err) {
  *err = 0;
  std::memset(out, 0, sizeof *out);
  if (!valid_shm_name(shm_name)) return Status::kInvalidArg;
  int fd = shm_open(shm_name.c_str(), O_RDONLY | O_CLOEXEC, 0);
  if (fd < 0) {
    *err = errno;
    return errno == ENOENT ? Status::kNotFound : Status::kSysError;
  }
  // An exclusive holder means a creator is laying it out right now.
  if (flock(fd, LOCK_SH | LOCK_NB) != 0) {
    out->initializing = true;
    ::close(fd);
    return Status::kOk;
  }
  struct stat sb;
  if (fstat(fd, &sb) != 0) {
    *err = errno;
    ::close(fd);
    return Status::kSysError;
  }
  out->file_size = uint64_t(sb.st_size);
  if (out->file_size >= kHeaderSize) {
    void* p = mmap(nullptr, kHeaderSize, PROT_READ, MAP_SHARED, fd, 0);
    if (p != MAP_FAILED) {
      const Header* h = static_cast<const Header*>(p);
      out->valid = load_magic(h) == kMagic && h->version == kVersion;
      if (out->valid) {
        out->creator_pid = h->creator_pid;
        out->creator_alive = process_alive(h->creator_pid, h->creator_start_time);
        for (int i = 0; i < kAttachSlots; ++i) {
          uint32_t pid = h->attached[i].pid.load(std::memory_order_acquire);
          uint64_t st = h->attached[i].start_time.load(std::memory_order_acquire);
          if (pid != 0 && process_alive(pid, st)) ++out->live_attached;
        }
        out->attach_overflow = h->attach_overflow.load(std::memory_order_acquire) != 0;
      }
      munmap(p, kHeaderSize);
    }
  }
  flock(fd, LOCK_UN);
  ::close(fd);
  return Status::kOk;
}

Ring::~Ring() {
  detach();
  if (base_) munmap(base_, map_size_);
  if (fd_ >= 0) ::close(fd_);
}

// Records this process in the segment's attach table, so gc knows the
// segment is in use. A full table sets attach_overflow, so gc knows the
// table is incomplete and checks the processes' mappings instead.
void Ring::attach() {
  uint32_t me = my_pid();
  uint64_t st = process_start_time(me);
  for (int i = 0; i < kAttachSlots; ++i) {
    AttachSlot& s = hdr_->attached[i];
    uint32_t cur = s.pid.load(std::memory_order_acquire);
    if (cur == me && s.start_time.load() == st) {
      attach_slot_ = -1;  // already listed by another handle in this process
      return;
    }
  }
  for (int i = 0; i < kAttachSlots; ++i) {
    AttachSlot& s = hdr_->attached[i];
    uint32_t cur = s.pid.load(std::memory_order_acquire);
    if (cur != 0 && process_alive(cur, s.start_time.load())) continue;
    if (s.pid.compare_exchange_strong(cur, me)) {
      s.start_time.store(st, std::memory_order_release);
      attach_slot_ = i;
      return;
    }
  }
  hdr_->attach_overflow.store(1, std::memory_order_release);  // unlisted: gc must look further
}

void Ring::detach() {
  if (attach_slot_ < 0 || !hdr_) return;
  uint32_t me = my_pid();
  uint32_t expected = me;
  // After fork the child holds the parent's handle: leave the parent's slot.
  hdr_->attached[attach_slot_].pid.compare_exchange_strong(expected, 0);
  attach_slot_ = -1;
}

// ------------------------------------------------------------------ helpers

Status Ring::check_magic() {
  if (load_magic(hdr_) != kMagic || hdr_->version != kVersion || hdr_->capacity != capacity_) {
    detail_ = "segment header was overwritten (magic, version or capacity changed)";
    return Status::kCorrupt;
  }
  return Status::kOk;
}

Status Ring::lock_result(pthread_mutex_t* m, int rc) {
  if (rc == 0) return Status::kOk;
  if (rc == EOWNERDEAD) {
    // The holder died. Nothing to repair (see ring.hpp): mark it usable.
    pthread_mutex_consistent(m);
    hdr_->lock_recoveries.fetch_add(1, std::memory_order_relaxed);
    return Status::kOk;
  }
  if (rc == ETIMEDOUT || rc == EBUSY) return Status::kTimeout;
  detail_ = std::string("lock failed: ") + std::strerror(rc);
  return Status::kCorrupt;
}

Status Ring::acquire(pthread_mutex_t* m, int64_t timeout_ns, int64_t deadline) {
  if (timeout_ns == kTryOnce) return lock_result(m, pthread_mutex_trylock(m));
  // Non-blocking calls still wait briefly for the lock: its holders only run
  // a few dozen instructions (or one copy, for consumers).
  if (timeout_ns == 0) deadline = now_ns() + 50'000'000;
  if (deadline == kForever) return lock_result(m, pthread_mutex_lock(m));
  timespec ts;
  ts.tv_sec = deadline / 1'000'000'000LL;
  ts.tv_nsec = deadline % 1'000'000'000LL;
  return lock_result(m, pthread_mutex_clocklock(m, CLOCK_MONOTONIC, &ts));
}

Status Ring::validate_positions(uint64_t head, uint64_t tail) {
  if (head > tail || tail - head > capacity_ || (head % kAlign) != 0 || (tail % kAlign) != 0) {
    char b[160];
    std::snprintf(b, sizeof b, "head/tail counters are inconsistent (head=%llu tail=%llu capacity=%llu)",
                  (unsigned long long)head, (unsigned long long)tail, (unsigned long long)capacity_);
    detail_ = b;
    return Status::kCorrupt;
  }
  return Status::kOk;
}

FrameHeader* Ring::frame_at(uint64_t pos) const {
  return reinterpret_cast<FrameHeader*>(data_ + (pos % capacity_));
}

uint32_t Ring::tag_for(uint64_t pos) const {
  uint64_t x = (pos / kAlign) * 0x9E3779B97F4A7C15ULL;
  return uint32_t(x >> 32) ^ 0x5A6E0001u;
}

bool Ring::frame_ready_hint() {
  uint64_t head = hdr_->head.load(std::memory_order_acquire);
  uint64_t tail = hdr_->tail.load(std::memory_order_acquire);
  if (hdr_->closed.load(std::memory_order_relaxed)) return true;
  if (head == tail) return false;
  if (validate_positions(head, tail) != Status::kOk) return true;  // let the locked path report it
  uint32_t code = frame_at(head)->state.load(std::memory_order_acquire) & 0xFFFF;
  return code != kStateClaimed;
}

Status Ring::advance_to_ready(FrameHeader** frame, uint64_t* pos, bool* blocked, bool check_liveness) {
  *frame = nullptr;
  *blocked = false;
  for (;;) {
    uint64_t head = hdr_->head.load(std::memory_order_relaxed);
    uint64_t tail = hdr_->tail.load(std::memory_order_acquire);
    Status st = validate_positions(head, tail);
    if (st != Status::kOk) return st;
    if (head == tail) return Status::kOk;
    FrameHeader* f = frame_at(head);
    uint32_t state = f->state.load(std::memory_order_acquire);
    uint32_t code = state & 0xFFFF;
    uint64_t off = head % capacity_;
    char b[200];
    if (f->tag != tag_for(head)) {
      std::snprintf(b, sizeof b, "frame at position %llu has a bad tag (random bytes in the ring?)",
                    (unsigned long long)head);
      detail_ = b;
      return Status::kCorrupt;
    }
    if (code == kStatePadding) {
      if (uint64_t(f->len) + kFrameHeader != capacity_ - off) {
        std::snprintf(b, sizeof b, "padding record at position %llu has length %u, expected %llu",
                      (unsigned long long)head, f->len, (unsigned long long)(capacity_ - off - kFrameHeader));
        detail_ = b;
        return Status::kCorrupt;
      }
      hdr_->head.store(head + (capacity_ - off), std::memory_order_release);
      continue;
    }
    if (code != kStateCommitted && code != kStateClaimed) {
      std::snprintf(b, sizeof b, "frame at position %llu has unknown state 0x%x", (unsigned long long)head, state);
      detail_ = b;
      return Status::kCorrupt;
    }
    uint64_t need = align_up(kFrameHeader + f->len, kAlign);
    if (f->len > max_payload_ || off + need > capacity_ || head + need > tail) {
      std::snprintf(b, sizeof b, "frame at position %llu claims %u bytes, which does not fit the ring",
                    (unsigned long long)head, f->len);
      detail_ = b;
      return Status::kCorrupt;
    }
    if (code == kStateCommitted) {
      *frame = f;
      *pos = head;
      return Status::kOk;
    }
    // Claimed, not committed yet. Skip it only if its producer is dead.
    if (check_liveness && !process_alive(f->pid, 0)) {
      hdr_->head.store(head + need, std::memory_order_release);
      hdr_->frames_dropped.fetch_add(1, std::memory_order_relaxed);
      signal(&hdr_->space_seq, &hdr_->space_waiters);
      continue;
    }
    *blocked = true;
    return Status::kOk;
  }
}

void Ring::test_stop(int hook) {
  if (test_hook_ != hook) return;
  char b = 'x';
  if (test_fd_ >= 0) (void)!::write(test_fd_, &b, 1);
  for (;;) pause();
}

namespace {
bool same_cpu(const std::atomic<uint32_t>* peer) {
  uint32_t p = peer->load(std::memory_order_relaxed);
  if (p == 0) return false;
  int c = sched_getcpu();
  return c >= 0 && uint32_t(c) + 1 == p;
}

void note_cpu(std::atomic<uint32_t>* where) {
  int c = sched_getcpu();
  if (c < 0) return;
  uint32_t v = uint32_t(c) + 1;
  if (where->load(std::memory_order_relaxed) != v) where->store(v, std::memory_order_relaxed);
}
}  // namespace

// Spins up to spin_ns_ for `ready`, then sleeps on the futex `seq` for at
// most one slice (bounded by the deadline). Callers loop: a return means
// "look again", not "ready". Announcing ourselves in `waiters` before reading
// `seq` pairs with signal(): either we see the change or the signaller sees
// us and wakes the futex.
template <typename Ready>
void Ring::wait_until(std::atomic<uint32_t>* seq, std::atomic<uint32_t>* waiters, const std::atomic<uint32_t>* peer_cpu,
                      int64_t deadline, int64_t slice_cap, Ready ready) {
  // A peer that last ran on this CPU cannot make progress while we spin
  // here: sleep at once (measured: 47 us round trips instead of 20 us when
  // the scheduler put caller and service on one core).
  if (!same_cpu(peer_cpu)) {
    int64_t spin_until = now_ns() + spin_ns_;
    for (int i = 0;; ++i) {
      if (ready()) return;
      if (i < 256) {
        SAGE_CPU_RELAX();  // the peer is likely running on another core right now
        continue;
      }
      if (now_ns() > spin_until) break;
      // Then yield while spinning: if the peer moved to this CPU since it
      // last ran, it runs now instead of waiting out our spin.
      sched_yield();
    }
  }
  waiters->fetch_add(1, std::memory_order_seq_cst);
  uint32_t s = seq->load(std::memory_order_seq_cst);
  if (!ready()) {
    int64_t left = remaining(deadline);
    int64_t slice = left == kForever || left > slice_cap ? slice_cap : left;
    if (slice > 0) futex_wait(seq, s, slice);
  }
  waiters->fetch_sub(1, std::memory_order_seq_cst);
}

// ---------------------------------------------------------------------- put

bool Ring::would_block_put(uint64_t payload) {
  uint64_t head = hdr_->head.load(std::memory_order_acquire);
  uint64_t tail = hdr_->tail.load(std::memory_order_acquire);
  if (validate_positions(head, tail) != Status::kOk) return false;
  uint64_t need = align_up(kFrameHeader + payload, kAlign);
  uint64_t off = tail % capacity_;
  uint64_t pad = off + need > capacity_ ? capacity_ - off : 0;
  return tail + pad + need - head > capacity_;
}

Status Ring::put(const IoPart* parts, size_t nparts, uint16_t kind, int64_t timeout_ns) {
  uint64_t len = 0;
  for (size_t i = 0; i < nparts; ++i) len += parts[i].len;
  if (len > max_payload_) return Status::kTooLarge;
  Status st = check_magic();
  if (st != Status::kOk) return st;

  const bool try_once = timeout_ns == kTryOnce;
  const int64_t deadline = try_once ? 0 : deadline_from(timeout_ns);
  const uint64_t need = align_up(kFrameHeader + len, kAlign);
  const uint32_t me = my_pid();
  for (;;) {
    if (hdr_->closed.load(std::memory_order_acquire)) return Status::kClosed;
    st = acquire(&hdr_->prod_lock, timeout_ns, deadline);
    if (st != Status::kOk) return st;
    note_cpu(&hdr_->put_cpu);

    uint64_t tail = hdr_->tail.load(std::memory_order_relaxed);
    uint64_t off = tail % capacity_;
    uint64_t pad = off + need > capacity_ ? capacity_ - off : 0;
    uint64_t head = hdr_->head_cache.load(std::memory_order_relaxed);
    if (head > tail || tail + pad + need - head > capacity_) {
      head = hdr_->head.load(std::memory_order_acquire);
      hdr_->head_cache.store(head, std::memory_order_relaxed);
    }
    st = validate_positions(head, tail);
    if (st != Status::kOk) {
      pthread_mutex_unlock(&hdr_->prod_lock);
      return st;
    }
    if (tail + pad + need - head <= capacity_) {
      if (pad) {
        FrameHeader* p = frame_at(tail);
        p->len = uint32_t(pad - kFrameHeader);
        p->pid = me;
        p->tag = tag_for(tail);
        p->state.store(kStatePadding, std::memory_order_relaxed);
      }
      uint64_t pos = tail + pad;
      FrameHeader* f = frame_at(pos);
      f->len = uint32_t(len);
      f->pid = me;
      f->tag = tag_for(pos);
      f->state.store(kStateClaimed, std::memory_order_relaxed);
      test_stop(kHookInProdLock);
      // Counted at claim, under the lock, so a plain load/store suffices (a
      // claim that is never committed is also counted in frames_dropped).
      hdr_->msgs_in.store(hdr_->msgs_in.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
      hdr_->bytes_in.store(hdr_->bytes_in.load(std::memory_order_relaxed) + len, std::memory_order_relaxed);
      // Publishing tail is the last act of the critical section: a producer
      // killed before it claimed nothing.
      hdr_->tail.store(pos + need, std::memory_order_release);
      pthread_mutex_unlock(&hdr_->prod_lock);
      test_stop(kHookAfterClaim);

      uint8_t* dst = reinterpret_cast<uint8_t*>(f) + kFrameHeader;
      for (size_t i = 0; i < nparts; ++i) {
        if (parts[i].len) std::memcpy(dst, parts[i].data, parts[i].len);
        dst += parts[i].len;
      }
      f->state.store((uint32_t(kind) << 16) | kStateCommitted, std::memory_order_release);
      signal(&hdr_->data_seq, &hdr_->data_waiters);
      return Status::kOk;
    }
    pthread_mutex_unlock(&hdr_->prod_lock);

    // Full. Spin a little, then sleep until a consumer releases space.
    if (timeout_ns == 0 || try_once) return Status::kTimeout;
    if (remaining(deadline) == 0) return Status::kTimeout;
    wait_until(&hdr_->space_seq, &hdr_->space_waiters, &hdr_->get_cpu, deadline, kSliceNs,
               [&] { return !would_block_put(len) || hdr_->closed.load(std::memory_order_relaxed); });
  }
}

// ---------------------------------------------------------------------- get

Status Ring::get(void* buf, size_t cap, size_t* out_len, uint16_t* out_kind, int64_t timeout_ns, int needs_writable,
                 bool buf_writable) {
  *out_len = 0;
  *out_kind = 0;
  Status st = check_magic();
  if (st != Status::kOk) return st;
  const bool try_once = timeout_ns == kTryOnce;
  const int64_t deadline = try_once ? 0 : deadline_from(timeout_ns);
  // Non-blocking calls check claims' liveness at once: they get no second look.
  bool check_liveness = timeout_ns == 0;
  for (;; check_liveness = true) {
    st = acquire(&hdr_->cons_lock, timeout_ns, deadline);
    if (st != Status::kOk) return st;
    note_cpu(&hdr_->get_cpu);
    FrameHeader* f = nullptr;
    uint64_t pos = 0;
    bool blocked = false;
    st = advance_to_ready(&f, &pos, &blocked, check_liveness);
    if (st != Status::kOk) {
      pthread_mutex_unlock(&hdr_->cons_lock);
      return st;
    }
    if (f) {
      size_t len = f->len;
      *out_len = len;
      *out_kind = uint16_t(f->state.load(std::memory_order_relaxed) >> 16);
      if (len > cap || (int(*out_kind) == needs_writable && !buf_writable)) {
        pthread_mutex_unlock(&hdr_->cons_lock);
        return Status::kBufferTooSmall;
      }
      // Copy under the lock and publish head after: a consumer killed mid-copy
      // leaves the message for the next one (no loss).
      if (len) std::memcpy(buf, reinterpret_cast<uint8_t*>(f) + kFrameHeader, len);
      test_stop(kHookInConsLock);
      hdr_->msgs_out.store(hdr_->msgs_out.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
      hdr_->bytes_out.store(hdr_->bytes_out.load(std::memory_order_relaxed) + len, std::memory_order_relaxed);
      hdr_->head.store(pos + align_up(kFrameHeader + len, kAlign), std::memory_order_release);
      pthread_mutex_unlock(&hdr_->cons_lock);
      signal(&hdr_->space_seq, &hdr_->space_waiters);
      return Status::kOk;
    }
    pthread_mutex_unlock(&hdr_->cons_lock);
    // Padding or dead claims may have been skipped: producers may have room.
    if (hdr_->closed.load(std::memory_order_acquire) && !blocked) return Status::kClosed;
    if (timeout_ns == 0 || try_once) return Status::kTimeout;
    if (remaining(deadline) == 0) return Status::kTimeout;
    // Behind a live claim we re-check often: its producer may die without
    // ever waking us.
    wait_until(&hdr_->data_seq, &hdr_->data_waiters, &hdr_->put_cpu, deadline, blocked ? kSliceClaimNs : kSliceNs,
               [&] { return frame_ready_hint(); });
  }
}

// -------------------------------------------------------------------- misc

Status Ring::count(uint64_t* msgs, uint64_t* bytes) {
  *msgs = 0;
  *bytes = 0;
  Status st = check_magic();
  if (st != Status::kOk) return st;
  st = acquire(&hdr_->cons_lock, 5'000'000'000LL, now_ns() + 5'000'000'000LL);
  if (st != Status::kOk) return st;
  // Holding cons_lock pins head, so no producer can reuse [head, tail).
  uint64_t head = hdr_->head.load(std::memory_order_relaxed);
  uint64_t tail = hdr_->tail.load(std::memory_order_acquire);
  st = validate_positions(head, tail);
  uint64_t pos = head;
  while (st == Status::kOk && pos < tail) {
    FrameHeader* f = frame_at(pos);
    uint64_t off = pos % capacity_;
    uint32_t code = f->state.load(std::memory_order_acquire) & 0xFFFF;
    uint64_t step = align_up(kFrameHeader + f->len, kAlign);
    if (f->tag != tag_for(pos) || step > capacity_ - off || (code != kStatePadding && f->len > max_payload_)) {
      char b[120];
      std::snprintf(b, sizeof b, "frame at position %llu is damaged", (unsigned long long)pos);
      detail_ = b;
      st = Status::kCorrupt;
      break;
    }
    if (code == kStateCommitted) {
      *msgs += 1;
      *bytes += f->len;
    } else if (code != kStatePadding && code != kStateClaimed) {
      detail_ = "frame with unknown state";
      st = Status::kCorrupt;
      break;
    }
    pos += step;
  }
  pthread_mutex_unlock(&hdr_->cons_lock);
  return st;
}

void Ring::close_queue() {
  hdr_->closed.store(1, std::memory_order_seq_cst);
  hdr_->data_seq.fetch_add(1, std::memory_order_seq_cst);
  hdr_->space_seq.fetch_add(1, std::memory_order_seq_cst);
  futex_wake_all(&hdr_->data_seq);
  futex_wake_all(&hdr_->space_seq);
}

bool Ring::is_closed() const {
  return hdr_->closed.load(std::memory_order_acquire) != 0;
}

bool Ring::creator_alive() const {
  return process_alive(hdr_->creator_pid, hdr_->creator_start_time);
}

Status Ring::unblock(bool* skipped) {
  *skipped = false;
  Status st = check_magic();
  if (st != Status::kOk) return st;
  uint64_t before = hdr_->frames_dropped.load();
  st = acquire(&hdr_->cons_lock, 5'000'000'000LL, now_ns() + 5'000'000'000LL);
  if (st != Status::kOk) return st;
  FrameHeader* f;
  uint64_t pos;
  bool blocked;
  st = advance_to_ready(&f, &pos, &blocked, true);
  pthread_mutex_unlock(&hdr_->cons_lock);
  *skipped = hdr_->frames_dropped.load() != before;
  return st;
}

std::atomic<uint64_t>* Ring::word_at(uint64_t index) const {
  if (index >= word_count()) return nullptr;
  return reinterpret_cast<std::atomic<uint64_t>*>(data_ + index * sizeof(uint64_t));
}

Status Ring::word_cas(uint64_t index, uint64_t expected, uint64_t desired, uint64_t* seen) {
  std::atomic<uint64_t>* w = word_at(index);
  if (w == nullptr) return Status::kInvalidArg;
  // acq_rel: the winner sees everything the other side wrote before its
  // store (the caller's request, the replica's decision).
  w->compare_exchange_strong(expected, desired, std::memory_order_acq_rel, std::memory_order_acquire);
  *seen = expected;  // on success still the old value, which equals `expected`
  return Status::kOk;
}

Status Ring::word_load(uint64_t index, uint64_t* value) {
  std::atomic<uint64_t>* w = word_at(index);
  if (w == nullptr) return Status::kInvalidArg;
  *value = w->load(std::memory_order_acquire);
  return Status::kOk;
}

Status Ring::word_store(uint64_t index, uint64_t value) {
  std::atomic<uint64_t>* w = word_at(index);
  if (w == nullptr) return Status::kInvalidArg;
  w->store(value, std::memory_order_release);
  return Status::kOk;
}

Status Ring::word_add(uint64_t index, int64_t delta, uint64_t* after) {
  std::atomic<uint64_t>* w = word_at(index);
  if (w == nullptr) return Status::kInvalidArg;
  *after = w->fetch_add(uint64_t(delta), std::memory_order_acq_rel) + uint64_t(delta);
  return Status::kOk;
}

Status Ring::stats(Stats* o) const {
  o->capacity = capacity_;
  o->max_payload = max_payload_;
  o->head = hdr_->head.load();
  o->tail = hdr_->tail.load();
  o->msgs_in = hdr_->msgs_in.load();
  o->bytes_in = hdr_->bytes_in.load();
  o->msgs_out = hdr_->msgs_out.load();
  o->bytes_out = hdr_->bytes_out.load();
  o->frames_dropped = hdr_->frames_dropped.load();
  o->lock_recoveries = hdr_->lock_recoveries.load();
  o->creator_pid = hdr_->creator_pid;
  o->closed = hdr_->closed.load();
  o->created_unix_ns = hdr_->created_unix_ns;
  return Status::kOk;
}

void Ring::reset_stats() {
  hdr_->msgs_in.store(0);
  hdr_->bytes_in.store(0);
  hdr_->msgs_out.store(0);
  hdr_->bytes_out.store(0);
  hdr_->frames_dropped.store(0);
  hdr_->lock_recoveries.store(0);
}

}  // namespace sage
