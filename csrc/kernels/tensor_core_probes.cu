// Probe kernels of the tensor-core and cp.async intrinsics (see tensor_core_probes.h). Compiled by nvcc too, so
// ptxas checks every wrapper's inline PTX for each target.
#include "cuda_compat.h"
#include "kernels/mma_fragments.cuh"
#include "kernels/tensor_core_probes.h"

namespace convnet::tensor_core_probes {
namespace {

template <bool kBf16>
__global__ void mma_registers_kernel(const std::uint32_t* a, const std::uint32_t* b, const float* c, float* d) {
  const int lane = threadIdx.x;
  const std::uint32_t ra[4] = {a[4 * lane], a[4 * lane + 1], a[4 * lane + 2], a[4 * lane + 3]};
  const std::uint32_t rb[2] = {b[2 * lane], b[2 * lane + 1]};
  const float rc[4] = {c[4 * lane], c[4 * lane + 1], c[4 * lane + 2], c[4 * lane + 3]};
  float rd[4];
  if constexpr (kBf16)
    mma_bf16_m16n8k16(rd, ra, rb, rc);
  else
    mma_tf32_m16n8k8(rd, ra, rb, rc);
  for (int i = 0; i < 4; ++i) d[4 * lane + i] = rd[i];
}

template <bool kBf16, bool kSwapA>
__global__ void mma_gemm_kernel(const float* a, const float* b, const float* c, float* d, int n, int k) {
  const int lane = threadIdx.x, m0 = blockIdx.y * 16, n0 = blockIdx.x * 8;
  float acc[4];
  for (int i = 0; i < 4; ++i) {
    const mma::RowCol rc = mma::accumulator(lane, i);
    acc[i] = c[(m0 + rc.row) * n + n0 + rc.col];
  }
  const auto a_at = [&](mma::RowCol rc, int k0) { return a[(m0 + rc.row) * k + k0 + rc.col]; };
  const auto b_at = [&](mma::RowCol rc, int k0) { return b[(k0 + rc.row) * n + n0 + rc.col]; };
  for (int k0 = 0; k0 < k; k0 += kBf16 ? 16 : 8) {
    std::uint32_t fa[4], fb[2];
    if constexpr (kBf16) {
      for (int r = 0; r < 4; ++r)
        fa[r] = bf16x2_bits(a_at(mma::bf16_a(lane, 2 * r), k0), a_at(mma::bf16_a(lane, 2 * r + 1), k0));
      for (int r = 0; r < 2; ++r)
        fb[r] = bf16x2_bits(b_at(mma::bf16_b(lane, 2 * r), k0), b_at(mma::bf16_b(lane, 2 * r + 1), k0));
    } else {
      for (int i = 0; i < 4; ++i) fa[i] = tf32_bits(a_at(mma::tf32_a(lane, i), k0));
      for (int i = 0; i < 2; ++i) fb[i] = tf32_bits(b_at(mma::tf32_b(lane, i), k0));
    }
    if constexpr (kSwapA) {
      const std::uint32_t t = fa[1];
      fa[1] = fa[2];
      fa[2] = t;
    }
    if constexpr (kBf16)
      mma_bf16_m16n8k16(acc, fa, fb, acc);
    else
      mma_tf32_m16n8k8(acc, fa, fb, acc);
  }
  for (int i = 0; i < 4; ++i) {
    const mma::RowCol rc = mma::accumulator(lane, i);
    d[(m0 + rc.row) * n + n0 + rc.col] = acc[i];
  }
}

constexpr int kLdmatrixElements = 2048;

template <int kCount, bool kTrans>
__global__ void ldmatrix_kernel(const std::uint16_t* matrix, int elements, const int* row_offsets, std::uint32_t* out) {
  SHARED(uint4, words, [kLdmatrixElements / 8]);  // uint4: 16-byte aligned rows
  std::uint16_t* s = reinterpret_cast<std::uint16_t*>(words);
  for (int i = threadIdx.x; i < elements; i += 32) s[i] = matrix[i];
  __syncthreads();
  std::uint32_t r[kCount];
  convnet::ldmatrix<kCount, kTrans>(r, s + row_offsets[threadIdx.x]);
  for (int i = 0; i < kCount; ++i) out[4 * threadIdx.x + i] = r[i];
}

__global__ void convert_kernel(int kind, const float* x, void* out, std::int64_t n) {
  const std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (kind == 0 && i < n) static_cast<std::uint32_t*>(out)[i] = tf32_bits(x[i]);
  if (kind == 1 && i < n) static_cast<std::uint16_t*>(out)[i] = bf16_bits(x[i]);
  if (kind == 2 && 2 * i < n) static_cast<std::uint32_t*>(out)[i] = bf16x2_bits(x[2 * i], x[2 * i + 1]);
}

// Stage t % 2 is refilled with tile t + 1 while tile t is read. Rule (cuda_compat.h): wait for the group, then a
// barrier, before others read; a barrier after the reads before the stage is refilled.
// Stage 0 is filled by one 16-byte .cg copy per thread, stage 1 by two 8-byte .ca copies: both forms run.
__device__ __forceinline__ void fill_stage(float4 (&stage)[2][kPipelineTile / 4], int s, const float* src) {
  const int t = threadIdx.x;
  if (s == 0) {
    cp_async_cg(&stage[0][t], src + 4 * t);
  } else {
    cp_async_ca<8>(&stage[1][t], src + 4 * t);
    cp_async_ca<8>(reinterpret_cast<float*>(&stage[1][t]) + 2, src + 4 * t + 2);
  }
}

template <int kVariant>
__global__ void pipeline_kernel(const float* x, float* y, int tiles) {
  SHARED(float4, stage, [2][kPipelineTile / 4]);
  const int t = threadIdx.x;
  fill_stage(stage, 0, x);
  cp_async_commit();
  for (int tile = 0; tile < tiles; ++tile) {
    if (tile + 1 < tiles) fill_stage(stage, (tile + 1) % 2, x + (tile + 1) * kPipelineTile);
    cp_async_commit();  // every thread, every iteration (an empty group at the end): the counts stay in step
    if (kVariant != 1) cp_async_wait<1>();  // tile's group complete; tile + 1 may still be in flight
    if (kVariant != 2) __syncthreads();     // every thread's part of the tile has landed
    const float* s = reinterpret_cast<const float*>(stage[tile % 2]);
    for (int j = 0; j < 4; ++j) y[tile * kPipelineTile + 4 * t + j] = s[kPipelineTile - 1 - (4 * t + j)];
    if (kVariant != 3) __syncthreads();  // everyone is done reading before the next iteration refills this stage
  }
}

}  // namespace

void mma_registers(bool bf16, const std::uint32_t* a, const std::uint32_t* b, const float* c, float* d,
                   cudaStream_t stream) {
  if (bf16)
    launch(mma_registers_kernel<true>, 1, 32, 0, stream, a, b, c, d);
  else
    launch(mma_registers_kernel<false>, 1, 32, 0, stream, a, b, c, d);
}

void mma_gemm(bool bf16, const float* a, const float* b, const float* c, float* d, int m, int n, int k,
              bool swap_a_registers, cudaStream_t stream) {
  CONVNET_REQUIRE(m > 0 && n > 0 && k > 0 && m % 16 == 0 && n % 8 == 0 && k % (bf16 ? 16 : 8) == 0,
                  "m, n, k must be positive multiples of 16, 8 and the mma's k");
  const dim3 grid(n / 8, m / 16);
  auto kernel = bf16 ? (swap_a_registers ? mma_gemm_kernel<true, true> : mma_gemm_kernel<true, false>)
                     : (swap_a_registers ? mma_gemm_kernel<false, true> : mma_gemm_kernel<false, false>);
  launch(kernel, grid, 32, 0, stream, a, b, c, d, n, k);
}

void ldmatrix(const std::uint16_t* matrix, int elements, const int* row_offsets, int count, bool trans,
              std::uint32_t* out, cudaStream_t stream) {
  CONVNET_REQUIRE(elements > 0 && elements <= kLdmatrixElements && elements % 8 == 0,
                  "elements must be a multiple of 8 in [8, 2048]");
  CONVNET_REQUIRE(count == 1 || count == 2 || count == 4, "count must be 1, 2 or 4");
  using Kernel = void (*)(const std::uint16_t*, int, const int*, std::uint32_t*);
  const Kernel kernels[2][3] = {{ldmatrix_kernel<1, false>, ldmatrix_kernel<2, false>, ldmatrix_kernel<4, false>},
                                {ldmatrix_kernel<1, true>, ldmatrix_kernel<2, true>, ldmatrix_kernel<4, true>}};
  launch(kernels[trans][count / 2], 1, 32, 0, stream, matrix, elements, row_offsets, out);
}

void convert(int kind, const float* x, void* out, std::int64_t n, cudaStream_t stream) {
  CONVNET_REQUIRE(kind >= 0 && kind <= 2, "kind must be 0 (tf32), 1 (bf16) or 2 (bf16x2)");
  CONVNET_REQUIRE(n > 0 && (kind != 2 || n % 2 == 0), "n must be positive (and even for bf16x2)");
  launch(convert_kernel, ceil_div(n, 256), 256, 0, stream, kind, x, out, n);
}

void pipeline_copy(const float* x, float* y, int tiles, int variant, cudaStream_t stream) {
  CONVNET_REQUIRE(tiles > 0, "tiles must be positive");
  using Kernel = void (*)(const float*, float*, int);
  const Kernel kernels[4] = {pipeline_kernel<0>, pipeline_kernel<1>, pipeline_kernel<2>, pipeline_kernel<3>};
  CONVNET_REQUIRE(variant >= 0 && variant < 4, "variant must be 0 (correct), 1, 2 or 3 (planted bugs)");
  launch(kernels[variant], 1, kPipelineTile / 4, 0, stream, x, y, tiles);
}

#if CONVNET_EMU
namespace {

__global__ void cp_async_groups_kernel(const float* x, float* out) {
  SHARED(float4, s, [32][4]);
  const int t = threadIdx.x;
  const float* src = x + 16 * t;
  float* row = reinterpret_cast<float*>(s[t]);
  cp_async_cg(&s[t][0], src);  // group 0
  cp_async_commit();
  cp_async_ca<8>(&s[t][1], src + 4);  // group 1: 8 + 4 bytes, the last 4 bytes of s[t][1] never written
  cp_async_ca<4>(reinterpret_cast<float*>(&s[t][1]) + 2, src + 8);
  cp_async_commit();
  cp_async_ca<16>(&s[t][2], src + 12, 4);  // group 2: 4 bytes read, 12 zero-filled
  cp_async_commit();
  cp_async_cg(&s[t][3], src);  // not committed: no wait_group completes it
  const auto snapshot = [&](int k) {
    for (int j = 0; j < 16; ++j) out[(k * 32 + t) * 16 + j] = row[j];
  };
  cp_async_wait<2>();
  snapshot(0);
  cp_async_wait<1>();
  snapshot(1);
  cp_async_wait<0>();
  snapshot(2);
  cp_async_commit();
  cp_async_wait<0>();
  snapshot(3);
}

__global__ void ldmatrix_misaligned_kernel() {
  SHARED(uint4, s, [64]);
  std::uint32_t r[1];
  convnet::ldmatrix<1>(r, reinterpret_cast<char*>(s) + 8);  // CASE ldmatrix_misaligned
}
__global__ void ldmatrix_global_kernel(const std::uint16_t* global) {
  std::uint32_t r[1];
  convnet::ldmatrix<1>(r, global);  // CASE ldmatrix_global
}
__global__ void ldmatrix_mixed_kernel() {
  SHARED(uint4, s, [64]);
  std::uint32_t r2[2], r4[4];
  if (threadIdx.x < 16)
    convnet::ldmatrix<2>(r2, &s[threadIdx.x]);  // CASE ldmatrix_mixed
  else
    convnet::ldmatrix<4>(r4, &s[threadIdx.x]);
}
__global__ void mma_partial_warp_kernel() {
  const std::uint32_t a[4] = {}, b[2] = {};
  float d[4] = {};
  mma_tf32_m16n8k8(d, a, b, d);  // CASE mma_partial_warp
}
__global__ void mma_divergent_kernel() {
  const std::uint32_t a[4] = {}, b[2] = {};
  float d[4] = {};
  if (threadIdx.x < 16) mma_tf32_m16n8k8(d, a, b, d);  // CASE mma_divergent
}
__global__ void cp_async_misaligned_kernel(const float* x) {
  SHARED(float4, s, [4]);
  cp_async_cg(reinterpret_cast<float*>(s) + 1, x);  // CASE cp_async_misaligned
}
__global__ void cp_async_global_destination_kernel(const float* x, float* y) {
  cp_async_ca<4>(y, x);  // CASE cp_async_global_destination
}
__global__ void cp_async_src_size_kernel(const float* x) {
  SHARED(float4, s, [4]);
  cp_async_cg(s, x, 20);  // CASE cp_async_src_size
}

}  // namespace

void cp_async_groups(const float* x, float* out) { launch(cp_async_groups_kernel, 1, 32, 0, nullptr, x, out); }

std::vector<std::string> error_case_names() {
  return {"ldmatrix_misaligned", "ldmatrix_global",     "ldmatrix_mixed",
          "mma_partial_warp",    "mma_divergent",       "cp_async_misaligned",
          "cp_async_global_destination", "cp_async_src_size"};
}

void run_error_case(const std::string& name) {
  alignas(16) static const float x[16] = {};
  alignas(16) static const std::uint16_t global[64] = {};
  alignas(16) float y[16];
  if (name == "ldmatrix_misaligned") launch(ldmatrix_misaligned_kernel, 1, 32, 0, nullptr);
  else if (name == "ldmatrix_global") launch(ldmatrix_global_kernel, 1, 32, 0, nullptr, global);
  else if (name == "ldmatrix_mixed") launch(ldmatrix_mixed_kernel, 1, 32, 0, nullptr);
  else if (name == "mma_partial_warp") launch(mma_partial_warp_kernel, 1, 48, 0, nullptr);
  else if (name == "mma_divergent") launch(mma_divergent_kernel, 1, 32, 0, nullptr);
  else if (name == "cp_async_misaligned") launch(cp_async_misaligned_kernel, 1, 1, 0, nullptr, x);
  else if (name == "cp_async_global_destination") launch(cp_async_global_destination_kernel, 1, 1, 0, nullptr, x, y);
  else if (name == "cp_async_src_size") launch(cp_async_src_size_kernel, 1, 1, 0, nullptr, x);
  else throw std::invalid_argument("unknown tensor-core error case: " + name);
}
#endif  // CONVNET_EMU

}  // namespace convnet::tensor_core_probes
