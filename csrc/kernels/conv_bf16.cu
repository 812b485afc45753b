// BF16 tensor-core convolution forward (API in conv_bf16.h): an implicit GEMM on mma.sync.m16n8k16 (bf16 inputs,
// FP32 accumulators), fragments loaded with ldmatrix.trans, a multi-stage cp.async pipeline for bfloat16 inputs and a
// register-staged double buffer for float32 inputs (rounded to bfloat16 on the way to shared memory).
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
// y = alpha v + beta y in FP32; a bfloat16 y is read and written as bfloat16 (rounded to nearest even once).
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
#include "kernels/mma_fragments.cuh"

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

enum Defect : int { kNoDefect = 0, kNoWait = 1, kNoBarrier = 2, kNoTrans = 3 };

__device__ __forceinline__ bf16_t to_bf16(float v) { return bf16_bits(v); }
__device__ __forceinline__ bf16_t to_bf16(bf16_t v) { return v; }

template <int BM, int BN, int BK, int WM, int WN, int STAGES, class In, int V, int kDefect>
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
  constexpr bool kTrans = kDefect != kNoTrans;
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
        if (p.y_bf16) {
          bf16_t* out = static_cast<bf16_t*>(p.y) + at;
          *out = bf16_bits(p.beta == 0.0f ? p.alpha * v : p.alpha * v + p.beta * bf16_to_float(*out));
        } else {
          float* out = static_cast<float*>(p.y) + at;
          *out = p.beta == 0.0f ? p.alpha * v : p.alpha * v + p.beta * *out;
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------------------
// The tiles (BK = 32) and their load paths.
using KernelFn = void (*)(Bf16ConvParams);

enum Path : int { kCpAsync16 = 0, kFloat4 = 1, kFloat1 = 2, kBf16x1 = 3, kNumPaths = 4 };
const char* const kPathNames[kNumPaths] = {"cp.async 16-byte", "float32 16-byte register", "float32 1-element register",
                                            "bfloat16 1-element register"};

struct Bf16Tile {
  int BM, BN, threads;
  KernelFn path[kNumPaths];
  KernelFn planted[kNumPaths][3];  // [path][defect - 1], emulator only; null where not planted (and under nvcc)
};

template <int BM, int BN, int WM, int WN, int kDefect>
constexpr KernelFn kernel_of(int path) {
  return path == kCpAsync16 ? conv_fwd_bf16<BM, BN, 32, WM, WN, 3, bf16_t, 8, kDefect>
         : path == kFloat4  ? conv_fwd_bf16<BM, BN, 32, WM, WN, 2, float, 4, kDefect>
         : path == kFloat1  ? conv_fwd_bf16<BM, BN, 32, WM, WN, 2, float, 1, kDefect>
                            : conv_fwd_bf16<BM, BN, 32, WM, WN, 2, bf16_t, 1, kDefect>;
}

template <int BM, int BN, int WM, int WN>
constexpr Bf16Tile make_tile() {
  return Bf16Tile{
      BM, BN, 32 * WM * WN,
      {kernel_of<BM, BN, WM, WN, kNoDefect>(kCpAsync16), kernel_of<BM, BN, WM, WN, kNoDefect>(kFloat4),
       kernel_of<BM, BN, WM, WN, kNoDefect>(kFloat1), kernel_of<BM, BN, WM, WN, kNoDefect>(kBf16x1)},
#if CONVNET_EMU
      {{kernel_of<BM, BN, WM, WN, kNoWait>(kCpAsync16), kernel_of<BM, BN, WM, WN, kNoBarrier>(kCpAsync16),
        kernel_of<BM, BN, WM, WN, kNoTrans>(kCpAsync16)},
       {nullptr, nullptr, nullptr},
       {nullptr, kernel_of<BM, BN, WM, WN, kNoBarrier>(kFloat1), kernel_of<BM, BN, WM, WN, kNoTrans>(kFloat1)},
       {nullptr, nullptr, nullptr}}
#else
      {}
#endif
  };
}

// Row 0: 64 filters x 128 pixel-images, 8 warps (2 x 4) of 32 x 32; row 1: 32 x 64, 2 warps (1 x 2) of 32 x 32,
// for few filters or too few big tiles to fill the GPU (the TF32 forward's tiles and rule).
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

}  // namespace

void conv_forward_bf16(const ConvGeometry& g, const void* x, const void* w, bool inputs_bf16, const float* bias,
                       void* y, bool y_bf16, float alpha, float beta, cudaStream_t stream) {
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
  KernelFn k = t.path[path];
  const int defect = g_defect.load();
  if (defect != 0) {
    k = t.planted[path][defect - 1];
    CONVNET_REQUIRE(k != nullptr, "planted defect " + std::to_string(defect) + " is not planted in the " +
                                      kPathNames[path] + " path");
  }
  launch(k, grid, dim3(t.threads), 0, stream, p);
}

std::string conv_bf16_plan(const ConvGeometry& g, bool inputs_bf16) {
  const Bf16Tile& t = kTiles[pick_tile(g)];
  const Bf16ConvParams p = make_params(g);
  const dim3 grid = grid_of(t, p, g.groups);
  return "bf16 tile " + std::to_string(t.BM) + "x" + std::to_string(t.BN) + "x32, " + std::to_string(t.threads) +
         " threads, " + kPathNames[pick_path(g, inputs_bf16, true)] + " path, grid " + std::to_string(grid.x) + "x" +
         std::to_string(grid.y) + "x" + std::to_string(grid.z);
}

int conv_bf16_tile_count() { return kNumTiles; }

void conv_bf16_set_overrides(int row, int planted_defect) {
  CONVNET_REQUIRE(row >= -1 && row < kNumTiles,
                  "tile row must be -1 (automatic) or in [0, " + std::to_string(kNumTiles) + ")");
  CONVNET_REQUIRE(planted_defect >= 0 && planted_defect <= 3, "planted_defect must be 0, 1, 2 or 3");
  CONVNET_REQUIRE(planted_defect == 0 || CONVNET_EMU, "planted defects exist on the emulator only");
  g_tile_override.store(row);
  g_defect.store(planted_defect);
}

}  // namespace convnet
