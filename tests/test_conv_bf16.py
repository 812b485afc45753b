"""The BF16 convolution forward (``conv_forward(..., precision="bf16")``): the tensor-core kernel of
csrc/kernels/conv_bf16.cu on emu (and cuda when present), the rounded reference on numpy and cpu; float32 or
bfloat16 inputs, float32 or bfloat16 output.

Tolerances, per element, inputs uniform in [-1, 1), S = the same convolution of absolute values (|x| |w| + |b|):
- against the float64 reference on bfloat16-rounded inputs: the products of two bfloat16 values are exact in FP32
  (8 + 8 significant bits <= 24), so only the FP32 summation errs: |got - want| <= (K + 2) u S with u = 2**-24 for
  any order of K products and the bias; the bound used is twice that (a GPU's tensor core may truncate inside its
  adder tree);
- against the exact (unrounded) convolution: each input is off by at most half a bfloat16 ulp, 2**-8 relative (8
  significant bits), so each product by at most 2**-7 + 2**-16 relative: |got - exact| <= (2**-7 + 2**-16) S + the
  summation bound above;
- a bfloat16 output is the FP32 result v rounded once more: |rn(v) - v| <= 2**-8 |v|, so the bound becomes
  2**-8 |want| + 2 x the FP32 bound (|v| <= |want| + that bound).
The first bound is far below what a missing rounding costs: the test also checks the kernel is at least 20 times
closer to the rounded reference than the rounded reference is to the exact one.
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

from helpers import (COMPILED_DEVICES, CPU, EMU, NUMPY, ROOT, assert_identical, assert_schedules_identical,
                     offset_view, rand, to_host)
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

# (name, C, H, W, N, F, KH, KW, stride, pad, groups). Load paths: bfloat16 inputs take cp.async where N % 8 == 0 and
# (F/groups) % 8 == 0, float32 ones the 16-byte register path where both are multiples of 4; the rest one element.
GEOMETRIES = [
    ("1ch-stride4-pad2-N33", 1, 19, 17, 33, 5, 5, 4, 4, 2, 1),
    ("3ch-N8-F24", 3, 10, 11, 8, 24, 3, 5, 1, (2, 1), 1),
    ("3ch-stride2-N40-F64", 3, 13, 13, 40, 64, 5, 5, 2, 2, 1),  # K = 75: a k tail in the last tile
    ("stride2-pad1-groups2-N5", 4, 9, 7, 5, 6, 3, 3, 2, 1, 2),
    ("odd-everything", 5, 7, 9, 3, 7, 3, 2, (2, 1), (1, 0), 1),
    ("batch1-groups3", 6, 8, 8, 1, 9, 3, 3, 1, 1, 3),
    ("stride-gt-filter", 2, 11, 10, 4, 8, 2, 2, 3, 0, 1),
    ("1x1-groups4-N16", 8, 5, 6, 16, 32, 1, 1, 1, 0, 4),
    ("pad-ge-filter", 2, 4, 5, 4, 4, 2, 3, 1, 3, 1),
    ("N8-Fg12", 4, 6, 6, 8, 12, 3, 3, 1, 1, 1),
    ("many-k-tiles-F-gt-tile", 16, 7, 7, 12, 80, 3, 3, 1, 1, 1),  # K = 144: 5 k tiles, 3 filter tiles
    ("k-tiles-N5", 8, 6, 7, 5, 20, 3, 3, 1, 1, 1),  # K = 72: 3 k tiles on the 1-element paths
    ("groups2-Fg48-N32", 8, 9, 9, 32, 96, 3, 3, 1, 1, 2),
]
IDS = [g[0] for g in GEOMETRIES]
BY_NAME = dict(zip(IDS, GEOMETRIES))


def _data(geom, seed=0):
    """Float32 x, w, bias (the exact inputs) and the keyword arguments."""
    _, c, h, w, n, f, kh, kw, stride, pad, groups = geom
    rng = np.random.default_rng(seed)
    x = rand(rng, (c, h, w, n))
    wt = rand(rng, (c // groups, kh, kw, f))
    b = rand(rng, (f,))
    return x, wt, b, dict(stride=stride, padding=pad, groups=groups)


def _as(dtype, *arrays):
    """The arrays as the caller passes them: float32 as they are, or stored as bfloat16 (rounded by the caller)."""
    return tuple(to_bf16(a) if dtype == BFLOAT16 else a for a in arrays)


def _references(x, wt, b, kwargs):
    """(rounded-input reference, exact reference, S of the rounded inputs, S of the exact inputs, K), float64."""
    f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    xr, wr = f64(round_bf16(x)), f64(round_bf16(wt))
    rounded = ref.conv_forward(xr, wr, f64(b), **kwargs)
    exact = ref.conv_forward(f64(x), f64(wt), f64(b), **kwargs)
    s_rounded = ref.conv_forward(np.abs(xr), np.abs(wr), np.abs(f64(b)), **kwargs)
    s_exact = ref.conv_forward(np.abs(f64(x)), np.abs(f64(wt)), np.abs(f64(b)), **kwargs)
    return rounded, exact, s_rounded, s_exact, wt.shape[0] * wt.shape[1] * wt.shape[2]


def _within(name, got, want, bound):
    got = to_host(got).astype(np.float64)
    assert np.isfinite(got).all(), f"{name}: non-finite values"
    err = np.abs(got - want)
    bad = err > bound
    assert not bad.any(), (f"{name}: {int(bad.sum())}/{err.size} elements off; worst |err| {err.max():.3g}, "
                           f"bound there {bound.flat[np.argmax(err - bound)]:.3g}")
    return err


def _check_bf16(name, y, x, wt, b, kwargs):
    """y (float32 or bfloat16) against the references, x, wt, b the exact float32 inputs."""
    rounded, exact, s_rounded, s_exact, k = _references(x, wt, b, kwargs)
    fp32_bound = 2 * (k + 2) * U * s_rounded
    if to_host(y).dtype == BFLOAT16:
        _within(f"{name} (bfloat16 out) vs the rounded reference", y, rounded,
                BF16_UNIT * np.abs(rounded) + 2 * fp32_bound)
        return
    err = _within(f"{name} vs the rounded reference", y, rounded, fp32_bound)
    _within(f"{name} vs the exact convolution", y, exact, BF16_PRODUCT * s_exact + fp32_bound)
    gap = np.abs(rounded - exact).max()
    assert err.max() * 20 < gap or err.max() == gap == 0, \
        f"{name}: not rounded to bfloat16 (error {err.max():.3g}, rounding gap {gap:.3g})"


def _bits(a):
    """A bfloat16 array as its 16-bit patterns (exact comparisons; NaN payloads included)."""
    return to_host(a).view(np.uint16)


def _run(device, geom, dtype, seed=0, **extra):
    x, wt, b, kwargs = _data(geom, seed)
    xi, wi = _as(dtype, x, wt)
    y = ops.conv_forward(device, device.asarray(xi), device.asarray(wi), device.asarray(b), precision="bf16",
                         **kwargs, **extra)
    return y, (x, wt, b, kwargs)


def _offset_view(device, a, rng):
    """helpers.offset_view for float32 or bfloat16 ``a``: a view one element into a random buffer of its dtype."""
    if a.dtype != BFLOAT16:
        return offset_view(device, a, rng)
    view = device.asarray(to_bf16(rand(rng, a.size + 1)))[1:].reshape(a.shape)
    view[...] = device.asarray(a)
    return view


@pytest.fixture
def overrides():
    """Set the BF16 kernel's tile row (and planted defect) on emu for one test; always restored."""
    kernels = EMU.kernels
    yield kernels.conv_bf16_set_overrides
    kernels.conv_bf16_set_overrides(-1, 0)


@pytest.mark.parametrize("dtype", INPUT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("geom", GEOMETRIES, ids=IDS)
@pytest.mark.parametrize("device", COMPILED_DEVICES)
def test_bf16_forward_matches_the_reference_on_rounded_inputs(device, geom, dtype):
    y, inputs = _run(device, geom, dtype)
    assert y.dtype == np.float32
    _check_bf16(geom[0], y, *inputs)


@pytest.mark.parametrize("dtype", INPUT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("geom", [BY_NAME[n] for n in ("odd-everything", "3ch-stride2-N40-F64", "N8-Fg12")],
                         ids=["odd-everything", "3ch-stride2-N40-F64", "N8-Fg12"])
@pytest.mark.parametrize("device", COMPILED_DEVICES)
def test_a_bf16_out_is_the_float32_result_rounded_once(device, geom, dtype):
    y32, inputs = _run(device, geom, dtype, seed=1)
    out = device.asarray(np.full(y32.shape, np.nan, np.float32).astype(BFLOAT16))  # beta == 0 never reads out
    y16, _ = _run(device, geom, dtype, seed=1, out=out)
    assert y16 is out and to_host(y16).dtype == BFLOAT16
    _check_bf16(geom[0], y16, *inputs)
    # the same FP32 sums in the same order, then one rounding to nearest even
    np.testing.assert_array_equal(_bits(y16), _bits(to_bf16(to_host(y32))))


@pytest.mark.parametrize("device", COMPILED_DEVICES)
def test_float32_inputs_halfway_between_two_bfloat16_round_to_even(device):
    """Every input a tie (low 16 bits 0x8000): rounding to nearest even moves half of them up and half down, ties
    away from zero or truncation would move them all one way (an error of 2**-8 relative per input)."""
    for name in ("3ch-stride2-N40-F64", "odd-everything"):  # the 16-byte and the 1-element float32 paths
        x, wt, b, kwargs = _data(BY_NAME[name], seed=3)
        x, wt = ((a.view(np.uint32) & np.uint32(0xFFFF0000) | np.uint32(0x8000)).view(np.float32) for a in (x, wt))
        assert np.array_equal(round_bf16(x), (x.view(np.uint32) + ((x.view(np.uint32) >> 16) & 1) * 0x8000
                                              & np.uint32(0xFFFF0000)).view(np.float32))  # even goes down
        y = ops.conv_forward(device, device.asarray(x), device.asarray(wt), device.asarray(b), precision="bf16",
                             **kwargs)
        _check_bf16(f"ties {name}", y, x, wt, b, kwargs)


@pytest.mark.parametrize("out_dtype", INPUT_DTYPES, ids=["float32-out", "bfloat16-out"])
@pytest.mark.parametrize("dtype", INPUT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("device", COMPILED_DEVICES)
@pytest.mark.sanitize
def test_bf16_forward_accumulates_with_alpha_and_beta(device, dtype, out_dtype):
    geom = BY_NAME["stride2-pad1-groups2-N5"]
    x, wt, b, kwargs = _data(geom, seed=4)
    rounded, _, s_rounded, _, k = _references(x, wt, b, kwargs)
    y0 = rand(np.random.default_rng(5), rounded.shape).astype(out_dtype)  # what out holds before
    out = device.asarray(y0.copy())
    xi, wi = _as(dtype, x, wt)
    got = ops.conv_forward(device, device.asarray(xi), device.asarray(wi), device.asarray(b), out=out, alpha=-1.5,
                           beta=0.75, precision="bf16", **kwargs)
    assert got is out
    want = -1.5 * rounded + 0.75 * y0.astype(np.float64)
    bound = 2 * (k + 4) * U * (1.5 * s_rounded + 0.75 * np.abs(y0.astype(np.float64)))
    if out_dtype == BFLOAT16:  # one more rounding, of the FP32 result (derivation in the module docstring)
        bound = BF16_UNIT * np.abs(want) + 2 * bound
    _within("alpha/beta", got, want, bound)


@pytest.mark.parametrize("dtype", INPUT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("geom", [BY_NAME[n] for n in ("1ch-stride4-pad2-N33", "3ch-stride2-N40-F64",
                                                       "many-k-tiles-F-gt-tile", "groups2-Fg48-N32")],
                         ids=["1ch-stride4-pad2-N33", "3ch-stride2-N40-F64", "many-k-tiles-F-gt-tile",
                              "groups2-Fg48-N32"])
@pytest.mark.parametrize("row", [0, 1])
def test_each_bf16_tile_and_path_is_correct_on_awkward_geometries(row, geom, dtype, overrides):
    overrides(row, 0)
    y, inputs = _run(EMU, geom, dtype, seed=2)
    _check_bf16(f"{geom[0]} tile {row}", y, *inputs)


# A true geometry, batch 8, bfloat16 storage: the cp.async path at size (the register paths are checked on the small
# geometries above; at this size each costs seconds of emulation)
ALEXNET = [("conv2-two-towers", 96, 27, 27, 8, 256, 5, 5, 1, 2, 2)]


@pytest.mark.parametrize("geom", ALEXNET, ids=[g[0] for g in ALEXNET])
def test_bf16_forward_on_alexnet_layers(geom):
    y, inputs = _run(EMU, geom, BFLOAT16, seed=13)
    _check_bf16(geom[0], y, *inputs)


@st.composite
def geometries(draw):
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    c = groups * draw(st.integers(1, 5))
    f = groups * draw(st.sampled_from([1, 3, 4, 8, 16, 21, 40]))
    kh, kw = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    sh, sw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    ph, pw = draw(st.integers(0, 3)), draw(st.integers(0, 3))
    h = draw(st.integers(max(1, kh - 2 * ph), 12))
    w = draw(st.integers(max(1, kw - 2 * pw), 12))
    n = draw(st.sampled_from([1, 2, 3, 4, 5, 8, 12, 16, 33]))
    return ("random", c, h, w, n, f, kh, kw, (sh, sw), (ph, pw), groups)


@settings(max_examples=40, deadline=None)
@given(geom=geometries(), seed=st.integers(0, 2**31 - 1), row=st.sampled_from([-1, 0, 1]),
       dtype=st.sampled_from(INPUT_DTYPES), bf16_out=st.booleans())
def test_bf16_forward_on_random_geometries(geom, seed, row, dtype, bf16_out):
    EMU.kernels.conv_bf16_set_overrides(row, 0)
    try:
        x, wt, b, kwargs = _data(geom, seed=seed)
        out = None
        if bf16_out:
            out = np.empty(ConvGeometry.of(x.shape, wt.shape, **kwargs).y_shape, BFLOAT16)
        y = ops.conv_forward(EMU, *_as(dtype, x, wt), b, precision="bf16", out=out, **kwargs)
    finally:
        EMU.kernels.conv_bf16_set_overrides(-1, 0)
    _check_bf16(f"{geom} tile {row} {dtype}", y, x, wt, b, kwargs)


@pytest.mark.parametrize("dtype", INPUT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("device", COMPILED_DEVICES)
@pytest.mark.sanitize
def test_unaligned_inputs_take_the_one_element_path_with_the_same_sums(device, dtype):
    geom = BY_NAME["3ch-stride2-N40-F64"]  # N = 40, Fg = 64: cp.async / 16-byte register path when aligned
    x, wt, b, kwargs = _data(geom, seed=2)
    xi, wi = _as(dtype, x, wt)
    rng = np.random.default_rng(3)
    xv, wv = _offset_view(device, xi, rng), _offset_view(device, wi, rng)
    y = ops.conv_forward(device, xv, wv, precision="bf16", **kwargs)
    _check_bf16("unaligned", y, x, wt, np.zeros_like(b), kwargs)
    aligned = ops.conv_forward(device, device.asarray(xi), device.asarray(wi), precision="bf16", **kwargs)
    assert_identical("unaligned vs aligned", y, aligned)  # the same sums in the same order on every path


@pytest.mark.parametrize("dtype", INPUT_DTYPES, ids=DTYPE_IDS)
def test_bf16_forward_is_identical_under_every_emulator_schedule(dtype):
    for name in ("many-k-tiles-F-gt-tile", "3ch-stride2-N40-F64"):  # register-staged and cp.async for bfloat16
        x, wt, b, kwargs = _data(BY_NAME[name], seed=6)
        xi, wi = _as(dtype, x, wt)
        assert_schedules_identical(lambda: (ops.conv_forward(EMU, xi, wi, b, precision="bf16", **kwargs),), ["y"],
                                   seed=7)


# (defect, input dtype, geometry): the cp.async path (bfloat16, N % 8 == 0) and the float32 1-element one, with
# several k tiles (the register path's missing loop barrier shows when a second tile is read before it is stored)
PLANTED = [
    (1, BFLOAT16, "3ch-stride2-N40-F64"), (2, BFLOAT16, "3ch-stride2-N40-F64"), (3, BFLOAT16, "3ch-stride2-N40-F64"),
    (2, np.dtype(np.float32), "k-tiles-N5"), (3, np.dtype(np.float32), "k-tiles-N5"),
]


@pytest.mark.parametrize("defect, dtype, name", PLANTED,
                         ids=["cp-async-no-wait", "cp-async-no-barrier", "cp-async-no-trans",
                              "registers-no-barrier", "registers-no-trans"])
def test_a_planted_pipeline_or_fragment_bug_fails_on_the_emulator(defect, dtype, name, overrides):
    """The emulator's cp.async and shared-memory poison and its ldmatrix catch the classic mistakes: the kernel
    variants with one planted defect give NaN or wrong numbers (and the same call without the defect passes)."""
    geom = BY_NAME[name]
    overrides(-1, defect)
    y, inputs = _run(EMU, geom, dtype, seed=8)
    with pytest.raises(AssertionError):
        _check_bf16("planted", y, *inputs)
    overrides(-1, 0)
    y, inputs = _run(EMU, geom, dtype, seed=8)
    _check_bf16("fixed", y, *inputs)


def test_the_cp_async_defect_is_refused_where_there_is_no_cp_async(overrides):
    overrides(-1, 1)
    with pytest.raises(ValueError, match="planted defect 1 is not planted in the float32 1-element register path"):
        _run(EMU, BY_NAME["odd-everything"], np.dtype(np.float32))


def test_bf16_plan_names_the_tile_and_the_path():
    kernels = EMU.kernels
    assert kernels.conv_bf16_tile_count() == 2
    big = ConvGeometry.of((96, 27, 27, 128), (48, 5, 5, 256), stride=1, padding=2, groups=2)  # AlexNet conv2
    assert kernels.conv_bf16_plan(big, True) == "bf16 tile 64x128x32, 256 threads, cp.async 16-byte path, grid 729x2x2"
    assert kernels.conv_bf16_plan(big, False) == ("bf16 tile 64x128x32, 256 threads, float32 16-byte register path, "
                                                  "grid 729x2x2")
    small = ConvGeometry.of((3, 9, 9, 5), (3, 3, 3, 8), stride=1, padding=0, groups=1)
    assert kernels.conv_bf16_plan(small, True) == ("bf16 tile 32x64x32, 64 threads, bfloat16 1-element register path, "
                                                   "grid 4x1x1")
    assert kernels.conv_bf16_plan(small, False) == ("bf16 tile 32x64x32, 64 threads, float32 1-element register "
                                                    "path, grid 4x1x1")
    with pytest.raises(ValueError, match="tile row"):
        kernels.conv_bf16_set_overrides(2, 0)
    with pytest.raises(ValueError, match="planted_defect"):
        kernels.conv_bf16_set_overrides(-1, 4)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, BFLOAT16])
def test_bf16_on_numpy_is_the_reference_on_rounded_inputs(dtype):
    x, wt, b, kwargs = _data(BY_NAME["stride2-pad1-groups2-N5"], seed=9)
    compute = np.float32 if dtype == BFLOAT16 else dtype
    xi, wi = (round_bf16(a).astype(dtype) for a in (x, wt))
    bias = b.astype(compute)
    got = ops.conv_forward(NUMPY, x.astype(dtype), wt.astype(dtype), bias, precision="bf16", **kwargs)
    want = ref.conv_forward(xi.astype(compute), wi.astype(compute), bias, **kwargs)
    assert got.dtype == compute
    assert_identical("numpy bf16", got, want)
    if dtype != BFLOAT16:  # the rounding is applied
        assert not np.array_equal(got, ops.conv_forward(NUMPY, x.astype(dtype), wt.astype(dtype), bias, **kwargs))
    # a bfloat16 out: alpha and beta in the compute dtype, one rounding
    y0 = rand(np.random.default_rng(1), want.shape).astype(BFLOAT16)
    out = y0.copy()
    got = ops.conv_forward(NUMPY, x.astype(dtype), wt.astype(dtype), bias, out=out, alpha=0.5, beta=-2.0,
                           precision="bf16", **kwargs)
    assert got is out
    np.testing.assert_array_equal(_bits(got), _bits(to_bf16(0.5 * want + y0.astype(compute) * compute(-2.0))))


@pytest.mark.parametrize("dtype", INPUT_DTYPES, ids=DTYPE_IDS)
def test_bf16_on_cpu_is_its_fp32_path_on_rounded_inputs(dtype):
    x, wt, b, kwargs = _data(BY_NAME["3ch-stride2-N40-F64"], seed=10)
    got = ops.conv_forward(CPU, *_as(dtype, x, wt), b, precision="bf16", **kwargs)
    assert_identical("cpu bf16", got, ops.conv_forward(CPU, round_bf16(x), round_bf16(wt), b, **kwargs))
    _check_bf16("cpu", got, x, wt, b, kwargs)
    out = np.empty(got.shape, BFLOAT16)
    ops.conv_forward(CPU, *_as(dtype, x, wt), b, out=out, precision="bf16", **kwargs)
    np.testing.assert_array_equal(_bits(out), _bits(to_bf16(got)))


@pytest.mark.parametrize("device", ["numpy", "cpu", "emu"])
def test_bad_bf16_calls_are_clear_errors(device):
    dev = get_device(device)
    x, wt, b, kwargs = _data(BY_NAME["stride2-pad1-groups2-N5"])
    xb, wb = to_bf16(x), to_bf16(wt)
    y_shape = ConvGeometry.of(x.shape, wt.shape, **kwargs).y_shape
    cases = [
        (TypeError, "x and w of one dtype, both bfloat16 or both float32.*; got x float32, w bfloat16",
         dict(x=x, w=wb)),
        (TypeError, "got x bfloat16, w float32", dict(x=xb, w=wt)),
        (TypeError, "bias must have dtype float32", dict(x=xb, w=wb, bias=to_bf16(b))),
        (TypeError, "out must have dtype float32 or bfloat16", dict(out=np.empty(y_shape, np.float16))),
        (ValueError, "out must have shape", dict(out=np.empty(y_shape[1:] + (1,), BFLOAT16))),
        (TypeError, "x must have dtype", dict(x=x.astype(np.int32))),
    ]
    for error, message, changes in cases:
        args = dict(x=xb, w=wb, bias=b, out=None) | changes
        with pytest.raises(error, match=message):
            ops.conv_forward(dev, args["x"], args["w"], args["bias"], out=args["out"], precision="bf16", **kwargs)
    for precision in ("fp32", "tf32"):  # bfloat16 arrays only in bf16
        with pytest.raises(TypeError, match="x is bfloat16: bfloat16 inputs need precision='bf16'"):
            ops.conv_forward(dev, xb, wb, b, precision=precision, **kwargs)
        with pytest.raises(TypeError, match="out must have dtype float32"):
            ops.conv_forward(dev, x, wt, b, out=np.empty(y_shape, BFLOAT16), precision=precision, **kwargs)


@pytest.mark.parametrize("dtype", INPUT_DTYPES, ids=DTYPE_IDS)
def test_bf16_forward_runs_through_the_cuda_backend_on_the_fake_gpu(monkeypatch, dtype):
    """The cuda path's Python (pointers, dtype flags, stream, binding name) on tests/fake_cupy.py with the emulator's
    kernels."""
    from fake_cupy import FakeCupy

    FakeCupy(devices=1).install(monkeypatch, usable=True)
    dev = get_device("cuda:0")
    x, wt, b, kwargs = _data(BY_NAME["3ch-stride2-N40-F64"], seed=12)
    with dev.activate():
        xi, wi = _as(dtype, x, wt)
        y = ops.conv_forward(dev, dev.asarray(xi), dev.asarray(wi), dev.asarray(b), precision="bf16", **kwargs)
        _check_bf16("fake cuda", dev.to_numpy(y), x, wt, b, kwargs)
        out = dev.asarray(np.empty(y.shape, BFLOAT16))
        ops.conv_forward(dev, dev.asarray(xi), dev.asarray(wi), dev.asarray(b), out=out, precision="bf16", **kwargs)
        np.testing.assert_array_equal(_bits(dev.to_numpy(out)), _bits(to_bf16(dev.to_numpy(y))))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc")
def test_nvcc_keeps_the_mma_loop_of_every_bf16_kernel(tmp_path):
    """Each production instance's PTX has its k tile's mma.sync and ldmatrix.trans instructions, fully unrolled
    (BK / 16 steps of MT * NT mma, MT + NT / 2 ldmatrix.x4.trans) and no local memory: a source change that makes
    nvcc drop or spill the loop, which the emulator cannot see, fails here. The ReLU instances (last template
    argument true) have the clamp (nvcc 13.0 makes `v > 0 ? v : 0` a max.f32, whose NaN and signed-zero rules
    are the same) that the plain ones lack."""
    ptx = tmp_path / "conv_bf16.ptx"
    subprocess.run(["nvcc", "-std=c++17", "-O3", "-DNDEBUG", "--expt-relaxed-constexpr", "-DCONVNET_EMU=0",
                    f"-I{ROOT / 'csrc'}", "-arch=sm_80", "-ptx", str(ROOT / "csrc/kernels/conv_bf16.cu"),
                    "-o", str(ptx)], check=True, capture_output=True,
                   env={k: v for k, v in os.environ.items() if k != "LD_PRELOAD"})  # nvcc crashes under ASan
    entries = [e for e in re.split(r"\.entry ", ptx.read_text())[1:] if "conv_fwd_bf16" in e.split("(", 1)[0]]
    assert len(entries) == 16  # 2 tiles x 4 load paths x with/without the ReLU epilogue; the planted defects exist
    #                            on the emulator only
    for body in entries:
        bm, bn, bk, wm, wn, stages = map(int, re.match(
            r"\S*conv_fwd_bf16ILi(\d+)ELi(\d+)ELi(\d+)ELi(\d+)ELi(\d+)ELi(\d+)E", body).groups())
        mt, nt = bm // wm // 16, bn // wn // 8
        assert body.count("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32") == bk // 16 * mt * nt
        assert body.count("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16") == bk // 16 * (mt + nt // 2)
        assert ("cp.async.ca.shared.global" in body) == (stages == 3)
        relu = re.match(r"\S*conv_fwd_bf16I.*Lb([01])EEEv", body).group(1) == "1"
        assert ("max.f32" in body or "selp.f32" in body) == relu
        assert "ld.local" not in body and "st.local" not in body
