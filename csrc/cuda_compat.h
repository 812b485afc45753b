// cuda_compat.h — the one header every kernel source (.cu) includes first.
//
// The same .cu file is compiled twice:
//   * by nvcc into convnet._cuda (real GPU; this header then includes <cuda_runtime.h>), and
//   * by g++ into convnet._emu, against the CPU emulation of the CUDA execution model in emu/cuemu.h.
// Kernel code is ordinary CUDA C++ with two spellings changed, because g++ cannot parse them:
//   SHARED(float, tile, [32][33]);   instead of  __shared__ float tile[32][33];
//   DYNAMIC_SHARED(float, smem);     instead of  extern __shared__ float smem[];
// and host code launches with convnet::launch(kernel, grid, block, dyn_shmem_bytes, stream, args...)
// instead of kernel<<<grid, block, dyn_shmem_bytes, stream>>>(args...).
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>

#if defined(__CUDACC__)
#include <cuda_runtime.h>
#define CONVNET_EMU 0
#define SHARED(T, name, dims) __shared__ T name dims
#define DYNAMIC_SHARED(T, name)                                   \
  extern __shared__ __align__(16) unsigned char convnet_dyn_smem_[]; \
  T* name = reinterpret_cast<T*>(convnet_dyn_smem_)
#else
#ifndef CONVNET_EMU
#define CONVNET_EMU 1
#endif
#if CONVNET_EMU
#include "emu/cuemu.h"
#else
// Host-only translation units of the CUDA build (the bindings) only need the runtime API types.
#include <cuda_runtime.h>
#endif
#endif

namespace convnet {

// A CUDA runtime call failed (or, on the emulator, its stand-in). Python sees convnet.CudaError.
struct CudaError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

inline void cuda_check(cudaError_t err, const char* what, const char* file, int line) {
  if (err != cudaSuccess)
    throw CudaError(std::string(what) + " failed: " + cudaGetErrorString(err) + " (" + file + ":" +
                    std::to_string(line) + ")");
}

#define CUDA_CHECK(expr) ::convnet::cuda_check((expr), #expr, __FILE__, __LINE__)

// Launcher argument validation: a request the kernels cannot serve is a ValueError in Python.
#define CONVNET_REQUIRE(cond, msg)                                                     \
  do {                                                                                 \
    if (!(cond)) throw std::invalid_argument(std::string(__func__) + ": " + (msg));   \
  } while (0)

#if defined(__CUDACC__) || !CONVNET_EMU
namespace detail {
template <class... P, class Tuple, std::size_t... I>
void launch_tuple(void (*kernel)(P...), dim3 grid, dim3 block, std::size_t shmem, cudaStream_t stream, Tuple& params,
                  std::index_sequence<I...>) {
  void* arg_ptrs[] = {static_cast<void*>(&std::get<I>(params))..., nullptr};
  CUDA_CHECK(cudaLaunchKernel(reinterpret_cast<const void*>(kernel), grid, block, arg_ptrs, shmem, stream));
}
}  // namespace detail

// Launches kernel on the GPU; arguments are converted to the kernel's parameter types first (as <<<>>> does).
template <class... P, class... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, std::size_t dyn_shmem, cudaStream_t stream, A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "convnet::launch: wrong number of kernel arguments");
  std::tuple<P...> params(std::forward<A>(args)...);
  detail::launch_tuple(kernel, grid, block, dyn_shmem, stream, params, std::index_sequence_for<P...>{});
}
#else
template <class... P, class... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, std::size_t dyn_shmem, cudaStream_t stream, A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "convnet::launch: wrong number of kernel arguments");
  cuemu::launch(kernel, grid, block, dyn_shmem, stream, std::forward<A>(args)...);
}
#endif

// Kernels that need more than 48 KB of dynamic shared memory must say so once before launching.
template <class... P>
void set_max_dynamic_shared(void (*kernel)(P...), std::size_t bytes) {
  CUDA_CHECK(cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  static_cast<int>(bytes)));
}

inline unsigned ceil_div(std::int64_t a, std::int64_t b) { return static_cast<unsigned>((a + b - 1) / b); }

#if defined(__CUDACC__) || CONVNET_EMU
// ---- Tensor cores and asynchronous copies (sm_80 and newer) ----------------------------------------------------
// One spelling for both builds: inline PTX under nvcc, the emulator's warp-collective versions (emu/cuemu.h) under
// g++. Rules these instructions impose on the kernels that use them:
// - mma and ldmatrix are executed by all 32 lanes of a warp together (.sync.aligned): never under a condition that
//   differs between lanes, never in a partial warp.
// - Fragment ownership (which lane holds which element of A, B, C, D) is the PTX ISA's table for the shape and type;
//   kernels take it from kernels/mma_fragments.cuh, never from memory.
// - A .tf32 operand must be rounded with tf32_bits (the tensor core ignores its low 13 bits: raw FP32 truncates).
// - ldmatrix row addresses are 16-byte aligned shared memory. It moves 16-bit elements: on 32-bit (TF32) data it
//   loads A and B fragments without .trans, never transposed.
// - cp.async: source and destination aligned to the copy size; the data may be read only after
//   cp_async_wait<N>() has completed its group in the thread that issued it and a __syncthreads() has followed
//   before any other thread reads it; and no thread may overwrite (issue a copy into) a stage buffer before a
//   __syncthreads() that follows every thread's last read of it. Commit the same number of groups in every thread
//   (an empty group is fine), or the wait counts stop matching the stages.
#if defined(__CUDACC__)
// The emulator's versions name the kernel's line in their errors: the wrappers take the caller's location.
#define CONVNET_SITE_PARAM
#define CONVNET_SITE_PARAM_FIRST
#else
#define CONVNET_SITE_PARAM , CUEMU_SITE_PARAM
#define CONVNET_SITE_PARAM_FIRST CUEMU_SITE_PARAM
#endif

// cvt.rna.tf32.f32: x rounded to TF32 (nearest, ties away from zero), as the .b32 operand of a .tf32 mma.
__device__ __forceinline__ std::uint32_t tf32_bits(float x) {
#if defined(__CUDACC__)
  std::uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
  return r;
#else
  return cuemu::cvt_rna_tf32(x);
#endif
}

// cvt.rn.bf16.f32: x rounded to bfloat16 (nearest even), its 16 bits.
__device__ __forceinline__ std::uint16_t bf16_bits(float x) {
#if defined(__CUDACC__)
  std::uint16_t r;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(x));
  return r;
#else
  return cuemu::cvt_rn_bf16(x);
#endif
}

// cvt.rn.bf16x2.f32: two values rounded to bfloat16, `lo` in the low half (the lower-numbered fragment element).
__device__ __forceinline__ std::uint32_t bf16x2_bits(float lo, float hi) {
#if defined(__CUDACC__)
  std::uint32_t r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
#else
  return std::uint32_t(cuemu::cvt_rn_bf16(lo)) | std::uint32_t(cuemu::cvt_rn_bf16(hi)) << 16;
#endif
}

__device__ __forceinline__ float bf16_to_float(std::uint16_t bits) { return __uint_as_float(std::uint32_t(bits) << 16); }

// mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32: d = a b + c for a 16x8 A, 8x8 B (d may be c).
__device__ __forceinline__ void mma_tf32_m16n8k8(float (&d)[4], const std::uint32_t (&a)[4],
                                                 const std::uint32_t (&b)[2], const float (&c)[4] CONVNET_SITE_PARAM) {
#if defined(__CUDACC__)
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%11,%12,%13};"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
        "f"(c[3]));
#else
  cuemu::mma_m16n8k8_tf32(d, a, b, c, cuemu_site_);
#endif
}

// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32: d = a b + c for a 16x16 A, 16x8 B, two bfloat16 a register.
__device__ __forceinline__ void mma_bf16_m16n8k16(float (&d)[4], const std::uint32_t (&a)[4],
                                                  const std::uint32_t (&b)[2], const float (&c)[4] CONVNET_SITE_PARAM) {
#if defined(__CUDACC__)
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%11,%12,%13};"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
        "f"(c[3]));
#else
  cuemu::mma_m16n8k16_bf16(d, a, b, c, cuemu_site_);
#endif
}

// ldmatrix.sync.aligned.m8n8.x{kCount}{.trans}.shared.b16: lane l passes the address of row l % 8 of matrix l / 8
// (16-byte aligned shared memory; lanes >= 8 kCount pass any address); r[i] receives this lane's fragment of matrix i.
template <int kCount, bool kTrans = false>
__device__ __forceinline__ void ldmatrix(std::uint32_t (&r)[kCount], const void* row CONVNET_SITE_PARAM) {
  static_assert(kCount == 1 || kCount == 2 || kCount == 4, "ldmatrix loads 1, 2 or 4 matrices");
#if defined(__CUDACC__)
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(row));
  if constexpr (kCount == 1 && !kTrans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];" : "=r"(r[0]) : "r"(a) : "memory");
  else if constexpr (kCount == 1)
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];" : "=r"(r[0]) : "r"(a) : "memory");
  else if constexpr (kCount == 2 && !kTrans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];"
                 : "=r"(r[0]), "=r"(r[1]) : "r"(a) : "memory");
  else if constexpr (kCount == 2)
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];"
                 : "=r"(r[0]), "=r"(r[1]) : "r"(a) : "memory");
  else if constexpr (!kTrans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a) : "memory");
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a) : "memory");
#else
  cuemu::ldmatrix_m8n8(r, kCount, kTrans, row, cuemu_site_);
#endif
}

// cp.async.ca.shared.global [smem], [gmem], kBytes, src_bytes: kBytes = 4, 8 or 16; bytes from src_bytes on are
// zero-filled (src_bytes = 0: no read, all zeros; the way to pad out of bounds).
template <int kBytes>
__device__ __forceinline__ void cp_async_ca(void* smem, const void* gmem, int src_bytes = kBytes CONVNET_SITE_PARAM) {
  static_assert(kBytes == 4 || kBytes == 8 || kBytes == 16, "cp.async copies 4, 8 or 16 bytes");
#if defined(__CUDACC__)
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;" ::"r"(a), "l"(gmem), "n"(kBytes), "r"(src_bytes)
               : "memory");
#else
  cuemu::cp_async(smem, gmem, kBytes, src_bytes, false, CUEMU_SITE);
#endif
}

// cp.async.cg.shared.global [smem], [gmem], 16, src_bytes: 16 bytes through L2 only (data read once per block).
__device__ __forceinline__ void cp_async_cg(void* smem, const void* gmem, int src_bytes = 16 CONVNET_SITE_PARAM) {
#if defined(__CUDACC__)
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(a), "l"(gmem), "r"(src_bytes) : "memory");
#else
  cuemu::cp_async(smem, gmem, 16, src_bytes, true, CUEMU_SITE);
#endif
}

// cp.async.commit_group: this thread's copies issued since the last commit become one group.
__device__ __forceinline__ void cp_async_commit(CONVNET_SITE_PARAM_FIRST) {
#if defined(__CUDACC__)
  asm volatile("cp.async.commit_group;" ::: "memory");
#else
  cuemu::cp_async_commit_group(CUEMU_SITE);
#endif
}

// cp.async.wait_group kPending: waits until at most the kPending newest groups of this thread are in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait(CONVNET_SITE_PARAM_FIRST) {
  static_assert(kPending >= 0, "cp.async.wait_group takes N >= 0");
#if defined(__CUDACC__)
  asm volatile("cp.async.wait_group %0;" ::"n"(kPending) : "memory");
#else
  cuemu::cp_async_wait_group(kPending, CUEMU_SITE);
#endif
}
#endif  // defined(__CUDACC__) || CONVNET_EMU

}  // namespace convnet

// ---- bfloat16 storage ------------------------------------------------------------------------------------------
// Kernels with a bfloat16 storage variant are one template over the storage type T (float or bf16): they load with
// to_float(T), compute in float and store with from_float<T>(float), which rounds to nearest even (a NaN stays a
// NaN), as ml_dtypes.bfloat16 does on the host. nvcc: CUDA's __nv_bfloat16 (cvt.rn.bf16.f32); host compilers (the
// emulator, and the CUDA build's bindings, which only pass pointers): a 16-bit struct holding the same bits.
#if defined(__CUDACC__) || !CONVNET_EMU
#include <cuda_bf16.h>
#endif

namespace convnet {

#if defined(__CUDACC__) || !CONVNET_EMU
using bf16 = __nv_bfloat16;
#else
struct bf16 {
  std::uint16_t bits;
};
#endif
static_assert(sizeof(bf16) == 2, "bfloat16 storage is 16 bits");

#if defined(__CUDACC__) || CONVNET_EMU
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(bf16 x) {
#if defined(__CUDACC__)
  return __bfloat162float(x);
#else
  return cuemu::bf16_to_float(x.bits);
#endif
}

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ bf16 from_float<bf16>(float x) {
#if defined(__CUDACC__)
  return __float2bfloat16_rn(x);
#else
  return bf16{cuemu::cvt_rn_bf16(x)};
#endif
}
#endif  // defined(__CUDACC__) || CONVNET_EMU

}  // namespace convnet
