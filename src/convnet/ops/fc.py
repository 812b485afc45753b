"""Fully-connected layers through GEMM: the op API (reference in convnet/reference/fc.py).

Layout: activations ``(features, N)``, weights ``(out_features, in_features)``, bias ``(out_features,)``::

    fc_forward:          out = alpha * (W @ x + b[:, None]) + beta * out
    fc_backward_data:    out = alpha * (W.T @ dy) + beta * out
    fc_backward_weights: out = alpha * (dy @ x.T) + beta * out
    fc_backward_bias:    out = alpha * dy.sum(axis=1) + beta * out      (an addition to the contract's list)

GEMM is the device's (``Device.matmul``): NumPy (BLAS) on numpy and emu, CuPy (cuBLAS) on cuda, convnet/cpu/gemm.py
on cpu, on ``stream``.
``beta == 0`` never reads ``out`` (NaN garbage in a fresh buffer is fine), as in BLAS.
"""
from __future__ import annotations

from convnet.ops._checks import as_device, check_array, check_disjoint, check_same_dtype
from convnet.ops._dispatch import Output, accumulate, alpha_beta, output


def _gemm(dev, out, y, a, b, bias, alpha, beta, stream):
    """y = alpha * (a @ b + bias[:, None]) + beta * y with the device's GEMM, submitted to ``stream``: straight
    into ``y`` when nothing is accumulated (``out`` is the caller's array or None), else through a temporary."""

    def work():
        nonlocal y  # the in-place operators below rebind the name (to the same array)
        if out is None or (alpha == 1.0 and beta == 0.0):
            dev.matmul(a, b, out=y)
            if bias is not None:
                y += bias[:, None]
            if alpha != 1.0:
                y *= alpha
            return
        r = dev.matmul(a, b)
        if bias is not None:
            r += bias[:, None]
        accumulate(y, r, alpha, beta)

    dev.submit(work, stream)
    return y


def fc_forward(device, x, w, bias=None, out=None, alpha=1.0, beta=0.0, stream=None):
    dev = as_device(device)
    alpha, beta = alpha_beta(alpha, beta, out)
    check_array("w", w, dev, ndim=2)
    O, I = w.shape
    check_array("x", x, dev, ndim=2)
    if x.shape[0] != I:
        raise ValueError(f"x must have shape ({I}, N) to match w of shape {tuple(w.shape)}, got {tuple(x.shape)}")
    if bias is not None:
        check_array("bias", bias, dev, shape=(O,))
    check_same_dtype(x=x, w=w, bias=bias)
    y = output(dev, Output("out", out, (O, x.shape[1]), x.dtype), stream)
    check_disjoint(dev, "out", out, x=x, w=w, bias=bias)
    return _gemm(dev, out, y, w, x, bias, alpha, beta, stream)


def fc_backward_data(device, dy, w, out=None, alpha=1.0, beta=0.0, stream=None):
    dev = as_device(device)
    alpha, beta = alpha_beta(alpha, beta, out)
    check_array("w", w, dev, ndim=2)
    O, I = w.shape
    check_array("dy", dy, dev, ndim=2)
    if dy.shape[0] != O:
        raise ValueError(f"dy must have shape ({O}, N) to match w of shape {tuple(w.shape)}, got {tuple(dy.shape)}")
    check_same_dtype(dy=dy, w=w)
    dx = output(dev, Output("out", out, (I, dy.shape[1]), dy.dtype), stream)
    check_disjoint(dev, "out", out, dy=dy, w=w)
    return _gemm(dev, out, dx, w.T, dy, None, alpha, beta, stream)


def fc_backward_weights(device, x, dy, out=None, alpha=1.0, beta=0.0, stream=None):
    dev = as_device(device)
    alpha, beta = alpha_beta(alpha, beta, out)
    check_array("x", x, dev, ndim=2)
    check_array("dy", dy, dev, ndim=2)
    if dy.shape[1] != x.shape[1]:
        raise ValueError(f"x {tuple(x.shape)} and dy {tuple(dy.shape)} must have the same number of images (axis 1)")
    check_same_dtype(x=x, dy=dy)
    dw = output(dev, Output("out", out, (dy.shape[0], x.shape[0]), x.dtype), stream)
    check_disjoint(dev, "out", out, x=x, dy=dy)
    return _gemm(dev, out, dw, dy, x.T, None, alpha, beta, stream)


def fc_backward_bias(device, dy, out=None, alpha=1.0, beta=0.0, stream=None):
    dev = as_device(device)
    alpha, beta = alpha_beta(alpha, beta, out)
    check_array("dy", dy, dev, ndim=2)
    db = output(dev, Output("out", out, (dy.shape[0],), dy.dtype), stream)
    check_disjoint(dev, "out", out, dy=dy)
    dev.submit(lambda: accumulate(db, dy.sum(axis=1), alpha, beta), stream)
    return db
