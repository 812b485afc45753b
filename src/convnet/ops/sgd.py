"""The SGD update (momentum and weight decay) of one parameter, in place: the op API (reference in
convnet/reference/sgd.py, the cpu device's single pass in convnet/cpu/sgd.py).

    sgd_update(dev, w, g, v, *, lr, momentum, weight_decay, stream=None) -> (w, v)
        v <- momentum * v - weight_decay * lr * w - lr * g;  w <- w + v

On the host devices the host function updates ``w`` and ``v``; on the kernel devices (emu, cuda) the device's array
module does the reference's statements, submitted to ``stream``. Every device rounds each statement to the dtype in
the same order, so results are bit-identical to the reference's. ``w``, ``g`` and ``v`` must be three disjoint arrays
of the same shape and dtype: the device's dtypes, and on the host devices float32 or float64 (the optimizer updates
whatever parameters a net holds; the cpu device's float64 update is the reference's).
"""
from __future__ import annotations

import numpy as np

from convnet.ops._checks import as_device, check_array, check_same_dtype, scalar
from convnet.ops._dispatch import Output, produce
from convnet.reference import sgd as ref


def sgd_update(device, w, g, v, *, lr, momentum, weight_decay, stream=None):
    """Update the parameter ``w`` and its velocity ``v`` in place from the gradient ``g``; returns ``(w, v)``."""
    dev = as_device(device)
    dtypes = (np.float32, np.float64) if dev.runs_reference else None
    check_array("w", w, dev, dtypes=dtypes)
    check_array("g", g, dev, shape=w.shape, dtypes=dtypes)
    check_array("v", v, dev, shape=w.shape, dtypes=dtypes)
    check_same_dtype(w=w, g=g, v=v)
    lr, momentum, weight_decay = scalar("lr", lr), scalar("momentum", momentum), scalar("weight_decay", weight_decay)

    def kernel(w_, v_):  # the reference's statements on the device's arrays; produce submits them to the op's stream
        ref.sgd_update(w_, g, v_, lr=lr, momentum=momentum, weight_decay=weight_decay)

    # w and v are outputs given by the caller (updated in place); each must be disjoint from g and from the other
    return produce(dev, (Output("w", w, w.shape, w.dtype), Output("v", v, v.shape, v.dtype)), inputs=dict(g=g),
                   stream=stream, kernel=kernel,
                   reference=lambda: dev.host_function(ref.sgd_update)(w, g, v, lr=lr, momentum=momentum,
                                                                        weight_decay=weight_decay))
