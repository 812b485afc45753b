// Max / average pooling in CHWN layout, forward and backward. Conventions: src/convnet/reference/pool.py.
//   x (C, H, W, N) -> y (C, OH, OW, N),  OH = (H + 2*pad_h - window_h) / stride_h + 1 (floor, geometry.h),
//   0 <= pad_h <= window_h / 2 (the same along the width).
//   avg divides by the number of real (non-padding) inputs of the clipped window.
//   max backward: every input equal to its window's max gets that window's full dy (cuda-convnet's rule).
#pragma once
#include "cuda_compat.h"

namespace convnet {

enum class PoolMode : int { max = 0, avg = 1 };
// Python passes the mode as an int (src/convnet/ops/pool.py: 0 max, 1 avg); anything else: std::invalid_argument.
PoolMode pool_mode(int mode);

// The C++ twin of src/convnet/geometry.py's PoolGeometry (same field names; bindings/geometry.h reads it by name).
struct PoolGeometry {
  int C, H, W, N;  // input (C, H, W, N)
  int OH, OW;      // output (C, OH, OW, N), derived by pool_geometry()
  int window_h, window_w, stride_h, stride_w, pad_h, pad_w;
};

// Validates (throws std::invalid_argument) and computes OH/OW from the input and window geometry.
PoolGeometry pool_geometry(int C, int H, int W, int N, int window_h, int window_w, int stride_h, int stride_w,
                           int pad_h, int pad_w);

// T: the storage type, float or bf16 (cuda_compat.h); math in float, each output rounded once to T. Instantiated
// for both.
template <typename T>
void pool_forward(const T* x, T* y, const PoolGeometry& g, PoolMode mode, cudaStream_t stream);
// dx is fully written (not accumulated).  y is only read for PoolMode::max (may be null for avg).
template <typename T>
void pool_backward(const T* x, const T* y, const T* dy, T* dx, const PoolGeometry& g, PoolMode mode,
                   cudaStream_t stream);

}  // namespace convnet
