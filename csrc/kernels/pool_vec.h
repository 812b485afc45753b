// Small helpers shared by the memory-bound CHWN kernels (pool.cu, lrn.cu): a thread owns VEC consecutive images
// (VEC = 4 -> one 16-byte load/store per access when N % 4 == 0 and every pointer is 16-byte aligned, else 1).
#pragma once
#include "cuda_compat.h"

#ifndef __forceinline__
#define __forceinline__ inline
#endif

namespace convnet {
namespace memb {

template <int VEC>
struct VecF {
  float v[VEC];
};

template <int VEC>
__device__ __forceinline__ VecF<VEC> vload(const float* __restrict__ p) {
  VecF<VEC> r;
  if constexpr (VEC == 4) {
    const float4 t = *reinterpret_cast<const float4*>(p);
    r.v[0] = t.x; r.v[1] = t.y; r.v[2] = t.z; r.v[3] = t.w;
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) r.v[i] = p[i];
  }
  return r;
}

template <int VEC>
__device__ __forceinline__ void vstore(float* __restrict__ p, const VecF<VEC>& r) {
  if constexpr (VEC == 4) {
    *reinterpret_cast<float4*>(p) = make_float4(r.v[0], r.v[1], r.v[2], r.v[3]);
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) p[i] = r.v[i];
  }
}

template <int VEC>
__device__ __forceinline__ VecF<VEC> vfill(float a) {
  VecF<VEC> r;
#pragma unroll
  for (int i = 0; i < VEC; ++i) r.v[i] = a;
  return r;
}

// 16-byte path usable? (host side)
inline bool aligned16(const void* p) { return (reinterpret_cast<unsigned long long>(p) & 15ull) == 0; }

// Blocks for a grid-stride loop over `items` threads of `threads` each, capped (the loop covers the rest).
inline unsigned grid_for(long long items, int threads, long long cap = 1ll << 20) {
  long long b = (items + threads - 1) / threads;
  if (b < 1) b = 1;
  if (b > cap) b = cap;
  return static_cast<unsigned>(b);
}

}  // namespace memb
}  // namespace convnet
