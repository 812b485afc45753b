"""Max and average pooling (CHWN): the op API. Kernels in csrc/kernels/pool.cu, reference in convnet/reference/pool.py.

Conventions (identical on numpy, emu and cuda):

* Output size, floor rule: ``OH = (H + 2*pad_h - window_h) // stride_h + 1`` (same for W), with
  ``0 <= padding <= window // 2`` and ``OH >= 1``.  AlexNet's 3x3/2 pools: 55 -> 27 -> 13 -> 6.
* Padding is implicit and never counted: max ignores it; avg divides by the number of real inputs in the window.
* Max-pooling ties: backward recomputes ``x == y`` (nothing is stored by the forward pass), and **every** input equal
  to its window's maximum receives that window's full gradient (cuda-convnet's rule); overlapping windows add up.
* Storage: float32 (float64 on the numpy device) or bfloat16 (``convnet.ops._checks.BFLOAT16``): on bfloat16 the
  math runs in float32 and each result is rounded once to bfloat16 (``convnet.reference.storage``). A call's arrays
  (and ``out``) share one dtype, else TypeError.
"""
from __future__ import annotations

from convnet.geometry import PoolGeometry
from convnet.ops._checks import as_device, check_array, check_same_dtype, storage_dtypes, storage_kernel
from convnet.ops._dispatch import Output, launch, produce
from convnet.reference import pool as ref

_MODES = {"max": 0, "avg": 1}


def _mode(mode):
    if mode not in _MODES:
        raise ValueError(f"mode must be 'max' or 'avg', got {mode!r}")
    return mode


def _params(g: PoolGeometry) -> dict:
    return dict(window=g.window, stride=g.stride, padding=g.padding)


def pool_output_shape(x_shape, *, window=3, stride=2, padding=0):
    """(C, OH, OW, N) of pooling an input of shape (C, H, W, N)."""
    return PoolGeometry.of(x_shape, window=window, stride=stride, padding=padding).y_shape


def pool_forward(device, x, *, mode="max", window=3, stride=2, padding=0, out=None, stream=None):
    """y[c, oh, ow, n] = max or mean of x over the window at (oh*stride - padding, ow*stride - padding)."""
    dev = as_device(device)
    mode = _mode(mode)
    check_array("x", x, dev, ndim=4, dtypes=storage_dtypes(dev))
    g = PoolGeometry.of(x.shape, window=window, stride=stride, padding=padding)
    return produce(
        dev, Output("out", out, g.y_shape, x.dtype), inputs=dict(x=x), stream=stream,
        reference=lambda: dev.host_function(ref.pool_forward)(x, mode=mode, **_params(g)),
        kernel=lambda y: launch(dev, storage_kernel("pool_forward", x.dtype), x, y, g, _MODES[mode], stream=stream))


def pool_backward(device, x, y, dy, *, mode, window, stride, padding, relu_input=False, out=None, stream=None):
    """dx (shape of x). ``y`` (the forward output) is needed for max (ties are recomputed); for avg it may be None.
    ``relu_input``: x is a ReLU's output and dx is also that ReLU's backward, ``relu_backward(x, dx)`` (dx where
    x > 0, else +0), the same bits; on the cpu device one pass (the max pool's), elsewhere a second kernel."""
    dev = as_device(device)
    mode = _mode(mode)
    if not isinstance(relu_input, bool):
        raise TypeError(f"relu_input must be True or False, got {relu_input!r}")
    check_array("x", x, dev, ndim=4, dtypes=storage_dtypes(dev))
    g = PoolGeometry.of(x.shape, window=window, stride=stride, padding=padding)
    check_array("dy", dy, dev, shape=g.y_shape, dtypes=storage_dtypes(dev))
    if mode == "max" or y is not None:
        if y is None:
            raise ValueError("y (the forward output) is required for max pooling's backward pass")
        check_array("y", y, dev, shape=g.y_shape, dtypes=storage_dtypes(dev))
    check_same_dtype(x=x, y=y, dy=dy)
    return produce(
        dev, Output("out", out, x.shape, x.dtype), inputs=dict(x=x, y=y, dy=dy), stream=stream,
        reference=lambda: dev.host_function(ref.pool_backward)(x, y, dy, mode=mode, relu_input=relu_input,
                                                               **_params(g)),
        kernel=lambda dx: _pool_backward_kernels(dev, x, y, dy, dx, g, mode, relu_input, stream))


def _pool_backward_kernels(dev, x, y, dy, dx, g, mode, relu_input, stream):
    launch(dev, storage_kernel("pool_backward", x.dtype), x, y if y is not None else 0, dy, dx, g, _MODES[mode],
           stream=stream)
    if relu_input:  # the ReLU's backward in place: dx = x > 0 ? dx : 0
        launch(dev, storage_kernel("relu_backward", x.dtype), x, dx, dx, x.size, stream=stream)
