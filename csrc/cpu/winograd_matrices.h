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

#include <initializer_list>
#include <type_traits>

namespace convnet_cpu {

template <int M>
struct WinogradMatrices;

// F(1, 3) along one axis: the direct products (alpha 3, identity transforms, the output the sum of the 3), for the
// last tile of an axis where m leaves a single output (winograd_tile_kinds).
template <>
struct WinogradMatrices<1> {
  static constexpr int kAlpha = 3;
  static constexpr float BT[3][3] = {{1, 0, 0}, {0, 1, 0}, {0, 0, 1}};
  static constexpr float G[3][3] = {{1, 0, 0}, {0, 1, 0}, {0, 0, 1}};
  static constexpr float AT[1][3] = {{1, 1, 1}};
};

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

// The kinds of tile of F(m x m, 3x3) on an oh x ow output: m x m tiles, and where m leaves one output along an axis
// (oh % m == 1, m > 1) the last tile there is F(1, 3) along it (alpha 3 instead of m + 2: 13 outputs by F(3) take
// 4 x 5 + 3 = 23 transformed rows instead of 25); a last tile with 2 of 3 outputs stays whole. Kind q is (my[q],
// mx[q]) tiles with (my + 2) (mx + 2) elements; the order (m x m; m x 1; 1 x m; 1 x 1, those present: no m along an
// axis of one output) is the layout of the transformed filters, one (elements, Cg, Fg) block per kind (winograd.cpp;
// the fused kernels read them so).
struct WinogradTileKinds {
  int count = 0;
  int my[4] = {}, mx[4] = {};
  long long elements(int q) const { return (my[q] + 2LL) * (mx[q] + 2LL); }
  long long elements_before(int q) const {
    long long e = 0;
    for (int i = 0; i < q; ++i) e += elements(i);
    return e;
  }
  long long total_elements() const { return elements_before(count); }
  int index(int y, int x) const {  // the kind of y x x tiles (-1: none)
    for (int q = 0; q < count; ++q) {
      if (my[q] == y && mx[q] == x) return q;
    }
    return -1;
  }
};

inline int winograd_last_tile(long long out, int m) { return m > 1 && out % m == 1 ? 1 : m; }

inline WinogradTileKinds winograd_tile_kinds(int m, long long oh, long long ow) {
  WinogradTileKinds k;
  const int ly = winograd_last_tile(oh, m), lx = winograd_last_tile(ow, m);
  // an axis's sizes: m where it has an m-wide tile, 1 where its last tile is F(1)
  const bool my = oh >= m || ly == m, mx = ow >= m || lx == m;
  for (int y : {m, 1}) {
    if (y == m ? !my : ly != 1) continue;
    for (int x : {m, 1}) {
      if (x == m ? !mx : lx != 1) continue;
      k.my[k.count] = y, k.mx[k.count] = x, ++k.count;
    }
  }
  return k;
}

// f(my, mx) with the tile sizes as std::integral_constants: m x m, or 1 along the axes where the tile is the last
// and F(1) (f1y: rows, f1x: columns), so that each kind's kernel is compiled for its sizes.
template <int M, class F>
inline void for_tile_kind(bool f1y, bool f1x, F&& f) {
  using Whole = std::integral_constant<int, M>;
  using One = std::integral_constant<int, 1>;
  if (!f1y && !f1x) {
    f(Whole{}, Whole{});
  } else if (!f1y) {
    f(Whole{}, One{});
  } else if (!f1x) {
    f(One{}, Whole{});
  } else {
    f(One{}, One{});
  }
}

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
