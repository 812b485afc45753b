// Element-wise kernels: ReLU forward/backward and inverted dropout (Philox4x32-10 mask, regenerated in backward).
//
// Layout: ReLU: any contiguous float32 tensor viewed as n floats (layout-agnostic). Dropout: the tensor viewed as
// rows x cols floats, row-major: any tensor is rows = 1, cols = n; a data-parallel shard of a CHWN (or features x
// N) tensor is rows = C*H*W, cols = its N images, images [first, first + cols) of a batch of `batch` images.
// Thread mapping: 1-D grid-stride loop. The vector path gives each thread one float4 (16-byte loads and stores,
// used when every pointer is 16-byte aligned); the scalar path one float. Dropout threads own a group of four
// consecutive elements of the mask's stream, because one Philox call yields four 32-bit numbers: stream element j
// uses word j % 4 of philox(counter = (j / 4, offset), key = seed), and local element (r, c) is stream element
// start + r * batch + first + c (start + i for rows = 1), what it is in the whole batch's mask; a thread's
// grid-stride loop runs over (row, group of that row) pairs, at most (cols + 6) / 4 groups per row.
// Requirements: none on n (the ragged tail is handled); in-place (x == y) is allowed, so no __restrict__.
#include "cuda_compat.h"
#include "kernels/chwn_vec.h"
#include "kernels/elementwise.h"
#include "kernels/philox.h"

#include <limits>

namespace convnet {
namespace {

constexpr int kThreads = 256;
// Enough blocks to fill any current GPU several times over; more just adds scheduling overhead.
constexpr std::int64_t kMaxBlocks = 8192;
constexpr std::int64_t kInt64Max = std::numeric_limits<std::int64_t>::max();

__device__ __forceinline__ float relu(float v) { return v > 0.f ? v : 0.f; }  // NaN -> 0, -0 -> +0
__device__ __forceinline__ float relu_grad(float y, float dy) { return y > 0.f ? dy : 0.f; }

// ---- ReLU --------------------------------------------------------------------------------------------------
template <bool kVec4>
__global__ void __launch_bounds__(kThreads) relu_forward_kernel(const float* x, float* y, std::int64_t n) {
  const std::int64_t stride = std::int64_t(gridDim.x) * blockDim.x;
  std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (kVec4) {
    const std::int64_t n4 = n / 4;
    for (; i < n4; i += stride) {
      float4 v = reinterpret_cast<const float4*>(x)[i];
      v.x = relu(v.x), v.y = relu(v.y), v.z = relu(v.z), v.w = relu(v.w);
      reinterpret_cast<float4*>(y)[i] = v;
    }
    // The last n % 4 elements: one per thread of the first block.
    const std::int64_t tail = n4 * 4 + std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    if (blockIdx.x == 0 && tail < n) y[tail] = relu(x[tail]);
  } else {
    for (; i < n; i += stride) y[i] = relu(x[i]);
  }
}

template <bool kVec4>
__global__ void __launch_bounds__(kThreads) relu_backward_kernel(const float* y, const float* dy, float* dx,
                                                                 std::int64_t n) {
  const std::int64_t stride = std::int64_t(gridDim.x) * blockDim.x;
  std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (kVec4) {
    const std::int64_t n4 = n / 4;
    for (; i < n4; i += stride) {
      const float4 a = reinterpret_cast<const float4*>(y)[i];
      float4 g = reinterpret_cast<const float4*>(dy)[i];
      g.x = relu_grad(a.x, g.x), g.y = relu_grad(a.y, g.y), g.z = relu_grad(a.z, g.z), g.w = relu_grad(a.w, g.w);
      reinterpret_cast<float4*>(dx)[i] = g;
    }
    const std::int64_t tail = n4 * 4 + std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    if (blockIdx.x == 0 && tail < n) dx[tail] = relu_grad(y[tail], dy[tail]);
  } else {
    for (; i < n; i += stride) dx[i] = relu_grad(y[i], dy[i]);
  }
}

// ---- Dropout ------------------------------------------------------------------------------------------------
// Row r of the rows x cols tensor is stream elements s(r) + [0, cols), s(r) = start + r * batch + first: a slice of
// a larger tensor (a tower's units of the one-device layer: start) or a rank's images of a batch (batch, first)
// draws exactly its part of the larger tensor's mask. A (row, g) pair owns stream group s(r) / 4 + g, i.e. the local
// columns 4 * g - s(r) % 4 + 0..3 that fall inside [0, cols); `groups` pairs per row cover the longest row (a row
// whose s(r) % 4 is smaller may need one group less: that pair does nothing).
struct DropoutRows {
  std::int64_t rows, cols, groups;
  std::uint64_t start, batch, first;
};

__device__ __forceinline__ Philox4 dropout_bits(std::uint64_t group, std::uint64_t seed, std::uint64_t offset) {
  return philox4x32_10(unsigned(group), unsigned(group >> 32), unsigned(offset), unsigned(offset >> 32),
                       unsigned(seed), unsigned(seed >> 32));
}

__device__ __forceinline__ float dropout_one(float v, unsigned bits, std::uint64_t threshold, float scale) {
  return std::uint64_t(bits) < threshold ? v * scale : 0.f;
}

// A thread's grid-stride loop over the rows * groups (row, group) pairs, stepped without a 64-bit division per step.
struct PairLoop {
  std::int64_t row, g, row_step, g_step, groups;
  __device__ PairLoop(std::int64_t thread, std::int64_t stride, std::int64_t groups_)
      : row(thread / groups_), g(thread % groups_), row_step(stride / groups_), g_step(stride % groups_),
        groups(groups_) {}
  __device__ void next() {
    row += row_step, g += g_step;
    if (g >= groups) g -= groups, ++row;
  }
};

// kVec4: every pointer is 16-byte aligned and every row starts a group (s(r) % 4 == 0) at a multiple of 4 floats,
// so a whole group is one float4.
template <bool kVec4>
__global__ void __launch_bounds__(kThreads) dropout_kernel(const float* x, float* y, DropoutRows d,
                                                           std::uint64_t threshold, float scale,
                                                           std::uint64_t seed, std::uint64_t offset) {
  for (PairLoop p(std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x, std::int64_t(gridDim.x) * blockDim.x,
                  d.groups); p.row < d.rows; p.next()) {
    const std::uint64_t s = d.start + std::uint64_t(p.row) * d.batch + d.first;  // stream element of (row, 0)
    const std::int64_t base = 4 * p.g - std::int64_t(s % 4);  // column of the group's word 0
    if (base >= d.cols) continue;
    const Philox4 r = dropout_bits(s / 4 + std::uint64_t(p.g), seed, offset);
    const std::int64_t at = p.row * d.cols + base;  // local index of the group's word 0
    if (kVec4 && base + 4 <= d.cols) {
      float4 v = reinterpret_cast<const float4*>(x)[at / 4];
      v.x = dropout_one(v.x, r.x, threshold, scale);
      v.y = dropout_one(v.y, r.y, threshold, scale);
      v.z = dropout_one(v.z, r.z, threshold, scale);
      v.w = dropout_one(v.w, r.w, threshold, scale);
      reinterpret_cast<float4*>(y)[at / 4] = v;
    } else {
      const unsigned bits[4] = {r.x, r.y, r.z, r.w};
      for (int k = 0; k < 4; ++k)
        if (base + k >= 0 && base + k < d.cols) y[at + k] = dropout_one(x[at + k], bits[k], threshold, scale);
    }
  }
}

__global__ void __launch_bounds__(kThreads) dropout_mask_kernel(std::uint8_t* mask, DropoutRows d,
                                                                std::uint64_t threshold, std::uint64_t seed,
                                                                std::uint64_t offset) {
  for (PairLoop p(std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x, std::int64_t(gridDim.x) * blockDim.x,
                  d.groups); p.row < d.rows; p.next()) {
    const std::uint64_t s = d.start + std::uint64_t(p.row) * d.batch + d.first;
    const std::int64_t base = 4 * p.g - std::int64_t(s % 4);
    if (base >= d.cols) continue;
    const Philox4 r = dropout_bits(s / 4 + std::uint64_t(p.g), seed, offset);
    const unsigned bits[4] = {r.x, r.y, r.z, r.w};
    const std::int64_t at = p.row * d.cols + base;
    for (int k = 0; k < 4; ++k)
      if (base + k >= 0 && base + k < d.cols) mask[at + k] = std::uint64_t(bits[k]) < threshold ? 1 : 0;
  }
}

// The checked rows x cols dropout problem, with its groups per row: a run of cols stream elements from s touches
// ceil((s % 4 + cols) / 4) groups; every row has the same s % 4 when there is one row or batch % 4 == 0, else take
// the most (s % 4 = 3).
DropoutRows dropout_rows(std::int64_t rows, std::int64_t cols, std::uint64_t batch, std::uint64_t first,
                         std::uint64_t keep_threshold, std::uint64_t start) {
  CONVNET_REQUIRE(rows >= 0 && cols >= 0, "rows and cols must be non-negative");
  CONVNET_REQUIRE(cols == 0 || rows <= kInt64Max / cols, "rows * cols must be below 2^63");
  CONVNET_REQUIRE(keep_threshold <= (std::uint64_t(1) << 32), "keep threshold must be at most 2^32");
  CONVNET_REQUIRE(first <= batch && std::uint64_t(cols) <= batch - first, "first + cols must be at most batch");
  CONVNET_REQUIRE(rows == 0 || batch <= (~std::uint64_t(0) - start) / std::uint64_t(rows),
                  "start + rows * batch must be below 2^64");
  const std::int64_t skew = std::int64_t(rows <= 1 || batch % 4 == 0 ? (start + first) % 4 : 3);
  const std::int64_t groups = (skew + cols + 3) / 4;
  CONVNET_REQUIRE(groups == 0 || rows <= kInt64Max / groups, "too many Philox groups");
  return DropoutRows{rows, cols, groups, start, batch, first};
}

void check_common(std::int64_t n, const void* a, const void* b) {
  CONVNET_REQUIRE(n >= 0, "element count must be non-negative");
  CONVNET_REQUIRE(n == 0 || (a != nullptr && b != nullptr), "null pointer");
}

}  // namespace

void relu_forward(const float* x, float* y, std::int64_t n, cudaStream_t stream) {
  check_common(n, x, y);
  if (n == 0) return;
  if (aligned16(x) && aligned16(y))
    launch(relu_forward_kernel<true>, dim3(grid_for((n + 3) / 4, kThreads, kMaxBlocks)), dim3(kThreads), 0, stream,
           x, y, n);
  else
    launch(relu_forward_kernel<false>, dim3(grid_for(n, kThreads, kMaxBlocks)), dim3(kThreads), 0, stream, x, y, n);
}

void relu_backward(const float* y, const float* dy, float* dx, std::int64_t n, cudaStream_t stream) {
  check_common(n, y, dy);
  check_common(n, dx, dx);
  if (n == 0) return;
  if (aligned16(y) && aligned16(dy) && aligned16(dx))
    launch(relu_backward_kernel<true>, dim3(grid_for((n + 3) / 4, kThreads, kMaxBlocks)), dim3(kThreads), 0, stream,
           y, dy, dx, n);
  else
    launch(relu_backward_kernel<false>, dim3(grid_for(n, kThreads, kMaxBlocks)), dim3(kThreads), 0, stream, y, dy,
           dx, n);
}

void dropout_apply(const float* x, float* y, std::int64_t rows, std::int64_t cols, std::uint64_t batch,
                   std::uint64_t first, std::uint64_t keep_threshold, float scale, std::uint64_t seed,
                   std::uint64_t offset, std::uint64_t start, cudaStream_t stream) {
  const DropoutRows d = dropout_rows(rows, cols, batch, first, keep_threshold, start);
  check_common(rows * cols, x, y);
  if (rows * cols == 0) return;
  const unsigned grid = grid_for(d.rows * d.groups, kThreads, kMaxBlocks);
  const bool rows_start_groups = (start + first) % 4 == 0 && (rows == 1 || (batch % 4 == 0 && cols % 4 == 0));
  if (aligned16(x) && aligned16(y) && rows_start_groups)
    launch(dropout_kernel<true>, dim3(grid), dim3(kThreads), 0, stream, x, y, d, keep_threshold, scale, seed, offset);
  else
    launch(dropout_kernel<false>, dim3(grid), dim3(kThreads), 0, stream, x, y, d, keep_threshold, scale, seed, offset);
}

void dropout_mask(std::uint8_t* mask, std::int64_t rows, std::int64_t cols, std::uint64_t batch, std::uint64_t first,
                  std::uint64_t keep_threshold, std::uint64_t seed, std::uint64_t offset, std::uint64_t start,
                  cudaStream_t stream) {
  const DropoutRows d = dropout_rows(rows, cols, batch, first, keep_threshold, start);
  check_common(rows * cols, mask, mask);
  if (rows * cols == 0) return;
  launch(dropout_mask_kernel, dim3(grid_for(d.rows * d.groups, kThreads, kMaxBlocks)), dim3(kThreads), 0, stream,
         mask, d, keep_threshold, seed, offset);
}

}  // namespace convnet
