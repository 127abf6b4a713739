#include "slots.hpp"

#include <sched.h>

#include <algorithm>
#include <cstring>
#include <ctime>

#include "copy.hpp"
#include "spin.hpp"

namespace sage {

namespace {
// A reader ahead of its writer spins this many times, then yields (the
// writer may be on this CPU), then sleeps kWaitSleepNs at a time once it has
// waited kWaitYieldNs: a writer is mid-copy, a few microseconds away, unless
// it was preempted.
constexpr int kWaitSpins = 512;
constexpr int64_t kWaitYieldNs = 100'000;
constexpr int64_t kWaitSleepNs = 20'000;

bool held_at(uint64_t w, uint64_t gen) {
  return (w >> kSlotGenShift) == gen && (w & kSlotRefsMask) != 0;
}

// One step of waiting for a writer; false once it has added nothing for
// stall_ns (`since`: when the wait began, 0 before the first step).
bool wait_step(int& spins, int64_t& since, int64_t stall_ns) {
  if (spins < kWaitSpins) {
    ++spins;
    SAGE_CPU_RELAX();
    return true;
  }
  int64_t now = now_ns();
  if (since == 0) since = now;
  int64_t waited = now - since;
  if (waited > stall_ns) return false;
  if (waited < kWaitYieldNs) {
    sched_yield();
  } else {
    timespec ts{0, kWaitSleepNs};
    nanosleep(&ts, nullptr);
  }
  return true;
}
}  // namespace

SlotStatus slot_take(Ring& r, uint64_t slots, uint64_t pid, uint64_t* slot, uint64_t* gen) {
  for (uint64_t i = 0; i < slots; ++i) {
    const uint64_t word = i * kSlotWords;
    uint64_t w = 0, seen = 0;
    if (r.word_load(word, &w) != Status::kOk) return SlotStatus::kOutOfRange;
    if (w & kSlotRefsMask) continue;
    const uint64_t next = (w >> kSlotGenShift) + 1;
    if (r.word_cas(word, w, next << kSlotGenShift | 1, &seen) != Status::kOk || seen != w) continue;
    // The new generation's list: its one holder, and nothing left from the
    // last one (a name whose share another process let go of would
    // otherwise let that pid's death free this generation); nothing unfilled.
    for (uint64_t e = word + 1; e < word + kSlotWords; ++e) r.word_store(e, e == word + 1 ? pid : 0);
    *slot = i;
    *gen = next;
    return SlotStatus::kOk;
  }
  return SlotStatus::kNoneFree;
}

SlotStatus slot_hold(Ring& r, uint64_t word, uint64_t gen, uint64_t pid) {
  uint64_t w = 0;
  if (r.word_load(word + kSlotWords - 1, &w) != Status::kOk) return SlotStatus::kOutOfRange;
  r.word_load(word, &w);
  for (;;) {
    if (!held_at(w, gen)) return SlotStatus::kMovedOn;
    uint64_t seen = 0;
    r.word_cas(word, w, w + 1, &seen);
    if (seen == w) break;
    w = seen;  // another holder moved it meanwhile: look again
  }
  if (pid == 0) return SlotStatus::kOk;
  for (uint64_t e = word + 1; e <= word + kSlotNames; ++e) {
    uint64_t p = 0, seen = 0;
    r.word_load(e, &p);
    if (p == 0 && r.word_cas(e, 0, pid, &seen) == Status::kOk && seen == 0) break;
  }
  return SlotStatus::kOk;
}

SlotStatus slot_check(Ring& r, uint64_t word, uint64_t gen) {
  uint64_t w = 0;
  if (r.word_load(word + kSlotWords - 1, &w) != Status::kOk) return SlotStatus::kOutOfRange;
  r.word_load(word, &w);
  return held_at(w, gen) ? SlotStatus::kOk : SlotStatus::kMovedOn;
}

SlotStatus slot_release(Ring& r, uint64_t word, uint64_t gen, uint64_t pid) {
  uint64_t w = 0;
  if (r.word_load(word + kSlotWords - 1, &w) != Status::kOk) return SlotStatus::kOutOfRange;
  for (uint64_t e = word + 1; pid != 0 && e <= word + kSlotNames; ++e) {
    uint64_t p = 0, seen = 0;
    r.word_load(e, &p);
    if (p == pid && r.word_cas(e, pid, 0, &seen) == Status::kOk && seen == pid) break;
  }
  r.word_load(word, &w);
  for (;;) {
    if (!held_at(w, gen)) return SlotStatus::kMovedOn;
    uint64_t seen = 0;
    r.word_cas(word, w, w - 1, &seen);
    if (seen == w) return SlotStatus::kOk;
    w = seen;
  }
}

void slot_fill(Ring& r, uint64_t word, uint8_t* dst, const uint8_t* src, uint64_t len) {
  uint64_t done = 0;
  const uint64_t chunk = len >= kStreamMinBytes ? kStreamFillChunk : kFillChunk;
  while (done < len) {
    uint64_t n = std::min(chunk, len - done);
    copy_for_reader(dst + done, src + done, n, len);  // fenced: the store below orders after it
    done += n;
    r.word_store(word + kSlotUnfilled, len - done);  // release: the bytes before it are there
  }
}

SlotStatus slot_copy_out(Ring& r, uint64_t word, uint8_t* dst, const uint8_t* src, uint64_t len, uint64_t* done,
                         int64_t stall_ns) {
  int spins = 0;
  int64_t since = 0;
  while (*done < len) {
    uint64_t unfilled = 0;
    if (r.word_load(word + kSlotUnfilled, &unfilled) != Status::kOk) return SlotStatus::kOutOfRange;
    uint64_t there = unfilled >= len ? 0 : len - unfilled;
    if (there > *done) {
      std::memcpy(dst + *done, src + *done, there - *done);
      *done = there;
      spins = 0;
      since = 0;
    } else if (!wait_step(spins, since, stall_ns)) {
      return SlotStatus::kStalled;
    }
  }
  return SlotStatus::kOk;
}

SlotStatus slot_wait_filled(Ring& r, uint64_t word, int64_t stall_ns) {
  int spins = 0;
  int64_t since = 0;
  uint64_t last = UINT64_MAX;
  for (;;) {
    uint64_t unfilled = 0;
    if (r.word_load(word + kSlotUnfilled, &unfilled) != Status::kOk) return SlotStatus::kOutOfRange;
    if (unfilled == 0) return SlotStatus::kOk;
    if (unfilled != last) {  // progress: the stall clock starts again
      last = unfilled;
      spins = 0;
      since = 0;
    } else if (!wait_step(spins, since, stall_ns)) {
      return SlotStatus::kStalled;
    }
  }
}

}  // namespace sage
