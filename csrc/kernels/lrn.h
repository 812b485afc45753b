// Cross-map local response normalisation in CHWN layout. Conventions: convnet/reference/lrn.py.
//   denom_c = k + a * sum_{j = c - size/2}^{c - size/2 + size - 1} x_j^2   (clipped to [0, C)),  y_c = x_c * denom_c^-beta
//   a = alpha (convention "sum", the paper) or alpha / size (convention "mean": Caffe, torch, cuda-convnet);
//   the Python layer passes the resolved coefficient `a`.
//   Backward (exact, reusing y and denom): dx_c = dy_c denom_c^-beta - 2 a beta x_c sum_{j: c in W(j)} dy_j y_j / denom_j
#pragma once
#include "cuda_compat.h"

namespace convnet {

struct LrnGeom {
  int C, P, N;        // channels, pixels (H*W), images
  int size;
  float a, beta, k;   // a: resolved coefficient of the sum of squares
};

LrnGeom lrn_geometry(int C, int H, int W, int N, int size, float a, float beta, float k);  // validates

// denom may be null: then only y is written (2 memory streams instead of 3).
void lrn_forward(const float* x, float* y, float* denom, const LrnGeom& g, cudaStream_t stream);

// LRN_BWD_RECOMPUTE (default): reads x and dy only; denom_j and y_j are recomputed in registers with the forward's
//   operations in the forward's order (bit-identical), y and denom may be null.  3 memory streams.
// LRN_BWD_REUSE: reads x, y, denom, dy (what the forward wrote).  5 memory streams.
enum LrnBackwardVariant : int { LRN_BWD_RECOMPUTE = 0, LRN_BWD_REUSE = 1 };
void lrn_backward(const float* x, const float* y, const float* denom, const float* dy, float* dx, const LrnGeom& g,
                  int variant, cudaStream_t stream);

}  // namespace convnet
