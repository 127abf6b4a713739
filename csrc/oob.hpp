// The layout of an out-of-band payload, written and parsed here (and only
// here) so that neither the sender nor the receiver of a large array pays
// for it in Python. No Python here; the binding turns the outcomes into
// objects (shm.oob_frame, shm.hold_slot, shm.oob_buffers).
//
//   [ head: magic "SQ5B", buffer count (u32), pickle length (u64) ]
//   [ buffer lengths: u64 each; the top bit set: a location record ]
//   [ pickle ][ pad to 16 ][ buffer 0 ][ pad to 16 ][ buffer 1 ] ...
//
// A location record names an arena slot instead of carrying the buffer:
//   slot, generation, offset, length (u64 each), name length (u16), name.
// Every field is read with memcpy (the payload need not be aligned) and every
// length is checked against what is left before it is used.
#pragma once

#include <cstdint>
#include <cstring>
#include <vector>

namespace sage::oob {

constexpr char kMagic[4] = {'S', 'Q', '5', 'B'};
constexpr uint64_t kHeadSize = 4 + 4 + 8;
constexpr uint64_t kAlign = 16;
constexpr uint64_t kLenSize = 8;
constexpr uint64_t kLocated = 1ULL << 63;
constexpr uint64_t kRecordFixed = 4 * 8 + 2;  // slot, generation, offset, length; name length
constexpr uint64_t kMaxName = 0xFFFF;         // the name length is a u16

enum class Status : int {
  kOk = 0,
  kTruncatedHead = 1,    // shorter than the head
  kBadHead = 2,          // wrong magic, or more buffers than the payload could list
  kPickleOverruns = 3,   // the pickle runs past the end
  kBufferOverruns = 4,   // a buffer runs past the end
  kRecordTruncated = 5,  // a location record shorter than its fixed fields
  kRecordName = 6,       // a location record whose name length disagrees with its size
};

// Where something lies in the payload.
struct Span {
  uint64_t pos = 0, len = 0;
  bool located = false;  // a location record, not the buffer's bytes
};

struct Record {
  uint64_t slot = 0, gen = 0, offset = 0, length = 0;
  uint64_t name_pos = 0, name_len = 0;  // of the slab's name, in the record
};

// Bytes of padding that bring `pos` to the next buffer's alignment.
inline uint64_t pad(uint64_t pos) {
  return (kAlign - pos % kAlign) % kAlign;
}

inline void store_u64(uint8_t* p, uint64_t v) {
  std::memcpy(p, &v, sizeof v);
}

inline uint64_t load_u64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, sizeof v);
  return v;  // little-endian, as the writer's struct format says ("<"); so is every host we build for
}

// Splits the payload `p` of `n` bytes: the pickle into *pickle, each buffer
// into *bufs. On kBufferOverruns, *detail is that buffer's length; on
// kPickleOverruns, the pickle's.
inline Status parse(const uint8_t* p, uint64_t n, Span* pickle, std::vector<Span>* bufs, uint64_t* detail) {
  if (n < kHeadSize) return Status::kTruncatedHead;
  uint32_t count;
  std::memcpy(&count, p + 4, sizeof count);
  uint64_t plen = load_u64(p + 8);
  if (std::memcmp(p, kMagic, sizeof kMagic) != 0 || count > n / kLenSize) return Status::kBadHead;
  uint64_t pos = kHeadSize;
  if (uint64_t(count) * kLenSize > n - pos) return Status::kBadHead;
  const uint8_t* lens = p + pos;
  pos += uint64_t(count) * kLenSize;
  if (plen > n - pos) {
    *detail = plen;
    return Status::kPickleOverruns;
  }
  *pickle = Span{pos, plen, false};
  pos += plen;
  bufs->clear();
  bufs->reserve(count);
  for (uint32_t i = 0; i < count; ++i) {
    uint64_t ln = load_u64(lens + uint64_t(i) * kLenSize);
    bool located = (ln & kLocated) != 0;
    ln &= ~kLocated;
    pos += (kAlign - pos % kAlign) % kAlign;
    if (pos > n || ln > n - pos) {
      *detail = ln;
      return Status::kBufferOverruns;
    }
    bufs->push_back(Span{pos, ln, located});
    pos += ln;
  }
  return Status::kOk;
}

// Reads the location record `p` of `n` bytes into *r.
inline Status parse_record(const uint8_t* p, uint64_t n, Record* r) {
  if (n < kRecordFixed) return Status::kRecordTruncated;
  r->slot = load_u64(p);
  r->gen = load_u64(p + 8);
  r->offset = load_u64(p + 16);
  r->length = load_u64(p + 24);
  uint16_t nlen;
  std::memcpy(&nlen, p + 32, sizeof nlen);
  if (kRecordFixed + nlen != n) return Status::kRecordName;
  r->name_pos = kRecordFixed;
  r->name_len = nlen;
  return Status::kOk;
}

// ------------------------------------------------------------------ writing

// Writes the head (kHeadSize bytes) of a payload of `count` buffers whose
// pickle is `plen` bytes; the `count` buffer lengths follow it.
inline void write_head(uint8_t* p, uint32_t count, uint64_t plen) {
  std::memcpy(p, kMagic, sizeof kMagic);
  std::memcpy(p + 4, &count, sizeof count);
  store_u64(p + 8, plen);
}

// The size of a location record naming a slab by a name of `name_len` bytes.
inline uint64_t record_size(uint64_t name_len) {
  return kRecordFixed + name_len;
}

// Writes the location record `r` (its name_len bytes of `name`) at `p`,
// record_size(r.name_len) bytes; parse_record reads it back. The caller
// checked r.name_len <= kMaxName.
inline void write_record(uint8_t* p, const Record& r, const char* name) {
  store_u64(p, r.slot);
  store_u64(p + 8, r.gen);
  store_u64(p + 16, r.offset);
  store_u64(p + 24, r.length);
  uint16_t nlen = uint16_t(r.name_len);
  std::memcpy(p + 32, &nlen, sizeof nlen);
  std::memcpy(p + kRecordFixed, name, r.name_len);
}

}  // namespace sage::oob
