"""Argument validation shared by every op in convnet.ops.

Every op validates its arguments here before any kernel launch, so a bad call is a clear TypeError/ValueError
naming the argument, never a segfault or a silent wrong answer in a kernel. Shape rules live in convnet.geometry.
"""
from __future__ import annotations

import functools
import math
import numbers

import numpy as np

from convnet.devices import Device, get_device
from convnet.reference.storage import BFLOAT16


def storage_dtypes(device: Device) -> tuple:
    """The dtypes an op with bfloat16 storage variants accepts on ``device``: its float dtypes and bfloat16."""
    return device.dtypes + (BFLOAT16,)


#: Binding-name suffix of each storage dtype of the kernels with a bfloat16 variant (``relu_forward`` and
#: ``relu_forward_bf16``); the C++ twin is csrc/bindings/common.h's for_each_storage.
_STORAGE_SUFFIX = {np.dtype(np.float32): "", BFLOAT16: "_bf16"}


def storage_kernel(name: str, dtype) -> str:
    """The binding that runs kernel ``name`` on arrays of ``dtype`` (float32 or bfloat16)."""
    return name + _STORAGE_SUFFIX[np.dtype(dtype)]


def as_device(device) -> Device:
    if isinstance(device, Device):
        return device
    if isinstance(device, str):
        return get_device(device)
    raise TypeError(f"device must be a Device or a string like 'emu' or 'cuda:0', got {type(device).__name__}")


def check_array(name: str, a, device: Device, *, ndim: int | None = None, shape=None, dtypes=None,
                writeable: bool = False):
    """Check that ``a`` is a C-contiguous array of this device with the expected ndim/shape/dtype.

    ``shape`` may contain None for "any size" in that dimension. ``dtypes`` defaults to the device's float dtypes.
    ``writeable=True`` (an op's output): a read-only array (a read-only memmap, ``np.frombuffer(bytes)``) is a
    ValueError, never written (a kernel would crash on it or write into immutable memory).
    """
    if not device.is_array(a):
        raise TypeError(f"{name} must be a {device.array_name} for device {device}, got {device.describe_array(a)}")
    dtypes = device.dtypes if dtypes is None else _dtypes(tuple(dtypes))
    if a.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype {' or '.join(str(d) for d in dtypes)} on device {device}, "
                        f"got {a.dtype}")
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(a.shape)}")
    if shape is not None:
        shape = tuple(shape)
        if shape != a.shape and (len(shape) != a.ndim or  # equal tuples (the common case) need no walk
                                 any(s is not None and s != d for s, d in zip(shape, a.shape))):
            want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
            raise ValueError(f"{name} must have shape {want}, got {tuple(a.shape)}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous (use ascontiguousarray); got strides {a.strides}")
    if writeable and not getattr(a.flags, "writeable", True):  # CuPy arrays have no such flag: always writeable
        raise ValueError(f"{name} is read-only (flags.writeable is False): an op's output must be writeable")
    return a


@functools.lru_cache(maxsize=256)
def _dtypes(dtypes: tuple) -> tuple:
    """``dtypes`` as numpy dtypes: an op passes the same few tuples on every call, so each is converted once."""
    return tuple(np.dtype(d) for d in dtypes)


def check_same_dtype(**arrays) -> np.dtype:
    items = [(k, v) for k, v in arrays.items() if v is not None]
    first_name, first = items[0]
    for name, a in items[1:]:
        if a.dtype != first.dtype:
            raise TypeError(f"{name} has dtype {a.dtype} but {first_name} has {first.dtype}; they must match")
    return first.dtype


def _span(dev, a):
    start = dev.pointer(a)
    return start, start + a.nbytes


def _overlaps(dev, out, inputs):
    """(name, exactly the same span?) for each input whose memory overlaps ``out``."""
    if out is None:
        return
    o0, o1 = _span(dev, out)
    for name, a in inputs.items():
        if a is None or a.nbytes == 0:
            continue
        a0, a1 = _span(dev, a)
        if o0 < a1 and a0 < o1:
            yield name, (o0, o1) == (a0, a1)


def check_disjoint(dev, out_name, out, **inputs):
    """ValueError if ``out`` overlaps any of ``inputs`` (the kernels read and write different buffers)."""
    for name, _ in _overlaps(dev, out, inputs):
        raise ValueError(f"{out_name} must not overlap {name} (in-place is not supported by this op)")


def check_in_place_or_disjoint(dev, out_name, out, **inputs):
    """ValueError if ``out`` partially overlaps an input: element-wise ops may run exactly in place (``out`` is the
    input itself, same address and size) but an offset overlap would read elements already overwritten."""
    for name, same in _overlaps(dev, out, inputs):
        if not same:
            raise ValueError(f"{out_name} partially overlaps {name}: pass the same array to work in place, "
                             f"or a disjoint one")


def check_all_disjoint(dev, arrays: dict):
    """ValueError if any two of ``arrays`` (name -> array) overlap: their spans sorted by start, an overlap shows
    between neighbours (n log n, not the n**2 pairs)."""
    spans = sorted((*_span(dev, a), name) for name, a in arrays.items() if a is not None and a.nbytes > 0)
    for (_, end, first), (start, _, second) in zip(spans, spans[1:]):
        if start < end:
            raise ValueError(f"{first} and {second} overlap: every array must be disjoint from the others")


def scalar(name: str, value, *, low=None, high=None, low_open=False) -> float:
    if type(value) is not float or not math.isfinite(value):  # a finite float (most calls) skips the ABC check
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not np.isfinite(value):
            raise TypeError(f"{name} must be a finite real number, got {value!r}")
        value = float(value)
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")
    return value


def uint64(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= int(value) < 2**64:
        raise ValueError(f"{name} must be an integer in [0, 2**64), got {value!r}")
    return int(value)
