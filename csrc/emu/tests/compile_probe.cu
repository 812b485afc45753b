// Compile-only check of the kernel-side API surface (built with g++ -fsyntax-only by tests/emu/test_header.py):
// what a kernel author reasonably writes in CUDA C++ must compile unchanged against cuda_compat.h + cuemu.h.
#include "cuda_compat.h"
__constant__ float cvals[4];
__device__ int dcounter;
template <int N>
__global__ void __launch_bounds__(256, 2) probe(const float* __restrict__ x, float* __restrict__ y, long long n) {
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  float v = __ldg(x + i);
  bool b = isnan(v) || isinf(v) || !isfinite(v) || signbit(v);
  v = fmaxf(v, 0.f) + fminf(v, 1.f) + expf(v) + logf(1.f + fabsf(v)) + log1pf(fabsf(v)) + sqrtf(fabsf(v)) +
      rsqrtf(1.f + v * v) + powf(2.f, v) + floorf(v) + ceilf(v) + tanhf(v) + __expf(v) + __logf(2.f) +
      __powf(2.f, 1.f) + __fdividef(v, 3.f) + __frcp_rn(2.f) + __fsqrt_rn(4.f) + fmaf(v, v, v) + __fmaf_rn(v, v, v) +
      truncf(v) + roundf(v) + rintf(v) + exp2f(v) + log2f(2.f) + erff(v) + copysignf(1.f, v) + fmodf(v, 2.f) +
      sinf(v) + cosf(v) + __saturatef(v) + cvals[0] + min(1.5f, v) + max(v, 2.5f) + abs(-3) + fabs(-2.0);
  int a = min(3, int(i)), c = max(4u, 5u);
  unsigned u = __float_as_uint(v) ^ __popc(a) ^ __ffs(c) ^ __clz(a) ^ __brev(u) ^ __umulhi(u, u);
  (void)__umul64hi(1ull, 2ull); (void)__popcll(7ull);
  float2 f2 = make_float2(1.f, 2.f); float4 f4 = make_float4(1, 2, 3, 4); int4 i4 = make_int4(1, 2, 3, 4);
  uint4 u4 = make_uint4(1, 2, 3, 4); int2 i2 = make_int2(1, 2); double2 d2 = make_double2(1, 2);
  static_assert(alignof(float4) == 16 && sizeof(float4) == 16 && alignof(float2) == 8 && alignof(double2) == 16);
  static_assert(sizeof(dim3) == 12 && sizeof(uint3) == 12);
  SHARED(float4, tile, [N][N + 1]);
  tile[0][threadIdx.x % N] = f4;
  __syncthreads();
#pragma unroll 4
  for (int k = 0; k < N; ++k) v += tile[0][k].x;
  atomicAdd(&dcounter, 1);
  y[i] = v + b + u + f2.x + i4.x + u4.x + i2.y + d2.x;
  __threadfence();
}
void host(const float* x, float* y, long long n, cudaStream_t s) {
  float h[4] = {1, 2, 3, 4};
  CUDA_CHECK(cudaMemcpyToSymbol(cvals, h, sizeof h));
  convnet::launch(probe<8>, convnet::ceil_div(n, 256), 256, 0, s, x, y, n);
  CUDA_CHECK(cudaGetLastError());
  CUDA_CHECK(cudaStreamSynchronize(s));
  convnet::set_max_dynamic_shared(probe<8>, 64 * 1024);
}
