// Element-wise kernels: ReLU forward/backward and inverted dropout (Philox4x32-10 mask, regenerated in backward).
//
// Storage: float32 or bfloat16 (template parameter T of every kernel; math in float, one rounding to T on store).
// Layout: ReLU: any contiguous tensor viewed as n elements (layout-agnostic). Dropout: the tensor viewed as
// rows x cols elements, row-major: any tensor is rows = 1, cols = n; a data-parallel shard of a CHWN (or features
// x N) tensor is rows = C*H*W, cols = its N images, images [first, first + cols) of a batch of `batch` images.
// Thread mapping: 1-D grid-stride loop. The vector path gives each thread 4 elements (one float4 or 4 bf16: 16- or
// 8-byte loads and stores, used when every pointer is aligned to that size); the scalar path one element. Dropout
// threads own a group of four consecutive elements of the mask's stream, because one Philox call yields four 32-bit
// numbers: stream element j uses word j % 4 of philox(counter = (j / 4, offset), key = seed), and local element
// (r, c) is stream element start + r * batch + first + c (start + i for rows = 1), what it is in the whole batch's
// mask; a thread's grid-stride loop runs over (row, group of that row) pairs, at most (cols + 6) / 4 groups per row.
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
// T: the storage type (float or bf16; math in float, one rounding on store, which is exact for ReLU).
template <typename T, bool kVec4>
__global__ void __launch_bounds__(kThreads) relu_forward_kernel(const T* x, T* y, std::int64_t n) {
  const std::int64_t stride = std::int64_t(gridDim.x) * blockDim.x;
  std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (kVec4) {
    const std::int64_t n4 = n / 4;
    for (; i < n4; i += stride) {
      VecF<4> v = vload<4>(x + 4 * i);
#pragma unroll
      for (int k = 0; k < 4; ++k) v.v[k] = relu(v.v[k]);
      vstore<4>(y + 4 * i, v);
    }
    // The last n % 4 elements: one per thread of the first block.
    const std::int64_t tail = n4 * 4 + std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    if (blockIdx.x == 0 && tail < n) y[tail] = from_float<T>(relu(to_float(x[tail])));
  } else {
    for (; i < n; i += stride) y[i] = from_float<T>(relu(to_float(x[i])));
  }
}

template <typename T, bool kVec4>
__global__ void __launch_bounds__(kThreads) relu_backward_kernel(const T* y, const T* dy, T* dx, std::int64_t n) {
  const std::int64_t stride = std::int64_t(gridDim.x) * blockDim.x;
  std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (kVec4) {
    const std::int64_t n4 = n / 4;
    for (; i < n4; i += stride) {
      const VecF<4> a = vload<4>(y + 4 * i);
      VecF<4> g = vload<4>(dy + 4 * i);
#pragma unroll
      for (int k = 0; k < 4; ++k) g.v[k] = relu_grad(a.v[k], g.v[k]);
      vstore<4>(dx + 4 * i, g);
    }
    const std::int64_t tail = n4 * 4 + std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    if (blockIdx.x == 0 && tail < n) dx[tail] = from_float<T>(relu_grad(to_float(y[tail]), to_float(dy[tail])));
  } else {
    for (; i < n; i += stride) dx[i] = from_float<T>(relu_grad(to_float(y[i]), to_float(dy[i])));
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

// kVec4: every pointer is aligned for 4 elements (aligned_vec4) and every row starts a group (s(r) % 4 == 0) at a
// multiple of 4 elements, so a whole group is one vector access. T: the storage type (float or bf16; the product
// x * scale is computed in float and rounded once on store).
template <typename T, bool kVec4>
__global__ void __launch_bounds__(kThreads) dropout_kernel(const T* x, T* y, DropoutRows d, std::uint64_t threshold,
                                                           float scale, std::uint64_t seed, std::uint64_t offset) {
  for (PairLoop p(std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x, std::int64_t(gridDim.x) * blockDim.x,
                  d.groups); p.row < d.rows; p.next()) {
    const std::uint64_t s = d.start + std::uint64_t(p.row) * d.batch + d.first;  // stream element of (row, 0)
    const std::int64_t base = 4 * p.g - std::int64_t(s % 4);  // column of the group's word 0
    if (base >= d.cols) continue;
    const Philox4 r = dropout_bits(s / 4 + std::uint64_t(p.g), seed, offset);
    const std::int64_t at = p.row * d.cols + base;  // local index of the group's word 0
    if (kVec4 && base + 4 <= d.cols) {
      VecF<4> v = vload<4>(x + at);
      v.v[0] = dropout_one(v.v[0], r.x, threshold, scale);
      v.v[1] = dropout_one(v.v[1], r.y, threshold, scale);
      v.v[2] = dropout_one(v.v[2], r.z, threshold, scale);
      v.v[3] = dropout_one(v.v[3], r.w, threshold, scale);
      vstore<4>(y + at, v);
    } else {
      const unsigned bits[4] = {r.x, r.y, r.z, r.w};
      for (int k = 0; k < 4; ++k)
        if (base + k >= 0 && base + k < d.cols)
          y[at + k] = from_float<T>(dropout_one(to_float(x[at + k]), bits[k], threshold, scale));
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

template <typename T>
void relu_forward(const T* x, T* y, std::int64_t n, cudaStream_t stream) {
  check_common(n, x, y);
  if (n == 0) return;
  if (aligned_vec4(x) && aligned_vec4(y))
    launch(relu_forward_kernel<T, true>, dim3(grid_for((n + 3) / 4, kThreads, kMaxBlocks)), dim3(kThreads), 0,
           stream, x, y, n);
  else
    launch(relu_forward_kernel<T, false>, dim3(grid_for(n, kThreads, kMaxBlocks)), dim3(kThreads), 0, stream, x, y,
           n);
}

template <typename T>
void relu_backward(const T* y, const T* dy, T* dx, std::int64_t n, cudaStream_t stream) {
  check_common(n, y, dy);
  check_common(n, dx, dx);
  if (n == 0) return;
  if (aligned_vec4(y) && aligned_vec4(dy) && aligned_vec4(dx))
    launch(relu_backward_kernel<T, true>, dim3(grid_for((n + 3) / 4, kThreads, kMaxBlocks)), dim3(kThreads), 0,
           stream, y, dy, dx, n);
  else
    launch(relu_backward_kernel<T, false>, dim3(grid_for(n, kThreads, kMaxBlocks)), dim3(kThreads), 0, stream, y,
           dy, dx, n);
}

template <typename T>
void dropout_apply(const T* x, T* y, std::int64_t rows, std::int64_t cols, std::uint64_t batch, std::uint64_t first,
                   std::uint64_t keep_threshold, float scale, std::uint64_t seed, std::uint64_t offset,
                   std::uint64_t start, cudaStream_t stream) {
  const DropoutRows d = dropout_rows(rows, cols, batch, first, keep_threshold, start);
  check_common(rows * cols, x, y);
  if (rows * cols == 0) return;
  const unsigned grid = grid_for(d.rows * d.groups, kThreads, kMaxBlocks);
  const bool rows_start_groups = (start + first) % 4 == 0 && (rows == 1 || (batch % 4 == 0 && cols % 4 == 0));
  if (aligned_vec4(x) && aligned_vec4(y) && rows_start_groups)
    launch(dropout_kernel<T, true>, dim3(grid), dim3(kThreads), 0, stream, x, y, d, keep_threshold, scale, seed,
           offset);
  else
    launch(dropout_kernel<T, false>, dim3(grid), dim3(kThreads), 0, stream, x, y, d, keep_threshold, scale, seed,
           offset);
}

#define CONVNET_ELEMENTWISE_INSTANTIATE(T)                                                                          \
  template void relu_forward<T>(const T*, T*, std::int64_t, cudaStream_t);                                          \
  template void relu_backward<T>(const T*, const T*, T*, std::int64_t, cudaStream_t);                               \
  template void dropout_apply<T>(const T*, T*, std::int64_t, std::int64_t, std::uint64_t, std::uint64_t,            \
                                 std::uint64_t, float, std::uint64_t, std::uint64_t, std::uint64_t, cudaStream_t);
CONVNET_ELEMENTWISE_INSTANTIATE(float)
CONVNET_ELEMENTWISE_INSTANTIATE(bf16)
#undef CONVNET_ELEMENTWISE_INSTANTIATE

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
