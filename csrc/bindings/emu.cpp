// Emulator controls and self-test kernels for convnet._emu (compiled only into the emu module).
#if CONVNET_EMU
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <string>

#include "bindings/common.h"
#include "emu/selftest_kernels.h"

namespace {

cuemu::Schedule parse_schedule(const std::string& name) {
  if (name == "forward") return cuemu::Schedule::Forward;
  if (name == "reverse") return cuemu::Schedule::Reverse;
  if (name == "random") return cuemu::Schedule::Random;
  throw py::value_error("unknown schedule '" + name + "'; expected 'forward', 'reverse' or 'random'");
}

template <class T>
using carray = py::array_t<T, py::array::c_style | py::array::forcecast>;

}  // namespace

void bind_emulator(py::module_& m) {
  py::register_exception<cuemu::EmulatorError>(m, "EmulatorError", PyExc_RuntimeError);

  m.def(
      "set_schedule",
      [](const std::string& name, py::int_ seed) {
        // Any Python int: the seed is taken modulo 2**64.
        const unsigned long long s = PyLong_AsUnsignedLongLongMask(seed.ptr());
        if (PyErr_Occurred()) throw py::error_already_set();
        cuemu::set_schedule(parse_schedule(name), s);
      },
      py::arg("name"), py::arg("seed") = 0,
        "Order in which the fibers (CUDA threads) of a block resume between barriers: 'forward', 'reverse' or "
        "'random' (a permutation drawn per round from seed, block index and round).");
  m.def("get_schedule", []() {
    const auto s = cuemu::schedule();
    return py::make_tuple(std::string(cuemu::schedule_name(s.order)), s.seed);
  });
  m.def("set_num_workers", &cuemu::set_num_workers, py::arg("n"),
        "OS threads running blocks in parallel (0 = default: $CONVNET_EMU_THREADS or all cores).");
  m.def("num_workers", &cuemu::num_workers);
  m.def("set_watchdog", &cuemu::set_watchdog_seconds, py::arg("seconds"),
        "Print a message naming block and thread when a launch makes no progress for this long (0 = off).");
  m.def("last_launch_stats", []() {
    const auto s = cuemu::last_launch_stats();
    py::dict d;
    d["blocks_run"] = s.blocks_run;
    d["threads_run"] = s.threads_run;
    d["switches"] = s.switches;
    d["barrier_rounds"] = s.barrier_rounds;
    return d;
  });

  // ---- self-test kernels (tests/emu) -------------------------------------------------------------------
  py::module_ t = m.def_submodule("selftest", "Kernels that exercise the CPU emulator itself");
  t.def("case_names", &cuemu_selftest::case_names);
  t.def("last_error", []() { return static_cast<int>(cudaGetLastError()); },
        "cudaGetLastError() as an int (the emulator throws instead of leaving sticky errors: always 0)");
  convnet::bind::def_kernel(t, "spin", &cuemu_selftest::spin, py::arg("seconds"));
  convnet::bind::def_kernel(t, "run_case", &cuemu_selftest::run_case, py::arg("name"));
  // The functions below take and return NumPy arrays, so they allocate with the GIL held and release it around
  // the launch only.
  t.def(
      "transpose",
      [](carray<float> x, bool barrier) {
        if (x.ndim() != 2) throw py::value_error("transpose: expected a 2-D array");
        const int rows = int(x.shape(0)), cols = int(x.shape(1));
        carray<float> out({py::ssize_t(cols), py::ssize_t(rows)});
        const float* in = x.data();
        float* o = out.mutable_data();
        {
          py::gil_scoped_release nogil;
          cuemu_selftest::transpose(in, o, rows, cols, barrier);
        }
        return out;
      },
      py::arg("x"), py::arg("barrier") = true);
  t.def("reduce_sum", [](carray<float> x) {
    float out = 0.f;
    const float* p = x.data();
    const std::int64_t n = x.size();
    {
      py::gil_scoped_release nogil;
      cuemu_selftest::reduce_sum(p, n, &out);
    }
    return out;
  });
  t.def("histogram", [](carray<int> x, int nbins) {
    carray<unsigned> bins(nbins);
    std::fill(bins.mutable_data(), bins.mutable_data() + nbins, 0u);
    const int* p = x.data();
    unsigned* b = bins.mutable_data();
    const std::int64_t n = x.size();
    {
      py::gil_scoped_release nogil;
      cuemu_selftest::histogram(p, n, b, nbins);
    }
    return bins;
  });
  t.attr("WARP_OPS_ROWS") = cuemu_selftest::kWarpOpsRows;
  t.def("warp_ops", [](carray<int> x) {
    const int n = int(x.size());
    carray<int> out({py::ssize_t(cuemu_selftest::kWarpOpsRows), py::ssize_t(n)});
    const int* p = x.data();
    int* o = out.mutable_data();
    {
      py::gil_scoped_release nogil;
      cuemu_selftest::warp_ops(p, n, o);
    }
    return out;
  });
  t.def("uninit_shared", [](int n) {
    carray<unsigned> out(2 * n);
    unsigned* o = out.mutable_data();
    {
      py::gil_scoped_release nogil;
      cuemu_selftest::uninit_shared(o, n);
    }
    return out;
  });
  t.def("dynamic_reverse", [](carray<float> x, bool large) {
    const int n = int(x.size());
    carray<float> out(n);
    const float* p = x.data();
    float* o = out.mutable_data();
    {
      py::gil_scoped_release nogil;
      if (large)
        cuemu_selftest::dynamic_large(p, o, n);
      else
        cuemu_selftest::dynamic_reverse(p, o, n);
    }
    return out;
  }, py::arg("x"), py::arg("large") = false);
  t.def("template_shared", []() {
    carray<int> out(64);
    int* o = out.mutable_data();
    {
      py::gil_scoped_release nogil;
      cuemu_selftest::template_shared(o);
    }
    return out;
  });
  t.def("syncthreads_reduce", [](carray<int> x) {
    carray<int> out(3);
    const int* p = x.data();
    int* o = out.mutable_data();
    const int n = int(x.size());
    {
      py::gil_scoped_release nogil;
      cuemu_selftest::syncthreads_reduce(p, n, o);
    }
    return out;
  });
  t.attr("ATOMIC_SLOTS") = cuemu_selftest::kAtomicSlots;
  t.def("atomics", [](int blocks) {
    carray<double> out(cuemu_selftest::kAtomicSlots);
    double* o = out.mutable_data();
    {
      py::gil_scoped_release nogil;
      cuemu_selftest::atomics(blocks, o);
    }
    return out;
  });
  t.def("sgemm", [](carray<float> a, carray<float> b) {
    if (a.ndim() != 2 || b.ndim() != 2 || a.shape(1) != b.shape(0)) throw py::value_error("sgemm: bad shapes");
    const int m = int(a.shape(0)), k = int(a.shape(1)), n = int(b.shape(1));
    carray<float> c({py::ssize_t(m), py::ssize_t(n)});
    const float *pa = a.data(), *pb = b.data();
    float* pc = c.mutable_data();
    {
      py::gil_scoped_release nogil;
      cuemu_selftest::sgemm(pa, pb, pc, m, n, k);
    }
    return c;
  });
  t.def("scale", [](carray<float> x, float alpha) {
    carray<float> y(x.size());
    const float* p = x.data();
    float* o = y.mutable_data();
    const std::int64_t n = x.size();
    {
      py::gil_scoped_release nogil;
      cuemu_selftest::scale(p, o, n, alpha);
    }
    return y;
  });
  t.attr("THREAD_IDS_FIELDS") = cuemu_selftest::kThreadIdsFields;
  t.def("thread_ids", [](std::array<unsigned, 3> grid, std::array<unsigned, 3> block) {
    const py::ssize_t threads = py::ssize_t(grid[0]) * grid[1] * grid[2] * block[0] * block[1] * block[2];
    carray<int> out({threads, py::ssize_t(cuemu_selftest::kThreadIdsFields)});
    int* o = out.mutable_data();
    {
      py::gil_scoped_release nogil;
      cuemu_selftest::thread_ids(grid.data(), block.data(), o);
    }
    return out;
  });
}
#endif  // CONVNET_EMU
