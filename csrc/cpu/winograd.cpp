// convnet._cpu's Winograd F(2x2, 3x3) transforms for the cpu device's 3x3 stride-1 convolutions
// (src/convnet/cpu/winograd.py runs them around 16 GEMMs of this path's GEMM, csrc/cpu/gemm.cpp).
//
// Layouts (CHWN, images fastest): x (C, H, W, N); filters w (Cg, 3, 3, F); y (F, OH, OW, N). An output is cut into
// TH x TW tiles of 2x2 (TH = ceil(OH / 2)); tile (ty, tx) reads the 4x4 input patch whose top-left corner is
// (2ty - ph, 2tx - pw), zero outside the image. The transformed tensors are (16, channels, P) with P = TH * TW * nb
// columns q = (ty, tx, n) for a chunk of nb images, n fastest, and e = 4a + b the element (a, b) of a 4x4 tile:
//   V = B^T d B (input), U = G g G^T (filter, stored (16, Cg, Fg)), M_e = U_e.T @ V_e (the GEMMs),
//   y = A^T M A (output);
//   filter gradient: Z = A dY A^T (the 2x2 output-gradient tile, zero outside the output), D_e = V_e @ Z_e^T,
//   dw = G^T D G; data gradient: the forward on dy with the filters rotated by 180 degrees and transposed, padding
//   2 - p.
// B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1], G = [1 0 0; .5 .5 .5; .5 -.5 .5; 0 0 1], A^T = [1 1 1 0; 0 1 -1 -1].
//
// Deterministic: every transformed element is a fixed sequence of float additions and exact halvings (compiled with
// -ffp-contract=off, CMakeLists.txt: no fused multiply-add), rows first then columns, the same at any SIMD width
// (the vector loops run across images or filters, each lane one element's arithmetic) and any thread count (every
// output element is written by one thread; work is split over channels x tile rows). Blocks of 16 images (filters)
// go through a block-local buffer: the form GCC vectorises. Arguments are checked here again: a wrong call is a
// ValueError.
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

constexpr i64 kBlock = 16;  // images per block of the transforms: a tile's 16 values of 16 images stay local

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
inline void bt4(float d0, float d1, float d2, float d3, float* o) {  // B^T d
  o[0] = d0 - d2;
  o[1] = d1 + d2;
  o[2] = d2 - d1;
  o[3] = d1 - d3;
}
inline void g3(float g0, float g1, float g2, float* o) {  // G g
  o[0] = g0;
  o[1] = ((g0 + g1) + g2) * 0.5f;
  o[2] = ((g0 - g1) + g2) * 0.5f;
  o[3] = g2;
}
inline void at4(float m0, float m1, float m2, float m3, float* o) {  // A^T m
  o[0] = (m0 + m1) + m2;
  o[1] = (m1 - m2) - m3;
}
inline void a2(float y0, float y1, float* o) {  // A y
  o[0] = y0;
  o[1] = y0 + y1;
  o[2] = y0 - y1;
  o[3] = -y1;
}
inline void gt4(float d0, float d1, float d2, float d3, float* o) {  // G^T d
  o[0] = d0 + (d1 + d2) * 0.5f;
  o[1] = (d1 - d2) * 0.5f;
  o[2] = (d1 + d2) * 0.5f + d3;
}

// t[e][n] = (B^T d B)[e] of `count` images, d[i][j] = rows[4i + j][n].
// (The pointers are copied into a local array first: GCC then keeps them in registers and vectorises along n.)
SIMD_CLONES void input_block(const float* const* rows_in, float (*__restrict__ t)[kBlock], i64 count) {
  const float* rows[16];
  for (int k = 0; k < 16; ++k) rows[k] = rows_in[k];
  for (i64 n = 0; n < count; ++n) {
    float c[4][4], r[4][4];
    for (int j = 0; j < 4; ++j) bt4(rows[j][n], rows[4 + j][n], rows[8 + j][n], rows[12 + j][n], &c[0][0] + 4 * j);
    // c[j][a] = (B^T d)[a][j]; now along j for each a
    for (int a = 0; a < 4; ++a) bt4(c[0][a], c[1][a], c[2][a], c[3][a], r[a]);
    for (int a = 0; a < 4; ++a) {
      for (int b = 0; b < 4; ++b) t[4 * a + b][n] = r[a][b];
    }
  }
}

// t[k][n] (k = 2i + j) = (A^T m A)[i][j], m[a][b] = rows[4a + b][n].
SIMD_CLONES void output_block(const float* const* rows_in, float (*__restrict__ t)[kBlock], i64 count) {
  const float* rows[16];
  for (int k = 0; k < 16; ++k) rows[k] = rows_in[k];
  for (i64 n = 0; n < count; ++n) {
    float c[4][2], r[2][2];
    for (int b = 0; b < 4; ++b) at4(rows[b][n], rows[4 + b][n], rows[8 + b][n], rows[12 + b][n], c[b]);
    for (int i = 0; i < 2; ++i) at4(c[0][i], c[1][i], c[2][i], c[3][i], r[i]);
    for (int i = 0; i < 2; ++i) {
      for (int j = 0; j < 2; ++j) t[2 * i + j][n] = r[i][j];
    }
  }
}

// t[e][n] = (A dY A^T)[e], dY[i][j] = rows[2i + j][n].
SIMD_CLONES void grad_block(const float* const* rows, float (*t)[kBlock], i64 count) {
  for (i64 n = 0; n < count; ++n) {
    float c[2][4], r[4][4];
    for (int j = 0; j < 2; ++j) a2(rows[j][n], rows[2 + j][n], c[j]);
    for (int a = 0; a < 4; ++a) a2(c[0][a], c[1][a], r[a]);
    for (int a = 0; a < 4; ++a) {
      for (int b = 0; b < 4; ++b) t[4 * a + b][n] = r[a][b];
    }
  }
}

// The tile ranges along one axis: tile t reads input rows 2t - p + [0, 4).
inline bool inside(i64 i, i64 size) { return i >= 0 && i < size; }

// V (16, Cg, TH*TW*nb) = B^T d B of channels [c0, c0 + Cg) and images [n0, n0 + nb) of x (C, H, W, N), padding
// (ph, pw).
void input_transform(const Floats& x, Floats& v, i64 C, i64 H, i64 W, i64 N, i64 n0, i64 nb, i64 c0, i64 Cg, i64 ph,
                     i64 pw, i64 TH, i64 TW) {
  positive({C, H, W, N, nb, Cg, TH, TW});
  if (c0 < 0 || c0 + Cg > C || ph < 0 || pw < 0) throw py::value_error("winograd: bad channel range or padding");
  if (n0 < 0 || n0 + nb > N) throw py::value_error("winograd: bad image range");
  const float* xp = in(x, "x", C * H * W * N) + n0;
  const i64 P = TH * TW * nb;
  float* vp = out(v, "V", 16 * Cg * P);
  const std::vector<float> zeros(static_cast<std::size_t>(nb), 0.0f);
  py::gil_scoped_release release;
#pragma omp parallel for schedule(static) num_threads(loop_threads())
  for (i64 item = 0; item < Cg * TH; ++item) {
    const i64 c = item / TH, ty = item % TH;
    const float* plane = xp + (c0 + c) * H * W * N;
    alignas(64) float t[16][kBlock];
    const float* rows[16];
    for (i64 tx = 0; tx < TW; ++tx) {
      for (int i = 0; i < 4; ++i) {
        for (int j = 0; j < 4; ++j) {
          const i64 iy = 2 * ty - ph + i, ix = 2 * tx - pw + j;
          rows[4 * i + j] = inside(iy, H) && inside(ix, W) ? plane + (iy * W + ix) * N : zeros.data();
        }
      }
      float* dst = vp + c * P + (ty * TW + tx) * nb;
      for (i64 b = 0; b < nb; b += kBlock) {
        const i64 count = std::min(kBlock, nb - b);
        const float* shifted[16];
        for (int k = 0; k < 16; ++k) shifted[k] = rows[k] == zeros.data() ? rows[k] : rows[k] + b;
        input_block(shifted, t, count);
        for (int e = 0; e < 16; ++e) std::memcpy(dst + e * Cg * P + b, t[e], sizeof(float) * count);
      }
    }
  }
}

// y[f0 + f, oy, ox, n0 + n] (y is (F, OH, OW, N)) = A^T M A of M (16, Fg, TH*TW*nb), the outputs inside (OH, OW).
void output_transform(const Floats& m, Floats& y, i64 F, i64 OH, i64 OW, i64 N, i64 n0, i64 nb, i64 f0, i64 Fg, i64 TH,
                      i64 TW) {
  positive({F, OH, OW, N, nb, Fg, TH, TW});
  if (f0 < 0 || f0 + Fg > F || TH != (OH + 1) / 2 || TW != (OW + 1) / 2) {
    throw py::value_error("winograd: bad filter range or tiles");
  }
  if (n0 < 0 || n0 + nb > N) throw py::value_error("winograd: bad image range");
  const i64 P = TH * TW * nb;
  const float* mp = in(m, "M", 16 * Fg * P);
  float* yp = out(y, "y", F * OH * OW * N) + n0;
  py::gil_scoped_release release;
#pragma omp parallel for schedule(static) num_threads(loop_threads())
  for (i64 item = 0; item < Fg * TH; ++item) {
    const i64 f = item / TH, ty = item % TH;
    float* plane = yp + (f0 + f) * OH * OW * N;
    alignas(64) float t[4][kBlock];
    const float* rows[16];
    for (i64 tx = 0; tx < TW; ++tx) {
      for (i64 b = 0; b < nb; b += kBlock) {
        const i64 count = std::min(kBlock, nb - b);
        for (int e = 0; e < 16; ++e) rows[e] = mp + (e * Fg + f) * P + (ty * TW + tx) * nb + b;
        output_block(rows, t, count);
        for (int i = 0; i < 2; ++i) {
          for (int j = 0; j < 2; ++j) {
            const i64 oy = 2 * ty + i, ox = 2 * tx + j;
            if (oy < OH && ox < OW) std::memcpy(plane + (oy * OW + ox) * N + b, t[2 * i + j], sizeof(float) * count);
          }
        }
      }
    }
  }
}

// Z (16, Fg, TH*TW*nb) = A dY A^T of filters [f0, f0 + Fg) and images [n0, n0 + nb) of dy (F, OH, OW, N), zero
// outside (OH, OW).
void grad_transform(const Floats& dy, Floats& z, i64 F, i64 OH, i64 OW, i64 N, i64 n0, i64 nb, i64 f0, i64 Fg, i64 TH,
                    i64 TW) {
  positive({F, OH, OW, N, nb, Fg, TH, TW});
  if (f0 < 0 || f0 + Fg > F || TH != (OH + 1) / 2 || TW != (OW + 1) / 2) {
    throw py::value_error("winograd: bad filter range or tiles");
  }
  if (n0 < 0 || n0 + nb > N) throw py::value_error("winograd: bad image range");
  const i64 P = TH * TW * nb;
  const float* gp = in(dy, "dy", F * OH * OW * N) + n0;
  float* zp = out(z, "Z", 16 * Fg * P);
  const std::vector<float> zeros(static_cast<std::size_t>(nb), 0.0f);
  py::gil_scoped_release release;
#pragma omp parallel for schedule(static) num_threads(loop_threads())
  for (i64 item = 0; item < Fg * TH; ++item) {
    const i64 f = item / TH, ty = item % TH;
    const float* plane = gp + (f0 + f) * OH * OW * N;
    alignas(64) float t[16][kBlock];
    const float* rows[4];
    for (i64 tx = 0; tx < TW; ++tx) {
      for (int i = 0; i < 2; ++i) {
        for (int j = 0; j < 2; ++j) {
          const i64 oy = 2 * ty + i, ox = 2 * tx + j;
          rows[2 * i + j] = oy < OH && ox < OW ? plane + (oy * OW + ox) * N : zeros.data();
        }
      }
      float* dst = zp + f * P + (ty * TW + tx) * nb;
      for (i64 b = 0; b < nb; b += kBlock) {
        const i64 count = std::min(kBlock, nb - b);
        const float* shifted[4];
        for (int k = 0; k < 4; ++k) shifted[k] = rows[k] == zeros.data() ? rows[k] : rows[k] + b;
        grad_block(shifted, t, count);
        for (int e = 0; e < 16; ++e) std::memcpy(dst + e * Fg * P + b, t[e], sizeof(float) * count);
      }
    }
  }
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
  m.def("winograd_input", &input_transform, py::arg("x"), py::arg("V"), py::arg("C"), py::arg("H"), py::arg("W"),
        py::arg("N"), py::arg("n0"), py::arg("nb"), py::arg("c0"), py::arg("Cg"), py::arg("ph"), py::arg("pw"),
        py::arg("TH"), py::arg("TW"),
        "V = B^T d B over 2x2-output tiles (Winograd F(2x2, 3x3))");
  m.def("winograd_output", &output_transform, py::arg("M"), py::arg("y"), py::arg("F"), py::arg("OH"), py::arg("OW"),
        py::arg("N"), py::arg("n0"), py::arg("nb"), py::arg("f0"), py::arg("Fg"), py::arg("TH"), py::arg("TW"),
        "y = A^T M A");
  m.def("winograd_grad", &grad_transform, py::arg("dy"), py::arg("Z"), py::arg("F"), py::arg("OH"), py::arg("OW"),
        py::arg("N"), py::arg("n0"), py::arg("nb"), py::arg("f0"), py::arg("Fg"), py::arg("TH"), py::arg("TW"),
        "Z = A dY A^T");
  m.def("winograd_filter", &filter_transform, py::arg("w"), py::arg("U"), py::arg("Cg"), py::arg("F"), py::arg("f0"),
        py::arg("Fg"), py::arg("rotate"), "U = G g G^T");
  m.def("winograd_filter_grad", &filter_grad_transform, py::arg("D"), py::arg("dw"), py::arg("Cg"), py::arg("F"),
        py::arg("f0"), py::arg("Fg"), "dw = G^T D G");
}

}  // namespace convnet_cpu
