"""Convolution: the op API (kernels in csrc/kernels/conv.cu, reference in convnet/reference/conv.py).

Layouts (docs/architecture.md): x ``(C, H, W, N)``, w ``(C // groups, KH, KW, F)``, y ``(F, OH, OW, N)`` with
``OH = (H + 2*pad_h - KH) // stride_h + 1``. Padding is implicit zeros. Every op accumulates like cuda-convnet:
``out = alpha * result + beta * out``; with ``beta == 0`` the old contents of ``out`` are never read (so NaN
there is harmless). The forward pass with a bias computes ``alpha * (conv(x, w) + bias) + beta * out``.

Supported: any N, C, F with ``groups`` dividing C and F, any filter size, stride >= 1 (including stride larger
than the filter), padding >= 0, as long as the output is at least 1x1; the kernels use 32-bit indexing, so a
tensor with 2**31 or more elements is rejected with a ValueError.
"""
from __future__ import annotations

import contextlib
import numbers

import numpy as np

from convnet.ops._checks import accumulate, alpha_beta, as_device, check_array, check_disjoint, check_same_dtype, launch, output, pair
from convnet.geometry import ConvGeometry
from convnet.reference import conv as ref

__all__ = ["conv_forward", "conv_backward_data", "conv_backward_filter", "conv_backward_bias", "conv_output_shape"]

_INT32_MAX = 2**31 - 1


def _groups(groups) -> int:
    if isinstance(groups, bool) or not isinstance(groups, numbers.Integral):
        raise TypeError(f"groups must be an int, got {groups!r}")
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")
    return int(groups)


def _geometry(c, h, w, n, f, kh, kw, stride, padding, groups):
    """Validate a full geometry; returns (sh, sw, ph, pw, groups, oh, ow)."""
    sh, sw = pair("stride", stride, minimum=1)
    ph, pw = pair("padding", padding, minimum=0)
    groups = _groups(groups)
    if c % groups:
        raise ValueError(f"groups={groups} must divide the number of input channels {c}")
    if f % groups:
        raise ValueError(f"groups={groups} must divide the number of filters {f}")
    if h + 2 * ph < kh or w + 2 * pw < kw:
        raise ValueError(f"filter {kh}x{kw} is larger than the padded input {h + 2 * ph}x{w + 2 * pw} "
                         f"(input {h}x{w}, padding {(ph, pw)})")
    oh, ow = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    for name, size in (("input", c * h * w * n), ("output", f * oh * ow * n), ("w", (c // groups) * kh * kw * f)):
        if size > _INT32_MAX:
            raise ValueError(f"{name} would have {size} elements; the kernels support fewer than 2**31")
    return sh, sw, ph, pw, groups, oh, ow


def conv_output_shape(x_shape, w_shape, *, stride=1, padding=0, groups=1):
    """(F, OH, OW, N) of conv_forward for these shapes."""
    c, h, w, n = x_shape
    _, kh, kw, f = w_shape
    *_, oh, ow = _geometry(c, h, w, n, f, kh, kw, stride, padding, groups)
    return f, oh, ow, n


def _geom_tuple(c, h, w, n, f, kh, kw, sh, sw, ph, pw, groups):
    return ConvGeometry(*(int(v) for v in (c, h, w, n, f, kh, kw, sh, sw, ph, pw, groups)))


def _positive_shape(name, a):
    if any(s < 1 for s in a.shape):
        raise ValueError(f"{name} must have no empty dimension, got shape {tuple(a.shape)}")


def conv_forward(device, x, w, bias=None, *, stride=1, padding=0, groups=1, out=None, alpha=1.0, beta=0.0,
                 stream=None):
    """y = alpha * (conv(x, w) + bias) + beta * y; x (C, H, W, N), w (C/groups, KH, KW, F) -> y (F, OH, OW, N)."""
    dev = as_device(device)
    check_array("x", x, dev, ndim=4)
    check_array("w", w, dev, ndim=4)
    _positive_shape("x", x)
    _positive_shape("w", w)
    dtype = check_same_dtype(x=x, w=w)
    c, h, wd, n = x.shape
    cg, kh, kw, f = w.shape
    sh, sw, ph, pw, groups, oh, ow = _geometry(c, h, wd, n, f, kh, kw, stride, padding, groups)
    if cg * groups != c:
        raise ValueError(f"w must have shape ({c // groups}, KH, KW, F) for {c} input channels and groups={groups}, "
                         f"got {tuple(w.shape)}")
    if bias is not None:
        check_array("bias", bias, dev, shape=(f,))
        check_same_dtype(x=x, bias=bias)
    alpha, beta = alpha_beta(alpha, beta, out)
    if dev.kind == "numpy":
        result = ref.conv_forward(x, w, bias, stride=(sh, sw), padding=(ph, pw), groups=groups)
        if out is None and alpha == 1.0 and beta == 0.0:
            return result
        y = output("out", out, dev, (f, oh, ow, n), dtype)
        return accumulate(y, result, alpha, beta)
    y = output("out", out, dev, (f, oh, ow, n), dtype)
    check_disjoint(dev, "out", y, x=x, w=w, bias=bias)
    launch(dev, "conv_forward", x, w, bias if bias is not None else 0, y,
           _geom_tuple(c, h, wd, n, f, kh, kw, sh, sw, ph, pw, groups), alpha, beta, stream=stream)
    return y


def conv_backward_data(device, dy, w, input_hw, *, stride=1, padding=0, groups=1, out=None, alpha=1.0, beta=0.0,
                       stream=None):
    """dx = alpha * dL/dx + beta * dx for y = conv(x, w); dy (F, OH, OW, N) -> dx (C, H, W, N), (H, W) = input_hw."""
    dev = as_device(device)
    check_array("dy", dy, dev, ndim=4)
    check_array("w", w, dev, ndim=4)
    _positive_shape("dy", dy)
    _positive_shape("w", w)
    dtype = check_same_dtype(dy=dy, w=w)
    h, wd = pair("input_hw", input_hw, minimum=1)
    f, oh_, ow_, n = dy.shape
    cg, kh, kw, f2 = w.shape
    if f2 != f:
        raise ValueError(f"w has {f2} filters but dy has {f} (dy must be (F, OH, OW, N), w (C/groups, KH, KW, F))")
    groups = _groups(groups)
    c = cg * groups
    sh, sw, ph, pw, groups, oh, ow = _geometry(c, h, wd, n, f, kh, kw, stride, padding, groups)
    if (oh, ow) != (oh_, ow_):
        raise ValueError(f"dy has spatial size {(oh_, ow_)} but input_hw={(h, wd)} with filter {kh}x{kw}, "
                         f"stride {(sh, sw)} and padding {(ph, pw)} gives {(oh, ow)}")
    alpha, beta = alpha_beta(alpha, beta, out)
    if dev.kind == "numpy":
        result = ref.conv_backward_data(dy, w, (h, wd), stride=(sh, sw), padding=(ph, pw), groups=groups)
        if out is None and alpha == 1.0 and beta == 0.0:
            return result
        dx = output("out", out, dev, (c, h, wd, n), dtype)
        return accumulate(dx, result, alpha, beta)
    dx = output("out", out, dev, (c, h, wd, n), dtype)
    check_disjoint(dev, "out", dx, dy=dy, w=w)
    launch(dev, "conv_backward_data", dy, w, dx, _geom_tuple(c, h, wd, n, f, kh, kw, sh, sw, ph, pw, groups),
           alpha, beta, stream=stream)
    return dx


def conv_backward_filter(device, x, dy, filter_hw, *, stride=1, padding=0, groups=1, out=None, alpha=1.0, beta=0.0,
                         stream=None):
    """dw = alpha * dL/dw + beta * dw; x (C, H, W, N), dy (F, OH, OW, N) -> dw (C/groups, KH, KW, F)."""
    dev = as_device(device)
    check_array("x", x, dev, ndim=4)
    check_array("dy", dy, dev, ndim=4)
    _positive_shape("x", x)
    _positive_shape("dy", dy)
    dtype = check_same_dtype(x=x, dy=dy)
    kh, kw = pair("filter_hw", filter_hw, minimum=1)
    c, h, wd, n = x.shape
    f, oh_, ow_, n2 = dy.shape
    if n2 != n:
        raise ValueError(f"dy has {n2} images but x has {n} (x is (C, H, W, N), dy (F, OH, OW, N))")
    sh, sw, ph, pw, groups, oh, ow = _geometry(c, h, wd, n, f, kh, kw, stride, padding, groups)
    if (oh, ow) != (oh_, ow_):
        raise ValueError(f"dy has spatial size {(oh_, ow_)} but x {(h, wd)} with filter {kh}x{kw}, stride "
                         f"{(sh, sw)} and padding {(ph, pw)} gives {(oh, ow)}")
    alpha, beta = alpha_beta(alpha, beta, out)
    shape = (c // groups, kh, kw, f)
    if dev.kind == "numpy":
        result = ref.conv_backward_filter(x, dy, (kh, kw), stride=(sh, sw), padding=(ph, pw), groups=groups)
        if out is None and alpha == 1.0 and beta == 0.0:
            return result
        dw = output("out", out, dev, shape, dtype)
        return accumulate(dw, result, alpha, beta)
    dw = output("out", out, dev, shape, dtype)
    check_disjoint(dev, "out", dw, x=x, dy=dy)
    geom = _geom_tuple(c, h, wd, n, f, kh, kw, sh, sw, ph, pw, groups)
    ws_floats = int(dev.kernels.conv_backward_filter_workspace(geom))
    ws = None
    if ws_floats:
        # Allocate the scratch on the stream that runs the kernels: CuPy's pool then cannot hand the memory to
        # another stream's allocation while the kernels still use it.
        with dev.activate(), (stream if stream is not None else contextlib.nullcontext()):
            ws = dev.empty((ws_floats,), np.float32)
    launch(dev, "conv_backward_filter", x, dy, dw, ws if ws is not None else 0, ws_floats, geom, alpha, beta,
           stream=stream)
    return dw


def conv_backward_bias(device, dy, out=None, alpha=1.0, beta=0.0, stream=None):
    """db = alpha * dy summed over everything but its first axis + beta * db; dy (F, ...) -> db (F,)."""
    dev = as_device(device)
    check_array("dy", dy, dev)
    if dy.ndim < 2:
        raise ValueError(f"dy must be at least 2-D (F, ...), got shape {tuple(dy.shape)}")
    _positive_shape("dy", dy)
    alpha, beta = alpha_beta(alpha, beta, out)
    f = dy.shape[0]
    if dev.kind == "numpy":
        result = ref.conv_backward_bias(dy)
        if out is None and alpha == 1.0 and beta == 0.0:
            return result
        db = output("out", out, dev, (f,), dy.dtype)
        return accumulate(db, result, alpha, beta)
    db = output("out", out, dev, (f,), dy.dtype)
    check_disjoint(dev, "out", db, dy=dy)
    per_filter = dy.size // f
    if f > _INT32_MAX:
        raise ValueError(f"dy has {f} filters; the kernel supports fewer than 2**31")
    launch(dev, "conv_backward_bias", dy, db, f, per_filter, alpha, beta, stream=stream)
    return db
