"""NumPy reference for same-map response normalisation (``rnorm``) and contrast normalisation (``cnorm``) in CHWN
layout (float32 and float64): cuda-convnet's ResponseNormLayer and ContrastNormLayer.

For pixel ``p = (h, w)`` of a map of ``x`` ``(C, H, W, N)``, the window ``W(p)`` is rows ``[h - size//2,
h - size//2 + size)`` and columns ``[w - size//2, w - size//2 + size)`` clipped to the image (cuda-convnet's
placement: symmetric for odd sizes, one more row/column before the pixel for even sizes), and ``a = alpha /
size**2`` (cuda-convnet divides the layer's ``scale`` by the window's area, also where the window is clipped)::

    rnorm:  denom_p = k + a * sum_{q in W(p)} x_q**2                    y_p = x_p * denom_p**(-beta)
    cnorm:  m_q = x_q - mean_{r in W(q)} x_r   (over the clipped window's real pixels)
            denom_p = k + a * sum_{q in W(p)} m_q**2                    y_p = x_p * denom_p**(-beta)

(cnorm divides x itself, not m, as cuda-convnet does.) Backward, exact, with ``t_p = dy_p * x_p * denom_p**(-beta)
/ denom_p`` and ``W'(r) = {p : r in W(p)}`` (rows ``[h - (size-1)//2, h + size//2]``, columns likewise)::

    u_r = -2 * a * beta * s_r * sum_{p in W'(r)} t_p        (s = x for rnorm, m for cnorm)
    rnorm:  dx_r = dy_r * denom_r**(-beta) + u_r
    cnorm:  dx_r = dy_r * denom_r**(-beta) + u_r - sum_{q in W'(r)} u_q / |W(q)|

cuda-convnet's own cnorm backward leaves out the last term (the gradient through the window mean); this one is the
exact gradient of the forward above.
"""
from __future__ import annotations

import numpy as np

__all__ = ["rnorm_forward", "rnorm_backward", "cnorm_forward", "cnorm_backward", "window_sum"]


def window_sum(v, before: int, after: int):
    """``s[:, h, w] = sum of v[:, h + i, w + j]`` for ``i, j in [-before, after]`` inside the image (axes 1, 2)."""
    H, W = v.shape[1], v.shape[2]
    s = np.zeros_like(v)
    for i in range(-before, after + 1):
        if abs(i) >= H:
            continue
        for j in range(-before, after + 1):
            if abs(j) >= W:
                continue
            s[:, max(0, -i):H - max(0, i), max(0, -j):W - max(0, j)] += \
                v[:, max(0, i):H - max(0, -i), max(0, j):W - max(0, -j)]
    return s


def _check(size):
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")


def _forward_window(v, size):
    return window_sum(v, size // 2, (size - 1) // 2)


def _adjoint_window(v, size):
    return window_sum(v, (size - 1) // 2, size // 2)


def _counts(shape, size, dtype):
    """|W(p)| for every pixel, shaped (1, H, W, 1)."""
    return _forward_window(np.ones((1, shape[1], shape[2], 1), dtype=dtype), size)


def _normalise(x, s, size, alpha, beta, k):
    dt = x.dtype
    denom = _forward_window(s * s, size)
    denom *= dt.type(alpha / (size * size))
    denom += dt.type(k)
    return x * np.power(denom, dt.type(-beta)), denom


def rnorm_forward(x, *, size=5, alpha=1e-3, beta=0.75, k=1.0):
    """Returns ``(y, denom)``; ``denom`` is kept for the backward pass."""
    _check(size)
    x = np.asarray(x)
    return _normalise(x, x, size, alpha, beta, k)


def cnorm_forward(x, *, size=5, alpha=1e-3, beta=0.75, k=1.0):
    """Returns ``(y, mean_diff, denom)``; ``mean_diff`` (``m`` above) and ``denom`` are kept for the backward."""
    _check(size)
    x = np.asarray(x)
    m = x - _forward_window(x, size) / _counts(x.shape, size, x.dtype)
    y, denom = _normalise(x, m, size, alpha, beta, k)
    return y, m, denom


def _adjoint(x, s, denom, dy, size, alpha, beta):
    dt = np.result_type(x.dtype, dy.dtype)
    direct = np.power(denom, dt.type(-beta), dtype=dt)
    t = dy * x * direct / denom
    u = _adjoint_window(t, size)
    u *= s
    u *= dt.type(-2.0 * alpha / (size * size) * beta)
    direct *= dy
    return direct, u


def rnorm_backward(x, denom, dy, *, size=5, alpha=1e-3, beta=0.75, k=1.0):
    _check(size)
    direct, u = _adjoint(x, x, denom, dy, size, alpha, beta)
    return direct + u


def cnorm_backward(x, mean_diff, denom, dy, *, size=5, alpha=1e-3, beta=0.75, k=1.0):
    _check(size)
    direct, u = _adjoint(x, mean_diff, denom, dy, size, alpha, beta)
    return direct + u - _adjoint_window(u / _counts(x.shape, size, u.dtype), size)
