// Locally connected layers (cuda-convnet's `local`: a convolution whose filters are not shared across output
// positions), CHWN. Conventions: src/convnet/reference/local.py.
//   x  (C, H, W, N)                     images fastest
//   w  (P, C/groups, KH, KW, F)         P = OH*OW positions, row-major (cuda-convnet's (numModules,
//                                       numFilterColors, filterPixels, numFilters)): per position a (K, F) matrix,
//                                       K = C/groups * KH * KW
//   y  (F, OH, OW, N)                   OH = (H + 2*pad_h - KH) / stride_h + 1 (floor), padding implicit zeros
//   bias: none, (F,) (shared over positions) or (F, OH, OW) (one per filter and position)
// Group g uses input channels [g*Cg, (g+1)*Cg) and filters [g*Fg, (g+1)*Fg). The geometry is ConvGeometry's.
#pragma once
#include "cuda_compat.h"
#include "kernels/conv.h"

namespace convnet {

enum class LocalBias : int { none = 0, shared = 1, per_position = 2 };

// Validates the geometry (conv_geometry's rules, the filters' 2^31 limit, the grid's limits).
void local_check(const ConvGeometry& g);

// y = alpha * (local(x, w) + bias) + beta * y (y not read when beta == 0). bias: null unless mode != none.
void local_forward(const ConvGeometry& g, const float* x, const float* w, const float* bias, LocalBias mode,
                   float* y, float alpha, float beta, cudaStream_t stream);

// dx = alpha * the input gradient + beta * dx.
void local_backward_data(const ConvGeometry& g, const float* dy, const float* w, float* dx, float alpha, float beta,
                         cudaStream_t stream);

// dw = alpha * sum over images of x-patch * dy (per position) + beta * dw.
void local_backward_filter(const ConvGeometry& g, const float* x, const float* dy, float* dw, float alpha,
                           float beta, cudaStream_t stream);

}  // namespace convnet
