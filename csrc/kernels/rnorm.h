// Same-map response normalisation (rnorm) and contrast normalisation (cnorm), cuda-convnet's ResponseNormLayer and
// ContrastNormLayer, in CHWN. Conventions: src/convnet/reference/rnorm.py.
//   W(p): the size x size window of pixel p = (h, w) within its map, rows [h - size/2, h - size/2 + size) and
//         columns likewise, clipped to the image (cuda-convnet's placement and edge handling);
//   denom_p = k + a * sum_{q in W(p)} s_q^2,  y_p = x_p * denom_p^-beta,  a = alpha / size^2 (the layer's `scale`
//         divided by the window's area, as cuda-convnet's layer.py does); s = x (rnorm) or m (cnorm), where
//   m_q = x_q - mean_{r in W(q)} x_r (cnorm's mean over the clipped window's real pixels).
//   Backward (exact): u_r = -2 a beta s_r sum_{p: r in W(p)} dy_p x_p denom_p^-beta / denom_p;
//         rnorm: dx_r = dy_r denom_r^-beta + u_r;
//         cnorm: dx_r = dy_r denom_r^-beta + u_r - sum_{q: r in W(q)} u_q / |W(q)|   (the window mean's adjoint).
#pragma once
#include "cuda_compat.h"

namespace convnet {

struct RnormGeometry {
  int C, H, W, N;     // x is (C, H, W, N), images fastest
  int size;           // window side
  float a, beta, k;   // a: alpha / size^2, the resolved coefficient of the sum of squares
};

RnormGeometry rnorm_geometry(int C, int H, int W, int N, int size, float a, float beta, float k);  // validates

// m = x - the window mean of x (cnorm's first step).
void cnorm_mean_diff(const float* x, float* m, const RnormGeometry& g, cudaStream_t stream);

// denom (may be null: not written) and y from x and s (s = x for rnorm, m for cnorm).
void rnorm_forward(const float* x, const float* s, float* y, float* denom, const RnormGeometry& g,
                   cudaStream_t stream);

// out = dx of rnorm (adjoint_only false: s must be x) or u (adjoint_only true: cnorm's first backward step).
void rnorm_backward(const float* x, const float* s, const float* denom, const float* dy, float* out,
                    bool adjoint_only, const RnormGeometry& g, cudaStream_t stream);

// cnorm's second backward step: dx = dy denom^-beta + u - the window mean's adjoint applied to u.
void cnorm_backward_mean(const float* dy, const float* denom, const float* u, float* dx, const RnormGeometry& g,
                         cudaStream_t stream);

}  // namespace convnet
