"""The NumPy reference of the tensor-core precisions (convnet.reference.precision): TF32 as cvt.rna.tf32.f32, BF16 as
ml_dtypes.bfloat16 (round to nearest even)."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from precision_cases import assert_same_bits_or_both_nan, special_floats, tf32_by_arithmetic

from convnet.reference.precision import PRECISIONS, round_bf16, round_inputs, round_tf32, to_bf16


def bits(x):
    return np.asarray(x, np.float32).view(np.uint32)


def test_round_tf32_matches_rounding_done_in_arithmetic():
    x = special_floats()
    with np.errstate(invalid="ignore"):
        assert_same_bits_or_both_nan(bits(round_tf32(x)), bits(tf32_by_arithmetic(x)), np.float32)


def test_round_tf32_rounds_ties_away_from_zero():
    ties = np.array([0x3F801000, 0xBF801000, 0x3F803000, 0x00001000], np.uint32).view(np.float32)
    assert bits(round_tf32(ties)).tolist() == [0x3F802000, 0xBF802000, 0x3F804000, 0x00002000]
    below, above = np.array([0x3F800FFF, 0x3F801001], np.uint32).view(np.float32)
    assert bits(round_tf32(below)) == 0x3F800000 and bits(round_tf32(above)) == 0x3F802000


def test_round_tf32_clears_the_low_13_bits_and_is_idempotent():
    x = special_floats()
    r = round_tf32(x)
    assert not np.any(bits(r) & 0x1FFF)
    assert_same_bits_or_both_nan(bits(round_tf32(r)), bits(r), np.float32)


def test_round_tf32_keeps_inf_and_nan_and_overflows_to_inf():
    x = np.array([np.inf, -np.inf, np.nan, -np.nan], np.float32)
    r = round_tf32(x)
    assert r[0] == np.inf and r[1] == -np.inf and np.isnan(r[2]) and np.isnan(r[3])
    assert round_tf32(np.float32(3.4028235e38)) == np.inf  # FLT_MAX is above TF32's largest value + half an ulp
    nan_in_low_bits = np.array([0x7F800001], np.uint32).view(np.float32)
    assert np.isnan(round_tf32(nan_in_low_bits))  # a NaN whose payload is all in the cleared bits stays NaN


def test_round_bf16_is_ml_dtypes_round_to_nearest_even():
    x = special_floats()
    with np.errstate(invalid="ignore"):
        want = x.astype(ml_dtypes.bfloat16).astype(np.float32)
    assert_same_bits_or_both_nan(bits(round_bf16(x)), bits(want), np.float32)
    ties = np.array([0x3F808000, 0x3F818000, 0xBF808000], np.uint32).view(np.float32)
    assert bits(round_bf16(ties)).tolist() == [0x3F800000, 0x3F820000, 0xBF800000]
    assert to_bf16(np.float32(1.0)).dtype == ml_dtypes.bfloat16
    assert round_bf16(np.float32(3.4028235e38)) == np.inf


def test_float64_inputs_are_read_as_float32_first():
    # The kernels read float32: a float64 just below a TF32 tie becomes the tie in float32, which rounds up.
    x = np.float64(np.array(0x3F801000, np.uint32).view(np.float32)) - 2.0**-40
    assert bits(round_tf32(x)) == 0x3F802000
    assert round_tf32(x).dtype == np.float32


def test_round_inputs_by_precision():
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal(5).astype(np.float32), rng.standard_normal(5).astype(np.float32)
    assert PRECISIONS == ("fp32", "tf32", "bf16")
    fa, fb = round_inputs("fp32", a, b)
    assert fa is a and fb is b
    np.testing.assert_array_equal(round_inputs("tf32", a, b)[1], round_tf32(b))
    np.testing.assert_array_equal(round_inputs("bf16", a, b)[0], round_bf16(a))
    with pytest.raises(ValueError, match="precision must be one of fp32, tf32, bf16"):
        round_inputs("fp16", a)
