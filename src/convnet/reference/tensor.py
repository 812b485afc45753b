"""NumPy reference for the whole-array ops the layer graph uses between layers (joins, gradient sums, scaling)."""
from __future__ import annotations

import numpy as np


def concat(arrays):
    """The arrays joined along their first axis."""
    return np.concatenate(arrays, axis=0)


def add(a, b):
    return a + b


def scale(a, factor):
    """factor * a, in a's dtype."""
    return a * a.dtype.type(factor)


def window(x, start, size, fill):
    """``out[c, i, j, n] = x[c, start_h + i, start_w + j, n]`` where that is inside x, else ``fill``: a crop, a
    pad, or both, of a (C, H, W, N) tensor."""
    C, H, W, N = x.shape
    (h0, w0), (EH, EW) = start, size
    out = np.full((C, EH, EW, N), fill, dtype=x.dtype)
    hs, he = max(h0, 0), min(h0 + EH, H)
    ws, we = max(w0, 0), min(w0 + EW, W)
    if hs < he and ws < we:
        out[:, hs - h0:he - h0, ws - w0:we - w0, :] = x[:, hs:he, ws:we, :]
    return out


def multiply(a, b):
    """a * b, b broadcast against a (numpy's rules, b of no more dimensions than a)."""
    return a * b
