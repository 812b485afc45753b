"""NumPy reference for the SGD update (momentum and weight decay, the AlexNet paper's rule), in place:

    v <- momentum * v - weight_decay * lr * w - lr * g
    w <- w + v

computed as four NumPy statements, each rounded to the parameter's dtype (float32 or float64), the coefficients
rounded to it first: the arithmetic convnet.optim.SGD has always done, so a run's results are unchanged. Only
in-place operators: the kernel devices run these very statements on their own arrays (CuPy on cuda).
"""
from __future__ import annotations

__all__ = ["sgd_update", "sgd_update_many"]


def sgd_update(w, g, v, *, lr: float, momentum: float, weight_decay: float):
    """Update ``w`` and ``v`` in place from the gradient ``g``; returns ``(w, v)``. A zero ``weight_decay`` skips
    the decay term (also for a non-finite w)."""
    dt = w.dtype.type
    v *= dt(momentum)
    if weight_decay != 0.0:
        v -= dt(weight_decay * lr) * w
    v -= dt(lr) * g
    w += v
    return w, v


def sgd_update_many(ws, gs, vs, *, lrs, momentums, weight_decays):
    """``sgd_update`` of each parameter in turn (the lists are parallel); returns ``(ws, vs)``."""
    for w, g, v, lr, momentum, weight_decay in zip(ws, gs, vs, lrs, momentums, weight_decays):
        sgd_update(w, g, v, lr=lr, momentum=momentum, weight_decay=weight_decay)
    return ws, vs
