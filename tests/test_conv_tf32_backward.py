"""The TF32 convolution backward passes: ``conv_backward_data(..., precision="tf32")`` (dy and w rounded to TF32)
and ``conv_backward_filter(..., precision="tf32")`` (x and dy rounded), FP32 accumulation, on every device.

Tolerances, per element, inputs uniform in [-1, 1), S = the same operation on absolute values (|dy| |w|, |x| |dy|),
K = the number of products summed into one output (input gradient: F/groups * KH * KW, an upper bound since stride
holes and borders drop some; filter gradient: OH * OW * N), derived as in tests/test_conv_tf32.py:
- against the float64 reference on TF32-rounded inputs: a product of two TF32 values is exact in FP32, so only the
  FP32 summation errs, by at most (K + 2) u S with u = 2**-24 in any order (split-K partial sums and their reduction
  are one more order); the bound used is twice that (a tensor core may truncate inside its adder tree);
- against the exact (unrounded) result: each input is off by at most half a TF32 ulp, 2**-11 relative, each product
  by at most 2**-10 + 2**-22 relative: |got - exact| <= (2**-10 + 2**-22) S + the summation bound above;
- the result is at least 20 times closer to the rounded reference than the rounded reference is to the exact one
  (a missing rounding fails this).
"""
from __future__ import annotations

import numpy as np
import pytest

from helpers import ALL_DEVICES, COMPILED_DEVICES, CPU, NUMPY, assert_identical, rand, to_host
from convnet import ops
from convnet.reference import conv as ref
from convnet.reference.precision import round_tf32

U = 2.0 ** -24
TF32_PRODUCT = 2.0 ** -10 + 2.0 ** -22

# (name, C, H, W, N, F, KH, KW, stride, pad, groups): awkward but small (the emulator runs every thread).
GEOMETRIES = [
    ("1ch-stride4-pad2-N33", 1, 13, 11, 33, 5, 5, 4, 4, 2, 1),
    ("3ch-N8-F20", 3, 8, 9, 8, 20, 3, 5, 1, (2, 1), 1),
    ("stride2-pad1-groups2-N5", 4, 9, 7, 5, 6, 3, 3, 2, 1, 2),
    ("odd-everything", 5, 7, 9, 3, 7, 3, 2, (2, 1), (1, 0), 1),
    ("batch1-groups3", 6, 8, 8, 1, 9, 3, 3, 1, 1, 3),
    ("stride-gt-filter", 2, 11, 10, 4, 8, 2, 2, 3, 0, 1),
    ("1x1-groups4", 8, 5, 6, 4, 12, 1, 1, 1, 0, 4),
    ("pad-ge-filter", 2, 4, 5, 4, 4, 2, 3, 1, 3, 1),
    ("many-k-tiles", 16, 6, 6, 12, 40, 3, 3, 1, 1, 1),
    ("groups2-C-gt-tile-N32", 80, 5, 5, 32, 24, 3, 3, 2, 1, 2),
]
IDS = [g[0] for g in GEOMETRIES]


def _geometry(geom):
    _, c, h, w, n, f, kh, kw, stride, pad, groups = geom
    kwargs = dict(stride=stride, padding=pad, groups=groups)
    oh, ow = ops.conv_output_shape((c, h, w, n), (c // groups, kh, kw, f), **kwargs)[1:3]
    return (c, h, w, n), (c // groups, kh, kw, f), (f, oh, ow, n), kwargs


def _data_data(geom, seed=0):
    """dy, w, input_hw, kwargs, K for the input gradient."""
    x_shape, w_shape, y_shape, kwargs = _geometry(geom)
    rng = np.random.default_rng(seed)
    return rand(rng, y_shape), rand(rng, w_shape), x_shape[1:3], kwargs, (w_shape[3] // kwargs["groups"]) * \
        w_shape[1] * w_shape[2]


def _filter_data(geom, seed=0):
    """x, dy, filter_hw, kwargs, K for the filter gradient."""
    x_shape, w_shape, y_shape, kwargs = _geometry(geom)
    rng = np.random.default_rng(seed)
    return rand(rng, x_shape), rand(rng, y_shape), w_shape[1:3], kwargs, y_shape[1] * y_shape[2] * y_shape[3]


def _references(fn, a, b, *args, **kwargs):
    """(rounded-input reference, exact reference, S rounded, S exact) of ``fn(a, b, *args)`` in float64."""
    f64 = lambda v: np.asarray(v, np.float64)  # noqa: E731
    ar, br = f64(round_tf32(a)), f64(round_tf32(b))
    return (fn(ar, br, *args, **kwargs), fn(f64(a), f64(b), *args, **kwargs),
            fn(np.abs(ar), np.abs(br), *args, **kwargs), fn(np.abs(f64(a)), np.abs(f64(b)), *args, **kwargs))


def _within(name, got, want, bound):
    got = to_host(got).astype(np.float64)
    assert got.shape == want.shape, f"{name}: shape {got.shape}, want {want.shape}"
    assert np.isfinite(got).all(), f"{name}: non-finite values"
    err = np.abs(got - want)
    bad = err > bound
    assert not bad.any(), (f"{name}: {int(bad.sum())}/{err.size} elements off; worst |err| {err.max():.3g}, "
                           f"bound there {bound.flat[np.argmax(err - bound)]:.3g}")
    return err


def _check_tf32(name, got, refs, k):
    rounded, exact, s_rounded, s_exact = refs
    summation = 2 * (k + 2) * U * s_rounded
    err = _within(f"{name} vs the rounded reference", got, rounded, summation)
    _within(f"{name} vs the exact result", got, exact, TF32_PRODUCT * s_exact + summation)
    gap = np.abs(rounded - exact).max()
    assert err.max() * 20 < gap or err.max() == gap == 0, \
        f"{name}: not rounded to TF32 (error {err.max():.3g}, rounding gap {gap:.3g})"


def check_backward_data(name, got, dy, w, input_hw, kwargs, k):
    _check_tf32(name, got, _references(ref.conv_backward_data, dy, w, input_hw, **kwargs), k)


def check_backward_filter(name, got, x, dy, filter_hw, kwargs, k):
    _check_tf32(name, got, _references(ref.conv_backward_filter, x, dy, filter_hw, **kwargs), k)


@pytest.mark.parametrize("geom", GEOMETRIES, ids=IDS)
@pytest.mark.parametrize("device", ALL_DEVICES)
def test_tf32_backward_data_matches_the_reference_on_rounded_inputs(device, geom):
    dy, w, hw, kwargs, k = _data_data(geom)
    dx = ops.conv_backward_data(device, device.asarray(dy), device.asarray(w), hw, precision="tf32", **kwargs)
    check_backward_data(geom[0], dx, dy, w, hw, kwargs, k)


@pytest.mark.parametrize("geom", GEOMETRIES, ids=IDS)
@pytest.mark.parametrize("device", ALL_DEVICES)
def test_tf32_backward_filter_matches_the_reference_on_rounded_inputs(device, geom):
    x, dy, hw, kwargs, k = _filter_data(geom)
    dw = ops.conv_backward_filter(device, device.asarray(x), device.asarray(dy), hw, precision="tf32", **kwargs)
    check_backward_filter(geom[0], dw, x, dy, hw, kwargs, k)


@pytest.mark.parametrize("device", ALL_DEVICES)
def test_tf32_backward_passes_accumulate_with_alpha_and_beta(device):
    geom = GEOMETRIES[2]
    rng = np.random.default_rng(5)
    dy, w, hw, kwargs, k = _data_data(geom, seed=4)
    rounded, _, s_rounded, _ = _references(ref.conv_backward_data, dy, w, hw, **kwargs)
    dx0 = rand(rng, rounded.shape)
    out = device.asarray(dx0.copy())  # host devices may share dx0 itself
    got = ops.conv_backward_data(device, device.asarray(dy), device.asarray(w), hw, out=out, alpha=-1.5, beta=0.75,
                                 precision="tf32", **kwargs)
    assert got is out
    _within("data alpha/beta", got, -1.5 * rounded + 0.75 * dx0,
            2 * (k + 4) * U * (1.5 * s_rounded + 0.75 * np.abs(dx0)))

    x, dy, hw, kwargs, k = _filter_data(geom, seed=6)
    rounded, _, s_rounded, _ = _references(ref.conv_backward_filter, x, dy, hw, **kwargs)
    dw0 = rand(rng, rounded.shape)
    out = device.asarray(dw0.copy())
    got = ops.conv_backward_filter(device, device.asarray(x), device.asarray(dy), hw, out=out, alpha=0.5, beta=-2.0,
                                   precision="tf32", **kwargs)
    assert got is out
    _within("filter alpha/beta", got, 0.5 * rounded - 2.0 * dw0,
            2 * (k + 4) * U * (0.5 * s_rounded + 2.0 * np.abs(dw0)))

    nan_dx = device.asarray(np.full(_geometry(geom)[0], np.nan, np.float32))  # beta == 0 never reads out
    dy, w, hw, kwargs, k = _data_data(geom, seed=7)
    got = ops.conv_backward_data(device, device.asarray(dy), device.asarray(w), hw, out=nan_dx, precision="tf32",
                                 **kwargs)
    check_backward_data("beta 0 over NaN", got, dy, w, hw, kwargs, k)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_tf32_backward_on_numpy_is_the_reference_on_rounded_inputs(dtype):
    geom = GEOMETRIES[2]
    dy, w, hw, kwargs, _ = _data_data(geom, seed=9)
    dy, w = dy.astype(dtype), w.astype(dtype)
    got = ops.conv_backward_data(NUMPY, dy, w, hw, precision="tf32", **kwargs)
    assert got.dtype == dtype
    assert_identical("numpy tf32 data", got, ref.conv_backward_data(round_tf32(dy).astype(dtype),
                                                                    round_tf32(w).astype(dtype), hw, **kwargs))
    assert not np.array_equal(got, ops.conv_backward_data(NUMPY, dy, w, hw, **kwargs))
    x, dy, hw, kwargs, _ = _filter_data(geom, seed=9)
    x, dy = x.astype(dtype), dy.astype(dtype)
    got = ops.conv_backward_filter(NUMPY, x, dy, hw, precision="tf32", **kwargs)
    assert got.dtype == dtype
    assert_identical("numpy tf32 filter", got, ref.conv_backward_filter(round_tf32(x).astype(dtype),
                                                                        round_tf32(dy).astype(dtype), hw, **kwargs))


def test_tf32_backward_on_cpu_is_its_fp32_path_on_rounded_inputs():
    dy, w, hw, kwargs, _ = _data_data(GEOMETRIES[1], seed=10)
    assert_identical("cpu tf32 data", ops.conv_backward_data(CPU, dy, w, hw, precision="tf32", **kwargs),
                     ops.conv_backward_data(CPU, round_tf32(dy), round_tf32(w), hw, **kwargs))
    x, dy, hw, kwargs, _ = _filter_data(GEOMETRIES[1], seed=10)
    assert_identical("cpu tf32 filter", ops.conv_backward_filter(CPU, x, dy, hw, precision="tf32", **kwargs),
                     ops.conv_backward_filter(CPU, round_tf32(x), round_tf32(dy), hw, **kwargs))


@pytest.mark.parametrize("device", COMPILED_DEVICES)
def test_fp32_precision_is_the_default_backward_path_bit_for_bit(device):
    dy, w, hw, kwargs, _ = _data_data(GEOMETRIES[1], seed=11)
    args = (device, device.asarray(dy), device.asarray(w), hw)
    assert_identical("fp32 data", ops.conv_backward_data(*args, precision="fp32", **kwargs),
                     ops.conv_backward_data(*args, **kwargs))
    x, dy, hw, kwargs, _ = _filter_data(GEOMETRIES[1], seed=11)
    args = (device, device.asarray(x), device.asarray(dy), hw)
    assert_identical("fp32 filter", ops.conv_backward_filter(*args, precision="fp32", **kwargs),
                     ops.conv_backward_filter(*args, **kwargs))


@pytest.mark.parametrize("precision, message", [("fp16", "precision must be one of 'fp32', 'tf32', 'bf16'"),
                                                ("bf16", "precision 'bf16' is not implemented for convolutions"),
                                                (None, "precision must be one of"),
                                                (np.array(["tf32"]), "precision must be one of")])
def test_an_unknown_or_unavailable_backward_precision_is_a_clear_error(precision, message):
    dy, w, hw, kwargs, _ = _data_data(GEOMETRIES[2])
    x, _, fhw, _, _ = _filter_data(GEOMETRIES[2])
    for dev in ("numpy", "cpu", "emu"):
        with pytest.raises(ValueError, match=message):
            ops.conv_backward_data(dev, dy, w, hw, precision=precision, **kwargs)
        with pytest.raises(ValueError, match=message):
            ops.conv_backward_filter(dev, x, dy, fhw, precision=precision, **kwargs)

