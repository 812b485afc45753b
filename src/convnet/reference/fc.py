"""NumPy reference for fully-connected layers (float32 and float64).

Layout: activations ``(features, N)``, weights ``(out_features, in_features)``::

    y  = W @ x + b[:, None]        dx = W.T @ dy        dW = dy @ x.T        db = dy.sum(axis=1)
"""
from __future__ import annotations

__all__ = ["fc_forward", "fc_backward_data", "fc_backward_weights", "fc_backward_bias"]


def fc_forward(x, w, bias=None):
    y = w @ x
    if bias is not None:
        y += bias[:, None]
    return y


def fc_backward_data(dy, w):
    return w.T @ dy


def fc_backward_weights(x, dy):
    return dy @ x.T


def fc_backward_bias(dy):
    return dy.sum(axis=1)
