// Locally connected layers, CHWN (layouts in local.h). Each output position p has its own (K, F) filter matrix,
// K = C/groups * KH * KW, so the forward pass and the filter gradient are P small GEMMs batched in one launch
// (a grid axis over positions), never a loop of tiny launches; the input gradient gathers per input element.
// All kernels use 32-bit element indices (every tensor has fewer than 2^31 elements: local_check) and no atomics,
// so results are deterministic and identical on the emulator and every GPU.
#include "cuda_compat.h"
#include "kernels/geometry.h"
#include "kernels/local.h"

#include <cstdint>
#include <stdexcept>
#include <string>

namespace convnet {
namespace {

constexpr std::int64_t kMaxElems = (std::int64_t(1) << 31) - 1;
constexpr int kGridYZ = 65535;

// The input element of patch row k (channel c of the group, filter row ky, column kx) at output (oy, ox), image n;
// zero in the padding and past the last image.
__device__ __forceinline__ float patch(const float* __restrict__ x, const ConvGeometry& g, int c0, int k, int oy,
                                       int ox, int n) {
  const int kx = k % g.KW;
  const int ky = (k / g.KW) % g.KH;
  const int c = k / (g.KW * g.KH);
  const int iy = oy * g.stride_h - g.pad_h + ky;
  const int ix = ox * g.stride_w - g.pad_w + kx;
  if (n >= g.N || iy < 0 || iy >= g.H || ix < 0 || ix >= g.W) return 0.0f;
  return x[(((c0 + c) * g.H + iy) * g.W + ix) * g.N + n];
}

// ---------------------------------------------------------------------------------------------------------------
// Forward: y[f, p, n] = sum_k w[p, k, f] * patch_p[k, n] (+ bias).
// Grid: x = P (one position per block), y = groups * ceil(Fg / kFwdF) (a tile of kFwdF filters of one group),
// z = ceil(N / 32) (a tile of 32 images). Block (32, kFwdRows): threadIdx.x = the image in the tile (a warp reads
// 32 consecutive images: coalesced for any N), threadIdx.y = the thread's first filter; it computes filters
// threadIdx.y + kFwdRows * j, j < kFwdF / kFwdRows, of that image. K is walked in chunks of kFwdK: the chunk's
// patch (kFwdK x 32) and filter rows (kFwdK x kFwdF) are staged in shared memory. No divisibility rules: tails
// of K, F and N are masked (zeros in shared memory, no store).
constexpr int kFwdK = 8;
constexpr int kFwdF = 16;
constexpr int kFwdRows = 4;
constexpr int kFwdPer = kFwdF / kFwdRows;

__global__ void __launch_bounds__(32 * kFwdRows) local_fwd_kernel(const float* __restrict__ x,
                                                                  const float* __restrict__ w,
                                                                  const float* __restrict__ bias, int bias_mode,
                                                                  float* __restrict__ y, ConvGeometry g, float alpha,
                                                                  float beta) {
  SHARED(float, xs, [kFwdK][32]);
  SHARED(float, ws, [kFwdK][kFwdF]);
  const int P = g.OH * g.OW;
  const int p = blockIdx.x;
  const int oy = p / g.OW, ox = p % g.OW;
  const int Fg = g.F / g.groups, Cg = g.C / g.groups;
  const int tiles = (Fg + kFwdF - 1) / kFwdF;
  const int grp = blockIdx.y / tiles;
  const int f0 = grp * Fg + (blockIdx.y % tiles) * kFwdF;  // the tile's first filter (global index)
  const int f_end = (grp + 1) * Fg;
  const int n = blockIdx.z * 32 + threadIdx.x;
  const int K = Cg * g.KH * g.KW;
  const int tid = threadIdx.y * 32 + threadIdx.x;
  const float* wp = w + static_cast<std::int64_t>(p) * K * g.F;  // this position's (K, F) matrix
  float acc[kFwdPer];
  for (int j = 0; j < kFwdPer; ++j) acc[j] = 0.0f;
  for (int k0 = 0; k0 < K; k0 += kFwdK) {
    for (int e = tid; e < kFwdK * 32; e += 32 * kFwdRows) {
      const int kk = e / 32, nn = e % 32;
      xs[kk][nn] = k0 + kk < K ? patch(x, g, grp * Cg, k0 + kk, oy, ox, blockIdx.z * 32 + nn) : 0.0f;
    }
    for (int e = tid; e < kFwdK * kFwdF; e += 32 * kFwdRows) {
      const int kk = e / kFwdF, ff = e % kFwdF;
      ws[kk][ff] = (k0 + kk < K && f0 + ff < f_end) ? wp[(k0 + kk) * g.F + f0 + ff] : 0.0f;
    }
    __syncthreads();
    for (int kk = 0; kk < kFwdK; ++kk) {
      const float xv = xs[kk][threadIdx.x];
      for (int j = 0; j < kFwdPer; ++j) acc[j] += ws[kk][threadIdx.y + kFwdRows * j] * xv;
    }
    __syncthreads();
  }
  if (n >= g.N) return;
  for (int j = 0; j < kFwdPer; ++j) {
    const int f = f0 + threadIdx.y + kFwdRows * j;
    if (f >= f_end) continue;
    float v = acc[j];
    if (bias_mode == static_cast<int>(LocalBias::shared)) v += bias[f];
    else if (bias_mode == static_cast<int>(LocalBias::per_position)) v += bias[f * P + p];
    float* out = y + (f * P + p) * g.N + n;
    *out = beta == 0.0f ? alpha * v : alpha * v + beta * *out;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Input gradient: dx[c, iy, ix, n] = sum over the (ky, kx) whose output position p = (oy, ox) covers (iy, ix) of
// sum_{f in c's group} w[p, (c, ky, kx), f] * dy[f, p, n]. One thread per dx element: a 1-D grid of
// ceil(C*H*W*N / kBwdThreads) blocks, element index ((c*H + iy)*W + ix)*N + n, so a warp walks consecutive images
// (coalesced dy loads and stores; its w loads are one address when N >= 32). Each thread sums in a fixed order
// (ky, kx, f): deterministic, no atomics. No divisibility rules; no shared memory, no barriers.
constexpr int kBwdThreads = 256;

__global__ void __launch_bounds__(kBwdThreads) local_bwd_data_kernel(const float* __restrict__ dy,
                                                                     const float* __restrict__ w,
                                                                     float* __restrict__ dx, ConvGeometry g,
                                                                     float alpha, float beta) {
  const unsigned total = static_cast<unsigned>(g.C) * g.H * g.W * g.N;
  const unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= total) return;
  const int n = static_cast<int>(i % g.N);
  unsigned r = i / g.N;
  const int ix = static_cast<int>(r % g.W);
  r /= g.W;
  const int iy = static_cast<int>(r % g.H);
  const int cin = static_cast<int>(r / g.H);
  const int Cg = g.C / g.groups, Fg = g.F / g.groups;
  const int grp = cin / Cg, c = cin % Cg;
  const int P = g.OH * g.OW;
  const int K = Cg * g.KH * g.KW;
  float acc = 0.0f;
  for (int ky = 0; ky < g.KH; ++ky) {
    const int ty = iy + g.pad_h - ky;
    if (ty < 0 || ty % g.stride_h) continue;
    const int oy = ty / g.stride_h;
    if (oy >= g.OH) continue;
    for (int kx = 0; kx < g.KW; ++kx) {
      const int tx = ix + g.pad_w - kx;
      if (tx < 0 || tx % g.stride_w) continue;
      const int ox = tx / g.stride_w;
      if (ox >= g.OW) continue;
      const int p = oy * g.OW + ox;
      const float* wr = w + (static_cast<std::int64_t>(p) * K + (c * g.KH + ky) * g.KW + kx) * g.F + grp * Fg;
      const float* dyr = dy + (static_cast<std::int64_t>(grp * Fg) * P + p) * g.N + n;
      for (int f = 0; f < Fg; ++f) acc += wr[f] * dyr[static_cast<std::int64_t>(f) * P * g.N];
    }
  }
  dx[i] = beta == 0.0f ? alpha * acc : alpha * acc + beta * dx[i];
}

// ---------------------------------------------------------------------------------------------------------------
// Filter gradient: dw[p, k, f] = sum_n patch_p[k, n] * dy[f, p, n], one (K x N) x (N x Fg) GEMM per position.
// Grid: x = P, y = ceil(K / kWgT) (a tile of patch rows), z = groups * ceil(Fg / kWgT) (a tile of one group's
// filters). Block (kWgT, kWgT): threadIdx.x = the filter in the tile (consecutive threads store consecutive
// filters: coalesced dw), threadIdx.y = the patch row; each thread owns one dw element and walks all N images in
// chunks of 32, staged in shared memory (patch rows and dy rows, 32 images each, loaded image-fastest: coalesced).
// A fixed summation order and no split over images: deterministic. No divisibility rules (tails masked).
constexpr int kWgT = 16;

__global__ void __launch_bounds__(kWgT * kWgT) local_bwd_filter_kernel(const float* __restrict__ x,
                                                                       const float* __restrict__ dy,
                                                                       float* __restrict__ dw, ConvGeometry g,
                                                                       float alpha, float beta) {
  SHARED(float, xs, [kWgT][33]);
  SHARED(float, ds, [kWgT][33]);
  const int P = g.OH * g.OW;
  const int p = blockIdx.x;
  const int oy = p / g.OW, ox = p % g.OW;
  const int Fg = g.F / g.groups, Cg = g.C / g.groups;
  const int K = Cg * g.KH * g.KW;
  const int tiles = (Fg + kWgT - 1) / kWgT;
  const int grp = blockIdx.z / tiles;
  const int f0 = grp * Fg + (blockIdx.z % tiles) * kWgT;
  const int f_end = (grp + 1) * Fg;
  const int k0 = blockIdx.y * kWgT;
  const int tid = threadIdx.y * kWgT + threadIdx.x;
  float acc = 0.0f;
  for (int n0 = 0; n0 < g.N; n0 += 32) {
    for (int e = tid; e < kWgT * 32; e += kWgT * kWgT) {
      const int row = e / 32, nn = e % 32;
      const int n = n0 + nn;
      xs[row][nn] = k0 + row < K ? patch(x, g, grp * Cg, k0 + row, oy, ox, n) : 0.0f;
      ds[row][nn] = (f0 + row < f_end && n < g.N) ? dy[((f0 + row) * P + p) * g.N + n] : 0.0f;
    }
    __syncthreads();
    for (int nn = 0; nn < 32; ++nn) acc += xs[threadIdx.y][nn] * ds[threadIdx.x][nn];
    __syncthreads();
  }
  const int k = k0 + threadIdx.y, f = f0 + threadIdx.x;
  if (k >= K || f >= f_end) return;
  float* out = dw + (static_cast<std::int64_t>(p) * K + k) * g.F + f;
  *out = beta == 0.0f ? alpha * acc : alpha * acc + beta * *out;
}

void need(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument("local: " + what);
}

ConvGeometry checked(const ConvGeometry& in) {
  const ConvGeometry g = conv_geometry(in.C, in.H, in.W, in.N, in.F, in.KH, in.KW, in.stride_h, in.stride_w,
                                       in.pad_h, in.pad_w, in.groups);
  local_check(g);
  return g;
}

}  // namespace

void local_check(const ConvGeometry& g) {
  const std::int64_t P = std::int64_t(g.OH) * g.OW;
  const std::int64_t Cg = g.C / g.groups, Fg = g.F / g.groups;
  const std::int64_t K = Cg * g.KH * g.KW;
  need(P * K * g.F <= kMaxElems, "filters have 2^31 or more elements (unsupported)");
  need(P <= kMaxElems, "too many output positions");
  need(g.groups * ((Fg + kFwdF - 1) / kFwdF) <= kGridYZ && (g.N + 31) / 32 <= kGridYZ,
       "too many filter or image tiles for one launch (groups * ceil(F/groups / 16) and ceil(N / 32) must be "
       "<= 65535)");
  need((K + kWgT - 1) / kWgT <= kGridYZ && g.groups * ((Fg + kWgT - 1) / kWgT) <= kGridYZ,
       "filter rows C/groups*KH*KW must be < 16 * 65535");
}

void local_forward(const ConvGeometry& gin, const float* x, const float* w, const float* bias, LocalBias mode,
                   float* y, float alpha, float beta, cudaStream_t stream) {
  const ConvGeometry g = checked(gin);
  need(x && w && y, "local_forward: null pointer (needs x, w, y)");
  need(mode == LocalBias::none || bias, "local_forward: null bias with a bias mode");
  const int Fg = g.F / g.groups;
  const dim3 grid(static_cast<unsigned>(g.OH * g.OW), static_cast<unsigned>(g.groups * ((Fg + kFwdF - 1) / kFwdF)),
                  static_cast<unsigned>((g.N + 31) / 32));
  launch(local_fwd_kernel, grid, dim3(32, kFwdRows), 0, stream, x, w, bias, static_cast<int>(mode), y, g, alpha,
         beta);
}

void local_backward_data(const ConvGeometry& gin, const float* dy, const float* w, float* dx, float alpha, float beta,
                         cudaStream_t stream) {
  const ConvGeometry g = checked(gin);
  need(dy && w && dx, "local_backward_data: null pointer (needs dy, w, dx)");
  const std::int64_t total = std::int64_t(g.C) * g.H * g.W * g.N;
  launch(local_bwd_data_kernel, dim3(static_cast<unsigned>((total + kBwdThreads - 1) / kBwdThreads)),
         dim3(kBwdThreads), 0, stream, dy, w, dx, g, alpha, beta);
}

void local_backward_filter(const ConvGeometry& gin, const float* x, const float* dy, float* dw, float alpha,
                           float beta, cudaStream_t stream) {
  const ConvGeometry g = checked(gin);
  need(x && dy && dw, "local_backward_filter: null pointer (needs x, dy, dw)");
  const int Fg = g.F / g.groups;
  const int K = g.C / g.groups * g.KH * g.KW;
  const dim3 grid(static_cast<unsigned>(g.OH * g.OW), static_cast<unsigned>((K + kWgT - 1) / kWgT),
                  static_cast<unsigned>(g.groups * ((Fg + kWgT - 1) / kWgT)));
  launch(local_bwd_filter_kernel, grid, dim3(kWgT, kWgT), 0, stream, x, dy, dw, g, alpha, beta);
}

}  // namespace convnet
