// cuemu.h — a CPU emulation of the CUDA execution model, so that unmodified kernel sources (.cu) compile
// with g++ and run on machines without a GPU. Included by csrc/cuda_compat.h when not compiling with nvcc.
//
// Execution model
// - A launch (cuemu::launch, reached through convnet::launch) validates the configuration like CUDA and runs
//   the grid synchronously. Blocks are independent, so they are handed out (atomic counter) to a pool of OS
//   threads: the launching thread plus helpers (default hardware_concurrency in all, env CONVNET_EMU_THREADS,
//   cuemu::set_num_workers). A block never moves between OS threads; one launch runs at a time.
// - Every CUDA thread of a block is a fiber. Fibers are cooperative: a fiber runs until it reaches
//   __syncthreads, a warp collective (__shfl*_sync, __ballot_sync, __syncwarp, ...) or returns. Fibers run on
//   pooled "carriers" (a stack of 64 KB, env CONVNET_EMU_STACK_KB, with a PROT_NONE guard page below it, and a
//   context; x86-64 switches with a few instructions, elsewhere ucontext). A thread that blocks switches
//   straight to the next runnable thread of the round (one switch per resume); a thread that finishes without
//   blocking hands its carrier to the next unstarted thread, so barrier-free kernels cost about one switch per
//   block. threadIdx/blockIdx/blockDim/gridDim are thread_local variables the scheduler sets before
//   resuming a fiber. A fiber stack overflow hits the guard page and dies with a message (build emulated kernels
//   with -fstack-clash-protection so large frames cannot jump over it).
// - The scheduler resumes the runnable fibers of a block in rounds, in forward, reverse or seeded random order
//   (cuemu::set_schedule; the random order is drawn fresh for each round and depends only on seed, block and
//   round, not on which worker runs the block). Code that is correct only thanks to a lucky order (a missing
//   barrier) gives different results under different schedules: test under several.
// - When no fiber can run: if every live thread waits at the same __syncthreads (same file:line) they are all
//   released; anything else is an error naming the sites: a divergent barrier, a thread that exited while
//   others wait, a warp collective whose lanes never all arrive. Warp lanes are consecutive linear thread
//   indices (x fastest). A warp collective completes when all lanes of its mask arrived with the same operation
//   and mask; the last lane computes every result at once (shuffles follow PTX shfl.sync exactly, including
//   `width` segments). Errors: mismatched op or mask, a mask without the calling lane or naming lanes that do not
//   exist (partial last warp), a shuffle reading a lane outside the mask, deadlock.
// - Shared memory: each SHARED(T, name, dims) declaration site (a static local in the macro, so every template
//   instantiation has its own) gets its own heap allocation per block, so AddressSanitizer's redzones catch
//   overruns; `name` is a reference to a sized array (float (&)[32][33]) so UBSan's bounds check catches row
//   overruns. Static and dynamic shared memory are filled with 0xFF bytes (float NaN, int -1) at block start,
//   so reads of never-written shared memory show up, and freed at block end. Limits as on the GPU: static
//   <= 48 KB; dynamic <= 48 KB unless raised with cudaFuncSetAttribute(kernel,
//   cudaFuncAttributeMaxDynamicSharedMemorySize, n); static + dynamic <= 48 KB (227 KB once raised).
// - Errors inside kernels (assert, cuemu::EmulatorError, any C++ exception) are caught on the fiber's stack,
//   the other blocks stop at their next block boundary, and cuemu::launch throws cuemu::EmulatorError for the
//   lowest failing block, naming block and thread ("cuemu: kernel error in block (2,0,0), thread (5,0,0): ...").
//   The process never aborts. assert() is always checked in emulated kernels (also with NDEBUG) unless
//   CUEMU_DISABLE_ASSERT is defined; glibc's own assert (if a header re-includes <assert.h>) is caught too.
// - Atomics are real atomics (blocks run concurrently); within a block execution is sequentially consistent.
// - cuemu::last_launch_stats(): blocks and threads run, fiber resumes, barrier releases of the last launch.
//
// - Tensor cores and asynchronous copies (sm_80): mma.sync m16n8k8 TF32 and m16n8k16 BF16, ldmatrix and cp.async
//   with commit/wait groups, and the TF32/BF16 conversions, at the end of this header (kernels reach them through
//   the wrappers in cuda_compat.h). mma and ldmatrix are warp collectives of all 32 lanes that gather and scatter
//   each lane's registers by the PTX ISA's fragment tables; a cp.async fills its destination with poison (0xFF
//   bytes) when issued and writes the data only at the cp.async.wait_group that completes its group, so a missing
//   wait, or a missing __syncthreads between pipeline stages, reads NaN.
//
// Limits (what this cannot emulate): inline PTX; code under __CUDA_ARCH__ (the emulated build compiles the host
// branch); wmma, wgmma, TMA, textures, grid-wide sync, dynamic parallelism, streams as
// concurrency (every launch is synchronous); memory-model bugs (missing __threadfence/volatile, relaxed
// ordering across blocks); performance and occupancy (register spills, bank conflicts). Float results differ
// in the last bits from the GPU (nvcc contracts a*b+c into FMAs; __expf etc. are exact here): compare with
// tolerances. Warp-synchronous code without __syncwarp is undefined on modern GPUs and usually gives wrong
// answers here, which is the point. Requires C++20 (std::source_location names warp-collective call sites).
#pragma once

#ifdef __CUDACC__
#error "cuemu.h is the CPU emulation; nvcc must not include it"
#endif
#if __cplusplus < 202002L
#error "cuemu.h needs C++20 (-std=c++20)"
#endif

#include <algorithm>
#include <atomic>
#include <bit>
#include <cassert>
#include <cfloat>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <source_location>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

// ---------------------------------------------------------------------------------------------------------
// Qualifiers
#define __global__
#define __device__
#define __host__
#define __constant__
#define __forceinline__ inline __attribute__((always_inline))
// Empty rather than __attribute__((noinline)): libstdc++ spells __attribute__((__noinline__)) itself.
#define __noinline__
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __grid_constant__
#define CUEMU 1
// Plain `__shared__` would silently become a per-thread variable; make it a compile error that says what to use.
#define __shared__ cuemu_use_the_SHARED_or_DYNAMIC_SHARED_macro_instead_of___shared__

// ---------------------------------------------------------------------------------------------------------
// Vector types (same size and alignment as CUDA's)
#define CUEMU_VEC2(T, N, A)                                                                                 \
  struct alignas(A) N { T x, y; };                                                                          \
  inline constexpr N make_##N(T x, T y) { return N{x, y}; }
#define CUEMU_VEC3(T, N)                                                                                    \
  struct N { T x, y, z; };                                                                                  \
  inline constexpr N make_##N(T x, T y, T z) { return N{x, y, z}; }
#define CUEMU_VEC4(T, N, A)                                                                                 \
  struct alignas(A) N { T x, y, z, w; };                                                                    \
  inline constexpr N make_##N(T x, T y, T z, T w) { return N{x, y, z, w}; }
CUEMU_VEC2(float, float2, 8)
CUEMU_VEC3(float, float3)
CUEMU_VEC4(float, float4, 16)
CUEMU_VEC2(int, int2, 8)
CUEMU_VEC3(int, int3)
CUEMU_VEC4(int, int4, 16)
CUEMU_VEC2(unsigned int, uint2, 8)
CUEMU_VEC3(unsigned int, uint3)
CUEMU_VEC4(unsigned int, uint4, 16)
CUEMU_VEC2(double, double2, 16)
CUEMU_VEC2(long long, longlong2, 16)
CUEMU_VEC2(unsigned long long, ulonglong2, 16)
CUEMU_VEC4(char, char4, 4)
CUEMU_VEC4(unsigned char, uchar4, 4)
CUEMU_VEC2(short, short2, 4)
CUEMU_VEC2(unsigned short, ushort2, 4)
#undef CUEMU_VEC2
#undef CUEMU_VEC3
#undef CUEMU_VEC4

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
  constexpr operator uint3() const { return uint3{x, y, z}; }
};

// Built-in variables: set by the scheduler before it resumes a fiber (fibers never change OS thread).
inline thread_local uint3 threadIdx{0, 0, 0};
inline thread_local uint3 blockIdx{0, 0, 0};
inline thread_local dim3 blockDim{1, 1, 1};
inline thread_local dim3 gridDim{1, 1, 1};
inline constexpr int warpSize = 32;

// ---------------------------------------------------------------------------------------------------------
// Runtime API subset (host launcher code compiles unchanged)
struct CUstream_st;
typedef CUstream_st* cudaStream_t;
struct CUevent_st;
typedef CUevent_st* cudaEvent_t;
enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDeviceFunction = 98,
  cudaErrorLaunchFailure = 719,
};
typedef cudaError_t cudaError;
enum cudaFuncAttribute : int {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
  cudaFuncAttributePreferredSharedMemoryCarveout = 9,
};
enum cudaMemcpyKind : int {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
  cudaMemcpyDefault = 4,
};
enum cudaDeviceAttr : int {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrWarpSize = 10,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};
#define cudaStreamLegacy ((cudaStream_t)0x1)
#define cudaStreamPerThread ((cudaStream_t)0x2)

const char* cudaGetErrorString(cudaError_t e);
const char* cudaGetErrorName(cudaError_t e);
cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
cudaError_t cudaDeviceSynchronize();
cudaError_t cudaStreamSynchronize(cudaStream_t);
cudaError_t cudaGetDevice(int* device);
cudaError_t cudaSetDevice(int device);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);
// Memory is host memory on the emulator; these exist so launchers that zero or copy buffers compile.
cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t stream = nullptr);
cudaError_t cudaMemset(void* p, int value, size_t bytes);
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind,
                            cudaStream_t stream = nullptr);
cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind);

namespace cuemu {

// Every emulator-detected problem (bad launch, kernel assert, divergent barrier, ...).
class EmulatorError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

enum class Schedule { Forward, Reverse, Random };
struct ScheduleSetting {
  Schedule order;
  uint64_t seed;
};
void set_schedule(Schedule s, uint64_t seed = 0);
ScheduleSetting schedule();
const char* schedule_name(Schedule s);
void set_num_workers(int n);  // n >= 1; 0 = default (env CONVNET_EMU_THREADS or hardware_concurrency)
int num_workers();

// A launch that makes no progress for this long (a thread spinning on a value another thread must write:
// threads switch only at barriers and warp collectives) gets a message on stderr naming block and thread.
// Default 120 s or env CONVNET_EMU_WATCHDOG_S; 0 disables.
void set_watchdog_seconds(double seconds);

// Counters of the last completed launch (for benchmarks and tests).
struct LaunchStats {
  uint64_t blocks_run = 0;       // blocks that started
  uint64_t threads_run = 0;      // fibers that started
  uint64_t switches = 0;         // fiber resumes (each is a switch in and, later, a switch out)
  uint64_t barrier_rounds = 0;   // __syncthreads releases
};
LaunchStats last_launch_stats();

namespace detail {
using AnyFn = void (*)();
struct LaunchSpec {
  AnyFn kernel;                                 // identity of the kernel (for cudaFuncSetAttribute)
  void (*invoke)(AnyFn kernel, const void* args);
  const void* args;                             // std::tuple of the converted parameters
  dim3 grid, block;
  size_t dyn_shmem;
};
void run_launch(const LaunchSpec& spec);

template <class... P>
void invoke_kernel(AnyFn kernel, const void* args) {
  auto fn = reinterpret_cast<void (*)(P...)>(kernel);
  // Parameters are copied from the tuple for every thread (kernel parameters are by value).
  std::apply([fn](const auto&... a) { fn(a...); }, *static_cast<const std::tuple<std::decay_t<P>...>*>(args));
}
// Implicit conversion, as for a <<<>>> launch (no explicit-only conversions).
template <class T>
inline T implicit_convert(T v) { return v; }

void set_func_max_dynamic_shared(AnyFn kernel, int bytes);

[[noreturn]] void assert_fail(const char* expr, const char* file, int line, const char* func);
void syncthreads(const char* file, int line);
void* shared_alloc(const void* key, size_t bytes, size_t align, const char* name, const char* file, int line);
void* dynamic_shared(size_t align);

enum class WarpOp : uint8_t {
  Sync, Idx, Up, Down, Xor, Ballot, Any, All, MatchAny, MatchAll,
  ReduceAddU, ReduceMinU, ReduceMaxU, ReduceMinI, ReduceMaxI, ReduceAnd, ReduceOr, ReduceXor,
  // Tensor-core collectives: each lane's value is the address of its operands on its own (suspended) stack.
  MmaTf32, MmaBf16, Ldmatrix
};
// Deposits this lane's value, waits for the lanes of `mask`, returns this lane's result.
// For MatchAll, bit 32 of the result is the predicate.
uint64_t warp_collective(WarpOp op, uint32_t mask, uint64_t value, int param, int width, const char* file,
                         int line);
unsigned activemask();

template <class T>
inline uint64_t to_bits(T v) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "warp collectives take values of <= 8 bytes");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <class T>
inline T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}
}  // namespace detail

// Converts args to the kernel's parameter types, validates the configuration like CUDA, runs the grid and
// throws EmulatorError on a bad configuration or the first kernel error.
template <class... P, class... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t dyn_shmem_bytes, cudaStream_t stream, A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "cuemu::launch: wrong number of kernel arguments");
  static_assert((!std::is_reference_v<P> && ...), "kernel parameters must be passed by value");
  (void)stream;
  const std::tuple<std::decay_t<P>...> params{detail::implicit_convert<std::decay_t<P>>(std::forward<A>(args))...};
  detail::LaunchSpec spec{reinterpret_cast<detail::AnyFn>(kernel), &detail::invoke_kernel<P...>, &params, grid,
                          block, dyn_shmem_bytes};
  detail::run_launch(spec);
}

}  // namespace cuemu

template <class... P>
inline cudaError_t cudaFuncSetAttribute(void (*kernel)(P...), cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value < 0 || value > 227 * 1024) return cudaErrorInvalidValue;
    cuemu::detail::set_func_max_dynamic_shared(reinterpret_cast<cuemu::detail::AnyFn>(kernel), value);
  }
  return cudaSuccess;
}
// The form cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), ...) of the C runtime API.
inline cudaError_t cudaFuncSetAttribute(const void* kernel, cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value < 0 || value > 227 * 1024) return cudaErrorInvalidValue;
    cuemu::detail::set_func_max_dynamic_shared(reinterpret_cast<cuemu::detail::AnyFn>(kernel), value);
  }
  return cudaSuccess;
}
template <class T>
inline cudaError_t cudaMemcpyToSymbol(T& symbol, const void* src, size_t count, size_t offset = 0,
                                      cudaMemcpyKind = cudaMemcpyHostToDevice) {
  if (offset + count > sizeof(T)) return cudaErrorInvalidValue;
  std::memcpy(reinterpret_cast<char*>(&symbol) + offset, src, count);
  return cudaSuccess;
}

template <class T>
inline cudaError_t cudaMemcpyToSymbolAsync(T& symbol, const void* src, size_t count, size_t offset = 0,
                                           cudaMemcpyKind kind = cudaMemcpyHostToDevice, cudaStream_t = nullptr) {
  return cudaMemcpyToSymbol(symbol, src, count, offset, kind);
}
template <class T>
inline cudaError_t cudaMemcpyFromSymbol(void* dst, const T& symbol, size_t count, size_t offset = 0,
                                        cudaMemcpyKind = cudaMemcpyDeviceToHost) {
  if (offset + count > sizeof(T)) return cudaErrorInvalidValue;
  std::memcpy(dst, reinterpret_cast<const char*>(&symbol) + offset, count);
  return cudaSuccess;
}

// ---------------------------------------------------------------------------------------------------------
// Shared memory. SHARED(float, tile, [32][33]) declares `float (&tile)[32][33]` bound to this block's copy.
// The static local gives each declaration site (and each template instantiation) a distinct key; it is a
// writable char, because identical read-only constants may legally be merged to one address.
#define SHARED(T, name, dims)                                                                              \
  using cuemu_shared_type_##name = T dims;                                                                  \
  static_assert(std::is_trivially_destructible_v<cuemu_shared_type_##name>, "shared arrays hold plain data"); \
  static char cuemu_shared_key_##name;                                                                      \
  cuemu_shared_type_##name& name = *static_cast<cuemu_shared_type_##name*>(::cuemu::detail::shared_alloc(    \
      &cuemu_shared_key_##name, sizeof(cuemu_shared_type_##name), alignof(cuemu_shared_type_##name), #name,  \
      __FILE__, __LINE__))
// DYNAMIC_SHARED(float, smem) declares `float* smem` pointing at the block's dynamic shared memory.
#define DYNAMIC_SHARED(T, name) T* name = static_cast<T*>(::cuemu::detail::dynamic_shared(alignof(T)))

// ---------------------------------------------------------------------------------------------------------
// Barriers and warp collectives
#define __syncthreads() ::cuemu::detail::syncthreads(__FILE__, __LINE__)

#define CUEMU_SITE_PARAM std::source_location cuemu_site_ = std::source_location::current()
#define CUEMU_SITE cuemu_site_.file_name(), static_cast<int>(cuemu_site_.line())

inline void __syncwarp(unsigned mask = 0xffffffffu, CUEMU_SITE_PARAM) {
  ::cuemu::detail::warp_collective(::cuemu::detail::WarpOp::Sync, mask, 0, 0, 32, CUEMU_SITE);
}
template <class T>
inline T __shfl_sync(unsigned mask, T var, int srcLane, int width = warpSize, CUEMU_SITE_PARAM) {
  return ::cuemu::detail::from_bits<T>(::cuemu::detail::warp_collective(
      ::cuemu::detail::WarpOp::Idx, mask, ::cuemu::detail::to_bits(var), srcLane, width, CUEMU_SITE));
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize, CUEMU_SITE_PARAM) {
  return ::cuemu::detail::from_bits<T>(::cuemu::detail::warp_collective(
      ::cuemu::detail::WarpOp::Up, mask, ::cuemu::detail::to_bits(var), static_cast<int>(delta), width, CUEMU_SITE));
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize, CUEMU_SITE_PARAM) {
  return ::cuemu::detail::from_bits<T>(::cuemu::detail::warp_collective(
      ::cuemu::detail::WarpOp::Down, mask, ::cuemu::detail::to_bits(var), static_cast<int>(delta), width,
      CUEMU_SITE));
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T var, int laneMask, int width = warpSize, CUEMU_SITE_PARAM) {
  return ::cuemu::detail::from_bits<T>(::cuemu::detail::warp_collective(
      ::cuemu::detail::WarpOp::Xor, mask, ::cuemu::detail::to_bits(var), laneMask, width, CUEMU_SITE));
}
inline unsigned __ballot_sync(unsigned mask, int predicate, CUEMU_SITE_PARAM) {
  return static_cast<unsigned>(::cuemu::detail::warp_collective(::cuemu::detail::WarpOp::Ballot, mask,
                                                                 predicate != 0, 0, 32, CUEMU_SITE));
}
inline int __any_sync(unsigned mask, int predicate, CUEMU_SITE_PARAM) {
  return static_cast<int>(
      ::cuemu::detail::warp_collective(::cuemu::detail::WarpOp::Any, mask, predicate != 0, 0, 32, CUEMU_SITE));
}
inline int __all_sync(unsigned mask, int predicate, CUEMU_SITE_PARAM) {
  return static_cast<int>(
      ::cuemu::detail::warp_collective(::cuemu::detail::WarpOp::All, mask, predicate != 0, 0, 32, CUEMU_SITE));
}
inline unsigned __activemask() { return ::cuemu::detail::activemask(); }
template <class T>
inline unsigned __match_any_sync(unsigned mask, T value, CUEMU_SITE_PARAM) {
  return static_cast<unsigned>(::cuemu::detail::warp_collective(
      ::cuemu::detail::WarpOp::MatchAny, mask, ::cuemu::detail::to_bits(value), 0, 32, CUEMU_SITE));
}
template <class T>
inline unsigned __match_all_sync(unsigned mask, T value, int* pred, CUEMU_SITE_PARAM) {
  uint64_t r = ::cuemu::detail::warp_collective(::cuemu::detail::WarpOp::MatchAll, mask,
                                                ::cuemu::detail::to_bits(value), 0, 32, CUEMU_SITE);
  *pred = static_cast<int>(r >> 32);
  return static_cast<unsigned>(r);
}
#define CUEMU_REDUCE(name, T, OP)                                                                          \
  inline T name(unsigned mask, T value, CUEMU_SITE_PARAM) {                                                 \
    return static_cast<T>(static_cast<uint32_t>(::cuemu::detail::warp_collective(                          \
        ::cuemu::detail::WarpOp::OP, mask, static_cast<uint32_t>(value), 0, 32, CUEMU_SITE)));              \
  }
CUEMU_REDUCE(__reduce_add_sync, unsigned, ReduceAddU)
CUEMU_REDUCE(__reduce_add_sync, int, ReduceAddU)
CUEMU_REDUCE(__reduce_min_sync, unsigned, ReduceMinU)
CUEMU_REDUCE(__reduce_min_sync, int, ReduceMinI)
CUEMU_REDUCE(__reduce_max_sync, unsigned, ReduceMaxU)
CUEMU_REDUCE(__reduce_max_sync, int, ReduceMaxI)
CUEMU_REDUCE(__reduce_and_sync, unsigned, ReduceAnd)
CUEMU_REDUCE(__reduce_or_sync, unsigned, ReduceOr)
CUEMU_REDUCE(__reduce_xor_sync, unsigned, ReduceXor)
#undef CUEMU_REDUCE

// __syncthreads_count/_and/_or: a barrier plus a block-wide reduction of a predicate (implemented with a
// per-site shared counter).
namespace cuemu::detail {
int syncthreads_reduce(int pred, int op, const char* file, int line);
}
#define __syncthreads_count(p) ::cuemu::detail::syncthreads_reduce((p) != 0, 0, __FILE__, __LINE__)
#define __syncthreads_and(p) ::cuemu::detail::syncthreads_reduce((p) != 0, 1, __FILE__, __LINE__)
#define __syncthreads_or(p) ::cuemu::detail::syncthreads_reduce((p) != 0, 2, __FILE__, __LINE__)

// Fences: the emulator is sequentially consistent within a block; across blocks these are real fences.
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_system() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __nanosleep(unsigned) {}
long long clock64();  // nanoseconds; clock() is the C library's

// ---------------------------------------------------------------------------------------------------------
// assert inside kernels raises EmulatorError instead of aborting the process.
#undef assert
#ifdef CUEMU_DISABLE_ASSERT
#define assert(e) ((void)0)
#else
#define assert(e) \
  (static_cast<bool>(e) ? (void)0 : ::cuemu::detail::assert_fail(#e, __FILE__, __LINE__, __PRETTY_FUNCTION__))
#endif

// ---------------------------------------------------------------------------------------------------------
// Atomics: real atomics, since blocks run concurrently on worker threads.
namespace cuemu::detail {
template <class T>
inline T atomic_rmw_cas(T* p, auto f) {  // generic CAS loop for float/double ops
  std::atomic_ref<T> r(*p);
  T old = r.load(std::memory_order_relaxed);
  while (!r.compare_exchange_weak(old, f(old), std::memory_order_seq_cst, std::memory_order_relaxed)) {
  }
  return old;
}
}  // namespace cuemu::detail
inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
}
inline float atomicAdd(float* p, float v) {
  return cuemu::detail::atomic_rmw_cas(p, [v](float o) { return o + v; });
}
inline double atomicAdd(double* p, double v) {
  return cuemu::detail::atomic_rmw_cas(p, [v](double o) { return o + v; });
}
inline int atomicSub(int* p, int v) { return __atomic_fetch_sub(p, v, __ATOMIC_SEQ_CST); }
inline unsigned atomicSub(unsigned* p, unsigned v) { return __atomic_fetch_sub(p, v, __ATOMIC_SEQ_CST); }
inline int atomicMax(int* p, int v) {
  return cuemu::detail::atomic_rmw_cas(p, [v](int o) { return o > v ? o : v; });
}
inline unsigned atomicMax(unsigned* p, unsigned v) {
  return cuemu::detail::atomic_rmw_cas(p, [v](unsigned o) { return o > v ? o : v; });
}
inline unsigned long long atomicMax(unsigned long long* p, unsigned long long v) {
  return cuemu::detail::atomic_rmw_cas(p, [v](unsigned long long o) { return o > v ? o : v; });
}
inline int atomicMin(int* p, int v) {
  return cuemu::detail::atomic_rmw_cas(p, [v](int o) { return o < v ? o : v; });
}
inline unsigned atomicMin(unsigned* p, unsigned v) {
  return cuemu::detail::atomic_rmw_cas(p, [v](unsigned o) { return o < v ? o : v; });
}
inline unsigned long long atomicMin(unsigned long long* p, unsigned long long v) {
  return cuemu::detail::atomic_rmw_cas(p, [v](unsigned long long o) { return o < v ? o : v; });
}
template <class T>
inline T cuemu_atomic_cas_(T* p, T compare, T val) {
  __atomic_compare_exchange_n(p, &compare, val, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
  return compare;  // holds the old value whether or not the exchange happened
}
inline int atomicCAS(int* p, int c, int v) { return cuemu_atomic_cas_(p, c, v); }
inline unsigned atomicCAS(unsigned* p, unsigned c, unsigned v) { return cuemu_atomic_cas_(p, c, v); }
inline unsigned long long atomicCAS(unsigned long long* p, unsigned long long c, unsigned long long v) {
  return cuemu_atomic_cas_(p, c, v);
}
inline unsigned short atomicCAS(unsigned short* p, unsigned short c, unsigned short v) {
  return cuemu_atomic_cas_(p, c, v);
}
inline int atomicExch(int* p, int v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }
inline unsigned atomicExch(unsigned* p, unsigned v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }
inline unsigned long long atomicExch(unsigned long long* p, unsigned long long v) {
  return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST);
}
inline float atomicExch(float* p, float v) { return std::atomic_ref<float>(*p).exchange(v); }
inline int atomicAnd(int* p, int v) { return __atomic_fetch_and(p, v, __ATOMIC_SEQ_CST); }
inline unsigned atomicAnd(unsigned* p, unsigned v) { return __atomic_fetch_and(p, v, __ATOMIC_SEQ_CST); }
inline int atomicOr(int* p, int v) { return __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST); }
inline unsigned atomicOr(unsigned* p, unsigned v) { return __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST); }
inline int atomicXor(int* p, int v) { return __atomic_fetch_xor(p, v, __ATOMIC_SEQ_CST); }
inline unsigned atomicXor(unsigned* p, unsigned v) { return __atomic_fetch_xor(p, v, __ATOMIC_SEQ_CST); }
inline unsigned atomicInc(unsigned* p, unsigned limit) {
  return cuemu::detail::atomic_rmw_cas(p, [limit](unsigned o) { return o >= limit ? 0u : o + 1; });
}
inline unsigned atomicDec(unsigned* p, unsigned limit) {
  return cuemu::detail::atomic_rmw_cas(p, [limit](unsigned o) { return (o == 0 || o > limit) ? limit : o - 1; });
}

// ---------------------------------------------------------------------------------------------------------
// Math and intrinsics. expf/logf/sqrtf/... come from <cmath> (global namespace via math.h).
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline float rcbrtf(float x) { return 1.0f / std::cbrt(x); }
inline float exp10f(float x) { return std::pow(10.0f, x); }
inline float __expf(float x) { return std::exp(x); }
inline float __exp10f(float x) { return std::pow(10.0f, x); }
inline float __logf(float x) { return std::log(x); }
inline float __log2f(float x) { return std::log2(x); }
inline float __log10f(float x) { return std::log10(x); }
inline float __powf(float x, float y) { return std::pow(x, y); }
inline float __sinf(float x) { return std::sin(x); }
inline float __cosf(float x) { return std::cos(x); }
inline float __tanf(float x) { return std::tan(x); }
inline void __sincosf(float x, float* s, float* c) { *s = std::sin(x); *c = std::cos(x); }
inline float __fdividef(float x, float y) { return x / y; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return std::sqrt(x); }
inline float __frsqrt_rn(float x) { return 1.0f / std::sqrt(x); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : (x == x ? x : 0.0f)); }
inline int __float2int_rn(float x) { return static_cast<int>(std::nearbyint(x)); }
inline int __float2int_rz(float x) { return static_cast<int>(x); }
inline int __float2int_rd(float x) { return static_cast<int>(std::floor(x)); }
inline int __float2int_ru(float x) { return static_cast<int>(std::ceil(x)); }
inline unsigned __float2uint_rn(float x) { return static_cast<unsigned>(std::nearbyint(x)); }
inline unsigned __float2uint_rz(float x) { return static_cast<unsigned>(x); }
inline float __int2float_rn(int x) { return static_cast<float>(x); }
inline float __uint2float_rn(unsigned x) { return static_cast<float>(x); }
inline float __ll2float_rn(long long x) { return static_cast<float>(x); }
inline float __double2float_rn(double x) { return static_cast<float>(x); }
inline unsigned __float_as_uint(float x) { return std::bit_cast<unsigned>(x); }
inline float __uint_as_float(unsigned x) { return std::bit_cast<float>(x); }
inline int __float_as_int(float x) { return std::bit_cast<int>(x); }
inline float __int_as_float(int x) { return std::bit_cast<float>(x); }
inline long long __double_as_longlong(double x) { return std::bit_cast<long long>(x); }
inline double __longlong_as_double(long long x) { return std::bit_cast<double>(x); }
inline int __double2hiint(double x) { return static_cast<int>(std::bit_cast<unsigned long long>(x) >> 32); }
inline int __double2loint(double x) { return static_cast<int>(std::bit_cast<unsigned long long>(x)); }
inline double __hiloint2double(int hi, int lo) {
  return std::bit_cast<double>((static_cast<unsigned long long>(static_cast<unsigned>(hi)) << 32) |
                               static_cast<unsigned>(lo));
}
inline int __mulhi(int a, int b) { return static_cast<int>((static_cast<long long>(a) * b) >> 32); }
inline unsigned __umulhi(unsigned a, unsigned b) {
  return static_cast<unsigned>((static_cast<unsigned long long>(a) * b) >> 32);
}
inline long long __mul64hi(long long a, long long b) {
  return static_cast<long long>((static_cast<__int128>(a) * b) >> 64);
}
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
  return static_cast<unsigned long long>((static_cast<unsigned __int128>(a) * b) >> 64);
}
inline int __mul24(int a, int b) { return (a << 8 >> 8) * (b << 8 >> 8); }
inline unsigned __umul24(unsigned a, unsigned b) { return (a & 0xffffffu) * (b & 0xffffffu); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x)); }
inline unsigned __brev(unsigned x) {
  x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
  x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
  x = ((x >> 4) & 0x0f0f0f0fu) | ((x & 0x0f0f0f0fu) << 4);
  return __builtin_bswap32(x);
}
inline unsigned long long __brevll(unsigned long long x) {
  return (static_cast<unsigned long long>(__brev(static_cast<unsigned>(x))) << 32) | __brev(static_cast<unsigned>(x >> 32));
}
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  const unsigned long long v = (static_cast<unsigned long long>(y) << 32) | x;
  unsigned r = 0;
  for (int i = 0; i < 4; ++i) r |= static_cast<unsigned>((v >> (8 * ((s >> (4 * i)) & 7))) & 0xff) << (8 * i);
  return r;
}
inline unsigned __funnelshift_l(unsigned lo, unsigned hi, unsigned shift) {
  const unsigned long long v = (static_cast<unsigned long long>(hi) << 32) | lo;
  return static_cast<unsigned>((v << (shift & 31)) >> 32);
}
inline unsigned __funnelshift_r(unsigned lo, unsigned hi, unsigned shift) {
  const unsigned long long v = (static_cast<unsigned long long>(hi) << 32) | lo;
  return static_cast<unsigned>(v >> (shift & 31));
}
inline unsigned __sad(int x, int y, unsigned z) { return z + static_cast<unsigned>(x > y ? x - y : y - x); }
inline unsigned __usad(unsigned x, unsigned y, unsigned z) { return z + (x > y ? x - y : y - x); }
template <class T>
inline T __ldg(const T* p) { return *p; }
template <class T>
inline T __ldcg(const T* p) { return *p; }
template <class T>
inline T __ldcs(const T* p) { return *p; }
template <class T>
inline T __ldlu(const T* p) { return *p; }
template <class T>
inline void __stcs(T* p, T v) { *p = v; }
template <class T>
inline void __stcg(T* p, T v) { *p = v; }
template <class T>
inline void __stwt(T* p, T v) { *p = v; }

// CUDA declares the classification functions in the global namespace; <cmath> only puts them in std.
using std::isfinite;
using std::isinf;
using std::isnan;
using std::signbit;

// CUDA's global min/max overloads. Non-templates, so they win over std::min/std::max on equal arguments.
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline unsigned min(int a, unsigned b) { return min(static_cast<unsigned>(a), b); }
inline unsigned max(int a, unsigned b) { return max(static_cast<unsigned>(a), b); }
inline unsigned min(unsigned a, int b) { return min(a, static_cast<unsigned>(b)); }
inline unsigned max(unsigned a, int b) { return max(a, static_cast<unsigned>(b)); }
inline long min(long a, long b) { return a < b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }
inline unsigned long min(unsigned long a, unsigned long b) { return a < b ? a : b; }
inline unsigned long max(unsigned long a, unsigned long b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
inline float min(float a, float b) { return std::fmin(a, b); }
inline float max(float a, float b) { return std::fmax(a, b); }
inline double min(double a, double b) { return std::fmin(a, b); }
inline double max(double a, double b) { return std::fmax(a, b); }

// ---------------------------------------------------------------------------------------------------------
// Tensor cores and asynchronous copies (sm_80). Kernels call the wrappers of cuda_compat.h (convnet::mma_tf32,
// convnet::ldmatrix, convnet::cp_async_ca, ...), which are inline PTX under nvcc and these functions here.
namespace cuemu {

// cvt.rna.tf32.f32: round to 10 explicit mantissa bits, to nearest with ties away from zero; the low 13 bits of
// the result are zero. Subnormals round at the same bit; values that round past FLT_MAX give inf; NaN stays a
// (quiet) NaN.
inline uint32_t cvt_rna_tf32(float x) {
  const uint32_t u = std::bit_cast<uint32_t>(x);
  if ((u & 0x7f800000u) == 0x7f800000u) return (u & 0x007fffffu) ? ((u | 0x00400000u) & 0xffffe000u) : u;
  return (u + 0x1000u) & 0xffffe000u;  // adding half an ulp to the magnitude, then truncating: ties go away from 0
}

// cvt.rn.bf16.f32: the upper 16 bits, rounded to nearest even; NaN stays a (quiet) NaN.
inline uint16_t cvt_rn_bf16(float x) {
  const uint32_t u = std::bit_cast<uint32_t>(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

inline float bf16_to_float(uint16_t b) { return std::bit_cast<float>(static_cast<uint32_t>(b) << 16); }

namespace detail {
// What one lane hands to an mma collective: its fragments of A, B and C, and where D goes (the PTX ISA's
// "Matrix Fragments for mma.m16n8k8" (.tf32) and "... mma.m16n8k16 with floating point type" (.bf16)).
struct MmaLane {
  uint32_t a[4];
  uint32_t b[2];
  float c[4];
  float d[4];
};
struct LdmatrixLane {
  const void* row;  // this lane's row address (lanes 0-7: matrix 0, 8-15: matrix 1, ...)
  uint32_t r[4];
};
// Run by the last lane of an mma / ldmatrix collective for all 32 lanes (csrc/emu/cuemu.cpp).
void mma_sync(WarpOp op, void* const lanes[32]);
void ldmatrix_sync(int count, bool trans, void* const lanes[32], const char* file, int line);
// True when [p, p + bytes) lies inside the running block's static or dynamic shared memory.
bool in_shared_memory(const void* p, size_t bytes);
}  // namespace detail

// mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 d, a, b, c: D (16x8) = A (16x8) B (8x8) + C, by all 32 lanes of
// a full warp. The tensor core reads the top 19 bits of a .tf32 operand (sign, exponent, 10 mantissa bits), so an
// operand not rounded with cvt_rna_tf32 is truncated. Products of TF32 (or BF16) values are exact; the emulator
// adds them to C in float64, k ascending, and rounds once to float (the GPU's order and internal width are not
// specified: compare with a GPU within tolerance).
inline void mma_m16n8k8_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4],
                             CUEMU_SITE_PARAM) {
  detail::MmaLane lane{{a[0], a[1], a[2], a[3]}, {b[0], b[1]}, {c[0], c[1], c[2], c[3]}, {}};
  detail::warp_collective(detail::WarpOp::MmaTf32, 0xffffffffu, detail::to_bits(&lane), 0, 32, CUEMU_SITE);
  for (int i = 0; i < 4; ++i) d[i] = lane.d[i];
}
// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32: A (16x16) and B (16x8) hold two bfloat16 per register,
// the lower-numbered element in the low half.
inline void mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4],
                              CUEMU_SITE_PARAM) {
  detail::MmaLane lane{{a[0], a[1], a[2], a[3]}, {b[0], b[1]}, {c[0], c[1], c[2], c[3]}, {}};
  detail::warp_collective(detail::WarpOp::MmaBf16, 0xffffffffu, detail::to_bits(&lane), 0, 32, CUEMU_SITE);
  for (int i = 0; i < 4; ++i) d[i] = lane.d[i];
}

// ldmatrix.sync.aligned.m8n8.{x1,x2,x4}{.trans}.shared.b16: `count` 8x8 matrices of 16-bit elements; lane l gives
// the 16-byte-aligned shared-memory address of row l % 8 of matrix l / 8 (only lanes < 8 * count are read) and
// receives in r[i] the elements (l / 4, 2 (l % 4)) and (l / 4, 2 (l % 4) + 1) of matrix i, low half first; with
// .trans, the elements (2 (l % 4), l / 4) and (2 (l % 4) + 1, l / 4).
inline void ldmatrix_m8n8(uint32_t* r, int count, bool trans, const void* row, CUEMU_SITE_PARAM) {
  detail::LdmatrixLane lane{row, {}};
  detail::warp_collective(detail::WarpOp::Ldmatrix, 0xffffffffu, detail::to_bits(&lane), count | (trans ? 8 : 0),
                          32, CUEMU_SITE);
  for (int i = 0; i < count; ++i) r[i] = lane.r[i];
}

// cp.async.{ca,cg}.shared.global [dst], [src], cp_size, src_size: copies src_size bytes and zero-fills the rest of
// cp_size (4, 8 or 16; .cg only 16), both addresses aligned to cp_size. The source is read now; the destination
// holds poison (0xFF bytes: NaN) until a cp_async_wait_group completes the copy's group.
void cp_async(void* dst, const void* src, int cp_size, int src_size, bool cache_global, const char* file, int line);
// cp.async.commit_group: the thread's uncommitted copies become its newest group (possibly empty).
void cp_async_commit_group(const char* file, int line);
// cp.async.wait_group n: completes every group of this thread except the n most recently committed ones (copies
// not yet committed stay pending). Other threads see the data only after a barrier that follows.
void cp_async_wait_group(int n, const char* file, int line);

}  // namespace cuemu
