// convnet._cpu's GEMM: C (M, N) = A (M, K) B (K, N) [+ C], then the store's epilogue (+ bias per row, ReLU),
// float32, for the cpu device's convolutions and fully-connected layers (csrc/cpu/gemm.cpp; the blocked loops and
// micro-kernels in gemm_blocked.inc).
//
// Why not NumPy's BLAS: (1) a convolution's im2col operand is packed straight from the CHWN image (no im2col matrix
// in memory, an operand "view" below); (2) every element of C is one chain of fused multiply-adds over k in order
// 0..K-1 (started from 0, or from C when accumulating), whatever the tile sizes, the SIMD width (AVX2 or AVX-512)
// or the thread count, so the cpu device's results are the same bit for bit on every x86-64 CPU with FMA, whichever
// NumPy/OpenBLAS build is installed; (3) the BLAS kernel is not ours to pick (OPENBLAS_CORETYPE may hold it to
// AVX2 on an AVX-512 CPU).
#pragma once

#include <cstdint>

namespace convnet_cpu {

using i64 = std::int64_t;

// One GEMM operand: element (r, c) of a logical matrix.
struct Operand {
  const float* p = nullptr;
  i64 rs = 0, cs = 0;  // strided: p[r * rs + c * cs]
  // im2col (conv != 0): rows r = (c, ky, kx) over channels [c0, c0 + Cg), columns q = (oy, ox, n) over images
  // [n0, n0 + nb) of the image x (C, H, W, N) at p: x[c0 + c, oy*sh - ph + ky, ox*sw - pw + kx, n0 + n], 0 outside
  // (the matrix convnet/reference/conv.py's im2col builds, never built here).
  int conv = 0;
  i64 C = 0, H = 0, W = 0, N = 0, c0 = 0, Cg = 0, n0 = 0, nb = 0, KH = 0, KW = 0, sh = 1, sw = 1, ph = 0, pw = 0,
      OH = 0, OW = 0;
};

struct Output {
  float* p = nullptr;
  i64 rs = 0, cs = 0;
};

// What the blocked GEMM's store does to each element's final value (after its last k, while the tile is in
// registers): + row_bias[row] (one float add, as a separate pass over C would round it), then with relu the rule
// v > 0 ? v : +0 (NaN -> +0, -0 -> +0, as relu_forward). The convolution's and fully-connected layer's bias and
// ReLU without another pass over C, bit-identical to those passes.
struct Epilogue {
  const float* row_bias = nullptr;  // C's M rows' bias; nullptr: none
  bool relu = false;
};

// The fused Winograd F(m x m, 3x3) convolution (winograd_fused.inc; m = 2 or 3, E = (m + 2)^2 elements per tile):
// y (K, OH, OW, N) = conv(x (C, H, W, N), the transformed filters U), 3x3, stride 1, padding (ph, pw) <= 2,
// + bias[k], then the ReLU if relu. x and y point at a group's first channel; N is both the images and the pixel
// stride. U_e[c][k] = u[e*u_es + c*u_cs + k*u_ks].
struct WinogradConv {
  int m = 2;
  const float* x = nullptr;
  i64 C = 0, H = 0, W = 0, N = 0, ph = 0, pw = 0;
  const float* u = nullptr;
  i64 u_es = 0, u_cs = 0, u_ks = 0;
  float* y = nullptr;
  i64 K = 0, OH = 0, OW = 0;
  const float* bias = nullptr;
  bool relu = false;
};
// The fused Winograd filter gradient (winograd_fused.inc): D_e[c][k] = sum over the m x m tiles and images of
// (B^T d B)_e[c] (A dY A^T)_e[k] for the inputs pixel-major, channels fastest: x (H, W, N, C) and dy (OH, OW, N, K)
// (a group's channels only; pixel strides x_ps and dy_ps), 3x3, stride 1, padding (ph, pw) <= 2.
struct WinogradGrad {
  int m = 2;
  const float* x = nullptr;
  i64 C = 0, H = 0, W = 0, N = 0, ph = 0, pw = 0;
  const float* dy = nullptr;
  i64 K = 0, OH = 0, OW = 0;
  i64 x_ps = 0, dy_ps = 0;  // the pixel strides of x and dy (>= N * C and N * K floats)
};
constexpr i64 WINOGRAD_GRAD_IMAGES = 32;  // images per block of the fused filter gradient (a multiple of 16)
// Per-ISA entry point: the blocked GEMM of C's rows [m0, m1) and columns [n0, n1) on the calling thread, the
// epilogue applied in the store of the last k block.
// pack_a / pack_b: scratch of kPackFloats floats each, 64-byte aligned.
struct Isa {
  const char* name;
  void (*run)(i64 m0, i64 m1, i64 n0, i64 n1, i64 K, const Operand& a, const Operand& b, const Output& c,
              bool accumulate, const Epilogue& epilogue, float* pack_a, float* pack_b);
  i64 mr, nr;  // micro-tile: the units in which threads split M and N
  // The dot form (gemm_blocked.inc): C = A @ Bt.T with A and Bt read along k, unpacked; lanes: scratch of
  // (m1 - m0) * (n1 - n0) * 16 floats.
  void (*run_dot)(i64 m0, i64 m1, i64 n0, i64 n1, i64 K, const Operand& a, const Operand& bt, const Output& c,
                  bool accumulate, float* lanes);
  i64 dot_mr, dot_nr;
  // The fused Winograd convolution: winograd_pack packs U's elements [e0, e1) (of E: every kind of tile's) into
  // the (E * ceil(K / mr) * mr * C) floats of packed, then winograd_run does jobs [job0, job1) of the (TH * TW *
  // ceil(N / nr)) (tile, block of nr images) with scratch of winograd_scratch(C, K, m) floats (64-byte aligned).
  void (*winograd_pack)(const WinogradConv& conv, float* packed, i64 e0, i64 e1);
  void (*winograd_run)(const WinogradConv& conv, const float* packed, i64 job0, i64 job1, float* scratch);
  i64 winograd_scratch(i64 C, i64 K, int m) const {  // V, M (element strides padded), the stage
    return (m + 2) * (m + 2) * (C * nr + nr + (K + mr - 1) / mr * (mr * nr + 16) + nr);
  }
  // The fused filter gradient of the tiles [t0, t1) (row-major) and filters [k0, k1) into d (E, ceil(C / mr) * mr,
  // ldd; E: every kind of tile's elements), zero on entry.
  void (*winograd_grad_run)(const WinogradGrad& grad, i64 t0, i64 t1, i64 k0, i64 k1, float* d, i64 ldd,
                            float* scratch);
  i64 winograd_grad_scratch(i64 C, i64 k_count, int m) const {
    const i64 jb = WINOGRAD_GRAD_IMAGES, e = (m + 2) * (m + 2), cp = (C + mr - 1) / mr;
    return e * (cp * jb * mr + 16 + (k_count + nr - 1) / nr * jb * nr + 16 + (cp * mr + 15) / 16 * 16);
  }
};

const Isa* isa_avx512();  // nullptr where not built (not x86-64 GCC/Clang)
const Isa* isa_avx2();
// Floats of each of a thread's two packing buffers (gemm_blocked.inc checks that its blocks fit).
constexpr i64 kPackFloats = 192 * 1024;

// Packs elements (r, q0 .. q0 + len) of the operand (the im2col operand, or a strided one with unit column stride:
// other strided operands are packed by the callers along their contiguous axis): element q0 + j goes to
// dst[(j / panel) * panel_stride + (j % panel) * step] (zero outside the image). The packing of both GEMM operands:
// a row of A into an MR-row micro-panel (step MR, one panel), a row of B across NR-column micro-panels (step 1).
void operand_row(const Operand& op, i64 r, i64 q0, i64 len, float* dst, i64 step, i64 panel, i64 panel_stride);

}  // namespace convnet_cpu
