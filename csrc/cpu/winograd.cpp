// convnet._cpu's Winograd F(m x m, 3x3) filter transforms (m = 2 or 3) for the cpu device's 3x3 stride-1
// convolutions: U = G g G^T for the forward and data gradient, dw = G^T D G after the filter gradient's products.
// The convolutions themselves, with their input, output and gradient transforms, are fused:
// csrc/cpu/winograd_fused.inc; the matrices: csrc/cpu/winograd_matrices.h; src/convnet/cpu/winograd.py runs both.
//
// Layouts: filters w (Cg, 3, 3, F); D (E, Cg, Fg), E = (m + 2)^2, e = (m + 2) a + b the element (a, b) of a
// transformed tile; U one such block per kind of tile (winograd_tile_kinds: the ragged last tiles' own elements).
// The data gradient uses the filters rotated by 180 degrees (rotate).
//
// Deterministic: every transformed element is winograd_apply's fixed sequence of float operations (compiled with
// -ffp-contract=off, CMakeLists.txt: no fused multiply-add), the same at any SIMD width (the vector loops run
// across filters, each lane one element's arithmetic) and any thread count (every output element is written by one
// thread; work is split over channels). Blocks of 16 filters go through a block-local buffer: the form GCC
// vectorises. Arguments are checked here again: a wrong call is a ValueError.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "cpu/winograd_matrices.h"

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

// kBlock filters' values side by side: winograd_apply's arithmetic on each lane, in loops GCC vectorises.
struct Lanes {
  float v[kBlock];
};

template <bool transposed, int R, int K>
inline void apply(const float (&mat)[R][K], const Lanes* in, int is, Lanes* out, int os) {
  winograd_apply<transposed>(
      mat, in, is, out, os, Lanes{},
      [](const Lanes& x, const Lanes& y) {
        Lanes r;
        for (int l = 0; l < kBlock; ++l) r.v[l] = x.v[l] + y.v[l];
        return r;
      },
      [](const Lanes& x, const Lanes& y) {
        Lanes r;
        for (int l = 0; l < kBlock; ++l) r.v[l] = x.v[l] - y.v[l];
        return r;
      },
      [](float c, const Lanes& x) {
        Lanes r;
        for (int l = 0; l < kBlock; ++l) r.v[l] = c * x.v[l];
        return r;
      });
}

// dst[r * stride + f] = t[r][f] for f < count: a whole block by fixed-size copies (a copy of a runtime size is a
// library call, which cost more than the block's transform).
template <int Rows>
inline void store_rows(const float (*t)[kBlock], float* dst, i64 stride, i64 count) {
  if (count == kBlock) {
    for (int r = 0; r < Rows; ++r) std::memcpy(dst + r * stride, t[r], sizeof(float) * kBlock);
  } else {
    for (int r = 0; r < Rows; ++r) std::memcpy(dst + r * stride, t[r], sizeof(float) * count);
  }
}

// out[r].v[f] = rows[r][f] for f < count, zeros past it (fixed-size copies for a whole block, as store_rows).
template <int Rows>
inline void load_rows(const float* const* rows, Lanes* out, i64 count) {
  for (int r = 0; r < Rows; ++r) {
    if (count == kBlock) {
      std::memcpy(out[r].v, rows[r], sizeof(float) * kBlock);
    } else {
      out[r] = Lanes{};
      std::memcpy(out[r].v, rows[r], sizeof(float) * count);
    }
  }
}

// One input channel's filter transforms for MY x MX tiles, t[e][f] = (G_MY g_f G_MX^T)[e] for f < count (at most
// kBlock), g_f[ky][kx] = taps[3 ky + kx][f]: each filter one lane (G_1, F(1, 3)'s, is the identity).
template <int MY, int MX>
SIMD_CLONES void filter_block(const float* const* taps, float (*__restrict__ t)[kBlock], i64 count) {
  using WY = WinogradMatrices<MY>;
  using WX = WinogradMatrices<MX>;
  constexpr int AY = WY::kAlpha, AX = WX::kAlpha;
  Lanes g[9], col[3 * AY], r[AY * AX];
  load_rows<9>(taps, g, count);
  for (int kx = 0; kx < 3; ++kx) apply<false>(WY::G, g + kx, 3, col + kx * AY, 1);  // col[kx][a] = (G g)[a][kx]
  for (int a = 0; a < AY; ++a) apply<false>(WX::G, col + a, AY, r + a * AX, 1);
  for (int e = 0; e < AY * AX; ++e) {
    for (i64 f = 0; f < kBlock; ++f) t[e][f] = r[e].v[f];
  }
}

// U = G g G^T of filters [f0, f0 + Fg) of w (Cg, 3, 3, F), one (E_q, Cg, Fg) block per kind q of tile
// (winograd_tile_kinds) one after the other: g = w[c, :, :, f] (the forward, which multiplies by U_e.T), or rotated
// by 180 degrees, g[ky][kx] = w[c, 2 - ky, 2 - kx, f] (the data gradient's transposed convolution, which
// multiplies by U_e).
template <int MY, int MX>
void filter_transform_kind(const float* wp, float* up, i64 Cg, i64 F, i64 f0, i64 Fg, bool rotate) {
  constexpr int E = (MY + 2) * (MX + 2);
  int tap[9];
  for (int k = 0; k < 9; ++k) tap[k] = rotate ? 8 - k : k;
#pragma omp parallel for schedule(static) num_threads(loop_threads())
  for (i64 c = 0; c < Cg; ++c) {
    alignas(64) float t[E][kBlock];
    const float* taps[9];
    for (i64 fb = 0; fb < Fg; fb += kBlock) {
      const i64 count = std::min(kBlock, Fg - fb);
      for (int k = 0; k < 9; ++k) taps[k] = wp + (c * 9 + tap[k]) * F + f0 + fb;
      filter_block<MY, MX>(taps, t, count);
      store_rows<E>(t, up + c * Fg + fb, Cg * Fg, count);
    }
  }
}

template <int M>
void filter_transform_m(const float* wp, float* up, i64 Cg, i64 F, i64 f0, i64 Fg, bool rotate,
                        const WinogradTileKinds& kinds) {
  for (int q = 0; q < kinds.count; ++q) {
    float* block = up + kinds.elements_before(q) * Cg * Fg;
    for_tile_kind<M>(kinds.my[q] == 1, kinds.mx[q] == 1, [&](auto my, auto mx) {
      filter_transform_kind<decltype(my)::value, decltype(mx)::value>(wp, block, Cg, F, f0, Fg, rotate);
    });
  }
}

void check_tile(int m) {
  if (m != 2 && m != 3) throw py::value_error("winograd: m (the output tile) must be 2 or 3");
}

// oh x ow: the output of the convolution the filters are for (its tile kinds, winograd_tile_kinds).
void filter_transform(const Floats& w, Floats& u, i64 Cg, i64 F, i64 f0, i64 Fg, bool rotate, int m, i64 oh, i64 ow) {
  positive({Cg, F, Fg, oh, ow});
  if (f0 < 0 || f0 + Fg > F) throw py::value_error("winograd: bad filter range");
  check_tile(m);
  const WinogradTileKinds kinds = winograd_tile_kinds(m, oh, ow);
  const float* wp = in(w, "w", Cg * 9 * F);
  float* up = out(u, "U", kinds.total_elements() * Fg * Cg);
  py::gil_scoped_release release;
  if (m == 3) {
    filter_transform_m<3>(wp, up, Cg, F, f0, Fg, rotate, kinds);
  } else {
    filter_transform_m<2>(wp, up, Cg, F, f0, Fg, rotate, kinds);
  }
}

// t[3 ky + kx][f] = (G_MY^T D_f G_MX)[ky][kx] for f < count (at most kBlock), D_f[a][b] = rows[AX a + b][f]:
// each filter one lane.
template <int MY, int MX>
SIMD_CLONES void filter_grad_block(const float* const* rows, float (*__restrict__ t)[kBlock], i64 count) {
  using WY = WinogradMatrices<MY>;
  using WX = WinogradMatrices<MX>;
  constexpr int AY = WY::kAlpha, AX = WX::kAlpha;
  Lanes dv[AY * AX], col[AX * 3], r[9];
  load_rows<AY * AX>(rows, dv, count);
  for (int b = 0; b < AX; ++b) apply<true>(WY::G, dv + b, AX, col + b * 3, 1);  // col[b][ky] = (G^T D)[ky][b]
  for (int ky = 0; ky < 3; ++ky) apply<true>(WX::G, col + ky, 3, r + ky * 3, 1);
  for (int k = 0; k < 9; ++k) {
    for (i64 f = 0; f < kBlock; ++f) t[k][f] = r[k].v[f];
  }
}

// One kind's G^T D_q G for channel c and filters [fb, fb + count) into t.
template <int M>
void filter_grad_kind(const float* dq, int my, int mx, i64 Cg, i64 Fg, i64 c, i64 fb, i64 count,
                      float (*__restrict__ t)[kBlock]) {
  const float* rows[(M + 2) * (M + 2)];
  const i64 E = (my + 2) * (mx + 2);
  for (i64 e = 0; e < E; ++e) rows[e] = dq + (e * Cg + c) * Fg + fb;
  for_tile_kind<M>(my == 1, mx == 1, [&](auto y, auto x) {
    filter_grad_block<decltype(y)::value, decltype(x)::value>(rows, t, count);
  });
}

// dw = the sum over the kinds of tile q, in order, of G_q^T D_q G_q (one float add per kind after the first).
template <int M>
void filter_grad_transform_m(const float* dp, float* wp, i64 Cg, i64 F, i64 f0, i64 Fg,
                             const WinogradTileKinds& kinds) {
#pragma omp parallel for schedule(static) num_threads(loop_threads())
  for (i64 c = 0; c < Cg; ++c) {
    alignas(64) float t[9][kBlock], part[9][kBlock];
    for (i64 fb = 0; fb < Fg; fb += kBlock) {
      const i64 count = std::min(kBlock, Fg - fb);
      for (int q = 0; q < kinds.count; ++q) {
        const float* dq = dp + kinds.elements_before(q) * Cg * Fg;
        filter_grad_kind<M>(dq, kinds.my[q], kinds.mx[q], Cg, Fg, c, fb, count, q == 0 ? t : part);
        if (q > 0) {
          for (int k = 0; k < 9; ++k) {
            for (i64 f = 0; f < kBlock; ++f) t[k][f] += part[k][f];
          }
        }
      }
      store_rows<9>(t, wp + c * 9 * F + f0 + fb, F, count);
    }
  }
}

// dw[c, :, :, f0 + f] (dw is (Cg, 3, 3, F)) from D: per kind of tile of the oh x ow output (dy's) a block (E_q, Cg,
// Fg) (winograd_tile_kinds), dw = sum over q of G_q^T D_q G_q.
void filter_grad_transform(const Floats& d, Floats& dw, i64 Cg, i64 F, i64 f0, i64 Fg, int m, i64 oh, i64 ow) {
  positive({Cg, F, Fg, oh, ow});
  if (f0 < 0 || f0 + Fg > F) throw py::value_error("winograd: bad filter range");
  check_tile(m);
  const WinogradTileKinds kinds = winograd_tile_kinds(m, oh, ow);
  const float* dp = in(d, "D", kinds.total_elements() * Cg * Fg);
  float* wp = out(dw, "dw", Cg * 9 * F);
  py::gil_scoped_release release;
  if (m == 3) {
    filter_grad_transform_m<3>(dp, wp, Cg, F, f0, Fg, kinds);
  } else {
    filter_grad_transform_m<2>(dp, wp, Cg, F, f0, Fg, kinds);
  }
}

}  // namespace

void register_winograd(py::module_& m) {
  m.def("winograd_filter", &filter_transform, py::arg("w"), py::arg("U"), py::arg("Cg"), py::arg("F"), py::arg("f0"),
        py::arg("Fg"), py::arg("rotate"), py::arg("m"), py::arg("oh"), py::arg("ow"),
        "U = G g G^T, one block per kind of tile of an oh x ow output");
  m.def("winograd_filter_grad", &filter_grad_transform, py::arg("D"), py::arg("dw"), py::arg("Cg"), py::arg("F"),
        py::arg("f0"), py::arg("Fg"), py::arg("m"), py::arg("oh"), py::arg("ow"),
        "dw = the sum over the kinds of tile of G^T D G");
}

}  // namespace convnet_cpu
