// Convolution device code in the CHWN layout, included by conv.cu alone (internal linkage): the implicit-GEMM
// kernel shared by the three passes (conv_igemm with FwdOp = filterActs, DgradOp = imgActs, WgradOp = weightActs),
// the direct input-gradient kernel for few channels (conv_dgrad_direct), the split-reduction of the filter gradient
// (conv_wgrad_reduce) and the bias gradient (conv_bias_grad, conv_bias_reduce). conv.cu holds the dispatch table, the
// cost model that picks a launch, and the launchers; conv.h the API and the tensor layouts.
//
// All three convolutions are the same implicit GEMM, C[M x Ncols] = A[K x M]^T * B[K x Ncols], whose operands are
// gathered on the fly from the CHWN tensors (implicit zero padding = a predicated load that yields 0):
//
//   pass     M (rows)            Ncols (columns)               K (reduction)             A           B
//   forward  filters f of group  j = (oy, ox, n): OH*OW*N      (c, ky, kx): Cg*KH*KW     w[k][f]     x patch
//   dgrad    channels c          j = (a, b, n) of one stride   (t, u, f): taps of this   w[c,ky,kx,f] dy
//            of group            phase class (see below)       phase x Fg
//   wgrad    (c, ky, kx)         filters f of group            j = (oy, ox, n), split    x patch     dy[f][j]
//                                                              into chunks over blocks
//
// Why this works well in CHWN: the output columns j run over (pixel, image) with the image index fastest, so the
// C tile is a plain row-major block of y / dx / dw (16-byte stores), and for B the 4 consecutive columns a thread
// loads are 4 consecutive images of one pixel (one bounds check, one 16-byte load) whenever N % 4 == 0.
//
// Stride phases (dgrad): for stride s > 1 an input row iy receives taps only from ky = (iy + pad) mod s (+ s*t).
// Input pixels are therefore split into s_h*s_w classes (ry, rx) = ((iy+pad) mod s_h, (ix+pad) mod s_w); within a
// class every column has the same set of taps ky = ry + s_h*t, kx = rx + s_w*u, and the output row feeding tap t is
// oy = qy + a - t (a = class-local row). So each class is a dense stride-1 GEMM with K = ceil((KH-ry)/s_h) *
// ceil((KW-rx)/s_w) * Fg: no multiply-by-zero work for stride 4 (AlexNet conv1), no atomics, every dx element is
// written by exactly one thread. One grid z-slice per (group, class).
//
// Few channels (dgrad with C/groups <= 4, e.g. AlexNet conv1's 3): M = Cg rows make the GEMM re-read dy from L2
// once per tap, so conv_dgrad_direct (below) serves those geometries instead: a block keeps a window of dy in
// shared memory and applies every tap of its stride phase to it.
//
// Split reduction (wgrad): K = OH*OW*N is long (93k for conv2 at batch 128) while M x Ncols is small, so grid.z
// also splits K into chunks; each chunk writes its own partial dw into a workspace, and conv_wgrad_reduce sums the
// partials in a fixed order. Deterministic: no float atomics anywhere, bit-identical across runs/schedules.
//
// Kernel conv_igemm<Op, BM, BN, BK, TM, TN, V, kRelu>:
//   block: (BM/TM)*(BN/TN) threads, 1-D. Thread t computes a TM x TN register tile: rows
//          (i/4)*(BM/(TM/4)) + ty*4 + i%4 and columns (j/4)*(BN/(TN/4)) + tx*4 + j%4, tx = t % (BN/TN), ty = t /
//          (BN/TN). The 4-row / 4-column groups are read from shared memory as float4: a warp reads at most two
//          distinct A vectors (broadcast) and 16-32 consecutive B vectors (conflict-free).
//   grid:  x = column tiles (fastest, so neighbouring blocks share the A tile in L2), y = row tiles, z = Op slice.
//   shared: As[2][BK][BM+4], Bs[2][BK][BN+4] (double buffered; +4 floats of row padding keeps float4 alignment
//          and breaks the 2-way bank conflict of the transposed stores of K-contiguous operands).
//   main loop: one __syncthreads per BK step: the next tile is loaded into registers (global latency overlaps the
//          FMAs of the current tile), then stored to the other shared buffer.
//   loads: operand tiles are loaded as V-wide vectors (V = 4: 16 bytes; V = 1: scalar path) along the operand's
//          contiguous dimension (columns of A/B for "M-contiguous" operands, K for "K-contiguous" ones); each
//          thread's index along the other dimension is fixed for the whole loop, so its address part is computed
//          once (the Fix structs below), and its k index is a cursor advanced by BK per step (no integer
//          division in the main loop).
//   requirements (checked by the host): V == 4 needs N % 4 == 0, (F/groups) % 4 == 0 and 16-byte aligned
//          pointers; 32-bit indexing (every tensor < 2^31 elements).
//   epilogue: out = alpha * (acc + bias) + beta * out; kRelu (forward only) then clamps it at zero
//          (conv_epilogue.cuh: y = max(alpha * (conv + bias) + beta * y, 0)).
#pragma once

#include "cuda_compat.h"
#include "kernels/conv_epilogue.cuh"

#include <cstdint>
#include <type_traits>

namespace convnet {
namespace {

// ------------------------------------------------------------------------------------------------------------
// Parameters shared by the three ops (passed by value to the kernel).
struct ConvParams {
  const float* A;     // forward: w   dgrad: w    wgrad: x
  const float* B;     // forward: x   dgrad: dy   wgrad: dy
  const float* bias;  // forward only (may be null)
  float* out;         // forward: y   dgrad: dx   wgrad: dw, or the partial-sum workspace when splits > 1
  int C, H, W, N, F, KH, KW, sh, sw, ph, pw, G, OH, OW;
  int Cg, Fg;
  int J;       // OH*OW*N
  int HWN;     // H*W*N
  int splits;  // wgrad: number of K chunks
  int chunk;   // wgrad: K chunk length (multiple of BK)
  float alpha, beta;
};

// What one grid z-slice computes: rows [0, M), columns [0, Nc), reduction [k_lo, k_hi).
struct Slice {
  int g;
  int M, Nc, k_lo, k_hi;
  // dgrad phase class
  int ry, rx, iyf, ixf, qy, qx, Ty, Tx, Wc;
  // wgrad split index
  int s;
};

__device__ __forceinline__ void zero4(float* v, int n) {
  for (int i = 0; i < n; ++i) v[i] = 0.f;
}

template <int V>
__device__ __forceinline__ void gload(const float* ptr, float* v) {
  if (V == 4) {
    const float4 t = __ldg(reinterpret_cast<const float4*>(ptr));
    v[0] = t.x; v[1] = t.y; v[2] = t.z; v[3] = t.w;
  } else {
    v[0] = __ldg(ptr);
  }
}

// Op interface. Each operand (A, B) has
//   Fix  : the part of a thread's load address fixed for the whole main loop (its row m / column j), a_fix/b_fix;
//   Cur  : a cursor over the reduction index k, created once per block (a_cur/b_cur: the only divisions) and
//          advanced by BK every step (a_next/b_next: compares and adds, no integer division in the main loop);
//   load : V consecutive elements along the operand's contiguous dimension, 0 where out of range or padding.
// The stores go to out + row_off(m) + col_off(j).

// Forward: C[f][j] = sum_k w[k][g*Fg + f] * xpatch[k][j],  k = (c, ky, kx), j = (oy, ox, n).
struct FwdOp {
  static constexpr bool A_KCONTIG = false;  // w rows are contiguous along f (= M)
  static constexpr bool B_KCONTIG = false;  // x patches are contiguous along n (= columns)

  static __device__ __forceinline__ void setup(const ConvParams& p, int z, Slice& s) {
    s.g = z;
    s.M = p.Fg;
    s.Nc = p.J;
    s.k_lo = 0;
    s.k_hi = p.Cg * p.KH * p.KW;
  }
  struct AFix { int m; };
  static __device__ __forceinline__ AFix a_fix(const ConvParams&, const Slice&, int m) { return {m}; }
  struct ACur { int k; };
  static __device__ __forceinline__ ACur a_cur(const ConvParams&, const Slice&, int k) { return {k}; }
  static __device__ __forceinline__ void a_next(const ConvParams&, const Slice&, ACur& c, int step) { c.k += step; }
  template <int V>
  static __device__ __forceinline__ void load_a(const ConvParams& p, const Slice& s, const AFix& a, const ACur& c,
                                                float* v) {
    if (a.m < s.M && c.k < s.k_hi) gload<V>(p.A + c.k * p.F + s.g * p.Fg + a.m, v);
    else zero4(v, V);
  }
  struct BFix { int iyb, ixb, off; bool ok; };
  static __device__ __forceinline__ BFix b_fix(const ConvParams& p, const Slice& s, int j) {
    BFix b;
    b.ok = j < s.Nc;
    const int n = j % p.N, pix = j / p.N, oy = pix / p.OW, ox = pix - oy * p.OW;
    b.iyb = oy * p.sh - p.ph;
    b.ixb = ox * p.sw - p.pw;
    b.off = s.g * p.Cg * p.HWN + n;
    return b;
  }
  // k = (c*KH + ky)*KW + kx with kx < KW, ky < KH, so k < k_hi <=> c < Cg.
  struct BCur { int c, ky, kx; };
  static __device__ __forceinline__ BCur b_cur(const ConvParams& p, const Slice&, int k) {
    const int khw = p.KH * p.KW;
    const int c = k / khw, r = k - c * khw, ky = r / p.KW;
    return {c, ky, r - ky * p.KW};
  }
  static __device__ __forceinline__ void b_next(const ConvParams& p, const Slice&, BCur& c, int step) {
    c.kx += step;
    while (c.kx >= p.KW) {
      c.kx -= p.KW;
      if (++c.ky == p.KH) {
        c.ky = 0;
        ++c.c;
      }
    }
  }
  template <int V>
  static __device__ __forceinline__ void load_b(const ConvParams& p, const Slice&, const BFix& b, const BCur& c,
                                                float* v) {
    const int iy = b.iyb + c.ky, ix = b.ixb + c.kx;
    if (b.ok && c.c < p.Cg && iy >= 0 && iy < p.H && ix >= 0 && ix < p.W)
      gload<V>(p.B + b.off + (c.c * p.H + iy) * p.W * p.N + ix * p.N, v);
    else zero4(v, V);
  }
  static __device__ __forceinline__ int row_off(const ConvParams& p, const Slice& s, int m) {
    return (s.g * p.Fg + m) * p.J;
  }
  static __device__ __forceinline__ int col_off(const ConvParams&, const Slice&, int j) { return j; }
  static __device__ __forceinline__ float row_bias(const ConvParams& p, const Slice& s, int m) {
    return p.bias ? p.bias[s.g * p.Fg + m] : 0.f;
  }
};

// ------------------------------------------------------------------------------------------------------------
// Input gradient, one (group, phase class) per z: C[c][j] = sum_{t,u,f} w[c, ry+sh*t, rx+sw*u, f] *
// dy[f, qy+a-t, qx+b-u, n], j = (a, b, n) with iy = iyf + sh*a, ix = ixf + sw*b; k = (t, u, f), f fastest.
struct DgradOp {
  static constexpr bool A_KCONTIG = true;   // w[c, ky, kx, :] is contiguous along f (part of K)
  static constexpr bool B_KCONTIG = false;  // dy contiguous along n (columns)

  static __device__ __forceinline__ void setup(const ConvParams& p, int z, Slice& s) {
    const int phases = p.sh * p.sw;
    s.g = z / phases;
    const int ph_idx = z - s.g * phases;
    s.ry = ph_idx / p.sw;
    s.rx = ph_idx - s.ry * p.sw;
    s.iyf = ((s.ry - p.ph) % p.sh + p.sh) % p.sh;
    s.ixf = ((s.rx - p.pw) % p.sw + p.sw) % p.sw;
    const int Hc = s.iyf < p.H ? (p.H - 1 - s.iyf) / p.sh + 1 : 0;
    s.Wc = s.ixf < p.W ? (p.W - 1 - s.ixf) / p.sw + 1 : 0;
    s.qy = (s.iyf + p.ph - s.ry) / p.sh;
    s.qx = (s.ixf + p.pw - s.rx) / p.sw;
    s.Ty = s.ry < p.KH ? (p.KH - 1 - s.ry) / p.sh + 1 : 0;
    s.Tx = s.rx < p.KW ? (p.KW - 1 - s.rx) / p.sw + 1 : 0;
    s.M = p.Cg;
    s.Nc = Hc * s.Wc * p.N;
    s.k_lo = 0;
    s.k_hi = s.Ty * s.Tx * p.Fg;
  }
  // The k cursor of both operands: k = (t*Tx + u)*Fg + f with f < Fg, u < Tx, so k < k_hi <=> t < Ty.
  struct KCur { int f, u, t; };
  static __device__ __forceinline__ KCur k_cur(const ConvParams& p, const Slice& s, int k) {
    const int tu = k / p.Fg, t = s.Tx > 0 ? tu / s.Tx : 0;
    return {k - tu * p.Fg, tu - t * s.Tx, t};
  }
  static __device__ __forceinline__ void k_next(const ConvParams& p, const Slice& s, KCur& c, int step) {
    c.f += step;
    while (c.f >= p.Fg) {
      c.f -= p.Fg;
      if (++c.u == s.Tx) {
        c.u = 0;
        ++c.t;
      }
    }
  }
  struct AFix { int off; bool ok; };
  static __device__ __forceinline__ AFix a_fix(const ConvParams& p, const Slice& s, int m) {
    const bool ok = m < s.M;  // (offsets of rows past the end are never formed: no int overflow)
    return {ok ? m * p.KH * p.KW * p.F + s.g * p.Fg : 0, ok};
  }
  using ACur = KCur;
  static __device__ __forceinline__ ACur a_cur(const ConvParams& p, const Slice& s, int k) { return k_cur(p, s, k); }
  static __device__ __forceinline__ void a_next(const ConvParams& p, const Slice& s, ACur& c, int step) {
    k_next(p, s, c, step);
  }
  template <int V>
  static __device__ __forceinline__ void load_a(const ConvParams& p, const Slice& s, const AFix& a, const ACur& c,
                                                float* v) {
    if (a.ok && c.t < s.Ty) {
      const int ky = s.ry + p.sh * c.t, kx = s.rx + p.sw * c.u;
      gload<V>(p.A + a.off + (ky * p.KW + kx) * p.F + c.f, v);
    } else {
      zero4(v, V);
    }
  }
  struct BFix { int ya, xb, off; bool ok; };
  static __device__ __forceinline__ BFix b_fix(const ConvParams& p, const Slice& s, int j) {
    BFix b;
    b.ok = j < s.Nc;
    const int n = j % p.N, pix = j / p.N, a = pix / s.Wc, bb = pix - a * s.Wc;
    b.ya = s.qy + a;
    b.xb = s.qx + bb;
    b.off = s.g * p.Fg * p.J + n;
    return b;
  }
  using BCur = KCur;
  static __device__ __forceinline__ BCur b_cur(const ConvParams& p, const Slice& s, int k) { return k_cur(p, s, k); }
  static __device__ __forceinline__ void b_next(const ConvParams& p, const Slice& s, BCur& c, int step) {
    k_next(p, s, c, step);
  }
  template <int V>
  static __device__ __forceinline__ void load_b(const ConvParams& p, const Slice& s, const BFix& b, const BCur& c,
                                                float* v) {
    const int oy = b.ya - c.t, ox = b.xb - c.u;
    if (b.ok && c.t < s.Ty && oy >= 0 && oy < p.OH && ox >= 0 && ox < p.OW)
      gload<V>(p.B + b.off + c.f * p.J + (oy * p.OW + ox) * p.N, v);
    else zero4(v, V);
  }
  static __device__ __forceinline__ int row_off(const ConvParams& p, const Slice& s, int m) {
    return (s.g * p.Cg + m) * p.HWN;
  }
  static __device__ __forceinline__ int col_off(const ConvParams& p, const Slice& s, int j) {
    const int n = j % p.N, pix = j / p.N, a = pix / s.Wc, bb = pix - a * s.Wc;
    return ((s.iyf + p.sh * a) * p.W + s.ixf + p.sw * bb) * p.N + n;
  }
  static __device__ __forceinline__ float row_bias(const ConvParams&, const Slice&, int) { return 0.f; }
};

// ------------------------------------------------------------------------------------------------------------
// Filter gradient, one (group, K chunk) per z: C[k][f] = sum_{j in chunk} xpatch[k][j] * dy[g*Fg + f][j],
// k = (c, ky, kx) (the rows of dw viewed as (Cg*KH*KW, F)), j = (oy, ox, n) (the reduction index here).
struct WgradOp {
  static constexpr bool A_KCONTIG = true;  // x patch rows are contiguous along n (part of K = j)
  static constexpr bool B_KCONTIG = true;  // dy[f][:] contiguous along j

  static __device__ __forceinline__ void setup(const ConvParams& p, int z, Slice& s) {
    s.g = z / p.splits;
    s.s = z - s.g * p.splits;
    s.M = p.Cg * p.KH * p.KW;
    s.Nc = p.Fg;
    s.k_lo = s.s * p.chunk;
    s.k_hi = min(p.J, s.k_lo + p.chunk);
  }
  struct AFix { int off, ky, kx; bool ok; };
  static __device__ __forceinline__ AFix a_fix(const ConvParams& p, const Slice& s, int m) {
    AFix a;
    a.ok = m < s.M;
    if (!a.ok) m = 0;  // rows past the end: any in-range decomposition (never loaded)
    const int khw = p.KH * p.KW;
    const int c = m / khw, r = m - c * khw;
    a.ky = r / p.KW;
    a.kx = r - a.ky * p.KW;
    a.off = (s.g * p.Cg + c) * p.HWN;
    return a;
  }
  struct ACur { int j, n, ox, oy; };
  static __device__ __forceinline__ ACur a_cur(const ConvParams& p, const Slice&, int j) {
    const int pix = j / p.N, oy = pix / p.OW;
    return {j, j - pix * p.N, pix - oy * p.OW, oy};
  }
  static __device__ __forceinline__ void a_next(const ConvParams& p, const Slice&, ACur& c, int step) {
    c.j += step;
    c.n += step;
    while (c.n >= p.N) {
      c.n -= p.N;
      if (++c.ox == p.OW) {
        c.ox = 0;
        ++c.oy;
      }
    }
  }
  template <int V>
  static __device__ __forceinline__ void load_a(const ConvParams& p, const Slice& s, const AFix& a, const ACur& c,
                                                float* v) {
    const int iy = c.oy * p.sh - p.ph + a.ky, ix = c.ox * p.sw - p.pw + a.kx;
    if (a.ok && c.j < s.k_hi && iy >= 0 && iy < p.H && ix >= 0 && ix < p.W)
      gload<V>(p.A + a.off + (iy * p.W + ix) * p.N + c.n, v);
    else zero4(v, V);
  }
  struct BFix { int off; bool ok; };
  static __device__ __forceinline__ BFix b_fix(const ConvParams& p, const Slice& s, int f) {
    const bool ok = f < s.Nc;
    return {ok ? (s.g * p.Fg + f) * p.J : 0, ok};
  }
  struct BCur { int j; };
  static __device__ __forceinline__ BCur b_cur(const ConvParams&, const Slice&, int j) { return {j}; }
  static __device__ __forceinline__ void b_next(const ConvParams&, const Slice&, BCur& c, int step) { c.j += step; }
  template <int V>
  static __device__ __forceinline__ void load_b(const ConvParams& p, const Slice& s, const BFix& b, const BCur& c,
                                                float* v) {
    if (b.ok && c.j < s.k_hi) gload<V>(p.B + b.off + c.j, v);
    else zero4(v, V);
  }
  static __device__ __forceinline__ int row_off(const ConvParams& p, const Slice& s, int m) {
    return (s.s * s.M + m) * p.F;
  }
  static __device__ __forceinline__ int col_off(const ConvParams& p, const Slice& s, int f) { return s.g * p.Fg + f; }
  static __device__ __forceinline__ float row_bias(const ConvParams&, const Slice&, int) { return 0.f; }
};

// ------------------------------------------------------------------------------------------------------------
// Which element of a BK x E operand tile a thread's load slot i covers. Vectors of V run along the operand's
// contiguous dimension: along E (M-contiguous) or along BK (K-contiguous).
template <int E, int BK, int NT, int V, bool KC>
struct Slots {
  static constexpr int VECS = E * BK / V;
  static constexpr int PER = (VECS + NT - 1) / NT;
  static_assert(E % V == 0 && BK % V == 0, "tile sizes must be multiples of the vector width");
  static __device__ __forceinline__ bool active(int tid, int i) { return PER * NT == VECS || tid + i * NT < VECS; }
  static __device__ __forceinline__ int mm(int tid, int i) {
    const int e = tid + i * NT;
    return KC ? e / (BK / V) : (e % (E / V)) * V;
  }
  static __device__ __forceinline__ int kk(int tid, int i) {
    const int e = tid + i * NT;
    return KC ? (e % (BK / V)) * V : e / (E / V);
  }
};

// conv_igemm: the implicit-GEMM convolution kernel shared by forward, dgrad and wgrad (Op selects which).
//   layouts: CHWN activations, (C/groups, KH, KW, F) filters (see the table at the top of this file);
//   block:   (BM/TM)*(BN/TN) threads computing a BM x BN tile of C, TM x TN outputs per thread;
//   grid:    (ceil(Nc/BN), ceil(M/BM), Op slices: groups [x stride phases | x K splits]);
//   shared:  2 x (BK x (BM+4) + BK x (BN+4)) floats, static (16.9 KB for 128x128);
//   requires: V == 4 only when N % 4 == 0, F/groups % 4 == 0 and 16-byte aligned pointers (host checks);
//            tensors < 2^31 elements. Writes every element of its tile exactly once (no atomics).
// Two resident blocks per SM for the 16-byte-path 256-thread tiles of up to 8x8 outputs per thread (caps them
// at 128 registers: 16 warps per SM); the 12x8 tiles and the scalar fallbacks get what they need.
template <int NT, int TM, int TN, int V>
constexpr int min_blocks() { return (V == 4 && NT == 256 && TM * TN <= 64) ? 2 : 1; }

template <class Op, int BM, int BN, int BK, int TM, int TN, int V, bool kRelu = false>
__global__ void __launch_bounds__((BM / TM) * (BN / TN), (min_blocks<(BM / TM) * (BN / TN), TM, TN, V>()))
    conv_igemm(ConvParams p) {
  constexpr int NT = (BM / TM) * (BN / TN);
  static_assert(!kRelu || std::is_same_v<Op, FwdOp>, "the ReLU epilogue is the forward's");
  constexpr int PA = BM + 4, PB = BN + 4;
  static_assert(TM % 4 == 0 && TN % 4 == 0, "register tiles are made of 4x4 float4 groups");
  using SA = Slots<BM, BK, NT, V, Op::A_KCONTIG>;
  using SB = Slots<BN, BK, NT, V, Op::B_KCONTIG>;

  SHARED(float4, As4, [2][BK][PA / 4]);
  SHARED(float4, Bs4, [2][BK][PB / 4]);
  float(*As)[BK][PA] = reinterpret_cast<float(*)[BK][PA]>(&As4[0][0][0]);
  float(*Bs)[BK][PB] = reinterpret_cast<float(*)[BK][PB]>(&Bs4[0][0][0]);

  Slice s;
  Op::setup(p, blockIdx.z, s);
  const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
  if (m0 >= s.M || n0 >= s.Nc) return;  // whole block (uniform): grid sized for the largest slice

  const int tid = threadIdx.x;
  typename Op::AFix afix[SA::PER];
  typename Op::BFix bfix[SB::PER];
#pragma unroll
  for (int i = 0; i < SA::PER; ++i) afix[i] = Op::a_fix(p, s, m0 + SA::mm(tid, i));
#pragma unroll
  for (int i = 0; i < SB::PER; ++i) bfix[i] = Op::b_fix(p, s, n0 + SB::mm(tid, i));

  typename Op::ACur acur[SA::PER];
  typename Op::BCur bcur[SB::PER];
#pragma unroll
  for (int i = 0; i < SA::PER; ++i) acur[i] = Op::a_cur(p, s, s.k_lo + SA::kk(tid, i));
#pragma unroll
  for (int i = 0; i < SB::PER; ++i) bcur[i] = Op::b_cur(p, s, s.k_lo + SB::kk(tid, i));

  // Loads the tile the cursors point at into registers, then moves the cursors on by BK.
  float ra[SA::PER][V], rb[SB::PER][V];
  auto load_tile = [&]() {
#pragma unroll
    for (int i = 0; i < SA::PER; ++i)
      if (SA::active(tid, i)) {
        Op::template load_a<V>(p, s, afix[i], acur[i], ra[i]);
        Op::a_next(p, s, acur[i], BK);
      }
#pragma unroll
    for (int i = 0; i < SB::PER; ++i)
      if (SB::active(tid, i)) {
        Op::template load_b<V>(p, s, bfix[i], bcur[i], rb[i]);
        Op::b_next(p, s, bcur[i], BK);
      }
  };
  auto store_tile = [&](int buf) {
#pragma unroll
    for (int i = 0; i < SA::PER; ++i) {
      if (!SA::active(tid, i)) continue;
      const int m = SA::mm(tid, i), k = SA::kk(tid, i);
      if (Op::A_KCONTIG) {
#pragma unroll
        for (int v = 0; v < V; ++v) As[buf][k + v][m] = ra[i][v];
      } else if (V == 4) {
        *reinterpret_cast<float4*>(&As[buf][k][m]) = make_float4(ra[i][0], ra[i][1], ra[i][2], ra[i][3]);
      } else {
        As[buf][k][m] = ra[i][0];
      }
    }
#pragma unroll
    for (int i = 0; i < SB::PER; ++i) {
      if (!SB::active(tid, i)) continue;
      const int n = SB::mm(tid, i), k = SB::kk(tid, i);
      if (Op::B_KCONTIG) {
#pragma unroll
        for (int v = 0; v < V; ++v) Bs[buf][k + v][n] = rb[i][v];
      } else if (V == 4) {
        *reinterpret_cast<float4*>(&Bs[buf][k][n]) = make_float4(rb[i][0], rb[i][1], rb[i][2], rb[i][3]);
      } else {
        Bs[buf][k][n] = rb[i][0];
      }
    }
  };

  const int tx = tid % (BN / TN), ty = tid / (BN / TN);
  constexpr int RS = BM / (TM / 4), CS = BN / (TN / 4);  // distance between a thread's 4-row / 4-column groups
  float acc[TM][TN];
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TN; ++j) acc[i][j] = 0.f;

  const int nk = s.k_hi > s.k_lo ? (s.k_hi - s.k_lo + BK - 1) / BK : 0;
  if (nk > 0) {
    load_tile();
    store_tile(0);
    __syncthreads();
    for (int t = 0; t < nk; ++t) {
      const int cur = t & 1;
      if (t + 1 < nk) load_tile();
#pragma unroll
      for (int kk = 0; kk < BK; ++kk) {
        float a[TM], b[TN];
#pragma unroll
        for (int q = 0; q < TM / 4; ++q) {
          const float4 v = *reinterpret_cast<const float4*>(&As[cur][kk][q * RS + ty * 4]);
          a[q * 4 + 0] = v.x; a[q * 4 + 1] = v.y; a[q * 4 + 2] = v.z; a[q * 4 + 3] = v.w;
        }
#pragma unroll
        for (int q = 0; q < TN / 4; ++q) {
          const float4 v = *reinterpret_cast<const float4*>(&Bs[cur][kk][q * CS + tx * 4]);
          b[q * 4 + 0] = v.x; b[q * 4 + 1] = v.y; b[q * 4 + 2] = v.z; b[q * 4 + 3] = v.w;
        }
#pragma unroll
        for (int i = 0; i < TM; ++i)
#pragma unroll
          for (int j = 0; j < TN; ++j) acc[i][j] += a[i] * b[j];
      }
      if (t + 1 < nk) store_tile(cur ^ 1);
      __syncthreads();
    }
  }

  // Epilogue: out = alpha * (acc + bias) + beta * out (beta == 0: out is not read), then the ReLU when kRelu.
  int coff[TN / 4][4];
#pragma unroll
  for (int q = 0; q < TN / 4; ++q)
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int n = n0 + q * CS + tx * 4 + r;
      coff[q][r] = (V == 4 && r > 0) ? coff[q][0] + r : (n < s.Nc ? Op::col_off(p, s, n) : 0);
    }
  const float alpha = p.alpha, beta = p.beta;
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const int m = m0 + (i / 4) * RS + ty * 4 + (i % 4);
    if (m >= s.M) continue;
    float* row = p.out + Op::row_off(p, s, m);
    const float bias = Op::row_bias(p, s, m);
#pragma unroll
    for (int q = 0; q < TN / 4; ++q) {
      const int n = n0 + q * CS + tx * 4;
      if (V == 4) {
        if (n >= s.Nc) continue;  // Nc % 4 == 0 on this path: the group is all in or all out
        float4* dst = reinterpret_cast<float4*>(row + coff[q][0]);
        float4 o = make_float4(alpha * (acc[i][q * 4 + 0] + bias), alpha * (acc[i][q * 4 + 1] + bias),
                               alpha * (acc[i][q * 4 + 2] + bias), alpha * (acc[i][q * 4 + 3] + bias));
        if (beta != 0.f) {
          const float4 old = *dst;
          o.x += beta * old.x; o.y += beta * old.y; o.z += beta * old.z; o.w += beta * old.w;
        }
        o.x = conv_activation<kRelu>(o.x); o.y = conv_activation<kRelu>(o.y);
        o.z = conv_activation<kRelu>(o.z); o.w = conv_activation<kRelu>(o.w);
        *dst = o;
      } else {
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          if (n + r >= s.Nc) continue;
          float* dst = row + coff[q][r];
          float o = alpha * (acc[i][q * 4 + r] + bias);
          if (beta != 0.f) o += beta * *dst;
          *dst = conv_activation<kRelu>(o);
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------------------
// conv_dgrad_direct<CMAX>: input gradient for few channels per group (Cg <= CMAX: 1- and 3-channel images, AlexNet
// conv1), where the implicit GEMM has only M = Cg rows and re-reads dy from L2 once per filter tap. Here a block
// keeps a window of dy in shared memory and applies every tap of its stride phase to it (reuse Ty*Tx*Cg per load).
//   layouts: dy (F, OH, OW, N), w (Cg, KH, KW, F), dx (C, H, W, N); phases (ry, rx), class-local pixels (a, b)
//            with iy = iyf + sh*a, ix = ixf + sw*b and taps (t, u) exactly as DgradOp (Slice from DgradOp::setup).
//   block:   256 threads = 8 warps; lane = image n0 + lane (32 consecutive images: 128-byte accesses). The block
//            owns a kTA x kTB = 4 x 8 tile of class pixels; warp w owns row w/2, columns (w%2)*4 + [0, 4), so a
//            thread accumulates CMAX channels x 4 pixels.
//   grid:    x = tiles of the largest class (ceil(ceil(H/sh)/4) * ceil(ceil(W/sw)/8)), y = ceil(N/32),
//            z = groups * stride phases.
//   shared:  dys[kFC][kWin][32]: the dy window ((4+Ty-1) x (8+Tx-1) pixels x 32 images) of kFC = 4 filters,
//            ws4[kTaps][kFC]: their weights, the 4 channels of a (tap, filter) as one float4 (a broadcast
//            16-byte load); per tap and filter a thread does 4 dy loads + 1 weight load for 4*CMAX FMAs.
//            Two barriers per 4 filters. 40 KB + 2 KB static.
//   requires (host): Cg <= CMAX, (4+Ty-1)*(8+Tx-1) <= kWin = 80, Ty*Tx <= kTaps = 32 (Ty = ceil(KH/sh) ...).
constexpr int kTA = 4, kTB = 8, kFC = 4, kWin = 80, kTaps = 32;

template <int CMAX>
__global__ void __launch_bounds__(256, 1) conv_dgrad_direct(ConvParams p) {
  static_assert(CMAX >= 1 && CMAX <= 4, "channels of a tap travel as one float4");
  SHARED(float, dys, [kFC][kWin][32]);
  SHARED(float4, ws4, [kTaps][kFC]);  // w[c = 0..3 (zero past Cg)] of (tap, filter): one broadcast 16-byte load
  Slice s;
  DgradOp::setup(p, blockIdx.z, s);
  const int Hc = s.iyf < p.H ? (p.H - 1 - s.iyf) / p.sh + 1 : 0;
  const int tiles_b = ((p.W + p.sw - 1) / p.sw + kTB - 1) / kTB;
  const int a0 = (blockIdx.x / tiles_b) * kTA, b0 = (blockIdx.x % tiles_b) * kTB;
  if (a0 >= Hc || b0 >= s.Wc) return;  // whole block (uniform): the grid is sized for the largest class
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int n = blockIdx.y * 32 + lane;
  const int pa = warp >> 1, pb = (warp & 1) * 4;  // tile-local row and first column of this thread's pixels
  const int Ty = s.Ty, Tx = s.Tx, WA = kTA + Ty - 1, WB = kTB + Tx - 1, taps = Ty * Tx;
  const int oy0 = s.qy + a0 - (Ty - 1), ox0 = s.qx + b0 - (Tx - 1);  // dy pixel of window (0, 0)

  float acc[CMAX][4];
#pragma unroll
  for (int c = 0; c < CMAX; ++c)
#pragma unroll
    for (int q = 0; q < 4; ++q) acc[c][q] = 0.f;

  for (int f0 = 0; taps > 0 && f0 < p.Fg; f0 += kFC) {
    __syncthreads();  // the previous step's reads are done
    // dy window: row r = (f, wa, wb) of kFC*WA*WB rows of 32 images; warp w loads rows w, w+8, ...
    {
      int r = warp, f = r / (WA * WB), rem = r - f * (WA * WB), wa = rem / WB, wb = rem - wa * WB;
      const int rows = kFC * WA * WB;
      for (; r < rows; r += 8) {
        const int fg = f0 + f, oy = oy0 + wa, ox = ox0 + wb;
        float v = 0.f;
        if (fg < p.Fg && oy >= 0 && oy < p.OH && ox >= 0 && ox < p.OW && n < p.N)
          v = __ldg(p.B + (((s.g * p.Fg + fg) * p.OH + oy) * p.OW + ox) * p.N + n);
        dys[f][wa * WB + wb][lane] = v;
        wb += 8;  // next row of this warp: WB >= 8, so at most one wrap
        if (wb >= WB) {
          wb -= WB;
          if (++wa == WA) {
            wa = 0;
            ++f;
          }
        }
      }
    }
    float* wsf = reinterpret_cast<float*>(&ws4[0][0]);
    for (int i = threadIdx.x; i < kTaps * kFC * 4; i += 256) {  // i = (tap * kFC + f) * 4 + c
      const int c = i & 3, f = (i >> 2) % kFC, tap = (i >> 2) / kFC;
      float v = 0.f;
      if (tap < taps && c < p.Cg && f0 + f < p.Fg) {
        const int t = tap / Tx, u = tap - t * Tx;
        v = __ldg(p.A + ((c * p.KH + s.ry + p.sh * t) * p.KW + s.rx + p.sw * u) * p.F + s.g * p.Fg + f0 + f);
      }
      wsf[i] = v;
    }
    __syncthreads();
#pragma unroll
    for (int f = 0; f < kFC; ++f)
      for (int t = 0; t < Ty; ++t)
        for (int u = 0; u < Tx; ++u) {
          const float* row = &dys[f][(pa + Ty - 1 - t) * WB + pb + Tx - 1 - u][lane];
          float d[4];
#pragma unroll
          for (int q = 0; q < 4; ++q) d[q] = row[q * 32];  // pixel columns pb+q: consecutive window columns
          const float4 w4 = ws4[t * Tx + u][f];
          const float wc[4] = {w4.x, w4.y, w4.z, w4.w};
#pragma unroll
          for (int c = 0; c < CMAX; ++c)
#pragma unroll
            for (int q = 0; q < 4; ++q) acc[c][q] += wc[c] * d[q];
        }
  }

  // dx = alpha * acc + beta * dx (beta == 0: not read); every class pixel of the tile, every image < N.
  const int a = a0 + pa;
  if (a >= Hc || n >= p.N) return;
  const int iy = s.iyf + p.sh * a;
#pragma unroll
  for (int c = 0; c < CMAX; ++c) {
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int b = b0 + pb + q;
      if (c >= p.Cg || b >= s.Wc) continue;  // (no break: keeps the loops unrolled, acc in registers)
      float* dst = p.out + (((s.g * p.Cg + c) * p.H + iy) * p.W + s.ixf + p.sw * b) * p.N + n;
      float o = p.alpha * acc[c][q];
      if (p.beta != 0.f) o += p.beta * *dst;
      *dst = o;
    }
  }
}

// ------------------------------------------------------------------------------------------------------------
// dw = alpha * sum_s ws[s] + beta * dw, summed in split order (deterministic).
// block: 256 threads, grid-stride over the K*F elements of dw; V = 4 when total % 4 == 0 and aligned.
template <int V>
__global__ void __launch_bounds__(256) conv_wgrad_reduce(const float* ws, float* dw, int total, int splits,
                                                          float alpha, float beta) {
  const int nvec = total / V;
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < nvec; i += gridDim.x * blockDim.x) {
    float acc[V];
    for (int v = 0; v < V; ++v) acc[v] = 0.f;
    for (int sp = 0; sp < splits; ++sp) {
      float t[V];
      gload<V>(ws + static_cast<std::int64_t>(sp) * total + i * V, t);
      for (int v = 0; v < V; ++v) acc[v] += t[v];
    }
    for (int v = 0; v < V; ++v) {
      float o = alpha * acc[v];
      if (beta != 0.f) o += beta * dw[i * V + v];
      dw[i * V + v] = o;
    }
  }
}

// ------------------------------------------------------------------------------------------------------------
// Bias gradient: db[f] = alpha * sum(dy[f, :]) + beta * db[f], dy viewed as (F, L), L = OH*OW*N.
// conv_bias_grad<V>: block (f, c) = (blockIdx.x, blockIdx.y) of 256 threads sums chunk c of row f,
// dy[f, c*chunk : min(L, (c+1)*chunk)): each thread a strided subset (float4 when L % 4 == 0 and aligned; chunk is
// a multiple of 4, so every chunk starts 16-byte aligned), then warp shuffles and an 8-entry shared array finish the
// block's sum in a fixed order. With one chunk (gridDim.y == 1) the block writes db[f] itself; otherwise it writes
// its partial sum to partials[c * F + f] and conv_bias_reduce adds the chunks of each filter in chunk order.
// Deterministic (no float atomics): the chunking depends on (F, L) only (conv.cu, bias_plan), so every GPU and the
// emulator add the same numbers in the same order.
template <int V>
__global__ void __launch_bounds__(256) conv_bias_grad(const float* dy, float* db, float* partials, std::int64_t L,
                                                       std::int64_t chunk, float alpha, float beta) {
  SHARED(float, warp_sums, [8]);
  const float* row = dy + static_cast<std::int64_t>(blockIdx.x) * L;
  const std::int64_t lo = static_cast<std::int64_t>(blockIdx.y) * chunk;
  const std::int64_t hi = lo + chunk < L ? lo + chunk : L;
  float sum = 0.f;
  for (std::int64_t i = lo / V + threadIdx.x; i < hi / V; i += 256) {
    float t[V];
    gload<V>(row + i * V, t);
    for (int v = 0; v < V; ++v) sum += t[v];
  }
  for (int off = 16; off > 0; off >>= 1) sum += __shfl_down_sync(0xffffffffu, sum, off);
  if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = sum;
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.f;
    for (int w = 0; w < 8; ++w) total += warp_sums[w];
    if (gridDim.y > 1) {
      partials[static_cast<std::int64_t>(blockIdx.y) * gridDim.x + blockIdx.x] = total;
      return;
    }
    float o = alpha * total;
    if (beta != 0.f) o += beta * db[blockIdx.x];
    db[blockIdx.x] = o;
  }
}

// db[f] = alpha * sum_c partials[c * F + f] + beta * db[f], chunks added in order. block: 256 threads, one filter
// per thread (grid-stride).
__global__ void __launch_bounds__(256) conv_bias_reduce(const float* partials, float* db, int F, int chunks,
                                                         float alpha, float beta) {
  for (int f = blockIdx.x * blockDim.x + threadIdx.x; f < F; f += gridDim.x * blockDim.x) {
    float acc = 0.f;
    for (int c = 0; c < chunks; ++c) acc += partials[static_cast<std::int64_t>(c) * F + f];
    float o = alpha * acc;
    if (beta != 0.f) o += beta * db[f];
    db[f] = o;
  }
}

}  // namespace
}  // namespace convnet
