// Copies into shared memory that another process will read: very large
// ones bypass this core's caches. No Python here.
//
// slot_fill copies a buffer in chunks (slots.hpp), so each memcpy is small
// enough that glibc uses ordinary stores, which first read every destination
// line (a read for ownership). One memcpy of the whole buffer would stream
// past the caches above glibc's own threshold; chunked, the copy lost that:
// 64 MiB took 10.2-10.7 ms against numpy's 6.0 ms into the same slot.
// Streaming (non-temporal) stores, measured with a writer and a reader on the
// 2-core VM (one 64 KiB chunk published at a time), until the reader is done:
//   size     reader only waits (an echo)           reader copies out as it fills
//   1 MiB    67.5 -> 65.1 us                       96.8 -> 132.8 us (worse)
//   8 MiB    615 -> 527 us                         1,065 -> 1,036 us
//   16 MiB   2,312 -> 1,749 us                     2,535 -> 2,624 us
//   64 MiB   10,555 -> 7,759 us                    10,868 -> 11,248 us
// Below kStreamMinBytes the reader finds the lines in this core's cache and
// ordinary stores win; above it the buffer is far larger than the caches.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__x86_64__) || defined(__SSE2__)
#include <emmintrin.h>
#define SAGE_HAVE_STREAM_STORES 1
#else
#define SAGE_HAVE_STREAM_STORES 0
#endif

namespace sage {

// A buffer at least this large is copied in past the caches (see above).
constexpr uint64_t kStreamMinBytes = 8 * 1024 * 1024;
// A streamed buffer is filled (and its progress published) in chunks of this
// many bytes: each chunk ends with a fence that waits for its stores to drain,
// so fewer, larger chunks; a reader chasing the fill lags by at most one, some
// 0.1 ms of a copy that takes 0.5 ms or more. (In one process, 64 MiB: SSE2
// streaming in 1 MiB chunks 8.7 ms, glibc's memcpy of the whole 8.6 ms,
// glibc in 64 KiB chunks 11.7 ms; 16 MiB: 1.9, 3.0 and 2.7 ms.)
constexpr uint64_t kStreamFillChunk = 1024 * 1024;
// The stores below move this many bytes per step (four 16-byte stores).
constexpr uint64_t kStreamStep = 64;
constexpr uintptr_t kStreamAlign = 16;

// Copies `n` bytes with stores that bypass the caches, then fences them, so
// that a release store made after this call orders after every byte (x86
// orders streaming stores only by a fence: the release alone would not).
inline void stream_copy(uint8_t* dst, const uint8_t* src, uint64_t n) {
#if SAGE_HAVE_STREAM_STORES
  uint64_t head = (kStreamAlign - (reinterpret_cast<uintptr_t>(dst) & (kStreamAlign - 1))) & (kStreamAlign - 1);
  if (head > n) head = n;
  if (head) std::memcpy(dst, src, head);
  uint64_t i = head;
  for (; i + kStreamStep <= n; i += kStreamStep) {
    const auto* s = reinterpret_cast<const __m128i*>(src + i);
    auto* d = reinterpret_cast<__m128i*>(dst + i);
    __m128i a = _mm_loadu_si128(s), b = _mm_loadu_si128(s + 1), c = _mm_loadu_si128(s + 2), e = _mm_loadu_si128(s + 3);
    _mm_stream_si128(d, a);
    _mm_stream_si128(d + 1, b);
    _mm_stream_si128(d + 2, c);
    _mm_stream_si128(d + 3, e);
  }
  if (i < n) std::memcpy(dst + i, src + i, n - i);
  _mm_sfence();
#else
  std::memcpy(dst, src, n);
#endif
}

// The copy for a writer into shared memory: streaming when `whole` (the size
// of the buffer this piece belongs to) is at least kStreamMinBytes.
inline void copy_for_reader(uint8_t* dst, const uint8_t* src, uint64_t n, uint64_t whole) {
  if (whole >= kStreamMinBytes)
    stream_copy(dst, src, n);
  else
    std::memcpy(dst, src, n);
}

}  // namespace sage
