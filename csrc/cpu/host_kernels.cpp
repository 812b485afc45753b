// convnet._cpu: the host loops of the fast CPU path (the `cpu` device, src/convnet/cpu/*.py), float32, CHWN.
//
// The cpu device computes convolutions and fully-connected layers as NumPy BLAS GEMMs; what is left between the
// GEMMs -- im2col/col2im, max pooling, ReLU -- is memory-bound and, written in NumPy, costs as much as the GEMMs
// (strided temporaries, NumPy's slow masked `where`, one thread). Here each is one pass over memory, parallel
// over channels with OpenMP on set_threads(n) threads (default 1; the trainer sets its --threads, like the BLAS
// threads), with the GIL released so the loader thread keeps running.
//
// Layouts (docs/architecture.md): images x (C, H, W, N), N fastest, so every inner loop is a contiguous run of N
// (or nb) floats. Each function computes exactly what its NumPy reference computes (convnet/reference/*.py);
// tests/test_cpu.py and every op test on the cpu device check that. Not CUDA, not the emulator: plain C++.
//
// Arguments are checked here again (sizes against the geometry, writeable outputs) so that a wrong call from
// Python is a ValueError, never an out-of-bounds write.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#define CONVNET_PHILOX_HOST_ONLY 1
#include "kernels/philox.h"  // the kernels' Philox4x32-10: the same dropout masks as numpy, emu and cuda

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

namespace py = pybind11;
using Floats = py::array_t<float, py::array::c_style>;  // no forcecast: a float64 or strided array is a TypeError
using i64 = std::int64_t;

namespace {

int g_threads = 1;  // OpenMP threads of every loop (set_threads); 1 = no thread is started

const float* in(const Floats& a, const char* name, i64 size) {
  if (a.size() != size) {
    throw py::value_error(std::string(name) + ": " + std::to_string(a.size()) + " elements, expected " +
                          std::to_string(size));
  }
  return a.data();
}

float* out(Floats& a, const char* name, i64 size) {
  in(a, name, size);
  if (!a.writeable()) throw py::value_error(std::string(name) + " is read-only");
  return a.mutable_data();
}

void positive(std::initializer_list<i64> values) {
  for (i64 v : values) {
    if (v <= 0) throw py::value_error("sizes, strides and window must be positive");
  }
}

// cols[(c, ky, kx), (oy, ox, n)] = x[c0 + c, oy*sh - ph + ky, ox*sw - pw + kx, n0 + n] (0 outside the image), for
// c < Cg and n < nb: the im2col matrix of channels [c0, c0 + Cg) and images [n0, n0 + nb) of x (C, H, W, N).
void im2col(const Floats& x, Floats& cols, i64 C, i64 H, i64 W, i64 N, i64 c0, i64 Cg, i64 n0, i64 nb, i64 KH, i64 KW,
            i64 sh, i64 sw, i64 ph, i64 pw, i64 OH, i64 OW) {
  positive({C, H, W, N, Cg, nb, KH, KW, sh, sw, OH, OW});
  if (c0 < 0 || c0 + Cg > C || n0 < 0 || n0 + nb > N || ph < 0 || pw < 0) throw py::value_error("im2col: bad range");
  const float* xp = in(x, "x", C * H * W * N);
  float* cp = out(cols, "cols", Cg * KH * KW * OH * OW * nb);
  py::gil_scoped_release release;
#pragma omp parallel for schedule(static) num_threads(g_threads)
  for (i64 r = 0; r < Cg * KH * KW; ++r) {
    const i64 c = r / (KH * KW), ky = r / KW % KH, kx = r % KW;
    float* dst = cp + r * OH * OW * nb;
    for (i64 oy = 0; oy < OH; ++oy) {
      const i64 iy = oy * sh - ph + ky;
      for (i64 ox = 0; ox < OW; ++ox, dst += nb) {
        const i64 ix = ox * sw - pw + kx;
        if (iy < 0 || iy >= H || ix < 0 || ix >= W) {
          std::memset(dst, 0, sizeof(float) * nb);
        } else {
          std::memcpy(dst, xp + (((c0 + c) * H + iy) * W + ix) * N + n0, sizeof(float) * nb);
        }
      }
    }
  }
}

// The adjoint of im2col: dx[c0 + c, iy, ix, n0 + n] = the sum of the cols entries im2col would have read from there
// (every other element of dx is left alone). Parallel over channels: each thread owns its channels' rows of dx.
void col2im(const Floats& cols, Floats& dx, i64 C, i64 H, i64 W, i64 N, i64 c0, i64 Cg, i64 n0, i64 nb, i64 KH, i64 KW,
            i64 sh, i64 sw, i64 ph, i64 pw, i64 OH, i64 OW) {
  positive({C, H, W, N, Cg, nb, KH, KW, sh, sw, OH, OW});
  if (c0 < 0 || c0 + Cg > C || n0 < 0 || n0 + nb > N || ph < 0 || pw < 0) throw py::value_error("col2im: bad range");
  const float* cp = in(cols, "cols", Cg * KH * KW * OH * OW * nb);
  float* dp = out(dx, "dx", C * H * W * N);
  py::gil_scoped_release release;
#pragma omp parallel for schedule(static) num_threads(g_threads)
  for (i64 c = 0; c < Cg; ++c) {
    float* plane = dp + (c0 + c) * H * W * N;
    for (i64 p = 0; p < H * W; ++p) std::memset(plane + p * N + n0, 0, sizeof(float) * nb);
    for (i64 ky = 0; ky < KH; ++ky) {
      for (i64 kx = 0; kx < KW; ++kx) {
        const float* src = cp + ((c * KH + ky) * KW + kx) * OH * OW * nb;
        for (i64 oy = 0; oy < OH; ++oy) {
          const i64 iy = oy * sh - ph + ky;
          for (i64 ox = 0; ox < OW; ++ox, src += nb) {
            const i64 ix = ox * sw - pw + kx;
            if (iy < 0 || iy >= H || ix < 0 || ix >= W) continue;
            float* d = plane + (iy * W + ix) * N + n0;
            for (i64 n = 0; n < nb; ++n) d[n] += src[n];
          }
        }
      }
    }
  }
}

// Max pooling without padding (the reference handles padded pools): y[c, oy, ox, n] = max over the window.
// A NaN in a window makes its maximum NaN, as NumPy's maximum does.
void maxpool_forward(const Floats& x, Floats& y, i64 C, i64 H, i64 W, i64 N, i64 KH, i64 KW, i64 sh, i64 sw, i64 OH,
                     i64 OW) {
  positive({C, H, W, N, KH, KW, sh, sw, OH, OW});
  if ((OH - 1) * sh + KH > H || (OW - 1) * sw + KW > W) throw py::value_error("maxpool: window outside the image");
  const float* xp = in(x, "x", C * H * W * N);
  float* yp = out(y, "y", C * OH * OW * N);
  py::gil_scoped_release release;
#pragma omp parallel for schedule(static) num_threads(g_threads)
  for (i64 c = 0; c < C; ++c) {
    for (i64 oy = 0; oy < OH; ++oy) {
      for (i64 ox = 0; ox < OW; ++ox) {
        float* d = yp + ((c * OH + oy) * OW + ox) * N;
        const float* first = xp + ((c * H + oy * sh) * W + ox * sw) * N;
        std::memcpy(d, first, sizeof(float) * N);
        for (i64 ky = 0; ky < KH; ++ky) {
          for (i64 kx = 0; kx < KW; ++kx) {
            const float* s = xp + ((c * H + oy * sh + ky) * W + ox * sw + kx) * N;
            for (i64 n = 0; n < N; ++n) {
              const float a = d[n], b = s[n];
              d[n] = (a != a || a >= b) ? a : b;  // NaN stays; otherwise the larger (NumPy maximum)
            }
          }
        }
      }
    }
  }
}

// dx = for every window and every input equal to the window's maximum, the window's dy (cuda-convnet's tie rule,
// the reference's: no argmax is stored, ties all receive it). No padding.
void maxpool_backward(const Floats& x, const Floats& y, const Floats& dy, Floats& dx, i64 C, i64 H, i64 W, i64 N,
                      i64 KH, i64 KW, i64 sh, i64 sw, i64 OH, i64 OW) {
  positive({C, H, W, N, KH, KW, sh, sw, OH, OW});
  if ((OH - 1) * sh + KH > H || (OW - 1) * sw + KW > W) throw py::value_error("maxpool: window outside the image");
  const float* xp = in(x, "x", C * H * W * N);
  const float* yp = in(y, "y", C * OH * OW * N);
  const float* gp = in(dy, "dy", C * OH * OW * N);
  float* dp = out(dx, "dx", C * H * W * N);
  py::gil_scoped_release release;
#pragma omp parallel for schedule(static) num_threads(g_threads)
  for (i64 c = 0; c < C; ++c) {
    std::memset(dp + c * H * W * N, 0, sizeof(float) * H * W * N);
    for (i64 oy = 0; oy < OH; ++oy) {
      for (i64 ox = 0; ox < OW; ++ox) {
        const i64 o = ((c * OH + oy) * OW + ox) * N;
        for (i64 ky = 0; ky < KH; ++ky) {
          for (i64 kx = 0; kx < KW; ++kx) {
            float* __restrict__ d = dp + ((c * H + oy * sh + ky) * W + ox * sw + kx) * N;
            const float* __restrict__ xs = xp + ((c * H + oy * sh + ky) * W + ox * sw + kx) * N;
            const float* __restrict__ ys = yp + o;
            const float* __restrict__ gs = gp + o;
            for (i64 n = 0; n < N; ++n) {
              const float g = gs[n];  // loaded unconditionally: the select vectorises instead of branching
              d[n] += xs[n] == ys[n] ? g : 0.0f;
            }
          }
        }
      }
    }
  }
}

// y = x > 0 ? x : +0 (NaN -> 0, -0 -> +0, as the reference); y may be x.
void relu_forward(const Floats& x, Floats& y) {
  const i64 n = x.size();
  const float* xp = in(x, "x", n);
  float* yp = out(y, "y", n);
  py::gil_scoped_release release;
#pragma omp parallel for schedule(static) num_threads(g_threads)
  for (i64 i = 0; i < n; ++i) yp[i] = xp[i] > 0.0f ? xp[i] : 0.0f;
}

// dx = y > 0 ? dy : +0; dx may be dy.
void relu_backward(const Floats& y, const Floats& dy, Floats& dx) {
  const i64 n = y.size();
  const float* yp = in(y, "y", n);
  const float* gp = in(dy, "dy", n);
  float* dp = out(dx, "dx", n);
  py::gil_scoped_release release;
#pragma omp parallel for schedule(static) num_threads(g_threads)
  for (i64 i = 0; i < n; ++i) {
    const float g = gp[i];  // loaded unconditionally: the select vectorises instead of branching
    dp[i] = yp[i] > 0.0f ? g : 0.0f;
  }
}

// Inverted dropout: y[i] = x[i] * scale where stream element start + i is kept, else +0. Stream element j is word
// j % 4 of philox((j / 4 as two words, offset as two words), seed as two words), kept iff word < threshold
// (convnet/reference/elementwise.py dropout_mask). y may be x.
void dropout_apply(const Floats& x, Floats& y, std::uint64_t threshold, float scale, std::uint64_t seed,
                   std::uint64_t offset, std::uint64_t start) {
  const i64 n = x.size();
  const float* xp = in(x, "x", n);
  float* yp = out(y, "y", n);
  if (n > 0 && start + std::uint64_t(n) - 1 < start) throw py::value_error("dropout: start + n overflows 64 bits");
  py::gil_scoped_release release;
  const std::uint64_t first = start / 4, last = (start + n + 3) / 4;  // the philox groups covering the elements
#pragma omp parallel for schedule(static) num_threads(g_threads)
  for (i64 gi = 0; gi < i64(last - first); ++gi) {
    const std::uint64_t g = first + gi;
    const convnet::Philox4 r = convnet::philox4x32_10(unsigned(g), unsigned(g >> 32), unsigned(offset),
                                                      unsigned(offset >> 32), unsigned(seed), unsigned(seed >> 32));
    const unsigned words[4] = {r.x, r.y, r.z, r.w};
    for (int k = 0; k < 4; ++k) {
      const std::uint64_t j = g * 4 + k;  // stream element; local element j - start
      if (j < start || j >= start + std::uint64_t(n)) continue;
      const i64 i = i64(j - start);
      const float v = xp[i];
      yp[i] = std::uint64_t(words[k]) < threshold ? v * scale : 0.0f;
    }
  }
}

}  // namespace

PYBIND11_MODULE(_cpu, m) {
  m.doc() = "convnet's fast CPU path: the host loops around the BLAS GEMMs (float32, CHWN); see convnet/cpu/";
  m.def("set_threads", [](int n) {
    if (n < 1) throw py::value_error("threads must be >= 1");
    g_threads = n;
  }, py::arg("n"), "Threads of every loop (OpenMP), like the BLAS threads");
  m.def("get_threads", [] { return g_threads; });
  m.def("im2col", &im2col, py::arg("x"), py::arg("cols"), py::arg("C"), py::arg("H"), py::arg("W"), py::arg("N"),
        py::arg("c0"), py::arg("Cg"), py::arg("n0"), py::arg("nb"), py::arg("KH"), py::arg("KW"), py::arg("sh"),
        py::arg("sw"), py::arg("ph"), py::arg("pw"), py::arg("OH"), py::arg("OW"));
  m.def("col2im", &col2im, py::arg("cols"), py::arg("dx"), py::arg("C"), py::arg("H"), py::arg("W"), py::arg("N"),
        py::arg("c0"), py::arg("Cg"), py::arg("n0"), py::arg("nb"), py::arg("KH"), py::arg("KW"), py::arg("sh"),
        py::arg("sw"), py::arg("ph"), py::arg("pw"), py::arg("OH"), py::arg("OW"));
  m.def("maxpool_forward", &maxpool_forward);
  m.def("maxpool_backward", &maxpool_backward);
  m.def("relu_forward", &relu_forward);
  m.def("relu_backward", &relu_backward);
  m.def("dropout_apply", &dropout_apply, py::arg("x"), py::arg("y"), py::arg("threshold"), py::arg("scale"),
        py::arg("seed"), py::arg("offset"), py::arg("start"));
}
