"""The SGD update (momentum and weight decay) of one parameter or of many, in place: the op API (reference in
convnet/reference/sgd.py, the cpu device's single pass in convnet/cpu/sgd.py).

    sgd_update(dev, w, g, v, *, lr, momentum, weight_decay, stream=None) -> (w, v)
        v <- momentum * v - weight_decay * lr * w - lr * g;  w <- w + v

On the host devices the host function updates ``w`` and ``v``; on the kernel devices (emu, cuda) the device's array
module does the reference's statements, submitted to ``stream``. Every device rounds each statement to the dtype in
the same order, so results are bit-identical to the reference's. ``w``, ``g`` and ``v`` must be three disjoint arrays
of the same shape and dtype: the device's dtypes, and on the host devices float32 or float64 (the optimizer updates
whatever parameters a net holds; the cpu device's float64 update is the reference's).

    sgd_update_many(dev, ws, gs, vs, *, lrs, momentums, weight_decays, stream=None) -> (ws, vs)
        sgd_update of each (ws[k], gs[k], vs[k]) with lrs[k], momentums[k], weight_decays[k]

the optimizer's update of a whole net in one call: the same checks per parameter, every array disjoint from all the
others, the same bits. The cpu device runs it as one compiled loop (no Python per parameter, one parallel region).
"""
from __future__ import annotations

import functools

import numpy as np

from convnet.ops._checks import as_device, check_all_disjoint, check_array, check_same_dtype, scalar
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


@functools.lru_cache(maxsize=1024)
def _names(k: int, lists: tuple) -> tuple:
    """("ws[k]", ...): the names errors give the k-th entries of ``lists``, built once (every step checks them all)."""
    return tuple(f"{name}[{k}]" for name in lists)


def sgd_update_many(device, ws, gs, vs, *, lrs, momentums, weight_decays, stream=None):
    """``sgd_update`` of every ``(ws[k], gs[k], vs[k])`` with its own ``lrs[k]``, ``momentums[k]`` and
    ``weight_decays[k]`` (parallel sequences), in place; returns ``(ws, vs)`` as lists."""
    dev = as_device(device)
    ws, gs, vs, lrs, momentums, weight_decays = (list(x) for x in (ws, gs, vs, lrs, momentums, weight_decays))
    if not len(ws) == len(gs) == len(vs) == len(lrs) == len(momentums) == len(weight_decays):
        raise ValueError(f"sgd_update_many: ws, gs, vs, lrs, momentums and weight_decays must have the same length, "
                         f"got {len(ws)}, {len(gs)}, {len(vs)}, {len(lrs)}, {len(momentums)}, {len(weight_decays)}")
    dtypes = (np.float32, np.float64) if dev.runs_reference else None
    named = {}
    for k, (w, g, v) in enumerate(zip(ws, gs, vs)):
        w_name, g_name, v_name = _names(k, ("ws", "gs", "vs"))
        check_array(w_name, w, dev, dtypes=dtypes, writeable=True)
        check_array(g_name, g, dev, shape=w.shape, dtypes=dtypes)
        check_array(v_name, v, dev, shape=w.shape, dtypes=dtypes, writeable=True)
        if not w.dtype == g.dtype == v.dtype:
            check_same_dtype(**{w_name: w, g_name: g, v_name: v})  # raises, naming them
        named[w_name], named[g_name], named[v_name] = w, g, v
    lrs, momentums, weight_decays = ([scalar(_names(k, (what,))[0], x) for k, x in enumerate(values)]
                                     for what, values in (("lrs", lrs), ("momentums", momentums),
                                                          ("weight_decays", weight_decays)))
    check_all_disjoint(dev, named)  # updated in any order (on cpu, in parallel): no array may be another's
    kw = dict(lrs=lrs, momentums=momentums, weight_decays=weight_decays)
    if dev.runs_reference:
        dev.host_function(ref.sgd_update_many)(ws, gs, vs, **kw)
    else:  # the reference's statements on the device's arrays, submitted to the op's stream
        dev.submit(lambda: ref.sgd_update_many(ws, gs, vs, **kw), stream)
    return ws, vs
