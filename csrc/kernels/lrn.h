// Cross-map local response normalisation in CHWN layout. Conventions: src/convnet/reference/lrn.py.
//   denom_c = k + a * sum_{j = c - size/2}^{c - size/2 + size - 1} x_j^2   (clipped to [0, C)),
//   y_c = x_c * denom_c^-beta;
//   a = alpha (convention "sum", the paper) or alpha / size (convention "mean": Caffe, torch, cuda-convnet);
//   the Python layer passes the resolved coefficient `a`.
//   Backward (exact): dx_c = dy_c denom_c^-beta - 2 a beta x_c sum_{j: c in W(j)} dy_j y_j / denom_j, in one of two
//   variants (LrnBackward) that differ only in what they read.
#pragma once
#include "cuda_compat.h"

namespace convnet {

// One launch's view of src/convnet/geometry.py's LrnGeometry (one group of it: LrnGeometry.group()).
struct LrnGeometry {
  int C, P, N;        // channels, pixels (H*W), images
  int size;
  float a, beta, k;   // a: resolved coefficient of the sum of squares
};

LrnGeometry lrn_geometry(int C, int H, int W, int N, int size, float a, float beta, float k);  // validates

// T: the storage type of every tensor argument, float or bf16 (cuda_compat.h): math in float, each output rounded
// once to T. Both launchers are instantiated for both.
// denom may be null: then only y is written (2 memory streams instead of 3).
template <typename T>
void lrn_forward(const T* x, T* y, T* denom, const LrnGeometry& g, cudaStream_t stream);

// The method= of convnet.ops.lrn_backward.
enum class LrnBackward : int {
  // The default: reads x and dy only; denom_j and y_j are recomputed in registers with the forward's operations in
  // the forward's order (bit-identical to what the forward wrote); y and denom may be null.  3 memory streams.
  recompute = 0,
  // Reads x, y, denom, dy (what the forward wrote).  5 memory streams.
  reuse = 1,
};
// Python passes the variant as an int (src/convnet/ops/lrn.py: 0 recompute, 1 reuse); else std::invalid_argument.
LrnBackward lrn_backward_variant(int variant);
template <typename T>
void lrn_backward(const T* x, const T* y, const T* denom, const T* dy, T* dx, const LrnGeometry& g,
                  LrnBackward variant, cudaStream_t stream);

}  // namespace convnet
