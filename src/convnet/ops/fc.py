"""Fully-connected layers through GEMM: the op API (reference in convnet/reference/fc.py).

Layout: activations ``(features, N)``, weights ``(out_features, in_features)``, bias ``(out_features,)``::

    fc_forward:          out = alpha * (W @ x + b[:, None]) + beta * out
    fc_backward_data:    out = alpha * (W.T @ dy) + beta * out
    fc_backward_weights: out = alpha * (dy @ x.T) + beta * out
    fc_backward_bias:    out = alpha * dy.sum(axis=1) + beta * out      (an addition to the contract's list)

GEMM is the device's (``Device.matmul``): NumPy (BLAS) on numpy and emu, CuPy (cuBLAS) on cuda, convnet/cpu/gemm.py
on cpu, on ``stream``.
``beta == 0`` never reads ``out`` (NaN garbage in a fresh buffer is fine), as in BLAS.

``precision`` (keyword, the three GEMM ops): ``"fp32"`` (the default) as above; ``"tf32"``: the two GEMM operands are
rounded to TF32 (``reference.precision.round_tf32``: PTX ``cvt.rna.tf32.f32``, on the device) and multiplied with
FP32 accumulation; the device's GEMM is then told the operands are TF32 (cuBLAS's TF32 compute type on cuda: tensor
cores; the products of two TF32 values are exact in FP32, so every device computes the same products). The bias,
alpha, beta and ``fc_backward_bias`` stay FP32. On cuda each operand is rounded by one elementwise kernel
(``TF32_KERNEL``).

``"bf16"``: the activation operand (x, dy; both for ``fc_backward_weights``) is float32 (rounded to bfloat16, nearest
even, on load) or an ``ml_dtypes.bfloat16`` array; w is float32 (FP32 master weights), rounded to bfloat16 for the
product; the products of two bfloat16 values are exact in FP32 and are summed in FP32. On cuda each float32 operand
is converted to a bfloat16 array by one elementwise kernel (``BF16_KERNEL``) and the two bfloat16 arrays go through
one cuBLAS GEMM on the BF16 tensor cores with FP32 accumulation and an FP32 result
(``CudaDevice.matmul(..., precision="bf16")``); elsewhere the rounded values go through the device's FP32 GEMM (the
same products). The result follows ``conv_forward``'s bf16 rule: float32 unless ``out`` is a bfloat16 array (then
the FP32 result, after bias, alpha and beta, rounded to nearest even once); with bf16 the output of
``fc_backward_weights`` is float32 (a weight gradient). The bias, alpha and beta stay FP32. ``fc_backward_bias`` (and
``conv_backward_bias``) accept a bfloat16 dy and return the float32 sums of its values.
"""
from __future__ import annotations

import functools

import numpy as np

from convnet.ops._checks import BFLOAT16, as_device, check_array, check_disjoint, check_same_dtype, storage_dtypes
from convnet.ops._dispatch import Output, accumulate, alpha_beta, output
from convnet.reference.precision import PRECISIONS

GEMM_PRECISIONS = PRECISIONS  # what the fc GEMMs do

# TF32 and BF16 rounding on the bits of float32, as reference.precision.round_tf32/round_bf16, written with the
# operators NumPy and CuPy share so that it runs on the device that holds the array
_EXPONENT, _MANTISSA, _QUIET = 0x7F800000, 0x007FFFFF, 0x00400000
_TF32_KEEP, _TF32_HALF = 0xFFFFE000, 0x00001000
_BF16_KEEP, _BF16_HALF = 0xFFFF0000, 0x00008000

# The same roundings as one CuPy elementwise kernel each on cuda (in_params, out_params, operation, name), on the bits
# of a float32 array viewed as uint32. TF32 as cvt.rna.tf32.f32: half a TF32 ulp added to the magnitude, then
# truncation (ties away from zero; a carry into the exponent rounds up, to inf too); inf stays, NaN stays NaN, quiet.
TF32_KERNEL = ("uint32 bits", "uint32 rounded", """
    if ((bits & 0x7F800000u) != 0x7F800000u) {
        rounded = (bits + 0x00001000u) & 0xFFFFE000u;
    } else if ((bits & 0x007FFFFFu) != 0u) {
        rounded = (bits | 0x00400000u) & 0xFFFFE000u;
    } else {
        rounded = bits;
    }""", "convnet_round_tf32")
# bfloat16 as ml_dtypes (reference.precision.to_bf16) and cvt.rn.bf16.f32: the upper 16 bits after adding half an ulp
# less one plus the kept lowest bit (ties to even; a carry into the exponent rounds up, to inf too); NaN becomes
# ml_dtypes' quiet NaN 0x7FC0 with the sign kept, so the result is bit-identical to ``to_bf16``.
BF16_KERNEL = ("uint32 bits", "uint16 rounded", """
    if ((bits & 0x7F800000u) == 0x7F800000u && (bits & 0x007FFFFFu) != 0u) {
        rounded = (unsigned short)(((bits >> 16) & 0x8000u) | 0x7FC0u);
    } else {
        rounded = (unsigned short)((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
    }""", "convnet_round_bf16")


@functools.lru_cache(maxsize=8)
def _elementwise_kernel(cp, spec):
    """The CuPy kernel of ``spec`` (TF32_KERNEL, BF16_KERNEL) for the cupy module ``cp`` (compiled at its first call,
    then cached by CuPy per GPU)."""
    in_params, out_params, operation, name = spec
    return cp.ElementwiseKernel(in_params, out_params, operation, name)


def _on_bits(dev, spec, a):
    """``spec``'s kernel on the float32 bits of cuda array ``a``: a new array of the kernel's output type in ``a``'s
    layout (a transposed view, such as ``w.T``, is converted as its contiguous base and transposed back, so that the
    kernel reads contiguous memory and the GEMM gets the transposed operand as it is)."""
    xp = dev.xp
    transposed = a.ndim == 2 and not a.flags.c_contiguous and a.flags.f_contiguous
    base = a.T if transposed else a
    bits = xp.ascontiguousarray(base, dtype=xp.float32).view(xp.uint32)
    result = _elementwise_kernel(xp, spec)(bits)
    return result.T if transposed else result


def check_gemm_precision(precision) -> str:
    """``precision`` if the fc ops do it, else a ValueError naming what is missing."""
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(map(repr, PRECISIONS))}, got {precision!r}")
    if precision not in GEMM_PRECISIONS:
        raise ValueError(f"precision {precision!r} is not implemented for fully-connected layers (available: "
                         f"{', '.join(map(repr, GEMM_PRECISIONS))})")
    return precision


def round_tf32_on(dev, a):
    """``a`` rounded to TF32 like ``cvt.rna.tf32.f32`` (ties away from zero; NaN stays NaN, quiet; inf stays inf), a
    new array of ``dev`` in ``a``'s dtype (float64 on numpy: the rounded values, accumulated in float64 by the
    reference), contiguous (on cuda: in ``a``'s layout; one kernel, ``TF32_KERNEL``): the values of
    ``reference.precision.round_tf32``."""
    xp = dev.xp
    if dev.kind == "cuda":
        return _on_bits(dev, TF32_KERNEL, a).view(xp.float32)
    bits = xp.ascontiguousarray(a, dtype=xp.float32).view(xp.uint32)
    u = xp.uint32
    special = (bits & u(_EXPONENT)) == u(_EXPONENT)
    nan = special & ((bits & u(_MANTISSA)) != u(0))
    rounded = (bits + u(_TF32_HALF)) & u(_TF32_KEEP)  # a carry into the exponent is the right rounding up, to inf too
    rounded = xp.where(special, bits, rounded)
    rounded = xp.where(nan, (bits | u(_QUIET)) & u(_TF32_KEEP), rounded)
    return dev.adopt(rounded.view(xp.float32).astype(a.dtype, copy=False))


def round_bf16_on(dev, a, dtype):
    """``a`` as a bfloat16 kernel reads it, a new array of ``dev`` in the compute ``dtype``: a bfloat16 array's values
    exactly, a float array rounded to bfloat16 like ``cvt.rn.bf16.f32`` (nearest even, through float32; NaN stays
    NaN, quiet; inf stays inf; values past the largest bfloat16 round to inf): the values of
    ``reference.precision.round_bf16``, computed on the bits with the operators NumPy and CuPy share."""
    xp = dev.xp
    if a.dtype == BFLOAT16:
        return dev.adopt(a.astype(dtype))
    bits = xp.ascontiguousarray(a, dtype=xp.float32).view(xp.uint32)
    u = xp.uint32
    nan = ((bits & u(_EXPONENT)) == u(_EXPONENT)) & ((bits & u(_MANTISSA)) != u(0))
    # half an ulp less one, plus the kept lowest bit: ties go to the even neighbour; a carry into the exponent is the
    # right rounding up (to inf too)
    rounded = (bits + u(_BF16_HALF - 1) + ((bits >> u(16)) & u(1))) & u(_BF16_KEEP)
    rounded = xp.where(nan, (bits | u(_QUIET)) & u(_BF16_KEEP), rounded)
    return dev.adopt(rounded.view(xp.float32).astype(dtype, copy=False))


def to_bf16_on(dev, a):
    """``a`` as a bfloat16 array of ``dev``, bit-identical to ``reference.precision.to_bf16``: a bfloat16 array as it
    is; a float one rounded (on cuda by one kernel, ``BF16_KERNEL``, in ``a``'s layout)."""
    if a.dtype == BFLOAT16:
        return a
    if dev.kind == "cuda":
        return _on_bits(dev, BF16_KERNEL, a).view(BFLOAT16)
    return dev.adopt(round_bf16_on(dev, a, np.float32).astype(BFLOAT16))  # rounded already: the cast is exact


def _bf16_operands(dev, a, b, compute):
    """The bf16 GEMM's operands and the precision to give ``dev.matmul``: on cuda two bfloat16 arrays for cuBLAS's
    BF16 tensor cores; elsewhere the rounded values in the compute dtype through the FP32 GEMM (the products of two
    bfloat16 values are exact in FP32: the same products)."""
    if dev.kind == "cuda":
        return to_bf16_on(dev, a), to_bf16_on(dev, b), "bf16"
    return round_bf16_on(dev, a, compute), round_bf16_on(dev, b, compute), "fp32"


def _check_bf16_operand(dev, name, a, compute):
    """A bf16 call's activation operand: of the device's float dtype ``compute`` (rounded on load) or bfloat16."""
    check_array(name, a, dev, ndim=2, dtypes=(compute, BFLOAT16))


def _compute_dtype(*arrays):
    """The dtype a call sums in: float32 for bfloat16 operands in bf16, else the (first) float operand's."""
    floats = [a.dtype for a in arrays if a.dtype != BFLOAT16]
    return floats[0] if floats else np.dtype(np.float32)


def _result(dev, out, shape, dtype, precision, stream):
    """The output buffer: the caller's ``out`` (bf16: of the compute dtype or bfloat16) or a new array of ``dtype``."""
    if precision == "bf16" and out is not None:
        check_array("out", out, dev, shape=shape, dtypes=(dtype, BFLOAT16), writeable=True)
        return out
    return output(dev, Output("out", out, shape, dtype), stream)


def _gemm(dev, out, y, a, b, bias, alpha, beta, stream, precision):
    """y = alpha * (a @ b + bias[:, None]) + beta * y with the device's GEMM in ``precision``, submitted to
    ``stream``: straight into ``y`` when nothing is accumulated (``out`` is the caller's array or None), else
    through a temporary."""

    def work():
        nonlocal y, a, b  # the in-place operators below rebind the name (to the same array)
        gemm_precision = precision
        if precision == "tf32":
            a, b = round_tf32_on(dev, a), round_tf32_on(dev, b)
        if precision == "bf16":
            # bfloat16 operands, FP32 products (exact) and sums; a bfloat16 result is the FP32 result after bias,
            # alpha and beta, rounded once
            compute = bias.dtype if bias is not None else _compute_dtype(a, b)
            a, b, gemm_precision = _bf16_operands(dev, a, b, compute)
            if y.dtype == BFLOAT16:
                r = dev.matmul(a, b, precision=gemm_precision)
                if bias is not None:
                    r += bias[:, None]
                if alpha != 1.0:
                    r *= r.dtype.type(alpha)
                if out is not None and beta != 0.0:
                    r += y.astype(r.dtype) * r.dtype.type(beta)
                y[...] = to_bf16_on(dev, r)
                return
        if out is None or (alpha == 1.0 and beta == 0.0):
            in_store = bias is not None and dev.gemm_epilogue  # the host GEMM adds the bias in its store
            dev.matmul(a, b, out=y, precision=gemm_precision, **({"bias": bias} if in_store else {}))
            if bias is not None and not in_store:
                y += bias[:, None]
            if alpha != 1.0:
                y *= alpha
            return
        r = dev.matmul(a, b, precision=gemm_precision)
        if bias is not None:
            r += bias[:, None]
        accumulate(y, r, alpha, beta)

    dev.submit(work, stream)
    return y


def fc_forward(device, x, w, bias=None, out=None, alpha=1.0, beta=0.0, stream=None, *, precision="fp32"):
    check_gemm_precision(precision)
    dev = as_device(device)
    alpha, beta = alpha_beta(alpha, beta, out)
    check_array("w", w, dev, ndim=2)
    O, I = w.shape
    if precision == "bf16":
        _check_bf16_operand(dev, "x", x, w.dtype)
    else:
        check_array("x", x, dev, ndim=2)
    if x.shape[0] != I:
        raise ValueError(f"x must have shape ({I}, N) to match w of shape {tuple(w.shape)}, got {tuple(x.shape)}")
    if bias is not None:
        check_array("bias", bias, dev, shape=(O,))
    check_same_dtype(w=w, bias=bias) if precision == "bf16" else check_same_dtype(x=x, w=w, bias=bias)
    y = _result(dev, out, (O, x.shape[1]), w.dtype, precision, stream)
    check_disjoint(dev, "out", out, x=x, w=w, bias=bias)
    return _gemm(dev, out, y, w, x, bias, alpha, beta, stream, precision)


def fc_backward_data(device, dy, w, out=None, alpha=1.0, beta=0.0, stream=None, *, precision="fp32"):
    check_gemm_precision(precision)
    dev = as_device(device)
    alpha, beta = alpha_beta(alpha, beta, out)
    check_array("w", w, dev, ndim=2)
    O, I = w.shape
    if precision == "bf16":
        _check_bf16_operand(dev, "dy", dy, w.dtype)
    else:
        check_array("dy", dy, dev, ndim=2)
    if dy.shape[0] != O:
        raise ValueError(f"dy must have shape ({O}, N) to match w of shape {tuple(w.shape)}, got {tuple(dy.shape)}")
    if precision != "bf16":
        check_same_dtype(dy=dy, w=w)
    dx = _result(dev, out, (I, dy.shape[1]), w.dtype, precision, stream)
    check_disjoint(dev, "out", out, dy=dy, w=w)
    return _gemm(dev, out, dx, w.T, dy, None, alpha, beta, stream, precision)


def fc_backward_weights(device, x, dy, out=None, alpha=1.0, beta=0.0, stream=None, *, precision="fp32"):
    check_gemm_precision(precision)
    dev = as_device(device)
    alpha, beta = alpha_beta(alpha, beta, out)
    bf16 = precision == "bf16"
    check_array("x", x, dev, ndim=2, dtypes=storage_dtypes(dev) if bf16 else None)
    check_array("dy", dy, dev, ndim=2, dtypes=storage_dtypes(dev) if bf16 else None)
    if dy.shape[1] != x.shape[1]:
        raise ValueError(f"x {tuple(x.shape)} and dy {tuple(dy.shape)} must have the same number of images (axis 1)")
    dtype = _compute_dtype(x, dy) if bf16 else check_same_dtype(x=x, dy=dy)
    if bf16 and len({a.dtype for a in (x, dy) if a.dtype != BFLOAT16} | {dtype}) > 1:
        raise TypeError(f"x has dtype {x.dtype} but dy has {dy.dtype}; each must be bfloat16 or the same float dtype")
    dw = output(dev, Output("out", out, (dy.shape[0], x.shape[0]), dtype), stream)
    check_disjoint(dev, "out", out, x=x, dy=dy)
    return _gemm(dev, out, dw, dy, x.T, None, alpha, beta, stream, precision)


def fc_backward_bias(device, dy, out=None, alpha=1.0, beta=0.0, stream=None):
    dev = as_device(device)
    alpha, beta = alpha_beta(alpha, beta, out)
    check_array("dy", dy, dev, ndim=2, dtypes=storage_dtypes(dev))
    dtype = np.dtype(np.float32) if dy.dtype == BFLOAT16 else dy.dtype  # bfloat16 dy: float32 sums
    db = output(dev, Output("out", out, (dy.shape[0],), dtype), stream)
    check_disjoint(dev, "out", out, dy=dy)
    dev.submit(lambda: accumulate(db, dy.sum(axis=1, dtype=dtype), alpha, beta), stream)
    return db
