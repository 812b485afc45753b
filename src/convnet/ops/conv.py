"""Convolution: the op API (kernels in csrc/kernels/conv.cu, reference in convnet/reference/conv.py).

Layouts (docs/architecture.md): x ``(C, H, W, N)``, w ``(C // groups, KH, KW, F)``, y ``(F, OH, OW, N)`` with
``OH = (H + 2*pad_h - KH) // stride_h + 1``. Padding is implicit zeros. Every op accumulates like cuda-convnet:
``out = alpha * result + beta * out``; with ``beta == 0`` the old contents of ``out`` are never read (so NaN
there is harmless). The forward pass with a bias computes ``alpha * (conv(x, w) + bias) + beta * out``.

Supported: any N, C, F with ``groups`` dividing C and F, any filter size, stride >= 1 (including stride larger
than the filter), padding >= 0, as long as the output is at least 1x1; the kernels use 32-bit indexing, so a
tensor with 2**31 or more elements is rejected with a ValueError.

``conv_forward(..., precision="tf32")`` multiplies x and w rounded to TF32 (``reference.precision.round_tf32``) with
FP32 accumulation (bias, alpha and beta in FP32): the tensor-core kernel of csrc/kernels/conv_tf32.cu on emu/cuda,
the reference (or the cpu device's GEMM) applied to the rounded inputs on numpy and cpu. ``"fp32"`` (the default) is
unchanged. ``conv_backward_data`` and ``conv_backward_filter`` take the same ``precision``: the FP32 result computed
from TF32-rounded inputs (dy and w; x and dy), on every device: the tensor-core kernels of conv_tf32.cu on emu/cuda
(the filter gradient's split-K workspace as the FP32 one's), the rounded reference on numpy and cpu. With ``"bf16"``
they read their two inputs as bfloat16 (as the forward: float32 arrays rounded to nearest even, or bfloat16 arrays)
and sum in FP32: the kernels of csrc/kernels/conv_bf16.cu on emu/cuda, the rounded inputs' reference on numpy and
cpu. The input gradient may be stored as bfloat16 (``out`` a bfloat16 array: the FP32 result after alpha and beta,
rounded once); the filter gradient is always float32 (weights and their gradients stay FP32 in the bf16 mode).

``conv_forward(..., relu=True)`` returns ``max(alpha * (conv(x, w) + bias) + beta * out, 0)``: the ReLU applies to
the accumulated value (a layer uses alpha = 1, beta = 0: ``relu(conv + bias)``). On emu/cuda the FP32, TF32 and BF16
kernels apply it in their epilogue (csrc/kernels/conv_epilogue.cuh; the BF16 one before rounding a bfloat16 output),
saving relu_forward's read and write of y, and so does the cpu device's GEMM in its store (fp32/tf32 with alpha = 1,
beta = 0; convnet/cpu/conv.py); otherwise numpy and cpu run the unfused forward and then relu_forward in place.
The result is bit-identical to ``conv_forward`` followed by ``relu_forward`` on every device (NaN -> 0, -0 -> +0).
"""
from __future__ import annotations

import numpy as np

from convnet.geometry import INT32_MAX, ConvGeometry
from convnet.ops._checks import BFLOAT16, as_device, check_array, check_same_dtype, storage_dtypes
from convnet.ops._dispatch import Output, alpha_beta, launch, produce
from convnet.ops.elementwise import relu_forward
from convnet.reference import conv as ref
from convnet.reference.precision import PRECISIONS, round_bf16, round_tf32


def conv_output_shape(x_shape, w_shape, *, stride=1, padding=0, groups=1):
    """(F, OH, OW, N) of conv_forward for these shapes."""
    return ConvGeometry.of(x_shape, w_shape, stride=stride, padding=padding, groups=groups).y_shape


def _params(g: ConvGeometry) -> dict:
    return dict(stride=g.stride, padding=g.padding, groups=g.groups)


def _check_precision(precision):
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(map(repr, PRECISIONS))}, got {precision!r}")


def _rounded_tf32(a):
    """``a`` as the TF32 kernel reads it, in ``a``'s dtype (float64 references accumulate in float64)."""
    return round_tf32(a).astype(a.dtype, copy=False)


def _rounded_bf16(a, compute_dtype):
    """``a`` as the BF16 kernel reads it, in the reference's ``compute_dtype``: bfloat16 arrays exactly, float32 or
    float64 ones rounded to bfloat16 (nearest even, through float32 as a kernel reads them)."""
    return (a if a.dtype == BFLOAT16 else round_bf16(a)).astype(compute_dtype)


def _check_bf16_inputs(dev, x, w, names=("x", "w")):
    """The two inputs of a convolution pass (x and w; dy and w; x and dy: ``names``) for precision "bf16": both of
    the device's float dtype(s) or both bfloat16. Returns the dtype the products are summed in (float32 for bfloat16
    inputs; a float64 numpy call sums in float64)."""
    a, b = names
    check_array(a, x, dev, ndim=4, dtypes=storage_dtypes(dev))
    check_array(b, w, dev, ndim=4, dtypes=storage_dtypes(dev))
    if x.dtype != w.dtype:
        floats = " or ".join(map(str, dev.dtypes))
        raise TypeError(f"precision='bf16' needs {a} and {b} of one dtype, both bfloat16 or both {floats} (rounded "
                        f"to bfloat16 on load); got {a} {x.dtype}, {b} {w.dtype}")
    return np.dtype(np.float32) if x.dtype == BFLOAT16 else x.dtype


def _check_fp_inputs(dev, **arrays):
    """The inputs of a "fp32" or "tf32" call: no bfloat16, of one float dtype. Returns that dtype."""
    for name, a in arrays.items():
        if getattr(a, "dtype", None) == BFLOAT16:
            raise TypeError(f"{name} is bfloat16: bfloat16 inputs need precision='bf16'")
        check_array(name, a, dev, ndim=4)
    return check_same_dtype(**arrays)


def _bf16_epilogue(result, out, dtype, alpha, beta):
    """A bfloat16 ``out`` on the host devices: alpha and beta applied in the compute dtype, then one rounding (as
    the kernels' epilogue); the generic accumulate (which would compute in bfloat16) then only copies."""
    scaled = result * dtype.type(alpha)
    return (scaled if beta == 0.0 else scaled + out.astype(dtype) * dtype.type(beta)).astype(BFLOAT16)


def conv_forward(device, x, w, bias=None, *, stride=1, padding=0, groups=1, out=None, alpha=1.0, beta=0.0,
                 stream=None, precision="fp32", relu=False):
    """y = alpha * (conv(x, w) + bias) + beta * y; x (C, H, W, N), w (C/groups, KH, KW, F) -> y (F, OH, OW, N).

    precision: "fp32", "tf32" (x and w rounded to TF32, FP32 accumulation; see the module's docstring) or "bf16":
    x and w are read as bfloat16 (float32 arrays rounded to nearest even on load, or ``ml_dtypes.bfloat16`` arrays,
    both of one dtype), products summed in FP32, bias (float32, never bfloat16), alpha and beta applied in FP32. The
    result is float32 unless ``out`` is a bfloat16 array (then rounded to nearest even once, after alpha and beta).
    The tensor-core kernel of csrc/kernels/conv_bf16.cu on emu/cuda; on numpy and cpu the fp32 path on the rounded
    inputs (a float64 numpy call sums in float64 and returns float64).
    relu: then y = max(y, 0), fused into the kernels' epilogue on emu/cuda (see the module's docstring; with "bf16"
    before a bfloat16 output's rounding, which gives the same bits as rounding first)."""
    _check_precision(precision)
    if not isinstance(relu, (bool, np.bool_)):
        raise TypeError(f"relu must be True or False, got {relu!r}")
    relu = bool(relu)
    dev = as_device(device)
    bf16 = precision == "bf16"
    dtype = _check_bf16_inputs(dev, x, w) if bf16 else _check_fp_inputs(dev, x=x, w=w)
    g = ConvGeometry.of(x.shape, w.shape, stride=stride, padding=padding, groups=groups)
    if bias is not None:
        if bf16:  # the compute dtype: float32 also with bfloat16 x and w
            check_array("bias", bias, dev, shape=(g.F,), dtypes=(dtype,))
        else:
            check_array("bias", bias, dev, shape=(g.F,))
            check_same_dtype(x=x, bias=bias)
    out_dtype = dtype
    if bf16 and out is not None:
        check_array("out", out, dev, shape=g.y_shape, dtypes=(dtype, BFLOAT16), writeable=True)
        out_dtype = out.dtype
    alpha, beta = alpha_beta(alpha, beta, out)
    tf32 = precision == "tf32"
    # A bfloat16 out: the host devices apply alpha and beta in the compute dtype and round once (as the kernel's
    # epilogue), so the generic accumulate (which would compute in bfloat16) only copies the result.
    y_bf16 = out_dtype == BFLOAT16
    # The cpu device's host conv_forward applies the ReLU in its GEMM's store, where nothing is scaled after it
    host_relu = relu and dev.gemm_epilogue and not bf16 and alpha == 1.0 and beta == 0.0

    def reference():
        if bf16:
            xr, wr = _rounded_bf16(x, dtype), _rounded_bf16(w, dtype)
        else:
            xr, wr = (_rounded_tf32(x), _rounded_tf32(w)) if tf32 else (x, w)
        y = dev.host_function(ref.conv_forward)(xr, wr, bias, **_params(g), **({"relu": True} if host_relu else {}))
        return _bf16_epilogue(y, out, dtype, alpha, beta) if y_bf16 else y

    def kernel(y):
        if bf16:
            launch(dev, "conv_forward_bf16", x, w, x.dtype == BFLOAT16, bias if bias is not None else 0, y, y_bf16, g,
                   alpha, beta, relu, stream=stream)
        else:
            launch(dev, "conv_forward_tf32" if tf32 else "conv_forward", x, w, bias if bias is not None else 0, y, g,
                   alpha, beta, relu, stream=stream)

    y = produce(
        dev, Output("out", out, g.y_shape, out_dtype), inputs=dict(x=x, w=w, bias=bias),
        alpha=1.0 if y_bf16 else alpha, beta=0.0 if y_bf16 else beta, stream=stream, reference=reference,
        kernel=kernel)
    if relu and not host_relu and dev.runs_reference:  # fused by every forward kernel and by cpu's GEMM
        relu_forward(dev, y, out=y, stream=stream)
    return y


def conv_backward_data(device, dy, w, input_hw, *, stride=1, padding=0, groups=1, out=None, alpha=1.0, beta=0.0,
                       stream=None, precision="fp32"):
    """dx = alpha * dL/dx + beta * dx for y = conv(x, w); dy (F, OH, OW, N) -> dx (C, H, W, N), (H, W) = input_hw.

    precision: "fp32", "tf32" (dy and w rounded to TF32, FP32 accumulation; see the module's docstring) or "bf16":
    dy and w read as bfloat16 (both float32, rounded to nearest even on load, or both bfloat16), FP32 sums, alpha and
    beta in FP32; dx float32 unless ``out`` is a bfloat16 array (then rounded to nearest even once, at the end)."""
    _check_precision(precision)
    dev = as_device(device)
    bf16 = precision == "bf16"
    dtype = _check_bf16_inputs(dev, dy, w, ("dy", "w")) if bf16 else _check_fp_inputs(dev, dy=dy, w=w)
    g = ConvGeometry.of_backward_data(dy.shape, w.shape, input_hw, stride=stride, padding=padding, groups=groups)
    out_dtype = dtype
    if bf16 and out is not None:
        check_array("out", out, dev, shape=g.x_shape, dtypes=(dtype, BFLOAT16), writeable=True)
        out_dtype = out.dtype
    alpha, beta = alpha_beta(alpha, beta, out)
    tf32 = precision == "tf32"
    dx_bf16 = out_dtype == BFLOAT16

    def reference():
        if bf16:
            dyr, wr = _rounded_bf16(dy, dtype), _rounded_bf16(w, dtype)
        else:
            dyr, wr = (_rounded_tf32(dy), _rounded_tf32(w)) if tf32 else (dy, w)
        dx = dev.host_function(ref.conv_backward_data)(dyr, wr, (g.H, g.W), **_params(g))
        return _bf16_epilogue(dx, out, dtype, alpha, beta) if dx_bf16 else dx

    def kernel(dx):
        if bf16:
            launch(dev, "conv_backward_data_bf16", dy, w, dy.dtype == BFLOAT16, dx, dx_bf16, g, alpha, beta,
                   stream=stream)
        else:
            launch(dev, "conv_backward_data_tf32" if tf32 else "conv_backward_data", dy, w, dx, g, alpha, beta,
                   stream=stream)

    return produce(
        dev, Output("out", out, g.x_shape, out_dtype), inputs=dict(dy=dy, w=w), alpha=1.0 if dx_bf16 else alpha,
        beta=0.0 if dx_bf16 else beta, stream=stream, reference=reference, kernel=kernel)


def conv_backward_filter(device, x, dy, filter_hw, *, stride=1, padding=0, groups=1, out=None, alpha=1.0, beta=0.0,
                         stream=None, precision="fp32"):
    """dw = alpha * dL/dw + beta * dw; x (C, H, W, N), dy (F, OH, OW, N) -> dw (C/groups, KH, KW, F).

    precision: "fp32", "tf32" (x and dy rounded to TF32, FP32 accumulation; see the module's docstring) or "bf16":
    x and dy read as bfloat16 (both float32, rounded to nearest even on load, or both bfloat16), FP32 sums; dw is
    float32 (the compute dtype) in every precision, never bfloat16."""
    _check_precision(precision)
    dev = as_device(device)
    bf16 = precision == "bf16"
    dtype = _check_bf16_inputs(dev, x, dy, ("x", "dy")) if bf16 else _check_fp_inputs(dev, x=x, dy=dy)
    g = ConvGeometry.of_backward_filter(x.shape, dy.shape, filter_hw, stride=stride, padding=padding, groups=groups)
    alpha, beta = alpha_beta(alpha, beta, out)
    tf32 = precision == "tf32"

    def reference():
        if bf16:
            xr, dyr = _rounded_bf16(x, dtype), _rounded_bf16(dy, dtype)
        else:
            xr, dyr = (_rounded_tf32(x), _rounded_tf32(dy)) if tf32 else (x, dy)
        return dev.host_function(ref.conv_backward_filter)(xr, dyr, (g.KH, g.KW), **_params(g))

    def kernel(dw):
        # The split-K scratch is allocated on the stream that runs the kernels: CuPy's pool then cannot hand the
        # memory to another stream's allocation while the kernels still use it.
        name = {"bf16": "conv_backward_filter_bf16", "tf32": "conv_backward_filter_tf32"}.get(
            precision, "conv_backward_filter")
        ws_floats = int(getattr(dev.kernels, f"{name}_workspace")(g))
        ws = dev.empty((ws_floats,), np.float32, stream=stream) if ws_floats else None
        flag = (x.dtype == BFLOAT16,) if bf16 else ()
        launch(dev, name, x, dy, *flag, dw, ws if ws is not None else 0, ws_floats, g, alpha, beta, stream=stream)

    return produce(
        dev, Output("out", out, g.w_shape, dtype), inputs=dict(x=x, dy=dy), alpha=alpha, beta=beta, stream=stream,
        kernel=kernel, reference=reference)


def conv_backward_bias(device, dy, out=None, alpha=1.0, beta=0.0, stream=None):
    """db = alpha * dy summed over everything but its first axis + beta * db; dy (F, ...) -> db (F,).

    dy may be bfloat16 (an activation gradient of the bf16 mode): db is then float32, the FP32 sums of its values (a
    bias gradient stays FP32); the kernel devices convert dy to float32 first (exact) and run the float32 kernel."""
    dev = as_device(device)
    check_array("dy", dy, dev, dtypes=storage_dtypes(dev))
    bf16 = dy.dtype == BFLOAT16
    dtype = np.dtype(np.float32) if bf16 else dy.dtype
    if dy.ndim < 2:
        raise ValueError(f"dy must be at least 2-D (F, ...), got shape {tuple(dy.shape)}")
    if any(s < 1 for s in dy.shape):
        raise ValueError(f"dy must have no empty dimension, got shape {tuple(dy.shape)}")
    f = dy.shape[0]
    if f > INT32_MAX:
        raise ValueError(f"dy has {f} filters; the kernel supports fewer than 2**31")
    alpha, beta = alpha_beta(alpha, beta, out)
    per_filter = dy.size // f

    def kernel(db):
        # Each filter's row is summed in chunks on separate blocks; their partial sums go to a scratch buffer that
        # is allocated on the kernels' stream (as the filter gradient's).
        ws_floats = int(dev.kernels.conv_backward_bias_workspace(f, per_filter))
        ws = dev.empty((ws_floats,), np.float32, stream=stream) if ws_floats else None
        # a bfloat16 dy is converted on the kernels' stream, after its producer wrote it
        launch(dev, "conv_backward_bias", dev.adopt(dy.astype(np.float32)) if bf16 else dy, db, ws if ws is not None else 0,
               ws_floats, f, per_filter, alpha, beta, stream=stream)

    return produce(
        dev, Output("out", out, (f,), dtype), inputs=dict(dy=dy), alpha=alpha, beta=beta, stream=stream,
        reference=lambda: dev.host_function(ref.conv_backward_bias)(dy.astype(dtype) if bf16 else dy), kernel=kernel)
