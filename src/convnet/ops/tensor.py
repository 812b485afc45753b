"""Whole-array ops of the layer graph itself (reference in convnet/reference/tensor.py): the join of a layer's
inputs, the sum of the gradients of an output read by several layers, the scaling of the cost's gradient.

They are ops, not array-module calls in the graph, for the same reason as the kernels: each checks that its arrays
live on its device and runs on the op's stream (``Device.submit``), so on an emulated emu stream it is ordered
after the kernels that write its inputs. The work is the array module's (NumPy, CuPy): memory-bound copies and
additions, not worth a hand-written kernel.

    concat:  (C_1, *rest), (C_2, *rest), ... -> (C_1 + C_2 + ..., *rest)
    add:     out = a + b                    (``out`` may be ``a`` or ``b``: in place)
    scale:   out = factor * a               (``out`` may be ``a``)
    window:  (C, H, W, N) -> (C, EH, EW, N), out[:, i, j] = x[:, h0 + i, w0 + j], ``fill`` outside x (pad / crop)
    multiply: out = a * b, b broadcast      (per-position factors: cuda-convnet's overhanging pooling windows)
"""
from __future__ import annotations

import numpy as np

from convnet.ops._checks import as_device, check_array, check_disjoint, check_same_dtype, scalar
from convnet.ops._dispatch import Output, produce
from convnet.reference import tensor as ref


def concat(device, arrays, out=None, stream=None):
    """``arrays`` (a list or tuple of at least one array of ``device``, one dtype, equal shapes after the first
    axis) joined along the first axis."""
    dev = as_device(device)
    if not isinstance(arrays, (list, tuple)) or not arrays:
        raise TypeError(f"arrays must be a non-empty list or tuple of arrays, got {type(arrays).__name__}")
    named = {f"arrays[{i}]": a for i, a in enumerate(arrays)}
    for name, a in named.items():
        check_array(name, a, dev)
        if a.ndim < 1:
            raise ValueError(f"{name} must be at least 1-D, got a 0-d array")
    rest = tuple(arrays[0].shape[1:])
    for name, a in named.items():
        if tuple(a.shape[1:]) != rest:
            raise ValueError(f"{name} has shape {tuple(a.shape)}: every array must have shape (*, "
                             f"{', '.join(map(str, rest))}) to be joined along the first axis")
    dtype = check_same_dtype(**named)
    shape = (sum(int(a.shape[0]) for a in arrays), *rest)

    def kernel(o):
        dev.xp.concatenate(arrays, axis=0, out=o)

    return produce(dev, Output("out", out, shape, dtype), inputs=named, stream=stream, kernel=kernel,
                   reference=lambda: dev.host_function(ref.concat)(arrays))


def add(device, a, b, out=None, stream=None):
    """a + b, arrays of ``device`` of the same shape and dtype. ``out`` may be ``a`` or ``b`` exactly."""
    dev = as_device(device)
    check_array("a", a, dev)
    check_array("b", b, dev, shape=a.shape)
    dtype = check_same_dtype(a=a, b=b)
    return produce(dev, Output("out", out, tuple(a.shape), dtype), inputs=dict(a=a, b=b), elementwise=True,
                   stream=stream, kernel=lambda o: dev.xp.add(a, b, out=o),
                   reference=lambda: dev.host_function(ref.add)(a, b))


def scale(device, a, factor, out=None, stream=None):
    """factor * a (factor a real number, applied in a's dtype). ``out`` may be ``a`` exactly."""
    dev = as_device(device)
    check_array("a", a, dev)
    factor = scalar("factor", factor)
    return produce(dev, Output("out", out, tuple(a.shape), a.dtype), inputs=dict(a=a), elementwise=True,
                   stream=stream, kernel=lambda o: dev.xp.multiply(a, a.dtype.type(factor), out=o),
                   reference=lambda: dev.host_function(ref.scale)(a, factor))


def window(device, x, start, size, fill=0.0, out=None, stream=None):
    """The (C, size_h, size_w, N) window of a (C, H, W, N) array of ``device`` whose corner is at ``start`` = (h0,
    w0) in x (negative, or running past x: those positions hold ``fill``, a number or -inf)."""
    dev = as_device(device)
    check_array("x", x, dev, ndim=4)
    (h0, w0), (eh, ew) = (_ints(name, v) for name, v in (("start", start), ("size", size)))
    if eh < 1 or ew < 1:
        raise ValueError(f"size must be positive, got {(eh, ew)}")
    fill = float(fill)
    if fill != fill:
        raise ValueError("fill must not be NaN")
    C, H, W, N = (int(s) for s in x.shape)
    hs, he, ws, we = max(h0, 0), min(h0 + eh, H), max(w0, 0), min(w0 + ew, W)

    def kernel(o):
        o[...] = fill
        if hs < he and ws < we:
            o[:, hs - h0:he - h0, ws - w0:we - w0, :] = x[:, hs:he, ws:we, :]

    return produce(dev, Output("out", out, (C, eh, ew, N), x.dtype), inputs=dict(x=x), stream=stream, kernel=kernel,
                   reference=lambda: ref.window(x, (h0, w0), (eh, ew), fill))


def multiply(device, a, b, out=None, stream=None):
    """a * b, arrays of ``device`` of one dtype, b broadcast against a (as many dimensions, each b's equal to a's or
    1). ``out`` may be ``a`` exactly."""
    dev = as_device(device)
    check_array("a", a, dev)
    check_array("b", b, dev)
    check_same_dtype(a=a, b=b)
    if b.ndim != a.ndim or any(q not in (1, p) for p, q in zip(a.shape, b.shape)):
        raise ValueError(f"b of shape {tuple(b.shape)} does not broadcast against a of shape {tuple(a.shape)}")
    return produce(dev, Output("out", out, tuple(a.shape), a.dtype), inputs=dict(a=a, b=b), elementwise=True,
                   stream=stream, kernel=lambda o: dev.xp.multiply(a, b, out=o),
                   reference=lambda: dev.host_function(ref.multiply)(a, b))


def _ints(name, v):
    if (not isinstance(v, (tuple, list)) or len(v) != 2
            or any(isinstance(i, bool) or not isinstance(i, (int, np.integer)) for i in v)):
        raise TypeError(f"{name} must be a pair of integers (h, w), got {v!r}")
    return int(v[0]), int(v[1])
