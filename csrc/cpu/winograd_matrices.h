// The Winograd F(m x m, 3x3) transforms of the cpu device's 3x3 stride-1 convolutions (Lavin & Gray; Toom-Cook with
// the points 0, 1, -1 (and 2 for m = 3) and infinity), tile ALPHA = m + 2. For one ALPHA x ALPHA input patch d, a
// filter g and an m x m output tile:
//   y = A^T [(G g G^T) . (B^T d B)] A          (the forward; the data gradient is the forward of the transposed
//                                                convolution: the filters rotated by 180 degrees, padding 2 - p)
//   dw = G^T [sum over tiles (B^T d B) . (A dY A^T)] G   (the filter gradient: the same identity read the other way)
// src/convnet/cpu/winograd.py holds the same matrices (MATRICES; tests/test_winograd.py checks them against the
// direct convolution in float64). F(2x2): 16 products per 4 outputs; F(3x3): 25 per 9 (2.25x and 3.24x fewer than
// 36 and 81). B^T and A^T are dyadic (exact in float); G's thirds round.
#pragma once

namespace convnet_cpu {

template <int M>
struct WinogradMatrices;

template <>
struct WinogradMatrices<2> {
  static constexpr int kAlpha = 4;
  static constexpr float BT[4][4] = {{1, 0, -1, 0}, {0, 1, 1, 0}, {0, -1, 1, 0}, {0, 1, 0, -1}};
  static constexpr float G[4][3] = {{1, 0, 0}, {0.5f, 0.5f, 0.5f}, {0.5f, -0.5f, 0.5f}, {0, 0, 1}};
  static constexpr float AT[2][4] = {{1, 1, 1, 0}, {0, 1, -1, -1}};
};

template <>
struct WinogradMatrices<3> {
  static constexpr int kAlpha = 5;
  static constexpr float BT[5][5] = {{1, -0.5f, -1, 0.5f, 0},
                                     {0, 1, 0.5f, -0.5f, 0},
                                     {0, -1, 1.5f, -0.5f, 0},
                                     {0, -0.5f, 0, 0.5f, 0},
                                     {0, 2, -1, -2, 1}};
  static constexpr float G[5][3] = {{1, 0, 0},
                                    {1, 1, 1},
                                    {1.0f / 3, -1.0f / 3, 1.0f / 3},
                                    {1.0f / 3, 2.0f / 3, 4.0f / 3},
                                    {0, 0, 1}};
  static constexpr float AT[3][5] = {{1, 1, 1, 1, 0}, {0, 1, -1, 2, 0}, {0, 1, 1, 4, 1}};
};

// out[i * os] = sum over j of mat[i][j] * in[j * is] (or of mat[j][i] with transposed), a fixed sequence of
// roundings: the nonzero terms in order of j, the first one the start (-x for -1), then a coefficient of +-1 an
// addition or subtraction, any other a multiplication and then an addition (never fused). T is float or a SIMD
// vector; add, sub, mul its operations and zero its 0. With the matrix a constant and the loops unrolled, the
// compiler keeps only the nonzero terms.
template <bool transposed, int R, int K, class T, class Add, class Sub, class Mul>
inline void winograd_apply(const float (&mat)[R][K], const T* in, int is, T* out, int os, T zero, Add add, Sub sub,
                           Mul mul) {
  constexpr int rows = transposed ? K : R, cols = transposed ? R : K;
#pragma GCC unroll 8
  for (int i = 0; i < rows; ++i) {
    T acc = zero;
    bool first = true;
#pragma GCC unroll 8
    for (int j = 0; j < cols; ++j) {
      const float c = transposed ? mat[j][i] : mat[i][j];
      if (c == 0.0f) continue;
      const T x = in[j * is];
      if (c == 1.0f) {
        acc = first ? x : add(acc, x);
      } else if (c == -1.0f) {
        acc = first ? sub(zero, x) : sub(acc, x);
      } else {
        const T t = mul(c, x);
        acc = first ? t : add(acc, t);
      }
      first = false;
    }
    out[i * os] = acc;
  }
}

}  // namespace convnet_cpu
