// Probe kernels of the tensor-core and cp.async intrinsics (cuda_compat.h): each runs one instruction, or one small
// pattern, on data a test chooses, so tests/test_tensor_core_intrinsics.py can hold the emulator (and a GPU, when
// present) to the PTX ISA's fragment tables and the cp.async group rules. Pointers are device pointers.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "cuda_compat.h"

namespace convnet::tensor_core_probes {

// One warp executes one mma with the registers given per lane: a (32 x 4), b (32 x 2), c (32 x 4) -> d (32 x 4).
// bf16: m16n8k16 .bf16 (two bfloat16 a register), else m16n8k8 .tf32.
void mma_registers(bool bf16, const std::uint32_t* a, const std::uint32_t* b, const float* c, float* d,
                   cudaStream_t stream);

// D (m x n) = A (m x k) B (k x n) + C, row-major float32, one warp per 16x8 tile of D, fragments loaded from global
// memory through kernels/mma_fragments.cuh and rounded in the kernel (tf32_bits or bf16x2_bits). m % 16 == 0,
// n % 8 == 0, k % 8 (tf32) or k % 16 (bf16) == 0. swap_a_registers: a planted bug, A's registers 1 and 2 exchanged.
void mma_gemm(bool bf16, const float* a, const float* b, const float* c, float* d, int m, int n, int k,
              bool swap_a_registers, cudaStream_t stream);

// One warp copies `elements` 16-bit values (<= 2048, a multiple of 8) into shared memory and executes ldmatrix
// .x{count}{.trans} with lane l's row at element row_offsets[l] (a multiple of 8); out (32 x 4) gets the registers.
void ldmatrix(const std::uint16_t* matrix, int elements, const int* row_offsets, int count, bool trans,
              std::uint32_t* out, cudaStream_t stream);

// The conversions: kind 0: out[i] = tf32_bits(x[i]) (uint32); 1: bf16_bits(x[i]) (uint16); 2: out[i] =
// bf16x2_bits(x[2i], x[2i+1]) (uint32, n even).
void convert(int kind, const float* x, void* out, std::int64_t n, cudaStream_t stream);

// A double-buffered cp.async pipeline of `tiles` tiles of 256 floats (one block of 64 threads, 16 bytes each): tile t
// is copied to stage t % 2 while tile t - 1 is read back, reversed, by other threads: y[256 t + i] = x[256 t + 255 - i].
// variant 0 is correct; 1 leaves out the cp.async.wait_group, 2 the __syncthreads after it, 3 the __syncthreads
// before a stage is refilled (planted bugs: on the emulator each reads poison).
constexpr int kPipelineTile = 256;
void pipeline_copy(const float* x, float* y, int tiles, int variant, cudaStream_t stream);

#if CONVNET_EMU
// Emulator only (on a GPU the copies may land early): one warp issues cp.async groups and snapshots its own shared
// row after each wait, so a test sees what is visible when. x: 32 x 16 floats; out: 4 snapshots x 32 x 16 floats.
void cp_async_groups(const float* x, float* out);
// Misuses the emulator must report (EmulatorError naming the line marked `// CASE <name>`).
std::vector<std::string> error_case_names();
void run_error_case(const std::string& name);
#endif

}  // namespace convnet::tensor_core_probes
