"""ReLU on the fast CPU path: the reference's results bit for bit (NaN -> 0, -0 -> +0), in one compiled pass."""
from __future__ import annotations

import numpy as np

from convnet.cpu import contiguous, lib
from convnet.reference.elementwise import (dropout_backward, dropout_forward, dropout_mask,  # noqa: F401 (re-exported)
                                           dropout_scale, keep_threshold, philox4x32_10)


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
