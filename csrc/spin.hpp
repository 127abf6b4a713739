// What a waiter in shared memory needs while it spins: the monotonic clock
// and the CPU's spin-wait hint. Shared by the ring (ring.cpp) and the arena's
// slots (slots.cpp). No Python here.
#pragma once

#include <cstdint>
#include <ctime>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define SAGE_CPU_RELAX() _mm_pause()
#elif defined(__aarch64__)
#define SAGE_CPU_RELAX() __asm__ __volatile__("yield")
#else
#define SAGE_CPU_RELAX() \
  do {                   \
  } while (0)
#endif

namespace sage {

// CLOCK_MONOTONIC in nanoseconds.
inline int64_t now_ns() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return int64_t(ts.tv_sec) * 1'000'000'000LL + ts.tv_nsec;
}

}  // namespace sage
