// Arena slots (sage_ray_comm/arena.py): the words that say who holds a slot
// of a slab. No Python here; the binding converts the outcomes.
//
// Each slot has kSlotWords words, one cache line, at word index
// slot * kSlotWords of its slab's word table: the first holds the slot's
// generation (high 32 bits) and how many holders it has (low 32); the others
// name holders by pid (0: no one), so that a dead holder's share can be taken
// back. Only an operation that still sees the generation it expects changes
// a slot, so a stale view or a slot freed twice changes nothing.
#pragma once

#include <cstdint>

#include "ring.hpp"

namespace sage {

constexpr uint64_t kSlotWords = 8;
constexpr uint64_t kSlotRefsMask = 0xFFFFFFFFULL;
constexpr int kSlotGenShift = 32;

enum class SlotStatus : int {
  kOk = 0,
  kNoneFree = 1,    // slot_take: every slot is held
  kMovedOn = 2,     // the slot is no longer at the expected generation, or nobody holds it
  kOutOfRange = 3,  // the words are past the segment's word table
};

// First fit: the lowest free slot of the first `slots` becomes its next
// generation with one holder, `pid` (0: untracked), and a clean list of
// holder names. Sets *slot and *gen.
SlotStatus slot_take(Ring& r, uint64_t slots, uint64_t pid, uint64_t* slot, uint64_t* gen);

// One more holder, `pid`, of the slot whose first word is `word`, if it is
// still at `gen` and held. The pid goes into the first free name (none free,
// or pid 0: the share stays untracked).
SlotStatus slot_hold(Ring& r, uint64_t word, uint64_t gen, uint64_t pid);

// Whether the slot at `word` is at `gen` and held (what a reader checks
// before it makes a view of it).
SlotStatus slot_check(Ring& r, uint64_t word, uint64_t gen);

// One holder fewer: `pid`'s name off the list first (pid 0: a share no name
// stands for, or one whose name the caller already took), then the count
// down, if the slot is still at `gen` and held. A process killed in between leaves
// one holder nobody can take back (the slot goes with its slab), never a
// count taken down twice.
SlotStatus slot_release(Ring& r, uint64_t word, uint64_t gen, uint64_t pid);

}  // namespace sage
