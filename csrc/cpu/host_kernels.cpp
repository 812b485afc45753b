// convnet._cpu: the host loops of the fast CPU path (the `cpu` device, src/convnet/cpu/*.py), float32, CHWN.
//
// The cpu device computes convolutions and fully-connected layers as GEMMs (its own: csrc/cpu/gemm.cpp, registered
// here too); what is left between the GEMMs -- col2im (and im2col where NumPy's BLAS multiplies), max pooling, ReLU,
// dropout, the bias add and sum, the SGD update -- is memory-bound and, written in NumPy, costs as much as the GEMMs
// (strided temporaries, NumPy's slow masked `where`, one thread). Here each is one pass over memory, parallel over
// channels with OpenMP on set_threads(n) threads (default 1; the trainer sets its --threads, like the BLAS threads),
// with the GIL released so the loader thread keeps running.
//
// Layouts (docs/architecture.md): images x (C, H, W, N), N fastest, so every inner loop is a contiguous run of N
// (or nb) floats. Each function computes exactly what its NumPy reference computes (convnet/reference/*.py);
// tests/test_cpu.py and every op test on the cpu device check that. Not CUDA, not the emulator: plain C++.
//
// Arguments are checked here again (sizes against the geometry, writeable outputs) so that a wrong call from
// Python is a ValueError, never an out-of-bounds write.
//
// The per-element work of each loop is a leaf function compiled three times -- baseline x86-64 (SSE2), AVX2 and
// AVX-512 -- and picked once at load time for the CPU it runs on (SIMD_CLONES): max pooling and dropout's Philox are
// compute-bound at SSE2 width. The OpenMP loops call the leaves (a clone never holds a parallel region). Built with
// -ffp-contract=off (CMakeLists.txt): no fused multiply-add, so every width rounds as NumPy does (sgd_update is the
// reference's arithmetic bit for bit).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#define CONVNET_PHILOX_HOST_ONLY 1
#include "kernels/philox.h"  // the kernels' Philox4x32-10: the same dropout masks as numpy, emu and cuda

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

// GCC 12+ knows the x86-64-v4 level in target_clones; other compilers build the one portable version.
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#define SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define SIMD_CLONES
#endif

namespace py = pybind11;
using Floats = py::array_t<float, py::array::c_style>;  // no forcecast: a float64 or strided array is a TypeError
using i64 = std::int64_t;

namespace {

int g_threads = 1;  // OpenMP threads of every loop (set_threads); 1 = no thread is started

// Elements of work below which a loop does not take another thread: waking a sleeping OpenMP thread
// (OMP_WAIT_POLICY=PASSIVE) and meeting it at the region's end costs tens of microseconds -- on a machine whose other
// core is busy, up to a scheduler time slice -- about what a thread spends on 128 KB of floats. A loop of fewer than
// two such parts runs on the calling thread alone (no thread is woken). Every loop's work items compute independent
// outputs in a fixed order, so how many threads take them never changes a result bit.
constexpr i64 kMinWorkPerThread = 32 * 1024;

// The threads for a loop over `elements` elements: at most g_threads, at least 1, one per kMinWorkPerThread.
inline int threads_for(i64 elements) {
  return static_cast<int>(std::max<i64>(1, std::min<i64>(g_threads, elements / kMinWorkPerThread)));
}

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

using Bytes = py::array_t<std::uint8_t, py::array::c_style>;

// A dropout mask: exactly a C-contiguous uint8 array of `size` elements (never a converted copy: it may be written).
Bytes mask_or_throw(const py::object& a, i64 size) {
  if (!py::isinstance<Bytes>(a)) throw py::type_error("mask must be a C-contiguous uint8 NumPy array");
  auto mask = py::reinterpret_borrow<Bytes>(a);
  if (mask.size() != size) {
    throw py::value_error("mask: " + std::to_string(mask.size()) + " elements, expected " + std::to_string(size));
  }
  return mask;
}

void positive(std::initializer_list<i64> values) {
  for (i64 v : values) {
    if (v <= 0) throw py::value_error("sizes, strides and window must be positive");
  }
}

// The outputs [first, last) along one axis whose input o*s - p + k lies inside [0, size) (maybe empty).
inline void inside(i64 k, i64 s, i64 p, i64 size, i64 count, i64& first, i64& last) {
  first = std::min(count, p > k ? (p - k + s - 1) / s : 0);
  last = std::max(first, std::min(count, p - k + size - 1 >= 0 ? (p - k + size - 1) / s + 1 : 0));
}

SIMD_CLONES void add_into(float* __restrict__ d, const float* __restrict__ s, i64 n) {
  for (i64 i = 0; i < n; ++i) d[i] += s[i];
}

// cols[(c, ky, kx), (oy, ox, n)] = x[c0 + c, oy*sh - ph + ky, ox*sw - pw + kx, n0 + n] (0 outside the image), for
// c < Cg and n < nb: the im2col matrix of channels [c0, c0 + Cg) and images [n0, n0 + nb) of x (C, H, W, N). With
// stride 1 along W and the whole batch, a row's inputs are one contiguous run of x: one copy per (row, oy).
void im2col(const Floats& x, Floats& cols, i64 C, i64 H, i64 W, i64 N, i64 c0, i64 Cg, i64 n0, i64 nb, i64 KH, i64 KW,
            i64 sh, i64 sw, i64 ph, i64 pw, i64 OH, i64 OW) {
  positive({C, H, W, N, Cg, nb, KH, KW, sh, sw, OH, OW});
  if (c0 < 0 || c0 + Cg > C || n0 < 0 || n0 + nb > N || ph < 0 || pw < 0) throw py::value_error("im2col: bad range");
  const float* xp = in(x, "x", C * H * W * N);
  float* cp = out(cols, "cols", Cg * KH * KW * OH * OW * nb);
  py::gil_scoped_release release;
  const bool runs = sw == 1 && nb == N;
#pragma omp parallel for schedule(static) num_threads(threads_for(Cg * KH * KW * OH * OW * nb))
  for (i64 r = 0; r < Cg * KH * KW; ++r) {
    const i64 c = r / (KH * KW), ky = r / KW % KH, kx = r % KW;
    i64 ox0, ox1;  // the outputs whose input column is inside the image
    inside(kx, sw, pw, W, OW, ox0, ox1);
    for (i64 oy = 0; oy < OH; ++oy) {
      float* dst = cp + (r * OH + oy) * OW * nb;
      const i64 iy = oy * sh - ph + ky;
      if (iy < 0 || iy >= H || ox0 == ox1) {
        std::memset(dst, 0, sizeof(float) * OW * nb);
        continue;
      }
      std::memset(dst, 0, sizeof(float) * ox0 * nb);
      const float* row = xp + ((c0 + c) * H + iy) * W * N + n0;  // x[c0 + c, iy, 0, n0]
      if (runs) {
        std::memcpy(dst + ox0 * nb, row + (ox0 - pw + kx) * N, sizeof(float) * (ox1 - ox0) * nb);
      } else {
        for (i64 ox = ox0; ox < ox1; ++ox) {
          std::memcpy(dst + ox * nb, row + (ox * sw - pw + kx) * N, sizeof(float) * nb);
        }
      }
      std::memset(dst + ox1 * nb, 0, sizeof(float) * (OW - ox1) * nb);
    }
  }
}

// The adjoint of im2col: dx[c0 + c, iy, ix, n0 + n] = the sum of the cols entries im2col would have read from there
// (every other element of dx is left alone), added in the order (ky, kx, oy, ox). Parallel over channels: each thread
// owns its channels' rows of dx. With stride 1 along W and the whole batch, one run per (row, oy), as in im2col.
void col2im(const Floats& cols, Floats& dx, i64 C, i64 H, i64 W, i64 N, i64 c0, i64 Cg, i64 n0, i64 nb, i64 KH, i64 KW,
            i64 sh, i64 sw, i64 ph, i64 pw, i64 OH, i64 OW) {
  positive({C, H, W, N, Cg, nb, KH, KW, sh, sw, OH, OW});
  if (c0 < 0 || c0 + Cg > C || n0 < 0 || n0 + nb > N || ph < 0 || pw < 0) throw py::value_error("col2im: bad range");
  const float* cp = in(cols, "cols", Cg * KH * KW * OH * OW * nb);
  float* dp = out(dx, "dx", C * H * W * N);
  py::gil_scoped_release release;
  const bool runs = sw == 1 && nb == N;
#pragma omp parallel for schedule(static) num_threads(threads_for(Cg * KH * KW * OH * OW * nb))
  for (i64 c = 0; c < Cg; ++c) {
    float* plane = dp + (c0 + c) * H * W * N;
    if (nb == N) {
      std::memset(plane, 0, sizeof(float) * H * W * N);
    } else {
      for (i64 p = 0; p < H * W; ++p) std::memset(plane + p * N + n0, 0, sizeof(float) * nb);
    }
    for (i64 ky = 0; ky < KH; ++ky) {
      for (i64 kx = 0; kx < KW; ++kx) {
        i64 ox0, ox1;
        inside(kx, sw, pw, W, OW, ox0, ox1);
        for (i64 oy = 0; oy < OH; ++oy) {
          const i64 iy = oy * sh - ph + ky;
          if (iy < 0 || iy >= H || ox0 == ox1) continue;
          const float* src = cp + ((((c * KH + ky) * KW + kx) * OH + oy) * OW) * nb;
          float* row = plane + iy * W * N + n0;  // dx[c0 + c, iy, 0, n0]
          if (runs) {
            add_into(row + (ox0 - pw + kx) * N, src + ox0 * nb, (ox1 - ox0) * nb);
          } else {
            for (i64 ox = ox0; ox < ox1; ++ox) add_into(row + (ox * sw - pw + kx) * N, src + ox * nb, nb);
          }
        }
      }
    }
  }
}

// Runs fn(i0, i1) over [0, n) cut into chunks of `chunk` elements, the chunks shared out by OpenMP: the element-wise
// loops below, whose leaves are SIMD clones.
template <class Fn>
void parallel_chunks(i64 n, i64 chunk, Fn fn) {
  const i64 chunks = (n + chunk - 1) / chunk;
#pragma omp parallel for schedule(static) num_threads(threads_for(n))
  for (i64 k = 0; k < chunks; ++k) fn(k * chunk, std::min(n, (k + 1) * chunk));
}

constexpr i64 kChunk = 16384;  // elements per OpenMP work item of the element-wise loops (64 KB of floats)

// Images per block of the pooling loops: a block's running values stay in vector registers across the window
// instead of going through memory, and its inner loops have a trip count the compiler knows (no peeling).
constexpr i64 kPoolBlock = 32;

// The window max of B images (B = kPoolBlock; 0: nb images, the last block) of one output: `first` points at the
// window's top-left input, the window's rows are row_stride floats apart, its columns N.
template <i64 B>
inline void window_max(const float* __restrict__ first, float* __restrict__ d, i64 nb, i64 KH, i64 KW, i64 row_stride,
                       i64 N) {
  const i64 count = B > 0 ? B : nb;
  float m[B > 0 ? B : kPoolBlock];
  for (i64 n = 0; n < count; ++n) m[n] = first[n];
  for (i64 ky = 0; ky < KH; ++ky) {
    for (i64 kx = ky == 0 ? 1 : 0; kx < KW; ++kx) {
      const float* __restrict__ s = first + ky * row_stride + kx * N;
      for (i64 n = 0; n < count; ++n) {
        const float a = m[n], b = s[n];
        m[n] = (a != a || a >= b) ? a : b;  // NaN stays; otherwise the larger (NumPy maximum)
      }
    }
  }
  for (i64 n = 0; n < count; ++n) d[n] = m[n];
}

// One channel of max pooling: y[oy, ox, n] = the max of x over the window (x is (H, W, N), y is (OH, OW, N)). A NaN
// in a window makes its maximum NaN, as NumPy's maximum does.
SIMD_CLONES void maxpool_forward_plane(const float* __restrict__ x, float* __restrict__ y, i64 W, i64 N, i64 KH,
                                       i64 KW, i64 sh, i64 sw, i64 OH, i64 OW) {
  for (i64 oy = 0; oy < OH; ++oy) {
    for (i64 ox = 0; ox < OW; ++ox) {
      float* d = y + (oy * OW + ox) * N;
      const float* first = x + (oy * sh * W + ox * sw) * N;
      i64 n0 = 0;
      for (; n0 + kPoolBlock <= N; n0 += kPoolBlock) window_max<kPoolBlock>(first + n0, d + n0, 0, KH, KW, W * N, N);
      if (n0 < N) window_max<0>(first + n0, d + n0, N - n0, KH, KW, W * N, N);
    }
  }
}

// Max pooling without padding (the reference handles padded pools), parallel over channels.
void maxpool_forward(const Floats& x, Floats& y, i64 C, i64 H, i64 W, i64 N, i64 KH, i64 KW, i64 sh, i64 sw, i64 OH,
                     i64 OW) {
  positive({C, H, W, N, KH, KW, sh, sw, OH, OW});
  if ((OH - 1) * sh + KH > H || (OW - 1) * sw + KW > W) throw py::value_error("maxpool: window outside the image");
  const float* xp = in(x, "x", C * H * W * N);
  float* yp = out(y, "y", C * OH * OW * N);
  py::gil_scoped_release release;
#pragma omp parallel for schedule(static) num_threads(threads_for(C * H * W * N))
  for (i64 c = 0; c < C; ++c) {
    maxpool_forward_plane(xp + c * H * W * N, yp + c * OH * OW * N, W, N, KH, KW, sh, sw, OH, OW);
  }
}

// The windows [first, last] along one axis that contain input position i (window o covers [o*s, o*s + k)); empty
// (first > last) for a position no window reaches.
inline void windows_of(i64 i, i64 k, i64 s, i64 count, i64& first, i64& last) {
  first = i < k ? 0 : (i - k) / s + 1;
  last = std::min(count - 1, i / s);
}

// The gradient of B images (B = kPoolBlock; 0: nb images, the last block) of one input: the sum over the
// windows [oy0, oy1] x [ox0, ox1] that contain it of their dy where the input equals the window's max, added in the
// order windows by row, then column (the order a scatter over the windows adds them in). ReluInput: x is a ReLU's
// output and the sum is kept only where x > 0 (else +0): relu_backward(x, sum)'s select, so the ReLU's backward pass
// is done here, with its bits.
template <i64 B, bool ReluInput>
inline void window_grad(const float* __restrict__ xs, const float* __restrict__ y, const float* __restrict__ dy,
                        float* __restrict__ d, i64 nb, i64 oy0, i64 oy1, i64 ox0, i64 ox1, i64 OW, i64 N) {
  const i64 count = B > 0 ? B : nb;
  float acc[B > 0 ? B : kPoolBlock];
  for (i64 n = 0; n < count; ++n) acc[n] = 0.0f;
  for (i64 oy = oy0; oy <= oy1; ++oy) {
    for (i64 ox = ox0; ox <= ox1; ++ox) {
      const float* __restrict__ ys = y + (oy * OW + ox) * N;
      const float* __restrict__ gs = dy + (oy * OW + ox) * N;
      for (i64 n = 0; n < count; ++n) {
        const float g = gs[n];  // loaded unconditionally: the select vectorises instead of branching
        acc[n] += xs[n] == ys[n] ? g : 0.0f;
      }
    }
  }
  for (i64 n = 0; n < count; ++n) d[n] = ReluInput ? (xs[n] > 0.0f ? acc[n] : 0.0f) : acc[n];
}

// window_grad for an input that NY x NX windows contain (1 or 2 along each axis, as in any pool whose window is at
// most twice its stride: the overlapping 3x3/2), all N images in one loop with the windows unrolled inside it, so
// each image's sum stays in a register (window_grad's blocks keep theirs in memory across its runtime window loops).
// The same additions in the same order: the same bits.
template <int NY, int NX, bool ReluInput>
inline void window_grad_few(const float* __restrict__ xs, const float* __restrict__ y, const float* __restrict__ dy,
                            float* __restrict__ d, i64 oy0, i64 ox0, i64 OW, i64 N) {
  const float* __restrict__ ys[NY * NX];
  const float* __restrict__ gs[NY * NX];
  for (int a = 0; a < NY; ++a) {
    for (int b = 0; b < NX; ++b) {
      ys[a * NX + b] = y + ((oy0 + a) * OW + ox0 + b) * N;
      gs[a * NX + b] = dy + ((oy0 + a) * OW + ox0 + b) * N;
    }
  }
#pragma omp simd
  for (i64 n = 0; n < N; ++n) {
    float acc = 0.0f;
#pragma GCC unroll 4
    for (int w = 0; w < NY * NX; ++w) {
      const float g = gs[w][n];  // loaded unconditionally: the select vectorises instead of branching
      acc += xs[n] == ys[w][n] ? g : 0.0f;
    }
    d[n] = ReluInput ? (xs[n] > 0.0f ? acc : 0.0f) : acc;
  }
}

// window_grad_few for ny x nx windows where it has a form (true), else false (window_grad's general loops then).
template <bool ReluInput>
inline bool window_grad_fixed(const float* xs, const float* y, const float* dy, float* d, i64 ny, i64 nx, i64 oy0,
                              i64 ox0, i64 OW, i64 N) {
  if (ny < 1 || ny > 2 || nx < 1 || nx > 2) return false;
  if (ny == 1) {
    if (nx == 1) {
      window_grad_few<1, 1, ReluInput>(xs, y, dy, d, oy0, ox0, OW, N);
    } else {
      window_grad_few<1, 2, ReluInput>(xs, y, dy, d, oy0, ox0, OW, N);
    }
  } else if (nx == 1) {
    window_grad_few<2, 1, ReluInput>(xs, y, dy, d, oy0, ox0, OW, N);
  } else {
    window_grad_few<2, 2, ReluInput>(xs, y, dy, d, oy0, ox0, OW, N);
  }
  return true;
}

// One channel of the max-pooling gradient, gathered: each dx element is written once (window_grad).
SIMD_CLONES void maxpool_backward_plane(const float* __restrict__ x, const float* __restrict__ y,
                                        const float* __restrict__ dy, float* __restrict__ dx, i64 H, i64 W, i64 N,
                                        i64 KH, i64 KW, i64 sh, i64 sw, i64 OH, i64 OW, bool relu_input) {
  for (i64 iy = 0; iy < H; ++iy) {
    i64 oy0, oy1;
    windows_of(iy, KH, sh, OH, oy0, oy1);
    for (i64 ix = 0; ix < W; ++ix) {
      i64 ox0, ox1;
      windows_of(ix, KW, sw, OW, ox0, ox1);
      const i64 at = (iy * W + ix) * N;
      const i64 ny = oy1 - oy0 + 1, nx = ox1 - ox0 + 1;
      if (relu_input ? window_grad_fixed<true>(x + at, y, dy, dx + at, ny, nx, oy0, ox0, OW, N)
                     : window_grad_fixed<false>(x + at, y, dy, dx + at, ny, nx, oy0, ox0, OW, N)) {
        continue;
      }
      i64 n0 = 0;
      for (; n0 + kPoolBlock <= N; n0 += kPoolBlock) {
        if (relu_input) {
          window_grad<kPoolBlock, true>(x + at + n0, y + n0, dy + n0, dx + at + n0, 0, oy0, oy1, ox0, ox1, OW, N);
        } else {
          window_grad<kPoolBlock, false>(x + at + n0, y + n0, dy + n0, dx + at + n0, 0, oy0, oy1, ox0, ox1, OW, N);
        }
      }
      if (n0 < N) {
        if (relu_input) {
          window_grad<0, true>(x + at + n0, y + n0, dy + n0, dx + at + n0, N - n0, oy0, oy1, ox0, ox1, OW, N);
        } else {
          window_grad<0, false>(x + at + n0, y + n0, dy + n0, dx + at + n0, N - n0, oy0, oy1, ox0, ox1, OW, N);
        }
      }
    }
  }
}

// dx = for every window and every input equal to the window's maximum, the window's dy (cuda-convnet's tie rule,
// the reference's: no argmax is stored, ties all receive it). No padding. Parallel over channels. relu_input: x is
// the output of a ReLU, whose backward is fused here: dx = x > 0 ? that sum : +0 (relu_backward(x, dx)'s bits).
void maxpool_backward(const Floats& x, const Floats& y, const Floats& dy, Floats& dx, i64 C, i64 H, i64 W, i64 N,
                      i64 KH, i64 KW, i64 sh, i64 sw, i64 OH, i64 OW, bool relu_input) {
  positive({C, H, W, N, KH, KW, sh, sw, OH, OW});
  if ((OH - 1) * sh + KH > H || (OW - 1) * sw + KW > W) throw py::value_error("maxpool: window outside the image");
  const float* xp = in(x, "x", C * H * W * N);
  const float* yp = in(y, "y", C * OH * OW * N);
  const float* gp = in(dy, "dy", C * OH * OW * N);
  float* dp = out(dx, "dx", C * H * W * N);
  py::gil_scoped_release release;
#pragma omp parallel for schedule(static) num_threads(threads_for(C * H * W * N))
  for (i64 c = 0; c < C; ++c) {
    maxpool_backward_plane(xp + c * H * W * N, yp + c * OH * OW * N, gp + c * OH * OW * N, dp + c * H * W * N, H, W,
                           N, KH, KW, sh, sw, OH, OW, relu_input);
  }
}

SIMD_CLONES void relu_forward_range(const float* x, float* y, i64 i0, i64 i1) {
  for (i64 i = i0; i < i1; ++i) y[i] = x[i] > 0.0f ? x[i] : 0.0f;
}

// y = x > 0 ? x : +0 (NaN -> 0, -0 -> +0, as the reference); y may be x.
void relu_forward(const Floats& x, Floats& y) {
  const i64 n = x.size();
  const float* xp = in(x, "x", n);
  float* yp = out(y, "y", n);
  py::gil_scoped_release release;
  parallel_chunks(n, kChunk, [&](i64 i0, i64 i1) { relu_forward_range(xp, yp, i0, i1); });
}

SIMD_CLONES void relu_backward_range(const float* y, const float* dy, float* dx, i64 i0, i64 i1) {
  for (i64 i = i0; i < i1; ++i) {
    const float g = dy[i];  // loaded unconditionally: the select vectorises instead of branching
    dx[i] = y[i] > 0.0f ? g : 0.0f;
  }
}

// dx = y > 0 ? dy : +0; dx may be dy.
void relu_backward(const Floats& y, const Floats& dy, Floats& dx) {
  const i64 n = y.size();
  const float* yp = in(y, "y", n);
  const float* gp = in(dy, "dy", n);
  float* dp = out(dx, "dx", n);
  py::gil_scoped_release release;
  parallel_chunks(n, kChunk, [&](i64 i0, i64 i1) { relu_backward_range(yp, gp, dp, i0, i1); });
}

// Dropout's Philox groups are drawn kPhiloxLanes at a time, the lanes side by side in arrays so that the rounds
// vectorise (the 32x32 -> 64-bit products become packed multiplies); one group gives the words of 4 elements.
constexpr int kPhiloxLanes = 16;
constexpr i64 kDropoutChunk = 4096;  // elements per OpenMP work item; a multiple of 4 (whole Philox groups)

// The words of Philox groups [g0, g0 + kPhiloxLanes) in stream order (words[4 * l + k] is word k of group g0 + l):
// the Philox4x32-10 of kernels/philox.h (and convnet/reference/elementwise.py), counter (group as two words, offset
// as two words), key (seed as two words), written lane-parallel.
inline void philox_lanes(std::uint64_t g0, std::uint64_t offset, std::uint64_t seed, std::uint32_t* words) {
  constexpr std::uint32_t M0 = 0xD2511F53u, M1 = 0xCD9E8D57u, W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
  std::uint32_t c0[kPhiloxLanes], c1[kPhiloxLanes], c2[kPhiloxLanes], c3[kPhiloxLanes];
  for (int l = 0; l < kPhiloxLanes; ++l) {
    c0[l] = std::uint32_t(g0 + l);
    c1[l] = std::uint32_t((g0 + l) >> 32);
    c2[l] = std::uint32_t(offset);
    c3[l] = std::uint32_t(offset >> 32);
  }
  std::uint32_t k0 = std::uint32_t(seed), k1 = std::uint32_t(seed >> 32);
  for (int round = 0; round < 10; ++round) {
#pragma GCC unroll 1  // a loop, not 16 scalar copies: the vectoriser makes it packed operations over the lanes
    for (int l = 0; l < kPhiloxLanes; ++l) {
      // the low halves as 32-bit products, the high ones from 64-bit products: the form GCC vectorises
      const std::uint32_t a = c0[l], b = c2[l];
      const std::uint32_t hi0 = std::uint32_t((std::uint64_t(a) * M0) >> 32);
      const std::uint32_t hi1 = std::uint32_t((std::uint64_t(b) * M1) >> 32);
      const std::uint32_t n0 = hi1 ^ c1[l] ^ k0, n2 = hi0 ^ c3[l] ^ k1;
      c1[l] = b * M1;
      c3[l] = a * M0;
      c0[l] = n0;
      c2[l] = n2;
    }
    k0 += W0;
    k1 += W1;
  }
  for (int l = 0; l < kPhiloxLanes; ++l) {
    words[4 * l] = c0[l];
    words[4 * l + 1] = c1[l];
    words[4 * l + 2] = c2[l];
    words[4 * l + 3] = c3[l];
  }
}

// y[i] = x[i] * scale where stream element start + i is kept (its word < threshold; all: keep = 1, every element),
// else +0, for i in [i0, i1), at most kDropoutChunk elements; and, when mask is not null, mask[i] = 1 if kept, else 0.
// Two passes: every word of the range first, then the elements -- reading a word right after its narrow
// interleaving stores would stall on store forwarding.
SIMD_CLONES void dropout_range(const float* x, float* y, std::uint8_t* mask, i64 i0, i64 i1, std::uint64_t start,
                               std::uint32_t threshold, bool all, float scale, std::uint64_t seed,
                               std::uint64_t offset) {
  alignas(64) std::uint32_t words[kDropoutChunk + 4 * kPhiloxLanes];  // a range's groups, rounded up to whole blocks
  const std::uint64_t g0 = (start + std::uint64_t(i0)) / 4, groups = (start + std::uint64_t(i1) - 1) / 4 - g0 + 1;
  for (std::uint64_t g = 0; g < groups; g += kPhiloxLanes) philox_lanes(g0 + g, offset, seed, words + 4 * g);
  const std::uint32_t* w = words + (start + std::uint64_t(i0) - 4 * g0) - i0;  // w[i]: element i's word
  if (mask == nullptr) {
    for (i64 i = i0; i < i1; ++i) {
      const float v = x[i];  // loaded unconditionally: the select vectorises instead of branching
      y[i] = (all || w[i] < threshold) ? v * scale : 0.0f;
    }
  } else {
    for (i64 i = i0; i < i1; ++i) {
      const float v = x[i];
      const bool kept = all || w[i] < threshold;
      y[i] = kept ? v * scale : 0.0f;
      mask[i] = kept;
    }
  }
}

// Inverted dropout: y = x * scale where the element's stream element is kept, else +0 (dropout_range). Stream
// element j is word j % 4 of philox((j / 4, offset), seed), kept iff the word < threshold
// (convnet/reference/elementwise.py dropout_mask). `start`: an int s, x[i] is stream element s + i; or a tuple
// (s, batch, first), x (..., cols) a data-parallel shard, images [first, first + cols) of a batch of `batch`: its
// row r (the leading axes) is stream elements s + r * batch + first + [0, cols). y may be x. Work items start on a
// multiple of 4 stream elements within a row, so that no Philox group of a row is drawn twice; short rows are
// grouped several to an item. mask (uint8, x's size, or None): also the mask, 1 where kept (for dropout_apply_mask).
void dropout_apply(const Floats& x, Floats& y, std::uint64_t threshold, float scale, std::uint64_t seed,
                   std::uint64_t offset, const py::object& start_arg, const py::object& mask_arg) {
  const i64 n = x.size();
  const float* xp = in(x, "x", n);
  float* yp = out(y, "y", n);
  std::uint8_t* mp = nullptr;
  py::array_t<std::uint8_t, py::array::c_style> mask_array;
  if (!mask_arg.is_none()) {
    mask_array = mask_or_throw(mask_arg, n);
    if (!mask_array.writeable()) throw py::value_error("mask is read-only");
    mp = mask_array.mutable_data();
  }
  std::uint64_t start = 0, batch = std::uint64_t(n), first = 0;
  i64 rows = 1, cols = n;
  if (py::isinstance<py::tuple>(start_arg)) {
    std::tie(start, batch, first) = start_arg.cast<std::tuple<std::uint64_t, std::uint64_t, std::uint64_t>>();
    if (x.ndim() < 1) throw py::value_error("dropout: a shard needs a batch axis (the last)");
    cols = x.shape(x.ndim() - 1);
    rows = cols > 0 ? n / cols : 0;
    if (first > batch || std::uint64_t(cols) > batch - first)
      throw py::value_error("dropout: first + the shard's images must be at most the batch");
  } else {
    start = start_arg.cast<std::uint64_t>();
  }
  if (rows > 0 && batch > (~std::uint64_t(0) - start) / std::uint64_t(rows))
    throw py::value_error("dropout: start + the elements of the whole batch overflow 64 bits");
  if (threshold > (std::uint64_t(1) << 32)) throw py::value_error("dropout: threshold above 2^32");
  if (n == 0) return;
  py::gil_scoped_release release;
  const bool all = threshold == (std::uint64_t(1) << 32);
  const i64 per_row = (cols + 3 + kDropoutChunk - 1) / kDropoutChunk;  // a row's items (its skew is at most 3)
  const i64 rows_per = per_row == 1 ? std::max<i64>(1, kDropoutChunk / cols) : 1;
  const i64 items = (rows + rows_per - 1) / rows_per * per_row;
#pragma omp parallel for schedule(static) num_threads(threads_for(n))
  for (i64 k = 0; k < items; ++k) {
    const i64 r0 = k / per_row * rows_per, c = k % per_row;
    for (i64 r = r0; r < std::min(rows, r0 + rows_per); ++r) {
      const std::uint64_t s = start + std::uint64_t(r) * batch + first;  // stream element of x[r, 0]
      const i64 skew = i64(s % 4);  // item c of a row: its elements [c * chunk - skew, (c + 1) * chunk - skew)
      const i64 i0 = std::max<i64>(c * kDropoutChunk - skew, 0), i1 = std::min(cols, (c + 1) * kDropoutChunk - skew);
      if (i0 < i1)
        dropout_range(xp + r * cols, yp + r * cols, mp ? mp + r * cols : nullptr, i0, i1, s, std::uint32_t(threshold),
                      all, scale, seed, offset);
    }
  }
}

SIMD_CLONES void masked_scale_range(const float* x, const std::uint8_t* mask, float* y, float scale, i64 i0, i64 i1) {
  for (i64 i = i0; i < i1; ++i) {
    const float v = x[i];  // loaded unconditionally: the select vectorises instead of branching
    y[i] = mask[i] ? v * scale : 0.0f;
  }
}

// y = mask ? x * scale : +0 with a mask dropout_apply wrote: the same values as dropout_apply with that mask's
// parameters (the same select and product), without drawing the Philox words again. y may be x.
void dropout_apply_mask(const Floats& x, const py::object& mask_arg, Floats& y, float scale) {
  const i64 n = x.size();
  const float* xp = in(x, "x", n);
  float* yp = out(y, "y", n);
  const auto mask_array = mask_or_throw(mask_arg, n);
  const std::uint8_t* mp = mask_array.data();
  py::gil_scoped_release release;
  parallel_chunks(n, kChunk, [&](i64 i0, i64 i1) { masked_scale_range(xp, mp, yp, scale, i0, i1); });
}

SIMD_CLONES void sgd_range(float* __restrict__ w, const float* __restrict__ g, float* __restrict__ v, i64 i0, i64 i1,
                           float momentum, float decay_lr, bool decay, float lr) {
  if (decay) {
    for (i64 i = i0; i < i1; ++i) {
      const float u = (momentum * v[i] - decay_lr * w[i]) - lr * g[i];
      v[i] = u;
      w[i] += u;
    }
  } else {
    for (i64 i = i0; i < i1; ++i) {
      const float u = momentum * v[i] - lr * g[i];
      v[i] = u;
      w[i] += u;
    }
  }
}

// SGD with momentum, in place, in one pass: v = momentum * v [- decay_lr * w] - lr * g; w += v -- each product and
// difference rounded to float32 in this order, exactly as the reference's NumPy statements (convnet/reference/sgd.py),
// the decay term only when `decay` (the reference skips it for a zero weight decay). w, g, v: distinct buffers.
void sgd_update(Floats& w, const Floats& g, Floats& v, float momentum, float decay_lr, bool decay, float lr) {
  const i64 n = w.size();
  float* wp = out(w, "w", n);
  const float* gp = in(g, "g", n);
  float* vp = out(v, "v", n);
  const auto overlap = [n](const float* a, const float* b) { return a < b + n && b < a + n; };
  if (n > 0 && (overlap(wp, gp) || overlap(wp, vp) || overlap(gp, vp))) {
    throw py::value_error("sgd_update: w, g and v must not overlap");
  }
  py::gil_scoped_release release;
  parallel_chunks(n, kChunk, [&](i64 i0, i64 i1) { sgd_range(wp, gp, vp, i0, i1, momentum, decay_lr, decay, lr); });
}

// The SGD update of many parameters in one parallel region: update k is sgd_update(ws[k], gs[k], vs[k],
// momentum[k], decay_lr[k], decay[k], lr[k]), each element with the same arithmetic in the same order, so the bits are
// those of one sgd_update call per parameter, on any number of threads. The work items are kChunk-element pieces of
// each parameter in turn (a bias of 64 floats is one item); every array of every update is disjoint from all others
// (checked: a parameter read as another's gradient would otherwise depend on the threads' order).
void sgd_update_many(const py::list& ws, const py::list& gs, const py::list& vs, const std::vector<float>& momentum,
                     const std::vector<float>& decay_lr, const std::vector<bool>& decay, const std::vector<float>& lr) {
  const std::size_t count = ws.size();
  if (gs.size() != count || vs.size() != count || momentum.size() != count || decay_lr.size() != count ||
      decay.size() != count || lr.size() != count) {
    throw py::value_error("sgd_update_many: ws, gs, vs and the coefficient lists must have the same length");
  }
  struct Update {
    float* w;
    const float* g;
    float* v;
    i64 n;
  };
  std::vector<Update> updates(count);
  std::vector<std::pair<const float*, const float*>> spans;  // [start, end) of every array, to check disjointness
  const auto array = [](const py::handle& h, const char* name, std::size_t k) {
    if (!py::isinstance<Floats>(h)) {  // exactly float32 and C-contiguous: never a converted copy (updated in place)
      throw py::type_error("sgd_update_many: " + std::string(name) + "[" + std::to_string(k) +
                           "] must be a C-contiguous float32 NumPy array");
    }
    return py::reinterpret_borrow<Floats>(h);
  };
  for (std::size_t k = 0; k < count; ++k) {
    Floats w = array(ws[k], "ws", k), g = array(gs[k], "gs", k), v = array(vs[k], "vs", k);
    const i64 n = w.size();
    updates[k] = {out(w, "w", n), in(g, "g", n), out(v, "v", n), n};
    if (n > 0) {
      for (const float* p : {static_cast<const float*>(updates[k].w), updates[k].g,
                             static_cast<const float*>(updates[k].v)}) {
        spans.emplace_back(p, p + n);
      }
    }
  }
  std::sort(spans.begin(), spans.end());
  for (std::size_t i = 1; i < spans.size(); ++i) {
    if (spans[i].first < spans[i - 1].second) throw py::value_error("sgd_update_many: the arrays must not overlap");
  }
  std::vector<std::pair<std::size_t, i64>> items;  // (update, first element) of each kChunk-element work item
  i64 total = 0;
  for (std::size_t k = 0; k < count; ++k) {
    for (i64 i0 = 0; i0 < updates[k].n; i0 += kChunk) items.emplace_back(k, i0);
    total += updates[k].n;
  }
  py::gil_scoped_release release;
  const i64 n_items = static_cast<i64>(items.size());
#pragma omp parallel for schedule(static) num_threads(threads_for(total))
  for (i64 t = 0; t < n_items; ++t) {
    const std::size_t k = items[t].first;
    const Update& u = updates[k];
    const i64 i0 = items[t].second;
    sgd_range(u.w, u.g, u.v, i0, std::min(u.n, i0 + kChunk), momentum[k], decay_lr[k], decay[k], lr[k]);
  }
}

SIMD_CLONES void bias_add_row(float* y, float b, i64 per) {
  for (i64 i = 0; i < per; ++i) y[i] += b;
}

// y[f, :] += bias[f] for y viewed as (F, per): the convolution's bias where the GEMM's store did not add it (Winograd,
// NumPy's BLAS). Parallel over filters.
void bias_add(Floats& y, const Floats& bias, i64 F, i64 per) {
  positive({F, per});
  float* yp = out(y, "y", F * per);
  const float* bp = in(bias, "bias", F);
  py::gil_scoped_release release;
#pragma omp parallel for schedule(static) num_threads(threads_for(F * per))
  for (i64 f = 0; f < F; ++f) bias_add_row(yp + f * per, bp[f], per);
}

constexpr int kSumLanes = 16;

// The sum of row[0, per) in double: kSumLanes running sums side by side (they vectorise; the order is fixed, so the
// result does not depend on the CPU's vector width), then added lane by lane.
SIMD_CLONES double row_sum(const float* row, i64 per) {
  double acc[kSumLanes] = {};
  i64 i = 0;
  for (; i + kSumLanes <= per; i += kSumLanes) {
    for (int l = 0; l < kSumLanes; ++l) acc[l] += double(row[i + l]);
  }
  for (int l = 0; i + l < per; ++l) acc[l] += double(row[i + l]);
  double s = 0.0;
  for (int l = 0; l < kSumLanes; ++l) s += acc[l];
  return s;
}

// db[f] = sum of dy[f, :] for dy viewed as (F, per), accumulated in double (closer to the exact sum than the
// reference's float32 pairwise sum), rounded once. Parallel over filters: each sum is one thread's, in a fixed order.
void bias_sum(const Floats& dy, Floats& db, i64 F, i64 per) {
  positive({F, per});
  const float* gp = in(dy, "dy", F * per);
  float* dp = out(db, "db", F);
  py::gil_scoped_release release;
#pragma omp parallel for schedule(static) num_threads(threads_for(F * per))
  for (i64 f = 0; f < F; ++f) dp[f] = float(row_sum(gp + f * per, per));
}

}  // namespace

namespace convnet_cpu {
int loop_threads() { return g_threads; }  // the GEMM's threads (csrc/cpu/gemm.cpp)
void register_gemm(py::module_& m);
void register_winograd(py::module_& m);  // csrc/cpu/winograd.cpp
}  // namespace convnet_cpu

PYBIND11_MODULE(_cpu, m) {
  m.doc() = "convnet's fast CPU path: its GEMM and the host loops around it (float32, CHWN); see convnet/cpu/";
  m.def("set_threads", [](int n) {
    if (n < 1) throw py::value_error("threads must be >= 1");
    g_threads = n;
  }, py::arg("n"), "Threads of every loop and GEMM (OpenMP), like the BLAS threads");
  m.def("get_threads", [] { return g_threads; });
  convnet_cpu::register_gemm(m);
  convnet_cpu::register_winograd(m);
  m.def("im2col", &im2col, py::arg("x"), py::arg("cols"), py::arg("C"), py::arg("H"), py::arg("W"), py::arg("N"),
        py::arg("c0"), py::arg("Cg"), py::arg("n0"), py::arg("nb"), py::arg("KH"), py::arg("KW"), py::arg("sh"),
        py::arg("sw"), py::arg("ph"), py::arg("pw"), py::arg("OH"), py::arg("OW"));
  m.def("col2im", &col2im, py::arg("cols"), py::arg("dx"), py::arg("C"), py::arg("H"), py::arg("W"), py::arg("N"),
        py::arg("c0"), py::arg("Cg"), py::arg("n0"), py::arg("nb"), py::arg("KH"), py::arg("KW"), py::arg("sh"),
        py::arg("sw"), py::arg("ph"), py::arg("pw"), py::arg("OH"), py::arg("OW"));
  m.def("maxpool_forward", &maxpool_forward);
  m.def("maxpool_backward", &maxpool_backward, py::arg("x"), py::arg("y"), py::arg("dy"), py::arg("dx"), py::arg("C"),
        py::arg("H"), py::arg("W"), py::arg("N"), py::arg("KH"), py::arg("KW"), py::arg("sh"), py::arg("sw"),
        py::arg("OH"), py::arg("OW"), py::arg("relu_input") = false);
  m.def("relu_forward", &relu_forward);
  m.def("relu_backward", &relu_backward);
  m.def("dropout_apply", &dropout_apply, py::arg("x"), py::arg("y"), py::arg("threshold"), py::arg("scale"),
        py::arg("seed"), py::arg("offset"), py::arg("start"), py::arg("mask") = py::none());
  m.def("dropout_apply_mask", &dropout_apply_mask, py::arg("x"), py::arg("mask"), py::arg("y"), py::arg("scale"));
  m.def("sgd_update", &sgd_update, py::arg("w"), py::arg("g"), py::arg("v"), py::arg("momentum"),
        py::arg("decay_lr"), py::arg("decay"), py::arg("lr"));
  m.def("sgd_update_many", &sgd_update_many, py::arg("ws"), py::arg("gs"), py::arg("vs"), py::arg("momentum"),
        py::arg("decay_lr"), py::arg("decay"), py::arg("lr"));
  m.def("bias_add", &bias_add, py::arg("y"), py::arg("bias"), py::arg("F"), py::arg("per"));
  m.def("bias_sum", &bias_sum, py::arg("dy"), py::arg("db"), py::arg("F"), py::arg("per"));
}
