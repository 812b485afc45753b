"""NumPy reference for cross-map local response normalisation in CHWN layout (float32 and float64, and bfloat16
storage: float32 math on the upcast values, each result rounded once, ``convnet.reference.storage``).

For channel ``i`` of ``x`` ``(C, H, W, N)``, with window ``W(i) = [i - size//2, i - size//2 + size - 1]`` clipped to
``[0, C)`` (symmetric for odd sizes; for even sizes one more map below, as torch and cuda-convnet)::

    denom_i = k + a * sum_{j in W(i)} x_j**2         y_i = x_i * denom_i ** (-beta)

The alpha convention is an explicit argument:

* ``convention="sum"``  -> ``a = alpha``          (the 2012 paper's formula as printed: k=2, n=5, alpha=1e-4, beta=.75)
* ``convention="mean"`` -> ``a = alpha / size``   (Caffe, torch.nn.LocalResponseNorm, cuda-convnet's ``scale``)

Backward (exact, reusing the forward's ``y`` and ``denom``)::

    dx_i = dy_i * denom_i**(-beta) - 2*a*beta * x_i * sum_{j : i in W(j)} dy_j * y_j / denom_j

where ``i in W(j)`` <=> ``j in [i - (size-1)//2, i + size//2]``.
"""
from __future__ import annotations

import numpy as np

from convnet.geometry import lrn_scale
from convnet.reference.storage import bf16_storage

__all__ = ["lrn_scale", "lrn_forward", "lrn_backward"]


def _window_sum(v, before: int, after: int):
    """s_i = sum_{j=i-before}^{i+after} v_j over axis 0, clipped at the ends."""
    C = v.shape[0]
    s = v.copy()
    for o in range(1, min(before, C - 1) + 1):       # s_i += v_{i-o}
        s[o:] += v[:C - o]
    for o in range(1, min(after, C - 1) + 1):        # s_i += v_{i+o}
        s[:C - o] += v[o:]
    return s


def _check(size):
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")


@bf16_storage
def lrn_forward(x, *, size=5, alpha=1e-4, beta=0.75, k=2.0, convention="sum"):
    """Returns ``(y, denom)``; ``denom`` is kept for the backward pass."""
    _check(size)
    x = np.asarray(x)
    a = lrn_scale(alpha, size, convention)
    dt = x.dtype
    sq = x * x
    denom = _window_sum(sq, size // 2, (size - 1) // 2)
    del sq
    denom *= dt.type(a)
    denom += dt.type(k)
    y = x * np.power(denom, dt.type(-beta))
    return y, denom


@bf16_storage
def lrn_backward(x, y, denom, dy, *, size=5, alpha=1e-4, beta=0.75, k=2.0, convention="sum"):
    _check(size)
    a = lrn_scale(alpha, size, convention)
    dt = np.result_type(x.dtype, dy.dtype)
    t = dy * y
    t /= denom
    s = _window_sum(t, (size - 1) // 2, size // 2)
    del t
    s *= x
    s *= dt.type(2.0 * a * beta)
    g = np.power(denom, dt.type(-beta), dtype=dt)
    g *= dy
    g -= s
    return g
