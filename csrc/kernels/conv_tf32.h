// TF32 tensor-core convolution forward in the CHWN layout (mma.sync m16n8k8, FP32 accumulation).
//
// Layouts as conv.h, all C-contiguous float32:
//   x  (C, H, W, N)            images fastest
//   w  (C/groups, KH, KW, F)   filters fastest
//   y  (F, OH, OW, N)
// y = alpha * (conv(round_tf32(x), round_tf32(w)) + bias) + beta * y; beta == 0 never reads y. x and w are rounded
// to TF32 (cvt.rna: nearest, ties away from zero) inside the kernel; the products are summed in FP32; bias, alpha
// and beta are applied in FP32. Every geometry conv.h accepts is supported (any N, C, F, groups, stride, padding);
// the 16-byte path needs N % 4 == 0, (F/groups) % 4 == 0 and 16-byte aligned x and w, every other case takes the
// 4-byte path of the same kernels. Needs sm_80 or newer on a GPU.
#pragma once

#include <string>

#include "cuda_compat.h"
#include "kernels/conv.h"

namespace convnet {

void conv_forward_tf32(const ConvGeometry& g, const float* x, const float* w, const float* bias, float* y, float alpha,
                       float beta, cudaStream_t stream);

// The launch conv_forward_tf32 would make, in words (tile, path assuming aligned pointers, grid).
std::string conv_tf32_plan(const ConvGeometry& g);

// Tests only: force tile `row` (-1: automatic) of the TF32 forward; and, on the emulator only, launch a variant with
// a planted defect (0: none, 1: no cp.async wait, 2: no barrier between the wait and the reads, 3: A fragment
// registers 1 and 2 swapped) so that tests can show the emulator catches each. Process-global.
int conv_tf32_tile_count();
void conv_tf32_set_overrides(int row, int planted_defect);

}  // namespace convnet
