"""NumPy reference for the neurons (convnet.neurons) and the element-wise joins eltsum and eltmax, float32 or
float64 (computed in the input's precision).

The neurons are cuda-convnet's (cudaconvnet/include/neuron.cuh), with each backward written from the value
cuda-convnet reads (x or y) and computed with accurate functions; softrelu is log(1 + e^x) for every x,
written max(x, 0) + log1p(e^-|x|) so that it neither overflows nor loses digits. relu and brelu map NaN to 0 (this
project's relu). abs's gradient at 0 is -dy (cuda-convnet's sign convention: x > 0 ? 1 : -1).
"""
from __future__ import annotations

import numpy as np

from convnet.neurons import Neuron


def neuron_forward(x, neuron: Neuron):
    t = x.dtype.type
    a, b = t(neuron.a), t(neuron.b)
    zero = np.zeros((), x.dtype)
    name = neuron.name
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        if name == "relu":
            return np.where(x > 0, x, zero)
        if name == "tanh":
            return a * np.tanh(b * x)
        if name == "logistic":
            return t(1) / (t(1) + np.exp(-x))
        if name == "abs":
            return np.abs(x)
        if name == "square":
            return x * x
        if name == "sqrt":
            return np.sqrt(x)
        if name == "softrelu":
            return np.maximum(x, zero) + np.log1p(np.exp(-np.abs(x)))
        if name == "brelu":
            return np.where(x > 0, np.where(x < a, x, a), zero)
        return a * x + b  # linear


def neuron_backward(x, y, dy, neuron: Neuron):
    """dx = f'(x) dy from the forward's input ``x`` and output ``y`` (the one the neuron does not read may be
    None)."""
    t = dy.dtype.type
    a, b = t(neuron.a), t(neuron.b)
    zero = np.zeros((), dy.dtype)
    name = neuron.name
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        if name == "relu":
            return np.where(y > 0, dy, zero)
        if name == "tanh":
            return dy * b * (a - y * y / a)
        if name == "logistic":
            return dy * y * (t(1) - y)
        if name == "abs":
            return np.where(x > 0, dy, -dy)
        if name == "square":
            return dy * t(2) * x
        if name == "sqrt":
            return dy / (t(2) * y)
        if name == "softrelu":
            return dy * -np.expm1(-y)  # e^x / (1 + e^x) = 1 - e^-y
        if name == "brelu":
            return np.where((y > 0) & (y < a), dy, zero)
        return dy * a  # linear


def eltsum_forward(xs, coeffs):
    """y = sum_i coeffs[i] * xs[i], added in input order."""
    t = xs[0].dtype.type
    y = t(coeffs[0]) * xs[0]
    for c, x in zip(coeffs[1:], xs[1:]):
        y = t(c) * x + y
    return y


def eltsum_backward(dy, coeff):
    return dy.dtype.type(coeff) * dy


def eltmax_forward(xs):
    """(y, which): y the element-wise maximum, which (uint8) the index of the input it came from: the first of tied
    inputs; a NaN wins over numbers (the first NaN)."""
    y = xs[0].copy()
    which = np.zeros(y.shape, np.uint8)
    for i, x in enumerate(xs[1:], 1):
        take = (x > y) | (np.isnan(x) & ~np.isnan(y))
        y = np.where(take, x, y)
        which[take] = i
    return y, which


def eltmax_backward(which, dy, index: int):
    """The gradient of input ``index``: dy where it gave the maximum, else 0."""
    return np.where(which == index, dy, np.zeros((), dy.dtype))
