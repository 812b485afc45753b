"""The TF32 convolution backward passes: ``conv_backward_data(..., precision="tf32")`` (dy and w rounded to TF32)
and ``conv_backward_filter(..., precision="tf32")`` (x and dy rounded), FP32 accumulation: the tensor-core kernels of
csrc/kernels/conv_tf32.cu on emu (and cuda when present), the rounded reference on numpy and cpu.

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

import os
import re
import shutil
import subprocess

from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import (ALL_DEVICES, COMPILED_DEVICES, CPU, EMU, NUMPY, ROOT, assert_identical, assert_schedules_identical,
                     offset_view, rand, to_host)
from convnet import ops
from convnet.geometry import ConvGeometry
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
                                                (None, "precision must be one of"),
                                                (np.array(["tf32"]), "precision must be one of")])
def test_an_unknown_backward_precision_is_a_clear_error(precision, message):
    dy, w, hw, kwargs, _ = _data_data(GEOMETRIES[2])
    x, _, fhw, _, _ = _filter_data(GEOMETRIES[2])
    for dev in ("numpy", "cpu", "emu"):
        with pytest.raises(ValueError, match=message):
            ops.conv_backward_data(dev, dy, w, hw, precision=precision, **kwargs)
        with pytest.raises(ValueError, match=message):
            ops.conv_backward_filter(dev, x, dy, fhw, precision=precision, **kwargs)



# ---------------------------------------------------------------------------------------------------- the kernels
@pytest.fixture
def overrides():
    """Set the TF32 kernels' tile row, planted defect and filter-gradient splits on emu for one test; restored."""
    yield EMU.kernels.conv_tf32_set_overrides
    EMU.kernels.conv_tf32_set_overrides(-1, 0, 0)


def _run_both(geom, seed, device=EMU):
    """(dx, dw) of the TF32 kernels and the checks that take them."""
    dy, w, hw, kwargs, k = _data_data(geom, seed)
    x, dy2, fhw, kwargs2, k2 = _filter_data(geom, seed + 1)
    dx = ops.conv_backward_data(device, device.asarray(dy), device.asarray(w), hw, precision="tf32", **kwargs)
    dw = ops.conv_backward_filter(device, device.asarray(x), device.asarray(dy2), fhw, precision="tf32", **kwargs2)
    return (dx, lambda name, got: check_backward_data(name, got, dy, w, hw, kwargs, k),
            dw, lambda name, got: check_backward_filter(name, got, x, dy2, fhw, kwargs2, k2))


# Row 0 (64 x 128, 8 warps) is picked only for big problems: force each row on awkward small ones.
@pytest.mark.parametrize("row", [0, 1])
@pytest.mark.parametrize("geom", [GEOMETRIES[i] for i in (0, 1, 2, 3, 8, 9)], ids=[IDS[i] for i in (0, 1, 2, 3, 8, 9)])
def test_each_tf32_backward_tile_is_correct_on_awkward_geometries(geom, row, overrides):
    overrides(row, 0, 0)
    dx, check_dx, dw, check_dw = _run_both(geom, seed=20)
    check_dx(f"{geom[0]} data tile {row}", dx)
    check_dw(f"{geom[0]} filter tile {row}", dw)


@pytest.mark.parametrize("splits", [2, 3, 7])
@pytest.mark.parametrize("geom", [GEOMETRIES[i] for i in (0, 1, 3, 9)], ids=[IDS[i] for i in (0, 1, 3, 9)])
def test_tf32_filter_gradient_split_k_sums_every_chunk_once(geom, splits, overrides):
    """Forced splits (chunks of whole k tiles; the last one short) through the workspace and the ordered
    reduction, with alpha/beta applied once, after the reduction."""
    overrides(-1, 0, splits)
    x, dy, hw, kwargs, k = _filter_data(geom, seed=21)
    g = ConvGeometry.of_backward_filter(x.shape, dy.shape, hw, **kwargs)
    plan = EMU.kernels.conv_tf32_plan(g, EMU.kernels.ConvPass.backward_filter)
    used = int(re.search(r"(\d+) split\(s\)", plan).group(1))
    assert 1 < used <= splits, plan
    assert EMU.kernels.conv_backward_filter_tf32_workspace(g) == used * x.shape[0] // kwargs["groups"] * \
        hw[0] * hw[1] * dy.shape[0]
    check_backward_filter(f"{geom[0]} {splits} splits", ops.conv_backward_filter(EMU, x, dy, hw, precision="tf32",
                                                                                 **kwargs), x, dy, hw, kwargs, k)
    rounded, _, s_rounded, _ = _references(ref.conv_backward_filter, x, dy, hw, **kwargs)
    dw0 = rand(np.random.default_rng(22), rounded.shape)
    got = ops.conv_backward_filter(EMU, x, dy, hw, out=dw0.copy(), alpha=0.5, beta=-2.0, precision="tf32", **kwargs)
    _within("split alpha/beta", got, 0.5 * rounded - 2.0 * dw0,
            2 * (k + 4) * U * (0.5 * s_rounded + 2.0 * np.abs(dw0)))


@st.composite
def geometries(draw):
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    c = groups * draw(st.integers(1, 5))
    f = groups * draw(st.sampled_from([1, 3, 4, 8, 21, 36]))
    kh, kw = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    sh, sw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    ph, pw = draw(st.integers(0, 3)), draw(st.integers(0, 3))
    h = draw(st.integers(max(1, kh - 2 * ph), 11))
    w = draw(st.integers(max(1, kw - 2 * pw), 11))
    n = draw(st.sampled_from([1, 2, 3, 4, 5, 8, 12, 33]))
    return ("random", c, h, w, n, f, kh, kw, (sh, sw), (ph, pw), groups)


@settings(max_examples=30, deadline=None)
@given(geom=geometries(), seed=st.integers(0, 2**31 - 1), row=st.sampled_from([-1, 0, 1]),
       splits=st.sampled_from([0, 0, 2, 5]))
def test_tf32_backward_on_random_geometries(geom, seed, row, splits):
    EMU.kernels.conv_tf32_set_overrides(row, 0, splits)
    try:
        dx, check_dx, dw, check_dw = _run_both(geom, seed % 2**30)
    finally:
        EMU.kernels.conv_tf32_set_overrides(-1, 0, 0)
    check_dx(f"{geom} data tile {row}", dx)
    check_dw(f"{geom} filter tile {row} splits {splits}", dw)


ALEXNET = [  # true channel counts and filters, small images, batch 4 (the 16-byte path)
    ("conv2-two-towers", 96, 9, 9, 4, 256, 5, 5, 1, 2, 2),
    ("conv3", 256, 5, 5, 4, 384, 3, 3, 1, 1, 1),
]


@pytest.mark.parametrize("geom", ALEXNET, ids=[g[0] for g in ALEXNET])
def test_tf32_backward_on_alexnet_channel_counts(geom):
    dx, check_dx, dw, check_dw = _run_both(geom, seed=23)
    check_dx(geom[0], dx)
    check_dw(geom[0], dw)


@pytest.mark.parametrize("device", COMPILED_DEVICES)
@pytest.mark.sanitize
def test_tf32_backward_unaligned_takes_the_4_byte_path_with_the_same_sums(device):
    geom = GEOMETRIES[9]  # N = 32, Fg = 12: the 16-byte path when aligned
    rng = np.random.default_rng(24)
    dy, w, hw, kwargs, k = _data_data(geom, seed=25)
    got = ops.conv_backward_data(device, offset_view(device, dy, rng), offset_view(device, w, rng), hw,
                                 precision="tf32", **kwargs)
    check_backward_data("unaligned data", got, dy, w, hw, kwargs, k)
    assert_identical("unaligned vs aligned data", got, ops.conv_backward_data(
        device, device.asarray(dy), device.asarray(w), hw, precision="tf32", **kwargs))
    x, dy, hw, kwargs, k = _filter_data(geom, seed=26)
    got = ops.conv_backward_filter(device, offset_view(device, x, rng), offset_view(device, dy, rng), hw,
                                   precision="tf32", **kwargs)
    check_backward_filter("unaligned filter", got, x, dy, hw, kwargs, k)
    assert_identical("unaligned vs aligned filter", got, ops.conv_backward_filter(
        device, device.asarray(x), device.asarray(dy), hw, precision="tf32", **kwargs))


def test_tf32_backward_is_identical_under_every_emulator_schedule(overrides):
    overrides(-1, 0, 3)  # the split workspace and its reduction too
    geom = GEOMETRIES[8]
    dy, w, hw, kwargs, _ = _data_data(geom, seed=27)
    x, _, fhw, _, _ = _filter_data(geom, seed=27)
    assert_schedules_identical(lambda: (ops.conv_backward_data(EMU, dy, w, hw, precision="tf32", **kwargs),
                                        ops.conv_backward_filter(EMU, x, dy, fhw, precision="tf32", **kwargs)),
                               ["dx", "dw"], seed=28)


@pytest.mark.parametrize("defect", [1, 2, 3], ids=["no-cp-async-wait", "no-barrier-after-wait", "swapped-a-fragment"])
@pytest.mark.parametrize("aligned", [True, False], ids=["16-byte", "4-byte"])
@pytest.mark.parametrize("row", [0, 1])
def test_a_planted_pipeline_or_fragment_bug_in_a_backward_kernel_fails_on_the_emulator(defect, aligned, row,
                                                                                        overrides):
    """Each backward kernel with one planted defect gives NaN (cp.async poison) or wrong numbers on the emulator; the
    same calls without it pass."""
    geom = GEOMETRIES[8] if aligned else GEOMETRIES[2]  # several k tiles (the pipeline wraps around its stages)
    overrides(row, defect, 0)
    dx, check_dx, dw, check_dw = _run_both(geom, seed=29)
    plan = EMU.kernels.conv_tf32_plan(ConvGeometry.of(*_geometry(geom)[:2], **_geometry(geom)[3]),
                                      EMU.kernels.ConvPass.backward_filter)
    assert ("16-byte" in plan) == aligned
    with pytest.raises(AssertionError):
        check_dx("planted data", dx)
    with pytest.raises(AssertionError):
        check_dw("planted filter", dw)
    overrides(row, 0, 0)
    dx, check_dx, dw, check_dw = _run_both(geom, seed=29)
    check_dx("fixed data", dx)
    check_dw("fixed filter", dw)


def test_tf32_backward_plans_name_the_tile_path_and_splits():
    kernels = EMU.kernels
    big = ConvGeometry.of((96, 27, 27, 128), (48, 5, 5, 256), stride=1, padding=2, groups=2)  # AlexNet conv2
    assert kernels.conv_tf32_plan(big, kernels.ConvPass.backward_data) == \
        "tf32 tile 64x128x16, 256 threads, 16-byte path, grid 729x1x2"
    assert kernels.conv_tf32_plan(big, kernels.ConvPass.backward_filter) == \
        "tf32 tile 64x128x16, 256 threads, 16-byte path, grid 10x2x14, 7 split(s) of 13344"
    assert kernels.conv_backward_filter_tf32_workspace(big) == 7 * 48 * 5 * 5 * 256
    small = ConvGeometry.of((3, 9, 9, 5), (3, 3, 3, 8), stride=1, padding=0, groups=1)
    assert kernels.conv_tf32_plan(small, kernels.ConvPass.backward_data) == \
        "tf32 tile 32x64x16, 64 threads, 4-byte path, grid 7x1x1"
    assert kernels.conv_tf32_plan(small, kernels.ConvPass.backward_filter) == \
        "tf32 tile 32x64x16, 64 threads, 4-byte path, grid 1x1x1, 1 split(s) of 245"
    assert kernels.conv_backward_filter_tf32_workspace(small) == 0
    with pytest.raises(ValueError, match="wgrad_splits"):
        kernels.conv_tf32_set_overrides(-1, 0, -1)


def test_bad_backward_inputs_are_clear_errors():
    dy, w, hw, kwargs, _ = _data_data(GEOMETRIES[2])
    x, _, fhw, _, _ = _filter_data(GEOMETRIES[2])
    with pytest.raises(TypeError, match="w must have dtype float32"):
        ops.conv_backward_data(EMU, dy, w.astype(np.float64), hw, precision="tf32", **kwargs)
    with pytest.raises(ValueError, match="filters"):  # F of w does not match dy
        ops.conv_backward_data(EMU, dy, np.ascontiguousarray(w[:, :, :, :-2]), hw, precision="tf32", **kwargs)
    with pytest.raises(ValueError, match="groups"):  # C not divisible by groups
        ops.conv_backward_filter(EMU, x[:-1], dy, fhw, precision="tf32", **kwargs)
    with pytest.raises(ValueError, match="out"):
        ops.conv_backward_filter(EMU, x, dy, fhw, out=np.zeros((1, 2, 3, 4), np.float32), precision="tf32",
                                 **kwargs)
    # The binding re-checks what Python validated: a too-small split workspace, a geometry whose output size lies.
    g = ConvGeometry.of_backward_filter(x.shape, dy.shape, fhw, **kwargs)
    EMU.kernels.conv_tf32_set_overrides(-1, 0, 3)
    try:
        need = EMU.kernels.conv_backward_filter_tf32_workspace(g)
        dw, ws = np.empty(g.w_shape, np.float32), np.empty(need - 1, np.float32)
        with pytest.raises(ValueError, match="workspace too small"):
            EMU.kernels.conv_backward_filter_tf32(x.ctypes.data, dy.ctypes.data, dw.ctypes.data, ws.ctypes.data,
                                                  need - 1, g, 1.0, 0.0, 0)
    finally:
        EMU.kernels.conv_tf32_set_overrides(-1, 0, 0)
    dx = np.empty(g.x_shape, np.float32)
    with pytest.raises(ValueError, match="null pointer"):
        EMU.kernels.conv_backward_data_tf32(0, w.ctypes.data, dx.ctypes.data, g, 1.0, 0.0, 0)


def test_tf32_backward_runs_through_the_cuda_backend_on_the_fake_gpu(monkeypatch):
    """The cuda path's Python (pointers, stream, binding names, the split workspace) on tests/fake_cupy.py with the
    emulator's kernels."""
    from fake_cupy import FakeCupy
    from convnet.devices import get_device

    FakeCupy(devices=1).install(monkeypatch, usable=True)
    dev = get_device("cuda:0")
    EMU.kernels.conv_tf32_set_overrides(-1, 0, 2)
    try:
        with dev.activate():
            dx, check_dx, dw, check_dw = _run_both(GEOMETRIES[8], seed=30, device=dev)
            check_dx("fake cuda data", dev.to_numpy(dx))
            check_dw("fake cuda filter", dev.to_numpy(dw))
    finally:
        EMU.kernels.conv_tf32_set_overrides(-1, 0, 0)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc")
def test_nvcc_keeps_the_mma_loop_of_every_tf32_backward_kernel(tmp_path):
    """As tests/test_conv_tf32.py's check for the forward: each production instance of conv_bwd_tf32 has its k
    tile's mma.sync and cvt.rna instructions, fully unrolled, and no local-memory spills."""
    ptx = tmp_path / "conv_tf32.ptx"
    subprocess.run(["nvcc", "-std=c++17", "-O3", "-DNDEBUG", "--expt-relaxed-constexpr", "-DCONVNET_EMU=0",
                    f"-I{ROOT / 'csrc'}", "-arch=sm_80", "-ptx", str(ROOT / "csrc/kernels/conv_tf32.cu"),
                    "-o", str(ptx)], check=True, capture_output=True,
                   env={k: v for k, v in os.environ.items() if k != "LD_PRELOAD"})  # nvcc crashes under a preloaded ASan
    entries = [e for e in re.split(r"\.entry ", ptx.read_text())[1:] if "conv_bwd_tf32" in e.split("(", 1)[0]]
    assert len(entries) == 8  # 2 tiles x 2 passes x 2 paths; the planted defects exist on the emulator only
    for body in entries:
        bm, bn, bk, wm, wn = map(int, re.search(r"conv_bwd_tf32I\w+?ELi(\d+)ELi(\d+)ELi(\d+)ELi(\d+)ELi(\d+)E",
                                                body).groups())
        mt, nt = bm // wm // 16, bn // wn // 8
        assert body.count("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32") == bk // 8 * mt * nt
        assert body.count("cvt.rna.tf32.f32") == bk // 8 * (mt * 4 + nt * 2)
        assert "ld.local" not in body and "st.local" not in body
