"""Max pooling on the fast CPU path (CHWN), with the reference's conventions (convnet/reference/pool.py: floor
output size, every input equal to its window's max gets that window's gradient), in one compiled pass each way.
Padded and average pooling (in no shipped model's training step) run the reference."""
from __future__ import annotations

import numpy as np

from convnet.cpu import contiguous, lib
from convnet.geometry import PoolGeometry
from convnet.reference import pool as reference


def pool_forward(x, *, mode="max", window=3, stride=2, padding=0):
    g = PoolGeometry.of(np.shape(x), window=window, stride=stride, padding=padding)
    if mode != "max" or g.padding != (0, 0):
        return reference.pool_forward(x, mode=mode, window=window, stride=stride, padding=padding)
    (x,) = contiguous(x)
    y = np.empty(g.y_shape, dtype=np.float32)
    lib().maxpool_forward(x, y, g.C, g.H, g.W, g.N, *g.window, *g.stride, g.OH, g.OW)
    return y


def pool_backward(x, y, dy, *, mode="max", window=3, stride=2, padding=0, relu_input=False):
    """relu_input: the ReLU's backward (dx where x > 0, else +0) in the same pass."""
    g = PoolGeometry.of(np.shape(x), window=window, stride=stride, padding=padding)
    if mode != "max" or g.padding != (0, 0):
        return reference.pool_backward(x, y, dy, mode=mode, window=window, stride=stride, padding=padding,
                                       relu_input=relu_input)
    x, y, dy = contiguous(x, y, dy)
    dx = np.empty(g.x_shape, dtype=np.float32)
    lib().maxpool_backward(x, y, dy, dx, g.C, g.H, g.W, g.N, *g.window, *g.stride, g.OH, g.OW, bool(relu_input))
    return dx
