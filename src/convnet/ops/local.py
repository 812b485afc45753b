"""Locally connected layers (a convolution whose filters are not shared across output positions): the op API.
Kernels in csrc/kernels/local.cu, reference in convnet/reference/local.py.

Layouts (docs/architecture.md): x ``(C, H, W, N)``, w ``(OH*OW, C // groups, KH, KW, F)`` (one filter bank per
output position, row-major; cuda-convnet's ``(numModules, numFilterColors, filterPixels, numFilters)``), y
``(F, OH, OW, N)`` with conv's output rule and implicit zero padding. Biases: ``(F,)`` shared over positions or
``(F, OH, OW)`` one per filter and position (cuda-convnet's ``sharedBiases = 0``). The ops accumulate like conv's:
``out = alpha * result + beta * out``, and ``out`` is not read when ``beta == 0``.
"""
from __future__ import annotations

from convnet.geometry import LocalGeometry
from convnet.ops._checks import as_device, check_array, check_same_dtype
from convnet.ops._dispatch import Output, alpha_beta, launch, produce
from convnet.ops.conv import conv_backward_bias
from convnet.reference import local as ref

_BIAS_NONE, _BIAS_SHARED, _BIAS_PER_POSITION = 0, 1, 2


def _params(g: LocalGeometry) -> dict:
    return dict(stride=g.stride, padding=g.padding, groups=g.groups)


def local_forward(device, x, w, bias=None, *, stride=1, padding=0, groups=1, out=None, alpha=1.0, beta=0.0,
                  stream=None):
    """y = alpha * (local(x, w) + bias) + beta * y; x (C, H, W, N), w (OH*OW, C/groups, KH, KW, F), bias None,
    (F,) or (F, OH, OW) -> y (F, OH, OW, N)."""
    dev = as_device(device)
    check_array("x", x, dev, ndim=4)
    check_array("w", w, dev, ndim=5)
    dtype = check_same_dtype(x=x, w=w)
    g = LocalGeometry.of(x.shape, w.shape, stride=stride, padding=padding, groups=groups)
    mode = _BIAS_NONE
    if bias is not None:
        check_array("bias", bias, dev)
        if tuple(bias.shape) == (g.F,):
            mode = _BIAS_SHARED
        elif tuple(bias.shape) == (g.F, g.OH, g.OW):
            mode = _BIAS_PER_POSITION
        else:
            raise ValueError(f"bias must have shape (F,) = {(g.F,)} (shared) or (F, OH, OW) = "
                             f"{(g.F, g.OH, g.OW)} (per position), got {tuple(bias.shape)}")
        check_same_dtype(x=x, bias=bias)
    alpha, beta = alpha_beta(alpha, beta, out)
    return produce(
        dev, Output("out", out, g.y_shape, dtype), inputs=dict(x=x, w=w, bias=bias), alpha=alpha, beta=beta,
        stream=stream, reference=lambda: dev.host_function(ref.local_forward)(x, w, bias, **_params(g)),
        kernel=lambda y: launch(dev, "local_forward", x, w, bias if bias is not None else 0, mode, y, g, alpha, beta,
                                stream=stream))


def local_backward_data(device, dy, w, input_hw, *, stride=1, padding=0, groups=1, out=None, alpha=1.0, beta=0.0,
                        stream=None):
    """dx = alpha * dL/dx + beta * dx; dy (F, OH, OW, N), w (OH*OW, C/groups, KH, KW, F) -> dx (C, H, W, N)."""
    dev = as_device(device)
    check_array("dy", dy, dev, ndim=4)
    check_array("w", w, dev, ndim=5)
    dtype = check_same_dtype(dy=dy, w=w)
    g = LocalGeometry.of_backward_data(dy.shape, w.shape, input_hw, stride=stride, padding=padding, groups=groups)
    alpha, beta = alpha_beta(alpha, beta, out)
    return produce(
        dev, Output("out", out, g.x_shape, dtype), inputs=dict(dy=dy, w=w), alpha=alpha, beta=beta, stream=stream,
        reference=lambda: dev.host_function(ref.local_backward_data)(dy, w, (g.H, g.W), **_params(g)),
        kernel=lambda dx: launch(dev, "local_backward_data", dy, w, dx, g, alpha, beta, stream=stream))


def local_backward_filter(device, x, dy, filter_hw, *, stride=1, padding=0, groups=1, out=None, alpha=1.0, beta=0.0,
                          stream=None):
    """dw = alpha * dL/dw + beta * dw; x (C, H, W, N), dy (F, OH, OW, N) -> dw (OH*OW, C/groups, KH, KW, F)."""
    dev = as_device(device)
    check_array("x", x, dev, ndim=4)
    check_array("dy", dy, dev, ndim=4)
    dtype = check_same_dtype(x=x, dy=dy)
    g = LocalGeometry.of_backward_filter(x.shape, dy.shape, filter_hw, stride=stride, padding=padding, groups=groups)
    alpha, beta = alpha_beta(alpha, beta, out)
    return produce(
        dev, Output("out", out, g.w_shape, dtype), inputs=dict(x=x, dy=dy), alpha=alpha, beta=beta, stream=stream,
        reference=lambda: dev.host_function(ref.local_backward_filter)(x, dy, (g.KH, g.KW), **_params(g)),
        kernel=lambda dw: launch(dev, "local_backward_filter", x, dy, dw, g, alpha, beta, stream=stream))


def local_backward_bias(device, dy, *, shared=True, out=None, alpha=1.0, beta=0.0, stream=None):
    """db = alpha * dy summed over (OH, OW, N) -> (F,) (``shared``) or over N -> (F, OH, OW) + beta * db;
    dy (F, OH, OW, N). Both are conv's bias gradient (a row sum): per position on dy seen as (F*OH*OW, N)."""
    dev = as_device(device)
    check_array("dy", dy, dev, ndim=4)
    if shared:
        return conv_backward_bias(dev, dy, out=out, alpha=alpha, beta=beta, stream=stream)
    f, oh, ow, n = dy.shape
    if out is not None:  # C-contiguous, so its flat view below is the caller's memory
        check_array("out", out, dev, shape=(f, oh, ow), dtypes=(dy.dtype,), writeable=True)
    flat = conv_backward_bias(dev, dy.reshape(f * oh * ow, n), out=None if out is None else out.reshape(-1),
                              alpha=alpha, beta=beta, stream=stream)
    return flat.reshape(f, oh, ow) if out is None else out
