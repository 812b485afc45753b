// The optional ReLU of the convolution forward kernels' epilogue, shared by the FP32 (conv_kernels.cuh), TF32
// (conv_tf32.cu) and BF16 (conv_bf16.cu) forwards so that all three fuse the same function. Each kernel first computes
// its output value v = alpha * (acc + bias) + beta * y_old exactly as without the flag, then stores
// conv_activation<kRelu>(v) (the BF16 forward rounds that to a bfloat16 output afterwards: max then round-to-nearest-
// even gives the bits of round then max, since the rounding keeps signs and NaN, so the fused result is still
// relu_forward's of the unfused bfloat16 one):
//   y = max(alpha * (conv(x, w) + bias) + beta * y_old, 0)
// i.e. the ReLU applies to the accumulated value (for a layer, alpha = 1 and beta = 0: y = relu(conv + bias)).
// The ReLU is elementwise.cu's (v > 0 ? v : 0: NaN -> 0, -0 -> +0), so the fused output is bit-identical to the
// unfused forward followed by relu_forward; it saves relu_forward's full read and write of y.
#pragma once

#include "cuda_compat.h"

namespace convnet {

template <bool kRelu>
__device__ __forceinline__ float conv_activation(float v) {
  if constexpr (kRelu) return v > 0.f ? v : 0.f;
  else return v;
}

}  // namespace convnet
