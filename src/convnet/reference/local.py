"""NumPy reference for locally connected layers in the CHWN layout (the oracle for the kernels; also the cpu
device's implementation).

A locally connected layer is a convolution whose filters are not shared across output positions (cuda-convnet's
``local`` layers). Layouts (docs/architecture.md):
    x   (C, H, W, N)                   images fastest
    w   (OH*OW, C // groups, KH, KW, F) one filter bank per output position p = oy*OW + ox (cuda-convnet's
                                       (numModules, numFilterColors, filterPixels, numFilters))
    y   (F, OH, OW, N)                 OH = (H + 2*pad_h - KH) // stride_h + 1, padding implicit zeros
    b   (F,) shared over positions, or (F, OH, OW) one per filter and position (``sharedBiases = 0``)

Method: the patches of the zero-padded input (the same strided view as conv's im2col), then one batched matmul
over positions per group: ``y[:, p] = w[p].T @ patches[p]``. Float32 and float64: the result has the inputs'
dtype (float64 if mixed).
"""
from __future__ import annotations

import numpy as np

from convnet.geometry import LocalGeometry
from convnet.reference.conv import _pad, _result_dtype, _windows

__all__ = ["local_forward", "local_backward_data", "local_backward_filter", "local_backward_bias",
           "local_forward_naive"]


def _patches(x, g: LocalGeometry, grp: int):
    """(P, K, N) patch matrices of group ``grp``: K = Cg*KH*KW ordered (c, ky, kx), as w's rows."""
    xp = _pad(x[grp * g.Cg:(grp + 1) * g.Cg], g.pad_h, g.pad_w)
    win = _windows(xp, g.KH, g.KW, g.OH, g.OW, g.stride_h, g.stride_w)  # (Cg, KH, KW, OH, OW, N)
    return win.transpose(3, 4, 0, 1, 2, 5).reshape(g.OH * g.OW, g.Cg * g.KH * g.KW, g.N)


def _w_matrices(w, g: LocalGeometry, grp: int):
    """(P, K, Fg) filter matrices of group ``grp``."""
    return w.reshape(g.OH * g.OW, g.Cg * g.KH * g.KW, g.F)[:, :, grp * g.Fg:(grp + 1) * g.Fg]


def local_forward(x, w, bias=None, stride=1, padding=0, groups=1):
    """y[f, oy, ox, n] = sum_{c,ky,kx} w[oy*OW + ox, c, ky, kx, f] * xpad[g*Cg + c, oy*sh + ky, ox*sw + kx, n]
    + b[f] (or b[f, oy, ox])."""
    x, w = np.asarray(x), np.asarray(w)
    g = LocalGeometry.of(x.shape, w.shape, stride=stride, padding=padding, groups=groups)
    dt = _result_dtype(x, w, bias)
    x, w = x.astype(dt, copy=False), w.astype(dt, copy=False)
    y = np.empty((g.F, g.OH * g.OW, g.N), dtype=dt)
    for grp in range(g.groups):
        yg = np.matmul(_w_matrices(w, g, grp).transpose(0, 2, 1), _patches(x, g, grp))  # (P, Fg, N)
        y[grp * g.Fg:(grp + 1) * g.Fg] = yg.transpose(1, 0, 2)
    y = y.reshape(g.y_shape)
    if bias is not None:
        b = np.asarray(bias, dtype=dt)
        y += b.reshape(g.F, 1, 1, 1) if b.ndim == 1 else b.reshape(g.F, g.OH, g.OW, 1)
    return y


def local_backward_data(dy, w, input_hw, stride=1, padding=0, groups=1):
    """dx = d(sum y*dy)/dx for y = local_forward(x, w): per position w[p] @ dy[:, p], scattered back (col2im)."""
    dy, w = np.asarray(dy), np.asarray(w)
    g = LocalGeometry.of_backward_data(dy.shape, w.shape, input_hw, stride=stride, padding=padding, groups=groups)
    dt = _result_dtype(dy, w)
    dy, w = dy.astype(dt, copy=False), w.astype(dt, copy=False)
    (sh, sw), (ph, pw) = g.stride, g.padding
    dyp = dy.reshape(g.F, g.OH * g.OW, g.N)
    dx = np.empty(g.x_shape, dtype=dt)
    for grp in range(g.groups):
        dyg = dyp[grp * g.Fg:(grp + 1) * g.Fg].transpose(1, 0, 2)  # (P, Fg, N)
        cols = np.matmul(_w_matrices(w, g, grp), dyg)  # (P, K, N)
        cols = cols.reshape(g.OH, g.OW, g.Cg, g.KH, g.KW, g.N).transpose(2, 3, 4, 0, 1, 5)
        dxp = np.zeros((g.Cg, g.H + 2 * ph, g.W + 2 * pw, g.N), dtype=dt)
        for ky in range(g.KH):
            for kx in range(g.KW):
                dxp[:, ky:ky + sh * (g.OH - 1) + 1:sh, kx:kx + sw * (g.OW - 1) + 1:sw, :] += cols[:, ky, kx]
        dx[grp * g.Cg:(grp + 1) * g.Cg] = dxp[:, ph:ph + g.H, pw:pw + g.W, :]
    return dx


def local_backward_filter(x, dy, filter_hw, stride=1, padding=0, groups=1):
    """dw[p, c, ky, kx, f] = sum_n xpad[g*Cg + c, oy*sh + ky, ox*sw + kx, n] * dy[f, oy, ox, n], p = oy*OW + ox."""
    x, dy = np.asarray(x), np.asarray(dy)
    g = LocalGeometry.of_backward_filter(x.shape, dy.shape, filter_hw, stride=stride, padding=padding, groups=groups)
    dt = _result_dtype(x, dy)
    x, dy = x.astype(dt, copy=False), dy.astype(dt, copy=False)
    dyp = dy.reshape(g.F, g.OH * g.OW, g.N)
    dw = np.empty((g.OH * g.OW, g.Cg * g.KH * g.KW, g.F), dtype=dt)
    for grp in range(g.groups):
        dyg = dyp[grp * g.Fg:(grp + 1) * g.Fg].transpose(1, 2, 0)  # (P, N, Fg)
        dw[:, :, grp * g.Fg:(grp + 1) * g.Fg] = np.matmul(_patches(x, g, grp), dyg)
    return dw.reshape(g.w_shape)


def local_backward_bias(dy, shared=True):
    """db: dy summed over (OH, OW, N) -> (F,) when the biases are shared, over N -> (F, OH, OW) otherwise."""
    dy = np.asarray(dy)
    dy = dy.astype(_result_dtype(dy), copy=False)
    return dy.sum(axis=(1, 2, 3)) if shared else dy.sum(axis=3)


def local_forward_naive(x, w, bias=None, stride=1, padding=0, groups=1):
    """Direct loops in float64 (slow; tests only): the definition, independent of the patch view and matmul."""
    x = np.asarray(x, dtype=np.float64)
    w = np.asarray(w, dtype=np.float64)
    g = LocalGeometry.of(x.shape, w.shape, stride=stride, padding=padding, groups=groups)
    y = np.zeros(g.y_shape)
    for f in range(g.F):
        grp = f // g.Fg
        for oy in range(g.OH):
            for ox in range(g.OW):
                p = oy * g.OW + ox
                for c in range(g.Cg):
                    for ky in range(g.KH):
                        iy = oy * g.stride_h - g.pad_h + ky
                        if not 0 <= iy < g.H:
                            continue
                        for kx in range(g.KW):
                            ix = ox * g.stride_w - g.pad_w + kx
                            if 0 <= ix < g.W:
                                y[f, oy, ox] += w[p, c, ky, kx, f] * x[grp * g.Cg + c, iy, ix]
    if bias is not None:
        b = np.asarray(bias, dtype=np.float64)
        y += b.reshape(g.F, 1, 1, 1) if b.ndim == 1 else b[..., None]
    return y
