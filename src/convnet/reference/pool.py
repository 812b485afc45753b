"""NumPy reference for max / average pooling in CHWN layout (the oracle; float32 and float64).

Layout: ``x`` is ``(C, H, W, N)``, images fastest; ``y`` is ``(C, OH, OW, N)``.

Conventions (the same in the CUDA kernels, ``csrc/kernels/pool.cu``):

* Output size (floor rule, the same as convolution's)::

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

__all__ = ["pair", "pool_output_size", "pool_forward", "pool_backward"]


def pair(v, name="value"):
    """An int or an (h, w) pair -> (h, w) tuple of Python ints."""
    if isinstance(v, (tuple, list)):
        if len(v) != 2:
            raise ValueError(f"{name} must be an int or an (h, w) pair, got {v!r}")
        a, b = v
    else:
        a = b = v
    out = []
    for t in (a, b):
        if isinstance(t, (bool, np.bool_)) or not isinstance(t, (int, np.integer)):
            raise TypeError(f"{name} must be an int or an (h, w) pair of ints, got {v!r}")
        out.append(int(t))
    return tuple(out)


def pool_output_size(size: int, window: int, stride: int, padding: int) -> int:
    """The floor rule: ``(size + 2*padding - window) // stride + 1``. Raises ValueError on impossible geometry."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    if padding < 0 or padding > window // 2:
        raise ValueError(f"padding must be in [0, window // 2] = [0, {window // 2}], got {padding}")
    if size + 2 * padding < window:
        raise ValueError(f"window {window} larger than the padded input {size} + 2*{padding}")
    return (size + 2 * padding - window) // stride + 1


def _geometry(x_shape, window, stride, padding):
    C, H, W, N = x_shape
    wh, ww = pair(window, "window")
    sh, sw = pair(stride, "stride")
    ph, pw = pair(padding, "padding")
    OH = pool_output_size(H, wh, sh, ph)
    OW = pool_output_size(W, ww, sw, pw)
    return (C, H, W, N), (wh, ww), (sh, sw), (ph, pw), (OH, OW)


def _counts(H, W, OH, OW, win, stride, pad):
    """Number of real inputs in each (clipped) window, shape (OH, OW)."""
    def one(size, osize, k, s, p):
        start = np.arange(osize) * s - p
        end = np.minimum(start + k, size)
        return end - np.maximum(start, 0)
    return np.outer(one(H, OH, win[0], stride[0], pad[0]), one(W, OW, win[1], stride[1], pad[1]))


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


def pool_backward(x, y, dy, *, mode="max", window=3, stride=2, padding=0):
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
    return np.ascontiguousarray(dxp[:, pad[0]:pad[0] + H, pad[1]:pad[1] + W, :])
