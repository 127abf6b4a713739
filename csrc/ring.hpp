// sage_ray_comm shared-memory ring buffer.
//
// A named POSIX shared-memory segment holding a multi-producer,
// multi-consumer ring of variable-length frames. No Python in here: every
// entry point returns a Status and the binding layer turns codes into
// exceptions.
//
// Layout of the segment:
//
//   [ Header (kHeaderSize bytes, page aligned) ][ data ring (capacity bytes) ]
//
// Positions (head, tail) are absolute byte counters that only grow; the
// offset into the data ring is `pos % capacity`. Every frame starts on a
// 16-byte boundary with a 16-byte FrameHeader, so a padding record always
// fits in the gap left at wrap-around.
//
// Protocol (claim, then commit):
//   producer: lock(prod) -> check space -> write header {CLAIMED, len, pid}
//             (and a PADDING record at wrap-around) -> publish tail -> unlock
//             -> copy payload with no lock held -> store state COMMITTED
//             (release) -> wake consumers if any sleep.
//   consumer: lock(cons) -> look at the frame at head:
//             PADDING   : skip it;
//             COMMITTED : copy it out, then publish head;
//             CLAIMED   : if its producer is dead, skip it and count it
//                         (Agrona's "unblock"); else wait.
//             -> unlock -> wake producers if any sleep.
//
// Both locks are robust process-shared mutexes: a process killed while it
// holds one hands the next locker EOWNERDEAD. The critical sections publish
// their pointer last, so a dead holder leaves nothing to repair: a producer
// that died before publishing tail claimed nothing, and a consumer that died
// before publishing head took nothing (the message stays for the next one).
//
// Waiting: spin briefly (pause, then sched_yield so a peer on the same CPU
// can run), then sleep on a futex word in the segment
// (data_seq for consumers, space_seq for producers). Sleeps are sliced so a
// consumer blocked behind a dead producer's claim notices within kSliceNs.
#pragma once

#include <pthread.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <string>

namespace sage {

enum class Status : int {
  kOk = 0,
  kTimeout = 1,         // nothing to get / no room to put before the deadline
  kClosed = 2,          // the queue was closed (and, for get, is drained)
  kTooLarge = 3,        // the message can never fit in this ring
  kBufferTooSmall = 4,  // get: caller's buffer too small, *out_len says how big
  kCorrupt = 5,         // the segment's header or a frame fails validation
  kNotFound = 6,        // open: no segment with that name
  kExists = 7,          // create-only: a segment with that name exists
  kBadMagic = 8,        // open: not a sage ring segment
  kBadVersion = 9,      // open: layout version differs
  kSysError = 10,       // a system call failed; see Ring::last_errno
  kInvalidArg = 11,     // bad name or capacity
};

const char* status_name(Status s);

constexpr uint64_t kMagic = 0x53414745524e4731ULL;  // "SAGERNG1"
constexpr uint32_t kVersion = 1;
constexpr uint64_t kHeaderSize = 4096;
constexpr uint64_t kAlign = 16;
constexpr uint64_t kFrameHeader = 16;
constexpr uint64_t kMinCapacity = 4096;
constexpr uint64_t kMaxCapacity = 1ULL << 40;
constexpr int kAttachSlots = 64;

// Frame states (low 16 bits of FrameHeader::state; the high 16 bits carry
// the user's frame kind).
constexpr uint32_t kStateClaimed = 0xC1A1;
constexpr uint32_t kStateCommitted = 0xC0DE;
constexpr uint32_t kStatePadding = 0xFADE;

struct FrameHeader {
  std::atomic<uint32_t> state;  // written last on commit (release)
  uint32_t len;                 // payload bytes after this header
  uint32_t pid;                 // claiming process, for liveness checks
  uint32_t tag;                 // derived from the frame's position
};
static_assert(sizeof(FrameHeader) == kFrameHeader, "frame header size");

struct AttachSlot {
  std::atomic<uint32_t> pid;
  uint32_t reserved;
  std::atomic<uint64_t> start_time;  // /proc/<pid>/stat starttime, guards pid reuse
};

struct alignas(64) Header {
  // Immutable after creation (checked on every open).
  uint64_t magic;
  uint32_t version;
  uint32_t header_size;
  uint64_t capacity;
  uint64_t max_payload;
  uint32_t creator_pid;
  uint32_t pad0;
  uint64_t creator_start_time;
  uint64_t created_unix_ns;

  alignas(64) std::atomic<uint64_t> tail;  // producers' side
  // Producers' last view of head (written under prod_lock). It is never
  // ahead of head, so space computed from it is never overstated; producers
  // re-read the consumers' line only when it says the ring is full.
  std::atomic<uint64_t> head_cache;
  // CPU (plus one; 0 = unknown) of the last producer and the last consumer.
  // A waiter whose peer last ran on its own CPU does not spin: spinning
  // there only delays the peer it is waiting for. (Added in free space of
  // their cache lines: segments from before read 0, "unknown".)
  std::atomic<uint32_t> put_cpu;
  alignas(64) std::atomic<uint64_t> head;  // consumers' side
  std::atomic<uint32_t> get_cpu;

  alignas(64) pthread_mutex_t prod_lock;
  alignas(64) pthread_mutex_t cons_lock;

  alignas(64) std::atomic<uint32_t> data_seq;  // futex: bumped on commit
  std::atomic<uint32_t> data_waiters;
  alignas(64) std::atomic<uint32_t> space_seq;  // futex: bumped on release
  std::atomic<uint32_t> space_waiters;

  alignas(64) std::atomic<uint32_t> closed;

  // Statistics. In/out on separate lines so producers and consumers do not
  // bounce one line between them.
  alignas(64) std::atomic<uint64_t> msgs_in;
  std::atomic<uint64_t> bytes_in;
  alignas(64) std::atomic<uint64_t> msgs_out;
  std::atomic<uint64_t> bytes_out;
  std::atomic<uint64_t> frames_dropped;   // claimed, never committed, skipped
  std::atomic<uint64_t> lock_recoveries;  // EOWNERDEAD seen on a lock

  alignas(64) AttachSlot attached[kAttachSlots];
  // Set (never cleared) when a process found every attach slot taken by a
  // live process: the table no longer lists every user, so gc must not judge
  // the segment by it. (Free header space: older segments read 0.)
  alignas(64) std::atomic<uint32_t> attach_overflow;
};
static_assert(sizeof(Header) <= kHeaderSize, "header must fit its page");

struct Stats {
  uint64_t capacity;
  uint64_t max_payload;
  uint64_t head;
  uint64_t tail;
  uint64_t msgs_in;
  uint64_t bytes_in;
  uint64_t msgs_out;
  uint64_t bytes_out;
  uint64_t frames_dropped;
  uint64_t lock_recoveries;
  uint32_t creator_pid;
  uint32_t closed;
  uint64_t created_unix_ns;
};

// Facts about a segment read without joining it (for gc).
struct Inspect {
  bool valid;         // magic and version match
  bool initializing;  // someone holds the init lock right now
  uint64_t file_size;
  uint32_t creator_pid;
  bool creator_alive;
  int live_attached;     // attach slots whose process is alive
  bool attach_overflow;  // more processes attached than the table holds
};

struct IoPart {
  const void* data;
  size_t len;
};

enum class OpenMode : int { kCreateOrOpen = 0, kOpenOnly = 1, kCreateOnly = 2 };

class Ring {
 public:
  // Opens or creates `shm_name` (must start with '/'). `capacity` is used only
  // when creating; it is rounded up to a multiple of 16.
  // On failure *detail (if given) says what was wrong.
  static Status open(const std::string& shm_name, uint64_t capacity, OpenMode mode, Ring** out, bool* created, int* err,
                     std::string* detail = nullptr);
  static Status unlink(const std::string& shm_name, int* err);
  static Status inspect(const std::string& shm_name, Inspect* out, int* err);

  ~Ring();
  Ring(const Ring&) = delete;
  Ring& operator=(const Ring&) = delete;

  // timeout_ns < 0: wait forever; 0: do not wait (but take a busy lock);
  // kTryOnce: one attempt with trylock, never sleeping (lets the binding try
  // small operations without releasing the GIL).
  static constexpr int64_t kTryOnce = INT64_MIN;
  Status put(const IoPart* parts, size_t nparts, uint16_t kind, int64_t timeout_ns);
  // Copies the next frame into buf. If it does not fit, or its kind equals
  // `needs_writable` and buf_writable is false, returns kBufferTooSmall with
  // *out_len and *out_kind set and leaves the frame in place.
  Status get(void* buf, size_t cap, size_t* out_len, uint16_t* out_kind, int64_t timeout_ns, int needs_writable = -1,
             bool buf_writable = true);

  // Number of committed messages and their payload bytes, counted in shared
  // memory (walks the frames under the consumer lock).
  Status count(uint64_t* msgs, uint64_t* bytes);
  // Bytes a put of `payload` bytes needs right now (0 if it fits).
  bool would_block_put(uint64_t payload);

  void close_queue();  // every waiter wakes; puts fail; gets drain then fail
  bool is_closed() const;
  // Whether the process that created the segment still runs (an arena slab's
  // creator is its only writer).
  bool creator_alive() const;
  // Skips a frame at head that was claimed by a dead producer. Returns true if
  // one was skipped. Consumers do this on their own; exposed for tools.
  Status unblock(bool* skipped);
  Status stats(Stats* out) const;
  void reset_stats();

  // The data region read as an array of 64-bit atomic words, for a segment
  // used as a claim table (sage_ray_comm/claims.py), never as a ring: such a
  // segment shares the ring's naming, magic, owner and gc. An index past
  // word_count() gives kInvalidArg. word_cas stores `desired` only if the
  // word equals `expected`; *seen gets what the word held before (so the
  // caller won exactly when *seen == expected).
  uint64_t word_count() const { return capacity_ / sizeof(uint64_t); }
  Status word_cas(uint64_t index, uint64_t expected, uint64_t desired, uint64_t* seen);
  Status word_load(uint64_t index, uint64_t* value);
  Status word_store(uint64_t index, uint64_t value);
  // Adds `delta` to a word; *after gets the new value.
  Status word_add(uint64_t index, int64_t delta, uint64_t* after);
  // The data region (an arena slab's slots live here, see arena.py).
  uint8_t* data() const { return data_; }

  uint64_t capacity() const { return capacity_; }
  uint64_t max_payload() const { return max_payload_; }
  const std::string& name() const { return name_; }
  const std::string& detail() const { return detail_; }  // why kCorrupt
  int last_errno() const { return last_errno_; }
  void set_spin_ns(int64_t ns) { spin_ns_ = ns; }

  // Fault injection for tests: stop forever at one point of put/get after
  // writing one byte to notify_fd, so a test can SIGKILL the process exactly
  // there. Never set outside tests.
  enum TestHook : int { kHookNone = 0, kHookAfterClaim = 1, kHookInProdLock = 2, kHookInConsLock = 3 };
  void set_test_hook(int hook, int notify_fd) {
    test_hook_ = hook;
    test_fd_ = notify_fd;
  }
  // Raw view of the mapping, for tests that corrupt a segment on purpose.
  uint8_t* base() const { return base_; }
  size_t map_size() const { return map_size_; }

 private:
  Ring() = default;
  Status check_magic();
  // Takes a robust lock: one trylock for kTryOnce, up to 50 ms for a
  // non-blocking call (timeout 0), else until `deadline` (kForever: no limit).
  Status acquire(pthread_mutex_t* m, int64_t timeout_ns, int64_t deadline);
  Status lock_result(pthread_mutex_t* m, int rc);  // EOWNERDEAD recovered here
  Status validate_positions(uint64_t head, uint64_t tail);
  // Under cons_lock: move head past padding (and, if check_liveness, past
  // claims of dead producers). Sets *frame to the committed frame at head, or
  // nullptr if none is ready. Liveness costs a read of /proc, so the first
  // look of a get skips it: a fresh claim is almost always a live copy.
  Status advance_to_ready(FrameHeader** frame, uint64_t* pos, bool* blocked_by_claim, bool check_liveness);
  FrameHeader* frame_at(uint64_t pos) const;
  std::atomic<uint64_t>* word_at(uint64_t index) const;  // nullptr when out of range
  uint32_t tag_for(uint64_t pos) const;
  bool frame_ready_hint();
  template <typename Ready>
  void wait_until(std::atomic<uint32_t>* seq, std::atomic<uint32_t>* waiters, const std::atomic<uint32_t>* peer_cpu,
                  int64_t deadline, int64_t slice_cap, Ready ready);
  void attach();
  void detach();

  std::string name_;
  std::string detail_;
  int fd_ = -1;
  uint8_t* base_ = nullptr;
  size_t map_size_ = 0;
  Header* hdr_ = nullptr;
  uint8_t* data_ = nullptr;
  uint64_t capacity_ = 0;     // local copy: never trust the shared one after open
  uint64_t max_payload_ = 0;  // local copy
  int attach_slot_ = -1;
  int64_t spin_ns_ = 20000;
  int last_errno_ = 0;
  int test_hook_ = kHookNone;
  int test_fd_ = -1;
  void test_stop(int hook);
};

// Helpers shared with the binding (and tests).
uint64_t process_start_time(uint32_t pid);              // 0 if no such process
bool process_alive(uint32_t pid, uint64_t start_time);  // start_time 0: pid only
uint32_t this_pid();  // getpid(), cached (a system call on current glibc), right in fork children too

}  // namespace sage
