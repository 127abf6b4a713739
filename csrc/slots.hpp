// Arena slots (sage_ray_comm/arena.py): the words that say who holds a slot
// of a slab. No Python here; the binding converts the outcomes.
//
// Each slot has kSlotWords words, one cache line, at word index
// slot * kSlotWords of its slab's word table: the first holds the slot's
// generation (high 32 bits) and how many holders it has (low 32); the next
// kSlotNames name holders by pid (0: no one), so that a dead holder's share
// can be taken back; the last (kSlotUnfilled) counts the bytes of the slot's
// buffer its writer has still to copy in (0: all there). Only an operation
// that still sees the generation it expects changes a slot, so a stale view
// or a slot freed twice changes nothing.
//
// Filling after sending: a writer may send the message that names a slot
// first and copy the buffer in after (slot_fill), so that its reader copies
// the bytes out while they are still coming in, instead of after. It sets
// the slot's unfilled count to the buffer's length before the message goes
// out; slot_fill counts it down, chunk by chunk, with release stores; a
// reader copies what is there (slot_copy_out) or waits for all of it
// (slot_wait_filled).
#pragma once

#include <cstdint>

#include "ring.hpp"

namespace sage {

constexpr uint64_t kSlotWords = 8;
constexpr uint64_t kSlotNames = kSlotWords - 2;     // words 1..kSlotNames: holders' pids
constexpr uint64_t kSlotUnfilled = kSlotWords - 1;  // the word of the bytes still to come
constexpr uint64_t kSlotRefsMask = 0xFFFFFFFFULL;
constexpr int kSlotGenShift = 32;
// slot_fill says how far it got after every chunk of this many bytes: small
// enough that a reader starts soon after the writer, large enough that the
// stores cost nothing next to the copy (64 KiB: about 1.3 us of memcpy here).
constexpr uint64_t kFillChunk = 64 * 1024;

enum class SlotStatus : int {
  kOk = 0,
  kNoneFree = 1,    // slot_take: every slot is held
  kMovedOn = 2,     // the slot is no longer at the expected generation, or nobody holds it
  kOutOfRange = 3,  // the words are past the segment's word table
  kStalled = 4,     // slot_copy_out, slot_wait_filled: its writer added nothing for the time given
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

// Copies `len` bytes from `src` to `dst` (the slot's buffer) in chunks of
// kFillChunk, counting the slot's unfilled word down after each (the writer
// set it to `len` before sending the message that names the slot).
void slot_fill(Ring& r, uint64_t word, uint8_t* dst, const uint8_t* src, uint64_t len);

// Copies the slot's `len`-byte buffer at `src` to `dst` as its writer fills
// it, from *done on (updated as it goes): kOk once all of it is copied,
// kStalled when the writer added nothing for `stall_ns` (the caller decides
// whether to wait on: is the writer alive?), kOutOfRange for bad words.
SlotStatus slot_copy_out(Ring& r, uint64_t word, uint8_t* dst, const uint8_t* src, uint64_t len, uint64_t* done,
                         int64_t stall_ns);

// Waits until the slot's buffer is all there: kOk, or kStalled as above.
SlotStatus slot_wait_filled(Ring& r, uint64_t word, int64_t stall_ns);

}  // namespace sage
