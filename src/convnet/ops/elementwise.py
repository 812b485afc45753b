"""ReLU and inverted dropout: the op API (kernels in csrc/kernels/elementwise.cu, reference in
convnet/reference/elementwise.py).

Dropout is keyed on (seed, offset, element index) through Philox4x32-10, so numpy, emu and cuda draw
bit-identical masks, and the backward pass regenerates the mask instead of storing it. Use a different
``offset`` (e.g. the training step) or ``seed`` (e.g. per layer) for each call that needs a fresh mask. ``start``
is the index of the tensor's first element in the mask's stream (default 0): a tensor that is a slice of a larger
one (tower b's units of a dropout layer split across two towers, ``start = 2048 * N``) draws exactly that slice of
the larger tensor's mask. ``batch=(global_n, first)`` says the tensor (..., N), images fastest, is images
[first, first + N) of a batch of global_n images (a data-parallel rank's shard): its row r (the leading axes
flattened) draws stream elements start + r * global_n + first + [0, N), its images' part of the whole batch's mask,
so the ranks together draw exactly the single-process masks. Without it (or with ``(N, 0)``) element i is stream
element start + i, as before.

Storage: float32 (float64 on the numpy device) or bfloat16 (``convnet.ops._checks.BFLOAT16``): ReLU and dropout on
bfloat16 arrays compute in float32 and round each result once to bfloat16 (``convnet.reference.storage``); a call's
arrays (and ``out``) share one dtype, else TypeError.
"""
from __future__ import annotations

import math
import numbers

import numpy as np

from convnet.ops._checks import (as_device, check_array, check_same_dtype, scalar, storage_dtypes, storage_kernel,
                                 uint64)
from convnet.ops._dispatch import Output, launch, produce
from convnet.reference import elementwise as ref


def relu_forward(device, x, out=None, stream=None):
    """y = max(x, 0) (NaN -> 0). ``out`` may be ``x`` (in place), but not partially overlap it."""
    dev = as_device(device)
    check_array("x", x, dev, dtypes=storage_dtypes(dev))
    return produce(dev, Output("out", out, x.shape, x.dtype), inputs=dict(x=x), elementwise=True, stream=stream,
                   reference=lambda: dev.host_function(ref.relu_forward)(x),
                   kernel=lambda y: launch(dev, storage_kernel("relu_forward", x.dtype), x, y, x.size, stream=stream))


def relu_backward(device, y, dy, out=None, stream=None):
    """dx = dy where y > 0 else 0, from ReLU's *output* y. ``out`` may be ``dy``."""
    dev = as_device(device)
    check_array("y", y, dev, dtypes=storage_dtypes(dev))
    check_array("dy", dy, dev, shape=y.shape, dtypes=storage_dtypes(dev))
    check_same_dtype(y=y, dy=dy)
    return produce(dev, Output("out", out, y.shape, y.dtype), inputs=dict(y=y, dy=dy), elementwise=True,
                   stream=stream, reference=lambda: dev.host_function(ref.relu_backward)(y, dy),
                   kernel=lambda dx: launch(dev, storage_kernel("relu_backward", y.dtype), y, dy, dx, y.size,
                                            stream=stream))


def _batch(batch, shape) -> tuple[int, int]:
    """``batch=(global_n, first)`` checked against an array of ``shape``: ValueError unless it is two integers with
    0 <= first and first + N <= global_n (N: the array's last axis, its images)."""
    if (not isinstance(batch, (tuple, list)) or len(batch) != 2
            or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in batch)):
        raise ValueError(f"batch must be a pair (global_n, first) of integers, got {batch!r}")
    global_n, first = (int(v) for v in batch)
    if not shape:
        raise ValueError("batch needs an array with a batch axis (its last), got a 0-d array")
    if first < 0 or global_n < 0 or first + shape[-1] > global_n:
        raise ValueError(f"batch = (global_n, first) = ({global_n}, {first}) must hold this array's {shape[-1]} "
                         f"images: 0 <= first and first + {shape[-1]} <= global_n")
    return global_n, first


def _dropout_params(keep, seed, offset, start, shape, batch):
    """The checked parameters (keep, seed, offset, start, rows, cols, global_n, first): the array is ``rows`` runs of
    ``cols`` elements, run r being stream elements start + r * global_n + first + [0, cols). A shard whose runs
    join (one row, or the whole batch) is the plain form: one run, start + i (the kernels' fastest path)."""
    keep = scalar("keep", keep, low=0.0, high=1.0, low_open=True)
    seed, offset, start = uint64("seed", seed), uint64("offset", offset), uint64("start", start)
    n = math.prod(shape)
    if batch is None:
        if start + n >= 2**64:
            raise ValueError(f"start + the number of elements must be below 2**64, got {start} + {n}")
        return keep, seed, offset, start, 1, n, n, 0
    global_n, first = _batch(batch, shape)
    rows = math.prod(shape[:-1])
    if start + rows * global_n >= 2**64:
        raise ValueError(f"start + the number of elements of the whole batch ({rows} x {global_n}) must be below "
                         f"2**64, got {start} + {rows * global_n}")
    if n == 0:
        return keep, seed, offset, start, 1, 0, 0, 0
    if rows == 1 or shape[-1] == global_n:
        return keep, seed, offset, start + first, 1, n, n, 0
    return keep, seed, offset, start, rows, shape[-1], global_n, first


def _dropout(dev, name, a, keep, seed, offset, start, batch, out, stream, host=ref.dropout_forward):
    """``host``: the reference of the call (the backward's is the forward's mask and scale too; the cpu device applies
    the mask its forward kept instead of drawing it again)."""
    check_array(name, a, dev, dtypes=storage_dtypes(dev))
    keep, seed, offset, start, rows, cols, global_n, first = _dropout_params(keep, seed, offset, start, a.shape, batch)
    host_batch = None if rows == 1 else (global_n, first)
    return produce(dev, Output("out", out, a.shape, a.dtype), inputs={name: a}, elementwise=True, stream=stream,
                   reference=lambda: dev.host_function(host)(a, keep, seed, offset, start, host_batch),
                   kernel=lambda b: launch(dev, storage_kernel("dropout_apply", a.dtype), a, b, rows, cols, global_n,
                                           first, ref.keep_threshold(keep), float(ref.dropout_scale(keep)), seed,
                                           offset, start, stream=stream))


def dropout_forward(device, x, keep, seed, offset=0, start=0, batch=None, out=None, stream=None):
    """Inverted dropout: y = x * mask / keep, each element kept with probability ``keep`` in (0, 1]; ``x`` draws
    elements [start, start + x.size) of the mask keyed on (seed, offset), or with ``batch=(global_n, first)`` its
    images' part of the mask of a batch of global_n images (module docstring)."""
    return _dropout(as_device(device), "x", x, keep, seed, offset, start, batch, out, stream)


def dropout_backward(device, dy, keep, seed, offset=0, start=0, batch=None, out=None, stream=None):
    """dx = dy * mask / keep with the mask of the forward call that had the same (keep, seed, offset, start,
    batch)."""
    return _dropout(as_device(device), "dy", dy, keep, seed, offset, start, batch, out, stream, ref.dropout_backward)


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


def dropout_mask(device, shape, keep, seed, offset=0, start=0, batch=None, stream=None):
    """The boolean keep-mask a dropout call with these parameters uses, as an array on the device."""
    dev = as_device(device)
    shape = _shape(shape)
    keep, seed, offset, start, rows, cols, global_n, first = _dropout_params(keep, seed, offset, start, shape, batch)
    host_batch = None if rows == 1 else (global_n, first)

    def kernel(mask):
        launch(dev, "dropout_mask", mask, rows, cols, global_n, first, ref.keep_threshold(keep), seed, offset, start,
               stream=stream)

    mask = produce(dev, Output("mask", None, shape, np.dtype(np.uint8)), stream=stream, kernel=kernel,
                   reference=lambda: dev.host_function(ref.dropout_mask)(shape, keep, seed, offset, start, host_batch)
                   .view(np.uint8))
    keep_mask = dev.empty(shape, np.dtype(bool), stream=stream)
    dev.submit(lambda: dev.xp.not_equal(mask, 0, out=keep_mask), stream)  # after the kernel that writes the mask
    return keep_mask
