// convnet._cpu's GEMM (csrc/cpu/gemm.h): the operand packing, the choice of SIMD width, the split across threads,
// and the Python entry points gemm, conv_gemm_forward and conv_gemm_filter (src/convnet/cpu/gemm.py documents them;
// tests/test_cpu_gemm.py checks them against NumPy in float64).
//
// Threads: C's tiles are cut into one contiguous range of micro-tile columns (or rows, when C has more of those) per
// thread; each thread packs and multiplies its own part. The k order of every element is the same for any split,
// so the result does not depend on the thread count.
#include "cpu/gemm.h"
#include "cpu/winograd_matrices.h"

#include <omp.h>
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#endif
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace py = pybind11;

namespace convnet_cpu {

int loop_threads();  // host_kernels.cpp: set_threads

void operand_row(const Operand& op, i64 r, i64 q0, i64 len, float* dst, i64 step, i64 panel, i64 panel_stride) {
  // The packed position of column j advances with j without a division: panel `pj`, `in` columns into it.
  i64 pj = 0, in = 0;
  // Copies `n` floats from src (contiguous; nullptr = zeros) to the next n packed positions.
  auto put = [&](const float* src, i64 n) {
    while (n > 0) {
      const i64 take = std::min(n, panel - in);
      float* d = dst + pj * panel_stride + in * step;
      if (step == 1) {
        if (src) std::memcpy(d, src, sizeof(float) * take); else std::memset(d, 0, sizeof(float) * take);
      } else {
        for (i64 t = 0; t < take; ++t) d[t * step] = src ? src[t] : 0.0f;
      }
      in += take;
      if (in == panel) in = 0, ++pj;
      n -= take;
      if (src) src += take;
    }
  };
  if (!op.conv) {  // unit column stride (gemm.h)
    put(op.p + r * op.rs + q0, len);
    return;
  }
  // im2col row r = (c, ky, kx); columns q = (oy, ox, n): runs of consecutive images are contiguous in x. The
  // position (oy, ox, n) of column q0 + j is advanced run by run (a division per run cost as much as the copy).
  const i64 c = r / (op.KH * op.KW), ky = r / op.KW % op.KH, kx = r % op.KW;
  const float* plane = op.p + (op.c0 + c) * op.H * op.W * op.N + op.n0;
  i64 n = q0 % op.nb, ox = q0 / op.nb % op.OW, oy = q0 / op.nb / op.OW;
  for (i64 j = 0; j < len;) {
    const i64 run = std::min(op.nb - n, len - j);
    const i64 iy = oy * op.sh - op.ph + ky, ix = ox * op.sw - op.pw + kx;
    const bool inside = iy >= 0 && iy < op.H && ix >= 0 && ix < op.W;
    put(inside ? plane + (iy * op.W + ix) * op.N + n : nullptr, run);
    j += run;
    n += run;
    if (n == op.nb) {
      n = 0;
      if (++ox == op.OW) ox = 0, ++oy;
    }
  }
}

namespace {

bool cpu_has(const char* feature) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  if (std::strcmp(feature, "avx512") == 0) return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
  if (std::strcmp(feature, "avx2") == 0) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  (void)feature;
  return false;
}

// The widths this build has and this CPU runs, widest first.
std::vector<const Isa*> available() {
  std::vector<const Isa*> out;
  // The CPU first: the files built for a width are not entered on a CPU without it.
  if (cpu_has("avx512") && isa_avx512()) out.push_back(isa_avx512());
  if (cpu_has("avx2") && isa_avx2()) out.push_back(isa_avx2());
  return out;
}

const Isa* pick(const std::string& name) {
  const auto isas = available();
  if (name.empty()) {
    if (isas.empty()) throw std::runtime_error("the cpu GEMM needs an x86-64 CPU with AVX2 and FMA");
    return isas.front();
  }
  for (const Isa* isa : isas) {
    if (name == isa->name) return isa;
  }
  throw py::value_error("isa '" + name + "' is not available here (see convnet._cpu.gemm_isas())");
}

// A thread's scratch of at least n floats, 64-byte aligned (the micro-kernel's panels), kept and grown as needed.
struct AlignedFloats {
  float* p = nullptr;
  i64 size = 0;
  float* at_least(i64 n) {
    if (n > size) {
      std::free(p);
      p = static_cast<float*>(std::aligned_alloc(64, static_cast<std::size_t>((n * 4 + 63) / 64 * 64)));
      size = p ? n : 0;
      if (!p) throw std::bad_alloc();
    }
    return p;
  }
  ~AlignedFloats() { std::free(p); }
};

struct Scratch {
  float* a = nullptr;
  float* b = nullptr;
  Scratch() {
    const std::size_t bytes = sizeof(float) * kPackFloats;
    a = static_cast<float*>(std::aligned_alloc(64, bytes));
    b = static_cast<float*>(std::aligned_alloc(64, bytes));
    if (!a || !b) throw std::bad_alloc();
  }
  ~Scratch() {
    std::free(a);
    std::free(b);
  }
};

Scratch& scratch() {
  thread_local Scratch s;  // one pair per thread, kept: OpenMP's threads live as long as the process
  return s;
}

// Runs part(m0, m1, n0, n1) on parts of C cut along its tiles (mr x nr): one contiguous range of tile columns (or
// rows, when C has more of those and columns are not preferred) per thread; an error on any thread is raised after
// the region.
template <class Part>
void split_over_tiles(i64 M, i64 N, i64 K, i64 mr, i64 nr, Part part, bool prefer_columns = false) {
  if (M == 0 || N == 0) return;
  const i64 tiles_m = (M + mr - 1) / mr, tiles_n = (N + nr - 1) / nr;
  const bool split_n = tiles_n >= tiles_m || (prefer_columns && tiles_n >= loop_threads());
  const i64 tiles = split_n ? tiles_n : tiles_m;
  // Below ~4 MFLOP a second thread costs more than it saves.
  const i64 parts = 2.0 * M * N * K < 4e6 ? 1 : std::min<i64>(loop_threads(), tiles);
  std::string error;
#pragma omp parallel num_threads(static_cast<int>(parts)) if (parts > 1)
  {
    const i64 t = omp_get_thread_num(), first = t * tiles / parts, last = (t + 1) * tiles / parts;
    try {
      if (split_n) {
        part(0, M, first * nr, std::min(N, last * nr));
      } else {
        part(first * mr, std::min(M, last * mr), 0, N);
      }
    } catch (const std::exception& e) {
#pragma omp critical
      error = e.what();
    }
  }
  if (!error.empty()) throw std::runtime_error("cpu GEMM: " + error);
}

void gemm(i64 M, i64 N, i64 K, const Operand& a, const Operand& b, const Output& c, bool accumulate, const Isa* isa,
          const Epilogue& epilogue = {}) {
  // A plain A against a few columns (read where it lies, gemm_blocked.inc) and a large B: split the columns, so that
  // each thread packs its part of B instead of all of it (measured: fmnist's fc3 forward, 4608 x 64, on 2 threads
  // 0.72 ms against 0.89).
  const bool prefer_columns = !a.conv && (a.rs == 1 || a.cs == 1) && N <= 4 * isa->nr && K * N > 64 * 1024;
  split_over_tiles(M, N, K, isa->mr, isa->nr, [&](i64 m0, i64 m1, i64 n0, i64 n1) {
    Scratch& s = scratch();
    isa->run(m0, m1, n0, n1, K, a, b, c, accumulate, epilogue, s.a, s.b);
  }, prefer_columns);
}

// C (M, N) = A @ Bt.T by the dot form.
void gemm_dot(i64 M, i64 N, i64 K, const Operand& a, const Operand& bt, const Output& c, bool accumulate,
              const Isa* isa) {
  split_over_tiles(M, N, K, isa->dot_mr, isa->dot_nr, [&](i64 m0, i64 m1, i64 n0, i64 n1) {
    thread_local std::vector<float> lanes;
    lanes.resize(static_cast<std::size_t>((m1 - m0) * (n1 - n0) * 16));
    isa->run_dot(m0, m1, n0, n1, K, a, bt, c, accumulate, lanes.data());
  });
}

// ------------------------------------------------------------------------------------------------- Python side
using Array = py::array_t<float, 0>;  // any strides, no forcecast
using Floats = py::array_t<float, py::array::c_style>;

i64 element_stride(const Array& a, int axis, const char* name) {
  const i64 s = a.strides(axis);
  if (s % static_cast<i64>(sizeof(float)) != 0) throw py::value_error(std::string(name) + ": unaligned strides");
  return s / static_cast<i64>(sizeof(float));
}

void check_2d(const Array& a, const char* name) {
  if (a.ndim() != 2) throw py::value_error(std::string(name) + " must be a matrix, got " +
                                           std::to_string(a.ndim()) + " dimensions");
}

Operand strided(const Array& a, const char* name) {
  check_2d(a, name);
  Operand op;
  op.p = a.data();
  op.rs = element_stride(a, 0, name);
  op.cs = element_stride(a, 1, name);
  return op;
}

Output output(Array& c, i64 M, i64 N) {
  check_2d(c, "c");
  if (c.shape(0) != M || c.shape(1) != N) {
    throw py::value_error("c has shape (" + std::to_string(c.shape(0)) + ", " + std::to_string(c.shape(1)) +
                          "), expected (" + std::to_string(M) + ", " + std::to_string(N) + ")");
  }
  if (!c.writeable()) throw py::value_error("c is read-only");
  Output out;
  out.p = c.mutable_data();
  out.rs = element_stride(c, 0, "c");
  out.cs = element_stride(c, 1, "c");
  return out;
}

// The bytes [lo, hi) an array's elements span.
std::pair<const char*, const char*> span(const py::array& a) {
  const char* lo = static_cast<const char*>(a.data());
  const char* hi = lo;
  for (py::ssize_t d = 0; d < a.ndim(); ++d) {
    if (a.shape(d) == 0) return {lo, lo};
    const py::ssize_t extent = (a.shape(d) - 1) * a.strides(d);
    (extent < 0 ? lo : hi) += extent;
  }
  return {lo, hi + a.itemsize()};
}

void disjoint(const py::array& c, const py::array& x, const char* name) {
  const auto [c0, c1] = span(c);
  const auto [x0, x1] = span(x);
  if (c0 < x1 && x0 < c1) throw py::value_error(std::string("c overlaps ") + name);
}

// The store's epilogue (gemm.h) for C with M rows: bias (None, or M float32 values) and relu.
Epilogue epilogue(const std::optional<Floats>& bias, bool relu, const py::array& c, i64 M) {
  Epilogue e;
  e.relu = relu;
  if (bias) {
    if (bias->ndim() != 1 || bias->shape(0) != M) {
      throw py::value_error("bias must have shape (" + std::to_string(M) + ",)");
    }
    disjoint(c, *bias, "bias");
    e.row_bias = bias->data();
  }
  return e;
}

Operand image(const Floats& x, i64 C, i64 H, i64 W, i64 N, i64 c0, i64 Cg, i64 n0, i64 nb, i64 KH, i64 KW, i64 sh,
              i64 sw, i64 ph, i64 pw, i64 OH, i64 OW) {
  for (i64 v : {C, H, W, N, Cg, nb, KH, KW, sh, sw, OH, OW}) {
    if (v <= 0) throw py::value_error("sizes, strides and window must be positive");
  }
  if (c0 < 0 || c0 + Cg > C || n0 < 0 || n0 + nb > N || ph < 0 || pw < 0) {
    throw py::value_error("conv gemm: bad channel/image range or padding");
  }
  if (x.size() != C * H * W * N) throw py::value_error("x: " + std::to_string(x.size()) + " elements, expected " +
                                                       std::to_string(C * H * W * N));
  Operand op;
  op.conv = 1;
  op.p = x.data();
  op.C = C, op.H = H, op.W = W, op.N = N, op.c0 = c0, op.Cg = Cg, op.n0 = n0, op.nb = nb, op.KH = KH, op.KW = KW;
  op.sh = sh, op.sw = sw, op.ph = ph, op.pw = pw, op.OH = OH, op.OW = OW;
  return op;
}

void py_gemm(const Array& a, const Array& b, Array& c, bool accumulate, const std::optional<Floats>& bias, bool relu,
             const std::string& isa) {
  const Isa* chosen = pick(isa);
  Operand oa = strided(a, "a"), ob = strided(b, "b");
  if (a.shape(1) != b.shape(0)) {
    throw py::value_error("a is (" + std::to_string(a.shape(0)) + ", " + std::to_string(a.shape(1)) + ") but b is (" +
                          std::to_string(b.shape(0)) + ", " + std::to_string(b.shape(1)) + ")");
  }
  const Output oc = output(c, a.shape(0), b.shape(1));
  disjoint(c, a, "a");
  disjoint(c, b, "b");
  const Epilogue end = epilogue(bias, relu, c, a.shape(0));
  py::gil_scoped_release release;
  gemm(a.shape(0), b.shape(1), a.shape(1), oa, ob, oc, accumulate, chosen, end);
}

// y (Fg, OH*OW*nb) = w (Fg, Cg*KH*KW) @ im2col(x) [+ bias (Fg,)], [then the ReLU]: the epilogue in the store
void py_conv_forward(const Array& w, const Floats& x, Array& y, i64 C, i64 H, i64 W, i64 N, i64 c0, i64 Cg, i64 n0,
                     i64 nb, i64 KH, i64 KW, i64 sh, i64 sw, i64 ph, i64 pw, i64 OH, i64 OW, bool accumulate,
                     const std::string& isa, const std::optional<Floats>& bias, bool relu) {
  const Isa* chosen = pick(isa);
  const Operand cols = image(x, C, H, W, N, c0, Cg, n0, nb, KH, KW, sh, sw, ph, pw, OH, OW);
  const Operand ow = strided(w, "w");
  if (w.shape(1) != Cg * KH * KW) throw py::value_error("w has " + std::to_string(w.shape(1)) + " columns, expected " +
                                                        std::to_string(Cg * KH * KW));
  const Output oy = output(y, w.shape(0), OH * OW * nb);
  disjoint(y, x, "x");
  disjoint(y, w, "w");
  const Epilogue end = epilogue(bias, relu, y, w.shape(0));
  py::gil_scoped_release release;
  gemm(w.shape(0), OH * OW * nb, Cg * KH * KW, ow, cols, oy, accumulate, chosen, end);
}

// dw (Cg*KH*KW, Fg) = im2col(x) @ dy.T, dy (Fg, OH*OW*nb). form: "packed" (the blocked GEMM), "dot" (the dot
// form: nothing packed) or "" (the dot form up to 32K elements of dw: measured faster for fmnist's conv1 and conv2,
// slower for conv3's 74K).
void py_conv_filter(const Floats& x, const Array& dy, Array& dw, i64 C, i64 H, i64 W, i64 N, i64 c0, i64 Cg, i64 n0,
                    i64 nb, i64 KH, i64 KW, i64 sh, i64 sw, i64 ph, i64 pw, i64 OH, i64 OW, bool accumulate,
                    const std::string& isa, const std::string& form) {
  if (!form.empty() && form != "packed" && form != "dot") throw py::value_error("form must be 'packed' or 'dot'");
  const Isa* chosen = pick(isa);
  const Operand cols = image(x, C, H, W, N, c0, Cg, n0, nb, KH, KW, sh, sw, ph, pw, OH, OW);
  Operand odyt = strided(dy, "dy");
  if (dy.shape(1) != OH * OW * nb) throw py::value_error("dy has " + std::to_string(dy.shape(1)) +
                                                         " columns, expected " + std::to_string(OH * OW * nb));
  const Output odw = output(dw, Cg * KH * KW, dy.shape(0));
  disjoint(dw, x, "x");
  disjoint(dw, dy, "dy");
  const i64 M = Cg * KH * KW, F = dy.shape(0), K = OH * OW * nb;
  const bool dot = odyt.cs == 1 && (form == "dot" || (form.empty() && M * F <= 32 * 1024));
  py::gil_scoped_release release;
  if (dot) {
    gemm_dot(M, F, K, cols, odyt, odw, accumulate, chosen);
  } else {
    std::swap(odyt.rs, odyt.cs);  // dy.T
    gemm(M, F, K, cols, odyt, odw, accumulate, chosen);
  }
}

// The work of each Winograd tile, row-major over the TH x TW tiles of an OH x OW output: its kind's elements (an F(1)
// last tile has fewer), so that splits by it balance.
std::vector<i64> tile_costs(int m, i64 OH, i64 OW) {
  const i64 TH = (OH + m - 1) / m, TW = (OW + m - 1) / m;
  const i64 ly = winograd_last_tile(OH, m), lx = winograd_last_tile(OW, m);
  std::vector<i64> cost(static_cast<std::size_t>(TH * TW));
  for (i64 ty = 0; ty < TH; ++ty) {
    for (i64 tx = 0; tx < TW; ++tx) cost[ty * TW + tx] = ((ty == TH - 1 ? ly : m) + 2) * ((tx == TW - 1 ? lx : m) + 2);
  }
  return cost;
}

// Cuts items [0, n) (item i costs cost[i / per]) into `parts` contiguous ranges of about equal cost: range t is
// [bounds[t], bounds[t + 1]); an item goes to the earlier range when its middle falls within that range's share.
std::vector<i64> balanced_ranges(const std::vector<i64>& cost, i64 per, i64 n, i64 parts) {
  i64 total = 0;
  for (i64 i = 0; i < n; ++i) total += cost[i / per];
  std::vector<i64> bounds(static_cast<std::size_t>(parts + 1), n);
  bounds[0] = 0;
  i64 sum = 0, t = 1;
  for (i64 i = 0; i < n; ++i) {
    const i64 c = cost[i / per];
    while (t < parts && (2 * sum + c) * parts > 2 * t * total) bounds[t++] = i;
    sum += c;
  }
  return bounds;
}

// y[f0 .. f0 + Fg) (y is (F, OH, OW, N)) = the Winograd F(m x m, 3x3) convolution of channels [c0, c0 + Cg) of x
// (C, H, W, N) with the transformed filters u: per kind of tile (winograd_tile_kinds) a block (E_q, Cg, Fg)
// (u_layout "ck") or (E_q, Fg, Cg) ("kc"), padding (ph, pw) in 0..2, [+ bias (Fg,)], [then the ReLU]. The jobs
// (tiles x blocks of images) are cut into one contiguous range of about equal work per thread; every output
// element is one job's, so the bits do not depend on the split.
void py_winograd_conv(const Floats& x, const Floats& u, Floats& y, i64 C, i64 H, i64 W, i64 N, i64 c0, i64 Cg, i64 ph,
                      i64 pw, i64 F, i64 f0, i64 Fg, i64 OH, i64 OW, const std::string& u_layout,
                      const std::optional<Floats>& bias, bool relu, int m, const std::string& isa) {
  const Isa* chosen = pick(isa);
  if (m != 2 && m != 3) throw py::value_error("winograd_conv: m (the output tile) must be 2 or 3");
  const i64 E = winograd_tile_kinds(m, OH, OW).total_elements();  // every kind of tile's elements
  for (i64 v : {C, H, W, N, Cg, F, Fg, OH, OW}) {
    if (v <= 0) throw py::value_error("winograd_conv: sizes must be positive");
  }
  if (c0 < 0 || c0 + Cg > C || f0 < 0 || f0 + Fg > F) throw py::value_error("winograd_conv: bad channel range");
  if (ph < 0 || ph > 2 || pw < 0 || pw > 2) throw py::value_error("winograd_conv: padding must be 0..2");
  if (OH != H + 2 * ph - 2 || OW != W + 2 * pw - 2) throw py::value_error("winograd_conv: output size is not the 3x3 "
                                                                          "stride-1 convolution's");
  if (u_layout != "ck" && u_layout != "kc") throw py::value_error("winograd_conv: u_layout must be 'ck' or 'kc'");
  if (x.size() != C * H * W * N) throw py::value_error("winograd_conv: x has " + std::to_string(x.size()) +
                                                       " elements, expected " + std::to_string(C * H * W * N));
  if (u.size() != E * Cg * Fg) throw py::value_error("winograd_conv: u has " + std::to_string(u.size()) +
                                                     " elements, expected " + std::to_string(E * Cg * Fg));
  if (y.size() != F * OH * OW * N) throw py::value_error("winograd_conv: y has " + std::to_string(y.size()) +
                                                         " elements, expected " + std::to_string(F * OH * OW * N));
  if (!y.writeable()) throw py::value_error("winograd_conv: y is read-only");
  disjoint(y, x, "x");
  disjoint(y, u, "u");
  WinogradConv conv;
  conv.m = m;
  conv.x = x.data() + c0 * H * W * N;
  conv.C = Cg, conv.H = H, conv.W = W, conv.N = N, conv.ph = ph, conv.pw = pw;
  conv.u = u.data();
  conv.u_es = Cg * Fg;
  conv.u_cs = u_layout == "ck" ? Fg : 1;
  conv.u_ks = u_layout == "ck" ? 1 : Cg;
  conv.y = y.mutable_data() + f0 * OH * OW * N;
  conv.K = Fg, conv.OH = OH, conv.OW = OW;
  conv.relu = relu;
  if (bias) {
    if (bias->ndim() != 1 || bias->shape(0) != Fg) throw py::value_error("bias must have shape (" +
                                                                         std::to_string(Fg) + ",)");
    conv.bias = bias->data();
  }
  const i64 blocks = (N + chosen->nr - 1) / chosen->nr;  // of images, per tile
  const i64 jobs = (OH + m - 1) / m * ((OW + m - 1) / m) * blocks;
  const i64 parts = std::min<i64>(loop_threads(), jobs);
  const std::vector<i64> ranges = balanced_ranges(tile_costs(m, OH, OW), blocks, jobs, parts);
  py::gil_scoped_release release;
  thread_local std::vector<float> packed;
  packed.resize(static_cast<std::size_t>(E * ((Fg + chosen->mr - 1) / chosen->mr) * chosen->mr * Cg));
  float* pk = packed.data();
  std::string error;
#pragma omp parallel num_threads(static_cast<int>(parts)) if (parts > 1)
  {
    const i64 t = omp_get_thread_num();
    chosen->winograd_pack(conv, pk, t * E / parts, (t + 1) * E / parts);  // the filters' elements split too
#pragma omp barrier
    try {
      thread_local AlignedFloats scratch;
      chosen->winograd_run(conv, pk, ranges[t], ranges[t + 1],
                           scratch.at_least(chosen->winograd_scratch(Cg, Fg, m)));
    } catch (const std::exception& e) {
#pragma omp critical
      error = e.what();
    }
  }
  if (!error.empty()) throw std::runtime_error("winograd_conv: " + error);
}

// The 8 x 8 block of src (row stride ld_src) transposed into dst (row stride ld_dst), in AVX registers (the GEMM's
// ISAs all have AVX2).
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
__attribute__((target("avx2"))) void transpose8(const float* src, i64 ld_src, float* dst, i64 ld_dst) {
  __m256 r[8], t[8], u[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * ld_src);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(dst + i * ld_dst, _mm256_permute2f128_ps(u[i], u[i + 4], 0x20));
    _mm256_storeu_ps(dst + (i + 4) * ld_dst, _mm256_permute2f128_ps(u[i], u[i + 4], 0x31));
  }
}
#endif

// dst = src (rows, pixels * n) transposed pixel by pixel: pixel p's (n, rows) block at dst + p * ps (ps >= n * rows;
// the filter gradient pads it so that a patch's pixels do not lie a multiple of 4 KB apart).
void transpose_pixels(const float* src, i64 rows, i64 pixels, i64 n, float* dst, i64 ps) {
  constexpr i64 B = 8;
  const i64 cols = pixels * n, full_r = rows / B * B, full_n = n / B * B;
  const int threads = rows * cols < 64 * 1024 ? 1 : loop_threads();
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
  for (i64 p = 0; p < pixels; ++p) {
    const float* s = src + p * n;
    float* d = dst + p * ps;
    for (i64 r = 0; r < full_r; r += B) {
      i64 c = 0;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
      for (; c < full_n; c += B) transpose8(s + r * cols + c, cols, d + c * rows + r, rows);
#endif
      for (; c < n; ++c) {
        for (i64 i = r; i < r + B; ++i) d[c * rows + i] = s[i * cols + c];
      }
    }
    for (i64 c = 0; c < n; ++c) {
      for (i64 i = full_r; i < rows; ++i) d[c * rows + i] = s[i * cols + c];
    }
  }
}

// D = the Winograd F(m x m, 3x3) filter gradient's products, summed over the tiles and images, per kind of tile of
// the OH x OW output (winograd_tile_kinds) a block (E_q, Cg, Fg), of channels [c0, c0 + Cg) of x (C, H, W, N) and
// filters [f0, f0 + Fg) of dy (F, OH, OW, N), padding (ph, pw) in 0..2 (convnet/cpu/winograd.py turns D into dw).
// The filters' NR-wide panels are cut into one contiguous range per thread; every element of D is one thread's chain
// over the tiles in order, so the bits do not depend on the split.
void py_winograd_filter_products(const Floats& x, const Floats& dy, Floats& d, i64 C, i64 H, i64 W, i64 N, i64 c0,
                                 i64 Cg, i64 ph, i64 pw, i64 F, i64 f0, i64 Fg, i64 OH, i64 OW, int m,
                                 const std::string& isa) {
  const Isa* chosen = pick(isa);
  if (m != 2 && m != 3) throw py::value_error("winograd_filter_products: m (the output tile) must be 2 or 3");
  const i64 E = winograd_tile_kinds(m, OH, OW).total_elements();  // every kind of tile's elements
  for (i64 v : {C, H, W, N, Cg, F, Fg, OH, OW}) {
    if (v <= 0) throw py::value_error("winograd_filter_products: sizes must be positive");
  }
  if (c0 < 0 || c0 + Cg > C || f0 < 0 || f0 + Fg > F) {
    throw py::value_error("winograd_filter_products: bad channel range");
  }
  if (ph < 0 || ph > 2 || pw < 0 || pw > 2) throw py::value_error("winograd_filter_products: padding must be 0..2");
  if (OH != H + 2 * ph - 2 || OW != W + 2 * pw - 2) {
    throw py::value_error("winograd_filter_products: output size is not the 3x3 stride-1 convolution's");
  }
  if (x.size() != C * H * W * N) throw py::value_error("winograd_filter_products: x has " + std::to_string(x.size()) +
                                                       " elements, expected " + std::to_string(C * H * W * N));
  if (dy.size() != F * OH * OW * N) {
    throw py::value_error("winograd_filter_products: dy has " + std::to_string(dy.size()) + " elements, expected " +
                          std::to_string(F * OH * OW * N));
  }
  if (d.size() != E * Cg * Fg) throw py::value_error("winograd_filter_products: D has " + std::to_string(d.size()) +
                                                     " elements, expected " + std::to_string(E * Cg * Fg));
  if (!d.writeable()) throw py::value_error("winograd_filter_products: D is read-only");
  disjoint(d, x, "x");
  disjoint(d, dy, "dy");
  WinogradGrad grad;
  grad.m = m;
  grad.C = Cg, grad.H = H, grad.W = W, grad.N = N, grad.ph = ph, grad.pw = pw;
  grad.K = Fg, grad.OH = OH, grad.OW = OW;
  // The tiles (row-major) are cut into two halves of about equal work (one where there is one tile), fixed by the
  // shapes: each half sums into its own D, and D = D_0 + D_1 at the end. The halves run side by side on two
  // threads, each half's filters split further over more; one thread runs them in turn. Either way, the same bits.
  const i64 mr = chosen->mr, nr = chosen->nr, rows = (Cg + mr - 1) / mr * mr, panels = (Fg + nr - 1) / nr;
  const i64 tiles = (OH + m - 1) / m * ((OW + m - 1) / m), halves = tiles >= 2 ? 2 : 1;
  const i64 ldd = panels * nr, size = E * rows * ldd;
  const std::vector<i64> half = balanced_ranges(tile_costs(m, OH, OW), 1, tiles, halves);
  const i64 kparts = std::max<i64>(1, std::min<i64>(loop_threads() / halves, panels)), jobs = halves * kparts;
  float* dp = d.mutable_data();
  py::gil_scoped_release release;
  thread_local AlignedFloats padded, xt, dyt;  // the halves' D, padded to whole micro-tiles; x and dy pixel-major
  float* pd = padded.at_least(halves * size);
  grad.x_ps = N * Cg + 16, grad.dy_ps = N * Fg + 16;  // a line more than a pixel's (N, C) and (N, K)
  transpose_pixels(x.data() + c0 * H * W * N, Cg, H * W, N, xt.at_least(H * W * grad.x_ps), grad.x_ps);
  transpose_pixels(dy.data() + f0 * OH * OW * N, Fg, OH * OW, N, dyt.at_least(OH * OW * grad.dy_ps), grad.dy_ps);
  grad.x = xt.p;
  grad.dy = dyt.p;
  std::fill(pd, pd + halves * size, 0.0f);
  std::string error;
  const int threads = static_cast<int>(std::min<i64>(loop_threads(), jobs));
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
  for (i64 job = 0; job < jobs; ++job) {
    const i64 h = job / kparts, part = job % kparts;
    const i64 k0 = part * panels / kparts * nr, k1 = std::min(Fg, (part + 1) * panels / kparts * nr);
    try {
      thread_local AlignedFloats scratch;
      chosen->winograd_grad_run(grad, half[h], half[h + 1], k0, k1, pd + h * size, ldd,
                                scratch.at_least(chosen->winograd_grad_scratch(Cg, k1 - k0, m)));
    } catch (const std::exception& e) {
#pragma omp critical
      error = e.what();
    }
  }
  if (!error.empty()) throw std::runtime_error("winograd_filter_products: " + error);
  for (i64 e = 0; e < E; ++e) {
    for (i64 c = 0; c < Cg; ++c) {
      float* out = dp + (e * Cg + c) * Fg;
      const float* first = pd + (e * rows + c) * ldd;
      if (halves == 1) {
        std::memcpy(out, first, sizeof(float) * Fg);
      } else {
        for (i64 k = 0; k < Fg; ++k) out[k] = first[k] + first[size + k];
      }
    }
  }
}

}  // namespace

void register_gemm(py::module_& m) {
  m.def("gemm_isas", [] {
    py::list names;
    for (const Isa* isa : available()) names.append(isa->name);
    return names;
  }, "The SIMD widths of the GEMM this build has and this CPU runs, widest (the default) first");
  m.def("gemm", &py_gemm, py::arg("a"), py::arg("b"), py::arg("c"), py::arg("accumulate") = false,
        py::arg("bias") = py::none(), py::arg("relu") = false, py::arg("isa") = "",
        "c = a @ b (or c += a @ b), then + bias[:, None] and the ReLU in the store if given; float32 matrices of "
        "any strides");
  const auto geometry = [](auto&&... first) {
    return std::make_tuple(first..., py::arg("C"), py::arg("H"), py::arg("W"), py::arg("N"), py::arg("c0"),
                           py::arg("Cg"), py::arg("n0"), py::arg("nb"), py::arg("KH"), py::arg("KW"), py::arg("sh"),
                           py::arg("sw"), py::arg("ph"), py::arg("pw"), py::arg("OH"), py::arg("OW"),
                           py::arg("accumulate") = false, py::arg("isa") = "");
  };
  std::apply([&](auto&&... args) {
    m.def("conv_gemm_forward", &py_conv_forward, args..., py::arg("bias") = py::none(), py::arg("relu") = false,
          "y = w @ im2col(x) [+ bias[:, None]] [then max(., 0)], the im2col matrix never built; bias and ReLU in the "
          "GEMM's store");
  }, geometry(py::arg("w"), py::arg("x"), py::arg("y")));
  m.def("winograd_conv", &py_winograd_conv, py::arg("x"), py::arg("u"), py::arg("y"), py::arg("C"), py::arg("H"),
        py::arg("W"), py::arg("N"), py::arg("c0"), py::arg("Cg"), py::arg("ph"), py::arg("pw"), py::arg("F"),
        py::arg("f0"), py::arg("Fg"), py::arg("OH"), py::arg("OW"), py::arg("u_layout") = "ck",
        py::arg("bias") = py::none(), py::arg("relu") = false, py::arg("m") = 2, py::arg("isa") = "",
        "y[f0:f0+Fg] = the fused Winograd F(m x m, 3x3) convolution of x[c0:c0+Cg] with the transformed filters u "
        "[+ bias] [then the ReLU]");
  m.def("winograd_filter_products", &py_winograd_filter_products, py::arg("x"), py::arg("dy"), py::arg("D"),
        py::arg("C"), py::arg("H"), py::arg("W"), py::arg("N"), py::arg("c0"), py::arg("Cg"), py::arg("ph"),
        py::arg("pw"), py::arg("F"), py::arg("f0"), py::arg("Fg"), py::arg("OH"), py::arg("OW"), py::arg("m") = 2,
        py::arg("isa") = "",
        "D (a block (E, Cg, Fg) per kind of tile) = the fused Winograd F(m x m, 3x3) filter gradient's products, "
        "summed over tiles and images");
  std::apply([&](auto&&... args) {
    m.def("conv_gemm_filter", &py_conv_filter, args..., py::arg("form") = "",
          "dw = im2col(x) @ dy.T, the im2col matrix never built");
  }, geometry(py::arg("x"), py::arg("dy"), py::arg("dw")));
}

}  // namespace convnet_cpu
