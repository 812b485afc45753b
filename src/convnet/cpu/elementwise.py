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


# The masks of the last few dropout forwards, keyed on everything that draws them (shape, keep, seed, offset, where):
# the backward of the same call finds its mask here and applies it (the same select and product: the same bits)
# instead of drawing the Philox words again, which costs as much as the forward. A mask is a pure function of its
# key, so an entry can never be stale; a backward that finds none draws the words as the forward did.
_MASKS: dict = {}
_MASKS_KEPT = 8  # entries: the dropout layers of a net whose backward has not run yet (first in, first out)


def _where(start, batch):
    """The loop's ``start``: an int, or with batch=(global_n, first) the form (start, global_n, first) (x's rows of
    its last axis, the reference's)."""
    return int(start) if batch is None else (int(start), int(batch[0]), int(batch[1]))


def _dropout(x, keep, seed, offset, where, mask=None):
    """dropout_apply into a new array; ``mask`` (uint8, x's shape): also the mask drawn, 1 where kept."""
    y = np.empty_like(x)
    lib().dropout_apply(x, y, keep_threshold(keep), float(dropout_scale(keep)), int(seed), int(offset), where, mask)
    return y


def dropout_forward(x, keep: float, seed: int, offset: int = 0, start: int = 0, batch=None):
    (x,) = contiguous(x)
    where = _where(start, batch)
    mask = np.empty(x.shape, np.uint8)
    y = _dropout(x, keep, seed, offset, where, mask)
    if len(_MASKS) >= _MASKS_KEPT:
        _MASKS.pop(next(iter(_MASKS), None), None)
    _MASKS[(x.shape, float(keep), int(seed), int(offset), where)] = mask
    return y


def dropout_backward(dy, keep: float, seed: int, offset: int = 0, start: int = 0, batch=None):
    """The same mask and scale as the forward (d(x m / keep)/dx = m / keep): the forward's kept mask if there is one."""
    (dy,) = contiguous(dy)
    where = _where(start, batch)
    mask = _MASKS.pop((dy.shape, float(keep), int(seed), int(offset), where), None)
    if mask is None:
        return _dropout(dy, keep, seed, offset, where)
    dx = np.empty_like(dy)
    lib().dropout_apply_mask(dy, mask, dx, float(dropout_scale(keep)))
    return dx
