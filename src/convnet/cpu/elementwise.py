"""ReLU and dropout on the fast CPU path: the reference's results bit for bit (ReLU: NaN -> 0, -0 -> +0; dropout: the
same Philox masks), each in one compiled pass."""
from __future__ import annotations

import numpy as np

from convnet.cpu import contiguous, lib
from convnet.reference.elementwise import dropout_scale, keep_threshold


def relu_forward(x):
    (x,) = contiguous(x)
    y = np.empty_like(x)
    lib().relu_forward(x, y)
    return y


def relu_backward(y, dy):
    y, dy = contiguous(y, dy)
    dx = np.empty_like(dy)
    lib().relu_backward(y, dy, dx)
    return dx


def dropout_forward(x, keep: float, seed: int, offset: int = 0, start: int = 0, batch=None):
    (x,) = contiguous(x)
    y = np.empty_like(x)
    # batch=(global_n, first): the loop's (start, global_n, first) form, x's rows of its last axis (the reference's)
    where = int(start) if batch is None else (int(start), int(batch[0]), int(batch[1]))
    lib().dropout_apply(x, y, keep_threshold(keep), float(dropout_scale(keep)), int(seed), int(offset), where)
    return y


def dropout_backward(dy, keep: float, seed: int, offset: int = 0, start: int = 0, batch=None):
    return dropout_forward(dy, keep, seed, offset, start, batch)  # the same mask and scale: d(x m / keep)/dx = m / keep
