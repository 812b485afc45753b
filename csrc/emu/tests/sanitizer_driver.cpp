// Sanitizer driver for the CPU emulator. Built by tests/emu/test_sanitizer.py with
//   g++ -std=c++20 -fsanitize=address,undefined -fno-sanitize-recover=undefined -g -Icsrc
//       csrc/emu/tests/sanitizer_driver.cpp csrc/emu/cuemu.cpp csrc/emu/selftest_kernels.cu(as C++)
// Usage: sanitizer_driver CASE. Clean cases run correct kernels (under every schedule) and must exit 0 with no
// sanitizer report; oob_* cases contain deliberate out-of-bounds accesses that ASan/UBSan must report
// (non-zero exit); stack_overflow must die with the emulator's message. Exit 3 = a clean case computed a wrong
// result; 4 = an emulator error where none was expected. Built with -fsanitize=thread instead, clean cases
// must run clean and race_interblock (two blocks writing one global element) must be reported.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "cuda_compat.h"
#include "emu/selftest_kernels.h"

namespace {

int failures = 0;
#define CHECK(cond)                                                         \
  do {                                                                      \
    if (!(cond)) {                                                          \
      std::fprintf(stderr, "CHECK failed: %s (%s:%d)\n", #cond, __FILE__, __LINE__); \
      ++failures;                                                           \
    }                                                                       \
  } while (0)

// ---- deliberately out-of-bounds kernels ----
__global__ void shared_row_overrun_kernel(float* out) {
  SHARED(float, tile, [4][8]);
  tile[threadIdx.y][threadIdx.x] = 1.f;  // blockDim.x = 9: column 8 of a row of 8 (still inside the array)
  __syncthreads();
  out[threadIdx.y * 9 + threadIdx.x] = tile[threadIdx.y][threadIdx.x];
}
__global__ void shared_past_end_kernel(float* out) {
  SHARED(float, s, [32]);
  float* p = s;  // through a pointer: no static bounds; ASan's heap redzone must catch it
  p[threadIdx.x + 1] = 2.f;
  __syncthreads();
  out[threadIdx.x] = p[threadIdx.x];
}
__global__ void global_past_end_kernel(float* out, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i <= n) out[i] = 3.f;  // off by one
}
__global__ void dynamic_past_end_kernel(float* out, int n) {
  DYNAMIC_SHARED(float, s);
  s[threadIdx.x + (threadIdx.x == 0 ? n : 0)] = 1.f;
  out[0] = 0.f;
}
// Two blocks write the same global element without atomics. Block 0 waits until block 1 has started, so
// with >= 2 workers they run concurrently; ThreadSanitizer must report the race on out[0].
__global__ void interblock_race_kernel(float* out, int* started) {
  if (blockIdx.x == 1) {
    if (threadIdx.x == 0) atomicExch(started, 1);
    out[0] = 1.f;
  } else if (blockIdx.x == 0) {
    while (atomicAdd(started, 0) == 0) {
    }
    out[0] = 2.f;
  }
}
__global__ void stack_kernel_clean(float* out) {
  float local[64];
  for (int i = 0; i < 64; ++i) local[i] = float(i + threadIdx.x);
  __syncthreads();
  float s = 0;
  for (int i = 0; i < 64; ++i) s += local[i];
  out[threadIdx.x] = s;
}

__global__ void stack_overflow_kernel(float* out) {
  volatile char big[512 * 1024];  // far more than a fiber stack; touched top-down so the guard page is hit
  for (long i = long(sizeof big) - 1; i >= 0; i -= 512) big[i] = char(i);
  out[threadIdx.x] = big[threadIdx.x];
}

void clean_selftests() {
  const cuemu::Schedule orders[] = {cuemu::Schedule::Forward, cuemu::Schedule::Reverse, cuemu::Schedule::Random};
  // DRIVER_ONE_SCHEDULE=1: forward only (TSan looks for races between blocks, which the order within a block
  // does not change, and TSan is slow).
  const int n_orders = std::getenv("DRIVER_ONE_SCHEDULE") ? 1 : 3;
  for (int oi = 0; oi < n_orders; ++oi) {
    const cuemu::Schedule order = orders[oi];
    cuemu::set_schedule(order, 7);
    // transpose
    const int rows = 40, cols = 70;
    std::vector<float> in(rows * cols), out(rows * cols);
    for (int i = 0; i < rows * cols; ++i) in[i] = float(i);
    cuemu_selftest::transpose(in.data(), out.data(), rows, cols, true);
    for (int r = 0; r < rows; ++r)
      for (int c = 0; c < cols; ++c) CHECK(out[c * rows + r] == in[r * cols + c]);
    // reduction
    std::vector<float> x(5000, 0.25f);
    float sum = 0;
    cuemu_selftest::reduce_sum(x.data(), 5000, &sum);
    CHECK(sum == 1250.f);
    // sgemm
    const int m = 40, n = 33, k = 50;
    std::vector<float> a(m * k), b(k * n), c(m * n);
    for (int i = 0; i < m * k; ++i) a[i] = float(i % 7) - 3;
    for (int i = 0; i < k * n; ++i) b[i] = float(i % 5) - 2;
    cuemu_selftest::sgemm(a.data(), b.data(), c.data(), m, n, k);
    for (int i = 0; i < m; ++i)
      for (int j = 0; j < n; ++j) {
        float r = 0;
        for (int q = 0; q < k; ++q) r += a[i * k + q] * b[q * n + j];
        CHECK(c[i * n + j] == r);
      }
    // warp collectives
    std::vector<int> wx(128), wout(cuemu_selftest::kWarpOpsRows * 128);
    for (int i = 0; i < 128; ++i) wx[i] = (i * 37) % 61 - 30;
    cuemu_selftest::warp_ops(wx.data(), 128, wout.data());
    for (int w = 0; w < 4; ++w) {
      int s = 0;
      for (int l = 0; l < 32; ++l) s += wx[w * 32 + l];
      for (int l = 0; l < 32; ++l) CHECK(wout[w * 32 + l] == s);
    }
    // dynamic shared, templates, atomics
    std::vector<float> din(100), dout(100);
    for (int i = 0; i < 100; ++i) din[i] = float(i);
    cuemu_selftest::dynamic_reverse(din.data(), dout.data(), 100);
    for (int i = 0; i < 100; ++i) CHECK(dout[i] == float(99 - i));
    int tout[64];
    cuemu_selftest::template_shared(tout);
    for (int l = 0; l < 32; ++l) CHECK(tout[l] == 1000 + (l + 1) % 32 && tout[32 + l] == 2000 + (l + 1) % 32);
    double at[cuemu_selftest::kAtomicSlots];
    cuemu_selftest::atomics(4, at);
    CHECK(at[0] == 512 && at[2] == 1024);
    std::vector<float> sk(64);
    cuemu::launch(stack_kernel_clean, dim3(1), dim3(64), 0, nullptr, sk.data());
    CHECK(sk[1] == 2016.f + 64.f);
  }
}

int run(const std::string& name) {
  if (name == "clean") {
    clean_selftests();
    return failures ? 3 : 0;
  }
  if (name == "clean_errors") {  // every error case must raise EmulatorError, with no sanitizer report
    for (const auto& c : cuemu_selftest::case_names()) {
      bool raised = false;
      try {
        cuemu_selftest::run_case(c);
      } catch (const cuemu::EmulatorError&) {
        raised = true;
      }
      if (!raised) {
        std::fprintf(stderr, "case %s did not raise\n", c.c_str());
        ++failures;
      }
    }
    return failures ? 3 : 0;
  }
  if (name == "oob_shared_row") {
    std::vector<float> out(9 * 4);
    cuemu::launch(shared_row_overrun_kernel, dim3(1), dim3(9, 4), 0, nullptr, out.data());
    return 0;
  }
  if (name == "oob_shared_past_end") {
    std::vector<float> out(32);
    cuemu::launch(shared_past_end_kernel, dim3(1), dim3(32), 0, nullptr, out.data());
    return 0;
  }
  if (name == "oob_global") {
    const int n = 100;
    float* out = new float[n];
    cuemu::launch(global_past_end_kernel, dim3(2), dim3(64), 0, nullptr, out, n);
    delete[] out;
    return 0;
  }
  if (name == "oob_dynamic_shared") {
    float out[1];
    cuemu::launch(dynamic_past_end_kernel, dim3(1), dim3(32), 32 * sizeof(float), nullptr, out, 32);
    return 0;
  }
  if (name == "race_interblock") {
    cuemu::set_num_workers(2);
    float out[1] = {0};
    int started = 0;
    cuemu::launch(interblock_race_kernel, dim3(2), dim3(1), 0, nullptr, out, &started);
    return 0;
  }
  if (name == "stack_overflow") {  // must die with a message, never corrupt memory silently
    float out[32];
    cuemu::launch(stack_overflow_kernel, dim3(1), dim3(32), 0, nullptr, out);
    return 0;
  }
  std::fprintf(stderr, "unknown case %s\n", name.c_str());
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s CASE\n", argv[0]);
    return 2;
  }
  try {
    return run(argv[1]);
  } catch (const cuemu::EmulatorError& e) {
    std::fprintf(stderr, "EmulatorError: %s\n", e.what());
    return 4;
  }
}
