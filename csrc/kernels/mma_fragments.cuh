// mma_fragments.cuh — which element of A, B, C/D each lane of a warp holds for the mma.sync shapes the kernels use,
// transcribed from the PTX ISA ("Matrix Fragments for mma.m16n8k8", .tf32; "Matrix Fragments for mma.m16n8k16 with
// floating point type", .bf16). groupID = lane / 4 and threadID_in_group = lane % 4 below; rows of A and C/D are M,
// columns of A and rows of B are K, columns of B and C/D are N.
//
// Kernels load fragments through these functions only; the emulator has its own copy of the tables
// (csrc/emu/cuemu.cpp) and tests/test_tensor_core_intrinsics.py checks both against the ISA's.
#pragma once

#include "cuda_compat.h"

namespace convnet::mma {

struct RowCol {
  int row, col;
};

__device__ __forceinline__ int group_id(int lane) { return lane >> 2; }
__device__ __forceinline__ int thread_in_group(int lane) { return lane & 3; }

// m16n8k8 .tf32, A (16x8): register i = 0..3 holds one element.
//   a0: (groupID, tig)   a1: (groupID + 8, tig)   a2: (groupID, tig + 4)   a3: (groupID + 8, tig + 4)
__device__ __forceinline__ RowCol tf32_a(int lane, int i) {
  const int row = group_id(lane) + ((i == 1 || i == 3) ? 8 : 0);
  const int col = thread_in_group(lane) + (i >= 2 ? 4 : 0);
  return {row, col};
}
// m16n8k8 .tf32, B (8x8): b0: (tig, groupID)   b1: (tig + 4, groupID)
__device__ __forceinline__ RowCol tf32_b(int lane, int i) { return {thread_in_group(lane) + (i ? 4 : 0), group_id(lane)}; }

// m16n8k16 .bf16, A (16x16): element e = 0..7, register e / 2, low half for even e.
//   rows groupID for e in {0, 1, 4, 5}, groupID + 8 otherwise; columns 2 tig + (e % 2), plus 8 for e >= 4
__device__ __forceinline__ RowCol bf16_a(int lane, int e) {
  const bool lower_rows = e == 2 || e == 3 || e == 6 || e == 7;
  return {group_id(lane) + (lower_rows ? 8 : 0), 2 * thread_in_group(lane) + (e % 2) + (e >= 4 ? 8 : 0)};
}
// m16n8k16 .bf16, B (16x8): element e = 0..3, register e / 2: rows 2 tig + (e % 2), plus 8 for e >= 2; column groupID
__device__ __forceinline__ RowCol bf16_b(int lane, int e) {
  return {2 * thread_in_group(lane) + (e % 2) + (e >= 2 ? 8 : 0), group_id(lane)};
}

// C and D (16x8 float) of both shapes: c0: (groupID, 2 tig)  c1: (groupID, 2 tig + 1)  c2, c3: the same 8 rows lower
__device__ __forceinline__ RowCol accumulator(int lane, int i) {
  return {group_id(lane) + (i >= 2 ? 8 : 0), 2 * thread_in_group(lane) + (i % 2)};
}

}  // namespace convnet::mma
