"""The BF16 convolution backward passes: ``conv_backward_data(..., precision="bf16")`` (dy and w read as bfloat16)
and ``conv_backward_filter(..., precision="bf16")`` (x and dy), FP32 accumulation: the tensor-core kernels of
csrc/kernels/conv_bf16.cu on emu (and cuda when present), the rounded reference on numpy and cpu; float32 or
bfloat16 inputs, a float32 or bfloat16 input gradient, a float32 filter gradient.

Tolerances, per element, inputs uniform in [-1, 1), S = the same operation on absolute values (|dy| |w|, |x| |dy|),
K = the number of products summed into one output (input gradient: F/groups * KH * KW, an upper bound since stride
holes and borders drop some; filter gradient: OH * OW * N), derived as in tests/test_conv_bf16.py:
- against the float64 reference on bfloat16-rounded inputs: a product of two bfloat16 values is exact in FP32
  (8 + 8 significant bits <= 24), so only the FP32 summation errs, by at most (K + 2) u S with u = 2**-24 in any
  order (split-K partial sums and their ordered reduction are one more order); the bound used is twice that (a
  tensor core may truncate inside its adder tree);
- against the exact (unrounded) result: each input is off by at most 2**-8 relative, each product by at most
  2**-7 + 2**-16 relative: |got - exact| <= (2**-7 + 2**-16) S + the summation bound above;
- a bfloat16 input gradient is the FP32 result v rounded once more: |rn(v) - v| <= 2**-8 |v|, so the bound becomes
  2**-8 |want| + 2 x the FP32 bound;
- the result is at least 20 times closer to the rounded reference than the rounded reference is to the exact one
  (a missing or wrong rounding fails this).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import (ALL_DEVICES, COMPILED_DEVICES, CPU, EMU, NUMPY, ROOT, assert_identical, assert_schedules_identical,
                     rand, to_host)
from convnet import ops
from convnet.devices import get_device
from convnet.geometry import ConvGeometry
from convnet.ops._checks import BFLOAT16
from convnet.reference import conv as ref
from convnet.reference.precision import round_bf16, to_bf16

U = 2.0 ** -24
BF16_UNIT = 2.0 ** -8
BF16_PRODUCT = 2.0 ** -7 + 2.0 ** -16
INPUT_DTYPES = [np.dtype(np.float32), BFLOAT16]
DTYPE_IDS = ["float32-in", "bfloat16-in"]

# (name, C, H, W, N, F, KH, KW, stride, pad, groups): awkward but small (the emulator runs every thread). Load paths:
# bfloat16 inputs take cp.async where N % 8 == 0 (and, input gradient, (F/groups) % 8 == 0), float32 ones the 16-byte
# register path where those are multiples of 4; the rest one element.
GEOMETRIES = [
    ("1ch-stride4-pad2-N33", 1, 13, 11, 33, 5, 5, 4, 4, 2, 1),
    ("3ch-N8-F24", 3, 8, 9, 8, 24, 3, 5, 1, (2, 1), 1),
    ("stride2-pad1-groups2-N5", 4, 9, 7, 5, 6, 3, 3, 2, 1, 2),
    ("odd-everything", 5, 7, 9, 3, 7, 3, 2, (2, 1), (1, 0), 1),
    ("batch1-groups3", 6, 8, 8, 1, 9, 3, 3, 1, 1, 3),
    ("stride-gt-filter", 2, 11, 10, 4, 8, 2, 2, 3, 0, 1),
    ("1x1-groups4-N16", 8, 5, 6, 16, 32, 1, 1, 1, 0, 4),
    ("pad-ge-filter", 2, 4, 5, 4, 4, 2, 3, 1, 3, 1),
    ("N16-Fg16-k-tiles", 6, 6, 6, 16, 16, 3, 3, 1, 1, 1),  # K = 144 / 576: several k tiles on cp.async
    ("k-tiles-N5", 8, 6, 6, 5, 20, 3, 3, 1, 1, 1),  # K = 180 / 180: several k tiles on the 1-element paths
    ("groups2-C-gt-tile-N8", 80, 5, 5, 8, 32, 3, 3, 2, 1, 2),  # Cg = 40 > 32: two channel tiles on row 1
]
IDS = [g[0] for g in GEOMETRIES]
BY_NAME = dict(zip(IDS, GEOMETRIES))


def _geometry(geom):
    _, c, h, w, n, f, kh, kw, stride, pad, groups = geom
    kwargs = dict(stride=stride, padding=pad, groups=groups)
    oh, ow = ops.conv_output_shape((c, h, w, n), (c // groups, kh, kw, f), **kwargs)[1:3]
    return (c, h, w, n), (c // groups, kh, kw, f), (f, oh, ow, n), kwargs


def _data_data(geom, seed=0):
    """dy, w (float32, the exact inputs), input_hw, kwargs, K for the input gradient."""
    x_shape, w_shape, y_shape, kwargs = _geometry(geom)
    rng = np.random.default_rng(seed)
    k = w_shape[3] // kwargs["groups"] * w_shape[1] * w_shape[2]
    return rand(rng, y_shape), rand(rng, w_shape), x_shape[1:3], kwargs, k


def _filter_data(geom, seed=0):
    """x, dy (float32, the exact inputs), filter_hw, kwargs, K for the filter gradient."""
    x_shape, w_shape, y_shape, kwargs = _geometry(geom)
    rng = np.random.default_rng(seed)
    return rand(rng, x_shape), rand(rng, y_shape), w_shape[1:3], kwargs, y_shape[1] * y_shape[2] * y_shape[3]


def _as(dtype, *arrays):
    """The arrays as the caller passes them: float32 as they are, or stored as bfloat16 (rounded by the caller)."""
    return tuple(to_bf16(a) if dtype == BFLOAT16 else a for a in arrays)


def _references(fn, a, b, *args, **kwargs):
    """(rounded-input reference, exact reference, S rounded, S exact) of ``fn(a, b, *args)`` in float64."""
    f64 = lambda v: np.asarray(v, np.float64)  # noqa: E731
    ar, br = f64(round_bf16(a)), f64(round_bf16(b))
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


def _check_bf16(name, got, refs, k):
    rounded, exact, s_rounded, s_exact = refs
    summation = 2 * (k + 2) * U * s_rounded
    if to_host(got).dtype == BFLOAT16:
        _within(f"{name} (bfloat16 out) vs the rounded reference", got, rounded,
                BF16_UNIT * np.abs(rounded) + 2 * summation)
        return
    err = _within(f"{name} vs the rounded reference", got, rounded, summation)
    _within(f"{name} vs the exact result", got, exact, BF16_PRODUCT * s_exact + summation)
    gap = np.abs(rounded - exact).max()
    assert err.max() * 20 < gap or err.max() == gap == 0, \
        f"{name}: not rounded to bfloat16 (error {err.max():.3g}, rounding gap {gap:.3g})"


def check_backward_data(name, got, dy, w, input_hw, kwargs, k):
    _check_bf16(name, got, _references(ref.conv_backward_data, dy, w, input_hw, **kwargs), k)


def check_backward_filter(name, got, x, dy, filter_hw, kwargs, k):
    _check_bf16(name, got, _references(ref.conv_backward_filter, x, dy, filter_hw, **kwargs), k)


def _bits(a):
    """A bfloat16 array as its 16-bit patterns (exact comparisons)."""
    return to_host(a).view(np.uint16)


def _run_both(geom, seed, dtype, device=EMU, dx_out=None):
    """(dx, check of dx, dw, check of dw) of the BF16 passes on inputs of ``dtype``."""
    dy, w, hw, kwargs, k = _data_data(geom, seed)
    x, dy2, fhw, kwargs2, k2 = _filter_data(geom, seed + 1)
    dyi, wi, xi, dy2i = (device.asarray(a) for a in _as(dtype, dy, w, x, dy2))
    dx = ops.conv_backward_data(device, dyi, wi, hw, precision="bf16", out=dx_out, **kwargs)
    dw = ops.conv_backward_filter(device, xi, dy2i, fhw, precision="bf16", **kwargs2)
    return (dx, lambda name, got: check_backward_data(name, got, dy, w, hw, kwargs, k),
            dw, lambda name, got: check_backward_filter(name, got, x, dy2, fhw, kwargs2, k2))


@pytest.fixture
def overrides():
    """Set the BF16 kernels' tile row, planted defect and filter-gradient splits on emu for one test; restored."""
    yield EMU.kernels.conv_bf16_set_overrides
    EMU.kernels.conv_bf16_set_overrides(-1, 0, 0)


@pytest.mark.parametrize("dtype", INPUT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("geom", GEOMETRIES, ids=IDS)
@pytest.mark.parametrize("device", ALL_DEVICES)
def test_bf16_backward_matches_the_reference_on_rounded_inputs(device, geom, dtype):
    dx, check_dx, dw, check_dw = _run_both(geom, 0, dtype, device)
    assert dx.dtype == np.float32 and dw.dtype == np.float32
    check_dx(f"{geom[0]} data", dx)
    check_dw(f"{geom[0]} filter", dw)


@pytest.mark.parametrize("dtype", INPUT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", ["odd-everything", "N16-Fg16-k-tiles"])
@pytest.mark.parametrize("device", ALL_DEVICES)
def test_a_bf16_input_gradient_is_the_float32_result_rounded_once(device, name, dtype):
    geom = BY_NAME[name]
    dx32, check_dx, _, _ = _run_both(geom, 1, dtype, device)
    out = device.asarray(np.full(dx32.shape, np.nan, np.float32).astype(BFLOAT16))  # beta == 0 never reads out
    dx16, _, _, _ = _run_both(geom, 1, dtype, device, dx_out=out)
    assert dx16 is out and to_host(dx16).dtype == BFLOAT16
    check_dx(f"{name} bfloat16 dx", dx16)
    np.testing.assert_array_equal(_bits(dx16), _bits(to_bf16(to_host(dx32))))


@pytest.mark.parametrize("out_dtype", INPUT_DTYPES, ids=["float32-dx", "bfloat16-dx"])
@pytest.mark.parametrize("dtype", INPUT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("device", COMPILED_DEVICES)
@pytest.mark.sanitize
def test_bf16_backward_accumulates_with_alpha_and_beta(device, dtype, out_dtype):
    geom = BY_NAME["stride2-pad1-groups2-N5"]
    dy, w, hw, kwargs, k = _data_data(geom, seed=4)
    rounded, _, s_rounded, _ = _references(ref.conv_backward_data, dy, w, hw, **kwargs)
    dx0 = rand(np.random.default_rng(5), rounded.shape).astype(out_dtype)
    out = device.asarray(dx0.copy())
    got = ops.conv_backward_data(device, *(device.asarray(a) for a in _as(dtype, dy, w)), hw, out=out, alpha=-1.5,
                                 beta=0.75, precision="bf16", **kwargs)
    assert got is out
    want = -1.5 * rounded + 0.75 * dx0.astype(np.float64)
    bound = 2 * (k + 4) * U * (1.5 * s_rounded + 0.75 * np.abs(dx0.astype(np.float64)))
    if out_dtype == BFLOAT16:  # one more rounding, of the FP32 result
        bound = BF16_UNIT * np.abs(want) + 2 * bound
    _within("data alpha/beta", got, want, bound)
    x, dy, fhw, kwargs, k = _filter_data(geom, seed=6)
    rounded, _, s_rounded, _ = _references(ref.conv_backward_filter, x, dy, fhw, **kwargs)
    dw0 = rand(np.random.default_rng(7), rounded.shape)
    got = ops.conv_backward_filter(device, *(device.asarray(a) for a in _as(dtype, x, dy)), fhw,
                                   out=device.asarray(dw0.copy()), alpha=0.5, beta=-2.0, precision="bf16", **kwargs)
    _within("filter alpha/beta", got, 0.5 * rounded - 2.0 * dw0,
            2 * (k + 4) * U * (0.5 * s_rounded + 2.0 * np.abs(dw0)))


# Row 0 (64 x 128, 8 warps) is picked only for big problems: force each row on awkward small ones.
@pytest.mark.parametrize("dtype", INPUT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", ["1ch-stride4-pad2-N33", "N16-Fg16-k-tiles", "groups2-C-gt-tile-N8"])
@pytest.mark.parametrize("row", [0, 1])
def test_each_bf16_backward_tile_is_correct_on_awkward_geometries(row, name, dtype, overrides):
    overrides(row, 0, 0)
    dx, check_dx, dw, check_dw = _run_both(BY_NAME[name], 20, dtype)
    check_dx(f"{name} data tile {row}", dx)
    check_dw(f"{name} filter tile {row}", dw)


@pytest.mark.parametrize("dtype", INPUT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("splits", [2, 5])
@pytest.mark.parametrize("name", ["1ch-stride4-pad2-N33", "N16-Fg16-k-tiles", "k-tiles-N5"])
def test_bf16_filter_gradient_split_k_sums_every_chunk_once(name, splits, dtype, overrides):
    """Forced splits (chunks of whole 32-deep k tiles; the last one short) through the workspace and the ordered
    reduction, with alpha/beta applied once, after the reduction."""
    overrides(-1, 0, splits)
    x, dy, hw, kwargs, k = _filter_data(BY_NAME[name], seed=21)
    g = ConvGeometry.of_backward_filter(x.shape, dy.shape, hw, **kwargs)
    plan = EMU.kernels.conv_bf16_plan(g, dtype == BFLOAT16, EMU.kernels.ConvPass.backward_filter)
    used = int(re.search(r"(\d+) split\(s\)", plan).group(1))
    assert 1 < used <= splits, plan
    assert EMU.kernels.conv_backward_filter_bf16_workspace(g) == used * x.shape[0] // kwargs["groups"] * \
        hw[0] * hw[1] * dy.shape[0]
    xi, dyi = _as(dtype, x, dy)
    check_backward_filter(f"{name} {splits} splits", ops.conv_backward_filter(EMU, xi, dyi, hw, precision="bf16",
                                                                              **kwargs), x, dy, hw, kwargs, k)
    rounded, _, s_rounded, _ = _references(ref.conv_backward_filter, x, dy, hw, **kwargs)
    dw0 = rand(np.random.default_rng(22), rounded.shape)
    got = ops.conv_backward_filter(EMU, xi, dyi, hw, out=dw0.copy(), alpha=0.5, beta=-2.0, precision="bf16", **kwargs)
    _within("split alpha/beta", got, 0.5 * rounded - 2.0 * dw0,
            2 * (k + 4) * U * (0.5 * s_rounded + 2.0 * np.abs(dw0)))


@st.composite
def geometries(draw):
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    c = groups * draw(st.integers(1, 5))
    f = groups * draw(st.sampled_from([1, 3, 4, 8, 16, 21]))
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    ph, pw = draw(st.integers(0, 2)), draw(st.integers(0, 2))
    h = draw(st.integers(max(1, kh - 2 * ph), 9))
    w = draw(st.integers(max(1, kw - 2 * pw), 9))
    n = draw(st.sampled_from([1, 2, 3, 4, 5, 8, 16, 33]))
    return ("random", c, h, w, n, f, kh, kw, (sh, sw), (ph, pw), groups)


@settings(max_examples=20, deadline=None)
@given(geom=geometries(), seed=st.integers(0, 2**30), row=st.sampled_from([-1, 0, 1]),
       splits=st.sampled_from([0, 0, 2, 5]), dtype=st.sampled_from(INPUT_DTYPES), bf16_dx=st.booleans())
def test_bf16_backward_on_random_geometries(geom, seed, row, splits, dtype, bf16_dx):
    EMU.kernels.conv_bf16_set_overrides(row, 0, splits)
    try:
        out = np.empty(_geometry(geom)[0], BFLOAT16) if bf16_dx else None
        dx, check_dx, dw, check_dw = _run_both(geom, seed, dtype, dx_out=out)
    finally:
        EMU.kernels.conv_bf16_set_overrides(-1, 0, 0)
    check_dx(f"{geom} data tile {row} {dtype}", dx)
    check_dw(f"{geom} filter tile {row} splits {splits} {dtype}", dw)


# True channel counts and filters, small images, batch 8, bfloat16 storage (the cp.async paths at size).
ALEXNET = [("conv2-two-towers", 96, 7, 7, 8, 256, 5, 5, 1, 2, 2)]


@pytest.mark.parametrize("geom", ALEXNET, ids=[g[0] for g in ALEXNET])
def test_bf16_backward_on_alexnet_channel_counts(geom):
    dx, check_dx, dw, check_dw = _run_both(geom, 23, BFLOAT16)
    check_dx(geom[0], dx)
    check_dw(geom[0], dw)


def _offset_view(device, a, rng):
    """``a`` on ``device`` as a view one element into a random buffer of its dtype: not 16-byte aligned."""
    buf = rand(rng, a.size + 1).astype(a.dtype)
    view = device.asarray(buf)[1:].reshape(a.shape)
    view[...] = device.asarray(a)
    return view


@pytest.mark.parametrize("dtype", INPUT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("device", COMPILED_DEVICES)
@pytest.mark.sanitize
def test_unaligned_backward_inputs_take_the_one_element_path_with_the_same_sums(device, dtype):
    geom = BY_NAME["N16-Fg16-k-tiles"]  # cp.async / 16-byte register paths when aligned
    rng = np.random.default_rng(24)
    dy, w, hw, kwargs, k = _data_data(geom, seed=25)
    dyi, wi = _as(dtype, dy, w)
    got = ops.conv_backward_data(device, _offset_view(device, dyi, rng), _offset_view(device, wi, rng), hw,
                                 precision="bf16", **kwargs)
    check_backward_data("unaligned data", got, dy, w, hw, kwargs, k)
    assert_identical("unaligned vs aligned data", got, ops.conv_backward_data(
        device, device.asarray(dyi), device.asarray(wi), hw, precision="bf16", **kwargs))
    x, dy, hw, kwargs, k = _filter_data(geom, seed=26)
    xi, dyi = _as(dtype, x, dy)
    got = ops.conv_backward_filter(device, _offset_view(device, xi, rng), _offset_view(device, dyi, rng), hw,
                                   precision="bf16", **kwargs)
    check_backward_filter("unaligned filter", got, x, dy, hw, kwargs, k)
    assert_identical("unaligned vs aligned filter", got, ops.conv_backward_filter(
        device, device.asarray(xi), device.asarray(dyi), hw, precision="bf16", **kwargs))


@pytest.mark.parametrize("dtype", INPUT_DTYPES, ids=DTYPE_IDS)
def test_bf16_backward_is_identical_under_every_emulator_schedule(dtype, overrides):
    overrides(-1, 0, 3)  # the split workspace and its reduction too
    geom = BY_NAME["N16-Fg16-k-tiles"]  # cp.async for bfloat16, the 16-byte register path for float32
    dy, w, hw, kwargs, _ = _data_data(geom, seed=27)
    x, _, fhw, _, _ = _filter_data(geom, seed=27)
    dy, w, x = _as(dtype, dy, w, x)
    assert_schedules_identical(lambda: (ops.conv_backward_data(EMU, dy, w, hw, precision="bf16", **kwargs),
                                        ops.conv_backward_filter(EMU, x, dy, fhw, precision="bf16", **kwargs)),
                               ["dx", "dw"], seed=28)


# (defect, input dtype, geometry): the cp.async path (bfloat16, N % 8 == 0, Fg % 8 == 0) and the float32 1-element
# one, each with several k tiles in both passes (the pipelines wrap around their stages). The cp.async geometry has
# 40 channels a group: with few channels, the input gradient's A rows that matter are all staged by the warp that
# reads them, and a missing barrier there could go unseen under the default schedule.
PLANTED = [
    (1, BFLOAT16, "groups2-C-gt-tile-N8"), (2, BFLOAT16, "groups2-C-gt-tile-N8"), (3, BFLOAT16, "groups2-C-gt-tile-N8"),
    (2, np.dtype(np.float32), "k-tiles-N5"), (3, np.dtype(np.float32), "k-tiles-N5"),
]


@pytest.mark.parametrize("defect, dtype, name", PLANTED,
                         ids=["cp-async-no-wait", "cp-async-no-barrier", "cp-async-wrong-trans",
                              "registers-no-barrier", "registers-wrong-trans"])
def test_a_planted_pipeline_or_fragment_bug_in_a_backward_kernel_fails_on_the_emulator(defect, dtype, name,
                                                                                        overrides):
    """Each backward kernel with one planted defect gives NaN (cp.async and shared-memory poison) or wrong numbers on
    the emulator; the same calls without it pass."""
    geom = BY_NAME[name]
    g = ConvGeometry.of(*_geometry(geom)[:2], **_geometry(geom)[3])
    for pass_ in (EMU.kernels.ConvPass.backward_data, EMU.kernels.ConvPass.backward_filter):
        plan = EMU.kernels.conv_bf16_plan(g, dtype == BFLOAT16, pass_)
        assert ("cp.async" in plan) == (dtype == BFLOAT16) and ("1-element" in plan) != (dtype == BFLOAT16), plan
    overrides(-1, defect, 0)
    dx, check_dx, dw, check_dw = _run_both(geom, 29, dtype)
    with pytest.raises(AssertionError):
        check_dx("planted data", dx)
    with pytest.raises(AssertionError):
        check_dw("planted filter", dw)
    overrides(-1, 0, 0)
    dx, check_dx, dw, check_dw = _run_both(geom, 29, dtype)
    check_dx("fixed data", dx)
    check_dw("fixed filter", dw)


def test_the_cp_async_defect_is_refused_in_the_backward_register_paths(overrides):
    overrides(-1, 1, 0)
    with pytest.raises(ValueError, match="planted defect 1 is not planted in the float32 1-element register path"):
        _run_both(BY_NAME["odd-everything"], 0, np.dtype(np.float32))


def test_bf16_backward_plans_name_the_tile_path_and_splits():
    kernels = EMU.kernels
    data, filt = kernels.ConvPass.backward_data, kernels.ConvPass.backward_filter
    big = ConvGeometry.of((96, 27, 27, 128), (48, 5, 5, 256), stride=1, padding=2, groups=2)  # AlexNet conv2
    assert kernels.conv_bf16_plan(big, True, data) == \
        "bf16 tile 64x128x32, 256 threads, cp.async 16-byte path, grid 729x1x2"
    assert kernels.conv_bf16_plan(big, False, filt) == \
        "bf16 tile 64x128x32, 256 threads, float32 16-byte register path, grid 10x2x14, 7 split(s) of 13344"
    assert kernels.conv_backward_filter_bf16_workspace(big) == 7 * 48 * 5 * 5 * 256
    small = ConvGeometry.of((3, 9, 9, 5), (3, 3, 3, 8), stride=1, padding=0, groups=1)
    assert kernels.conv_bf16_plan(small, True, data) == \
        "bf16 tile 32x64x32, 64 threads, bfloat16 1-element register path, grid 7x1x1"
    assert kernels.conv_bf16_plan(small, False, filt) == \
        "bf16 tile 32x64x32, 64 threads, float32 1-element register path, grid 1x1x1, 1 split(s) of 245"
    assert kernels.conv_backward_filter_bf16_workspace(small) == 0
    with pytest.raises(ValueError, match="wgrad_splits"):
        kernels.conv_bf16_set_overrides(-1, 0, -1)


@pytest.mark.parametrize("device", ["numpy", "cpu", "emu"])
def test_bad_bf16_backward_calls_are_clear_errors(device):
    dev = get_device(device)
    dy, w, hw, kwargs, _ = _data_data(BY_NAME["stride2-pad1-groups2-N5"])
    x, _, fhw, _, _ = _filter_data(BY_NAME["stride2-pad1-groups2-N5"])
    dx_shape, dw_shape = x.shape, w.shape
    with pytest.raises(TypeError, match="dy and w of one dtype, both bfloat16 or both float32.*; got dy float32, "
                                        "w bfloat16"):
        ops.conv_backward_data(dev, dy, to_bf16(w), hw, precision="bf16", **kwargs)
    with pytest.raises(TypeError, match="x and dy of one dtype.*; got x bfloat16, dy float32"):
        ops.conv_backward_filter(dev, to_bf16(x), dy, fhw, precision="bf16", **kwargs)
    with pytest.raises(TypeError, match="out must have dtype float32"):  # the filter gradient stays FP32
        ops.conv_backward_filter(dev, to_bf16(x), to_bf16(dy), fhw, out=np.empty(dw_shape, BFLOAT16),
                                 precision="bf16", **kwargs)
    with pytest.raises(TypeError, match="out must have dtype float32 or bfloat16"):
        ops.conv_backward_data(dev, dy, w, hw, out=np.empty(dx_shape, np.float16), precision="bf16", **kwargs)
    with pytest.raises(ValueError, match="out must have shape"):
        ops.conv_backward_data(dev, dy, w, hw, out=np.empty(dx_shape[::-1], BFLOAT16), precision="bf16", **kwargs)
    with pytest.raises(TypeError, match="dy must have dtype"):
        ops.conv_backward_data(dev, dy.astype(np.int32), w, hw, precision="bf16", **kwargs)
    for precision in ("fp32", "tf32"):  # bfloat16 arrays only in bf16
        with pytest.raises(TypeError, match="dy is bfloat16: bfloat16 inputs need precision='bf16'"):
            ops.conv_backward_data(dev, to_bf16(dy), to_bf16(w), hw, precision=precision, **kwargs)
        with pytest.raises(TypeError, match="x is bfloat16: bfloat16 inputs need precision='bf16'"):
            ops.conv_backward_filter(dev, to_bf16(x), to_bf16(dy), fhw, precision=precision, **kwargs)
        with pytest.raises(TypeError, match="out must have dtype float32"):
            ops.conv_backward_data(dev, dy, w, hw, out=np.empty(dx_shape, BFLOAT16), precision=precision, **kwargs)


def test_the_bf16_backward_bindings_recheck_what_python_validated():
    """A too-small split workspace, a null pointer."""
    x, dy, fhw, kwargs, _ = _filter_data(BY_NAME["N16-Fg16-k-tiles"])
    g = ConvGeometry.of_backward_filter(x.shape, dy.shape, fhw, **kwargs)
    EMU.kernels.conv_bf16_set_overrides(-1, 0, 3)
    try:
        need = EMU.kernels.conv_backward_filter_bf16_workspace(g)
        dw, ws = np.empty(g.w_shape, np.float32), np.empty(need - 1, np.float32)
        with pytest.raises(ValueError, match="workspace too small"):
            EMU.kernels.conv_backward_filter_bf16(x.ctypes.data, dy.ctypes.data, False, dw.ctypes.data,
                                                  ws.ctypes.data, need - 1, g, 1.0, 0.0, 0)
    finally:
        EMU.kernels.conv_bf16_set_overrides(-1, 0, 0)
    dx = np.empty(g.x_shape, np.float32)
    with pytest.raises(ValueError, match="null pointer"):
        EMU.kernels.conv_backward_data_bf16(0, dx.ctypes.data, False, dx.ctypes.data, False, g, 1.0, 0.0, 0)


@pytest.mark.parametrize("dtype", INPUT_DTYPES, ids=DTYPE_IDS)
def test_bf16_backward_on_numpy_and_cpu_is_the_fp32_path_on_rounded_inputs(dtype):
    dy, w, hw, kwargs, _ = _data_data(BY_NAME["odd-everything"], seed=9)
    x, _, fhw, _, _ = _filter_data(BY_NAME["odd-everything"], seed=9)
    for dev in (NUMPY, CPU):
        assert_identical(f"{dev} data", ops.conv_backward_data(dev, *_as(dtype, dy, w), hw, precision="bf16", **kwargs),
                         ops.conv_backward_data(dev, round_bf16(dy), round_bf16(w), hw, **kwargs))
        assert_identical(f"{dev} filter",
                         ops.conv_backward_filter(dev, *_as(dtype, x, dy), fhw, precision="bf16", **kwargs),
                         ops.conv_backward_filter(dev, round_bf16(x), round_bf16(dy), fhw, **kwargs))
    # a float64 numpy call sums the rounded inputs in float64
    got = ops.conv_backward_data(NUMPY, dy.astype(np.float64), w.astype(np.float64), hw, precision="bf16", **kwargs)
    assert got.dtype == np.float64
    assert_identical("numpy float64", got, ref.conv_backward_data(round_bf16(dy).astype(np.float64),
                                                                  round_bf16(w).astype(np.float64), hw, **kwargs))


def test_bf16_backward_runs_through_the_cuda_backend_on_the_fake_gpu(monkeypatch):
    """The cuda path's Python (pointers, dtype flags, stream, binding names, the split workspace) on
    tests/fake_cupy.py with the emulator's kernels."""
    from fake_cupy import FakeCupy

    FakeCupy(devices=1).install(monkeypatch, usable=True)
    dev = get_device("cuda:0")
    EMU.kernels.conv_bf16_set_overrides(-1, 0, 2)
    try:
        with dev.activate():
            geom = BY_NAME["N16-Fg16-k-tiles"]
            dx, check_dx, dw, check_dw = _run_both(geom, 30, BFLOAT16, device=dev)
            check_dx("fake cuda data", dev.to_numpy(dx))
            check_dw("fake cuda filter", dev.to_numpy(dw))
            out = dev.asarray(np.empty(dx.shape, BFLOAT16))
            _run_both(geom, 30, BFLOAT16, device=dev, dx_out=out)
            np.testing.assert_array_equal(_bits(dev.to_numpy(out)), _bits(to_bf16(dev.to_numpy(dx))))
    finally:
        EMU.kernels.conv_bf16_set_overrides(-1, 0, 0)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc")
def test_nvcc_keeps_the_mma_loop_of_every_bf16_backward_kernel(tmp_path):
    """As the forward's check: each production instance of conv_bwd_bf16 has its k tile's mma.sync and ldmatrix
    instructions (plain for the k-contiguous tiles, .trans for the input gradient's k-major B), fully unrolled, and no
    local memory."""
    ptx = tmp_path / "conv_bf16.ptx"
    subprocess.run(["nvcc", "-std=c++17", "-O3", "-DNDEBUG", "--expt-relaxed-constexpr", "-DCONVNET_EMU=0",
                    f"-I{ROOT / 'csrc'}", "-arch=sm_80", "-ptx", str(ROOT / "csrc/kernels/conv_bf16.cu"),
                    "-o", str(ptx)], check=True, capture_output=True,
                   env={k: v for k, v in os.environ.items() if k != "LD_PRELOAD"})  # nvcc crashes under ASan
    entries = [e for e in re.split(r"\.entry ", ptx.read_text())[1:] if "conv_bwd_bf16" in e.split("(", 1)[0]]
    assert len(entries) == 16  # 2 tiles x 2 passes x 4 load paths; the planted defects exist on the emulator only
    for body in entries:
        op, *sizes = re.search(r"conv_bwd_bf16I\w*?(Dgrad|Wgrad)Bf16ELi(\d+)ELi(\d+)ELi(\d+)ELi(\d+)ELi(\d+)ELi(\d+)E",
                               body).groups()
        bm, bn, bk, wm, wn, stages = map(int, sizes)
        mt, nt = bm // wm // 16, bn // wn // 8
        assert body.count("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32") == bk // 16 * mt * nt
        plain = body.count("ldmatrix.sync.aligned.m8n8.x4.shared.b16")
        trans = body.count("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16")
        b_loads = bk // 16 * nt // 2
        assert (plain, trans) == ((bk // 16 * mt, b_loads) if op == "Dgrad" else
                                  (bk // 16 * mt + b_loads, 0)), op
        assert ("cp.async.ca.shared.global" in body) == (stages == 3)
        assert "ld.local" not in body and "st.local" not in body
