// BF16 tensor-core convolution forward in the CHWN layout (mma.sync m16n8k16, FP32 accumulation).
//
// Layouts as conv.h, all C-contiguous; x and w both float32 or both bfloat16 (16-bit storage, RNE bits as
// ml_dtypes.bfloat16), bias float32, y float32 or bfloat16:
//   x  (C, H, W, N)            images fastest
//   w  (C/groups, KH, KW, F)   filters fastest
//   y  (F, OH, OW, N)
// y = alpha * (conv(round_bf16(x), round_bf16(w)) + bias) + beta * y; beta == 0 never reads y. Float32 x and w are
// rounded to bfloat16 (nearest even) inside the kernel as they are staged; bfloat16 ones are used as they are. The
// products are summed in FP32; bias, alpha and beta are applied in FP32, and a bfloat16 y receives the FP32 result
// rounded to nearest even. Every geometry conv.h accepts is supported (any N, C, F, groups, stride, padding):
// bfloat16 inputs take the cp.async path when N % 8 == 0, (F/groups) % 8 == 0 and x and w are 16-byte aligned,
// float32 inputs the 16-byte register path when N % 4 == 0, (F/groups) % 4 == 0 and both are 16-byte aligned; every
// other case takes a one-element register path of the same kernels. Needs sm_80 or newer on a GPU.
#pragma once

#include <string>

#include "cuda_compat.h"
#include "kernels/conv.h"

namespace convnet {

void conv_forward_bf16(const ConvGeometry& g, const void* x, const void* w, bool inputs_bf16, const float* bias,
                       void* y, bool y_bf16, float alpha, float beta, cudaStream_t stream);

// The launch conv_forward_bf16 would make, in words (tile, load path assuming aligned pointers, grid).
std::string conv_bf16_plan(const ConvGeometry& g, bool inputs_bf16);

// Tests only: force tile `row` (-1: automatic) of the BF16 forward; and, on the emulator only, launch a variant with
// a planted defect (0: none, 1: no cp.async wait (cp.async path only), 2: no barrier in the k-tile loop, 3: fragments
// loaded by ldmatrix without .trans) so that tests can show the emulator catches each. The defects are planted in the
// cp.async path and the float32 one-element path. Process-global.
int conv_bf16_tile_count();
void conv_bf16_set_overrides(int row, int planted_defect);

}  // namespace convnet
