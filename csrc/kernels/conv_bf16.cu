// BF16 tensor-core convolution (API in conv_bf16.h): implicit GEMMs on mma.sync.m16n8k16 (bf16 inputs, FP32
// accumulators), fragments loaded with ldmatrix, a multi-stage cp.async pipeline for bfloat16 inputs and a
// register-staged double buffer for float32 inputs (rounded to bfloat16 on the way to shared memory). This comment is
// the forward's contract; the input and filter gradients' (conv_bwd_bf16) is further down, and they share the
// forward's tile table, load paths, planner style and test overrides.
//
// GEMM per group g (z of the grid):  D[m][p] = sum_k A[m][k] B[k][p]
//   M = Fg = F/groups filters:          A[m][k] = w[k * F + g*Fg + m]       (w is (Cg, KH, KW, F): k-major, m fastest)
//   N = P = OH*OW*N, images fastest:    B[k][p] = x[g*Cg + c, oh*sh - ph + kh, ow*sw - pw + kw, n], zero outside the
//                                       image, with k = (c*KH + kh)*KW + kw and p = (oh*OW + ow)*N + n
//   K = Cg*KH*KW;                       y[g*Fg + m][p] is y's flat (F, OH*OW*N) matrix, so the epilogue writes rows.
//
// Block: a BM x BN tile of D (grid x: ceil(P/BN) pixel-image tiles, y: ceil(Fg/BM) filter tiles, z: groups), WM x WN
// warps of 32 threads, each warp a (BM/WM) x (BN/WN) sub-tile = MT x NT mma tiles of 16 x 8 (MT = BM/WM/16,
// NT = BN/WN/8, NT even), MT*NT*4 FP32 accumulators per thread; BK = 32, two k16 mma steps per k tile.
// Shared memory, per stage, bfloat16 bits, k-major as in global memory: As[BK][BM + 8] and Bs[BK][BN + 8].
//
// Fragments (mma_fragments.cuh bf16_a / bf16_b): A register r of a lane holds the two k-adjacent elements
// (m = gid [+8], k = 2 tig, 2 tig + 1 [+8]), B register r (k = 2 tig, 2 tig + 1 [+8], n = gid). In a k-major tile the
// two are 1 row apart, not adjacent: ldmatrix.trans gives exactly them. ldmatrix.m8n8.x4.trans: lane l gives the
// address of row l % 8 of matrix l / 8 (8 bf16 = 16 bytes of one k row) and receives, in register i, elements
// (row 2 tig, col gid) and (row 2 tig + 1, col gid) of matrix i; with the k rows of the tile as matrix rows that is
// (k = 2 tig, 2 tig + 1; m or n = gid): one fragment register. So
//   A, 16 (m) x 16 (k) per mma tile: matrix i = (k0 = 8 (i / 2), m0 = 8 (i % 2)) -> registers a0..a3 in ISA order;
//   B, 16 (k) x 16 (n) = two mma tiles j, j+1: matrix i = (k0 = 8 (i % 2), n0 = 8 (i / 2)) -> b[j][0..1], b[j+1][0..1].
// Row-alignment rule: every ldmatrix row address is 16-byte aligned shared memory: row pitch 2 (BM + 8) bytes is a
// multiple of 16 (BM % 8 == 0), and every matrix starts at a column multiple of 8. Bank rule: the 8 rows of one
// matrix (one 8-lane phase) are 8 consecutive k rows at the same column; the pitch in 16-byte units, BM/8 + 1 (or
// BN/8 + 1), is odd when BM % 16 == 0, so the 8 rows land in 8 different 16-byte bank quads mod 128 bytes: every
// ldmatrix phase is conflict-free. (The +8 padding buys that; unpadded, a pitch of 128 or 256 bytes would put all 8
// rows in the same 4 banks, an 8-way conflict.)
//
// Loads (each thread stages the same columns of every k tile: T = 32*WM*WN threads; static_asserts give the
// divisibility rules: T a multiple of BM/V and of BN/V, BK*BM/V and BK*BN/V multiples of T), V elements along m
// (A) or along the pixel-images (B: V images of one pixel, so N % V == 0 and Fg % V == 0 for V > 1):
// - bfloat16 inputs, V = 8: cp.async 16 bytes straight into the stage; out of the image, k >= K, m >= Fg or
//   p >= P: src-size 0 (zeros, the source never read; x or w itself is passed, aligned). STAGES = 3 buffers, tile t
//   in stage t % STAGES: the prologue issues tiles 0..STAGES-2, one commit each; iteration t waits until at most
//   STAGES-2 groups are pending, __syncthreads (tile t visible everywhere; every thread past its reads of tile t-1),
//   issues tile t+STAGES-1 into stage (t-1) % STAGES, commits (always, also empty), then runs the mma on stage
//   t % STAGES. One barrier per k tile serves both rules of cuda_compat.h.
// - float32 inputs (V = 4: one 16-byte load, 4 conversions, one 8-byte shared store; V = 1: one element) and
//   bfloat16 inputs that do not allow 16-byte copies (V = 1: 2-byte loads and stores): cp.async cannot convert, so
//   the tile goes global -> registers -> cvt.rn.bf16 -> st.shared, double buffered (STAGES = 2): iteration t loads
//   tile t+1 into registers, runs the mma on stage t % 2 (the loads are in flight meanwhile), stores tile t+1 into
//   stage (t+1) % 2 and ends with the one __syncthreads: the stores reach a stage last read in iteration t-1 (before
//   the previous barrier) and are read in iteration t+1 (after this one). Tails and padding are zeros in registers.
// Hence any N, Fg, K: the tails are zero-filled, never branched around in the mma loop.
// Epilogue: accumulator (row gid [+8], cols 2 tig, 2 tig + 1) of each mma tile, v = acc + bias,
// y = alpha v + beta y in FP32, then max(y, 0) with kRelu (conv_epilogue.cuh, shared with the FP32 and TF32
// forwards); a bfloat16 y is read and written as bfloat16 (rounded to nearest even once, after the ReLU).
//
// Resources (64 x 128 tile, 256 threads): 3 x 32 x (72 + 136) x 2 B = 39,936 B of shared memory on the cp.async
// path, 26,624 B double buffered; 32 accumulators, 8 + 8 fragment registers, and on the register paths 24 staged
// values per thread. The 32 x 64 tile (64 threads): 21,504 B / 14,336 B, 32 accumulators, 48 staged values. As
// compiled (CUDA 13.0, sm_80 and sm_90, no spills): 72 registers on the cp.async path, 94-98 (64 x 128) and
// 122-124 (32 x 64) on the register-staged ones; occupancy in docs/architecture.md (tools/kernel_resources.py).
// Expected share of BF16 peak (paper estimate, 64 x 128 x 32 tile, 8 warps of 32 x 32, cp.async path): per warp and
// k16 step 8 mma (16384 FMA) against 4 ldmatrix.x4 (2 KiB, 16 shared-memory wavefronts of 128 B) plus the stage's
// cp.async writes (BK (BM + BN) 2 B = 12 KiB per block k tile, 6 wavefronts per warp k16 step): ~22 shared clocks
// per warp k16 step (128 B/clock/SM). A100: 8 mma at 1024 BF16 FMA/clock/SM = 16 clocks, so shared memory caps it
// at ~70%, ~50-60% after index arithmetic, pipeline fill and tails (~160-190 of 312 TFLOP/s). H100 SXM: the tensor
// cores need 8 clocks (2048 FMA/clock/SM), shared memory bound at ~35% of 990 TFLOP/s (~250-330 TFLOP/s); larger
// warp tiles (64 x 64: half the ldmatrix bytes per FMA) or wgmma would be the next steps. The float32-input path adds
// the conversions and 2x the global bytes; it is for convenience, bfloat16 storage is the fast path.
// Not measured on a GPU yet.
#include "cuda_compat.h"
#include "kernels/conv_bf16.h"
#include "kernels/conv_epilogue.cuh"
#include "kernels/mma_fragments.cuh"

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>

namespace convnet {
namespace {

using bf16_t = std::uint16_t;  // bfloat16 bits (cvt.rn.bf16.f32, ml_dtypes.bfloat16)

struct Bf16ConvParams {
  const void* x;  // float or bf16_t, as the kernel's In
  const void* w;
  const float* bias;  // null: none
  void* y;            // float, or bf16_t when y_bf16
  bool y_bf16;
  float alpha, beta;
  int C, H, W, N, F, Fg, Cg, KH, KW, sh, sw, ph, pw, OH, OW;
  int K;  // Cg*KH*KW
  int P;  // OH*OW*N
};

// Planted defects (emulator only): no cp.async wait, no barrier in the k-tile loop, every ldmatrix with the wrong
// .trans (the forward's all lose it; the backward's k-contiguous tiles gain it).
enum Defect : int { kNoDefect = 0, kNoWait = 1, kNoBarrier = 2, kWrongTrans = 3 };

__device__ __forceinline__ bf16_t to_bf16(float v) { return bf16_bits(v); }
__device__ __forceinline__ bf16_t to_bf16(bf16_t v) { return v; }

template <int BM, int BN, int BK, int WM, int WN, int STAGES, class In, int V, int kDefect, bool kRelu = false>
__global__ void conv_fwd_bf16(Bf16ConvParams p) {
  constexpr bool kAsync = std::is_same_v<In, bf16_t> && V == 8;  // else register-staged
  constexpr int T = 32 * WM * WN;
  constexpr int LDA = BM + 8, LDB = BN + 8;
  constexpr int MT = BM / WM / 16, NT = BN / WN / 8;
  static_assert(std::is_same_v<In, float> || std::is_same_v<In, bf16_t>, "float32 or bfloat16 inputs");
  static_assert(kAsync ? STAGES >= 2 : STAGES == 2, "cp.async: 2 or more stages; register-staged: double buffer");
  static_assert(kAsync || V == 1 || (V == 4 && std::is_same_v<In, float>), "register paths: 1 element or a float4");
  static_assert(BM % 16 == 0 && BN % 16 == 0, "pitch BM/8 + 1 (BN/8 + 1) 16-byte units odd: no ldmatrix conflicts");
  static_assert(BM % (16 * WM) == 0 && BN % (16 * WN) == 0, "warp tiles of whole 16 x 16 ldmatrix.x4 blocks");
  static_assert(BK % 16 == 0, "BK a multiple of the mma's k = 16");
  static_assert(T % (BM / V) == 0 && T % (BN / V) == 0, "each thread stages fixed columns");
  static_assert((BK * BM / V) % T == 0 && (BK * BN / V) % T == 0, "every thread stages the same number of chunks");

  // uint4: 16-byte aligned rows for cp.async and ldmatrix.
  SHARED(uint4, smem_a, [STAGES * BK * LDA / 8]);
  SHARED(uint4, smem_b, [STAGES * BK * LDB / 8]);
  bf16_t* As = reinterpret_cast<bf16_t*>(smem_a);
  bf16_t* Bs = reinterpret_cast<bf16_t*>(smem_b);
  const In* x = static_cast<const In*>(p.x);
  const In* w = static_cast<const In*>(p.w);

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
  const bool a_in = m0 + a_col < p.Fg;  // V > 1: Fg % V == 0, so the V filters are in or out together
  const In* a_src = w + std::int64_t(group) * p.Fg + m0 + a_col;

  // This thread's B column (V images of one output pixel) and its window origin; k rows step by T / (BN/V).
  constexpr int kBStep = T / (BN / V), kBChunks = BK * BN / V / T;
  const int b_col = (tid % (BN / V)) * V, b_row = tid / (BN / V);
  const int pcol = p0 + b_col;
  const bool b_in = pcol < p.P;  // V > 1: N % V == 0 and pcol % V == 0, so the V images share a pixel
  int ih0 = 0, iw0 = 0, img = 0;
  if (b_in) {
    img = pcol % p.N;
    const int q = pcol / p.N;
    ih0 = (q / p.OW) * p.sh - p.ph;
    iw0 = (q % p.OW) * p.sw - p.pw;
  }
  const In* b_base = x + std::int64_t(group) * p.Cg * p.H * p.W * p.N + img;

  // The source of A chunk j / B chunk j of k tile kt, or null for zeros.
  const auto a_source = [&](int kt, int j) -> const In* {
    const int k = kt * BK + a_row + j * kAStep;
    return a_in && k < p.K ? a_src + std::int64_t(k) * p.F : nullptr;
  };
  const auto b_source = [&](int kt, int j) -> const In* {
    const int k = kt * BK + b_row + j * kBStep;
    if (!b_in || k >= p.K) return nullptr;
    const int c = k / KHW, rest = k - c * KHW;
    const int ih = ih0 + rest / p.KW, iw = iw0 + rest % p.KW;
    if (ih < 0 || ih >= p.H || iw < 0 || iw >= p.W) return nullptr;
    return b_base + ((std::int64_t(c) * p.H + ih) * p.W + iw) * p.N;
  };

  // cp.async path: tile kt straight into `stage`.
  const auto copy_tile = [&](int stage, int kt) {
    bf16_t* as = As + stage * BK * LDA;
    bf16_t* bs = Bs + stage * BK * LDB;
#pragma unroll
    for (int j = 0; j < kAChunks; ++j) {
      const In* src = a_source(kt, j);
      cp_async_ca<16>(as + (a_row + j * kAStep) * LDA + a_col, src ? src : w, src ? 16 : 0);
    }
#pragma unroll
    for (int j = 0; j < kBChunks; ++j) {
      const In* src = b_source(kt, j);
      cp_async_ca<16>(bs + (b_row + j * kBStep) * LDB + b_col, src ? src : x, src ? 16 : 0);
    }
  };

  // Register-staged path: tile kt into registers (zeros outside), then rounded to bfloat16 into `stage`.
  using Staged = std::conditional_t<V == 4, float4, In>;
  Staged ra[kAChunks], rb[kBChunks];  // unused on the cp.async path
  const auto load_tile = [&](int kt) {
#pragma unroll
    for (int j = 0; j < kAChunks; ++j) {
      const In* src = a_source(kt, j);
      ra[j] = src ? *reinterpret_cast<const Staged*>(src) : Staged{};
    }
#pragma unroll
    for (int j = 0; j < kBChunks; ++j) {
      const In* src = b_source(kt, j);
      rb[j] = src ? *reinterpret_cast<const Staged*>(src) : Staged{};
    }
  };
  const auto store = [](bf16_t* dst, const Staged& v) {
    if constexpr (V == 4) {
      *reinterpret_cast<uint2*>(dst) = make_uint2(bf16x2_bits(v.x, v.y), bf16x2_bits(v.z, v.w));
    } else {
      *dst = to_bf16(v);
    }
  };
  const auto store_tile = [&](int stage) {
    bf16_t* as = As + stage * BK * LDA;
    bf16_t* bs = Bs + stage * BK * LDB;
#pragma unroll
    for (int j = 0; j < kAChunks; ++j) store(as + (a_row + j * kAStep) * LDA + a_col, ra[j]);
#pragma unroll
    for (int j = 0; j < kBChunks; ++j) store(bs + (b_row + j * kBStep) * LDB + b_col, rb[j]);
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

  // The mma steps of one k tile. The lane's ldmatrix row: A matrix i = lane / 8 at (k 8 (i / 2), m 8 (i % 2)),
  // B matrix i at (k 8 (i % 2), n 8 (i / 2)); row lane % 8 of each.
  constexpr bool kTrans = kDefect != kWrongTrans;
  const int a_k = (lane >> 4) * 8 + (lane & 7), a_m = wm0 + ((lane >> 3) & 1) * 8;
  const int b_k = ((lane >> 3) & 1) * 8 + (lane & 7), b_n = wn0 + (lane >> 4) * 8;
  const auto mma_tile = [&](int stage) {
    const bf16_t* as = As + stage * BK * LDA;
    const bf16_t* bs = Bs + stage * BK * LDB;
#pragma unroll
    for (int k16 = 0; k16 < BK; k16 += 16) {
      std::uint32_t fa[MT][4], fb[NT][2];
#pragma unroll
      for (int i = 0; i < MT; ++i) {
        ldmatrix<4, kTrans>(fa[i], as + (k16 + a_k) * LDA + a_m + i * 16);
      }
#pragma unroll
      for (int j = 0; j < NT; j += 2) {
        std::uint32_t r[4];
        ldmatrix<4, kTrans>(r, bs + (k16 + b_k) * LDB + b_n + j * 8);
        fb[j][0] = r[0];
        fb[j][1] = r[1];
        fb[j + 1][0] = r[2];
        fb[j + 1][1] = r[3];
      }
#pragma unroll
      for (int i = 0; i < MT; ++i) {
#pragma unroll
        for (int j = 0; j < NT; ++j) mma_bf16_m16n8k16(acc[i][j], fa[i], fb[j], acc[i][j]);
      }
    }
  };

  // Braces everywhere below: a `#pragma unroll` directly after an unbraced `if constexpr (false-here)` made nvcc
  // 13.0 drop the rest of a loop (conv_tf32.cu).
  if constexpr (kAsync) {
    for (int s = 0; s < STAGES - 1; ++s) {
      if (s < ktiles) {
        copy_tile(s, s);
      }
      cp_async_commit();
    }
    for (int kt = 0; kt < ktiles; ++kt) {
      if constexpr (kDefect != kNoWait) {
        cp_async_wait<STAGES - 2>();
      }
      if constexpr (kDefect != kNoBarrier) {
        __syncthreads();
      }
      const int next = kt + STAGES - 1;
      if (next < ktiles) {
        copy_tile(next % STAGES, next);
      }
      cp_async_commit();
      mma_tile(kt % STAGES);
    }
    cp_async_wait<0>();  // no copy outlives the block (the trailing groups are empty)
  } else {
    load_tile(0);
    store_tile(0);
    __syncthreads();
    for (int kt = 0; kt < ktiles; ++kt) {
      const bool more = kt + 1 < ktiles;
      if (more) {
        load_tile(kt + 1);
      }
      mma_tile(kt % 2);
      if (more) {
        store_tile((kt + 1) % 2);
      }
      if constexpr (kDefect != kNoBarrier) {
        __syncthreads();
      }
    }
  }

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
        const std::int64_t at = std::int64_t(f) * p.P + col;
        // The ReLU comes before the bfloat16 rounding: max then round == round then max for round-to-nearest-even
        // (a positive value rounds to a positive value or +0, a negative one to a negative value or -0, NaN stays
        // NaN, and the ReLU sends -0 and NaN to +0 either way), so both orders give the unfused forward +
        // relu_forward's bits.
        if (p.y_bf16) {
          bf16_t* out = static_cast<bf16_t*>(p.y) + at;
          *out = bf16_bits(conv_activation<kRelu>(p.beta == 0.0f ? p.alpha * v
                                                                 : p.alpha * v + p.beta * bf16_to_float(*out)));
        } else {
          float* out = static_cast<float*>(p.y) + at;
          *out = conv_activation<kRelu>(p.beta == 0.0f ? p.alpha * v : p.alpha * v + p.beta * *out);
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------------------
// The backward passes: one implicit-GEMM template, conv_bwd_bf16<Op, ...>, for the input gradient (Op = DgradBf16)
// and the filter gradient (Op = WgradBf16), the GEMMs of conv_tf32.cu's conv_bwd_tf32 on the forward's bf16 machinery.
// GEMM per z slice: D[m][n] = sum_{k in [k_lo, k_hi)} A[m][k] B[k][n].
//
// Input gradient, z = group g (M = Cg input channels, N = H*W*N input pixel-images, images fastest, K = Fg*KH*KW):
//   A[m][k] = w[m, kh, kw, g*Fg + f], k = (kh*KW + kw)*Fg + f (w's own order: A's rows are contiguous along k);
//   B[k][p] = dy[g*Fg + f, oh, ow, n], p = (h*W + w)*N + n, h + ph - kh = oh*sh and w + pw - kw = ow*sw exactly,
//             0 <= oh < OH, 0 <= ow < OW; zero otherwise (stride holes, borders);
//   dx[g*Cg + m][p] = alpha D + beta dx (dx's flat (C, H*W*N) matrix; float32, or bfloat16 rounded once at the end).
//   With stride s > 1 only 1/(sh*sw) of the K products are non-zero: the mma does the zero work too.
// Filter gradient, z = g * splits + split (M = Fg filters, N = Cg*KH*KW taps (c, kh, kw), K = J = OH*OW*N cut into
//   `splits` chunks of `chunk` (a multiple of BK) for parallelism):
//   A[m][j] = dy[g*Fg + m][j] (dy's flat (F, J) rows: contiguous along k);
//   B[j][n] = x[g*Cg + c, oh*sh - ph + kh, ow*sw - pw + kw, img], j = (oh*OW + ow)*N + img, zero outside the image
//             (contiguous along k = j: V consecutive j are V images of one pixel when N % V == 0);
//   one split: dw[(c*KH + kh)*KW + kw][g*Fg + m] = alpha D + beta dw (dw float32 always);
//   several: split s's partial sum goes to workspace[s][same index] and conv_wgrad_bf16_reduce adds the splits in
//   order, then applies alpha and beta: deterministic (no atomics; the plan depends on the geometry only).
//
// Block, warps, mma tiles, accumulators and grid as the forward's (a BM x BN tile of D; grid x: ceil(N/BN), y:
// ceil(M/BM), z: slices). Shared memory, per stage, bfloat16 bits:
//   As[BM][BK + 8]: m-major, k contiguous (both A operands are k-contiguous in global memory);
//   Bs, input gradient: [BK][BN + 8], k-major (as dy: pixel-images contiguous), the forward's B tile;
//   Bs, filter gradient: [BN][BK + 8], n-major, k contiguous (as x along j).
// Fragments: a k-contiguous tile holds each fragment register's two k-adjacent elements side by side, so plain
// ldmatrix (no .trans: lane receives (row gid, cols 2 tig, 2 tig + 1) of matrix i) loads them: A 16 (m) x 16 (k):
// matrix i = (m0 = 8 (i % 2), k0 = 8 (i / 2)) -> a0..a3; B (n-major) 16 (n) x 16 (k) = two mma tiles j, j+1: matrix
// i = (k0 = 8 (i % 2), n0 = 8 (i / 2)) -> b[j][0..1], b[j+1][0..1]. The k-major B tile takes ldmatrix.trans exactly
// as the forward's. Bank rule: a k-contiguous pitch of BK + 8 elements is BK/8 + 1 16-byte units, odd when
// BK % 16 == 0, so the 8 rows of one matrix (8 consecutive m or n at one k column) fall in 8 different 16-byte bank
// quads: conflict-free; the k-major tile's pitch is the forward's (BN/8 + 1 units, odd). Every ldmatrix row starts at
// a multiple of 8 elements of a 16-byte aligned row.
// Loads, V elements a chunk: a k-contiguous tile as runs of V along k (BK/V threads a row, rows stepping by
// T/(BK/V)); the k-major tile as the forward's B (V images of one pixel, fixed column). V = 8 (bfloat16, cp.async
// 16 bytes into the stage, STAGES = 3) or V = 4 (float32: a 16-byte load, 4 conversions, an 8-byte shared store,
// register-staged double buffer) need N % V == 0 and, for the input gradient, Fg % V == 0 (V consecutive k share a
// tap; K, every chunk start and every dy row are then multiples of V), and 16-byte aligned operands; otherwise V = 1
// (2- or 4-byte loads). The two pipelines, their barriers and the zero fill (anything outside the GEMM or the
// tensors: src-size 0 or zeros in registers, never branched around in the mma loop) are exactly the forward's; the
// divisibility rules are the static_asserts below.
// Epilogue: the accumulators (row gid [+8], cols 2 tig, 2 tig + 1) through Op::store.
//
// Resources (64 x 128 tile, 256 threads): cp.async stages 3 x (64 x 40 + 32 x 136) x 2 B = 41,472 B (input
// gradient) and 3 x (64 + 128) x 40 x 2 B = 46,080 B (filter gradient; under the 48 KiB static limit), register
// paths 2/3 of that; 32 accumulators, 8 + 8 fragment registers, and on the register paths up to 24 staged values per
// thread (48 on the 32 x 64 tile's 64 threads). As compiled (CUDA 13.0, sm_80 and sm_90, no spills): 64-80 registers
// on the cp.async path, 95-136 on the float32 16-byte one, 128-214 on the 1-element ones (the filter gradient's
// recomputes each chunk's tap and pixel; those are the fallback paths); docs/architecture.md has the occupancy.
// Expected share of BF16 peak: the mma loop is the forward's (per warp
// and k16 step 8 mma against 4 ldmatrix.x4 and the stage's writes), so ~50-60% of A100's and ~35% of H100's dense
// BF16 peak for the filter gradient and the stride-1 input gradient (shared-memory bound, see the forward), before
// the split-K reduction (2 x splits x |dw| floats of traffic, small beside the GEMM for AlexNet's layers) and divided
// by sh*sw for a strided input gradient (zero products). Not measured on a GPU yet.
struct Bf16BwdParams {
  const void* a;  // input gradient: w    filter gradient: dy   (float or bf16_t, as the kernel's In)
  const void* b;  // input gradient: dy   filter gradient: x
  void* out;      // input gradient: dx (float, or bf16_t when out_bf16)   filter gradient: dw or the workspace (float)
  bool out_bf16;
  float alpha, beta;
  int C, H, W, N, F, Fg, Cg, KH, KW, sh, sw, ph, pw, OH, OW;
  int M, Ncols, K;    // GEMM extents (K: the whole reduction, before any split)
  int splits, chunk;  // filter gradient: K chunks (1 and K for the input gradient)
  int total;          // filter gradient: Cg*KH*KW*F, the floats of dw (one workspace slice)
};

// One z slice of the backward GEMM: its group, its k range, where and how its results go.
struct Bf16BwdSlice {
  int g, k_lo, k_hi;
  void* out;
  float alpha, beta;
};

// Element offsets into the operands (the kernel adds them to its typed pointers); -1: a zero (no element).
struct DgradBf16 {
  static constexpr bool kBKContig = false;  // Bs[BK][BN + 8]

  static __device__ __forceinline__ Bf16BwdSlice slice(const Bf16BwdParams& p, int z) {
    return Bf16BwdSlice{z, 0, p.K, p.out, p.alpha, p.beta};
  }
  // A[m][k], m < M and k < K: w[m, kh, kw, g*Fg + f], k = khw*Fg + f.
  static __device__ __forceinline__ std::int64_t a_at(const Bf16BwdParams& p, const Bf16BwdSlice& s, int m, int k) {
    const int khw = k / p.Fg, f = k - khw * p.Fg;
    return (std::int64_t(m) * p.KH * p.KW + khw) * p.F + s.g * p.Fg + f;
  }
  // A column of B, fixed per thread: the input pixel (h, w) and image n of column p < Ncols.
  struct BFix {
    std::int64_t base;  // (g*Fg*OH*OW)*N + n
    int h, w;
  };
  static __device__ __forceinline__ BFix b_fix(const Bf16BwdParams& p, const Bf16BwdSlice& s, int col) {
    const int n = col % p.N, q = col / p.N;
    return BFix{std::int64_t(s.g) * p.Fg * p.OH * p.OW * p.N + n, q / p.W, q % p.W};
  }
  // B[k][col]: the dy element tap (kh, kw) of filter f sends to this pixel, or -1 (stride hole, border).
  static __device__ __forceinline__ std::int64_t b_at(const Bf16BwdParams& p, const BFix& c, int k) {
    const int khw = k / p.Fg, f = k - khw * p.Fg;
    const int kh = khw / p.KW, kw = khw - kh * p.KW;
    const int th = c.h + p.ph - kh, tw = c.w + p.pw - kw;
    if (th < 0 || tw < 0) return -1;
    const int oh = th / p.sh, ow = tw / p.sw;
    if (oh * p.sh != th || ow * p.sw != tw || oh >= p.OH || ow >= p.OW) return -1;
    return c.base + ((std::int64_t(f) * p.OH + oh) * p.OW + ow) * p.N;
  }
  static __device__ __forceinline__ void store(const Bf16BwdParams& p, const Bf16BwdSlice& s, int m, int col,
                                               float v) {
    const std::int64_t at = std::int64_t(s.g * p.Cg + m) * p.Ncols + col;
    if (p.out_bf16) {
      bf16_t* o = static_cast<bf16_t*>(s.out) + at;
      *o = bf16_bits(s.beta == 0.0f ? s.alpha * v : s.alpha * v + s.beta * bf16_to_float(*o));
    } else {
      float* o = static_cast<float*>(s.out) + at;
      *o = s.beta == 0.0f ? s.alpha * v : s.alpha * v + s.beta * *o;
    }
  }
};

struct WgradBf16 {
  static constexpr bool kBKContig = true;  // Bs[BN][BK + 8]

  static __device__ __forceinline__ Bf16BwdSlice slice(const Bf16BwdParams& p, int z) {
    const int g = z / p.splits, split = z - g * p.splits;
    const int k_lo = split * p.chunk, k_hi = min(p.K, k_lo + p.chunk);
    if (p.splits == 1) return Bf16BwdSlice{g, k_lo, k_hi, p.out, p.alpha, p.beta};
    return Bf16BwdSlice{g, k_lo, k_hi, static_cast<float*>(p.out) + std::int64_t(split) * p.total, 1.0f, 0.0f};
  }
  // A[m][j] = dy[g*Fg + m][j].
  static __device__ __forceinline__ std::int64_t a_at(const Bf16BwdParams& p, const Bf16BwdSlice& s, int m, int j) {
    return std::int64_t(s.g * p.Fg + m) * p.K + j;
  }
  // A row of B (the tap n = (c, kh, kw) < Ncols): recomputed per copy (rows change with the chunk).
  struct BFix {
    std::int64_t base;  // (g*Cg + c)*H*W*N
    int kh, kw;
  };
  static __device__ __forceinline__ BFix b_fix(const Bf16BwdParams& p, const Bf16BwdSlice& s, int n) {
    const int khw = p.KH * p.KW, c = n / khw, r = n - c * khw;
    return BFix{std::int64_t(s.g * p.Cg + c) * p.H * p.W * p.N, r / p.KW, r % p.KW};
  }
  // B[j][n]: x at tap (kh, kw) of output pixel (oh, ow), image img, or -1 outside the image.
  static __device__ __forceinline__ std::int64_t b_at(const Bf16BwdParams& p, const BFix& r, int j) {
    const int q = j / p.N, img = j - q * p.N, oh = q / p.OW, ow = q - oh * p.OW;
    const int ih = oh * p.sh - p.ph + r.kh, iw = ow * p.sw - p.pw + r.kw;
    if (ih < 0 || ih >= p.H || iw < 0 || iw >= p.W) return -1;
    return r.base + (std::int64_t(ih) * p.W + iw) * p.N + img;
  }
  static __device__ __forceinline__ void store(const Bf16BwdParams& p, const Bf16BwdSlice& s, int m, int n, float v) {
    float* o = static_cast<float*>(s.out) + std::int64_t(n) * p.F + s.g * p.Fg + m;
    *o = s.beta == 0.0f ? s.alpha * v : s.alpha * v + s.beta * *o;
  }
};

// dw[i] = alpha * sum_{split < splits} ws[split * total + i] + beta * dw[i], the splits added in order (deterministic).
// Block: 256 threads, grid-stride over the total floats of dw; consecutive threads read consecutive floats.
__global__ void __launch_bounds__(256) conv_wgrad_bf16_reduce(const float* ws, float* dw, int total, int splits,
                                                               float alpha, float beta) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += gridDim.x * blockDim.x) {
    float acc = 0.0f;
    for (int split = 0; split < splits; ++split) acc += ws[std::int64_t(split) * total + i];
    dw[i] = beta == 0.0f ? alpha * acc : alpha * acc + beta * dw[i];
  }
}

template <class Op, int BM, int BN, int BK, int WM, int WN, int STAGES, class In, int V, int kDefect>
__global__ void conv_bwd_bf16(Bf16BwdParams p) {
  constexpr bool kAsync = std::is_same_v<In, bf16_t> && V == 8;  // else register-staged
  constexpr bool kBK = Op::kBKContig;
  constexpr int T = 32 * WM * WN;
  constexpr int LDK = BK + 8, LDB = kBK ? LDK : BN + 8;  // k-contiguous pitch; B's pitch
  constexpr int kAStage = BM * LDK, kBStage = kBK ? BN * LDK : BK * LDB;
  constexpr int MT = BM / WM / 16, NT = BN / WN / 8;
  static_assert(std::is_same_v<In, float> || std::is_same_v<In, bf16_t>, "float32 or bfloat16 inputs");
  static_assert(kAsync ? STAGES >= 2 : STAGES == 2, "cp.async: 2 or more stages; register-staged: double buffer");
  static_assert(kAsync || V == 1 || (V == 4 && std::is_same_v<In, float>), "register paths: 1 element or a float4");
  static_assert(BK % 16 == 0 && BN % 16 == 0, "pitches BK/8 + 1 and BN/8 + 1 16-byte units odd: no conflicts");
  static_assert(BM % (16 * WM) == 0 && BN % (16 * WN) == 0, "warp tiles of whole 16 x 16 ldmatrix.x4 blocks");
  static_assert(T % (BK / V) == 0 && (BM * BK / V) % T == 0, "A: each thread stages fixed k columns, equal counts");
  static_assert(kBK ? (BN * BK / V) % T == 0 : (T % (BN / V) == 0 && (BK * BN / V) % T == 0),
                "B: each thread stages fixed columns, equal counts");

  SHARED(uint4, smem_a, [STAGES * kAStage / 8]);
  SHARED(uint4, smem_b, [STAGES * kBStage / 8]);
  bf16_t* As = reinterpret_cast<bf16_t*>(smem_a);
  bf16_t* Bs = reinterpret_cast<bf16_t*>(smem_b);
  const In* a = static_cast<const In*>(p.a);
  const In* b = static_cast<const In*>(p.b);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm0 = (warp / WN) * (BM / WM), wn0 = (warp % WN) * (BN / WN);
  const Bf16BwdSlice s = Op::slice(p, blockIdx.z);
  const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
  const int ktiles = (s.k_hi - s.k_lo + BK - 1) / BK;

  // k-contiguous tiles: this thread stages k columns [kc, kc + V) of rows r0, r0 + kRowStep, ...
  constexpr int kRowStep = T / (BK / V), kAChunks = BM * BK / V / T, kBChunks = BN * BK / V / T;
  const int kc = (tid % (BK / V)) * V, r0 = tid / (BK / V);
  // k-major B (input gradient): this thread's fixed column (V images of one pixel) and first k row, as the forward.
  constexpr int kBColThreads = kBK ? 1 : BN / V, kBStep = T / kBColThreads;
  const int b_col = (tid % kBColThreads) * V, b_row = tid / kBColThreads;
  const bool b_in = !kBK && n0 + b_col < p.Ncols;  // V > 1: N % V == 0, so the V images share a pixel
  typename Op::BFix bfix{};
  if constexpr (!kBK) {
    if (b_in) {
      bfix = Op::b_fix(p, s, n0 + b_col);
    }
  }

  // The source of A chunk j / B chunk j of k tile kt, or null for zeros; and where the chunk goes in a stage.
  const auto a_source = [&](int kt, int j) -> const In* {
    const int m = m0 + r0 + j * kRowStep, k = s.k_lo + kt * BK + kc;
    return m < p.M && k < s.k_hi ? a + Op::a_at(p, s, m, k) : nullptr;
  };
  const auto b_source = [&](int kt, int j) -> const In* {
    std::int64_t at = -1;
    if constexpr (kBK) {
      const int n = n0 + r0 + j * kRowStep, k = s.k_lo + kt * BK + kc;
      if (n < p.Ncols && k < s.k_hi) {
        at = Op::b_at(p, Op::b_fix(p, s, n), k);
      }
    } else {
      const int k = s.k_lo + kt * BK + b_row + j * kBStep;
      if (b_in && k < s.k_hi) {
        at = Op::b_at(p, bfix, k);
      }
    }
    return at < 0 ? nullptr : b + at;
  };
  const auto a_dst = [&](bf16_t* as, int j) { return as + (r0 + j * kRowStep) * LDK + kc; };
  const auto b_dst = [&](bf16_t* bs, int j) {
    return kBK ? bs + (r0 + j * kRowStep) * LDK + kc : bs + (b_row + j * kBStep) * LDB + b_col;
  };

  // cp.async path: tile kt straight into `stage`.
  const auto copy_tile = [&](int stage, int kt) {
    bf16_t* as = As + stage * kAStage;
    bf16_t* bs = Bs + stage * kBStage;
#pragma unroll
    for (int j = 0; j < kAChunks; ++j) {
      const In* src = a_source(kt, j);
      cp_async_ca<16>(a_dst(as, j), src ? src : a, src ? 16 : 0);
    }
#pragma unroll
    for (int j = 0; j < kBChunks; ++j) {
      const In* src = b_source(kt, j);
      cp_async_ca<16>(b_dst(bs, j), src ? src : b, src ? 16 : 0);
    }
  };

  // Register-staged path: tile kt into registers (zeros outside), then rounded to bfloat16 into `stage`.
  using Staged = std::conditional_t<V == 4, float4, In>;
  Staged ra[kAChunks], rb[kBChunks];  // unused on the cp.async path
  const auto load_tile = [&](int kt) {
#pragma unroll
    for (int j = 0; j < kAChunks; ++j) {
      const In* src = a_source(kt, j);
      ra[j] = src ? *reinterpret_cast<const Staged*>(src) : Staged{};
    }
#pragma unroll
    for (int j = 0; j < kBChunks; ++j) {
      const In* src = b_source(kt, j);
      rb[j] = src ? *reinterpret_cast<const Staged*>(src) : Staged{};
    }
  };
  const auto store = [](bf16_t* dst, const Staged& v) {
    if constexpr (V == 4) {
      *reinterpret_cast<uint2*>(dst) = make_uint2(bf16x2_bits(v.x, v.y), bf16x2_bits(v.z, v.w));
    } else {
      *dst = to_bf16(v);
    }
  };
  const auto store_tile = [&](int stage) {
    bf16_t* as = As + stage * kAStage;
    bf16_t* bs = Bs + stage * kBStage;
#pragma unroll
    for (int j = 0; j < kAChunks; ++j) store(a_dst(as, j), ra[j]);
#pragma unroll
    for (int j = 0; j < kBChunks; ++j) store(b_dst(bs, j), rb[j]);
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

  // The mma steps of one k tile; the lane's ldmatrix row (row lane % 8 of matrix lane / 8): A matrix i at
  // (m 8 (i % 2), k 8 (i / 2)); n-major B matrix i at (n 8 (i / 2), k 8 (i % 2)); k-major B as the forward's.
  // kWrongTrans loads every fragment with the other ldmatrix (.trans where it must not be, and the reverse).
  constexpr bool kFlip = kDefect == kWrongTrans;
  constexpr bool kATrans = kFlip, kBTrans = kBK == kFlip;
  const int a_m = wm0 + ((lane >> 3) & 1) * 8 + (lane & 7), a_k = (lane >> 4) * 8;
  const int b_n = wn0 + (lane >> 4) * 8 + (kBK ? lane & 7 : 0);
  const int b_k = ((lane >> 3) & 1) * 8 + (kBK ? 0 : lane & 7);
  const auto mma_tile = [&](int stage) {
    const bf16_t* as = As + stage * kAStage;
    const bf16_t* bs = Bs + stage * kBStage;
#pragma unroll
    for (int k16 = 0; k16 < BK; k16 += 16) {
      std::uint32_t fa[MT][4], fb[NT][2];
#pragma unroll
      for (int i = 0; i < MT; ++i) {
        ldmatrix<4, kATrans>(fa[i], as + (a_m + i * 16) * LDK + k16 + a_k);
      }
#pragma unroll
      for (int j = 0; j < NT; j += 2) {
        std::uint32_t r[4];
        ldmatrix<4, kBTrans>(r, kBK ? bs + (b_n + j * 8) * LDK + k16 + b_k : bs + (k16 + b_k) * LDB + b_n + j * 8);
        fb[j][0] = r[0];
        fb[j][1] = r[1];
        fb[j + 1][0] = r[2];
        fb[j + 1][1] = r[3];
      }
#pragma unroll
      for (int i = 0; i < MT; ++i) {
#pragma unroll
        for (int j = 0; j < NT; ++j) mma_bf16_m16n8k16(acc[i][j], fa[i], fb[j], acc[i][j]);
      }
    }
  };

  // The forward's two pipelines (their rules: the file comment). Braces everywhere (nvcc 13.0 and `#pragma unroll`).
  if constexpr (kAsync) {
    for (int st = 0; st < STAGES - 1; ++st) {
      if (st < ktiles) {
        copy_tile(st, st);
      }
      cp_async_commit();
    }
    for (int kt = 0; kt < ktiles; ++kt) {
      if constexpr (kDefect != kNoWait) {
        cp_async_wait<STAGES - 2>();
      }
      if constexpr (kDefect != kNoBarrier) {
        __syncthreads();
      }
      const int next = kt + STAGES - 1;
      if (next < ktiles) {
        copy_tile(next % STAGES, next);
      }
      cp_async_commit();
      mma_tile(kt % STAGES);
    }
    cp_async_wait<0>();  // no copy outlives the block (the trailing groups are empty)
  } else {
    load_tile(0);
    store_tile(0);
    __syncthreads();
    for (int kt = 0; kt < ktiles; ++kt) {
      const bool more = kt + 1 < ktiles;
      if (more) {
        load_tile(kt + 1);
      }
      mma_tile(kt % 2);
      if (more) {
        store_tile((kt + 1) % 2);
      }
      if constexpr (kDefect != kNoBarrier) {
        __syncthreads();
      }
    }
  }

#pragma unroll
  for (int i = 0; i < MT; ++i) {
#pragma unroll
    for (int j = 0; j < NT; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const mma::RowCol rc = mma::accumulator(lane, e);
        const int m = m0 + wm0 + i * 16 + rc.row, n = n0 + wn0 + j * 8 + rc.col;
        if (m < p.M && n < p.Ncols) {
          Op::store(p, s, m, n, acc[i][j][e]);
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------------------
// The tiles (BK = 32) and their load paths, for the three passes.
using KernelFn = void (*)(Bf16ConvParams);
using BwdKernelFn = void (*)(Bf16BwdParams);

enum Path : int { kCpAsync16 = 0, kFloat4 = 1, kFloat1 = 2, kBf16x1 = 3, kNumPaths = 4 };
const char* const kPathNames[kNumPaths] = {"cp.async 16-byte", "float32 16-byte register", "float32 1-element register",
                                            "bfloat16 1-element register"};
constexpr int kNumDefects = 3;

struct Bf16Tile {
  int BM, BN, threads;
  KernelFn path[kNumPaths];
  KernelFn path_relu[kNumPaths];  // the same with the fused ReLU epilogue
  KernelFn planted[kNumPaths][kNumDefects];  // [path][defect - 1], emulator only; null where not planted (and nvcc)
  BwdKernelFn bwd[2][kNumPaths];             // [pass: 0 input gradient, 1 filter gradient][path]
  BwdKernelFn bwd_planted[2][kNumPaths][kNumDefects];  // as `planted`
};

template <int BM, int BN, int WM, int WN, int kDefect, bool kRelu = false>
constexpr KernelFn kernel_of(int path) {
  return path == kCpAsync16 ? conv_fwd_bf16<BM, BN, 32, WM, WN, 3, bf16_t, 8, kDefect, kRelu>
         : path == kFloat4  ? conv_fwd_bf16<BM, BN, 32, WM, WN, 2, float, 4, kDefect, kRelu>
         : path == kFloat1  ? conv_fwd_bf16<BM, BN, 32, WM, WN, 2, float, 1, kDefect, kRelu>
                            : conv_fwd_bf16<BM, BN, 32, WM, WN, 2, bf16_t, 1, kDefect, kRelu>;
}

template <class Op, int BM, int BN, int WM, int WN, int kDefect>
constexpr BwdKernelFn bwd_kernel_of(int path) {
  return path == kCpAsync16 ? conv_bwd_bf16<Op, BM, BN, 32, WM, WN, 3, bf16_t, 8, kDefect>
         : path == kFloat4  ? conv_bwd_bf16<Op, BM, BN, 32, WM, WN, 2, float, 4, kDefect>
         : path == kFloat1  ? conv_bwd_bf16<Op, BM, BN, 32, WM, WN, 2, float, 1, kDefect>
                            : conv_bwd_bf16<Op, BM, BN, 32, WM, WN, 2, bf16_t, 1, kDefect>;
}

template <class Op, int BM, int BN, int WM, int WN>
constexpr std::array<BwdKernelFn, kNumPaths> bwd_paths() {
  return {bwd_kernel_of<Op, BM, BN, WM, WN, kNoDefect>(kCpAsync16),
          bwd_kernel_of<Op, BM, BN, WM, WN, kNoDefect>(kFloat4),
          bwd_kernel_of<Op, BM, BN, WM, WN, kNoDefect>(kFloat1),
          bwd_kernel_of<Op, BM, BN, WM, WN, kNoDefect>(kBf16x1)};
}

// The planted variants of a pass: all three in the cp.async path, the barrier and .trans ones in the float32
// 1-element path (the register paths have no cp.async wait to drop).
template <class Op, int BM, int BN, int WM, int WN>
constexpr std::array<std::array<BwdKernelFn, kNumDefects>, kNumPaths> bwd_planted() {
  return {{{bwd_kernel_of<Op, BM, BN, WM, WN, kNoWait>(kCpAsync16),
            bwd_kernel_of<Op, BM, BN, WM, WN, kNoBarrier>(kCpAsync16),
            bwd_kernel_of<Op, BM, BN, WM, WN, kWrongTrans>(kCpAsync16)},
           {nullptr, nullptr, nullptr},
           {nullptr, bwd_kernel_of<Op, BM, BN, WM, WN, kNoBarrier>(kFloat1),
            bwd_kernel_of<Op, BM, BN, WM, WN, kWrongTrans>(kFloat1)},
           {nullptr, nullptr, nullptr}}};
}

template <int BM, int BN, int WM, int WN>
Bf16Tile make_tile() {
  Bf16Tile t{BM, BN, 32 * WM * WN,
             {kernel_of<BM, BN, WM, WN, kNoDefect>(kCpAsync16), kernel_of<BM, BN, WM, WN, kNoDefect>(kFloat4),
              kernel_of<BM, BN, WM, WN, kNoDefect>(kFloat1), kernel_of<BM, BN, WM, WN, kNoDefect>(kBf16x1)},
             {kernel_of<BM, BN, WM, WN, kNoDefect, true>(kCpAsync16),
              kernel_of<BM, BN, WM, WN, kNoDefect, true>(kFloat4), kernel_of<BM, BN, WM, WN, kNoDefect, true>(kFloat1),
              kernel_of<BM, BN, WM, WN, kNoDefect, true>(kBf16x1)},
             {}, {}, {}};
  const auto dgrad = bwd_paths<DgradBf16, BM, BN, WM, WN>(), wgrad = bwd_paths<WgradBf16, BM, BN, WM, WN>();
  for (int path = 0; path < kNumPaths; ++path) {
    t.bwd[0][path] = dgrad[path];
    t.bwd[1][path] = wgrad[path];
  }
#if CONVNET_EMU
  const KernelFn fwd_planted[kNumPaths][kNumDefects] = {
      {kernel_of<BM, BN, WM, WN, kNoWait>(kCpAsync16), kernel_of<BM, BN, WM, WN, kNoBarrier>(kCpAsync16),
       kernel_of<BM, BN, WM, WN, kWrongTrans>(kCpAsync16)},
      {nullptr, nullptr, nullptr},
      {nullptr, kernel_of<BM, BN, WM, WN, kNoBarrier>(kFloat1), kernel_of<BM, BN, WM, WN, kWrongTrans>(kFloat1)},
      {nullptr, nullptr, nullptr}};
  const auto dgrad_planted = bwd_planted<DgradBf16, BM, BN, WM, WN>();
  const auto wgrad_planted = bwd_planted<WgradBf16, BM, BN, WM, WN>();
  for (int path = 0; path < kNumPaths; ++path) {
    for (int d = 0; d < kNumDefects; ++d) {
      t.planted[path][d] = fwd_planted[path][d];
      t.bwd_planted[0][path][d] = dgrad_planted[path][d];
      t.bwd_planted[1][path][d] = wgrad_planted[path][d];
    }
  }
#endif
  return t;
}

// Row 0: 64 x 128 (M x N: filters x pixel-images forward, channels x pixel-images for the input gradient, filters x
// taps for the filter gradient), 8 warps (2 x 4) of 32 x 32; row 1: 32 x 64, 2 warps (1 x 2) of 32 x 32, for a small
// M or too few big tiles to fill the GPU (the TF32 tiles and rule).
const Bf16Tile kTiles[] = {make_tile<64, 128, 2, 4>(), make_tile<32, 64, 1, 2>()};
constexpr int kNumTiles = sizeof(kTiles) / sizeof(kTiles[0]);
constexpr int kSMs = 132;  // an H100 SXM (fixed: plans are device-independent, as conv.cu's)

std::atomic<int> g_tile_override{-1};
std::atomic<int> g_defect{0};

bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

int pick_tile(const ConvGeometry& g) {
  const int forced = g_tile_override.load();
  if (forced >= 0) return forced;
  const int Fg = g.F / g.groups;
  const std::int64_t P = std::int64_t(g.OH) * g.OW * g.N;
  const std::int64_t big_blocks = ((P + 127) / 128) * ((Fg + 63) / 64) * g.groups;
  return (Fg <= 32 || big_blocks < kSMs) ? 1 : 0;
}

// The load path for these inputs, given whether x and w are both 16-byte aligned.
Path pick_path(const ConvGeometry& g, bool inputs_bf16, bool aligned) {
  const int Fg = g.F / g.groups;
  if (inputs_bf16) return aligned && g.N % 8 == 0 && Fg % 8 == 0 ? kCpAsync16 : kBf16x1;
  return aligned && g.N % 4 == 0 && Fg % 4 == 0 ? kFloat4 : kFloat1;
}

Bf16ConvParams make_params(const ConvGeometry& g) {
  Bf16ConvParams p{};
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

dim3 grid_of(const Bf16Tile& t, const Bf16ConvParams& p, int groups) {
  return dim3(ceil_div(p.P, t.BN), ceil_div(p.Fg, t.BM), static_cast<unsigned>(groups));
}

// The launch's kernel: the path's, or its planted variant (a clear error where that defect is not planted).
template <class Fn>
Fn pick_kernel(Fn production, const Fn (&planted)[kNumDefects], Path path) {
  const int defect = g_defect.load();
  if (defect == 0) return production;
  CONVNET_REQUIRE(planted[defect - 1] != nullptr, "planted defect " + std::to_string(defect) +
                                                       " is not planted in the " + kPathNames[path] + " path");
  return planted[defect - 1];
}

// Filter gradient split-K: each split at least kMinChunk long (8 k tiles), at most kMaxSplits of them, enough to give
// the GPU about two blocks per SM (conv_tf32.cu's rule).
constexpr std::int64_t kMinChunk = 256, kMaxSplits = 64, kBK = 32;
std::atomic<int> g_split_override{0};

// The tile row for a backward GEMM with M rows and Ncols columns in `slices` z slices (the forward's rule).
int pick_bwd_tile(std::int64_t M, std::int64_t Ncols, std::int64_t slices) {
  const int forced = g_tile_override.load();
  if (forced >= 0) return forced;
  const std::int64_t big_blocks = ((Ncols + 127) / 128) * ((M + 63) / 64) * slices;
  return (M <= 32 || big_blocks < kSMs) ? 1 : 0;
}

// What a backward call launches: the pass (0 input gradient, 1 filter gradient), the row, the GEMM and the grid.
struct BwdPlan {
  int pass, tile;
  Bf16BwdParams p;  // pointers and alpha/beta unset
  dim3 grid;
};

BwdPlan make_bwd_plan(int pass, const ConvGeometry& g) {
  const ConvGeometry checked = conv_geometry(g.C, g.H, g.W, g.N, g.F, g.KH, g.KW, g.stride_h, g.stride_w, g.pad_h,
                                             g.pad_w, g.groups);
  CONVNET_REQUIRE(checked.OH == g.OH && checked.OW == g.OW, "output size does not match the geometry");
  BwdPlan pl{};
  pl.pass = pass;
  Bf16BwdParams& p = pl.p;
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
  pl.tile = pick_bwd_tile(M, Ncols, g.groups * max_splits);
  if (pass == 1) {
    // Split K until the grid has about two blocks per SM, chunks a multiple of BK and at least kMinChunk long.
    const Bf16Tile& t = kTiles[pl.tile];
    const std::int64_t blocks = ((Ncols + t.BN - 1) / t.BN) * ((M + t.BM - 1) / t.BM) * g.groups;
    std::int64_t splits = std::min((2 * kSMs + blocks - 1) / blocks, max_splits);
    if (g_split_override.load() > 0) splits = std::min<std::int64_t>(g_split_override.load(), (J + kBK - 1) / kBK);
    const std::int64_t chunk = ((J + splits - 1) / splits + kBK - 1) / kBK * kBK;
    p.splits = int((J + chunk - 1) / chunk);
    p.chunk = p.splits > 1 ? int(chunk) : p.K;
  }
  const Bf16Tile& t = kTiles[pl.tile];
  const std::int64_t slices = std::int64_t(g.groups) * p.splits;
  CONVNET_REQUIRE((M + t.BM - 1) / t.BM <= 65535 && slices <= 65535, "grid too large for this geometry");
  pl.grid = dim3(ceil_div(Ncols, t.BN), ceil_div(M, t.BM), static_cast<unsigned>(slices));
  return pl;
}

// The backward load path: V = 8 (bfloat16) or 4 (float32) consecutive k of one run need N % V == 0 and, for the
// input gradient, Fg % V == 0 (conv_bwd_bf16's comment), and 16-byte aligned operands.
Path pick_bwd_path(int pass, const ConvGeometry& g, bool inputs_bf16, bool aligned) {
  const int V = inputs_bf16 ? 8 : 4;
  const bool vec = aligned && g.N % V == 0 && (pass == 1 || (g.F / g.groups) % V == 0);
  if (inputs_bf16) return vec ? kCpAsync16 : kBf16x1;
  return vec ? kFloat4 : kFloat1;
}

void launch_bwd(const BwdPlan& pl, Path path, cudaStream_t stream) {
  const Bf16Tile& t = kTiles[pl.tile];
  launch(pick_kernel(t.bwd[pl.pass][path], t.bwd_planted[pl.pass][path], path), pl.grid, dim3(t.threads), 0, stream,
         pl.p);
}

}  // namespace

void conv_forward_bf16(const ConvGeometry& g, const void* x, const void* w, bool inputs_bf16, const float* bias,
                       void* y, bool y_bf16, float alpha, float beta, bool relu, cudaStream_t stream) {
  CONVNET_REQUIRE(x && w && y, "null pointer");
  const ConvGeometry checked = conv_geometry(g.C, g.H, g.W, g.N, g.F, g.KH, g.KW, g.stride_h, g.stride_w, g.pad_h,
                                             g.pad_w, g.groups);
  CONVNET_REQUIRE(checked.OH == g.OH && checked.OW == g.OW, "output size does not match the geometry");
  Bf16ConvParams p = make_params(g);
  p.x = x; p.w = w; p.bias = bias; p.y = y; p.y_bf16 = y_bf16; p.alpha = alpha; p.beta = beta;
  const Bf16Tile& t = kTiles[pick_tile(g)];
  const dim3 grid = grid_of(t, p, g.groups);
  CONVNET_REQUIRE(grid.y <= 65535 && grid.z <= 65535, "grid too large for this geometry");
  const Path path = pick_path(g, inputs_bf16, aligned16(x) && aligned16(w));
  // the planted variants have the plain epilogue: their tests never ask for the ReLU
  CONVNET_REQUIRE(!relu || g_defect.load() == 0, "planted defects have no ReLU epilogue");
  launch(relu ? t.path_relu[path] : pick_kernel(t.path[path], t.planted[path], path), grid, dim3(t.threads), 0, stream,
         p);
}

void conv_backward_data_bf16(const ConvGeometry& g, const void* dy, const void* w, bool inputs_bf16, void* dx,
                             bool dx_bf16, float alpha, float beta, cudaStream_t stream) {
  CONVNET_REQUIRE(dy && w && dx, "null pointer");
  BwdPlan pl = make_bwd_plan(0, g);
  pl.p.a = w; pl.p.b = dy; pl.p.out = dx; pl.p.out_bf16 = dx_bf16; pl.p.alpha = alpha; pl.p.beta = beta;
  launch_bwd(pl, pick_bwd_path(0, g, inputs_bf16, aligned16(dy) && aligned16(w)), stream);
}

std::int64_t conv_backward_filter_bf16_workspace(const ConvGeometry& g) {
  const BwdPlan pl = make_bwd_plan(1, g);
  return pl.p.splits > 1 ? std::int64_t(pl.p.splits) * pl.p.total : 0;
}

void conv_backward_filter_bf16(const ConvGeometry& g, const void* x, const void* dy, bool inputs_bf16, float* dw,
                               float* workspace, std::int64_t workspace_floats, float alpha, float beta,
                               cudaStream_t stream) {
  CONVNET_REQUIRE(x && dy && dw, "null pointer");
  BwdPlan pl = make_bwd_plan(1, g);
  const std::int64_t total = pl.p.total, splits = pl.p.splits;
  if (splits > 1) {
    CONVNET_REQUIRE(workspace != nullptr && workspace_floats >= splits * total,
                    "workspace too small: need " + std::to_string(splits * total) + " floats");
    CONVNET_REQUIRE(splits * total <= std::numeric_limits<int>::max(),
                    "workspace has 2^31 or more elements (unsupported)");
  }
  pl.p.a = dy; pl.p.b = x; pl.p.out = splits > 1 ? workspace : dw; pl.p.out_bf16 = false;
  pl.p.alpha = alpha; pl.p.beta = beta;
  launch_bwd(pl, pick_bwd_path(1, g, inputs_bf16, aligned16(x) && aligned16(dy)), stream);
  if (splits > 1) {
    const unsigned blocks = static_cast<unsigned>(std::min<std::int64_t>((total + 255) / 256, 4 * kSMs));
    launch(conv_wgrad_bf16_reduce, dim3(blocks), dim3(256), 0, stream, workspace, dw, int(total), int(splits), alpha,
           beta);
  }
}

std::string conv_bf16_plan(const ConvGeometry& g, bool inputs_bf16, ConvPass pass) {
  const auto describe = [](const Bf16Tile& t, Path path, const dim3& grid) {
    return "bf16 tile " + std::to_string(t.BM) + "x" + std::to_string(t.BN) + "x32, " + std::to_string(t.threads) +
           " threads, " + kPathNames[path] + " path, grid " + std::to_string(grid.x) + "x" + std::to_string(grid.y) +
           "x" + std::to_string(grid.z);
  };
  if (pass == ConvPass::forward) {
    const Bf16Tile& t = kTiles[pick_tile(g)];
    return describe(t, pick_path(g, inputs_bf16, true), grid_of(t, make_params(g), g.groups));
  }
  const int bwd = pass == ConvPass::backward_data ? 0 : 1;
  const BwdPlan pl = make_bwd_plan(bwd, g);
  std::string s = describe(kTiles[pl.tile], pick_bwd_path(bwd, g, inputs_bf16, true), pl.grid);
  if (bwd == 1) s += ", " + std::to_string(pl.p.splits) + " split(s) of " + std::to_string(pl.p.chunk);
  return s;
}

int conv_bf16_tile_count() { return kNumTiles; }

void conv_bf16_set_overrides(int row, int planted_defect, int wgrad_splits) {
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
