"""Validation and dispatch helpers shared by every op in convnet.ops.

Every op validates its arguments here before any kernel launch, so a bad call is a clear TypeError/ValueError
naming the argument, never a segfault or a silent wrong answer in a kernel.
"""
from __future__ import annotations

import numbers

import numpy as np

from convnet.devices import Device, get_device

KERNEL_DTYPES = (np.dtype(np.float32),)
REFERENCE_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def as_device(device) -> Device:
    if isinstance(device, Device):
        return device
    if isinstance(device, str):
        return get_device(device)
    raise TypeError(f"device must be a Device or a string like 'emu' or 'cuda:0', got {type(device).__name__}")


def _type_name(a) -> str:
    t = type(a)
    return f"{t.__module__.split('.')[0]}.{t.__name__}"


def float_dtypes(device: Device):
    """dtypes an op accepts on a device: the kernels are float32; the NumPy reference also does float64."""
    return REFERENCE_DTYPES if device.kind == "numpy" else KERNEL_DTYPES


def check_array(name: str, a, device: Device, *, ndim: int | None = None, shape=None, dtypes=None):
    """Check that ``a`` is a C-contiguous array of this device with the expected ndim/shape/dtype.

    ``shape`` may contain None for "any size" in that dimension. ``dtypes`` defaults to the device's float dtypes.
    """
    if not device.is_array(a):
        where = f" on GPU {device.index}" if device.kind == "cuda" else ""
        expected = "cupy.ndarray" if device.kind == "cuda" else "numpy.ndarray"
        got = _type_name(a)
        if device.kind == "cuda" and got == "cupy.ndarray":
            got += f" on GPU {a.device.id}"
        raise TypeError(f"{name} must be a {expected}{where} for device {device}, got {got}")
    dtypes = float_dtypes(device) if dtypes is None else tuple(np.dtype(d) for d in dtypes)
    if a.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype {' or '.join(str(d) for d in dtypes)} on device {device}, "
                        f"got {a.dtype}")
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(a.shape)}")
    if shape is not None:
        shape = tuple(shape)
        if len(shape) != a.ndim or any(s is not None and s != d for s, d in zip(shape, a.shape)):
            want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
            raise ValueError(f"{name} must have shape {want}, got {tuple(a.shape)}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous (use ascontiguousarray); got strides {a.strides}")
    return a


def check_same_dtype(**arrays) -> np.dtype:
    items = [(k, v) for k, v in arrays.items() if v is not None]
    first_name, first = items[0]
    for name, a in items[1:]:
        if a.dtype != first.dtype:
            raise TypeError(f"{name} has dtype {a.dtype} but {first_name} has {first.dtype}; they must match")
    return first.dtype


def output(name: str, out, device: Device, shape, dtype, *, zero: bool = False):
    """Validate a caller-supplied ``out`` (it must match exactly), or allocate one."""
    if out is None:
        return device.zeros(shape, dtype) if zero else device.empty(shape, dtype)
    check_array(name, out, device, shape=shape, dtypes=(dtype,))
    return out


def _span(dev, a):
    start = dev.pointer(a)
    return start, start + a.nbytes


def check_disjoint(dev, out_name, out, **inputs):
    """ValueError if ``out`` overlaps any of ``inputs`` (the kernels read and write different buffers)."""
    if out is None:
        return
    o0, o1 = _span(dev, out)
    for name, a in inputs.items():
        if a is None or a.nbytes == 0:
            continue
        a0, a1 = _span(dev, a)
        if o0 < a1 and a0 < o1:
            raise ValueError(f"{out_name} must not overlap {name} (in-place is not supported by this op)")


def pair(name: str, value, *, minimum: int = 0) -> tuple[int, int]:
    """An int or an (h, w) pair of ints, each >= minimum."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        h = w = int(value)
    elif isinstance(value, (tuple, list)) and len(value) == 2 and all(
            isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value):
        h, w = int(value[0]), int(value[1])
    else:
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if h < minimum or w < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return h, w


def scalar(name: str, value, *, low=None, high=None, low_open=False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not np.isfinite(value):
        raise TypeError(f"{name} must be a finite real number, got {value!r}")
    value = float(value)
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")
    return value


def alpha_beta(alpha, beta, out) -> tuple[float, float]:
    """Validate the accumulate coefficients of ``out = alpha * op + beta * out``. Without a caller's ``out`` there
    is nothing to accumulate into (a new output holds garbage), so beta is 0."""
    alpha, beta = scalar("alpha", alpha), scalar("beta", beta)
    return alpha, (beta if out is not None else 0.0)


def accumulate(out, result, alpha: float, beta: float):
    """out = alpha * result + beta * out, on NumPy or CuPy arrays; ``out`` is not read when beta == 0 (it may
    hold garbage or NaN, as cuda-convnet's scaleTargets = 0 allowed)."""
    scaled = result if alpha == 1.0 else result * out.dtype.type(alpha)
    if beta == 0.0:
        out[...] = scaled
    else:
        out *= out.dtype.type(beta)
        out += scaled
    return out


def uint64(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= int(value) < 2**64:
        raise ValueError(f"{name} must be an integer in [0, 2**64), got {value!r}")
    return int(value)


def launch(device: Device, kernel: str, *args, stream=None):
    """Call a binding of the device's extension module on the right GPU and stream.

    Array arguments are passed as the device's arrays and converted to addresses here.
    """
    module = device.kernels
    converted = [device.pointer(a) if device.is_array(a) else a for a in args]
    with device.activate():
        getattr(module, kernel)(*converted, device.stream_handle(stream))
