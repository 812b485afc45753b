// Max / average pooling in CHWN layout, forward and backward. Conventions: convnet/reference/pool.py.
//   x (C, H, W, N) -> y (C, OH, OW, N),  OH = (H + 2*ph - wh) / sh + 1 (floor),  0 <= ph <= wh / 2.
//   avg divides by the number of real (non-padding) inputs of the clipped window.
//   max backward: every input equal to its window's max gets that window's full dy (cuda-convnet's rule).
#pragma once
#include "cuda_compat.h"

namespace convnet {

enum PoolMode : int { POOL_MAX = 0, POOL_AVG = 1 };

struct PoolGeom {
  int C, H, W, N;      // input
  int OH, OW;          // output
  int wh, ww, sh, sw, ph, pw;
};

// Validates (throws std::invalid_argument) and computes OH/OW from the input and window geometry.
PoolGeom pool_geometry(int C, int H, int W, int N, int wh, int ww, int sh, int sw, int ph, int pw);

void pool_forward(const float* x, float* y, const PoolGeom& g, int mode, cudaStream_t stream);
// dx is fully written (not accumulated).  y is only read for mode == POOL_MAX (may be null for avg).
void pool_backward(const float* x, const float* y, const float* dy, float* dx, const PoolGeom& g, int mode,
                   cudaStream_t stream);

}  // namespace convnet
