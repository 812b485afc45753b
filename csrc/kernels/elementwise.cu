// Element-wise kernels: ReLU forward/backward and inverted dropout (Philox4x32-10 mask, regenerated in backward).
//
// Layout: any contiguous float32 tensor viewed as n floats (layout-agnostic).
// Thread mapping: 1-D grid-stride loop. The vector path gives each thread one float4 (16-byte loads and stores,
// used when every pointer is 16-byte aligned); the scalar path one float. Dropout threads own a group of four
// consecutive elements of the mask's stream, because one Philox call yields four 32-bit numbers: stream element j
// uses word j % 4 of philox(counter = (j / 4, offset), key = seed), and local element i is stream element start + i
// (a grid-stride loop over groups, so the launch needs at most (n + 3) / 4 threads' worth of blocks).
// Requirements: none on n (the ragged tail is handled); in-place (x == y) is allowed, so no __restrict__.
#include "cuda_compat.h"
#include "kernels/chwn_vec.h"
#include "kernels/elementwise.h"
#include "kernels/philox.h"

namespace convnet {
namespace {

constexpr int kThreads = 256;
// Enough blocks to fill any current GPU several times over; more just adds scheduling overhead.
constexpr std::int64_t kMaxBlocks = 8192;

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
// The n elements are elements [start, start + n) of the mask's stream: local element i draws word (start + i) % 4
// of philox((start + i) / 4, offset), so a tensor that is a slice of a larger one (a tower's units of the one-device
// layer) can draw exactly the slice of the larger tensor's mask. Thread g owns stream group first + g, i.e. the
// local elements 4 * (first + g) - start + 0..3 that fall inside [0, n).
__device__ __forceinline__ Philox4 dropout_bits(std::uint64_t group, std::uint64_t seed, std::uint64_t offset) {
  return philox4x32_10(unsigned(group), unsigned(group >> 32), unsigned(offset), unsigned(offset >> 32),
                       unsigned(seed), unsigned(seed >> 32));
}

__device__ __forceinline__ float dropout_one(float v, unsigned bits, std::uint64_t threshold, float scale) {
  return std::uint64_t(bits) < threshold ? v * scale : 0.f;
}

// kVec4: every pointer is 16-byte aligned and start % 4 == 0, so a whole group is one float4.
template <bool kVec4>
__global__ void __launch_bounds__(kThreads) dropout_kernel(const float* x, float* y, std::int64_t n,
                                                           std::uint64_t threshold, float scale,
                                                           std::uint64_t seed, std::uint64_t offset,
                                                           std::uint64_t start) {
  const std::uint64_t first = start / 4;
  const std::int64_t groups = std::int64_t((start + std::uint64_t(n) + 3) / 4 - first);
  const std::int64_t stride = std::int64_t(gridDim.x) * blockDim.x;
  for (std::int64_t g = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; g < groups; g += stride) {
    const Philox4 r = dropout_bits(first + std::uint64_t(g), seed, offset);
    const std::int64_t base = 4 * g - std::int64_t(start % 4);  // local index of the group's word 0
    if (kVec4 && base + 4 <= n) {
      float4 v = reinterpret_cast<const float4*>(x)[g];
      v.x = dropout_one(v.x, r.x, threshold, scale);
      v.y = dropout_one(v.y, r.y, threshold, scale);
      v.z = dropout_one(v.z, r.z, threshold, scale);
      v.w = dropout_one(v.w, r.w, threshold, scale);
      reinterpret_cast<float4*>(y)[g] = v;
    } else {
      const unsigned bits[4] = {r.x, r.y, r.z, r.w};
      for (int k = 0; k < 4; ++k)
        if (base + k >= 0 && base + k < n) y[base + k] = dropout_one(x[base + k], bits[k], threshold, scale);
    }
  }
}

__global__ void __launch_bounds__(kThreads) dropout_mask_kernel(std::uint8_t* mask, std::int64_t n,
                                                                std::uint64_t threshold, std::uint64_t seed,
                                                                std::uint64_t offset, std::uint64_t start) {
  const std::uint64_t first = start / 4;
  const std::int64_t groups = std::int64_t((start + std::uint64_t(n) + 3) / 4 - first);
  const std::int64_t stride = std::int64_t(gridDim.x) * blockDim.x;
  for (std::int64_t g = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; g < groups; g += stride) {
    const Philox4 r = dropout_bits(first + std::uint64_t(g), seed, offset);
    const unsigned bits[4] = {r.x, r.y, r.z, r.w};
    const std::int64_t base = 4 * g - std::int64_t(start % 4);
    for (int k = 0; k < 4; ++k)
      if (base + k >= 0 && base + k < n) mask[base + k] = std::uint64_t(bits[k]) < threshold ? 1 : 0;
  }
}

void check_dropout(std::int64_t n, std::uint64_t keep_threshold, std::uint64_t start) {
  CONVNET_REQUIRE(keep_threshold <= (std::uint64_t(1) << 32), "keep threshold must be at most 2^32");
  CONVNET_REQUIRE(start <= ~std::uint64_t(0) - std::uint64_t(n), "start + n must be below 2^64");
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

void dropout_apply(const float* x, float* y, std::int64_t n, std::uint64_t keep_threshold, float scale,
                   std::uint64_t seed, std::uint64_t offset, std::uint64_t start, cudaStream_t stream) {
  check_common(n, x, y);
  check_dropout(n, keep_threshold, start);
  if (n == 0) return;
  const unsigned grid = grid_for((n + 3) / 4, kThreads, kMaxBlocks);
  if (aligned16(x) && aligned16(y) && start % 4 == 0)
    launch(dropout_kernel<true>, dim3(grid), dim3(kThreads), 0, stream, x, y, n, keep_threshold, scale, seed, offset,
           start);
  else
    launch(dropout_kernel<false>, dim3(grid), dim3(kThreads), 0, stream, x, y, n, keep_threshold, scale, seed, offset,
           start);
}

void dropout_mask(std::uint8_t* mask, std::int64_t n, std::uint64_t keep_threshold, std::uint64_t seed,
                  std::uint64_t offset, std::uint64_t start, cudaStream_t stream) {
  check_common(n, mask, mask);
  check_dropout(n, keep_threshold, start);
  if (n == 0) return;
  launch(dropout_mask_kernel, dim3(grid_for((n + 3) / 4, kThreads, kMaxBlocks)), dim3(kThreads), 0, stream, mask,
         n, keep_threshold, seed, offset, start);
}

}  // namespace convnet
