// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011): a counter-based RNG.
// random = philox(counter, key) is a pure function, so any thread can draw the random numbers of any element
// without state, the GPU, the emulator and NumPy (src/convnet/reference/elementwise.py) produce identical bits,
// and dropout's backward pass regenerates the forward mask instead of storing it.
#pragma once

#if defined(CONVNET_PHILOX_HOST_ONLY)  // plain C++ (the cpu device's loops, csrc/cpu/): no CUDA, no emulator
#define __host__
#define __device__
#define __forceinline__ inline __attribute__((always_inline))
#else
#include "cuda_compat.h"
#endif

namespace convnet {

struct Philox4 {
  unsigned x, y, z, w;
};

__host__ __device__ __forceinline__ unsigned philox_mulhi(unsigned a, unsigned b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<unsigned>((static_cast<unsigned long long>(a) * b) >> 32);
#endif
}

// counter (c0..c3), key (k0, k1) -> four independent 32-bit uniform integers.
__host__ __device__ __forceinline__ Philox4 philox4x32_10(unsigned c0, unsigned c1, unsigned c2, unsigned c3,
                                                          unsigned k0, unsigned k1) {
  constexpr unsigned M0 = 0xD2511F53u, M1 = 0xCD9E8D57u;  // multipliers
  constexpr unsigned W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;  // Weyl key increments
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const unsigned hi0 = philox_mulhi(M0, c0), lo0 = M0 * c0;
    const unsigned hi1 = philox_mulhi(M1, c2), lo1 = M1 * c2;
    const unsigned n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += W0;
    k1 += W1;
  }
  return {c0, c1, c2, c3};
}

}  // namespace convnet
