// TF32 tensor-core convolution (API in conv_tf32.h): implicit GEMMs on mma.sync.m16n8k8 with a multi-stage
// cp.async pipeline. This comment is the forward's contract; the input and filter gradients' (conv_bwd_tf32) is
// further down, and they share the forward's tile table, planner style and test overrides.
//
// GEMM per group g (z of the grid):  D[m][p] = sum_k A[m][k] B[k][p]
//   M = Fg = F/groups filters:          A[m][k] = w[k * F + g*Fg + m]       (w is (Cg, KH, KW, F): k-major, m fastest)
//   N = P = OH*OW*N, images fastest:    B[k][p] = x[g*Cg + c, oh*sh - ph + kh, ow*sw - pw + kw, n], zero outside the
//                                       image, with k = (c*KH + kh)*KW + kw and p = (oh*OW + ow)*N + n
//   K = Cg*KH*KW;                       y[g*Fg + m][p] is y's flat (F, OH*OW*N) matrix, so the epilogue writes rows.
//
// Block: a BM x BN tile of D (grid x: ceil(P/BN) pixel-image tiles, y: ceil(Fg/BM) filter tiles, z: groups), WM x WN
// warps of 32 threads, each warp a (BM/WM) x (BN/WN) sub-tile = MT x NT mma tiles of 16 x 8 (MT = BM/WM/16,
// NT = BN/WN/8), MT*NT*4 FP32 accumulators per thread.
// Shared memory, per stage: As[BK][BM + 8] (k-major, as w in global memory) and Bs[BK][BN + 8] (k-major, as x).
// The +8 padding makes the row pitch = 8 (mod 32 banks): a fragment load reads (k = tig + c, m = gid + c') for the
// 32 lanes (gid = lane/4, tig = lane%4, mma_fragments.cuh), banks 8*tig + gid, all different: conflict-free. Rows
// stay 16-byte aligned (pitch a multiple of 4 floats) for the cp.async destinations.
// Loads: each thread copies the same column(s) of every stage (T = 32*WM*WN threads; static_asserts below give the
// divisibility rules: BM, BN multiples of 32, T a multiple of BM/V and of BN/V, BK*BM/V and BK*BN/V multiples of
// T), V = 4 floats (cp.async 16 bytes: 4 images of one pixel, 4 filters) or V = 1 (4 bytes, any N, any Fg). Out of
// the image (padding), k >= K, m >= Fg or p >= P: cp.async with src-size 0 writes zeros (the source address is then
// never read; x or w itself is passed, aligned). Hence any N, Fg, K: the tails are zero-filled, never branched
// around in the mma loop.
// Fragment ownership: A (16x8, row m, col k) a0..a3 and B (8x8, row k, col n) b0, b1 from mma::tf32_a / tf32_b; each
// element is rounded with tf32_bits (cvt.rna) as it is read from shared memory (a cp.async cannot convert).
// ldmatrix is not used: on 32-bit data it loads fragments of a row-major [m][k] tile only, and both operands are
// k-major here (the layouts of w and x; transposing while staging would cost the 16-byte copies).
// Pipeline (STAGES buffers, tile t in stage t % STAGES): prologue issues tiles 0..STAGES-2, one commit each; loop
// iteration t: wait until at most STAGES-2 groups are pending (tile t has landed, in this thread), __syncthreads
// (every thread's copies of tile t visible; every thread is past its reads of tile t-1), issue tile t+STAGES-1
// into stage (t-1) % STAGES, commit (always, also empty, so the group counts stay aligned), then the mma on stage
// t % STAGES. One barrier per k tile serves both rules of cuda_compat.h.
// Epilogue: accumulator (row gid [+8], cols 2*tig, 2*tig+1) of each mma tile, y = alpha*(acc + bias) + beta*y,
// then max(y, 0) with kRelu (conv_epilogue.cuh, shared with the FP32 forward).
//
// Expected share of TF32 peak (paper estimate, tile 64x128x16, 8 warps, 3 stages, 16-byte path): per warp and k8
// step 8 mma (8192 FMA) against 16 LDS.32 + 16 cvt for the fragments, plus the tile's cp.async writes (BK*(BM+BN)*4
// = 12 KiB per block k tile, about 6 shared-memory cycles per warp k8 step). Shared memory (128 B/clock/SM) then
// needs ~22 clocks per warp k8 step. A100: 8 mma at 512 TF32 FMA/clock/SM = 16 clocks, so ~70% at best, ~50-60%
// after the per-stage index arithmetic, pipeline fill and tails (~80-95 of 156 TFLOP/s). H100 SXM: the tensor cores
// need 8 clocks (1024 FMA/clock/SM), so shared-memory bound at ~35% of the 495 TFLOP/s dense TF32 peak
// (~150-170 TFLOP/s, 3-4x our FP32 FFMA kernels); going further needs ldmatrix-friendly layouts or wgmma.
// Not measured on a GPU yet.
#include "cuda_compat.h"
#include "kernels/chwn_vec.h"
#include "kernels/conv_epilogue.cuh"
#include "kernels/conv_tf32.h"
#include "kernels/mma_fragments.cuh"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>
#include <string>

namespace convnet {
namespace {

struct Tf32ConvParams {
  const float* x;
  const float* w;
  const float* bias;  // null: none
  float* y;
  float alpha, beta;
  int C, H, W, N, F, Fg, Cg, KH, KW, sh, sw, ph, pw, OH, OW;
  int K;  // Cg*KH*KW
  int P;  // OH*OW*N
};

enum Defect : int { kNoDefect = 0, kNoWait = 1, kNoBarrier = 2, kSwappedA = 3 };

template <int BM, int BN, int BK, int WM, int WN, int STAGES, int V, int kDefect, bool kRelu = false>
__global__ void conv_fwd_tf32(Tf32ConvParams p) {
  constexpr int T = 32 * WM * WN;
  constexpr int LDA = BM + 8, LDB = BN + 8;
  constexpr int MT = BM / WM / 16, NT = BN / WN / 8;
  static_assert(BM % 32 == 0 && BN % 32 == 0, "BM, BN multiples of 32 (row pitch 8 mod 32 banks)");
  static_assert(BM % (16 * WM) == 0 && BN % (8 * WN) == 0, "warp tiles of whole 16x8 mma tiles");
  static_assert(BK % 8 == 0, "BK a multiple of the mma's k = 8");
  static_assert(STAGES >= 2, "at least double buffering");
  static_assert(V == 1 || V == 4, "4- or 16-byte copies");
  static_assert(T % (BM / V) == 0 && T % (BN / V) == 0, "each thread copies fixed columns");
  static_assert((BK * BM / V) % T == 0 && (BK * BN / V) % T == 0, "every thread copies the same number of chunks");

  // float4: 16-byte aligned rows for cp.async.
  SHARED(float4, smem_a, [STAGES * BK * LDA / 4]);
  SHARED(float4, smem_b, [STAGES * BK * LDB / 4]);
  float* As = reinterpret_cast<float*>(smem_a);
  float* Bs = reinterpret_cast<float*>(smem_b);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm0 = (warp / WN) * (BM / WM), wn0 = (warp % WN) * (BN / WN);
  const int group = blockIdx.z;
  const int m0 = blockIdx.y * BM;
  const int p0 = blockIdx.x * BN;
  const int KHW = p.KH * p.KW;
  const int ktiles = (p.K + BK - 1) / BK;

  // This thread's A column (filters m_col .. m_col+V-1) and first k row; rows step by T / (BM/V).
  constexpr int kAStep = T / (BM / V), kAChunks = BK * BM / V / T;
  const int a_col = (tid % (BM / V)) * V, a_row = tid / (BM / V);
  const bool a_in = m0 + a_col < p.Fg;  // V = 4: Fg % 4 == 0, so the 4 filters are in or out together
  const float* a_src = p.w + std::int64_t(group) * p.Fg + m0 + a_col;

  // This thread's B column (V images of one output pixel) and its window origin; k rows step by T / (BN/V).
  constexpr int kBStep = T / (BN / V), kBChunks = BK * BN / V / T;
  const int b_col = (tid % (BN / V)) * V, b_row = tid / (BN / V);
  const int pcol = p0 + b_col;
  const bool b_in = pcol < p.P;  // V = 4: N % 4 == 0 and pcol % 4 == 0, so the 4 images share a pixel
  int ih0 = 0, iw0 = 0, img = 0;
  if (b_in) {
    img = pcol % p.N;
    const int q = pcol / p.N;
    ih0 = (q / p.OW) * p.sh - p.ph;
    iw0 = (q % p.OW) * p.sw - p.pw;
  }
  const float* b_base = p.x + std::int64_t(group) * p.Cg * p.H * p.W * p.N + img;

  const auto load_tile = [&](int stage, int kt) {
    float* as = As + stage * BK * LDA;
    float* bs = Bs + stage * BK * LDB;
#pragma unroll
    for (int j = 0; j < kAChunks; ++j) {
      const int r = a_row + j * kAStep, k = kt * BK + r;
      const bool ok = a_in && k < p.K;
      const float* src = ok ? a_src + std::int64_t(k) * p.F : p.w;
      cp_async_ca<4 * V>(as + r * LDA + a_col, src, ok ? 4 * V : 0);
    }
#pragma unroll
    for (int j = 0; j < kBChunks; ++j) {
      const int r = b_row + j * kBStep, k = kt * BK + r;
      bool ok = b_in && k < p.K;
      const float* src = p.x;
      if (ok) {
        const int c = k / KHW, rest = k - c * KHW;
        const int ih = ih0 + rest / p.KW, iw = iw0 + rest % p.KW;
        ok = ih >= 0 && ih < p.H && iw >= 0 && iw < p.W;
        if (ok) src = b_base + ((std::int64_t(c) * p.H + ih) * p.W + iw) * p.N;
      }
      cp_async_ca<4 * V>(bs + r * LDB + b_col, src, ok ? 4 * V : 0);
    }
  };

  float acc[MT][NT][4];
#pragma unroll
  for (int i = 0; i < MT; ++i) {
#pragma unroll
    for (int j = 0; j < NT; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;
    }
  }

  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < ktiles) load_tile(s, s);
    cp_async_commit();
  }

  for (int kt = 0; kt < ktiles; ++kt) {
    if constexpr (kDefect != kNoWait) cp_async_wait<STAGES - 2>();
    if constexpr (kDefect != kNoBarrier) __syncthreads();
    const int next = kt + STAGES - 1;
    if (next < ktiles) load_tile(next % STAGES, next);
    cp_async_commit();

    // Braces everywhere below: a `#pragma unroll` directly after an unbraced `if constexpr (false-here)` made nvcc
    // 13.0 drop the rest of this loop (no mma in the PTX; the emulator cannot see that: a test reads the PTX).
    const float* as = As + (kt % STAGES) * BK * LDA;
    const float* bs = Bs + (kt % STAGES) * BK * LDB;
#pragma unroll
    for (int k8 = 0; k8 < BK; k8 += 8) {
      std::uint32_t fa[MT][4], fb[NT][2];
#pragma unroll
      for (int i = 0; i < MT; ++i) {
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const mma::RowCol rc = mma::tf32_a(lane, r);
          fa[i][r] = tf32_bits(as[(k8 + rc.col) * LDA + wm0 + i * 16 + rc.row]);
        }
      }
      if constexpr (kDefect == kSwappedA) {
        for (int i = 0; i < MT; ++i) {
          const std::uint32_t t = fa[i][1];
          fa[i][1] = fa[i][2];
          fa[i][2] = t;
        }
      }
#pragma unroll
      for (int j = 0; j < NT; ++j) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const mma::RowCol rc = mma::tf32_b(lane, r);
          fb[j][r] = tf32_bits(bs[(k8 + rc.row) * LDB + wn0 + j * 8 + rc.col]);
        }
      }
#pragma unroll
      for (int i = 0; i < MT; ++i) {
#pragma unroll
        for (int j = 0; j < NT; ++j) mma_tf32_m16n8k8(acc[i][j], fa[i], fb[j], acc[i][j]);
      }
    }
  }
  cp_async_wait<0>();  // no copy outlives the block (the trailing groups are empty)

#pragma unroll
  for (int i = 0; i < MT; ++i) {
#pragma unroll
    for (int j = 0; j < NT; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const mma::RowCol rc = mma::accumulator(lane, e);
        const int m = m0 + wm0 + i * 16 + rc.row, col = p0 + wn0 + j * 8 + rc.col;
        if (m >= p.Fg || col >= p.P) continue;
        const int f = group * p.Fg + m;
        float v = acc[i][j][e];
        if (p.bias) v += p.bias[f];
        float* out = p.y + std::int64_t(f) * p.P + col;
        *out = conv_activation<kRelu>(p.beta == 0.0f ? p.alpha * v : p.alpha * v + p.beta * *out);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------------------
// The backward passes: one implicit-GEMM template, conv_bwd_tf32<Op, ...>, for the input gradient (Op = DgradTf32)
// and the filter gradient (Op = WgradTf32). GEMM per z slice: D[m][n] = sum_{k in [k_lo, k_hi)} A[m][k] B[k][n].
//
// Input gradient, z = group g (M = Cg input channels, N = P = H*W*N input pixel-images, images fastest, K = Fg*KH*KW):
//   A[m][k] = w[m, kh, kw, g*Fg + f] with k = (kh*KW + kw)*Fg + f (f fastest: w's own order, so A's rows are
//             contiguous along k);
//   B[k][p] = dy[g*Fg + f, oh, ow, n] where p = (h*W + w)*N + n, h + ph - kh = oh*sh and w + pw - kw = ow*sw exactly,
//             0 <= oh < OH, 0 <= ow < OW; zero otherwise (stride holes and borders: zero-filled copies, see loads);
//   dx[g*Cg + m][p] = alpha * D + beta * dx, dx's flat (C, H*W*N) matrix.
//   With stride s > 1 only 1/(sh*sw) of the K products are non-zero: the mma does the zero work too (the FP32 kernel's
//   phase classes avoid it; AlexNet's one strided convolution is conv1, whose input gradient training skips).
// Filter gradient, z = g * splits + split (M = Fg filters, N = Cg*KH*KW taps (c, kh, kw), K = J = OH*OW*N, cut into
//   `splits` chunks of `chunk` (a multiple of BK) for parallelism):
//   A[m][j] = dy[g*Fg + m][j] (dy's flat (F, J) rows: contiguous along k);
//   B[j][n] = x[g*Cg + c, oh*sh - ph + kh, ow*sw - pw + kw, img], j = (oh*OW + ow)*N + img, zero outside the image
//             (contiguous along k = j: 4 consecutive j are 4 images of one pixel when N % 4 == 0);
//   one split: dw[(c*KH + kh)*KW + kw][g*Fg + m] = alpha * D + beta * dw (dw's flat (Cg*KH*KW, F) matrix);
//   several: the split's partial sum D goes to workspace[split][same index] and conv_wgrad_tf32_reduce sums the
//   splits in order, then applies alpha/beta (the FP32 filter gradient's workspace protocol: conv_wgrad_reduce).
//   Deterministic: no atomics, a plan that depends on the geometry only.
//
// Block, warps, mma tiles and accumulators as the forward (a BM x BN tile of D; grid x: ceil(N/BN), y: ceil(M/BM),
// z: slices). Shared memory, per stage:
//   As[BM][BK + 4] (m-major, k contiguous: both backward A operands are k-contiguous in global memory). A fragment
//     load reads (m = gid [+8], k = tig [+4]) -> bank (20*gid + tig) mod 32 = {0,20,8,28,16,4,24,12}[gid] + tig: the
//     32 lanes hit 32 different banks (rows 8 apart are 160 = 0 mod 32 floats apart, but one load uses one of them).
//   Bs, input gradient: [BK][BN + 8] (k-major, as dy: pixel-images contiguous): banks 8*tig + gid, as the forward's.
//   Bs, filter gradient: [BN][BK + 4] (n-major, k contiguous, as x along j): banks 20*gid + tig as As.
//   Row pitches are multiples of 4 floats, so every cp.async destination is 16-byte aligned.
// Loads: a k-contiguous tile is copied as V-float runs along k (BK/V threads a row, rows stepping by T/(BK/V)); the
// k-major B tile as the forward's (V images of one pixel a thread, fixed column). V = 4 needs (input gradient)
// Fg % 4 == 0 (4 consecutive k share a tap) and N % 4 == 0, (filter gradient) N % 4 == 0 (4 consecutive j are the
// 4 images of one pixel; J and every chunk start are multiples of 4), and 16-byte aligned operands; otherwise V = 1.
// Anything outside the GEMM (m >= M, n >= N, k >= k_hi) or outside the tensors (borders, stride holes) is a
// cp.async with src-size 0 (zeros; the source, then the operand's own aligned base, is not read): any N, C, F,
// groups and geometry; the mma loop never branches on them.
// Fragments, rounding (tf32_bits as read from shared memory), pipeline (STAGES buffers, one barrier per k tile) and
// the planted defects: exactly the forward's rules, restated next to the loop below.
// Epilogue: the accumulators (row gid [+8], cols 2*tig, 2*tig + 1) through Op::store.
//
// Expected share of TF32 peak (paper estimate, tile 64x128x16, 8 warps, 3 stages, 16-byte path): the mma loop is
// the forward's (per warp and k8 step 8 mma against 16 LDS.32 + 16 cvt, shared-memory bound), so ~50-60% of A100's
// and ~35% of H100's dense TF32 peak for the filter gradient and the stride-1 input gradient, before the split-K
// reduction (2 x splits x |dw| floats of traffic, small beside the GEMM for AlexNet's layers) and divided by sh*sw for
// a strided input gradient (zero products). Not measured on a GPU yet.
struct Tf32BwdParams {
  const float* a;  // input gradient: w    filter gradient: dy
  const float* b;  // input gradient: dy   filter gradient: x
  float* out;      // input gradient: dx   filter gradient: dw, or the split workspace when splits > 1
  float alpha, beta;
  int C, H, W, N, F, Fg, Cg, KH, KW, sh, sw, ph, pw, OH, OW;
  int M, Ncols, K;    // GEMM extents (K: the whole reduction, before any split)
  int splits, chunk;  // filter gradient: K chunks (1 and K for the input gradient)
  int total;          // filter gradient: Cg*KH*KW*F, the floats of dw (one workspace slice)
};

// One z slice of the backward GEMM: its group, its k range, where and how its results go.
struct Tf32BwdSlice {
  int g, k_lo, k_hi;
  float* out;
  float alpha, beta;
};

struct DgradTf32 {
  static constexpr bool kBKContig = false;  // Bs[BK][BN + 8]

  static __device__ __forceinline__ Tf32BwdSlice slice(const Tf32BwdParams& p, int z) {
    return Tf32BwdSlice{z, 0, p.K, p.out, p.alpha, p.beta};
  }
  // A[m][k], m < M and k < K: w[m, kh, kw, g*Fg + f], k = khw*Fg + f.
  static __device__ __forceinline__ const float* a_src(const Tf32BwdParams& p, const Tf32BwdSlice& s, int m, int k) {
    const int khw = k / p.Fg, f = k - khw * p.Fg;
    return p.a + (std::int64_t(m) * p.KH * p.KW + khw) * p.F + s.g * p.Fg + f;
  }
  // A column of B, fixed per thread: the input pixel (h, w) and image n of column p < Ncols.
  struct BFix {
    const float* base;  // dy + (g*Fg*OH*OW)*N + n
    int h, w;
  };
  static __device__ __forceinline__ BFix b_fix(const Tf32BwdParams& p, const Tf32BwdSlice& s, int col) {
    const int n = col % p.N, q = col / p.N;
    return BFix{p.b + std::int64_t(s.g) * p.Fg * p.OH * p.OW * p.N + n, q / p.W, q % p.W};
  }
  // B[k][col]: the dy element tap (kh, kw) of filter f sends to this pixel, or null (stride hole, border).
  static __device__ __forceinline__ const float* b_src(const Tf32BwdParams& p, const BFix& c, int k) {
    const int khw = k / p.Fg, f = k - khw * p.Fg;
    const int kh = khw / p.KW, kw = khw - kh * p.KW;
    const int th = c.h + p.ph - kh, tw = c.w + p.pw - kw;
    if (th < 0 || tw < 0) return nullptr;
    const int oh = th / p.sh, ow = tw / p.sw;
    if (oh * p.sh != th || ow * p.sw != tw || oh >= p.OH || ow >= p.OW) return nullptr;
    return c.base + ((std::int64_t(f) * p.OH + oh) * p.OW + ow) * p.N;
  }
  static __device__ __forceinline__ void store(const Tf32BwdParams& p, const Tf32BwdSlice& s, int m, int col,
                                               float v) {
    float* o = s.out + std::int64_t(s.g * p.Cg + m) * p.Ncols + col;
    *o = s.beta == 0.0f ? s.alpha * v : s.alpha * v + s.beta * *o;
  }
};

struct WgradTf32 {
  static constexpr bool kBKContig = true;  // Bs[BN][BK + 4]

  static __device__ __forceinline__ Tf32BwdSlice slice(const Tf32BwdParams& p, int z) {
    const int g = z / p.splits, split = z - g * p.splits;
    const int k_lo = split * p.chunk, k_hi = min(p.K, k_lo + p.chunk);
    if (p.splits == 1) return Tf32BwdSlice{g, k_lo, k_hi, p.out, p.alpha, p.beta};
    return Tf32BwdSlice{g, k_lo, k_hi, p.out + std::int64_t(split) * p.total, 1.0f, 0.0f};
  }
  // A[m][j] = dy[g*Fg + m][j].
  static __device__ __forceinline__ const float* a_src(const Tf32BwdParams& p, const Tf32BwdSlice& s, int m, int j) {
    return p.a + std::int64_t(s.g * p.Fg + m) * p.K + j;
  }
  // A row of B (the tap n = (c, kh, kw) < Ncols): recomputed per copy (rows change with the chunk).
  struct BFix {
    const float* base;  // x + (g*Cg + c)*H*W*N
    int kh, kw;
  };
  static __device__ __forceinline__ BFix b_fix(const Tf32BwdParams& p, const Tf32BwdSlice& s, int n) {
    const int khw = p.KH * p.KW, c = n / khw, r = n - c * khw;
    return BFix{p.b + std::int64_t(s.g * p.Cg + c) * p.H * p.W * p.N, r / p.KW, r % p.KW};
  }
  // B[j][n]: x at tap (kh, kw) of output pixel (oh, ow), image img, or null outside the image.
  static __device__ __forceinline__ const float* b_src(const Tf32BwdParams& p, const BFix& r, int j) {
    const int q = j / p.N, img = j - q * p.N, oh = q / p.OW, ow = q - oh * p.OW;
    const int ih = oh * p.sh - p.ph + r.kh, iw = ow * p.sw - p.pw + r.kw;
    if (ih < 0 || ih >= p.H || iw < 0 || iw >= p.W) return nullptr;
    return r.base + (std::int64_t(ih) * p.W + iw) * p.N + img;
  }
  static __device__ __forceinline__ void store(const Tf32BwdParams& p, const Tf32BwdSlice& s, int m, int n, float v) {
    float* o = s.out + std::int64_t(n) * p.F + s.g * p.Fg + m;
    *o = s.beta == 0.0f ? s.alpha * v : s.alpha * v + s.beta * *o;
  }
};

// dw[i] = alpha * sum_{split < splits} ws[split * total + i] + beta * dw[i], the splits added in order (deterministic).
// Block: 256 threads, grid-stride over the total floats of dw; consecutive threads read consecutive floats.
__global__ void __launch_bounds__(256) conv_wgrad_tf32_reduce(const float* ws, float* dw, int total, int splits,
                                                               float alpha, float beta) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += gridDim.x * blockDim.x) {
    float acc = 0.0f;
    for (int split = 0; split < splits; ++split) acc += ws[std::int64_t(split) * total + i];
    dw[i] = beta == 0.0f ? alpha * acc : alpha * acc + beta * dw[i];
  }
}

template <class Op, int BM, int BN, int BK, int WM, int WN, int STAGES, int V, int kDefect>
__global__ void conv_bwd_tf32(Tf32BwdParams p) {
  constexpr int T = 32 * WM * WN;
  constexpr bool kBK = Op::kBKContig;
  constexpr int LDA = BK + 4, LDB = kBK ? BK + 4 : BN + 8;
  constexpr int kAStage = BM * LDA, kBStage = kBK ? BN * LDB : BK * LDB;
  constexpr int MT = BM / WM / 16, NT = BN / WN / 8;
  static_assert(BM % 32 == 0 && BN % 32 == 0, "BM, BN multiples of 32 (k-major pitch 8 mod 32 banks)");
  static_assert(BK == 16, "k-contiguous pitch BK + 4 = 20: 20*gid mod 32 distinct multiples of 4 (conflict-free)");
  static_assert(BM % (16 * WM) == 0 && BN % (8 * WN) == 0, "warp tiles of whole 16x8 mma tiles");
  static_assert(STAGES >= 2, "at least double buffering");
  static_assert(V == 1 || V == 4, "4- or 16-byte copies");
  static_assert(T % (BK / V) == 0 && (BM * BK / V) % T == 0, "A: each thread copies fixed k columns, equal counts");
  static_assert(kBK ? (BN * BK / V) % T == 0 : (T % (BN / V) == 0 && (BK * BN / V) % T == 0),
                "B: each thread copies fixed columns, equal counts");

  SHARED(float4, smem_a, [STAGES * kAStage / 4]);
  SHARED(float4, smem_b, [STAGES * kBStage / 4]);
  float* As = reinterpret_cast<float*>(smem_a);
  float* Bs = reinterpret_cast<float*>(smem_b);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm0 = (warp / WN) * (BM / WM), wn0 = (warp % WN) * (BN / WN);
  const Tf32BwdSlice s = Op::slice(p, blockIdx.z);
  const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
  const int ktiles = (s.k_hi - s.k_lo + BK - 1) / BK;

  // k-contiguous tiles: this thread copies k columns [kc, kc + V) of rows r0, r0 + step, ...
  constexpr int kRowStep = T / (BK / V);
  const int kc = (tid % (BK / V)) * V, r0 = tid / (BK / V);
  constexpr int kAChunks = BM * BK / V / T;
  // k-major B (input gradient): this thread's fixed column (V images of one pixel) and first k row, as the forward.
  constexpr int kBColThreads = kBK ? 1 : BN / V;
  constexpr int kBStep = T / kBColThreads, kBChunks = BK * BN / V / T;
  const int b_col = (tid % kBColThreads) * V, b_row = tid / kBColThreads;
  const bool b_in = !kBK && n0 + b_col < p.Ncols;  // V = 4: N % 4 == 0, so the 4 images share a pixel
  typename Op::BFix bfix{};
  if constexpr (!kBK) {
    if (b_in) bfix = Op::b_fix(p, s, n0 + b_col);
  }

  const auto load_tile = [&](int stage, int kt) {
    float* as = As + stage * kAStage;
    float* bs = Bs + stage * kBStage;
    const int kbase = s.k_lo + kt * BK;
#pragma unroll
    for (int j = 0; j < kAChunks; ++j) {
      const int r = r0 + j * kRowStep, m = m0 + r, k = kbase + kc;
      const float* src = m < p.M && k < s.k_hi ? Op::a_src(p, s, m, k) : nullptr;
      cp_async_ca<4 * V>(as + r * LDA + kc, src ? src : p.a, src ? 4 * V : 0);
    }
    if constexpr (kBK) {
#pragma unroll
      for (int j = 0; j < kBChunks; ++j) {
        const int r = r0 + j * kRowStep, n = n0 + r, k = kbase + kc;
        const float* src = n < p.Ncols && k < s.k_hi ? Op::b_src(p, Op::b_fix(p, s, n), k) : nullptr;
        cp_async_ca<4 * V>(bs + r * LDB + kc, src ? src : p.b, src ? 4 * V : 0);
      }
    } else {
#pragma unroll
      for (int j = 0; j < kBChunks; ++j) {
        const int r = b_row + j * kBStep, k = kbase + r;
        const float* src = b_in && k < s.k_hi ? Op::b_src(p, bfix, k) : nullptr;
        cp_async_ca<4 * V>(bs + r * LDB + b_col, src ? src : p.b, src ? 4 * V : 0);
      }
    }
  };

  float acc[MT][NT][4];
#pragma unroll
  for (int i = 0; i < MT; ++i) {
#pragma unroll
    for (int j = 0; j < NT; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;
    }
  }

  // Pipeline (the forward's): prologue issues tiles 0..STAGES-2, one commit each; iteration t waits until at most
  // STAGES-2 groups are pending (tile t landed in this thread), __syncthreads (all threads' copies of tile t
  // visible; all threads past their reads of tile t-1), issues tile t+STAGES-1 into stage (t-1) % STAGES, commits
  // (always, also empty: equal group counts in every thread), then runs the mma on stage t % STAGES.
  for (int st = 0; st < STAGES - 1; ++st) {
    if (st < ktiles) load_tile(st, st);
    cp_async_commit();
  }

  for (int kt = 0; kt < ktiles; ++kt) {
    if constexpr (kDefect != kNoWait) cp_async_wait<STAGES - 2>();
    if constexpr (kDefect != kNoBarrier) __syncthreads();
    const int next = kt + STAGES - 1;
    if (next < ktiles) load_tile(next % STAGES, next);
    cp_async_commit();

    // Braces everywhere below (see the forward: nvcc 13.0 and `#pragma unroll` after an unbraced `if constexpr`).
    const float* as = As + (kt % STAGES) * kAStage;
    const float* bs = Bs + (kt % STAGES) * kBStage;
#pragma unroll
    for (int k8 = 0; k8 < BK; k8 += 8) {
      std::uint32_t fa[MT][4], fb[NT][2];
#pragma unroll
      for (int i = 0; i < MT; ++i) {
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const mma::RowCol rc = mma::tf32_a(lane, r);
          fa[i][r] = tf32_bits(as[(wm0 + i * 16 + rc.row) * LDA + k8 + rc.col]);
        }
      }
      if constexpr (kDefect == kSwappedA) {
        for (int i = 0; i < MT; ++i) {
          const std::uint32_t t = fa[i][1];
          fa[i][1] = fa[i][2];
          fa[i][2] = t;
        }
      }
#pragma unroll
      for (int j = 0; j < NT; ++j) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const mma::RowCol rc = mma::tf32_b(lane, r);
          const int n = wn0 + j * 8 + rc.col, k = k8 + rc.row;
          fb[j][r] = tf32_bits(kBK ? bs[n * LDB + k] : bs[k * LDB + n]);
        }
      }
#pragma unroll
      for (int i = 0; i < MT; ++i) {
#pragma unroll
        for (int j = 0; j < NT; ++j) mma_tf32_m16n8k8(acc[i][j], fa[i], fb[j], acc[i][j]);
      }
    }
  }
  cp_async_wait<0>();  // no copy outlives the block (the trailing groups are empty)

#pragma unroll
  for (int i = 0; i < MT; ++i) {
#pragma unroll
    for (int j = 0; j < NT; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const mma::RowCol rc = mma::accumulator(lane, e);
        const int m = m0 + wm0 + i * 16 + rc.row, n = n0 + wn0 + j * 8 + rc.col;
        if (m < p.M && n < p.Ncols) Op::store(p, s, m, n, acc[i][j][e]);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------------------
// The tiles (BK = 16, 3 stages), one row per tile shape with its kernels for the three passes. Registers and shared
// memory per tile: docs/architecture.md ("Tensor-core convolution"), from tools/kernel_resources.py.
using KernelFn = void (*)(Tf32ConvParams);
using BwdKernelFn = void (*)(Tf32BwdParams);
constexpr int kNumDefects = 3;

struct Tf32Tile {
  int BM, BN, threads;
  KernelFn vec, scalar;                          // forward: the V = 4 and V = 1 paths
  KernelFn vec_relu, scalar_relu;                // the same with the fused ReLU epilogue
  KernelFn planted[2][kNumDefects];              // [vec][defect - 1], emulator only (null under nvcc)
  BwdKernelFn bwd[2][2];                         // [pass: 0 input gradient, 1 filter gradient][vec]
  BwdKernelFn bwd_planted[2][2][kNumDefects];    // [pass][vec][defect - 1], emulator only
};

template <class Op, int BM, int BN, int WM, int WN, int V, int kDefect>
constexpr BwdKernelFn bwd_kernel() {
  return conv_bwd_tf32<Op, BM, BN, 16, WM, WN, 3, V, kDefect>;
}

template <int BM, int BN, int WM, int WN>
constexpr Tf32Tile make_tile() {
  return Tf32Tile{BM, BN, 32 * WM * WN, conv_fwd_tf32<BM, BN, 16, WM, WN, 3, 4, kNoDefect>,
                  conv_fwd_tf32<BM, BN, 16, WM, WN, 3, 1, kNoDefect>,
                  conv_fwd_tf32<BM, BN, 16, WM, WN, 3, 4, kNoDefect, true>,
                  conv_fwd_tf32<BM, BN, 16, WM, WN, 3, 1, kNoDefect, true>,
#if CONVNET_EMU
                  {{conv_fwd_tf32<BM, BN, 16, WM, WN, 3, 1, kNoWait>,
                    conv_fwd_tf32<BM, BN, 16, WM, WN, 3, 1, kNoBarrier>,
                    conv_fwd_tf32<BM, BN, 16, WM, WN, 3, 1, kSwappedA>},
                   {conv_fwd_tf32<BM, BN, 16, WM, WN, 3, 4, kNoWait>,
                    conv_fwd_tf32<BM, BN, 16, WM, WN, 3, 4, kNoBarrier>,
                    conv_fwd_tf32<BM, BN, 16, WM, WN, 3, 4, kSwappedA>}},
#else
                  {{nullptr, nullptr, nullptr}, {nullptr, nullptr, nullptr}},
#endif
                  {{bwd_kernel<DgradTf32, BM, BN, WM, WN, 1, kNoDefect>(),
                    bwd_kernel<DgradTf32, BM, BN, WM, WN, 4, kNoDefect>()},
                   {bwd_kernel<WgradTf32, BM, BN, WM, WN, 1, kNoDefect>(),
                    bwd_kernel<WgradTf32, BM, BN, WM, WN, 4, kNoDefect>()}},
#if CONVNET_EMU
                  {{{bwd_kernel<DgradTf32, BM, BN, WM, WN, 1, kNoWait>(),
                     bwd_kernel<DgradTf32, BM, BN, WM, WN, 1, kNoBarrier>(),
                     bwd_kernel<DgradTf32, BM, BN, WM, WN, 1, kSwappedA>()},
                    {bwd_kernel<DgradTf32, BM, BN, WM, WN, 4, kNoWait>(),
                     bwd_kernel<DgradTf32, BM, BN, WM, WN, 4, kNoBarrier>(),
                     bwd_kernel<DgradTf32, BM, BN, WM, WN, 4, kSwappedA>()}},
                   {{bwd_kernel<WgradTf32, BM, BN, WM, WN, 1, kNoWait>(),
                     bwd_kernel<WgradTf32, BM, BN, WM, WN, 1, kNoBarrier>(),
                     bwd_kernel<WgradTf32, BM, BN, WM, WN, 1, kSwappedA>()},
                    {bwd_kernel<WgradTf32, BM, BN, WM, WN, 4, kNoWait>(),
                     bwd_kernel<WgradTf32, BM, BN, WM, WN, 4, kNoBarrier>(),
                     bwd_kernel<WgradTf32, BM, BN, WM, WN, 4, kSwappedA>()}}}
#else
                  {}
#endif
  };
}

// Row 0: 64 x 128 (M x N), 8 warps (2 x 4) of 32 x 32; row 1: 32 x 64, 2 warps (1 x 2) of 32 x 32, for a small M
// (few filters / channels) or too few big tiles to fill the GPU.
const Tf32Tile kTiles[] = {make_tile<64, 128, 2, 4>(), make_tile<32, 64, 1, 2>()};
constexpr int kNumTiles = sizeof(kTiles) / sizeof(kTiles[0]);
constexpr int kSMs = 132;  // an H100 SXM (fixed: plans are device-independent, as conv.cu's)
// Filter gradient split-K: each split at least kMinChunk long (16 k tiles), at most kMaxSplits of them, enough to
// give the GPU about two blocks per SM.
constexpr std::int64_t kMinChunk = 256, kMaxSplits = 64, kBK = 16;

std::atomic<int> g_tile_override{-1};
std::atomic<int> g_defect{0};
std::atomic<int> g_split_override{0};

// The row for a GEMM with M rows and Ncols columns in `slices` z slices: the small tile when M is small or the big
// tiles would leave SMs idle.
int pick_tile(std::int64_t M, std::int64_t Ncols, std::int64_t slices) {
  const int forced = g_tile_override.load();
  if (forced >= 0) return forced;
  const std::int64_t big_blocks = ((Ncols + 127) / 128) * ((M + 63) / 64) * slices;
  return (M <= 32 || big_blocks < kSMs) ? 1 : 0;
}

int pick_tile(const ConvGeometry& g) {
  return pick_tile(g.F / g.groups, std::int64_t(g.OH) * g.OW * g.N, g.groups);
}

Tf32ConvParams make_params(const ConvGeometry& g) {
  Tf32ConvParams p{};
  p.C = g.C; p.H = g.H; p.W = g.W; p.N = g.N; p.F = g.F; p.Fg = g.F / g.groups; p.Cg = g.C / g.groups;
  p.KH = g.KH; p.KW = g.KW; p.sh = g.stride_h; p.sw = g.stride_w; p.ph = g.pad_h; p.pw = g.pad_w;
  p.OH = g.OH; p.OW = g.OW;
  const std::int64_t K = std::int64_t(p.Cg) * g.KH * g.KW, P = std::int64_t(g.OH) * g.OW * g.N;
  CONVNET_REQUIRE(K <= std::numeric_limits<int>::max() && P <= std::numeric_limits<int>::max(),
                  "the GEMM has 2^31 or more rows or columns (unsupported)");
  p.K = static_cast<int>(K);
  p.P = static_cast<int>(P);
  return p;
}

dim3 grid_of(const Tf32Tile& t, const Tf32ConvParams& p, int groups) {
  return dim3(ceil_div(p.P, t.BN), ceil_div(p.Fg, t.BM), static_cast<unsigned>(groups));
}

// What a backward call launches: the pass (0 input gradient, 1 filter gradient), the row, the GEMM and the grid.
struct BwdPlan {
  int pass, tile;
  Tf32BwdParams p;  // pointers and alpha/beta unset
  dim3 grid;
};

BwdPlan make_bwd_plan(int pass, const ConvGeometry& g) {
  const ConvGeometry checked = conv_geometry(g.C, g.H, g.W, g.N, g.F, g.KH, g.KW, g.stride_h, g.stride_w, g.pad_h,
                                             g.pad_w, g.groups);
  CONVNET_REQUIRE(checked.OH == g.OH && checked.OW == g.OW, "output size does not match the geometry");
  BwdPlan pl{};
  pl.pass = pass;
  Tf32BwdParams& p = pl.p;
  p.C = g.C; p.H = g.H; p.W = g.W; p.N = g.N; p.F = g.F; p.Fg = g.F / g.groups; p.Cg = g.C / g.groups;
  p.KH = g.KH; p.KW = g.KW; p.sh = g.stride_h; p.sw = g.stride_w; p.ph = g.pad_h; p.pw = g.pad_w;
  p.OH = g.OH; p.OW = g.OW;
  const std::int64_t khw = std::int64_t(g.KH) * g.KW, J = std::int64_t(g.OH) * g.OW * g.N;
  const std::int64_t M = pass == 0 ? p.Cg : p.Fg;
  const std::int64_t Ncols = pass == 0 ? std::int64_t(g.H) * g.W * g.N : p.Cg * khw;
  const std::int64_t K = pass == 0 ? p.Fg * khw : J;
  CONVNET_REQUIRE(Ncols <= std::numeric_limits<int>::max() && K <= std::numeric_limits<int>::max(),
                  "the GEMM has 2^31 or more columns or reduction terms (unsupported)");
  p.M = int(M); p.Ncols = int(Ncols); p.K = int(K);
  p.total = int(p.Cg * khw * g.F);  // < 2^31: w's element count, checked by conv_geometry
  p.splits = 1;
  p.chunk = p.K;
  // The filter gradient's splits fill the GPU (the tile sees the most it could have); the input gradient has none.
  const std::int64_t max_splits = pass == 1 ? std::min(std::max<std::int64_t>(1, J / kMinChunk), kMaxSplits) : 1;
  pl.tile = pick_tile(M, Ncols, g.groups * max_splits);
  if (pass == 1) {
    // Split K until the grid has about two blocks per SM, chunks a multiple of BK and at least kMinChunk long.
    const Tf32Tile& t = kTiles[pl.tile];
    const std::int64_t blocks = ((Ncols + t.BN - 1) / t.BN) * ((M + t.BM - 1) / t.BM) * g.groups;
    std::int64_t splits = std::min((2 * kSMs + blocks - 1) / blocks, max_splits);
    if (g_split_override.load() > 0) splits = std::min<std::int64_t>(g_split_override.load(), (J + kBK - 1) / kBK);
    const std::int64_t chunk = ((J + splits - 1) / splits + kBK - 1) / kBK * kBK;
    p.splits = int((J + chunk - 1) / chunk);
    p.chunk = p.splits > 1 ? int(chunk) : p.K;
  }
  const Tf32Tile& t = kTiles[pl.tile];
  const std::int64_t slices = std::int64_t(g.groups) * p.splits;
  CONVNET_REQUIRE((M + t.BM - 1) / t.BM <= 65535 && slices <= 65535, "grid too large for this geometry");
  pl.grid = dim3(ceil_div(Ncols, t.BN), ceil_div(M, t.BM), static_cast<unsigned>(slices));
  return pl;
}

// The 16-byte path's conditions on the geometry (pointer alignment is checked at launch).
bool bwd_vec_geometry(int pass, const ConvGeometry& g) {
  return g.N % 4 == 0 && (pass == 1 || (g.F / g.groups) % 4 == 0);
}

void launch_bwd(const BwdPlan& pl, bool vec, cudaStream_t stream) {
  const Tf32Tile& t = kTiles[pl.tile];
  BwdKernelFn k = t.bwd[pl.pass][vec ? 1 : 0];
  const int defect = g_defect.load();
  if (defect != 0) k = t.bwd_planted[pl.pass][vec ? 1 : 0][defect - 1];
  launch(k, pl.grid, dim3(t.threads), 0, stream, pl.p);
}

std::string describe(const Tf32Tile& t, bool vec, const dim3& grid) {
  return "tf32 tile " + std::to_string(t.BM) + "x" + std::to_string(t.BN) + "x16, " + std::to_string(t.threads) +
         " threads, " + (vec ? "16-byte" : "4-byte") + " path, grid " + std::to_string(grid.x) + "x" +
         std::to_string(grid.y) + "x" + std::to_string(grid.z);
}

}  // namespace

void conv_forward_tf32(const ConvGeometry& g, const float* x, const float* w, const float* bias, float* y, float alpha,
                       float beta, bool relu, cudaStream_t stream) {
  CONVNET_REQUIRE(x && w && y, "null pointer");
  const ConvGeometry checked = conv_geometry(g.C, g.H, g.W, g.N, g.F, g.KH, g.KW, g.stride_h, g.stride_w, g.pad_h,
                                             g.pad_w, g.groups);
  CONVNET_REQUIRE(checked.OH == g.OH && checked.OW == g.OW, "output size does not match the geometry");
  Tf32ConvParams p = make_params(g);
  p.x = x; p.w = w; p.bias = bias; p.y = y; p.alpha = alpha; p.beta = beta;
  const Tf32Tile& t = kTiles[pick_tile(g)];
  const dim3 grid = grid_of(t, p, g.groups);
  CONVNET_REQUIRE(grid.y <= 65535 && grid.z <= 65535, "grid too large for this geometry");
  const bool vec = g.N % 4 == 0 && p.Fg % 4 == 0 && aligned16(x) && aligned16(w);
  KernelFn k = relu ? (vec ? t.vec_relu : t.scalar_relu) : (vec ? t.vec : t.scalar);
  const int defect = g_defect.load();
  if (defect != 0) {  // the planted variants have the plain epilogue: their tests never ask for the ReLU
    CONVNET_REQUIRE(!relu, "planted defects have no ReLU epilogue");
    k = t.planted[vec ? 1 : 0][defect - 1];
  }
  launch(k, grid, dim3(t.threads), 0, stream, p);
}

void conv_backward_data_tf32(const ConvGeometry& g, const float* dy, const float* w, float* dx, float alpha,
                             float beta, cudaStream_t stream) {
  CONVNET_REQUIRE(dy && w && dx, "null pointer");
  BwdPlan pl = make_bwd_plan(0, g);
  pl.p.a = w; pl.p.b = dy; pl.p.out = dx; pl.p.alpha = alpha; pl.p.beta = beta;
  launch_bwd(pl, bwd_vec_geometry(0, g) && aligned16(dy) && aligned16(w), stream);
}

std::int64_t conv_backward_filter_tf32_workspace(const ConvGeometry& g) {
  const BwdPlan pl = make_bwd_plan(1, g);
  return pl.p.splits > 1 ? std::int64_t(pl.p.splits) * pl.p.total : 0;
}

void conv_backward_filter_tf32(const ConvGeometry& g, const float* x, const float* dy, float* dw, float* workspace,
                               std::int64_t workspace_floats, float alpha, float beta, cudaStream_t stream) {
  CONVNET_REQUIRE(x && dy && dw, "null pointer");
  BwdPlan pl = make_bwd_plan(1, g);
  const std::int64_t total = pl.p.total, splits = pl.p.splits;
  if (splits > 1) {
    CONVNET_REQUIRE(workspace != nullptr && workspace_floats >= splits * total,
                    "workspace too small: need " + std::to_string(splits * total) + " floats");
    CONVNET_REQUIRE(splits * total <= std::numeric_limits<int>::max(),
                    "workspace has 2^31 or more elements (unsupported)");
  }
  pl.p.a = dy; pl.p.b = x; pl.p.out = splits > 1 ? workspace : dw; pl.p.alpha = alpha; pl.p.beta = beta;
  launch_bwd(pl, bwd_vec_geometry(1, g) && aligned16(x) && aligned16(dy), stream);
  if (splits > 1) {
    const unsigned blocks = static_cast<unsigned>(std::min<std::int64_t>((total + 255) / 256, 4 * kSMs));
    launch(conv_wgrad_tf32_reduce, dim3(blocks), dim3(256), 0, stream, workspace, dw, int(total), int(splits), alpha,
           beta);
  }
}

std::string conv_tf32_plan(const ConvGeometry& g, ConvPass pass) {
  if (pass == ConvPass::forward) {
    const Tf32Tile& t = kTiles[pick_tile(g)];
    const Tf32ConvParams p = make_params(g);
    return describe(t, g.N % 4 == 0 && p.Fg % 4 == 0, grid_of(t, p, g.groups));
  }
  const int bwd = pass == ConvPass::backward_data ? 0 : 1;
  const BwdPlan pl = make_bwd_plan(bwd, g);
  std::string s = describe(kTiles[pl.tile], bwd_vec_geometry(bwd, g), pl.grid);
  if (bwd == 1) s += ", " + std::to_string(pl.p.splits) + " split(s) of " + std::to_string(pl.p.chunk);
  return s;
}

int conv_tf32_tile_count() { return kNumTiles; }

void conv_tf32_set_overrides(int row, int planted_defect, int wgrad_splits) {
  CONVNET_REQUIRE(row >= -1 && row < kNumTiles,
                  "tile row must be -1 (automatic) or in [0, " + std::to_string(kNumTiles) + ")");
  CONVNET_REQUIRE(planted_defect >= 0 && planted_defect <= kNumDefects, "planted_defect must be 0, 1, 2 or 3");
  CONVNET_REQUIRE(planted_defect == 0 || CONVNET_EMU, "planted defects exist on the emulator only");
  CONVNET_REQUIRE(wgrad_splits >= 0, "wgrad_splits must be >= 0 (0: automatic)");
  g_tile_override.store(row);
  g_defect.store(planted_defect);
  g_split_override.store(wgrad_splits);
}

}  // namespace convnet
