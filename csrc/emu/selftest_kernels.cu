// Self-test kernels of the CPU emulator: compiled only into convnet._emu (and the sanitizer driver), never by
// nvcc. Correct kernels check results under every schedule; broken ones check that the emulator reports them.
#include "cuda_compat.h"
#include "emu/selftest_kernels.h"

#include <climits>
#include <stdexcept>

namespace cuemu_selftest {
void run_glibc_assert();  // at the end of this file, after <assert.h> is re-included

namespace {

// ---- correct kernels ------------------------------------------------------------------------------------
template <bool kBarrier>
__global__ void transpose_kernel(const float* in, float* out, int rows, int cols) {
  SHARED(float, tile, [32][33]);
  const int x = blockIdx.x * 32 + threadIdx.x;
  for (int dy = threadIdx.y; dy < 32; dy += 8) {
    const int y = blockIdx.y * 32 + dy;
    if (x < cols && y < rows) tile[dy][threadIdx.x] = in[y * cols + x];
  }
  if (kBarrier) __syncthreads();
  const int ox = blockIdx.y * 32 + threadIdx.x;  // column of out = row of in
  for (int dy = threadIdx.y; dy < 32; dy += 8) {
    const int oy = blockIdx.x * 32 + dy;
    if (ox < rows && oy < cols) out[oy * rows + ox] = tile[threadIdx.x][dy];
  }
}

__global__ void reduce_kernel(const float* x, std::int64_t n, float* out) {
  SHARED(float, s, [256]);
  float v = 0.f;
  for (std::int64_t i = std::int64_t(blockIdx.x) * 256 + threadIdx.x; i < n; i += std::int64_t(gridDim.x) * 256)
    v += x[i];
  s[threadIdx.x] = v;
  __syncthreads();
  for (int half = 128; half > 0; half >>= 1) {
    if (int(threadIdx.x) < half) s[threadIdx.x] += s[threadIdx.x + half];
    __syncthreads();
  }
  if (threadIdx.x == 0) atomicAdd(out, s[0]);
}

__global__ void histogram_kernel(const int* x, std::int64_t n, unsigned* bins, int nbins) {
  SHARED(unsigned, local, [1024]);
  for (int b = threadIdx.x; b < nbins; b += blockDim.x) local[b] = 0;
  __syncthreads();
  for (std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += std::int64_t(gridDim.x) * blockDim.x)
    atomicAdd(&local[x[i]], 1u);
  __syncthreads();
  for (int b = threadIdx.x; b < nbins; b += blockDim.x)
    if (local[b]) atomicAdd(&bins[b], local[b]);
}

__global__ void warp_ops_kernel(const int* x, int n, int* out) {
  SHARED(int, s, [64]);
  const unsigned full = 0xffffffffu;
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  const int lane = threadIdx.x % 32;
  const int v = x[t];
  auto put = [&](int row, int value) { out[row * n + t] = value; };
  int sum = v;
  for (int o = 16; o > 0; o >>= 1) sum += __shfl_down_sync(full, sum, o);
  put(0, __shfl_sync(full, sum, 0));
  int scan = v;
  for (int o = 1; o < 32; o <<= 1) {
    const int up = __shfl_up_sync(full, scan, o);
    if (lane >= o) scan += up;
  }
  put(1, scan);
  int mx = v;
  for (int o = 16; o > 0; o >>= 1) mx = max(mx, __shfl_xor_sync(full, mx, o));
  put(2, mx);
  put(3, static_cast<int>(__ballot_sync(full, v > 0)));
  put(4, __any_sync(full, v > 100));
  put(5, __all_sync(full, v > -100));
  int seg = v;
  for (int o = 4; o > 0; o >>= 1) seg += __shfl_xor_sync(full, seg, o, 8);
  put(6, seg);
  put(7, __shfl_sync(full, v, lane + 1));
  put(8, __reduce_add_sync(full, v));
  put(9, static_cast<int>(__match_any_sync(full, v & 3)));
  put(10, __shfl_down_sync(full, v, 3, 8));
  put(11, __shfl_up_sync(full, v, 3, 8));
  put(12, static_cast<int>(2.0 * __shfl_xor_sync(full, double(v) * 0.5, 1)));
  put(13, static_cast<int>(__shfl_sync(full, static_cast<long long>(v) << 33, 31) >> 33));
  s[threadIdx.x] = v;
  __syncwarp();
  for (int o = 16; o > 0; o >>= 1) {
    const int w = s[threadIdx.x] + s[threadIdx.x ^ o];
    __syncwarp();
    s[threadIdx.x] = w;
    __syncwarp();
  }
  put(14, s[threadIdx.x]);
  put(15, __shfl_sync(full, v, 3, 16));
  put(16, __reduce_max_sync(full, v));
  put(17, __reduce_min_sync(full, v));
  int pred_same = -1, pred_v = -1;
  put(18, static_cast<int>(__match_all_sync(full, blockIdx.x, &pred_same)) ^ (pred_same << 4));
  put(19, static_cast<int>(__match_all_sync(full, v, &pred_v)) + 2 * pred_v);
  put(20, static_cast<int>(__reduce_or_sync(full, static_cast<unsigned>(v) & 0xF0u)));
}

__global__ void uninit_shared_kernel(unsigned* out, int n) {
  SHARED(unsigned, never_written, [256]);
  DYNAMIC_SHARED(unsigned, dyn);
  out[threadIdx.x] = never_written[threadIdx.x];
  out[n + threadIdx.x] = dyn[threadIdx.x];
}

__global__ void dynamic_reverse_kernel(const float* in, float* out, int n) {
  DYNAMIC_SHARED(float, s);
  s[threadIdx.x] = in[threadIdx.x];
  __syncthreads();
  out[threadIdx.x] = s[n - 1 - threadIdx.x];
}

__global__ void dynamic_large_kernel(const float* in, float* out, int n) {
  DYNAMIC_SHARED(float, s);
  for (int i = threadIdx.x; i < n; i += blockDim.x) s[i] = in[i];
  __syncthreads();
  for (int i = threadIdx.x; i < n; i += blockDim.x) out[i] = s[n - 1 - i];
}

template <int kTag>
__device__ int tagged_slot(int lane) {
  SHARED(int, slot, [32]);  // one allocation per instantiation
  slot[lane] = kTag * 1000 + lane;
  __syncthreads();
  return slot[(lane + 1) % 32];
}
__global__ void template_shared_kernel(int* out) {
  const int a = tagged_slot<1>(threadIdx.x);
  const int b = tagged_slot<2>(threadIdx.x);
  out[threadIdx.x] = a;
  out[32 + threadIdx.x] = b;
}

__global__ void syncthreads_reduce_kernel(const int* x, int* out) {
  const int p = x[threadIdx.x] != 0;
  const int c = __syncthreads_count(p);
  const int a = __syncthreads_and(p);
  const int o = __syncthreads_or(p);
  if (threadIdx.x == 0) out[0] = c, out[1] = a, out[2] = o;
}

struct AtomicState {
  float f;
  double d;
  int i;
  unsigned u;
  unsigned long long ull;
  int sub;
  int imax, imin;
  unsigned umax, umin;
  int cas;
  unsigned exch;
  unsigned long long exch_olds;
  unsigned long long cas_ull;
  unsigned shared_sum;
  unsigned bits_or;
  unsigned bits_and;
};

__global__ void atomics_kernel(AtomicState* st) {
  SHARED(unsigned, block_count, [1]);
  if (threadIdx.x == 0) block_count[0] = 0;
  __syncthreads();
  const int gid = blockIdx.x * blockDim.x + threadIdx.x;
  atomicAdd(&st->f, 1.0f);
  atomicAdd(&st->d, 0.5);
  atomicAdd(&st->i, 2);
  atomicAdd(&st->u, 1u);
  atomicAdd(&st->ull, 1ull << 33);
  atomicSub(&st->sub, 1);
  atomicMax(&st->imax, gid);
  atomicMin(&st->imin, 1000 - gid);
  atomicMax(&st->umax, unsigned(gid) * 3u);
  atomicMin(&st->umin, unsigned(gid) + 7u);
  int old = atomicAdd(&st->cas, 0), assumed;  // an atomic first read: a plain one would race with the CASes
  do {
    assumed = old;
    old = atomicCAS(&st->cas, assumed, assumed + 1);
  } while (old != assumed);
  atomicAdd(&st->exch_olds, static_cast<unsigned long long>(atomicExch(&st->exch, unsigned(gid) + 1)));
  unsigned long long o2 = atomicAdd(&st->cas_ull, 0ull), a2;
  do {
    a2 = o2;
    o2 = atomicCAS(&st->cas_ull, a2, a2 + 1);
  } while (o2 != a2);
  atomicAdd(&block_count[0], 1u);
  atomicOr(&st->bits_or, 1u << (gid % 32));
  atomicAnd(&st->bits_and, ~(1u << (gid % 16)));
  __syncthreads();
  if (threadIdx.x == 0) atomicAdd(&st->shared_sum, block_count[0]);
}

template <int kTile>
__global__ void sgemm_kernel(const float* a, const float* b, float* c, int m, int n, int k) {
  SHARED(float, as, [kTile][kTile + 1]);
  SHARED(float, bs, [kTile][kTile + 1]);
  const int row = blockIdx.y * kTile + threadIdx.y, col = blockIdx.x * kTile + threadIdx.x;
  float acc = 0.f;
  for (int k0 = 0; k0 < k; k0 += kTile) {
    as[threadIdx.y][threadIdx.x] = (row < m && k0 + int(threadIdx.x) < k) ? a[row * k + k0 + threadIdx.x] : 0.f;
    bs[threadIdx.y][threadIdx.x] = (k0 + int(threadIdx.y) < k && col < n) ? b[(k0 + threadIdx.y) * n + col] : 0.f;
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTile; ++kk) acc += as[threadIdx.y][kk] * bs[kk][threadIdx.x];
    __syncthreads();
  }
  if (row < m && col < n) c[row * n + col] = acc;
}

__global__ void scale_kernel(const float* x, float* y, std::int64_t n, float alpha) {
  const std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) y[i] = alpha * x[i];
}

__global__ void thread_ids_kernel(int* out) {
  const unsigned block_linear = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  const unsigned per_block = blockDim.x * blockDim.y * blockDim.z;
  const unsigned t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  int* o = out + (std::size_t(block_linear) * per_block + t) * kThreadIdsFields;
  const int fields[kThreadIdsFields - 2] = {int(threadIdx.x), int(threadIdx.y), int(threadIdx.z), int(blockIdx.x),
                                            int(blockIdx.y),  int(blockIdx.z),  int(blockDim.x),  int(blockDim.y),
                                            int(blockDim.z),  int(gridDim.x),   int(gridDim.y),   int(gridDim.z)};
  for (int i = 0; i < kThreadIdsFields - 2; ++i) o[i] = fields[i];
  // Warps are formed from the linear thread index: lane 0 of my warp is thread t & ~31, and the last warp
  // of a block whose size is not a multiple of 32 is partial.
  const unsigned active = __activemask();
  o[kThreadIdsFields - 2] = __shfl_sync(active, int(t), 0);
  o[kThreadIdsFields - 1] = int(active);
}

__global__ void spin_kernel(double seconds) {
  const long long t0 = clock64();
  while (double(clock64() - t0) < seconds * 1e9) {
  }
}

// ---- broken kernels -------------------------------------------------------------------------------------
__global__ void divergent_barrier_kernel() {
  if (threadIdx.x < 16) __syncthreads();  // CASE divergent_barrier
}
__global__ void two_barriers_kernel() {
  if (threadIdx.x < 32) {
    __syncthreads();  // CASE two_barriers A
  } else {
    __syncthreads();  // CASE two_barriers B
  }
}
__global__ void early_return_kernel(float* out) {
  SHARED(float, s, [64]);
  if (threadIdx.x == 5) return;
  s[threadIdx.x] = 1.f;
  __syncthreads();  // CASE early_return
  out[threadIdx.x] = s[63 - threadIdx.x];
}
__global__ void assert_kernel(int limit) {
  assert(int(threadIdx.x) < limit);  // CASE assert
}
__global__ void throw_kernel() {
  if (blockIdx.x == 1 && threadIdx.x == 3) throw std::runtime_error("boom from a kernel");
}
__global__ void shfl_op_mismatch_kernel() {
  if (threadIdx.x < 16)
    __shfl_sync(0xffffffffu, 1, 0);  // CASE shfl_op_mismatch A
  else
    __ballot_sync(0xffffffffu, 1);  // CASE shfl_op_mismatch B
}
__global__ void shfl_mask_mismatch_kernel() {
  const unsigned mask = (threadIdx.x % 2) ? 0xaaaaaaaau : 0xffffffffu;
  __shfl_xor_sync(mask, 1, 2);  // CASE shfl_mask_mismatch
}
__global__ void partial_warp_kernel() {
  __shfl_xor_sync(0xffffffffu, 1.0f, 1);  // CASE partial_warp
}
__global__ void lane_not_in_mask_kernel() {
  __ballot_sync(0x1u, 1);  // CASE lane_not_in_mask
}
__global__ void warp_deadlock_kernel() {
  if (threadIdx.x < 16) __shfl_down_sync(0xffffffffu, 1, 1);  // CASE warp_deadlock
}
__global__ void warp_vs_barrier_kernel() {
  if (threadIdx.x < 16)
    __shfl_down_sync(0xffffffffu, 1, 1);  // CASE warp_vs_barrier A
  else
    __syncthreads();  // CASE warp_vs_barrier B
}
__global__ void shfl_bad_source_kernel() {
  if (threadIdx.x < 16) __shfl_down_sync(0x0000ffffu, 1, 8);  // CASE shfl_bad_source
}
__global__ void static_shared_too_big_kernel(float* out) {
  SHARED(float, big, [13000]);  // CASE static_shared_too_big
  big[threadIdx.x] = 1.f;
  out[threadIdx.x] = big[threadIdx.x];
}
__global__ void syncthreads_outside_kernel_dummy() {}
__global__ void nested_launch_kernel() { convnet::launch(syncthreads_outside_kernel_dummy, 1, 1, 0, nullptr); }
__global__ void empty_kernel() {}
__global__ void many_blocks_assert_kernel() {
  assert(blockIdx.x != 0);  // CASE many_blocks_assert
}

}  // namespace

void transpose(const float* in, float* out, int rows, int cols, bool barrier) {
  const dim3 grid((cols + 31) / 32, (rows + 31) / 32), block(32, 8);
  if (barrier)
    convnet::launch(transpose_kernel<true>, grid, block, 0, nullptr, in, out, rows, cols);
  else
    convnet::launch(transpose_kernel<false>, grid, block, 0, nullptr, in, out, rows, cols);
}

void reduce_sum(const float* x, std::int64_t n, float* out) {
  const std::int64_t blocks = std::max<std::int64_t>(1, std::min<std::int64_t>((n + 255) / 256, 64));
  convnet::launch(reduce_kernel, dim3(unsigned(blocks)), dim3(256), 0, nullptr, x, n, out);
}

void histogram(const int* x, std::int64_t n, unsigned* bins, int nbins) {
  if (nbins < 1 || nbins > 1024) throw std::invalid_argument("histogram: nbins must be in [1, 1024]");
  for (std::int64_t i = 0; i < n; ++i)
    if (x[i] < 0 || x[i] >= nbins) throw std::invalid_argument("histogram: value out of range");
  convnet::launch(histogram_kernel, dim3(8), dim3(128), 0, nullptr, x, n, bins, nbins);
}

void warp_ops(const int* x, int n, int* out) {
  if (n <= 0 || n % 64) throw std::invalid_argument("warp_ops: n must be a positive multiple of 64");
  convnet::launch(warp_ops_kernel, dim3(n / 64), dim3(64), 0, nullptr, x, n, out);
}

void uninit_shared(unsigned* out, int n) {
  if (n < 1 || n > 256) throw std::invalid_argument("uninit_shared: n must be in [1, 256]");
  convnet::launch(uninit_shared_kernel, dim3(1), dim3(n), n * sizeof(unsigned), nullptr, out, n);
}

void dynamic_reverse(const float* in, float* out, int n) {
  convnet::launch(dynamic_reverse_kernel, dim3(1), dim3(n), n * sizeof(float), nullptr, in, out, n);
}

void dynamic_large(const float* in, float* out, int n) {
  convnet::set_max_dynamic_shared(dynamic_large_kernel, n * sizeof(float));
  convnet::launch(dynamic_large_kernel, dim3(1), dim3(128), n * sizeof(float), nullptr, in, out, n);
}

void template_shared(int* out) { convnet::launch(template_shared_kernel, dim3(1), dim3(32), 0, nullptr, out); }

void syncthreads_reduce(const int* x, int n, int* out) {
  convnet::launch(syncthreads_reduce_kernel, dim3(1), dim3(n), 0, nullptr, x, out);
}

void atomics(int blocks, double* out) {
  AtomicState st{};
  st.imax = INT_MIN;
  st.imin = INT_MAX;
  st.umin = UINT_MAX;
  st.bits_and = 0xffffffffu;
  convnet::launch(atomics_kernel, dim3(blocks), dim3(128), 0, nullptr, &st);
  const double vals[kAtomicSlots] = {st.f,    st.d,    double(st.i),   double(st.u),        double(st.ull),
                                     double(st.sub),  double(st.imax), double(st.imin), double(st.umax),
                                     double(st.umin), double(st.cas),  double(st.exch) + double(st.exch_olds),
                                     double(st.cas_ull), double(st.shared_sum), double(st.bits_or),
                                     double(st.bits_and)};
  for (int i = 0; i < kAtomicSlots; ++i) out[i] = vals[i];
}

void sgemm(const float* a, const float* b, float* c, int m, int n, int k) {
  convnet::launch(sgemm_kernel<32>, dim3((n + 31) / 32, (m + 31) / 32), dim3(32, 32), 0, nullptr, a, b, c, m, n, k);
}

void scale(const float* x, float* y, std::int64_t n, float alpha) {
  convnet::launch(scale_kernel, dim3(unsigned((n + 255) / 256)), dim3(256), 0, nullptr, x, y, n, alpha);
}

void thread_ids(const unsigned grid[3], const unsigned block[3], int* out) {
  convnet::launch(thread_ids_kernel, dim3(grid[0], grid[1], grid[2]), dim3(block[0], block[1], block[2]), 0, nullptr,
                  out);
}

void spin(double seconds) { convnet::launch(spin_kernel, 1, 1, 0, nullptr, seconds); }

std::vector<std::string> case_names() {
  return {"divergent_barrier", "two_barriers",     "early_return",   "assert",          "throw",
          "shfl_op_mismatch",  "shfl_mask_mismatch", "partial_warp", "lane_not_in_mask", "warp_deadlock",
          "warp_vs_barrier",   "shfl_bad_source",  "static_shared_too_big", "nested_launch", "many_blocks_assert",
          "glibc_assert",
          "block_too_big",     "block_z_too_big",  "grid_y_too_big", "zero_grid",       "zero_block",
          "dyn_shared_too_big", "dyn_shared_over_max"};
}

void run_case(const std::string& name) {
  float buf[64] = {};
  if (name == "divergent_barrier") convnet::launch(divergent_barrier_kernel, 1, 32, 0, nullptr);
  else if (name == "two_barriers") convnet::launch(two_barriers_kernel, 1, 64, 0, nullptr);
  else if (name == "early_return") convnet::launch(early_return_kernel, 3, 64, 0, nullptr, buf);
  else if (name == "assert") convnet::launch(assert_kernel, 2, 64, 0, nullptr, 40);
  else if (name == "throw") convnet::launch(throw_kernel, 4, 32, 0, nullptr);
  else if (name == "shfl_op_mismatch") convnet::launch(shfl_op_mismatch_kernel, 1, 32, 0, nullptr);
  else if (name == "shfl_mask_mismatch") convnet::launch(shfl_mask_mismatch_kernel, 1, 32, 0, nullptr);
  else if (name == "partial_warp") convnet::launch(partial_warp_kernel, 1, 48, 0, nullptr);
  else if (name == "lane_not_in_mask") convnet::launch(lane_not_in_mask_kernel, 1, 32, 0, nullptr);
  else if (name == "warp_deadlock") convnet::launch(warp_deadlock_kernel, 1, 32, 0, nullptr);
  else if (name == "warp_vs_barrier") convnet::launch(warp_vs_barrier_kernel, 1, 32, 0, nullptr);
  else if (name == "shfl_bad_source") convnet::launch(shfl_bad_source_kernel, 1, 32, 0, nullptr);
  else if (name == "static_shared_too_big") convnet::launch(static_shared_too_big_kernel, 1, 32, 0, nullptr, buf);
  else if (name == "nested_launch") convnet::launch(nested_launch_kernel, 1, 1, 0, nullptr);
  else if (name == "glibc_assert") run_glibc_assert();
  else if (name == "many_blocks_assert") convnet::launch(many_blocks_assert_kernel, 20000, 32, 0, nullptr);
  else if (name == "block_too_big") convnet::launch(empty_kernel, 1, dim3(1025), 0, nullptr);
  else if (name == "block_z_too_big") convnet::launch(empty_kernel, 1, dim3(1, 1, 65), 0, nullptr);
  else if (name == "grid_y_too_big") convnet::launch(empty_kernel, dim3(1, 65536), 32, 0, nullptr);
  else if (name == "zero_grid") convnet::launch(empty_kernel, dim3(0), 32, 0, nullptr);
  else if (name == "zero_block") convnet::launch(empty_kernel, 1, dim3(32, 0), 0, nullptr);
  else if (name == "dyn_shared_too_big") convnet::launch(empty_kernel, 1, 32, 48 * 1024 + 4, nullptr);
  else if (name == "dyn_shared_over_max") convnet::launch(empty_kernel, 1, 32, 228 * 1024, nullptr);
  else throw std::invalid_argument("unknown self-test case: " + name);
}

}  // namespace cuemu_selftest

// ---- glibc's own assert: a header included <assert.h> again after cuda_compat.h --------------------------
#undef NDEBUG
#include <assert.h>

namespace cuemu_selftest {
namespace {
__global__ void glibc_assert_kernel(int limit) {
  assert(int(threadIdx.x) < limit);  // CASE glibc_assert
}
}  // namespace
void run_glibc_assert() { convnet::launch(glibc_assert_kernel, 1, 64, 0, nullptr, 40); }
}  // namespace cuemu_selftest
