// BF16 tensor-core convolution passes in the CHWN layout (mma.sync m16n8k16, FP32 accumulation).
//
// Layouts as conv.h, all C-contiguous; x and w both float32 or both bfloat16 (16-bit storage, RNE bits as
// ml_dtypes.bfloat16), bias float32, y float32 or bfloat16:
//   x  (C, H, W, N)            images fastest
//   w  (C/groups, KH, KW, F)   filters fastest
//   y  (F, OH, OW, N)
// y = alpha * (conv(round_bf16(x), round_bf16(w)) + bias) + beta * y; beta == 0 never reads y. With relu,
// y = max(that, 0) in the same pass, before a bfloat16 y's rounding (bit-identical to relu_forward afterwards).
// Float32 x and w are rounded to bfloat16 (nearest even) inside the kernel as they are staged; bfloat16 ones are
// used as they are. The products are summed in FP32; bias, alpha and beta are applied in FP32, and a bfloat16 y
// receives the FP32 result rounded to nearest even. Every geometry conv.h accepts is supported (any N, C, F,
// groups, stride, padding): bfloat16 inputs take the cp.async path when N % 8 == 0, (F/groups) % 8 == 0 and x and w
// are 16-byte aligned, float32 inputs the 16-byte register path when N % 4 == 0, (F/groups) % 4 == 0 and both are
// 16-byte aligned; every other case takes a one-element register path of the same kernels. Needs sm_80 or newer on
// a GPU.
#pragma once

#include <cstdint>
#include <string>

#include "cuda_compat.h"
#include "kernels/conv.h"

namespace convnet {

void conv_forward_bf16(const ConvGeometry& g, const void* x, const void* w, bool inputs_bf16, const float* bias,
                       void* y, bool y_bf16, float alpha, float beta, bool relu, cudaStream_t stream);

// The input gradient: dx = alpha * conv_backward_data(round_bf16(dy), round_bf16(w)) + beta * dx, dy and w both float32
// or both bfloat16 (inputs_bf16), FP32 sums, dx float32 or bfloat16 (dx_bf16: the FP32 result rounded once at the
// end). Any geometry; bfloat16 inputs take cp.async when N % 8 == 0 and (F/groups) % 8 == 0, float32 ones 16-byte
// loads when both are multiples of 4 (and dy, w 16-byte aligned); otherwise one element at a time.
void conv_backward_data_bf16(const ConvGeometry& g, const void* dy, const void* w, bool inputs_bf16, void* dx,
                             bool dx_bf16, float alpha, float beta, cudaStream_t stream);

// The filter gradient: dw = alpha * conv_backward_filter(round_bf16(x), round_bf16(dy)) + beta * dw, x and dy both
// float32 or both bfloat16, dw float32 (always). The reduction over OH*OW*N may be split in K for parallelism: then
// `workspace` must hold conv_backward_filter_bf16_workspace(g) floats (0: none needed) and the splits are added in
// a fixed order (deterministic). Vector paths: N % 8 == 0 (bfloat16) or N % 4 == 0 (float32) and aligned x, dy.
std::int64_t conv_backward_filter_bf16_workspace(const ConvGeometry& g);
void conv_backward_filter_bf16(const ConvGeometry& g, const void* x, const void* dy, bool inputs_bf16, float* dw,
                               float* workspace, std::int64_t workspace_floats, float alpha, float beta,
                               cudaStream_t stream);

// The launch a pass would make, in words (tile, load path assuming aligned pointers, grid; the filter gradient's
// splits).
std::string conv_bf16_plan(const ConvGeometry& g, bool inputs_bf16, ConvPass pass = ConvPass::forward);

// Tests only: force tile `row` (-1: automatic) of every BF16 pass and the filter gradient's number of K splits
// (wgrad_splits, 0: automatic); and, on the emulator only, launch a variant with a planted defect (0: none, 1: no
// cp.async wait (cp.async path only), 2: no barrier in the k-tile loop, 3: fragments loaded by the wrong ldmatrix:
// .trans dropped (forward, k-major tiles) or added (the backward's k-contiguous tiles)) so that tests can show the
// emulator catches each. The defects are planted in the cp.async path and the float32 one-element path of every
// pass. Process-global.
int conv_bf16_tile_count();
void conv_bf16_set_overrides(int row, int planted_defect, int wgrad_splits = 0);

}  // namespace convnet
