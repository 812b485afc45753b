// convnet._cpu's Winograd F(2x2, 3x3) filter transforms for the cpu device's 3x3 stride-1 convolutions (the
// convolutions themselves, with their input, output and gradient transforms, are fused: csrc/cpu/winograd_fused.inc;
// src/convnet/cpu/winograd.py runs both).
//
// Layouts: filters w (Cg, 3, 3, F); e = 4a + b the element (a, b) of a 4x4 transformed tile:
//   U = G g G^T (stored (16, Cg, Fg)): the forward multiplies the input transform V = B^T d B by it, and the data
//   gradient (the forward on dy with the filters rotated by 180 degrees and transposed, padding 2 - p) too;
//   filter gradient: D_e = sum over tiles of V_e (A dY A^T)_e^T, then dw = G^T D G.
// B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1], G = [1 0 0; .5 .5 .5; .5 -.5 .5; 0 0 1], A^T = [1 1 1 0; 0 1 -1 -1].
//
// Deterministic: every transformed element is a fixed sequence of float additions and exact halvings (compiled with
// -ffp-contract=off, CMakeLists.txt: no fused multiply-add), the same at any SIMD width (the vector loops run across
// filters, each lane one element's arithmetic) and any thread count (every output element is written by one thread;
// work is split over channels). Blocks of 16 filters go through a block-local buffer: the form GCC vectorises.
// Arguments are checked here again: a wrong call is a ValueError.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#define SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define SIMD_CLONES
#endif

namespace py = pybind11;

namespace convnet_cpu {

int loop_threads();  // host_kernels.cpp: set_threads

namespace {

using i64 = std::int64_t;
using Floats = py::array_t<float, py::array::c_style>;  // no forcecast: float64 or strided is a TypeError

constexpr i64 kBlock = 16;  // filters per block of the transforms: a tap's 16 values of 16 filters stay local

const float* in(const Floats& a, const char* name, i64 size) {
  if (a.size() != size) {
    throw py::value_error(std::string("winograd: ") + name + " has " + std::to_string(a.size()) +
                          " elements, expected " + std::to_string(size));
  }
  return a.data();
}

float* out(Floats& a, const char* name, i64 size) {
  in(a, name, size);
  if (!a.writeable()) throw py::value_error(std::string("winograd: ") + name + " is read-only");
  return a.mutable_data();
}

void positive(std::initializer_list<i64> values) {
  for (i64 v : values) {
    if (v <= 0) throw py::value_error("winograd: sizes must be positive");
  }
}

// 1-D transforms, each a fixed order of operations.
inline void g3(float g0, float g1, float g2, float* o) {  // G g
  o[0] = g0;
  o[1] = ((g0 + g1) + g2) * 0.5f;
  o[2] = ((g0 - g1) + g2) * 0.5f;
  o[3] = g2;
}
inline void gt4(float d0, float d1, float d2, float d3, float* o) {  // G^T d
  o[0] = d0 + (d1 + d2) * 0.5f;
  o[1] = (d1 - d2) * 0.5f;
  o[2] = (d1 + d2) * 0.5f + d3;
}

// One input channel's filter transforms, t[e][f] = (G g_f G^T)[e] for f < count (at most kBlock), g_f[ky][kx] =
// taps[3 ky + kx][f]: vectorised along f (the block-local output is what lets GCC vectorise it).
SIMD_CLONES void filter_block(const float* const* taps_in, float (*__restrict__ t)[kBlock], i64 count) {
  const float* taps[9];
  for (int k = 0; k < 9; ++k) taps[k] = taps_in[k];
  for (i64 f = 0; f < count; ++f) {
    float col[3][4], r[4][4];
    for (int kx = 0; kx < 3; ++kx) g3(taps[kx][f], taps[3 + kx][f], taps[6 + kx][f], col[kx]);  // (G g)[a][kx]
    for (int a = 0; a < 4; ++a) g3(col[0][a], col[1][a], col[2][a], r[a]);
    for (int a = 0; a < 4; ++a) {
      for (int b = 0; b < 4; ++b) t[4 * a + b][f] = r[a][b];
    }
  }
}

// U (16, Cg, Fg) = G g G^T of filters [f0, f0 + Fg) of w (Cg, 3, 3, F): g = w[c, :, :, f] (the forward, which
// multiplies by U_e.T), or rotated by 180 degrees, g[ky][kx] = w[c, 2 - ky, 2 - kx, f] (the data gradient's
// transposed convolution, which multiplies by U_e).
void filter_transform(const Floats& w, Floats& u, i64 Cg, i64 F, i64 f0, i64 Fg, bool rotate) {
  positive({Cg, F, Fg});
  if (f0 < 0 || f0 + Fg > F) throw py::value_error("winograd: bad filter range");
  const float* wp = in(w, "w", Cg * 9 * F);
  float* up = out(u, "U", 16 * Fg * Cg);
  int tap[9];
  for (int k = 0; k < 9; ++k) tap[k] = rotate ? 8 - k : k;
  py::gil_scoped_release release;
#pragma omp parallel for schedule(static) num_threads(loop_threads())
  for (i64 c = 0; c < Cg; ++c) {
    alignas(64) float t[16][kBlock];
    const float* taps[9];
    for (i64 fb = 0; fb < Fg; fb += kBlock) {
      const i64 count = std::min(kBlock, Fg - fb);
      for (int k = 0; k < 9; ++k) taps[k] = wp + (c * 9 + tap[k]) * F + f0 + fb;
      filter_block(taps, t, count);
      for (int e = 0; e < 16; ++e) std::memcpy(up + (e * Cg + c) * Fg + fb, t[e], sizeof(float) * count);
    }
  }
}

// t[3 ky + kx][f] = (G^T D_f G)[ky][kx] for f < count (at most kBlock), D_f[a][b] = rows[4a + b][f].
SIMD_CLONES void filter_grad_block(const float* const* rows_in, float (*__restrict__ t)[kBlock], i64 count) {
  const float* rows[16];
  for (int k = 0; k < 16; ++k) rows[k] = rows_in[k];
  for (i64 f = 0; f < count; ++f) {
    float col[4][3], r[3][3];
    for (int b = 0; b < 4; ++b) gt4(rows[b][f], rows[4 + b][f], rows[8 + b][f], rows[12 + b][f], col[b]);
    for (int ky = 0; ky < 3; ++ky) gt4(col[0][ky], col[1][ky], col[2][ky], col[3][ky], r[ky]);  // col[b][ky]
    for (int ky = 0; ky < 3; ++ky) {
      for (int kx = 0; kx < 3; ++kx) t[3 * ky + kx][f] = r[ky][kx];
    }
  }
}

// dw[c, :, :, f0 + f] (dw is (Cg, 3, 3, F)) = G^T D G of D (16, Cg, Fg).
void filter_grad_transform(const Floats& d, Floats& dw, i64 Cg, i64 F, i64 f0, i64 Fg) {
  positive({Cg, F, Fg});
  if (f0 < 0 || f0 + Fg > F) throw py::value_error("winograd: bad filter range");
  const float* dp = in(d, "D", 16 * Cg * Fg);
  float* wp = out(dw, "dw", Cg * 9 * F);
  py::gil_scoped_release release;
#pragma omp parallel for schedule(static) num_threads(loop_threads())
  for (i64 c = 0; c < Cg; ++c) {
    alignas(64) float t[9][kBlock];
    const float* rows[16];
    for (i64 fb = 0; fb < Fg; fb += kBlock) {
      const i64 count = std::min(kBlock, Fg - fb);
      for (int e = 0; e < 16; ++e) rows[e] = dp + (e * Cg + c) * Fg + fb;
      filter_grad_block(rows, t, count);
      for (int k = 0; k < 9; ++k) std::memcpy(wp + (c * 9 + k) * F + f0 + fb, t[k], sizeof(float) * count);
    }
  }
}

}  // namespace

void register_winograd(py::module_& m) {
  m.def("winograd_filter", &filter_transform, py::arg("w"), py::arg("U"), py::arg("Cg"), py::arg("F"), py::arg("f0"),
        py::arg("Fg"), py::arg("rotate"), "U = G g G^T");
  m.def("winograd_filter_grad", &filter_grad_transform, py::arg("D"), py::arg("dw"), py::arg("Cg"), py::arg("F"),
        py::arg("f0"), py::arg("Fg"), "dw = G^T D G");
}

}  // namespace convnet_cpu
