// Self-test kernels of the CPU emulator (emu module only): correct kernels, deliberately broken ones, and
// benchmark kernels. Host launchers take plain pointers; errors are thrown as cuemu::EmulatorError.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace cuemu_selftest {

// out (cols x rows) = in (rows x cols)^T with a 32x33 shared tile and blocks of 32x8 threads.
// barrier=false removes the __syncthreads between the tile write and read (a race).
void transpose(const float* in, float* out, int rows, int cols, bool barrier);
// *out += sum(x): shared-memory tree per block (256 threads), then one atomicAdd per block.
void reduce_sum(const float* x, std::int64_t n, float* out);
// bins[v] += count of v in x (values in [0, nbins)), via shared atomics then global atomics. nbins <= 1024.
void histogram(const int* x, std::int64_t n, unsigned* bins, int nbins);
// Warp collectives on n ints (n multiple of 64, blocks of 64 threads); out has kWarpOpsRows * n ints.
constexpr int kWarpOpsRows = 21;
void warp_ops(const int* x, int n, int* out);
// Bit patterns of never-written static (first n) and dynamic (next n) shared memory; n <= 256.
void uninit_shared(unsigned* out, int n);
// out[i] = in[n-1-i] through dynamic shared memory, one block of n threads.
void dynamic_reverse(const float* in, float* out, int n);
// Same with n floats of dynamic shared memory above 48 KB (raised with cudaFuncSetAttribute).
void dynamic_large(const float* in, float* out, int n);
// Two template instantiations of a helper with a SHARED array must get distinct memory: out has 64 ints.
void template_shared(int* out);
// __syncthreads_count/_and/_or over predicate x[i] != 0 (one block of n <= 1024 threads); out[3].
void syncthreads_reduce(const int* x, int n, int* out);
// Atomics of every type from all threads of `blocks` blocks of 128 threads; out: see selftest_kernels.cu.
constexpr int kAtomicSlots = 16;
void atomics(int blocks, double* out);
// C (MxN) = A (MxK) B (KxN), row-major, tiled with 32x32 thread blocks and a barrier per tile step.
void sgemm(const float* a, const float* b, float* c, int m, int n, int k);
// y = alpha * x, blocks of 256 threads, one element per thread.
void scale(const float* x, float* y, std::int64_t n, float alpha);
// Built-in variables in a 3-D grid of 3-D blocks: for every thread (in x-fastest global order) writes
// threadIdx.xyz, blockIdx.xyz, blockDim.xyz, gridDim.xyz, the linear index of lane 0 of its warp (via
// __shfl_sync) and __activemask(): 14 ints. grid and block are (x, y, z).
constexpr int kThreadIdsFields = 14;
void thread_ids(const unsigned grid[3], const unsigned block[3], int* out);
// One block of one thread that busy-waits for `seconds` (watchdog test).
void spin(double seconds);
// Runs one of the named misbehaving kernels / launches (see case_names()); throws the emulator's error.
void run_case(const std::string& name);
std::vector<std::string> case_names();

}  // namespace cuemu_selftest
