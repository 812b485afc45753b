// The vector helpers every kernel family shares (elementwise.cu, conv.cu, pool.cu, lrn.cu).
//
// Host side, choosing a launch:
//   aligned16(p)                     may p be read or written as float4? (the 16-byte path of every family)
//   grid_for(items, threads, cap)    blocks for a grid-stride loop over `items` threads, clamped to [1, cap]
// Device side, the memory-bound CHWN kernels (pool.cu, lrn.cu): a thread owns VEC consecutive images of one
// (channel, pixel), VEC = 4 (one 16-byte load/store per access, when N % 4 == 0 and every pointer is 16-byte
// aligned) or 1:
//   VecF<VEC>, vload<VEC>(p), vstore<VEC>(p, v), vfill<VEC>(a)
// p may point to float or to bf16 storage (cuda_compat.h): a VecF always holds floats; a bf16 vload converts
// exactly, a bf16 vstore rounds once (nearest even). A 4-wide bf16 access is one 8-byte load/store, so its pointers
// need 8-byte alignment: aligned_vec4(p) says whether p may be accessed 4 elements at a time.
#pragma once
#include "cuda_compat.h"

#include <cstdint>

namespace convnet {

// ---- host: launch choices ------------------------------------------------------------------------------------
inline bool aligned16(const void* p) { return (reinterpret_cast<std::uintptr_t>(p) & 15u) == 0; }

template <typename T>
inline bool aligned_vec4(const T* p) { return (reinterpret_cast<std::uintptr_t>(p) & (4 * sizeof(T) - 1)) == 0; }

inline unsigned grid_for(std::int64_t items, int threads, std::int64_t cap) {
  std::int64_t b = (items + threads - 1) / threads;
  if (b < 1) b = 1;
  if (b > cap) b = cap;
  return static_cast<unsigned>(b);
}

// ---- device: VEC consecutive images ----------------------------------------------------------------------------
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

// bf16 storage: 4 elements are one 8-byte access (aligned_vec4), element 0 in the low half of the first word
// (little-endian), widened exactly by a shift and rounded in pairs by cvt.rn.bf16x2.f32 (bf16x2_bits).
template <int VEC>
__device__ __forceinline__ VecF<VEC> vload(const bf16* __restrict__ p) {
  VecF<VEC> r;
  if constexpr (VEC == 4) {
    const uint2 t = *reinterpret_cast<const uint2*>(p);
    r.v[0] = __uint_as_float(t.x << 16), r.v[1] = __uint_as_float(t.x & 0xFFFF0000u);
    r.v[2] = __uint_as_float(t.y << 16), r.v[3] = __uint_as_float(t.y & 0xFFFF0000u);
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) r.v[i] = to_float(p[i]);
  }
  return r;
}

template <int VEC>
__device__ __forceinline__ void vstore(bf16* __restrict__ p, const VecF<VEC>& r) {
  if constexpr (VEC == 4) {
    *reinterpret_cast<uint2*>(p) = make_uint2(bf16x2_bits(r.v[0], r.v[1]), bf16x2_bits(r.v[2], r.v[3]));
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) p[i] = from_float<bf16>(r.v[i]);
  }
}

}  // namespace convnet
