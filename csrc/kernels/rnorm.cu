// Same-map response and contrast normalisation, CHWN. See rnorm.h / src/convnet/reference/rnorm.py.
//
// Every kernel here: x and the other tensors (C, H, W, N) float32, C-contiguous, images fastest. One thread per
// element (c, h, w, n): a 1-D grid of ceil(C*H*W*N / kThreads) blocks of kThreads threads, element index
// blockIdx.x * blockDim.x + threadIdx.x = ((c*H + h)*W + w)*N + n, so a warp's 32 threads read 32 consecutive
// images of one pixel (coalesced for any N). A thread sums over its clipped size x size window (or the reversed
// window in backward) in row-major order; neighbouring pixels' threads re-read the same window rows, which L1/L2
// serve. No divisibility rules (any C, H, W, N, size >= 1); the tensors have fewer than 2^31 elements (32-bit
// indices); no shared memory, no barriers (a thread past the end returns at once).
#include "cuda_compat.h"
#include "kernels/chwn_vec.h"
#include "kernels/rnorm.h"

#include <cmath>
#include <stdexcept>
#include <string>

namespace convnet {
namespace {

constexpr int kThreads = 256;

struct Elem {
  int c, h, w, n;
  int idx;  // ((c*H + h)*W + w)*N + n
};

__device__ __forceinline__ bool element(const RnormGeometry& g, Elem& e) {
  const unsigned total = static_cast<unsigned>(g.C) * g.H * g.W * g.N;
  const unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= total) return false;
  e.idx = static_cast<int>(i);
  e.n = static_cast<int>(i % g.N);
  unsigned r = i / g.N;
  e.w = static_cast<int>(r % g.W);
  r /= g.W;
  e.h = static_cast<int>(r % g.H);
  e.c = static_cast<int>(r / g.H);
  return true;
}

// The window W(p) along one axis: [p - size/2, p - size/2 + size) clipped to [0, extent).
__device__ __forceinline__ void window(int p, int size, int extent, int& lo, int& hi) {
  lo = max(0, p - size / 2);
  hi = min(extent, p - size / 2 + size);
}

// The reversed window along one axis: the q with r in W(q), [r - (size-1)/2, r + size/2] clipped.
__device__ __forceinline__ void adjoint_window(int r, int size, int extent, int& lo, int& hi) {
  lo = max(0, r - (size - 1) / 2);
  hi = min(extent, r + size / 2 + 1);
}

__device__ __forceinline__ int offset(const RnormGeometry& g, int c, int h, int w, int n) {
  return ((c * g.H + h) * g.W + w) * g.N + n;
}

__device__ __forceinline__ float window_count(const RnormGeometry& g, int h, int w) {
  int h0, h1, w0, w1;
  window(h, g.size, g.H, h0, h1);
  window(w, g.size, g.W, w0, w1);
  return static_cast<float>((h1 - h0) * (w1 - w0));
}

// m_p = x_p - the mean of x over W(p)'s real pixels (cnorm's first step).
__global__ void __launch_bounds__(kThreads) cnorm_mean_diff_kernel(const float* __restrict__ x,
                                                                   float* __restrict__ m, RnormGeometry g) {
  Elem e;
  if (!element(g, e)) return;
  int h0, h1, w0, w1;
  window(e.h, g.size, g.H, h0, h1);
  window(e.w, g.size, g.W, w0, w1);
  float s = 0.0f;
  for (int h = h0; h < h1; ++h)
    for (int w = w0; w < w1; ++w) s += x[offset(g, e.c, h, w, e.n)];
  m[e.idx] = x[e.idx] - s / static_cast<float>((h1 - h0) * (w1 - w0));
}

// denom_p = k + a * sum_{q in W(p)} src_q^2, y_p = x_p denom_p^-beta (src = x: rnorm; src = m: cnorm).
__global__ void __launch_bounds__(kThreads) rnorm_fwd_kernel(const float* __restrict__ x,
                                                             const float* __restrict__ src, float* __restrict__ y,
                                                             float* __restrict__ denom, RnormGeometry g) {
  Elem e;
  if (!element(g, e)) return;
  int h0, h1, w0, w1;
  window(e.h, g.size, g.H, h0, h1);
  window(e.w, g.size, g.W, w0, w1);
  float s = 0.0f;
  for (int h = h0; h < h1; ++h)
    for (int w = w0; w < w1; ++w) {
      const float v = src[offset(g, e.c, h, w, e.n)];
      s += v * v;
    }
  const float d = g.k + g.a * s;
  y[e.idx] = x[e.idx] * __powf(d, -g.beta);
  if (denom) denom[e.idx] = d;
}

// u_r = -2 a beta s_r sum over the reversed window of dy_p x_p denom_p^-beta / denom_p; out = u (adjoint_only)
// or dy_r denom_r^-beta + u_r (rnorm's dx).
__global__ void __launch_bounds__(kThreads) rnorm_bwd_kernel(const float* __restrict__ x,
                                                             const float* __restrict__ src,
                                                             const float* __restrict__ denom,
                                                             const float* __restrict__ dy, float* __restrict__ out,
                                                             bool adjoint_only, RnormGeometry g) {
  Elem e;
  if (!element(g, e)) return;
  int h0, h1, w0, w1;
  adjoint_window(e.h, g.size, g.H, h0, h1);
  adjoint_window(e.w, g.size, g.W, w0, w1);
  float acc = 0.0f;
  for (int h = h0; h < h1; ++h)
    for (int w = w0; w < w1; ++w) {
      const int o = offset(g, e.c, h, w, e.n);
      const float d = denom[o];
      acc += dy[o] * x[o] * __powf(d, -g.beta) / d;
    }
  const float u = -2.0f * g.a * g.beta * src[e.idx] * acc;
  out[e.idx] = adjoint_only ? u : dy[e.idx] * __powf(denom[e.idx], -g.beta) + u;
}

// cnorm's dx_r = dy_r denom_r^-beta + u_r - sum over the reversed window of u_q / |W(q)|.
__global__ void __launch_bounds__(kThreads) cnorm_bwd_mean_kernel(const float* __restrict__ dy,
                                                                  const float* __restrict__ denom,
                                                                  const float* __restrict__ u,
                                                                  float* __restrict__ dx, RnormGeometry g) {
  Elem e;
  if (!element(g, e)) return;
  int h0, h1, w0, w1;
  adjoint_window(e.h, g.size, g.H, h0, h1);
  adjoint_window(e.w, g.size, g.W, w0, w1);
  float acc = 0.0f;
  for (int h = h0; h < h1; ++h)
    for (int w = w0; w < w1; ++w) acc += u[offset(g, e.c, h, w, e.n)] / window_count(g, h, w);
  dx[e.idx] = dy[e.idx] * __powf(denom[e.idx], -g.beta) + u[e.idx] - acc;
}

dim3 grid_of(const RnormGeometry& g) {
  const long long total = 1ll * g.C * g.H * g.W * g.N;
  return dim3(static_cast<unsigned>((total + kThreads - 1) / kThreads));
}

RnormGeometry checked(const RnormGeometry& g) {
  return rnorm_geometry(g.C, g.H, g.W, g.N, g.size, g.a, g.beta, g.k);
}

void need(bool ok, const char* what) {
  if (!ok) throw std::invalid_argument(what);
}

}  // namespace

RnormGeometry rnorm_geometry(int C, int H, int W, int N, int size, float a, float beta, float k) {
  auto fail = [](const std::string& m) { throw std::invalid_argument("rnorm: " + m); };
  if (C < 1 || H < 1 || W < 1 || N < 1) fail("input shape (C, H, W, N) must be positive");
  if (size < 1) fail("size must be >= 1, got " + std::to_string(size));
  if (!(k > 0.0f) || !std::isfinite(k)) fail("k must be finite and > 0");
  if (!(a >= 0.0f) || !std::isfinite(a)) fail("alpha must be finite and >= 0");
  if (!(beta >= 0.0f) || !std::isfinite(beta)) fail("beta must be finite and >= 0");
  if (1ll * C * H * W * N >= (1ll << 31)) fail("tensor has 2^31 or more elements (32-bit indexing)");
  return RnormGeometry{C, H, W, N, size, a, beta, k};
}

void cnorm_mean_diff(const float* x, float* m, const RnormGeometry& gin, cudaStream_t stream) {
  const RnormGeometry g = checked(gin);
  need(x && m, "cnorm_mean_diff: null pointer (needs x, m)");
  launch(cnorm_mean_diff_kernel, grid_of(g), dim3(kThreads), 0, stream, x, m, g);
}

void rnorm_forward(const float* x, const float* s, float* y, float* denom, const RnormGeometry& gin,
                   cudaStream_t stream) {
  const RnormGeometry g = checked(gin);
  need(x && s && y, "rnorm_forward: null pointer (needs x, s, y)");
  launch(rnorm_fwd_kernel, grid_of(g), dim3(kThreads), 0, stream, x, s, y, denom, g);
}

void rnorm_backward(const float* x, const float* s, const float* denom, const float* dy, float* out,
                    bool adjoint_only, const RnormGeometry& gin, cudaStream_t stream) {
  const RnormGeometry g = checked(gin);
  need(x && s && denom && dy && out, "rnorm_backward: null pointer (needs x, s, denom, dy, out)");
  launch(rnorm_bwd_kernel, grid_of(g), dim3(kThreads), 0, stream, x, s, denom, dy, out, adjoint_only, g);
}

void cnorm_backward_mean(const float* dy, const float* denom, const float* u, float* dx, const RnormGeometry& gin,
                         cudaStream_t stream) {
  const RnormGeometry g = checked(gin);
  need(dy && denom && u && dx, "cnorm_backward_mean: null pointer (needs dy, denom, u, dx)");
  launch(cnorm_bwd_mean_kernel, grid_of(g), dim3(kThreads), 0, stream, dy, denom, u, dx, g);
}

}  // namespace convnet
