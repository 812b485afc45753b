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

}  // namespace convnet
