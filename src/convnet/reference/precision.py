"""NumPy reference of the tensor-core precisions: the roundings the kernels apply to their inputs.

* ``round_tf32``: TF32, as PTX ``cvt.rna.tf32.f32``: 10 explicit mantissa bits, round to nearest with ties away from
  zero; the result is a float32 whose low 13 bits are zero. Same exponent range as float32 (subnormals round at the
  same bit; values that round past the largest float32 give inf); NaN stays NaN, inf stays inf.
* ``round_bf16``: bfloat16, as PTX ``cvt.rn.bf16.f32`` and ``ml_dtypes.bfloat16``: round to nearest even.
  ``to_bf16`` gives the ``ml_dtypes.bfloat16`` array itself (the dtype bfloat16 activations are stored in).

Both take float32 (or float64, converted to float32 first, as a kernel reads float32) and return float32 arrays of
the rounded values, so a reference in a reduced precision is the float32/float64 reference applied to rounded inputs.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np

__all__ = ["PRECISIONS", "round_tf32", "round_bf16", "to_bf16", "round_inputs"]

PRECISIONS = ("fp32", "tf32", "bf16")

_EXPONENT = np.uint32(0x7F800000)
_MANTISSA = np.uint32(0x007FFFFF)
_QUIET = np.uint32(0x00400000)
_TF32_KEEP = np.uint32(0xFFFFE000)  # sign, exponent, 10 mantissa bits
_TF32_HALF = np.uint32(0x00001000)  # half a TF32 ulp, in the bits below it


def round_tf32(x) -> np.ndarray:
    """``x`` rounded to TF32 (ties away from zero), as float32."""
    bits = np.array(x, dtype=np.float32, copy=True).view(np.uint32)
    special = (bits & _EXPONENT) == _EXPONENT
    nan = special & ((bits & _MANTISSA) != 0)
    # Adding half an ulp to the magnitude and truncating rounds ties away from zero (the sign is a separate bit);
    # a carry into the exponent is the correct rounding up, also to inf.
    rounded = (bits + _TF32_HALF) & _TF32_KEEP
    rounded = np.where(special, bits, rounded)
    rounded = np.where(nan, (bits | _QUIET) & _TF32_KEEP, rounded)
    return rounded.view(np.float32)


def to_bf16(x) -> np.ndarray:
    """``x`` as an ``ml_dtypes.bfloat16`` array (round to nearest even)."""
    with np.errstate(invalid="ignore"):  # NumPy warns on every NaN cast; NaN stays NaN
        return np.asarray(x, dtype=np.float32).astype(ml_dtypes.bfloat16)


def round_bf16(x) -> np.ndarray:
    """``x`` rounded to bfloat16 (nearest even), as float32."""
    return to_bf16(x).astype(np.float32)


def round_inputs(precision: str, *arrays):
    """The arrays as a kernel of ``precision`` reads them: unchanged for ``fp32``, else rounded (float32)."""
    if precision == "fp32":
        return arrays
    if precision == "tf32":
        return tuple(round_tf32(a) for a in arrays)
    if precision == "bf16":
        return tuple(round_bf16(a) for a in arrays)
    raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
