"""Max and average pooling (CHWN): the op API. Kernels in csrc/kernels/pool.cu, reference in convnet/reference/pool.py.

Conventions (identical on numpy, emu and cuda):

* Output size, floor rule: ``OH = (H + 2*pad_h - window_h) // stride_h + 1`` (same for W), with
  ``0 <= padding <= window // 2`` and ``OH >= 1``.  AlexNet's 3x3/2 pools: 55 -> 27 -> 13 -> 6.
* Padding is implicit and never counted: max ignores it; avg divides by the number of real inputs in the window.
* Max-pooling ties: backward recomputes ``x == y`` (nothing is stored by the forward pass), and **every** input equal
  to its window's maximum receives that window's full gradient (cuda-convnet's rule); overlapping windows add up.
"""
from __future__ import annotations

from convnet.ops._checks import as_device, check_array, check_disjoint, check_same_dtype, launch, output, pair
from convnet.geometry import PoolGeometry
from convnet.reference import pool as ref

__all__ = ["pool_forward", "pool_backward", "pool_output_shape"]

_MODES = {"max": 0, "avg": 1}


def _mode(mode):
    if mode not in _MODES:
        raise ValueError(f"mode must be 'max' or 'avg', got {mode!r}")
    return mode


def _geometry(x_shape, window, stride, padding):
    win = pair("window", window, minimum=1)
    st = pair("stride", stride, minimum=1)
    pad = pair("padding", padding, minimum=0)
    C, H, W, N = x_shape
    if N < 1 or C < 1 or H < 1 or W < 1:
        raise ValueError(f"x must have a non-empty shape (C, H, W, N), got {tuple(x_shape)}")
    for axis, size, k, s, p in (("height", H, win[0], st[0], pad[0]), ("width", W, win[1], st[1], pad[1])):
        if p > k // 2:
            raise ValueError(f"padding {p} along {axis} must be <= window // 2 = {k // 2} (window {k})")
        if size + 2 * p < k:
            raise ValueError(f"window {k} is larger than the padded input {axis} {size} + 2*{p}")
    OH = ref.pool_output_size(H, win[0], st[0], pad[0])
    OW = ref.pool_output_size(W, win[1], st[1], pad[1])
    return win, st, pad, (C, OH, OW, N)


def pool_output_shape(x_shape, *, window=3, stride=2, padding=0):
    """(C, OH, OW, N) of pooling an input of shape (C, H, W, N)."""
    return _geometry(tuple(x_shape), window, stride, padding)[3]


def pool_forward(device, x, *, mode="max", window=3, stride=2, padding=0, out=None, stream=None):
    """y[c, oh, ow, n] = max or mean of x over the window at (oh*stride - padding, ow*stride - padding)."""
    dev = as_device(device)
    mode = _mode(mode)
    check_array("x", x, dev, ndim=4)
    win, st, pad, yshape = _geometry(x.shape, window, stride, padding)
    y = output("out", out, dev, yshape, x.dtype)
    check_disjoint(dev, "out", out, x=x)
    if dev.kind == "numpy":
        y[...] = ref.pool_forward(x, mode=mode, window=win, stride=st, padding=pad)
    else:
        launch(dev, "pool_forward", x, y, PoolGeometry.of(x.shape, window=win, stride=st, padding=pad), _MODES[mode], stream=stream)
    return y


def pool_backward(device, x, y, dy, *, mode, window, stride, padding, out=None, stream=None):
    """dx (shape of x). ``y`` (the forward output) is needed for max (ties are recomputed); for avg it may be None."""
    dev = as_device(device)
    mode = _mode(mode)
    check_array("x", x, dev, ndim=4)
    win, st, pad, yshape = _geometry(x.shape, window, stride, padding)
    check_array("dy", dy, dev, shape=yshape)
    if mode == "max" or y is not None:
        if y is None:
            raise ValueError("y (the forward output) is required for max pooling's backward pass")
        check_array("y", y, dev, shape=yshape)
    check_same_dtype(x=x, y=y, dy=dy)
    dx = output("out", out, dev, x.shape, x.dtype)
    check_disjoint(dev, "out", out, x=x, y=y, dy=dy)
    if dev.kind == "numpy":
        dx[...] = ref.pool_backward(x, y, dy, mode=mode, window=win, stride=st, padding=pad)
    else:
        launch(dev, "pool_backward", x, y if y is not None else 0, dy, dx, PoolGeometry.of(x.shape, window=win, stride=st, padding=pad), _MODES[mode],
               stream=stream)
    return dx
