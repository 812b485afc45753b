// Max / average pooling, CHWN (images fastest). See pool.h and convnet/reference/pool.py for the conventions.
//
// Forward: one thread per (c, oh, ow, VEC images); a warp covers 32*VEC consecutive images of one output pixel, so
// every load/store is a coalesced 128- (VEC=1) or 512-byte (VEC=4) row.  Overlapping windows re-read inputs
// through L1/L2 (each input is fetched from DRAM about once; consecutive blocks walk neighbouring pixels).
// Common windows (3x3, 2x2) are template-unrolled so all window loads are in flight before the first max.
// Max 3x3/2 (AlexNet) takes a strip kernel that also reuses the shared window rows in registers (see below).
//
// Backward is a gather (no atomics, deterministic): one thread per input (c, h, w, VEC images) visits the output
// windows that cover it, in the same order as the reference's accumulation (oh, ow descending), and for max adds
// dy[o] where x == y[o] (recomputed, nothing stored by the forward pass).
#include "cuda_compat.h"
#include "kernels/geometry.h"
#include "kernels/pool.h"
#include "kernels/pool_vec.h"

#include <stdexcept>
#include <string>

namespace convnet {
namespace {

using memb::VecF;
using memb::vload;
using memb::vstore;
using memb::vfill;

constexpr int kThreads = 256;

// max that propagates NaN (as NumPy's maximum, the reference, does): a NaN in a window makes its output NaN.
__device__ __forceinline__ float max_nan(float acc, float v) { return (v > acc || v != v) ? v : acc; }

template <int MODE, int VEC, int WH, int WW>
__global__ void pool_fwd_kernel(const float* __restrict__ x, float* __restrict__ y, PoolGeom g) {
  const unsigned NV = static_cast<unsigned>(g.N) / VEC;
  const unsigned total = static_cast<unsigned>(g.C) * g.OH * g.OW * NV;
  const int wh = WH ? WH : g.wh;
  const int ww = WW ? WW : g.ww;
  for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += gridDim.x * blockDim.x) {
    const unsigned nv = i % NV;
    unsigned t = i / NV;
    const int ow = t % g.OW; t /= g.OW;
    const int oh = t % g.OH;
    const unsigned c = t / g.OH;
    const int h0 = oh * g.sh - g.ph, w0 = ow * g.sw - g.pw;
    const float* xc = x + static_cast<size_t>(c) * g.H * g.W * g.N + nv * VEC;
    VecF<VEC> acc = vfill<VEC>(MODE == POOL_MAX ? -INFINITY : 0.0f);
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
          if (MODE == POOL_MAX) acc.v[k] = max_nan(acc.v[k], v.v[k]);
          else acc.v[k] += v.v[k];
        }
      }
    }
    if (MODE == POOL_AVG) {
      const float cnt = static_cast<float>((min(h0 + wh, g.H) - max(h0, 0)) * (min(w0 + ww, g.W) - max(w0, 0)));
#pragma unroll
      for (int k = 0; k < VEC; ++k) acc.v[k] = acc.v[k] / cnt;
    }
    vstore<VEC>(y + ((static_cast<size_t>(c) * g.OH + oh) * g.OW + ow) * g.N + nv * VEC, acc);
  }
}

// Max pooling with overlapping rows (3x3/2, AlexNet): a thread walks a strip of T output rows of one output column,
// keeping the window's per-row maxima in registers, so the rows shared by vertically adjacent windows are loaded
// once: (T*SH + WH - SH) * WW loads per T outputs instead of T*WH*WW (3x3/2, T=4: 27 instead of 36; the
// horizontal overlap is served by L1, since a block holds 8 adjacent output columns of the same rows).
template <int VEC, int WH, int WW, int SH, int SW>
__global__ void pool_fwd_max_strip_kernel(const float* __restrict__ x, float* __restrict__ y, PoolGeom g, int T) {
  static_assert(SH < WH, "the strip kernel is for overlapping windows");
  const unsigned NV = static_cast<unsigned>(g.N) / VEC;
  const unsigned strips = (g.OH + T - 1) / T;
  const unsigned total = static_cast<unsigned>(g.C) * strips * g.OW * NV;
  for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += gridDim.x * blockDim.x) {
    const unsigned nv = i % NV;
    unsigned t = i / NV;
    const int ow = t % g.OW; t /= g.OW;
    const int strip = t % strips;
    const unsigned c = t / strips;
    const int oh0 = strip * T, oh1 = min(g.OH, oh0 + T);
    const int w0 = ow * SW - g.pw;
    const float* xc = x + static_cast<size_t>(c) * g.H * g.W * g.N + nv * VEC;
    float* yc = y + (static_cast<size_t>(c) * g.OH * g.OW + ow) * g.N + nv * VEC;
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
    int h0 = oh0 * SH - g.ph;
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

template <int MODE, int VEC>
__global__ void pool_bwd_kernel(const float* __restrict__ x, const float* __restrict__ y,
                                const float* __restrict__ dy, float* __restrict__ dx, PoolGeom g) {
  const unsigned NV = static_cast<unsigned>(g.N) / VEC;
  const unsigned total = static_cast<unsigned>(g.C) * g.H * g.W * NV;
  for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += gridDim.x * blockDim.x) {
    const unsigned nv = i % NV;
    unsigned t = i / NV;
    const int w = t % g.W; t /= g.W;
    const int h = t % g.H;
    const unsigned c = t / g.H;
    // windows covering h: oh*sh - ph <= h <= oh*sh - ph + wh - 1
    const int hp = h + g.ph, wp = w + g.pw;
    const int oh_lo = hp < g.wh ? 0 : (hp - g.wh) / g.sh + 1;
    const int oh_hi = min(hp / g.sh, g.OH - 1);
    const int ow_lo = wp < g.ww ? 0 : (wp - g.ww) / g.sw + 1;
    const int ow_hi = min(wp / g.sw, g.OW - 1);
    const size_t in_off = ((static_cast<size_t>(c) * g.H + h) * g.W + w) * g.N + nv * VEC;
    VecF<VEC> xv;
    if (MODE == POOL_MAX) xv = vload<VEC>(x + in_off);
    VecF<VEC> acc = vfill<VEC>(0.0f);
    const size_t out_c = static_cast<size_t>(c) * g.OH;
    for (int oh = oh_hi; oh >= oh_lo; --oh) {
      for (int ow = ow_hi; ow >= ow_lo; --ow) {
        const size_t o = ((out_c + oh) * g.OW + ow) * g.N + nv * VEC;
        const VecF<VEC> d = vload<VEC>(dy + o);
        if (MODE == POOL_MAX) {
          const VecF<VEC> m = vload<VEC>(y + o);
#pragma unroll
          for (int k = 0; k < VEC; ++k) acc.v[k] += xv.v[k] == m.v[k] ? d.v[k] : 0.0f;
        } else {
          const int h0 = oh * g.sh - g.ph, w0 = ow * g.sw - g.pw;
          const float cnt =
              static_cast<float>((min(h0 + g.wh, g.H) - max(h0, 0)) * (min(w0 + g.ww, g.W) - max(w0, 0)));
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
int strip_rows(const PoolGeom& g, int vec) {
  const long long columns = 1ll * g.C * g.OW * (g.N / vec);
  const long long want = 4ll * 132 * 2048;
  long long T = columns * g.OH / want;
  if (T < 2) T = 2;
  if (T > 8) T = 8;
  if (T > g.OH) T = g.OH;
  return static_cast<int>(T);
}

template <int MODE, int VEC>
void fwd_dispatch(const float* x, float* y, const PoolGeom& g, cudaStream_t s) {
  const long long items = static_cast<long long>(g.C) * g.OH * g.OW * (g.N / VEC);
  const dim3 grid(memb::grid_for(items, kThreads)), block(kThreads);
  if (MODE == POOL_MAX && g.wh == 3 && g.ww == 3 && g.sh == 2 && g.sw == 2 && g.OH > 1) {
    const int T = strip_rows(g, VEC);
    const long long threads = 1ll * g.C * ((g.OH + T - 1) / T) * g.OW * (g.N / VEC);
    launch(pool_fwd_max_strip_kernel<VEC, 3, 3, 2, 2>, dim3(memb::grid_for(threads, kThreads)), block, 0, s, x, y,
           g, T);
  } else if (g.wh == 3 && g.ww == 3) launch(pool_fwd_kernel<MODE, VEC, 3, 3>, grid, block, 0, s, x, y, g);
  else if (g.wh == 2 && g.ww == 2) launch(pool_fwd_kernel<MODE, VEC, 2, 2>, grid, block, 0, s, x, y, g);
  else launch(pool_fwd_kernel<MODE, VEC, 0, 0>, grid, block, 0, s, x, y, g);
}

template <int MODE, int VEC>
void bwd_dispatch(const float* x, const float* y, const float* dy, float* dx, const PoolGeom& g, cudaStream_t s) {
  const long long items = static_cast<long long>(g.C) * g.H * g.W * (g.N / VEC);
  launch(pool_bwd_kernel<MODE, VEC>, dim3(memb::grid_for(items, kThreads)), dim3(kThreads), 0, s, x, y, dy, dx, g);
}

void check_mode(int mode) {
  if (mode != POOL_MAX && mode != POOL_AVG)
    throw std::invalid_argument("pool: mode must be 0 (max) or 1 (avg), got " + std::to_string(mode));
}

}  // namespace

PoolGeom pool_geometry(int C, int H, int W, int N, int wh, int ww, int sh, int sw, int ph, int pw) {
  auto fail = [](const std::string& m) { throw std::invalid_argument("pool: " + m); };
  if (C < 1 || H < 1 || W < 1 || N < 1)
    fail("input shape (C, H, W, N) must be positive, got (" + std::to_string(C) + ", " + std::to_string(H) + ", " +
         std::to_string(W) + ", " + std::to_string(N) + ")");
  if (wh < 1 || ww < 1) fail("window must be >= 1");
  if (sh < 1 || sw < 1) fail("stride must be >= 1");
  if (ph < 0 || pw < 0 || ph > wh / 2 || pw > ww / 2) fail("padding must be in [0, window / 2]");
  if (H + 2 * ph < wh || W + 2 * pw < ww) fail("window larger than the padded input");
  PoolGeom g{C, H, W, N, output_size(H, wh, sh, ph), output_size(W, ww, sw, pw), wh, ww, sh, sw, ph, pw};
  const long long in = 1ll * C * H * W * N, out = 1ll * C * g.OH * g.OW * N;
  if (in >= (1ll << 31) || out >= (1ll << 31)) fail("tensor has 2^31 or more elements (32-bit indexing)");
  return g;
}

void pool_forward(const float* x, float* y, const PoolGeom& gin, int mode, cudaStream_t stream) {
  check_mode(mode);
  const PoolGeom g = pool_geometry(gin.C, gin.H, gin.W, gin.N, gin.wh, gin.ww, gin.sh, gin.sw, gin.ph, gin.pw);
  if (g.OH != gin.OH || g.OW != gin.OW) throw std::invalid_argument("pool_forward: inconsistent output size");
  if (!x || !y) throw std::invalid_argument("pool_forward: null pointer");
  const bool v4 = g.N % 4 == 0 && memb::aligned16(x) && memb::aligned16(y);
  if (mode == POOL_MAX) v4 ? fwd_dispatch<POOL_MAX, 4>(x, y, g, stream) : fwd_dispatch<POOL_MAX, 1>(x, y, g, stream);
  else v4 ? fwd_dispatch<POOL_AVG, 4>(x, y, g, stream) : fwd_dispatch<POOL_AVG, 1>(x, y, g, stream);
}

void pool_backward(const float* x, const float* y, const float* dy, float* dx, const PoolGeom& gin, int mode,
                   cudaStream_t stream) {
  check_mode(mode);
  const PoolGeom g = pool_geometry(gin.C, gin.H, gin.W, gin.N, gin.wh, gin.ww, gin.sh, gin.sw, gin.ph, gin.pw);
  if (g.OH != gin.OH || g.OW != gin.OW) throw std::invalid_argument("pool_backward: inconsistent output size");
  if (!dy || !dx || (mode == POOL_MAX && (!x || !y))) throw std::invalid_argument("pool_backward: null pointer");
  bool v4 = g.N % 4 == 0 && memb::aligned16(dy) && memb::aligned16(dx);
  if (mode == POOL_MAX) {
    v4 = v4 && memb::aligned16(x) && memb::aligned16(y);
    v4 ? bwd_dispatch<POOL_MAX, 4>(x, y, dy, dx, g, stream) : bwd_dispatch<POOL_MAX, 1>(x, y, dy, dx, g, stream);
  } else {
    v4 ? bwd_dispatch<POOL_AVG, 4>(x, y, dy, dx, g, stream) : bwd_dispatch<POOL_AVG, 1>(x, y, dy, dx, g, stream);
  }
}

}  // namespace convnet
