#include "slots.hpp"

namespace sage {

namespace {
bool held_at(uint64_t w, uint64_t gen) {
  return (w >> kSlotGenShift) == gen && (w & kSlotRefsMask) != 0;
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
    // otherwise let that pid's death free this generation).
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
  for (uint64_t e = word + 1; e < word + kSlotWords; ++e) {
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
  for (uint64_t e = word + 1; pid != 0 && e < word + kSlotWords; ++e) {
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

}  // namespace sage
