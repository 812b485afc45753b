"""Float32 inputs that exercise the TF32 and BF16 roundings (ties, subnormals, overflow, inf, NaN), and TF32 rounding
done in float64 arithmetic rather than on bits: shared by tests/test_precision.py (the NumPy reference) and
tests/test_tensor_core_intrinsics.py (the kernels' conversions)."""
from __future__ import annotations

import numpy as np

SPECIAL_BITS = np.array([
    0x00000000, 0x80000000, 0x3F800000,                                                  # zeros, one
    0x3F801000, 0x3F803000, 0xBF801000, 0x3F800FFF, 0x3F801001,                          # TF32: ties, near ties
    0x3F808000, 0x3F818000, 0xBF808000, 0x3F808001, 0x3F807FFF,                          # BF16: ties, near ties
    0x00000001, 0x00001000, 0x00003000, 0x00008000, 0x00018000, 0x807FFFFF, 0x007FF000,  # subnormals
    0x007FFFFF,
    0x7F7FFFFF, 0x7F7FEFFF, 0x7F7F7FFF, 0xFF7FFFFF, 0x7F800000, 0xFF800000,              # largest finite, inf
    0x7FC00000, 0xFFC00000, 0x7F800001, 0x7FA00000, 0xFF800123,                          # NaNs (payload in low bits too)
], np.uint32)


def special_floats() -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.concatenate([SPECIAL_BITS.view(np.float32), rng.standard_normal(2000).astype(np.float32),
                           (rng.standard_normal(500) * 1e-39).astype(np.float32)])


def tf32_by_arithmetic(x) -> np.ndarray:
    """TF32 rounding in float64 arithmetic: steps of 2^(e - 10) for |x| in [2^e, 2^(e+1)), never finer than TF32's
    subnormal step 2^-136, ties away from zero; inf and NaN unchanged."""
    x = np.asarray(x, np.float32).astype(np.float64)
    out = x.copy()
    finite = np.isfinite(x)
    _, e = np.frexp(x[finite])  # x = m 2^e, 0.5 <= |m| < 1
    step = np.ldexp(1.0, np.maximum(e - 11, -136))
    q = x[finite] / step
    out[finite] = np.copysign(np.floor(np.abs(q) + 0.5) * step, q)
    with np.errstate(over="ignore"):
        return out.astype(np.float32)  # past float32's range: inf, as the rounding carries into the exponent


def assert_same_bits_or_both_nan(got_bits, want_bits, as_float):
    """Equal bit patterns, except that any NaN matches any NaN."""
    got, want = np.asarray(got_bits).view(as_float), np.asarray(want_bits).view(as_float)
    nan = np.isnan(want)
    np.testing.assert_array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(np.asarray(got_bits)[~nan], np.asarray(want_bits)[~nan])
