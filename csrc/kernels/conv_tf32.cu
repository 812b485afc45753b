// TF32 tensor-core convolution forward (API in conv_tf32.h): an implicit GEMM on mma.sync.m16n8k8 with a
// multi-stage cp.async pipeline.
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
// Epilogue: accumulator (row gid [+8], cols 2*tig, 2*tig+1) of each mma tile, y = alpha*(acc + bias) + beta*y.
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
#include "kernels/conv_tf32.h"
#include "kernels/mma_fragments.cuh"

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

template <int BM, int BN, int BK, int WM, int WN, int STAGES, int V, int kDefect>
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
        *out = p.beta == 0.0f ? p.alpha * v : p.alpha * v + p.beta * *out;
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------------------
// The tiles (BK = 16, 3 stages). Registers and shared memory per tile: docs/architecture.md ("Tensor-core
// convolution"), from tools/kernel_resources.py.
using KernelFn = void (*)(Tf32ConvParams);

struct Tf32Tile {
  int BM, BN, threads;
  KernelFn vec, scalar;                // the V = 4 and V = 1 paths
  KernelFn planted[2][3];              // [vec][defect - 1], emulator only (null under nvcc)
};

template <int BM, int BN, int WM, int WN>
constexpr Tf32Tile make_tile() {
  return Tf32Tile{BM, BN, 32 * WM * WN, conv_fwd_tf32<BM, BN, 16, WM, WN, 3, 4, kNoDefect>,
                  conv_fwd_tf32<BM, BN, 16, WM, WN, 3, 1, kNoDefect>,
#if CONVNET_EMU
                  {{conv_fwd_tf32<BM, BN, 16, WM, WN, 3, 1, kNoWait>,
                    conv_fwd_tf32<BM, BN, 16, WM, WN, 3, 1, kNoBarrier>,
                    conv_fwd_tf32<BM, BN, 16, WM, WN, 3, 1, kSwappedA>},
                   {conv_fwd_tf32<BM, BN, 16, WM, WN, 3, 4, kNoWait>,
                    conv_fwd_tf32<BM, BN, 16, WM, WN, 3, 4, kNoBarrier>,
                    conv_fwd_tf32<BM, BN, 16, WM, WN, 3, 4, kSwappedA>}}
#else
                  {{nullptr, nullptr, nullptr}, {nullptr, nullptr, nullptr}}
#endif
  };
}

// Row 0: 64 filters x 128 pixel-images, 8 warps (2 x 4) of 32 x 32; row 1: 32 x 64, 2 warps (1 x 2) of 32 x 32,
// for few filters or too few big tiles to fill the GPU.
const Tf32Tile kTiles[] = {make_tile<64, 128, 2, 4>(), make_tile<32, 64, 1, 2>()};
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

}  // namespace

void conv_forward_tf32(const ConvGeometry& g, const float* x, const float* w, const float* bias, float* y, float alpha,
                       float beta, cudaStream_t stream) {
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
  KernelFn k = vec ? t.vec : t.scalar;
  const int defect = g_defect.load();
  if (defect != 0) k = t.planted[vec ? 1 : 0][defect - 1];
  launch(k, grid, dim3(t.threads), 0, stream, p);
}

std::string conv_tf32_plan(const ConvGeometry& g) {
  const Tf32Tile& t = kTiles[pick_tile(g)];
  const Tf32ConvParams p = make_params(g);
  const dim3 grid = grid_of(t, p, g.groups);
  const bool vec = g.N % 4 == 0 && p.Fg % 4 == 0;
  return "tf32 tile " + std::to_string(t.BM) + "x" + std::to_string(t.BN) + "x16, " + std::to_string(t.threads) +
         " threads, " + (vec ? "16-byte" : "4-byte") + " path, grid " + std::to_string(grid.x) + "x" +
         std::to_string(grid.y) + "x" + std::to_string(grid.z);
}

int conv_tf32_tile_count() { return kNumTiles; }

void conv_tf32_set_overrides(int row, int planted_defect) {
  CONVNET_REQUIRE(row >= -1 && row < kNumTiles,
                  "tile row must be -1 (automatic) or in [0, " + std::to_string(kNumTiles) + ")");
  CONVNET_REQUIRE(planted_defect >= 0 && planted_defect <= 3, "planted_defect must be 0, 1, 2 or 3");
  CONVNET_REQUIRE(planted_defect == 0 || CONVNET_EMU, "planted defects exist on the emulator only");
  g_tile_override.store(row);
  g_defect.store(planted_defect);
}

}  // namespace convnet
