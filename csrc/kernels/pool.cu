// Max / average pooling, CHWN (images fastest). See pool.h and src/convnet/reference/pool.py for the conventions.
// Storage: T = float or bf16 (every kernel is a template over it): loads convert to float, the window's max/sum and
// the backward's accumulation run in float, and each output is rounded once to T on store.
//
// Forward: one thread per (c, oh, ow, VEC images); a warp covers 32*VEC consecutive images of one output pixel, so
// every load/store is a coalesced row of 32*VEC elements (VEC=4: one 16-byte float4 or 8-byte bf16x4 per thread).
// Overlapping windows re-read inputs through L1/L2 (each input is fetched from DRAM about once; consecutive blocks
// walk neighbouring pixels).
// Common windows (3x3, 2x2) are template-unrolled so all window loads are in flight before the first max.
// Max 3x3/2 (AlexNet) takes a strip kernel that also reuses the shared window rows in registers (see below).
//
// Backward is a gather (no atomics, deterministic): one thread per input (c, h, w, VEC images) visits the output
// windows that cover it, in the same order as the reference's accumulation (oh, ow descending), and for max adds
// dy[o] where x == y[o] (recomputed, nothing stored by the forward pass).
#include "cuda_compat.h"
#include "kernels/chwn_vec.h"
#include "kernels/geometry.h"
#include "kernels/pool.h"

#include <stdexcept>
#include <string>

namespace convnet {
namespace {

constexpr int kThreads = 256;
constexpr long long kMaxBlocks = 1 << 20;  // grid-stride loops cover the rest

// max that propagates NaN (as NumPy's maximum, the reference, does): a NaN in a window makes its output NaN.
__device__ __forceinline__ float max_nan(float acc, float v) { return (v > acc || v != v) ? v : acc; }

template <typename T, PoolMode MODE, int VEC, int WH, int WW>
__global__ void pool_fwd_kernel(const T* __restrict__ x, T* __restrict__ y, PoolGeometry g) {
  const unsigned NV = static_cast<unsigned>(g.N) / VEC;
  const unsigned total = static_cast<unsigned>(g.C) * g.OH * g.OW * NV;
  const int wh = WH ? WH : g.window_h;
  const int ww = WW ? WW : g.window_w;
  for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += gridDim.x * blockDim.x) {
    const unsigned nv = i % NV;
    unsigned t = i / NV;
    const int ow = t % g.OW; t /= g.OW;
    const int oh = t % g.OH;
    const unsigned c = t / g.OH;
    const int h0 = oh * g.stride_h - g.pad_h, w0 = ow * g.stride_w - g.pad_w;
    const T* xc = x + static_cast<size_t>(c) * g.H * g.W * g.N + nv * VEC;
    VecF<VEC> acc = vfill<VEC>(MODE == PoolMode::max ? -INFINITY : 0.0f);
#pragma unroll
    for (int dh = 0; dh < wh; ++dh) {
      const int h = h0 + dh;
      if (h < 0 || h >= g.H) continue;
#pragma unroll
      for (int dw = 0; dw < ww; ++dw) {
        const int w = w0 + dw;
        if (w < 0 || w >= g.W) continue;
        const VecF<VEC> v = vload<VEC>(xc + (static_cast<size_t>(h) * g.W + w) * g.N);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          if (MODE == PoolMode::max) acc.v[k] = max_nan(acc.v[k], v.v[k]);
          else acc.v[k] += v.v[k];
        }
      }
    }
    if (MODE == PoolMode::avg) {
      const float cnt = static_cast<float>((min(h0 + wh, g.H) - max(h0, 0)) * (min(w0 + ww, g.W) - max(w0, 0)));
#pragma unroll
      for (int k = 0; k < VEC; ++k) acc.v[k] = acc.v[k] / cnt;
    }
    vstore<VEC>(y + ((static_cast<size_t>(c) * g.OH + oh) * g.OW + ow) * g.N + nv * VEC, acc);
  }
}

// Max pooling with overlapping rows (3x3/2, AlexNet): a thread walks a strip of R = `rows` output rows of one output
// column, keeping the window's per-row maxima in registers, so the rows shared by vertically adjacent windows are
// loaded once: (R*SH + WH - SH) * WW loads per R outputs instead of R*WH*WW (3x3/2, R=4: 27 instead of 36; the
// horizontal overlap is served by L1, since a block holds 8 adjacent output columns of the same rows).
template <typename T, int VEC, int WH, int WW, int SH, int SW>
__global__ void pool_fwd_max_strip_kernel(const T* __restrict__ x, T* __restrict__ y, PoolGeometry g, int rows) {
  static_assert(SH < WH, "the strip kernel is for overlapping windows");
  const unsigned NV = static_cast<unsigned>(g.N) / VEC;
  const unsigned strips = (g.OH + rows - 1) / rows;
  const unsigned total = static_cast<unsigned>(g.C) * strips * g.OW * NV;
  for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += gridDim.x * blockDim.x) {
    const unsigned nv = i % NV;
    unsigned t = i / NV;
    const int ow = t % g.OW; t /= g.OW;
    const int strip = t % strips;
    const unsigned c = t / strips;
    const int oh0 = strip * rows, oh1 = min(g.OH, oh0 + rows);
    const int w0 = ow * SW - g.pad_w;
    const T* xc = x + static_cast<size_t>(c) * g.H * g.W * g.N + nv * VEC;
    T* yc = y + (static_cast<size_t>(c) * g.OH * g.OW + ow) * g.N + nv * VEC;
    auto rowmax = [&](int h) {
      VecF<VEC> acc = vfill<VEC>(-INFINITY);
      if (h >= 0 && h < g.H) {
#pragma unroll
        for (int dw = 0; dw < WW; ++dw) {
          const int w = w0 + dw;
          if (w < 0 || w >= g.W) continue;
          const VecF<VEC> v = vload<VEC>(xc + (static_cast<size_t>(h) * g.W + w) * g.N);
#pragma unroll
          for (int k = 0; k < VEC; ++k) acc.v[k] = max_nan(acc.v[k], v.v[k]);
        }
      }
      return acc;
    };
    int h0 = oh0 * SH - g.pad_h;
    VecF<VEC> r[WH];
#pragma unroll
    for (int j = 0; j < WH; ++j) r[j] = rowmax(h0 + j);
    for (int oh = oh0;;) {
      VecF<VEC> out = r[0];
#pragma unroll
      for (int j = 1; j < WH; ++j)
#pragma unroll
        for (int k = 0; k < VEC; ++k) out.v[k] = max_nan(out.v[k], r[j].v[k]);
      vstore<VEC>(yc + static_cast<size_t>(oh) * g.OW * g.N, out);
      if (++oh >= oh1) break;
      h0 += SH;
#pragma unroll
      for (int j = 0; j < WH - SH; ++j) r[j] = r[j + SH];
#pragma unroll
      for (int j = WH - SH; j < WH; ++j) r[j] = rowmax(h0 + j);
    }
  }
}

template <typename T, PoolMode MODE, int VEC>
__global__ void pool_bwd_kernel(const T* __restrict__ x, const T* __restrict__ y, const T* __restrict__ dy,
                                T* __restrict__ dx, PoolGeometry g) {
  const unsigned NV = static_cast<unsigned>(g.N) / VEC;
  const unsigned total = static_cast<unsigned>(g.C) * g.H * g.W * NV;
  for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += gridDim.x * blockDim.x) {
    const unsigned nv = i % NV;
    unsigned t = i / NV;
    const int w = t % g.W; t /= g.W;
    const int h = t % g.H;
    const unsigned c = t / g.H;
    // windows covering h: oh*sh - ph <= h <= oh*sh - ph + wh - 1
    const int hp = h + g.pad_h, wp = w + g.pad_w;
    const int oh_lo = hp < g.window_h ? 0 : (hp - g.window_h) / g.stride_h + 1;
    const int oh_hi = min(hp / g.stride_h, g.OH - 1);
    const int ow_lo = wp < g.window_w ? 0 : (wp - g.window_w) / g.stride_w + 1;
    const int ow_hi = min(wp / g.stride_w, g.OW - 1);
    const size_t in_off = ((static_cast<size_t>(c) * g.H + h) * g.W + w) * g.N + nv * VEC;
    VecF<VEC> xv;
    if (MODE == PoolMode::max) xv = vload<VEC>(x + in_off);
    VecF<VEC> acc = vfill<VEC>(0.0f);
    const size_t out_c = static_cast<size_t>(c) * g.OH;
    for (int oh = oh_hi; oh >= oh_lo; --oh) {
      for (int ow = ow_hi; ow >= ow_lo; --ow) {
        const size_t o = ((out_c + oh) * g.OW + ow) * g.N + nv * VEC;
        const VecF<VEC> d = vload<VEC>(dy + o);
        if (MODE == PoolMode::max) {
          const VecF<VEC> m = vload<VEC>(y + o);
#pragma unroll
          for (int k = 0; k < VEC; ++k) acc.v[k] += xv.v[k] == m.v[k] ? d.v[k] : 0.0f;
        } else {
          const int h0 = oh * g.stride_h - g.pad_h, w0 = ow * g.stride_w - g.pad_w;
          const float cnt =
              static_cast<float>((min(h0 + g.window_h, g.H) - max(h0, 0)) * (min(w0 + g.window_w, g.W) - max(w0, 0)));
#pragma unroll
          for (int k = 0; k < VEC; ++k) acc.v[k] += d.v[k] / cnt;
        }
      }
    }
    vstore<VEC>(dx + in_off, acc);
  }
}

// Output rows per thread for the strip kernel: long strips share more rows, but keep >= ~4 waves of threads
// (132 SMs x 2048 threads) in flight.
int strip_rows(const PoolGeometry& g, int vec) {
  const long long columns = 1ll * g.C * g.OW * (g.N / vec);
  const long long want = 4ll * 132 * 2048;
  long long T = columns * g.OH / want;
  if (T < 2) T = 2;
  if (T > 8) T = 8;
  if (T > g.OH) T = g.OH;
  return static_cast<int>(T);
}

template <typename T, PoolMode MODE, int VEC>
void fwd_dispatch(const T* x, T* y, const PoolGeometry& g, cudaStream_t s) {
  const long long items = static_cast<long long>(g.C) * g.OH * g.OW * (g.N / VEC);
  const dim3 grid(grid_for(items, kThreads, kMaxBlocks)), block(kThreads);
  const bool w3 = g.window_h == 3 && g.window_w == 3, w2 = g.window_h == 2 && g.window_w == 2;
  if (MODE == PoolMode::max && w3 && g.stride_h == 2 && g.stride_w == 2 && g.OH > 1) {
    const int rows = strip_rows(g, VEC);
    const long long threads = 1ll * g.C * ((g.OH + rows - 1) / rows) * g.OW * (g.N / VEC);
    launch(pool_fwd_max_strip_kernel<T, VEC, 3, 3, 2, 2>, dim3(grid_for(threads, kThreads, kMaxBlocks)), block, 0, s,
           x, y, g, rows);
  } else if (w3) launch(pool_fwd_kernel<T, MODE, VEC, 3, 3>, grid, block, 0, s, x, y, g);
  else if (w2) launch(pool_fwd_kernel<T, MODE, VEC, 2, 2>, grid, block, 0, s, x, y, g);
  else launch(pool_fwd_kernel<T, MODE, VEC, 0, 0>, grid, block, 0, s, x, y, g);
}

template <typename T, PoolMode MODE, int VEC>
void bwd_dispatch(const T* x, const T* y, const T* dy, T* dx, const PoolGeometry& g, cudaStream_t s) {
  const long long items = static_cast<long long>(g.C) * g.H * g.W * (g.N / VEC);
  launch(pool_bwd_kernel<T, MODE, VEC>, dim3(grid_for(items, kThreads, kMaxBlocks)), dim3(kThreads), 0, s, x, y, dy, dx,
         g);
}

// The launchers' re-check of a geometry that crossed from Python: valid, and the output size is C++'s.
PoolGeometry recheck(const PoolGeometry& g, const char* launcher) {
  const PoolGeometry c = pool_geometry(g.C, g.H, g.W, g.N, g.window_h, g.window_w, g.stride_h, g.stride_w, g.pad_h,
                                       g.pad_w);
  if (c.OH != g.OH || c.OW != g.OW) throw std::invalid_argument(std::string(launcher) + ": inconsistent output size");
  return c;
}

}  // namespace

PoolMode pool_mode(int mode) {
  if (mode != static_cast<int>(PoolMode::max) && mode != static_cast<int>(PoolMode::avg))
    throw std::invalid_argument("pool: mode must be 0 (max) or 1 (avg), got " + std::to_string(mode));
  return static_cast<PoolMode>(mode);
}

PoolGeometry pool_geometry(int C, int H, int W, int N, int window_h, int window_w, int stride_h, int stride_w,
                           int pad_h, int pad_w) {
  auto fail = [](const std::string& m) { throw std::invalid_argument("pool: " + m); };
  if (C < 1 || H < 1 || W < 1 || N < 1)
    fail("input shape (C, H, W, N) must be positive, got (" + std::to_string(C) + ", " + std::to_string(H) + ", " +
         std::to_string(W) + ", " + std::to_string(N) + ")");
  if (window_h < 1 || window_w < 1) fail("window must be >= 1");
  if (stride_h < 1 || stride_w < 1) fail("stride must be >= 1");
  if (pad_h < 0 || pad_w < 0 || pad_h > window_h / 2 || pad_w > window_w / 2)
    fail("padding must be in [0, window / 2]");
  if (H + 2 * pad_h < window_h || W + 2 * pad_w < window_w) fail("window larger than the padded input");
  const PoolGeometry g{C, H, W, N, output_size(H, window_h, stride_h, pad_h), output_size(W, window_w, stride_w, pad_w),
                       window_h, window_w, stride_h, stride_w, pad_h, pad_w};
  const long long in = 1ll * C * H * W * N, out = 1ll * C * g.OH * g.OW * N;
  if (in >= (1ll << 31) || out >= (1ll << 31)) fail("tensor has 2^31 or more elements (32-bit indexing)");
  return g;
}

template <typename T>
void pool_forward(const T* x, T* y, const PoolGeometry& gin, PoolMode mode, cudaStream_t stream) {
  const PoolGeometry g = recheck(gin, "pool_forward");
  if (!x || !y) throw std::invalid_argument("pool_forward: null pointer");
  const bool v4 = g.N % 4 == 0 && aligned_vec4(x) && aligned_vec4(y);
  if (mode == PoolMode::max)
    v4 ? fwd_dispatch<T, PoolMode::max, 4>(x, y, g, stream) : fwd_dispatch<T, PoolMode::max, 1>(x, y, g, stream);
  else
    v4 ? fwd_dispatch<T, PoolMode::avg, 4>(x, y, g, stream) : fwd_dispatch<T, PoolMode::avg, 1>(x, y, g, stream);
}

template <typename T>
void pool_backward(const T* x, const T* y, const T* dy, T* dx, const PoolGeometry& gin, PoolMode mode,
                   cudaStream_t stream) {
  const PoolGeometry g = recheck(gin, "pool_backward");
  if (!dy || !dx || (mode == PoolMode::max && (!x || !y))) throw std::invalid_argument("pool_backward: null pointer");
  bool v4 = g.N % 4 == 0 && aligned_vec4(dy) && aligned_vec4(dx);
  if (mode == PoolMode::max) {
    v4 = v4 && aligned_vec4(x) && aligned_vec4(y);
    v4 ? bwd_dispatch<T, PoolMode::max, 4>(x, y, dy, dx, g, stream)
       : bwd_dispatch<T, PoolMode::max, 1>(x, y, dy, dx, g, stream);
  } else {
    v4 ? bwd_dispatch<T, PoolMode::avg, 4>(x, y, dy, dx, g, stream)
       : bwd_dispatch<T, PoolMode::avg, 1>(x, y, dy, dx, g, stream);
  }
}

template void pool_forward<float>(const float*, float*, const PoolGeometry&, PoolMode, cudaStream_t);
template void pool_forward<bf16>(const bf16*, bf16*, const PoolGeometry&, PoolMode, cudaStream_t);
template void pool_backward<float>(const float*, const float*, const float*, float*, const PoolGeometry&, PoolMode,
                                   cudaStream_t);
template void pool_backward<bf16>(const bf16*, const bf16*, const bf16*, bf16*, const PoolGeometry&, PoolMode,
                                  cudaStream_t);

}  // namespace convnet
