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
