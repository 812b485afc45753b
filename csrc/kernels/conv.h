// Convolution in the CHWN layout (cuda-convnet's filterActs / imgActs / weightActs, plus the bias gradient).
//
// Layouts (docs/architecture.md), all C-contiguous float32:
//   x  (C, H, W, N)            images fastest
//   w  (C/groups, KH, KW, F)   filters fastest
//   y  (F, OH, OW, N)          OH = (H + 2*pad_h - KH) / stride_h + 1, same for OW
// Group g uses input channels [g*C/groups, (g+1)*C/groups) and filters [g*F/groups, (g+1)*F/groups).
// Padding is implicit (out-of-image taps read as zero; no padded copy is made).
// Accumulate semantics as in cuda-convnet: out = alpha * result + beta * out; beta == 0 never reads out
// (so out may hold garbage or NaN). Forward with bias: y = alpha * (conv(x, w) + b) + beta * y; the forward's
// optional fused ReLU then clamps that at zero (conv_epilogue.cuh).
//
// Every geometry is supported: any N, C, F (groups dividing both), KH, KW >= 1, stride >= 1 (also stride >
// filter), padding >= 0, as long as OH, OW >= 1 and every tensor has fewer than 2^31 elements (32-bit
// indexing; larger requests throw std::invalid_argument). Fast paths (16-byte loads and stores) when
// N % 4 == 0, F/groups % 4 == 0 and all pointers are 16-byte aligned; every other case takes the scalar path
// of the same kernels.
#pragma once

#include <cstdint>
#include <string>

#include "cuda_compat.h"

namespace convnet {

// The C++ twin of src/convnet/geometry.py's ConvGeometry (same field names; bindings/geometry.h reads it by name).
struct ConvGeometry {
  int C, H, W, N;      // input
  int F, KH, KW;       // filters (w is (C/groups, KH, KW, F))
  int stride_h, stride_w, pad_h, pad_w, groups;
  int OH, OW;          // derived by conv_geometry()
};

// Validates and fills OH/OW; throws std::invalid_argument naming the problem.
ConvGeometry conv_geometry(int C, int H, int W, int N, int F, int KH, int KW, int stride_h, int stride_w,
                           int pad_h, int pad_w, int groups);

// The three convolutions (kernels in conv_kernels.cuh: one implicit-GEMM template serves all three, a direct kernel
// the input gradient of few channels). Bound as convnet._emu/_cuda.ConvPass (forward, backward_data, backward_filter).
enum class ConvPass : int { forward = 0, backward_data = 1, backward_filter = 2 };
constexpr int kNumConvPasses = 3;

// The launch the dispatch table picks for this pass, in words (tile, vector path assuming aligned pointers, grid,
// splits): for tests, benchmarks and performance notes.
std::string conv_plan(ConvPass pass, const ConvGeometry& g);

// Tests and tuning only: force row `row` of the dispatch table for every later launch whose path (16-byte or
// scalar) that row has (-1: automatic), and the number of K chunks of the filter gradient (0: automatic; capped
// so that chunks stay >= 256 long). Process-global, not thread-safe against concurrent launches.
int conv_tile_count();
void conv_set_tile_override(int row, int wgrad_splits = 0);

// y = alpha * (conv(x, w) + bias) + beta * y, then with relu y = max(y, 0) in the same pass (the ReLU applies to
// the accumulated value; NaN -> 0 and -0 -> +0, bit-identical to relu_forward of the unfused result). bias may be null.
void conv_forward(const ConvGeometry& g, const float* x, const float* w, const float* bias, float* y, float alpha,
                  float beta, bool relu, cudaStream_t stream);

// dx = alpha * conv_transpose(dy, w) + beta * dx.
void conv_backward_data(const ConvGeometry& g, const float* dy, const float* w, float* dx, float alpha, float beta,
                        cudaStream_t stream);

// Floats of scratch memory conv_backward_filter needs for this geometry (0 when it needs none). Depends only on
// the geometry (not on the GPU), so results are identical on every device and on the emulator.
std::int64_t conv_backward_filter_workspace(const ConvGeometry& g);

// dw = alpha * sum over positions and images of x-patch * dy + beta * dw. workspace: at least
// conv_backward_filter_workspace(g) floats (may be null when that is 0).
void conv_backward_filter(const ConvGeometry& g, const float* x, const float* dy, float* dw, float* workspace,
                          std::int64_t workspace_floats, float alpha, float beta, cudaStream_t stream);

// Floats of scratch memory conv_backward_bias needs (0 when it needs none): the partial sums of the chunks each
// filter's row is cut into for parallelism. Depends only on (F, per_filter), like the chunking itself.
std::int64_t conv_backward_bias_workspace(int F, std::int64_t per_filter);

// The bias gradient's launch in words (path assuming an aligned dy, grid, chunks): tests, benchmarks, notes.
std::string conv_bias_plan(int F, std::int64_t per_filter);

// db[f] = alpha * sum_{i < per_filter} dy[f * per_filter + i] + beta * db[f]  (per_filter = OH*OW*N), summed in a
// fixed order (chunks of each row in parallel, then the chunks in order: no atomics). workspace: at least
// conv_backward_bias_workspace(F, per_filter) floats (may be null when that is 0).
void conv_backward_bias(const float* dy, float* db, float* workspace, std::int64_t workspace_floats, int F,
                        std::int64_t per_filter, float alpha, float beta, cudaStream_t stream);

}  // namespace convnet
