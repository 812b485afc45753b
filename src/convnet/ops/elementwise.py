"""ReLU and inverted dropout: the op API (kernels in csrc/kernels/elementwise.cu, reference in
convnet/reference/elementwise.py).

Dropout is keyed on (seed, offset, element index) through Philox4x32-10, so numpy, emu and cuda draw
bit-identical masks, and the backward pass regenerates the mask instead of storing it. Use a different
``offset`` (e.g. the training step) or ``seed`` (e.g. per layer) for each call that needs a fresh mask. ``start``
is the index of the tensor's first element in the mask's stream (default 0): a tensor that is a slice of a larger
one (tower b's units of a dropout layer split across two towers, ``start = 2048 * N``) draws exactly that slice of
the larger tensor's mask.
"""
from __future__ import annotations

import math
import numbers

import numpy as np

from convnet.ops._checks import as_device, check_array, check_same_dtype, scalar, uint64
from convnet.ops._dispatch import Output, launch, produce
from convnet.reference import elementwise as ref

__all__ = ["relu_forward", "relu_backward", "dropout_forward", "dropout_backward", "dropout_mask"]


def relu_forward(device, x, out=None, stream=None):
    """y = max(x, 0) (NaN -> 0). ``out`` may be ``x`` (in place), but not partially overlap it."""
    dev = as_device(device)
    check_array("x", x, dev)
    return produce(dev, Output("out", out, x.shape, x.dtype), inputs=dict(x=x), elementwise=True, stream=stream,
                   reference=lambda: dev.host(ref).relu_forward(x),
                   kernel=lambda y: launch(dev, "relu_forward", x, y, x.size, stream=stream))


def relu_backward(device, y, dy, out=None, stream=None):
    """dx = dy where y > 0 else 0, from ReLU's *output* y. ``out`` may be ``dy``."""
    dev = as_device(device)
    check_array("y", y, dev)
    check_array("dy", dy, dev, shape=y.shape)
    check_same_dtype(y=y, dy=dy)
    return produce(dev, Output("out", out, y.shape, y.dtype), inputs=dict(y=y, dy=dy), elementwise=True,
                   stream=stream, reference=lambda: dev.host(ref).relu_backward(y, dy),
                   kernel=lambda dx: launch(dev, "relu_backward", y, dy, dx, y.size, stream=stream))


def _dropout_params(keep, seed, offset, start, n):
    keep = scalar("keep", keep, low=0.0, high=1.0, low_open=True)
    start = uint64("start", start)
    if start + n >= 2**64:
        raise ValueError(f"start + the number of elements must be below 2**64, got {start} + {n}")
    return keep, uint64("seed", seed), uint64("offset", offset), start


def _dropout(dev, name, a, keep, seed, offset, start, out, stream):
    check_array(name, a, dev)
    keep, seed, offset, start = _dropout_params(keep, seed, offset, start, a.size)
    return produce(dev, Output("out", out, a.shape, a.dtype), inputs={name: a}, elementwise=True, stream=stream,
                   reference=lambda: dev.host(ref).dropout_forward(a, keep, seed, offset, start),
                   kernel=lambda b: launch(dev, "dropout_apply", a, b, a.size, ref.keep_threshold(keep),
                                           float(ref.dropout_scale(keep)), seed, offset, start, stream=stream))


def dropout_forward(device, x, keep, seed, offset=0, start=0, out=None, stream=None):
    """Inverted dropout: y = x * mask / keep, each element kept with probability ``keep`` in (0, 1]; ``x`` draws
    elements [start, start + x.size) of the mask keyed on (seed, offset)."""
    return _dropout(as_device(device), "x", x, keep, seed, offset, start, out, stream)


def dropout_backward(device, dy, keep, seed, offset=0, start=0, out=None, stream=None):
    """dx = dy * mask / keep with the mask of the forward call that had the same (keep, seed, offset, start)."""
    return _dropout(as_device(device), "dy", dy, keep, seed, offset, start, out, stream)


def _shape(shape) -> tuple:
    """A shape: an int or a tuple/list of ints >= 0 (not floats, strings or bools), with fewer than 2**63 elements."""
    dims = tuple(shape) if isinstance(shape, (tuple, list)) else (shape,)
    if any(isinstance(s, bool) or not isinstance(s, numbers.Integral) for s in dims):
        raise TypeError(f"shape must be an int or a tuple of ints, got {shape!r}")
    dims = tuple(int(s) for s in dims)
    if any(s < 0 for s in dims):
        raise ValueError(f"shape must be non-negative, got {dims}")
    if math.prod(dims) >= 2**63:
        raise ValueError(f"shape {dims} has {math.prod(dims)} elements; at most 2**63 - 1 are supported")
    return dims


def dropout_mask(device, shape, keep, seed, offset=0, start=0, stream=None):
    """The boolean keep-mask a dropout call with these parameters uses, as an array on the device."""
    dev = as_device(device)
    shape = _shape(shape)
    n = int(np.prod(shape, dtype=np.int64))
    keep, seed, offset, start = _dropout_params(keep, seed, offset, start, n)

    def kernel(mask):
        launch(dev, "dropout_mask", mask, n, ref.keep_threshold(keep), seed, offset, start, stream=stream)

    mask = produce(dev, Output("mask", None, shape, np.dtype(np.uint8)), stream=stream, kernel=kernel,
                   reference=lambda: dev.host(ref).dropout_mask(n, keep, seed, offset, start).reshape(shape)
                   .view(np.uint8))
    keep_mask = dev.empty(shape, np.dtype(bool), stream=stream)
    dev.submit(lambda: dev.xp.not_equal(mask, 0, out=keep_mask), stream)  # after the kernel that writes the mask
    return keep_mask
