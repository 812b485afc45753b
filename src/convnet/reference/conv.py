"""NumPy reference for convolution in the CHWN layout (the oracle for the CUDA kernels).

Layouts (docs/architecture.md):
    x   (C, H, W, N)              images fastest
    w   (C // groups, KH, KW, F)  filters fastest; group g uses input channels [g*Cg, (g+1)*Cg)
                                  and filters [g*Fg, (g+1)*Fg)
    y   (F, OH, OW, N)            OH = (H + 2*pad_h - KH) // stride_h + 1 (same for W)
    b   (F,)

Method: im2col through ``numpy.lib.stride_tricks.as_strided`` on a zero-padded copy of the input (the
reference may copy; the kernels pad implicitly), then one BLAS matmul per group. Works in float32 and
float64: the result has the dtype of the inputs (float64 if they are mixed). The op layer
(``convnet.ops.conv``) adds alpha/beta accumulation and validation; these functions only check what they
need to compute correctly.

To bound memory on large batches (the numpy device trains with this), the column matrix is built for a
chunk of images at a time, so peak extra memory is about ``_COL_BUDGET`` floats.
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import as_strided

from convnet.geometry import ConvGeometry, output_size, pair

__all__ = [
    "conv_output_hw",
    "conv_forward",
    "conv_backward_data",
    "conv_backward_filter",
    "conv_backward_bias",
    "conv_forward_naive",
]

_COL_BUDGET = 1 << 25  # elements of the im2col matrix per chunk (128 MB in float32)


def conv_output_hw(input_hw, filter_hw, stride=1, padding=0):
    """(OH, OW) of a convolution (the rule of convnet.geometry)."""
    (h, w), (kh, kw) = pair("input_hw", input_hw, minimum=1), pair("filter_hw", filter_hw, minimum=1)
    (sh, sw), (ph, pw) = pair("stride", stride, minimum=1), pair("padding", padding)
    return output_size(h, kh, sh, ph), output_size(w, kw, sw, pw)


def _result_dtype(*arrays):
    return np.result_type(*[a.dtype for a in arrays if a is not None], np.float32)


def _pad(x, ph, pw):
    if ph == 0 and pw == 0:
        return x
    c, h, w, n = x.shape
    xp = np.zeros((c, h + 2 * ph, w + 2 * pw, n), dtype=x.dtype)
    xp[:, ph:ph + h, pw:pw + w, :] = x
    return xp


def _windows(xp, kh, kw, oh, ow, sh, sw):
    """View of shape (C, KH, KW, OH, OW, N) over the padded input (no copy)."""
    c, _, _, n = xp.shape
    s0, s1, s2, s3 = xp.strides
    return as_strided(xp, shape=(c, kh, kw, oh, ow, n),
                      strides=(s0, s1, s2, s1 * sh, s2 * sw, s3), writeable=False)


def image_chunks(n, per_image):
    """Chunks [(n0, n1)] of n images whose im2col matrix (``per_image`` elements per image) fits the budget."""
    step = max(1, min(n, _COL_BUDGET // max(1, per_image)))
    return [(i, min(n, i + step)) for i in range(0, n, step)]


def conv_forward(x, w, bias=None, stride=1, padding=0, groups=1):
    """y[f, oy, ox, n] = sum_{c,ky,kx} w[c, ky, kx, f] * xpad[g*Cg + c, oy*sh + ky, ox*sw + kx, n] + b[f]."""
    x = np.asarray(x)
    w = np.asarray(w)
    geo = ConvGeometry.of(x.shape, w.shape, stride=stride, padding=padding, groups=groups)
    n, cg, kh, kw, f, groups, oh, ow = geo.N, geo.Cg, geo.KH, geo.KW, geo.F, geo.groups, geo.OH, geo.OW
    (sh, sw), (ph, pw) = geo.stride, geo.padding
    dt = _result_dtype(x, w, bias)
    x = x.astype(dt, copy=False)
    w = w.astype(dt, copy=False)
    fg = f // groups
    k = cg * kh * kw
    y = np.empty((f, oh, ow, n), dtype=dt)
    for g in range(groups):
        wg = w[:, :, :, g * fg:(g + 1) * fg].reshape(k, fg)
        for n0, n1 in image_chunks(n, k * oh * ow):
            xp = _pad(x[g * cg:(g + 1) * cg, :, :, n0:n1], ph, pw)
            cols = _windows(xp, kh, kw, oh, ow, sh, sw).reshape(k, oh * ow * (n1 - n0))
            y[g * fg:(g + 1) * fg, :, :, n0:n1] = (wg.T @ cols).reshape(fg, oh, ow, n1 - n0)
    if bias is not None:
        y += np.asarray(bias, dtype=dt).reshape(f, 1, 1, 1)
    return y


def conv_backward_data(dy, w, input_hw, stride=1, padding=0, groups=1):
    """dx = d(sum y*dy)/dx for y = conv_forward(x, w): the transposed convolution (col2im of W dy)."""
    dy = np.asarray(dy)
    w = np.asarray(w)
    geo = ConvGeometry.of_backward_data(dy.shape, w.shape, input_hw, stride=stride, padding=padding, groups=groups)
    c, h, wd, n, cg, kh, kw, f, groups = geo.C, geo.H, geo.W, geo.N, geo.Cg, geo.KH, geo.KW, geo.F, geo.groups
    (sh, sw), (ph, pw), oh, ow = geo.stride, geo.padding, geo.OH, geo.OW
    dt = _result_dtype(dy, w)
    dy = dy.astype(dt, copy=False)
    w = w.astype(dt, copy=False)
    fg = f // groups
    k = cg * kh * kw
    dx = np.empty((c, h, wd, n), dtype=dt)
    hp, wp = h + 2 * ph, wd + 2 * pw
    for g in range(groups):
        wg = w[:, :, :, g * fg:(g + 1) * fg].reshape(k, fg)
        for n0, n1 in image_chunks(n, k * oh * ow):
            nb = n1 - n0
            dyg = dy[g * fg:(g + 1) * fg, :, :, n0:n1].reshape(fg, oh * ow * nb)
            cols = (wg @ dyg).reshape(cg, kh, kw, oh, ow, nb)
            dxp = np.zeros((cg, hp, wp, nb), dtype=dt)
            for ky in range(kh):
                for kx in range(kw):
                    dxp[:, ky:ky + sh * (oh - 1) + 1:sh, kx:kx + sw * (ow - 1) + 1:sw, :] += cols[:, ky, kx]
            dx[g * cg:(g + 1) * cg, :, :, n0:n1] = dxp[:, ph:ph + h, pw:pw + wd, :]
    return dx


def conv_backward_filter(x, dy, filter_hw, stride=1, padding=0, groups=1):
    """dw[c, ky, kx, f] = sum_{oy,ox,n} xpad[g*Cg + c, oy*sh + ky, ox*sw + kx, n] * dy[f, oy, ox, n]."""
    x = np.asarray(x)
    dy = np.asarray(dy)
    geo = ConvGeometry.of_backward_filter(x.shape, dy.shape, filter_hw, stride=stride, padding=padding, groups=groups)
    n, cg, kh, kw, f, groups, oh, ow = geo.N, geo.Cg, geo.KH, geo.KW, geo.F, geo.groups, geo.OH, geo.OW
    (sh, sw), (ph, pw) = geo.stride, geo.padding
    dt = _result_dtype(x, dy)
    x = x.astype(dt, copy=False)
    dy = dy.astype(dt, copy=False)
    fg = f // groups
    k = cg * kh * kw
    dw = np.zeros((cg, kh, kw, f), dtype=dt)
    for g in range(groups):
        acc = np.zeros((k, fg), dtype=dt)
        for n0, n1 in image_chunks(n, k * oh * ow):
            nb = n1 - n0
            xp = _pad(x[g * cg:(g + 1) * cg, :, :, n0:n1], ph, pw)
            cols = _windows(xp, kh, kw, oh, ow, sh, sw).reshape(k, oh * ow * nb)
            dyg = dy[g * fg:(g + 1) * fg, :, :, n0:n1].reshape(fg, oh * ow * nb)
            acc += cols @ dyg.T
        dw[:, :, :, g * fg:(g + 1) * fg] = acc.reshape(cg, kh, kw, fg)
    return dw


def conv_backward_bias(dy):
    """db[f] = sum over (OH, OW, N) of dy[f]."""
    dy = np.asarray(dy)
    dt = _result_dtype(dy)
    return dy.astype(dt, copy=False).reshape(dy.shape[0], -1).sum(axis=1)


def conv_forward_naive(x, w, bias=None, stride=1, padding=0, groups=1):
    """Direct loops (slow; tests only): the definition, independent of im2col."""
    x = np.asarray(x, dtype=np.float64)
    w = np.asarray(w, dtype=np.float64)
    geo = ConvGeometry.of(x.shape, w.shape, stride=stride, padding=padding, groups=groups)
    h, wd, n, cg, kh, kw, f, groups, oh, ow = geo.H, geo.W, geo.N, geo.Cg, geo.KH, geo.KW, geo.F, geo.groups, geo.OH, geo.OW
    (sh, sw), (ph, pw) = geo.stride, geo.padding
    fg = f // groups
    y = np.zeros((f, oh, ow, n))
    for fi in range(f):
        g = fi // fg
        for oy in range(oh):
            for ox in range(ow):
                acc = np.zeros(n)
                for ci in range(cg):
                    for ky in range(kh):
                        iy = oy * sh - ph + ky
                        if iy < 0 or iy >= h:
                            continue
                        for kx in range(kw):
                            ix = ox * sw - pw + kx
                            if ix < 0 or ix >= wd:
                                continue
                            acc += w[ci, ky, kx, fi] * x[g * cg + ci, iy, ix, :]
                y[fi, oy, ox, :] = acc
        if bias is not None:
            y[fi] += float(np.asarray(bias)[fi])
    return y
