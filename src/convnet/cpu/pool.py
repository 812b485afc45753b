"""Max pooling on the fast CPU path (CHWN), with the reference's conventions (convnet/reference/pool.py: floor
output size, every input equal to its window's max gets that window's gradient), in one compiled pass each way.
Padded and average pooling (in no shipped model's training step) run the reference."""
from __future__ import annotations

import numpy as np

from convnet.cpu import contiguous, lib
from convnet.reference import pool as reference
from convnet.reference.pool import _geometry

__all__ = ["pool_forward", "pool_backward"]


def pool_forward(x, *, mode="max", window=3, stride=2, padding=0):
    (C, H, W, N), win, st, pad, (OH, OW) = _geometry(np.shape(x), window, stride, padding)
    if mode != "max" or pad != (0, 0):
        return reference.pool_forward(x, mode=mode, window=window, stride=stride, padding=padding)
    (x,) = contiguous(x)
    y = np.empty((C, OH, OW, N), dtype=np.float32)
    lib().maxpool_forward(x, y, C, H, W, N, *win, *st, OH, OW)
    return y


def pool_backward(x, y, dy, *, mode="max", window=3, stride=2, padding=0):
    (C, H, W, N), win, st, pad, (OH, OW) = _geometry(np.shape(x), window, stride, padding)
    if mode != "max" or pad != (0, 0):
        return reference.pool_backward(x, y, dy, mode=mode, window=window, stride=stride, padding=padding)
    x, y, dy = contiguous(x, y, dy)
    dx = np.empty((C, H, W, N), dtype=np.float32)
    lib().maxpool_backward(x, y, dy, dx, C, H, W, N, *win, *st, OH, OW)
    return dx
