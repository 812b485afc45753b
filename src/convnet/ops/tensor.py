"""Whole-array ops of the layer graph itself (reference in convnet/reference/tensor.py): the join of a layer's
inputs, the sum of the gradients of an output read by several layers, the scaling of the cost's gradient.

They are ops, not array-module calls in the graph, for the same reason as the kernels: each checks that its arrays
live on its device and runs on the op's stream (``Device.submit``), so on an emulated emu stream it is ordered
after the kernels that write its inputs. The work is the array module's (NumPy, CuPy): memory-bound copies and
additions, not worth a hand-written kernel.

    concat:  (C_1, *rest), (C_2, *rest), ... -> (C_1 + C_2 + ..., *rest)
    add:     out = a + b                    (``out`` may be ``a`` or ``b``: in place)
    scale:   out = factor * a               (``out`` may be ``a``)
"""
from __future__ import annotations


from convnet.ops._checks import as_device, check_array, check_disjoint, check_same_dtype, scalar
from convnet.ops._dispatch import Output, produce
from convnet.reference import tensor as ref


def concat(device, arrays, out=None, stream=None):
    """``arrays`` (a list or tuple of at least one array of ``device``, one dtype, equal shapes after the first
    axis) joined along the first axis."""
    dev = as_device(device)
    if not isinstance(arrays, (list, tuple)) or not arrays:
        raise TypeError(f"arrays must be a non-empty list or tuple of arrays, got {type(arrays).__name__}")
    named = {f"arrays[{i}]": a for i, a in enumerate(arrays)}
    for name, a in named.items():
        check_array(name, a, dev)
        if a.ndim < 1:
            raise ValueError(f"{name} must be at least 1-D, got a 0-d array")
    rest = tuple(arrays[0].shape[1:])
    for name, a in named.items():
        if tuple(a.shape[1:]) != rest:
            raise ValueError(f"{name} has shape {tuple(a.shape)}: every array must have shape (*, "
                             f"{', '.join(map(str, rest))}) to be joined along the first axis")
    dtype = check_same_dtype(**named)
    shape = (sum(int(a.shape[0]) for a in arrays), *rest)

    def kernel(o):
        dev.xp.concatenate(arrays, axis=0, out=o)

    return produce(dev, Output("out", out, shape, dtype), inputs=named, stream=stream, kernel=kernel,
                   reference=lambda: dev.host_function(ref.concat)(arrays))


def add(device, a, b, out=None, stream=None):
    """a + b, arrays of ``device`` of the same shape and dtype. ``out`` may be ``a`` or ``b`` exactly."""
    dev = as_device(device)
    check_array("a", a, dev)
    check_array("b", b, dev, shape=a.shape)
    dtype = check_same_dtype(a=a, b=b)
    return produce(dev, Output("out", out, tuple(a.shape), dtype), inputs=dict(a=a, b=b), elementwise=True,
                   stream=stream, kernel=lambda o: dev.xp.add(a, b, out=o),
                   reference=lambda: dev.host_function(ref.add)(a, b))


def scale(device, a, factor, out=None, stream=None):
    """factor * a (factor a real number, applied in a's dtype). ``out`` may be ``a`` exactly."""
    dev = as_device(device)
    check_array("a", a, dev)
    factor = scalar("factor", factor)
    return produce(dev, Output("out", out, tuple(a.shape), a.dtype), inputs=dict(a=a), elementwise=True,
                   stream=stream, kernel=lambda o: dev.xp.multiply(a, a.dtype.type(factor), out=o),
                   reference=lambda: dev.host_function(ref.scale)(a, factor))
