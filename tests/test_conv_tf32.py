"""The TF32 convolution forward (``conv_forward(..., precision="tf32")``): the tensor-core kernel of
csrc/kernels/conv_tf32.cu on emu (and cuda when present), the rounded reference on numpy and cpu.

Tolerances, per element, inputs uniform in [-1, 1), S = the same convolution of absolute values (|x| |w| + |b|):
- against the float64 reference on TF32-rounded inputs: the products of two TF32 values are exact in FP32 (11 + 11
  significant bits), so only the FP32 summation errs: |got - want| <= (K + 2) u S with u = 2**-24 for any order of
  K products and the bias; the bound used is twice that (a GPU's tensor core may truncate inside its adder tree);
- against the exact (unrounded) convolution: each input is off by at most half a TF32 ulp, 2**-11 relative, so each
  product by at most 2**-10 (+ 2**-22) relative: |got - exact| <= (2**-10 + 2**-22) S + the summation bound above.
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
from convnet.reference import conv as ref
from convnet.reference.precision import round_tf32

U = 2.0 ** -24
TF32_PRODUCT = 2.0 ** -10 + 2.0 ** -22

# (name, C, H, W, N, F, KH, KW, stride, pad, groups)
GEOMETRIES = [
    ("1ch-stride4-pad2-N33", 1, 19, 17, 33, 5, 5, 4, 4, 2, 1),
    ("3ch-N8-F20", 3, 10, 11, 8, 20, 3, 5, 1, (2, 1), 1),
    ("3ch-stride2-N40-F64", 3, 13, 13, 40, 64, 5, 5, 2, 2, 1),
    ("stride2-pad1-groups2-N5", 4, 9, 7, 5, 6, 3, 3, 2, 1, 2),
    ("odd-everything", 5, 7, 9, 3, 7, 3, 2, (2, 1), (1, 0), 1),
    ("batch1-groups3", 6, 8, 8, 1, 9, 3, 3, 1, 1, 3),
    ("stride-gt-filter", 2, 11, 10, 4, 8, 2, 2, 3, 0, 1),
    ("1x1-groups4", 8, 5, 6, 4, 12, 1, 1, 1, 0, 4),
    ("pad-ge-filter", 2, 4, 5, 4, 4, 2, 3, 1, 3, 1),
    ("many-k-tiles-F-gt-tile", 16, 7, 7, 12, 80, 3, 3, 1, 1, 1),  # K = 144: 9 k tiles, 2 filter tiles
    ("groups2-Fg48-N32", 8, 9, 9, 32, 96, 3, 3, 1, 1, 2),
]
IDS = [g[0] for g in GEOMETRIES]


def _data(geom, seed=0):
    _, c, h, w, n, f, kh, kw, stride, pad, groups = geom
    rng = np.random.default_rng(seed)
    x = rand(rng, (c, h, w, n))
    wt = rand(rng, (c // groups, kh, kw, f))
    b = rand(rng, (f,))
    return x, wt, b, dict(stride=stride, padding=pad, groups=groups)


def _references(x, wt, b, kwargs):
    """(rounded-input reference, exact reference, S of the rounded inputs, S of the exact inputs, K), float64."""
    f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    xr, wr = f64(round_tf32(x)), f64(round_tf32(wt))
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


def _check_tf32(name, y, x, wt, b, kwargs):
    rounded, exact, s_rounded, s_exact, k = _references(x, wt, b, kwargs)
    err = _within(f"{name} vs the rounded reference", y, rounded, 2 * (k + 2) * U * s_rounded)
    _within(f"{name} vs the exact convolution", y, exact, TF32_PRODUCT * s_exact + 2 * (k + 2) * U * s_rounded)
    gap = np.abs(rounded - exact).max()
    assert err.max() * 20 < gap or err.max() == gap == 0, \
        f"{name}: not rounded to TF32 (error {err.max():.3g}, rounding gap {gap:.3g})"


@pytest.fixture
def tile_override(request):
    """Set the TF32 kernel's tile row (and planted defect) on emu for one test; always restored."""
    kernels = EMU.kernels
    yield kernels.conv_tf32_set_overrides
    kernels.conv_tf32_set_overrides(-1, 0)


@pytest.mark.parametrize("geom", GEOMETRIES, ids=IDS)
@pytest.mark.parametrize("device", COMPILED_DEVICES)
def test_tf32_forward_matches_the_reference_on_rounded_inputs(device, geom):
    x, wt, b, kwargs = _data(geom)
    y = ops.conv_forward(device, device.asarray(x), device.asarray(wt), device.asarray(b), precision="tf32",
                         **kwargs)
    _check_tf32(geom[0], y, x, wt, b, kwargs)


ALEXNET = [  # true geometries, batch 4 (the 16-byte path)
    ("conv1", 3, 224, 224, 4, 96, 11, 11, 4, 2, 1),
    ("conv2-two-towers", 96, 27, 27, 4, 256, 5, 5, 1, 2, 2),
]


@pytest.mark.parametrize("geom", ALEXNET, ids=[g[0] for g in ALEXNET])
def test_tf32_forward_on_alexnet_layers(geom):
    x, wt, b, kwargs = _data(geom, seed=13)
    _check_tf32(geom[0], ops.conv_forward(EMU, x, wt, b, precision="tf32", **kwargs), x, wt, b, kwargs)


@st.composite
def geometries(draw):
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    c = groups * draw(st.integers(1, 5))
    f = groups * draw(st.sampled_from([1, 3, 4, 8, 21, 36]))
    kh, kw = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    sh, sw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    ph, pw = draw(st.integers(0, 3)), draw(st.integers(0, 3))
    h = draw(st.integers(max(1, kh - 2 * ph), 12))
    w = draw(st.integers(max(1, kw - 2 * pw), 12))
    n = draw(st.sampled_from([1, 2, 3, 4, 5, 8, 12, 33]))
    return ("random", c, h, w, n, f, kh, kw, (sh, sw), (ph, pw), groups)


@settings(max_examples=40, deadline=None)
@given(geom=geometries(), seed=st.integers(0, 2**31 - 1), row=st.sampled_from([-1, 0, 1]))
def test_tf32_forward_on_random_geometries(geom, seed, row):
    EMU.kernels.conv_tf32_set_overrides(row, 0)
    try:
        x, wt, b, kwargs = _data(geom, seed=seed)
        y = ops.conv_forward(EMU, x, wt, b, precision="tf32", **kwargs)
    finally:
        EMU.kernels.conv_tf32_set_overrides(-1, 0)
    _check_tf32(f"{geom} tile {row}", y, x, wt, b, kwargs)


@pytest.mark.parametrize("row", [0, 1])
@pytest.mark.parametrize("geom", [GEOMETRIES[i] for i in (0, 2, 3, 9, 10)], ids=[IDS[i] for i in (0, 2, 3, 9, 10)])
def test_each_tf32_tile_is_correct_on_awkward_geometries(geom, row, tile_override):
    tile_override(row, 0)
    x, wt, b, kwargs = _data(geom, seed=1)
    y = ops.conv_forward(EMU, x, wt, b, precision="tf32", **kwargs)
    _check_tf32(f"{geom[0]} tile {row}", y, x, wt, b, kwargs)


@pytest.mark.parametrize("device", COMPILED_DEVICES)
@pytest.mark.sanitize
def test_tf32_forward_without_bias_and_unaligned_takes_the_4_byte_path(device):
    geom = GEOMETRIES[2]  # N = 40, Fg = 64: the 16-byte path when aligned
    x, wt, b, kwargs = _data(geom, seed=2)
    rng = np.random.default_rng(3)
    xv, wv = offset_view(device, x, rng), offset_view(device, wt, rng)
    y = ops.conv_forward(device, xv, wv, precision="tf32", **kwargs)
    _check_tf32("unaligned", y, x, wt, np.zeros_like(b), kwargs)
    aligned = ops.conv_forward(device, device.asarray(x), device.asarray(wt), precision="tf32", **kwargs)
    assert_identical("unaligned vs aligned", y, aligned)  # the same sums in the same order on both paths


@pytest.mark.parametrize("device", COMPILED_DEVICES)
@pytest.mark.sanitize
def test_tf32_forward_accumulates_with_alpha_and_beta(device):
    geom = GEOMETRIES[3]
    x, wt, b, kwargs = _data(geom, seed=4)
    rounded, _, s_rounded, _, k = _references(x, wt, b, kwargs)
    y0 = rand(np.random.default_rng(5), rounded.shape)
    out = device.asarray(y0.copy())  # host devices may share y0 itself
    got = ops.conv_forward(device, device.asarray(x), device.asarray(wt), device.asarray(b), out=out, alpha=-1.5,
                           beta=0.75, precision="tf32", **kwargs)
    assert got is out
    _within("alpha/beta", got, -1.5 * rounded + 0.75 * y0, 2 * (k + 4) * U * (1.5 * s_rounded + 0.75 * np.abs(y0)))
    nan_out = device.asarray(np.full(rounded.shape, np.nan, np.float32))  # beta == 0 never reads out
    got = ops.conv_forward(device, device.asarray(x), device.asarray(wt), device.asarray(b), out=nan_out,
                           precision="tf32", **kwargs)
    _check_tf32("beta 0 over NaN", got, x, wt, b, kwargs)


def test_tf32_forward_is_identical_under_every_emulator_schedule():
    geom = GEOMETRIES[9]
    x, wt, b, kwargs = _data(geom, seed=6)
    assert_schedules_identical(lambda: (ops.conv_forward(EMU, x, wt, b, precision="tf32", **kwargs),), ["y"],
                               seed=7)


@pytest.mark.parametrize("defect", [1, 2, 3], ids=["no-cp-async-wait", "no-barrier-after-wait", "swapped-a-fragment"])
@pytest.mark.parametrize("aligned", [True, False], ids=["16-byte", "4-byte"])
def test_a_planted_pipeline_or_fragment_bug_fails_on_the_emulator(defect, aligned, tile_override):
    """The emulator's cp.async poison and fragment tables catch the classic mistakes: the kernel variants with one
    planted defect give NaN or wrong numbers (and the same call without the defect passes)."""
    geom = GEOMETRIES[2] if aligned else GEOMETRIES[0]
    x, wt, b, kwargs = _data(geom, seed=8)
    tile_override(-1, defect)
    y = to_host(ops.conv_forward(EMU, x, wt, b, precision="tf32", **kwargs))
    with pytest.raises(AssertionError):
        _check_tf32("planted", y, x, wt, b, kwargs)
    tile_override(-1, 0)
    _check_tf32("fixed", ops.conv_forward(EMU, x, wt, b, precision="tf32", **kwargs), x, wt, b, kwargs)


def test_tf32_plan_names_the_tile_and_the_path():
    from convnet.geometry import ConvGeometry
    kernels = EMU.kernels
    assert kernels.conv_tf32_tile_count() == 2
    big = ConvGeometry.of((96, 27, 27, 128), (48, 5, 5, 256), stride=1, padding=2, groups=2)  # AlexNet conv2
    assert kernels.conv_tf32_plan(big) == "tf32 tile 64x128x16, 256 threads, 16-byte path, grid 729x2x2"
    small = ConvGeometry.of((3, 9, 9, 5), (3, 3, 3, 8), stride=1, padding=0, groups=1)
    assert kernels.conv_tf32_plan(small) == "tf32 tile 32x64x16, 64 threads, 4-byte path, grid 4x1x1"
    with pytest.raises(ValueError, match="tile row"):
        kernels.conv_tf32_set_overrides(2, 0)
    with pytest.raises(ValueError, match="planted_defect"):
        kernels.conv_tf32_set_overrides(-1, 4)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_tf32_on_numpy_is_the_reference_on_rounded_inputs(dtype):
    x, wt, b, kwargs = _data(GEOMETRIES[3], seed=9)
    x, wt, b = x.astype(dtype), wt.astype(dtype), b.astype(dtype)
    got = ops.conv_forward(NUMPY, x, wt, b, precision="tf32", **kwargs)
    want = ref.conv_forward(round_tf32(x).astype(dtype), round_tf32(wt).astype(dtype), b, **kwargs)
    assert got.dtype == dtype
    assert_identical("numpy tf32", got, want)
    assert not np.array_equal(got, ops.conv_forward(NUMPY, x, wt, b, **kwargs))


def test_tf32_on_cpu_is_its_fp32_path_on_rounded_inputs():
    x, wt, b, kwargs = _data(GEOMETRIES[2], seed=10)
    got = ops.conv_forward(CPU, x, wt, b, precision="tf32", **kwargs)
    assert_identical("cpu tf32", got, ops.conv_forward(CPU, round_tf32(x), round_tf32(wt), b, **kwargs))
    _check_tf32("cpu", got, x, wt, b, kwargs)


@pytest.mark.parametrize("device", COMPILED_DEVICES)
def test_fp32_precision_is_the_default_path_bit_for_bit(device):
    x, wt, b, kwargs = _data(GEOMETRIES[2], seed=11)
    args = (device, device.asarray(x), device.asarray(wt), device.asarray(b))
    assert_identical("fp32", ops.conv_forward(*args, precision="fp32", **kwargs), ops.conv_forward(*args, **kwargs))


@pytest.mark.parametrize("precision, message", [("fp16", "precision must be one of 'fp32', 'tf32', 'bf16'"),
                                                (None, "precision must be one of"),
                                                (np.array(["tf32"]), "precision must be one of")])
def test_an_unknown_or_unavailable_precision_is_a_clear_error(precision, message):
    x, wt, b, kwargs = _data(GEOMETRIES[3])
    for dev in ("numpy", "cpu", "emu"):
        with pytest.raises(ValueError, match=message):
            ops.conv_forward(dev, x, wt, b, precision=precision, **kwargs)


def test_tf32_forward_runs_through_the_cuda_backend_on_the_fake_gpu(monkeypatch):
    """The cuda path's Python (pointers, stream, binding name) on tests/fake_cupy.py with the emulator's kernels."""
    from fake_cupy import FakeCupy

    FakeCupy(devices=1).install(monkeypatch, usable=True)
    dev = get_device("cuda:0")
    x, wt, b, kwargs = _data(GEOMETRIES[3], seed=12)
    with dev.activate():
        y = ops.conv_forward(dev, dev.asarray(x), dev.asarray(wt), dev.asarray(b), precision="tf32", **kwargs)
        _check_tf32("fake cuda", dev.to_numpy(y), x, wt, b, kwargs)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc")
def test_nvcc_keeps_the_mma_loop_of_every_tf32_kernel(tmp_path):
    """Each production instance's PTX has its k tile's mma.sync and cvt.rna instructions, fully unrolled (BK / 8
    steps of MT * NT mma, MT * 4 + NT * 2 conversions): a source change that makes nvcc drop or spill the loop, which
    the emulator cannot see, fails here (the resources: tools/kernel_resources.py)."""
    ptx = tmp_path / "conv_tf32.ptx"
    subprocess.run(["nvcc", "-std=c++17", "-O3", "-DNDEBUG", "--expt-relaxed-constexpr", "-DCONVNET_EMU=0",
                    f"-I{ROOT / 'csrc'}", "-arch=sm_80", "-ptx", str(ROOT / "csrc/kernels/conv_tf32.cu"),
                    "-o", str(ptx)], check=True, capture_output=True,
                   env={k: v for k, v in os.environ.items() if k != "LD_PRELOAD"})  # nvcc crashes under a preloaded ASan
    entries = [e for e in re.split(r"\.entry ", ptx.read_text())[1:] if "conv_fwd_tf32" in e.split("(", 1)[0]]
    assert len(entries) == 8  # 2 tiles x 2 paths x with/without the ReLU epilogue; the planted defects exist on the
    #                           emulator only (the backward kernels: tests/test_conv_tf32_backward.py)
    for body in entries:
        bm, bn, bk, wm, wn = map(int, re.match(r"\S*conv_fwd_tf32ILi(\d+)ELi(\d+)ELi(\d+)ELi(\d+)ELi(\d+)E", body)
                                 .groups())
        mt, nt = bm // wm // 16, bn // wn // 8
        assert body.count("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32") == bk // 8 * mt * nt
        assert body.count("cvt.rna.tf32.f32") == bk // 8 * (mt * 4 + nt * 2)
        assert "ld.local" not in body and "st.local" not in body
