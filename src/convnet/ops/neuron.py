"""Neurons (cuda-convnet's activation functions) and the element-wise joins eltsum and eltmax: the op API. Kernels
in csrc/kernels/neuron.cu, reference in convnet/reference/neuron.py, the table of neurons in convnet/neurons.py.

* ``neuron_forward(dev, x, neuron)``: y = f(x) for a neuron written as in cuda-convnet (``"tanh[1.7,0.67]"``) or a
  :class:`convnet.neurons.Neuron`; ``neuron_backward(dev, x, y, dy, neuron)``: dx = f'(x) dy from the forward's
  input x and output y (a neuron reads one of them: ``NEURONS[name].uses``; the other may be None).
* ``eltsum_forward(dev, xs, coeffs)``: y = sum_i coeffs[i] xs[i] (coeffs default to 1), ``eltsum_backward(dev, dy,
  coeff)`` = coeff dy, the gradient of the input with that coefficient.
* ``eltmax_forward(dev, xs)`` -> ``(y, which)``: the element-wise maximum and, as uint8, the index of the input it
  came from; ``eltmax_backward(dev, which, dy, index)``: the gradient of input ``index`` is dy where it gave the
  maximum, 0 elsewhere. Ties go to the first (lowest-index) input, so the gradients of the inputs add up to dy
  exactly; a NaN wins over numbers (the first NaN), so it propagates. At most 256 inputs.

The inputs of a join have one shape and dtype. Neuron ops and ``eltmax_backward``/``eltsum_backward`` may run exactly
in place (``out`` an input); the joins' forwards write ``out`` once per input, so their ``out`` must not overlap one.
"""
from __future__ import annotations

import numpy as np

from convnet.neurons import NEURONS, Neuron, parse
from convnet.ops._checks import as_device, check_array, check_same_dtype, scalar
from convnet.ops._dispatch import Output, launch, produce
from convnet.reference import neuron as ref

MAX_INPUTS = 256  # eltmax's which is a uint8


def _neuron(neuron) -> Neuron:
    n = parse(neuron)
    if n is None:
        raise ValueError(f"neuron must be one of {', '.join(NEURONS)} (with its parameters), got {neuron!r}: "
                         f"the identity needs no op")
    return n


def neuron_forward(device, x, neuron, out=None, stream=None):
    """y = f(x). ``out`` may be ``x`` (in place), but not partially overlap it."""
    dev = as_device(device)
    n = _neuron(neuron)
    check_array("x", x, dev)
    return produce(dev, Output("out", out, x.shape, x.dtype), inputs=dict(x=x), elementwise=True, stream=stream,
                   reference=lambda: dev.host_function(ref.neuron_forward)(x, n),
                   kernel=lambda y: launch(dev, "neuron_forward", x, y, x.size, n.code, n.a, n.b, stream=stream))


def neuron_backward(device, x, y, dy, neuron, out=None, stream=None):
    """dx = f'(x) dy. ``x`` and ``y`` are the forward's input and output; the one the neuron does not read
    (``convnet.neurons.NEURONS[name].uses``) may be None. ``out`` may be ``dy`` (or x, y)."""
    dev = as_device(device)
    n = _neuron(neuron)
    check_array("dy", dy, dev)
    uses = n.kind.uses
    for name, a in (("x", x), ("y", y)):
        if a is None:
            if uses == name:
                raise ValueError(f"neuron {n}'s backward reads the forward's {'input' if name == 'x' else 'output'} "
                                 f"{name}: got None")
        else:
            check_array(name, a, dev, shape=dy.shape)
    check_same_dtype(dy=dy, **{k: v for k, v in (("x", x), ("y", y)) if v is not None})
    return produce(dev, Output("out", out, dy.shape, dy.dtype), inputs=dict(x=x, y=y, dy=dy), elementwise=True,
                   stream=stream, reference=lambda: dev.host_function(ref.neuron_backward)(x, y, dy, n),
                   kernel=lambda dx: launch(dev, "neuron_backward", 0 if x is None else x, 0 if y is None else y,
                                            dy, dx, dy.size, n.code, n.a, n.b, stream=stream))


def _inputs(dev, xs, least):
    """The checked list of a join's inputs: ``least`` to MAX_INPUTS arrays of the device, of one shape and dtype."""
    if not isinstance(xs, (list, tuple)):
        raise TypeError(f"xs must be a list of arrays, got {type(xs).__name__}")
    if not least <= len(xs) <= MAX_INPUTS:
        raise ValueError(f"xs must hold {least} to {MAX_INPUTS} arrays, got {len(xs)}")
    for i, a in enumerate(xs):
        check_array(f"xs[{i}]", a, dev, shape=xs[0].shape if i else None)
    check_same_dtype(**{f"xs[{i}]": a for i, a in enumerate(xs)})
    return list(xs)


def eltsum_forward(device, xs, coeffs=None, out=None, stream=None):
    """y = sum_i coeffs[i] * xs[i] (coeffs: one finite number per input, default all 1)."""
    dev = as_device(device)
    xs = _inputs(dev, xs, 1)
    if coeffs is None:
        coeffs = [1.0] * len(xs)
    if not isinstance(coeffs, (list, tuple)) or len(coeffs) != len(xs):
        raise ValueError(f"coeffs must be a list of {len(xs)} numbers (one per input), got {coeffs!r}")
    coeffs = [scalar(f"coeffs[{i}]", c) for i, c in enumerate(coeffs)]

    def kernel(y):
        for i, (x, c) in enumerate(zip(xs, coeffs)):
            launch(dev, "eltsum_accumulate", x, y, x.size, c, 0.0 if i == 0 else 1.0, stream=stream)

    return produce(dev, Output("out", out, xs[0].shape, xs[0].dtype),
                   inputs={f"xs[{i}]": a for i, a in enumerate(xs)}, stream=stream, kernel=kernel,
                   reference=lambda: dev.host_function(ref.eltsum_forward)(xs, coeffs))


def eltsum_backward(device, dy, coeff, out=None, stream=None):
    """dx = coeff * dy: the gradient of the input whose coefficient is ``coeff``. ``out`` may be ``dy``."""
    dev = as_device(device)
    check_array("dy", dy, dev)
    coeff = scalar("coeff", coeff)
    return produce(dev, Output("out", out, dy.shape, dy.dtype), inputs=dict(dy=dy), elementwise=True, stream=stream,
                   reference=lambda: dev.host_function(ref.eltsum_backward)(dy, coeff),
                   kernel=lambda dx: launch(dev, "eltsum_accumulate", dy, dx, dy.size, coeff, 0.0, stream=stream))


def eltmax_forward(device, xs, out=None, stream=None):
    """``(y, which)``: the element-wise maximum of ``xs`` and the index (uint8) of the input each element came from
    (ties: the first). ``out`` may be ``y`` or a pair ``(y, which)``."""
    dev = as_device(device)
    xs = _inputs(dev, xs, 1)
    out_y, out_w = out if isinstance(out, (tuple, list)) else (out, None)
    outputs = (Output("out[0]" if out_w is not None else "out", out_y, xs[0].shape, xs[0].dtype),
               Output("out[1]", out_w, xs[0].shape, np.dtype(np.uint8)))

    def kernel(y, which):
        for i, x in enumerate(xs):
            launch(dev, "eltmax_step", x, y, which, x.size, i, stream=stream)

    return produce(dev, outputs, inputs={f"xs[{i}]": a for i, a in enumerate(xs)}, stream=stream, kernel=kernel,
                   reference=lambda: dev.host_function(ref.eltmax_forward)(xs))


def eltmax_backward(device, which, dy, index, out=None, stream=None):
    """dx of input ``index``: dy where ``which == index``, else 0. ``out`` may be ``dy``."""
    dev = as_device(device)
    check_array("dy", dy, dev)
    check_array("which", which, dev, shape=dy.shape, dtypes=(np.uint8,))
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < MAX_INPUTS:
        raise ValueError(f"index must be an integer in [0, {MAX_INPUTS}), got {index!r}")
    index = int(index)
    return produce(dev, Output("out", out, dy.shape, dy.dtype), inputs=dict(which=which, dy=dy), elementwise=True,
                   stream=stream, reference=lambda: dev.host_function(ref.eltmax_backward)(which, dy, index),
                   kernel=lambda dx: launch(dev, "eltmax_backward", which, dy, dx, dy.size, index, stream=stream))
