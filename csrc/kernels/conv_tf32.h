// TF32 tensor-core convolution in the CHWN layout (mma.sync m16n8k8, FP32 accumulation): the forward, the input
// gradient and the filter gradient.
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
// The backward passes follow conv.h's contracts with their inputs rounded to TF32 the same way: the input gradient
// rounds dy and w (16-byte path: N % 4 == 0, (F/groups) % 4 == 0, aligned dy and w), the filter gradient x and dy
// (16-byte path: N % 4 == 0, aligned x and dy; split-K partial sums in a workspace, reduced in a fixed order).
#pragma once

#include <cstdint>
#include <string>

#include "cuda_compat.h"
#include "kernels/conv.h"

namespace convnet {

// With relu: y = max(that, 0) in the same pass (as conv_forward's relu; bit-identical to relu_forward afterwards).
void conv_forward_tf32(const ConvGeometry& g, const float* x, const float* w, const float* bias, float* y, float alpha,
                       float beta, bool relu, cudaStream_t stream);

// dx = alpha * conv_transpose(round_tf32(dy), round_tf32(w)) + beta * dx.
void conv_backward_data_tf32(const ConvGeometry& g, const float* dy, const float* w, float* dx, float alpha,
                             float beta, cudaStream_t stream);

// Floats of scratch memory conv_backward_filter_tf32 needs (0: none): splits x |dw| partial sums. Depends only on
// the geometry (and the tests' split override), as conv_backward_filter_workspace.
std::int64_t conv_backward_filter_tf32_workspace(const ConvGeometry& g);

// dw = alpha * sum over positions and images of round_tf32(x)-patch * round_tf32(dy) + beta * dw. workspace: at
// least conv_backward_filter_tf32_workspace(g) floats (may be null when that is 0).
void conv_backward_filter_tf32(const ConvGeometry& g, const float* x, const float* dy, float* dw, float* workspace,
                               std::int64_t workspace_floats, float alpha, float beta, cudaStream_t stream);

// The launch a pass would make, in words (tile, path assuming aligned pointers, grid; the filter gradient's splits).
std::string conv_tf32_plan(const ConvGeometry& g, ConvPass pass = ConvPass::forward);

// Tests only: force tile `row` (-1: automatic) of every TF32 pass; on the emulator only, launch a variant with a
// planted defect (0: none, 1: no cp.async wait, 2: no barrier between the wait and the reads, 3: A fragment
// registers 1 and 2 swapped) so that tests can show the emulator catches each; and force the filter gradient's
// number of K splits (0: automatic; capped at one k tile each). Process-global.
int conv_tf32_tile_count();
void conv_tf32_set_overrides(int row, int planted_defect, int wgrad_splits = 0);

}  // namespace convnet
