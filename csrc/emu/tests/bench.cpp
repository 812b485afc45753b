// Emulator speed benchmark (no Python): g++ -std=c++20 -O2 -Icsrc -x c++ csrc/emu/selftest_kernels.cu -x none
// csrc/emu/cuemu.cpp csrc/emu/tests/bench.cpp -lpthread -o bench && ./bench [workers]
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <string>
#include <vector>

#include "cuda_compat.h"
#include "emu/selftest_kernels.h"

template <class F>
static void run(const char* name, F f, int reps) {
  // Best wall time, and the CPU time of that repetition (on a shared machine CPU time is the steadier number).
  double best = 1e9, best_cpu = 0;
  for (int r = 0; r < reps; ++r) {
    timespec c0, c1;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &c0);
    auto t0 = std::chrono::steady_clock::now();
    f();
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &c1);
    if (dt < best) best = dt, best_cpu = (c1.tv_sec - c0.tv_sec) + 1e-9 * (c1.tv_nsec - c0.tv_nsec);
  }
  const auto s = cuemu::last_launch_stats();
  std::printf("%-28s %8.1f ms (cpu %8.1f ms)  threads %9llu  resumes %9llu  barriers %7llu  %6.1f M resumes/s  %6.1f ns/thread\n",
              name, best * 1e3, best_cpu * 1e3, (unsigned long long)s.threads_run, (unsigned long long)s.switches,
              (unsigned long long)s.barrier_rounds, s.switches / best / 1e6, best / s.threads_run * 1e9);
}

int main(int argc, char** argv) {
  const int workers = argc > 1 ? std::atoi(argv[1]) : 0;
  const std::string only = argc > 2 ? argv[2] : "";  // sgemm | scale | warp
  cuemu::set_num_workers(workers);
  std::printf("workers: %d\n", cuemu::num_workers());
  const int n = 256;
  std::vector<float> a(n * n, 1.f), b(n * n, 2.f), c(n * n);
  if (only.empty() || only == "sgemm")
  run("sgemm 256^3 (32x32 blocks)", [&] { cuemu_selftest::sgemm(a.data(), b.data(), c.data(), n, n, n); }, 5);
  std::vector<float> x(4 << 20, 1.f), y(4 << 20);
  if (only.empty() || only == "scale")
  run("scale 4M floats (256/block)", [&] { cuemu_selftest::scale(x.data(), y.data(), x.size(), 2.f); }, 5);
  std::vector<int> wx(1 << 16, 1), wo(cuemu_selftest::kWarpOpsRows << 16);
  if (only.empty() || only == "warp")
  run("warp_ops 64K threads", [&] { cuemu_selftest::warp_ops(wx.data(), 1 << 16, wo.data()); }, 3);
  return 0;
}
