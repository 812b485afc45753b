"""bfloat16 storage for the references of the ops that have a bfloat16 variant (pooling, LRN, ReLU, dropout,
softmax): the result rule every device follows.

An op given bfloat16 arrays computes exactly what it computes in float32 on the float32 images of its inputs (every
bfloat16 value is exactly a float32), and rounds each result once to bfloat16 (nearest even, ``ml_dtypes``; a NaN
stays a NaN)::

    op_bf16(x) = round_bf16(op_float32(float32(x)))

The kernels do the same: each loads bfloat16, computes in float and stores with one round-to-nearest-even. Where an
op only selects (max pooling's forward, ReLU) the rounding is exact; a sum of several bfloat16 values (max pooling's
backward with overlapping windows), dropout's scale, avg pooling, LRN and softmax round once.
"""
from __future__ import annotations

import functools

import ml_dtypes
import numpy as np

from convnet.reference.precision import to_bf16

__all__ = ["BFLOAT16", "bf16_storage", "is_bf16", "is_bf16_storage"]

#: The dtype bfloat16 activations are stored in, on the host (NumPy) and on the GPU (CuPy accepts ml_dtypes' dtype).
BFLOAT16 = np.dtype(ml_dtypes.bfloat16)


def is_bf16(a) -> bool:
    """Is ``a`` an array stored in bfloat16?"""
    return getattr(a, "dtype", None) == BFLOAT16


def is_bf16_storage(function) -> bool:
    """Does the reference ``function`` accept bfloat16 arrays (decorated with :func:`bf16_storage`)?"""
    return getattr(function, "bf16_storage", False)


def _upcast(a):
    return a.astype(np.float32) if is_bf16(a) else a


def bf16_storage(function=None, *, rounded=None):
    """Decorate a float reference so that bfloat16 arguments follow the rule of this module: when any argument is a
    bfloat16 array, every bfloat16 argument is upcast to float32, ``function`` runs, and its results (an array, or
    the entries ``rounded`` of its tuple; None: all) are rounded to bfloat16. Other calls run ``function`` as it is.
    """
    def decorate(f):
        @functools.wraps(f)
        def wrapped(*args, **kwargs):
            if not any(is_bf16(a) for a in (*args, *kwargs.values())):
                return f(*args, **kwargs)
            result = f(*(_upcast(a) for a in args), **{k: _upcast(v) for k, v in kwargs.items()})
            if not isinstance(result, tuple):
                return to_bf16(result)
            keep = range(len(result)) if rounded is None else rounded
            return tuple(to_bf16(r) if i in keep else r for i, r in enumerate(result))
        wrapped.bf16_storage = True
        return wrapped
    return decorate if function is None else decorate(function)
