// Convolution host side (CHWN; API and layouts in conv.h, kernels in conv_kernels.cuh): the dispatch table of
// implicit-GEMM tile configurations, the cost model that picks a row (and, for the filter gradient, the number of
// reduction chunks), the direct input-gradient kernel's selection rule, and the launchers, which re-check the
// geometry and the pointers before launching.
//
// A plan depends on the geometry and on pointer alignment only (never on the GPU it runs on): the emulator and
// every GPU run the same kernel with the same launch configuration and the same summation order.
#include "cuda_compat.h"
#include "kernels/chwn_vec.h"
#include "kernels/conv.h"
#include "kernels/conv_kernels.cuh"
#include "kernels/geometry.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>
#include <string>

namespace convnet {
namespace {

// ------------------------------------------------------------------------------------------------------------
// The dispatch table: tile configurations, each with its conv_igemm instances for the three passes.
constexpr int kBK = 8;
constexpr int kSMs = 132;  // an H100 SXM (fixed, not queried: plans are device-independent)

using KernelFn = void (*)(ConvParams);

// A row's kernels: one per pass (indexed by ConvPass), then the forward with the fused ReLU epilogue.
constexpr int kForwardRelu = kNumConvPasses, kNumKernels = kNumConvPasses + 1;

struct TileCfg {
  int BM, BN, TM, TN;
  float efficiency;   // relative FMA throughput per tile (bigger register tiles reuse shared loads more)
  int blocks_per_sm;  // resident blocks per SM on sm_90 (registers from ptxas -v; shared memory is not the limit)
  KernelFn vec[kNumKernels];     // the V = 4 (16-byte) path: forward, backward_data, backward_filter, forward+ReLU
  KernelFn scalar[kNumKernels];  // the V = 1 path (null: none)
};

// The kernel of `pass` (with the ReLU epilogue when `relu`: forward only), or null when the row lacks that path.
KernelFn kernel_for(const TileCfg& t, ConvPass pass, bool vec, bool relu = false) {
  return (vec ? t.vec : t.scalar)[relu ? kForwardRelu : static_cast<int>(pass)];
}
bool has_path(const TileCfg& t, ConvPass pass, bool vec) { return kernel_for(t, pass, vec) != nullptr; }

template <class Op, int BM, int BN, int TM, int TN, int V, bool kOn, bool kRelu = false>
constexpr KernelFn kernel_or_null() {
  if constexpr (kOn) return conv_igemm<Op, BM, BN, kBK, TM, TN, V, kRelu>;
  else return nullptr;  // not instantiated at all
}

template <int BM, int BN, int TM, int TN, bool kWithScalar = true>
constexpr TileCfg make_cfg(float eff, int blocks_per_sm) {
  return TileCfg{BM, BN, TM, TN, eff, blocks_per_sm,
                 {conv_igemm<FwdOp, BM, BN, kBK, TM, TN, 4>, conv_igemm<DgradOp, BM, BN, kBK, TM, TN, 4>,
                  conv_igemm<WgradOp, BM, BN, kBK, TM, TN, 4>, conv_igemm<FwdOp, BM, BN, kBK, TM, TN, 4, true>},
                 {kernel_or_null<FwdOp, BM, BN, TM, TN, 1, kWithScalar>(),
                  kernel_or_null<DgradOp, BM, BN, TM, TN, 1, kWithScalar>(),
                  kernel_or_null<WgradOp, BM, BN, TM, TN, 1, kWithScalar>(),
                  kernel_or_null<FwdOp, BM, BN, TM, TN, 1, kWithScalar, true>()}};
}

// The whole dispatch table (BK = 8 everywhere). "efficiency" models shared-memory bandwidth, the limit of FP32
// FMA tiles on sm_80/90: per k step a thread issues TM*TN FFMA and (TM+TN)/4 LDS.128, each LDS.128 taking a
// warp 4 shared-memory cycles; an SM sub-partition issues one warp FFMA per cycle, 4 sub-partitions share the
// shared memory, so efficiency = min(1, (TM*TN/4) / ((TM+TN)/4 * 4)) (8x8: 1, 12x8: 1, 4x8: 0.67, 4x4: 0.5),
// lowered to 0.9 for 12x8 and 8x12 tiles (about 200 registers: fewer resident warps to hide latency). To be calibrated
// on a GPU with conv_set_tile_override + benchmarks/conv_bench.py.
// blocks/SM: 65536 registers / (threads x registers per thread of the 16-byte path, from ptxas -v for sm_90).
//        BM   BN  TM  TN               threads  regs     blocks/SM  use
const TileCfg kTiles[] = {
    make_cfg<128, 128, 8, 8>(1.00f, 2),        // 256  <=128     2  large GEMMs: AlexNet at batch 128
    make_cfg<192, 128, 12, 8>(0.90f, 1),       // 256  183-199   1  M = 192 (conv4 forward, conv4/5 input gradient)
    make_cfg<96, 128, 12, 8>(0.90f, 2),        // 128  193-213   2  M = 96 (conv1 forward)
    make_cfg<48, 256, 12, 8, false>(0.90f, 2), // 128  213-223   2  M = 48 (conv2 input gradient, 48 channels/tower)
    make_cfg<64, 128, 4, 8>(0.67f, 2),         // 256  95-109    2  M <= 64
    make_cfg<64, 64, 4, 4>(0.50f, 2),          // 256  79-95     2  small problems: tiny batches, few filters
    make_cfg<4, 512, 4, 4, false>(0.50f, 2),   // 128  161-186   2  skinny: M <= 4 (input gradient of 1-3 channels)
    make_cfg<128, 96, 8, 12, false>(0.90f, 2), // 128  201-215   2  N = 96: filter gradient of 96 (conv1) or 192 filters
    // (rows with `false`: 16-byte path only; their scalar paths would need 16-32 load slots per thread and spill)
    // (new rows go last: pick_tile keeps the first of equal costs, so appending never changes an existing plan's tie)
};
constexpr int kNumTiles = sizeof(kTiles) / sizeof(kTiles[0]);

std::atomic<int> g_tile_override{-1};  // tests and tuning: force one row of the table (-1: automatic)
std::atomic<int> g_split_override{0};  // tests and tuning: force the wgrad split count (0: automatic)

// The cost model behind the choice (in units of one SM's FMA time): blocks run in waves of kSMs x blocks_per_sm;
// a wave takes as long as blocks_per_sm tiles of BM x BN x k_len FMAs at the row's efficiency. This counts the
// padding waste of ragged tiles and the idle SMs of the last wave (wave quantisation), which dominate for the
// 13x13 AlexNet layers. Calibrate `efficiency` on a GPU (conv_bench.py --tile).

double tile_cost(const TileCfg& t, std::int64_t M, std::int64_t Nc, std::int64_t slices, std::int64_t k_len) {
  const std::int64_t blocks = ((M + t.BM - 1) / t.BM) * ((Nc + t.BN - 1) / t.BN) * slices;
  const std::int64_t slots = std::int64_t(kSMs) * t.blocks_per_sm;
  const std::int64_t waves = (blocks + slots - 1) / slots;
  return double(waves) * t.blocks_per_sm * t.BM * t.BN * double(k_len) / t.efficiency;
}

int forced_tile(ConvPass pass, bool vec) {
  const int forced = g_tile_override.load();
  return (forced >= 0 && forced < kNumTiles && has_path(kTiles[forced], pass, vec)) ? forced : -1;
}

// Forward and dgrad: the row of least modelled time (k_len is the same for every row).
int pick_tile(ConvPass pass, bool vec, std::int64_t M, std::int64_t Nc, std::int64_t slices) {
  if (forced_tile(pass, vec) >= 0) return forced_tile(pass, vec);
  int best = 0;
  double best_cost = std::numeric_limits<double>::infinity();
  for (int i = 0; i < kNumTiles; ++i) {
    if (!has_path(kTiles[i], pass, vec)) continue;
    const double cost = tile_cost(kTiles[i], M, Nc, slices, 1);
    if (cost < best_cost) {
      best_cost = cost;
      best = i;
    }
  }
  return best;
}

ConvParams make_params(const ConvGeometry& g) {
  ConvParams p{};
  p.C = g.C; p.H = g.H; p.W = g.W; p.N = g.N; p.F = g.F; p.KH = g.KH; p.KW = g.KW;
  p.sh = g.stride_h; p.sw = g.stride_w; p.ph = g.pad_h; p.pw = g.pad_w; p.G = g.groups;
  p.OH = g.OH; p.OW = g.OW;
  p.Cg = g.C / g.groups;
  p.Fg = g.F / g.groups;
  p.J = g.OH * g.OW * g.N;
  p.HWN = g.H * g.W * g.N;
  p.splits = 1;
  p.chunk = 0;
  return p;
}

// What one call launches: the pass, the table row, the load path, the GEMM extents and the z slices.
struct Plan {
  ConvPass pass;
  int tile;
  bool vec;
  std::int64_t M, Nc, slices;
  int splits, chunk;  // wgrad only
};

Plan make_plan(ConvPass pass, const ConvGeometry& g, bool aligned) {
  const std::int64_t Cg = g.C / g.groups, Fg = g.F / g.groups;
  const std::int64_t J = std::int64_t(g.OH) * g.OW * g.N;
  Plan pl{pass, 0, aligned && g.N % 4 == 0 && Fg % 4 == 0, 0, 0, g.groups, 1, 0};
  if (pass == ConvPass::forward) {
    pl.M = Fg;
    pl.Nc = J;
  } else if (pass == ConvPass::backward_data) {
    // One z slice per (group, stride phase); columns sized for the largest phase class (the one with iy = 0).
    pl.M = Cg;
    pl.Nc = std::int64_t((g.H + g.stride_h - 1) / g.stride_h) * ((g.W + g.stride_w - 1) / g.stride_w) * g.N;
    pl.slices = std::int64_t(g.groups) * g.stride_h * g.stride_w;
  } else {
    pl.M = Cg * g.KH * g.KW;
    pl.Nc = Fg;
  }
  if (pass != ConvPass::backward_filter) {
    pl.tile = pick_tile(pass, pl.vec, pl.M, pl.Nc, pl.slices);
    return pl;
  }
  // wgrad: pick the row and the number of reduction chunks together. Each chunk (a multiple of BK, at least
  // kMinChunk long) writes a partial dw that conv_wgrad_reduce sums: that costs a launch and 2 x splits x |dw|
  // floats of memory traffic, converted to the model's units (about 0.07 SM-FMA-time per byte at 3 TB/s).
  constexpr std::int64_t kMinChunk = 256, kMaxSplits = 256;
  const std::int64_t max_splits = std::min<std::int64_t>(std::max<std::int64_t>(1, J / kMinChunk), kMaxSplits);
  const int forced = forced_tile(pass, pl.vec);
  double best_cost = std::numeric_limits<double>::infinity();
  for (int i = 0; i < kNumTiles; ++i) {
    if (!has_path(kTiles[i], pass, pl.vec) || (forced >= 0 && i != forced)) continue;
    const std::int64_t forced_splits = std::min<std::int64_t>(g_split_override.load(), max_splits);
    for (std::int64_t s = forced_splits > 0 ? forced_splits : 1; s <= (forced_splits > 0 ? forced_splits : max_splits);
         ++s) {
      const std::int64_t chunk = ((J + s - 1) / s + kBK - 1) / kBK * kBK;
      const std::int64_t splits = (J + chunk - 1) / chunk;
      if (splits != s && forced_splits <= 0) continue;  // same as a smaller s
      double cost = tile_cost(kTiles[i], pl.M, pl.Nc, std::int64_t(g.groups) * splits, chunk);
      if (splits > 1) cost += 650000.0 + 0.6 * double(splits) * double(pl.M) * double(g.F);
      if (cost < best_cost) {
        best_cost = cost;
        pl.tile = i;
        pl.splits = int(splits);
        pl.chunk = int(chunk);
      }
    }
  }
  pl.slices = std::int64_t(g.groups) * pl.splits;
  return pl;
}

void launch_igemm(const Plan& pl, const ConvParams& p, cudaStream_t stream, bool relu = false) {
  const TileCfg& t = kTiles[pl.tile];
  const std::int64_t gx = (pl.Nc + t.BN - 1) / t.BN, gy = (pl.M + t.BM - 1) / t.BM;
  CONVNET_REQUIRE(gx <= 0x7fffffff && gy <= 65535 && pl.slices <= 65535, "grid too large for this geometry");
  if (gx == 0 || gy == 0 || pl.slices == 0) return;
  const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy), static_cast<unsigned>(pl.slices));
  const dim3 block(static_cast<unsigned>((t.BM / t.TM) * (t.BN / t.TN)));
  launch(kernel_for(t, pl.pass, pl.vec, relu), grid, block, 0, stream, p);
}

// The direct input-gradient kernel serves few channels per group when its dy window fits (AlexNet conv1: Cg = 3,
// 11x11 stride 4 -> 3x3 taps per phase, a 6x10 window). A forced table row (tests, tuning) selects the GEMM.
bool use_dgrad_direct(const ConvGeometry& g) {
  const int Cg = g.C / g.groups;
  const int Ty = (g.KH + g.stride_h - 1) / g.stride_h, Tx = (g.KW + g.stride_w - 1) / g.stride_w;
  return g_tile_override.load() < 0 && Cg <= 4 && (kTA + Ty - 1) * (kTB + Tx - 1) <= kWin &&
         Ty * Tx <= kTaps;
}

dim3 dgrad_direct_grid(const ConvGeometry& g) {
  const std::int64_t hc = (g.H + g.stride_h - 1) / g.stride_h, wc = (g.W + g.stride_w - 1) / g.stride_w;
  const std::int64_t tiles = ((hc + kTA - 1) / kTA) * ((wc + kTB - 1) / kTB);
  CONVNET_REQUIRE(tiles <= 0x7fffffff, "grid too large for this geometry");
  return dim3(static_cast<unsigned>(tiles), static_cast<unsigned>((g.N + 31) / 32),
              static_cast<unsigned>(std::int64_t(g.groups) * g.stride_h * g.stride_w));
}

constexpr std::int64_t kMaxElems = std::numeric_limits<int>::max();

// The bias gradient's launch: F x chunks blocks of 256 threads. One block per filter leaves most of a GPU idle for
// few filters (96 blocks on 132 SMs for conv1), so each filter's row is cut into chunks until the grid has about
// kBiasTargetBlocks blocks (4 per SM: 32 warps per SM keep enough loads in flight to stream dy), as long as a chunk
// stays >= kBiasMinChunk floats (8 per thread: fewer would cost more in block overhead than they save).
// Chunks are multiples of 4 floats (16-byte loads stay aligned). Depends on (F, L) only: device-independent.
constexpr std::int64_t kBiasThreads = 256, kBiasTargetBlocks = 4 * kSMs, kBiasMinChunk = 8 * kBiasThreads;

struct BiasPlan {
  std::int64_t chunks, chunk;
};

BiasPlan bias_plan(int F, std::int64_t L) {
  const std::int64_t want = (kBiasTargetBlocks + F - 1) / F;
  const std::int64_t chunks = std::max<std::int64_t>(1, std::min(want, L / kBiasMinChunk));
  const std::int64_t chunk = ((L + chunks - 1) / chunks + 3) / 4 * 4;
  return {(L + chunk - 1) / chunk, chunk};  // (rounding the chunk up can only remove a chunk, never leave one empty)
}

const char* pass_name(ConvPass pass) {  // null: not a ConvPass
  switch (pass) {
    case ConvPass::forward: return "forward";
    case ConvPass::backward_data: return "backward_data";
    case ConvPass::backward_filter: return "backward_filter";
  }
  return nullptr;
}

}  // namespace

// ------------------------------------------------------------------------------------------------------------
ConvGeometry conv_geometry(int C, int H, int W, int N, int F, int KH, int KW, int stride_h, int stride_w, int pad_h,
                           int pad_w, int groups) {
  CONVNET_REQUIRE(C >= 1 && H >= 1 && W >= 1 && N >= 1, "input sizes C, H, W, N must be >= 1");
  CONVNET_REQUIRE(F >= 1 && KH >= 1 && KW >= 1, "filter sizes F, KH, KW must be >= 1");
  CONVNET_REQUIRE(stride_h >= 1 && stride_w >= 1, "stride must be >= 1");
  CONVNET_REQUIRE(pad_h >= 0 && pad_w >= 0, "padding must be >= 0");
  CONVNET_REQUIRE(groups >= 1 && C % groups == 0 && F % groups == 0,
                  "groups (" + std::to_string(groups) + ") must divide channels (" + std::to_string(C) +
                      ") and filters (" + std::to_string(F) + ")");
  CONVNET_REQUIRE(H + 2 * std::int64_t(pad_h) >= KH && W + 2 * std::int64_t(pad_w) >= KW,
                  "filter larger than the padded input");
  ConvGeometry g{C, H, W, N, F, KH, KW, stride_h, stride_w, pad_h, pad_w, groups, 0, 0};
  g.OH = output_size(H, KH, stride_h, pad_h);
  g.OW = output_size(W, KW, stride_w, pad_w);
  CONVNET_REQUIRE(std::int64_t(C) * H * W * N <= kMaxElems, "input has 2^31 or more elements (unsupported)");
  CONVNET_REQUIRE(std::int64_t(F) * g.OH * g.OW * N <= kMaxElems, "output has 2^31 or more elements (unsupported)");
  CONVNET_REQUIRE(std::int64_t(C / groups) * KH * KW * F <= kMaxElems, "filters have 2^31 or more elements");
  return g;
}

int conv_tile_count() { return kNumTiles; }

void conv_set_tile_override(int row, int wgrad_splits) {
  CONVNET_REQUIRE(row >= -1 && row < kNumTiles, "tile row must be -1 (automatic) or in [0, " +
                                                    std::to_string(kNumTiles) + ")");
  CONVNET_REQUIRE(wgrad_splits >= 0, "wgrad_splits must be >= 0 (0: automatic)");
  g_tile_override.store(row);
  g_split_override.store(wgrad_splits);
}

std::string conv_plan(ConvPass pass, const ConvGeometry& g) {
  CONVNET_REQUIRE(pass_name(pass) != nullptr, "unknown ConvPass " + std::to_string(static_cast<int>(pass)));
  if (pass == ConvPass::backward_data && use_dgrad_direct(g)) {
    const dim3 grid = dgrad_direct_grid(g);
    return "backward_data: direct kernel (4x8 class pixels x 32 images, all taps from a shared-memory dy window), "
           "grid " + std::to_string(grid.x) + "x" + std::to_string(grid.y) + "x" + std::to_string(grid.z);
  }
  const Plan pl = make_plan(pass, g, true);
  const TileCfg& t = kTiles[pl.tile];
  std::string s = std::string(pass_name(pass)) + ": tile " + std::to_string(t.BM) + "x" + std::to_string(t.BN) +
                  "x" + std::to_string(kBK) + " (" + std::to_string(t.TM) + "x" + std::to_string(t.TN) +
                  " per thread, " + std::to_string((t.BM / t.TM) * (t.BN / t.TN)) + " threads), " +
                  (pl.vec ? "16-byte" : "scalar") + " path, grid " + std::to_string((pl.Nc + t.BN - 1) / t.BN) + "x" +
                  std::to_string((pl.M + t.BM - 1) / t.BM) + "x" + std::to_string(pl.slices);
  if (pass == ConvPass::backward_filter)
    s += ", " + std::to_string(pl.splits) + " split(s) of " + std::to_string(pl.chunk);
  return s;
}

void conv_forward(const ConvGeometry& g, const float* x, const float* w, const float* bias, float* y, float alpha,
                  float beta, bool relu, cudaStream_t stream) {
  CONVNET_REQUIRE(x && w && y, "null pointer");
  ConvParams p = make_params(g);
  p.A = w; p.B = x; p.bias = bias; p.out = y; p.alpha = alpha; p.beta = beta;
  // The same plan with or without the ReLU: the fused output is the unfused one's, clamped.
  launch_igemm(make_plan(ConvPass::forward, g, aligned16(x) && aligned16(w) && aligned16(y)), p, stream, relu);
}

void conv_backward_data(const ConvGeometry& g, const float* dy, const float* w, float* dx, float alpha, float beta,
                        cudaStream_t stream) {
  CONVNET_REQUIRE(dy && w && dx, "null pointer");
  ConvParams p = make_params(g);
  p.A = w; p.B = dy; p.out = dx; p.alpha = alpha; p.beta = beta;
  if (use_dgrad_direct(g)) {
    const dim3 grid = dgrad_direct_grid(g);
    CONVNET_REQUIRE(grid.y <= 65535 && grid.z <= 65535, "grid too large for this geometry");
    if (p.Cg == 1) launch(conv_dgrad_direct<1>, grid, dim3(256), 0, stream, p);
    else launch(conv_dgrad_direct<4>, grid, dim3(256), 0, stream, p);
    return;
  }
  launch_igemm(make_plan(ConvPass::backward_data, g, aligned16(dy) && aligned16(w) && aligned16(dx)), p, stream);
}

std::int64_t conv_backward_filter_workspace(const ConvGeometry& g) {
  const Plan pl = make_plan(ConvPass::backward_filter, g, true);
  if (pl.splits <= 1) return 0;
  return std::int64_t(pl.splits) * (g.C / g.groups) * g.KH * g.KW * g.F;
}

void conv_backward_filter(const ConvGeometry& g, const float* x, const float* dy, float* dw, float* workspace,
                          std::int64_t workspace_floats, float alpha, float beta, cudaStream_t stream) {
  CONVNET_REQUIRE(x && dy && dw, "null pointer");
  ConvParams p = make_params(g);
  const std::int64_t total = std::int64_t(p.Cg) * g.KH * g.KW * g.F;
  Plan pl = make_plan(ConvPass::backward_filter, g, true);
  const bool split = pl.splits > 1;
  if (split) {
    CONVNET_REQUIRE(workspace != nullptr && workspace_floats >= pl.splits * total,
                    "workspace too small: need " + std::to_string(pl.splits * total) + " floats");
    CONVNET_REQUIRE(pl.splits * total <= kMaxElems, "workspace has 2^31 or more elements (unsupported)");
  }
  float* out = split ? workspace : dw;
  if (pl.vec && !(aligned16(x) && aligned16(dy) && aligned16(out))) {
    pl.vec = false;  // same splits (they depend on the geometry only), a row that has a scalar path
    pl.tile = pick_tile(ConvPass::backward_filter, false, pl.M, pl.Nc, pl.slices);
  }
  p.A = x; p.B = dy; p.out = out; p.splits = pl.splits; p.chunk = pl.chunk;
  p.alpha = split ? 1.f : alpha;
  p.beta = split ? 0.f : beta;
  launch_igemm(pl, p, stream);
  if (split) {
    const bool rvec = total % 4 == 0 && aligned16(workspace) && aligned16(dw);
    const std::int64_t nvec = rvec ? total / 4 : total;
    const unsigned blocks = static_cast<unsigned>(std::min<std::int64_t>((nvec + 255) / 256, 4 * kSMs));
    if (rvec)
      launch(conv_wgrad_reduce<4>, dim3(blocks), dim3(256), 0, stream, workspace, dw, int(total), pl.splits, alpha,
             beta);
    else
      launch(conv_wgrad_reduce<1>, dim3(blocks), dim3(256), 0, stream, workspace, dw, int(total), pl.splits, alpha,
             beta);
  }
}

std::int64_t conv_backward_bias_workspace(int F, std::int64_t per_filter) {
  CONVNET_REQUIRE(F >= 1 && per_filter >= 1, "F and per_filter must be >= 1");
  const BiasPlan pl = bias_plan(F, per_filter);
  return pl.chunks > 1 ? pl.chunks * F : 0;
}

std::string conv_bias_plan(int F, std::int64_t per_filter) {
  CONVNET_REQUIRE(F >= 1 && per_filter >= 1, "F and per_filter must be >= 1");
  const BiasPlan pl = bias_plan(F, per_filter);
  std::string s = std::string("backward_bias: ") + (per_filter % 4 == 0 ? "16-byte" : "scalar") + " path, grid " +
                  std::to_string(F) + "x" + std::to_string(pl.chunks) + " (" + std::to_string(F * pl.chunks) +
                  " blocks of " + std::to_string(kBiasThreads) + " threads), " + std::to_string(pl.chunks) +
                  " chunk(s) of " + std::to_string(pl.chunk);
  if (pl.chunks > 1) s += ", then a fixed-order reduction of the chunks";
  return s;
}

void conv_backward_bias(const float* dy, float* db, float* workspace, std::int64_t workspace_floats, int F,
                        std::int64_t per_filter, float alpha, float beta, cudaStream_t stream) {
  CONVNET_REQUIRE(dy && db, "null pointer");
  CONVNET_REQUIRE(F >= 1 && per_filter >= 1, "F and per_filter must be >= 1");
  const BiasPlan pl = bias_plan(F, per_filter);
  CONVNET_REQUIRE(pl.chunks <= 65535, "grid too large for this geometry");
  if (pl.chunks > 1) {
    CONVNET_REQUIRE(workspace != nullptr && workspace_floats >= pl.chunks * F,
                    "workspace too small: need " + std::to_string(pl.chunks * F) + " floats");
  }
  const dim3 grid(static_cast<unsigned>(F), static_cast<unsigned>(pl.chunks));
  if (per_filter % 4 == 0 && aligned16(dy))
    launch(conv_bias_grad<4>, grid, dim3(kBiasThreads), 0, stream, dy, db, workspace, per_filter, pl.chunk, alpha,
           beta);
  else
    launch(conv_bias_grad<1>, grid, dim3(kBiasThreads), 0, stream, dy, db, workspace, per_filter, pl.chunk, alpha,
           beta);
  if (pl.chunks > 1) {
    const unsigned blocks = static_cast<unsigned>(std::min<std::int64_t>((F + 255) / 256, 4 * kSMs));
    launch(conv_bias_reduce, dim3(blocks), dim3(256), 0, stream, workspace, db, F, int(pl.chunks), alpha, beta);
  }
}

}  // namespace convnet
