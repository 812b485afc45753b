"""The SGD update on the fast CPU path: the reference's arithmetic (convnet/reference/sgd.py) bit for bit -- the same
float32 coefficients, each product and difference rounded in the same order -- in one compiled pass over w, g and v
(the reference makes four passes and two temporaries). float64 parameters (a float64 net on the cpu device) get the
reference's own float64 update."""
from __future__ import annotations

import numpy as np

from convnet.cpu import contiguous, lib
from convnet.reference import sgd as reference

__all__ = ["sgd_update", "sgd_update_many"]


def sgd_update(w, g, v, *, lr: float, momentum: float, weight_decay: float):
    if w.dtype == np.float64:
        return reference.sgd_update(w, g, v, lr=lr, momentum=momentum, weight_decay=weight_decay)
    for name, a in (("w", w), ("g", g), ("v", v)):  # the loop must see these very arrays, never a converted copy
        if not (isinstance(a, np.ndarray) and a.flags.c_contiguous):
            raise ValueError(f"sgd_update: {name} must be a C-contiguous NumPy array (w and v are updated in place)")
    contiguous(w, g, v)  # float32 only: a TypeError otherwise
    dt = np.float32  # the reference's coefficients: rounded to the dtype once
    lib().sgd_update(w, g, v, float(dt(momentum)), float(dt(weight_decay * lr)), weight_decay != 0.0, float(dt(lr)))
    return w, v


def sgd_update_many(ws, gs, vs, *, lrs, momentums, weight_decays):
    """``sgd_update`` of every parameter in one compiled call (one parallel region, not one per parameter), the same
    arithmetic per element: the same bits. float64 parameters get the reference's update."""
    if any(w.dtype == np.float64 for w in ws):
        return reference.sgd_update_many(ws, gs, vs, lrs=lrs, momentums=momentums, weight_decays=weight_decays)
    dt = np.float32  # the reference's coefficients: rounded to the dtype once, as sgd_update rounds them
    # the loop takes exactly C-contiguous float32 arrays (a TypeError otherwise, never a converted copy) and checks
    # sizes and that no two arrays overlap
    lib().sgd_update_many(list(ws), list(gs), list(vs), [float(dt(m)) for m in momentums],
                          [float(dt(wd * lr)) for wd, lr in zip(weight_decays, lrs)],
                          [wd != 0.0 for wd in weight_decays], [float(dt(lr)) for lr in lrs])
    return ws, vs
