// Cross-map LRN, CHWN. See lrn.h / src/convnet/reference/lrn.py.
//
// One thread per (pixel, VEC images, channel segment): it walks its segment of channels keeping the window in
// registers (a shift register, compile-time sizes 3 and 5, AlexNet's; other sizes take a generic path that re-reads
// the window through L1), so each input is read from memory once per segment (plus a halo of size-1 maps) and
// every access is a coalesced row along the images (16 bytes per thread for float, 8 for bf16).  Channels are split
// into segments only to put enough threads in flight (several waves on a 132-SM H100 at AlexNet shapes);
// lrn_thread() below is the mapping every kernel shares.
//
// Storage: T = float or bf16 for x, y, denom, dy and dx (every kernel is a template over it): loads convert to float,
// all math is float, each output is rounded once to T on store. With bf16 the recompute backward works from the
// float denom_j / y_j it recomputes, the reuse backward from the rounded ones the forward stored.
//
// Forward writes y, and denom when asked (the reuse backward reads it).
// Backward, two exact variants (lrn.h):
//   recompute (the default): reads x and dy only. A shift register of x over the forward window of the leading
//     map recomputes denom_j and y_j in registers, with the forward's operations in the forward's order
//     (bit-identical to what the forward wrote); two more hold t_j = dy_j y_j / denom_j and q_j = denom_j^-beta dy_j
//     over the reversed window (the maps whose window contains the centre).
//   reuse: reads x, y, denom and dy (what the forward wrote); shift registers of t_j and q_j as above.
// Either way every map is read once per segment and dx is written once.
// Summation orders follow the reference (centre, then maps below, then maps above), so the emu matches the NumPy
// float32 reference closely; __powf (exp2/log2 intrinsics) is used for denom^-beta.
#include "cuda_compat.h"
#include "kernels/chwn_vec.h"
#include "kernels/lrn.h"

#include <cmath>
#include <stdexcept>
#include <string>

namespace convnet {
namespace {

constexpr int kThreads = 128;

__device__ __forceinline__ float lrn_pow(float d, float beta) { return __powf(d, -beta); }

// The prologue of every LRN kernel: which (pixel, VEC images) item and which channel segment this thread owns.
//   grid: ceil(P*N/VEC / kThreads) x nseg blocks, 1-D, the segment index fastest (blockIdx.x % nseg), so
//         neighbouring segments, which share halo maps, run together and the halo hits L2;
//   item: idx = (blockIdx.x / nseg) * blockDim.x + threadIdx.x = pixel * N/VEC + image vector.
// Returns false for a thread past the last item, which must return at once (the kernels have no barriers).
struct LrnThread {
  int c0, c1;   // the channel segment [c0, c1), seg maps long (the last one shorter)
  size_t cs;    // channel stride P*N
  size_t base;  // offset of the thread's VEC images within a channel
};

template <int VEC>
__device__ __forceinline__ bool lrn_thread(const LrnGeometry& g, int seg, LrnThread& t) {
  const unsigned NV = static_cast<unsigned>(g.N) / VEC;
  const unsigned items = static_cast<unsigned>(g.P) * NV;
  const unsigned nseg = (g.C + seg - 1) / seg;
  const unsigned idx = (blockIdx.x / nseg) * blockDim.x + threadIdx.x;
  if (idx >= items) return false;
  t.c0 = (blockIdx.x % nseg) * seg;
  t.c1 = min(g.C, t.c0 + seg);
  t.cs = static_cast<size_t>(g.P) * g.N;
  t.base = static_cast<size_t>(idx / NV) * g.N + (idx % NV) * VEC;
  return true;
}

// ---- compile-time window (register shift registers) -------------------------------------------------------------
// Lane k's sum of squares over the forward window held in ring (ring[j] = x[c - B + j] for centre c), in the
// forward's order (centre, then below, then above). The forward and the recomputing backward both call this, so
// the backward's denom is bit-identical to the forward's by construction.
template <int VEC, int SIZE>
__device__ __forceinline__ float ring_sum_sq(const VecF<VEC> (&ring)[SIZE], int k) {
  constexpr int B = SIZE / 2, A = (SIZE - 1) / 2;
  float s = ring[B].v[k] * ring[B].v[k];
#pragma unroll
  for (int o = 1; o <= B; ++o) s += ring[B - o].v[k] * ring[B - o].v[k];
#pragma unroll
  for (int o = 1; o <= A; ++o) s += ring[B + o].v[k] * ring[B + o].v[k];
  return s;
}

// Lane k's sum over the reversed window held in ring (ring[j] = the term of map c - A + j, the maps whose window
// contains the centre c), in a fixed order (centre, then below, then above): both backward variants call this.
template <int VEC, int SIZE>
__device__ __forceinline__ float ring_adjoint_sum(const VecF<VEC> (&ring)[SIZE], int k) {
  constexpr int A = (SIZE - 1) / 2, B = SIZE / 2;
  float s = ring[A].v[k];
#pragma unroll
  for (int o = 1; o <= A; ++o) s += ring[A - o].v[k];
#pragma unroll
  for (int o = 1; o <= B; ++o) s += ring[A + o].v[k];
  return s;
}

// Forward, SIZE = 3 or 5: ring win holds x over the window of the current centre c, shifted by one map per step.
template <typename T, int VEC, int SIZE>
__global__ void lrn_fwd_kernel(const T* __restrict__ x, T* __restrict__ y, T* __restrict__ denom,
                               LrnGeometry g, int seg) {
  constexpr int B = SIZE / 2;          // maps below the centre
  constexpr int A = (SIZE - 1) / 2;    // maps above
  LrnThread th;
  if (!lrn_thread<VEC>(g, seg, th)) return;
  const int c0 = th.c0, c1 = th.c1;
  const size_t cs = th.cs, base = th.base;
  // win[j] = x[c - B + j] (0 outside [0, C)), for the current centre c
  VecF<VEC> win[SIZE];
#pragma unroll
  for (int j = 1; j < SIZE; ++j) {
    const int cj = c0 - B + j - 1;
    win[j] = (cj >= 0 && cj < g.C) ? vload<VEC>(x + cj * cs + base) : vfill<VEC>(0.0f);
  }
  // unrolled by 2 so the next map's load is issued before this one's math (two 16-byte loads in flight)
#pragma unroll 2
  for (int c = c0; c < c1; ++c) {
#pragma unroll
    for (int j = 0; j < SIZE - 1; ++j) win[j] = win[j + 1];
    const int cn = c + A;
    win[SIZE - 1] = cn < g.C ? vload<VEC>(x + cn * cs + base) : vfill<VEC>(0.0f);
    VecF<VEC> yv, dv;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float d = g.k + g.a * ring_sum_sq<VEC, SIZE>(win, k);
      dv.v[k] = d;
      yv.v[k] = win[B].v[k] * lrn_pow(d, g.beta);
    }
    vstore<VEC>(y + c * cs + base, yv);
    if (denom) vstore<VEC>(denom + c * cs + base, dv);
  }
}

// Backward from x and dy only: denom_j is recomputed in registers (the same operations in the same order as the
// forward pass, so bit-identical to the denom it wrote), y_j = x_j denom_j^-beta likewise.  Memory traffic: read x
// and dy, write dx (3 streams) instead of read x, y, denom, dy, write dx (5 streams) for the reuse variant below.
// L walks the leading map of the reversed window (L = c + B for centre c): ring xr holds x[L-B .. L+A] (the
// forward window of L), rings t/q hold dy_j y_j / denom_j and denom_j^-beta dy_j for j in [c-A, c+B].
template <typename T, int VEC, int SIZE>
__global__ void __launch_bounds__(kThreads) lrn_bwd_recompute_kernel(const T* __restrict__ x,
                                                                     const T* __restrict__ dy,
                                                                     T* __restrict__ dx, LrnGeometry g, int seg) {
  constexpr int B = SIZE / 2;
  constexpr int A = (SIZE - 1) / 2;
  LrnThread th;
  if (!lrn_thread<VEC>(g, seg, th)) return;
  const int c0 = th.c0, c1 = th.c1;
  const size_t cs = th.cs, base = th.base;
  const float coef = 2.0f * g.a * g.beta;
  const int L0 = c0 - A;                        // first leading map: fills the reversed window of c0
  VecF<VEC> xr[SIZE], t[SIZE], q[SIZE];   // q_j = denom_j^-beta * dy_j (only q[A..] is ever live)
#pragma unroll
  for (int j = 1; j < SIZE; ++j) {              // xr = x[L0-1-B .. L0-1+A] (shifted before use)
    const int cj = L0 - B + j - 1;
    xr[j] = (cj >= 0 && cj < g.C) ? vload<VEC>(x + cj * cs + base) : vfill<VEC>(0.0f);
  }
#pragma unroll
  for (int j = 0; j < SIZE; ++j) { t[j] = vfill<VEC>(0.0f); q[j] = t[j]; }
  for (int L = L0; L < c1 + B; ++L) {
#pragma unroll
    for (int j = 0; j < SIZE - 1; ++j) { xr[j] = xr[j + 1]; t[j] = t[j + 1]; q[j] = q[j + 1]; }
    const int cn = L + A;
    xr[SIZE - 1] = (cn >= 0 && cn < g.C) ? vload<VEC>(x + cn * cs + base) : vfill<VEC>(0.0f);
    if (L >= 0 && L < g.C) {
      const VecF<VEC> dyv = vload<VEC>(dy + L * cs + base);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float d = g.k + g.a * ring_sum_sq<VEC, SIZE>(xr, k);
        const float p = lrn_pow(d, g.beta);
        const float yv = xr[B].v[k] * p;
        t[SIZE - 1].v[k] = dyv.v[k] * yv / d;
        q[SIZE - 1].v[k] = p * dyv.v[k];
      }
    } else {
      t[SIZE - 1] = vfill<VEC>(0.0f);
      q[SIZE - 1] = t[SIZE - 1];
    }
    const int c = L - B;                          // centre whose reversed window [c-A, c+B] is now complete
    if (c >= c0) {
      VecF<VEC> out;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float s = ring_adjoint_sum<VEC, SIZE>(t, k) * xr[0].v[k] * coef;  // xr[0] = x[L - B] = x[c]
        out.v[k] = q[A].v[k] - s;
      }
      vstore<VEC>(dx + c * cs + base, out);
    }
  }
}

// Backward, reuse variant (reads x, y, denom, dy), SIZE = 3 or 5: rings t/q hold dy_j y_j / denom_j and
// denom_j^-beta dy_j for j in [c-A, c+B], the maps whose window contains the centre c.
template <typename T, int VEC, int SIZE>
__global__ void lrn_bwd_kernel(const T* __restrict__ x, const T* __restrict__ y,
                               const T* __restrict__ denom, const T* __restrict__ dy, T* __restrict__ dx,
                               LrnGeometry g, int seg) {
  constexpr int A = (SIZE - 1) / 2;    // reversed window: maps j in [c - A, c + B] contain c in their window
  constexpr int B = SIZE / 2;
  LrnThread th;
  if (!lrn_thread<VEC>(g, seg, th)) return;
  const int c0 = th.c0, c1 = th.c1;
  const size_t cs = th.cs, base = th.base;
  const float coef = 2.0f * g.a * g.beta;
  // t[j] = dy y / denom and q[j] = denom^-beta dy at map c - A + j (centre = index A)
  VecF<VEC> t[SIZE], q[SIZE];
  auto fetch = [&](int cj, VecF<VEC>& tv, VecF<VEC>& qv) {
    if (cj >= 0 && cj < g.C) {
      const size_t o = cj * cs + base;
      const VecF<VEC> dyv = vload<VEC>(dy + o), dv = vload<VEC>(denom + o), yv = vload<VEC>(y + o);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        tv.v[k] = dyv.v[k] * yv.v[k] / dv.v[k];
        qv.v[k] = lrn_pow(dv.v[k], g.beta) * dyv.v[k];
      }
    } else {
      tv = vfill<VEC>(0.0f);
      qv = tv;
    }
  };
#pragma unroll
  for (int j = 1; j < SIZE; ++j) fetch(c0 - A + j - 1, t[j], q[j]);
  for (int c = c0; c < c1; ++c) {
#pragma unroll
    for (int j = 0; j < SIZE - 1; ++j) { t[j] = t[j + 1]; q[j] = q[j + 1]; }
    fetch(c + B, t[SIZE - 1], q[SIZE - 1]);
    const VecF<VEC> xv = vload<VEC>(x + c * cs + base);
    VecF<VEC> out;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float s = ring_adjoint_sum<VEC, SIZE>(t, k) * xv.v[k] * coef;
      out.v[k] = q[A].v[k] - s;
    }
    vstore<VEC>(dx + c * cs + base, out);
  }
}

// ---- generic window size: re-reads the window (L1-resident) -----------------------------------------------------

// Sum of squares over map c's window, in the forward's order (centre, then below, then above). Both the forward
// and the recomputing backward call this, so the backward's denom is bit-identical to the forward's by
// construction. Also returns x at map c.
template <int VEC, typename T>
__device__ __forceinline__ VecF<VEC> window_sum_sq(const T* __restrict__ x, size_t cs, size_t base, int c,
                                                   const LrnGeometry& g, VecF<VEC>& xc) {
  const int B = g.size / 2, A = (g.size - 1) / 2;
  xc = vload<VEC>(x + c * cs + base);
  VecF<VEC> s;
#pragma unroll
  for (int k = 0; k < VEC; ++k) s.v[k] = xc.v[k] * xc.v[k];
  for (int o = 1; o <= B && c - o >= 0; ++o) {
    const VecF<VEC> v = vload<VEC>(x + (c - o) * cs + base);
#pragma unroll
    for (int k = 0; k < VEC; ++k) s.v[k] += v.v[k] * v.v[k];
  }
  for (int o = 1; o <= A && c + o < g.C; ++o) {
    const VecF<VEC> v = vload<VEC>(x + (c + o) * cs + base);
#pragma unroll
    for (int k = 0; k < VEC; ++k) s.v[k] += v.v[k] * v.v[k];
  }
  return s;
}

// The backward's sum over the maps j whose window contains map c (j in [c - A, c + B]) of tval(j), in a fixed
// order (c, then below, then above). tval(j, out) computes map j's term.
template <int VEC, class Term>
__device__ __forceinline__ VecF<VEC> adjoint_window_sum(int c, const LrnGeometry& g, const Term& tval) {
  const int A = (g.size - 1) / 2, B = g.size / 2;
  VecF<VEC> s, tv;
  tval(c, s);
  for (int o = 1; o <= A && c - o >= 0; ++o) {
    tval(c - o, tv);
#pragma unroll
    for (int k = 0; k < VEC; ++k) s.v[k] += tv.v[k];
  }
  for (int o = 1; o <= B && c + o < g.C; ++o) {
    tval(c + o, tv);
#pragma unroll
    for (int k = 0; k < VEC; ++k) s.v[k] += tv.v[k];
  }
  return s;
}

// Forward, any size.
template <typename T, int VEC>
__global__ void lrn_fwd_generic(const T* __restrict__ x, T* __restrict__ y, T* __restrict__ denom,
                                LrnGeometry g, int seg) {
  LrnThread th;
  if (!lrn_thread<VEC>(g, seg, th)) return;
  const int c0 = th.c0, c1 = th.c1;
  const size_t cs = th.cs, base = th.base;
  for (int c = c0; c < c1; ++c) {
    VecF<VEC> xc;
    const VecF<VEC> s = window_sum_sq<VEC>(x, cs, base, c, g, xc);
    VecF<VEC> yv, dv;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      dv.v[k] = g.k + g.a * s.v[k];
      yv.v[k] = xc.v[k] * lrn_pow(dv.v[k], g.beta);
    }
    vstore<VEC>(y + c * cs + base, yv);
    if (denom) vstore<VEC>(denom + c * cs + base, dv);
  }
}

// Generic-size backward, recompute variant (x and dy only): recomputes denom_j over each map's window
// (O(size^2) L1-resident reads).
template <typename T, int VEC>
__global__ void lrn_bwd_recompute_generic(const T* __restrict__ x, const T* __restrict__ dy,
                                          T* __restrict__ dx, LrnGeometry g, int seg) {
  LrnThread th;
  if (!lrn_thread<VEC>(g, seg, th)) return;
  const int c0 = th.c0, c1 = th.c1;
  const size_t cs = th.cs, base = th.base;
  const float coef = 2.0f * g.a * g.beta;
  // denom_j and its power, the forward's operations in the forward's order
  auto denom_at = [&](int j, VecF<VEC>& d, VecF<VEC>& xj) {
    const VecF<VEC> s = window_sum_sq<VEC>(x, cs, base, j, g, xj);
#pragma unroll
    for (int k = 0; k < VEC; ++k) d.v[k] = g.k + g.a * s.v[k];
  };
  auto tval = [&](int j, VecF<VEC>& tv) {
    VecF<VEC> d, xj;
    denom_at(j, d, xj);
    const VecF<VEC> dyj = vload<VEC>(dy + j * cs + base);
#pragma unroll
    for (int k = 0; k < VEC; ++k) tv.v[k] = dyj.v[k] * (xj.v[k] * lrn_pow(d.v[k], g.beta)) / d.v[k];
  };
  for (int c = c0; c < c1; ++c) {
    const VecF<VEC> s = adjoint_window_sum<VEC>(c, g, tval);
    VecF<VEC> d, xv;
    denom_at(c, d, xv);
    const VecF<VEC> dyv = vload<VEC>(dy + c * cs + base);
    VecF<VEC> out;
#pragma unroll
    for (int k = 0; k < VEC; ++k) out.v[k] = lrn_pow(d.v[k], g.beta) * dyv.v[k] - s.v[k] * xv.v[k] * coef;
    vstore<VEC>(dx + c * cs + base, out);
  }
}

// Generic-size backward, reuse variant: reads y and denom of every map of the reversed window.
template <typename T, int VEC>
__global__ void lrn_bwd_generic(const T* __restrict__ x, const T* __restrict__ y,
                                const T* __restrict__ denom, const T* __restrict__ dy, T* __restrict__ dx,
                                LrnGeometry g, int seg) {
  LrnThread th;
  if (!lrn_thread<VEC>(g, seg, th)) return;
  const int c0 = th.c0, c1 = th.c1;
  const size_t cs = th.cs, base = th.base;
  const float coef = 2.0f * g.a * g.beta;
  auto tval = [&](int cj, VecF<VEC>& tv) {
    const size_t o = cj * cs + base;
    const VecF<VEC> d = vload<VEC>(dy + o), yv = vload<VEC>(y + o), dn = vload<VEC>(denom + o);
#pragma unroll
    for (int k = 0; k < VEC; ++k) tv.v[k] = d.v[k] * yv.v[k] / dn.v[k];
  };
  for (int c = c0; c < c1; ++c) {
    const VecF<VEC> s = adjoint_window_sum<VEC>(c, g, tval);
    const size_t oc = c * cs + base;
    const VecF<VEC> xv = vload<VEC>(x + oc), dyv = vload<VEC>(dy + oc), dn = vload<VEC>(denom + oc);
    VecF<VEC> out;
#pragma unroll
    for (int k = 0; k < VEC; ++k) out.v[k] = lrn_pow(dn.v[k], g.beta) * dyv.v[k] - s.v[k] * xv.v[k] * coef;
    vstore<VEC>(dx + oc, out);
  }
}

// Channel segment length: enough threads for ~4 waves of 2048 threads on 132 SMs, segments of >= 16 maps so the
// halo (size-1 maps re-read per segment) stays small.
int segment_length(const LrnGeometry& g, int vec) {
  const long long threads = 1ll * g.P * (g.N / vec);
  const long long want = 4ll * 132 * 2048;
  long long nseg = (want + threads - 1) / threads;
  const long long max_seg = (g.C + 15) / 16;
  if (nseg > max_seg) nseg = max_seg;
  if (nseg < 1) nseg = 1;
  return static_cast<int>((g.C + nseg - 1) / nseg);
}

template <typename T, int VEC>
void fwd_dispatch(const T* x, T* y, T* d, const LrnGeometry& g, cudaStream_t s) {
  const int seg = segment_length(g, VEC);
  const unsigned items = static_cast<unsigned>(g.P) * (g.N / VEC);
  const dim3 grid(ceil_div(items, kThreads) * ceil_div(g.C, seg)), block(kThreads);
  if (g.size == 5) launch(lrn_fwd_kernel<T, VEC, 5>, grid, block, 0, s, x, y, d, g, seg);
  else if (g.size == 3) launch(lrn_fwd_kernel<T, VEC, 3>, grid, block, 0, s, x, y, d, g, seg);
  else launch(lrn_fwd_generic<T, VEC>, grid, block, 0, s, x, y, d, g, seg);
}

template <typename T, int VEC>
void bwd_dispatch(const T* x, const T* y, const T* d, const T* dy, T* dx, const LrnGeometry& g,
                  bool reuse, cudaStream_t s) {
  const int seg = segment_length(g, VEC);
  const unsigned items = static_cast<unsigned>(g.P) * (g.N / VEC);
  const dim3 grid(ceil_div(items, kThreads) * ceil_div(g.C, seg)), block(kThreads);
  if (!reuse) {
    if (g.size == 5) launch(lrn_bwd_recompute_kernel<T, VEC, 5>, grid, block, 0, s, x, dy, dx, g, seg);
    else if (g.size == 3) launch(lrn_bwd_recompute_kernel<T, VEC, 3>, grid, block, 0, s, x, dy, dx, g, seg);
    else launch(lrn_bwd_recompute_generic<T, VEC>, grid, block, 0, s, x, dy, dx, g, seg);
    return;
  }
  if (g.size == 5) launch(lrn_bwd_kernel<T, VEC, 5>, grid, block, 0, s, x, y, d, dy, dx, g, seg);
  else if (g.size == 3) launch(lrn_bwd_kernel<T, VEC, 3>, grid, block, 0, s, x, y, d, dy, dx, g, seg);
  else launch(lrn_bwd_generic<T, VEC>, grid, block, 0, s, x, y, d, dy, dx, g, seg);
}

}  // namespace

LrnGeometry lrn_geometry(int C, int H, int W, int N, int size, float a, float beta, float k) {
  auto fail = [](const std::string& m) { throw std::invalid_argument("lrn: " + m); };
  if (C < 1 || H < 1 || W < 1 || N < 1) fail("input shape (C, H, W, N) must be positive");
  if (size < 1) fail("size must be >= 1, got " + std::to_string(size));
  if (!(k > 0.0f) || !std::isfinite(k)) fail("k must be finite and > 0");
  if (!(a >= 0.0f) || !std::isfinite(a)) fail("alpha must be finite and >= 0");
  if (!(beta >= 0.0f) || !std::isfinite(beta)) fail("beta must be finite and >= 0");
  if (1ll * C * H * W * N >= (1ll << 31)) fail("tensor has 2^31 or more elements (32-bit indexing)");
  return LrnGeometry{C, H * W, N, size, a, beta, k};
}

LrnBackward lrn_backward_variant(int variant) {
  if (variant != static_cast<int>(LrnBackward::recompute) && variant != static_cast<int>(LrnBackward::reuse))
    throw std::invalid_argument("lrn_backward: variant must be 0 (recompute) or 1 (reuse), got " +
                                std::to_string(variant));
  return static_cast<LrnBackward>(variant);
}

template <typename T>
void lrn_forward(const T* x, T* y, T* denom, const LrnGeometry& gin, cudaStream_t stream) {
  const LrnGeometry g = lrn_geometry(gin.C, gin.P, 1, gin.N, gin.size, gin.a, gin.beta, gin.k);
  if (!x || !y) throw std::invalid_argument("lrn_forward: null pointer");
  const bool v4 = g.N % 4 == 0 && aligned_vec4(x) && aligned_vec4(y) && (!denom || aligned_vec4(denom));
  v4 ? fwd_dispatch<T, 4>(x, y, denom, g, stream) : fwd_dispatch<T, 1>(x, y, denom, g, stream);
}

template <typename T>
void lrn_backward(const T* x, const T* y, const T* denom, const T* dy, T* dx, const LrnGeometry& gin,
                  LrnBackward variant, cudaStream_t stream) {
  const LrnGeometry g = lrn_geometry(gin.C, gin.P, 1, gin.N, gin.size, gin.a, gin.beta, gin.k);
  const bool reuse = variant == LrnBackward::reuse;
  if (!x || !dy || !dx || (reuse && (!y || !denom)))
    throw std::invalid_argument(reuse ? "lrn_backward: null pointer (the reuse variant needs x, y, denom, dy, dx)"
                                      : "lrn_backward: null pointer (needs x, dy, dx)");
  bool v4 = g.N % 4 == 0 && aligned_vec4(x) && aligned_vec4(dy) && aligned_vec4(dx);
  if (reuse) v4 = v4 && aligned_vec4(y) && aligned_vec4(denom);
  v4 ? bwd_dispatch<T, 4>(x, y, denom, dy, dx, g, reuse, stream)
     : bwd_dispatch<T, 1>(x, y, denom, dy, dx, g, reuse, stream);
}

template void lrn_forward<float>(const float*, float*, float*, const LrnGeometry&, cudaStream_t);
template void lrn_forward<bf16>(const bf16*, bf16*, bf16*, const LrnGeometry&, cudaStream_t);
template void lrn_backward<float>(const float*, const float*, const float*, const float*, float*, const LrnGeometry&,
                                  LrnBackward, cudaStream_t);
template void lrn_backward<bf16>(const bf16*, const bf16*, const bf16*, const bf16*, bf16*, const LrnGeometry&,
                                 LrnBackward, cudaStream_t);

}  // namespace convnet
