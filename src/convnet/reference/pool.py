"""NumPy reference for max / average pooling in CHWN layout (the oracle; float32 and float64, and bfloat16 storage:
float32 math on the upcast values, each result rounded once, ``convnet.reference.storage``).

Layout: ``x`` is ``(C, H, W, N)``, images fastest; ``y`` is ``(C, OH, OW, N)``.

Conventions (the same in the CUDA kernels, ``csrc/kernels/pool.cu``):

* Output size (floor rule, the same as convolution's; ``convnet.geometry.PoolGeometry``)::

      OH = (H + 2*pad_h - window_h) // stride_h + 1      (and likewise OW)

  with ``0 <= pad < window`` ... restricted further to ``pad <= window // 2`` so that every window holds at least
  one real input, and ``OH >= 1``.  AlexNet's 3x3/2 pools give 55 -> 27 -> 13 -> 6 (ceil mode would give the same
  numbers there; it is not offered).
* Padding is implicit and never counted: max pooling ignores padded positions (they act as -inf), average pooling
  divides by the number of *real* inputs in the clipped window (``count_include_pad=False``, cuda-convnet's
  behaviour at the image border).
* Max ties (cuda-convnet's rule): the backward pass recomputes ``x == y`` for every window, so **every** input equal
  to its window's maximum receives that window's full gradient ``dy`` (nothing is split, no argmax is stored).
  With overlapping windows an input collects the gradient of every window it is a maximum of.  In AlexNet ties
  practically only occur between ReLU zeros, whose gradient the ReLU backward then discards.
* NaN: a NaN input makes its windows' max NaN (NumPy's ``maximum``; the kernels do the same), and since
  ``NaN == NaN`` is false no input of such a window receives gradient.
"""
from __future__ import annotations

import numpy as np

from convnet.geometry import PoolGeometry
from convnet.reference.elementwise import relu_backward
from convnet.reference.storage import bf16_storage

__all__ = ["pool_forward", "pool_backward"]


def _geometry(x_shape, window, stride, padding):
    g = PoolGeometry.of(x_shape, window=window, stride=stride, padding=padding)
    return (g.C, g.H, g.W, g.N), g.window, g.stride, g.padding, (g.OH, g.OW)


def _counts(H, W, OH, OW, win, stride, pad):
    """Number of real inputs in each (clipped) window, shape (OH, OW)."""
    def one(size, osize, k, s, p):
        start = np.arange(osize) * s - p
        end = np.minimum(start + k, size)
        return end - np.maximum(start, 0)
    return np.outer(one(H, OH, win[0], stride[0], pad[0]), one(W, OW, win[1], stride[1], pad[1]))


@bf16_storage
def pool_forward(x, *, mode="max", window=3, stride=2, padding=0):
    x = np.asarray(x)
    (C, H, W, N), win, st, pad, (OH, OW) = _geometry(x.shape, window, stride, padding)
    if mode not in ("max", "avg"):
        raise ValueError(f"mode must be 'max' or 'avg', got {mode!r}")
    dt = x.dtype
    fill = -np.inf if mode == "max" else 0
    xp = np.full((C, H + 2 * pad[0], W + 2 * pad[1], N), fill, dtype=dt)
    xp[:, pad[0]:pad[0] + H, pad[1]:pad[1] + W, :] = x
    y = None
    for i in range(win[0]):
        for j in range(win[1]):
            s = xp[:, i:i + st[0] * (OH - 1) + 1:st[0], j:j + st[1] * (OW - 1) + 1:st[1], :]
            if y is None:
                y = s.copy()
            elif mode == "max":
                np.maximum(y, s, out=y)
            else:
                y += s
    if mode == "avg":
        y /= _counts(H, W, OH, OW, win, st, pad).astype(dt)[None, :, :, None]
    return y


@bf16_storage
def pool_backward(x, y, dy, *, mode="max", window=3, stride=2, padding=0, relu_input=False):
    """dx; ``relu_input``: x is a ReLU's output, and dx is also that ReLU's backward (``relu_backward(x, dx)``)."""
    x = np.asarray(x)
    (C, H, W, N), win, st, pad, (OH, OW) = _geometry(x.shape, window, stride, padding)
    if mode not in ("max", "avg"):
        raise ValueError(f"mode must be 'max' or 'avg', got {mode!r}")
    dt = np.result_type(x.dtype, dy.dtype)
    Hp, Wp = H + 2 * pad[0], W + 2 * pad[1]
    dxp = np.zeros((C, Hp, Wp, N), dtype=dt)
    if mode == "max":
        xp = np.full((C, Hp, Wp, N), -np.inf, dtype=x.dtype)
        xp[:, pad[0]:pad[0] + H, pad[1]:pad[1] + W, :] = x
    else:
        g = dy / _counts(H, W, OH, OW, win, st, pad).astype(dt)[None, :, :, None]
    for i in range(win[0]):
        for j in range(win[1]):
            sl = (slice(None), slice(i, i + st[0] * (OH - 1) + 1, st[0]),
                  slice(j, j + st[1] * (OW - 1) + 1, st[1]), slice(None))
            if mode == "max":
                dxp[sl] += np.where(xp[sl] == y, dy, 0)
            else:
                dxp[sl] += g
    dx = np.ascontiguousarray(dxp[:, pad[0]:pad[0] + H, pad[1]:pad[1] + W, :])
    return relu_backward(x, dx) if relu_input else dx
