"""The ReLU fused into the convolution forward's epilogue: ``conv_forward(..., relu=True)`` =
``max(alpha * (conv(x, w) + bias) + beta * out, 0)``, for precision "fp32", "tf32" and "bf16", on every device.

Oracles:
- bit-identity with the unfused ``conv_forward`` followed by ``relu_forward`` (NaN -> 0, -0 -> +0), on every device;
- the float64 reference, clamped at zero, with test_conv.py's (fp32) and test_conv_tf32.py's (tf32, against the
  reference on TF32-rounded inputs) per-element bounds: max(., 0) is 1-Lipschitz, |max(a, 0) - max(b, 0)| <=
  |a - b|, so the bound of the unclamped output holds for the clamped one unchanged. With alpha and beta the bound
  adds the rounding of the scaling and of the sum (derived in ``_accumulate_bound``).
The geometries are the existing lists (tests/test_conv.py SMALL, tests/test_conv_tf32.py GEOMETRIES): odd sizes, N
not a multiple of 4, padding, stride, groups, both load paths; every dispatch-table row is forced once on emu.
BF16 (the bf16 tests at the end): float32 or bfloat16 inputs, float32 or bfloat16 output, every tile row and all four
load paths; the bounds are tests/test_conv_bf16.py's (2 (K + 2) u S against the reference on bfloat16-rounded
inputs; a bfloat16 output adds its rounding, 2**-8 |want|, and doubles the FP32 bound), unchanged by the clamp as
above. The ReLU comes before the output's rounding: max then round == round then max under round-to-nearest-even
(signs and NaN survive the rounding, and the ReLU maps -0 and NaN to +0), so a bfloat16 output is bit-identical too.
"""
from __future__ import annotations

import contextlib

import numpy as np
import pytest

from helpers import COMPILED_DEVICES, EMU, assert_identical, rand, to_host
from test_conv import SMALL
from test_conv_bf16 import BF16_UNIT, BY_NAME as BF16_GEOMETRIES, _references as _bf16_references
from test_conv_tf32 import GEOMETRIES as TF32_GEOMETRIES
from convnet import ops
from convnet.geometry import ConvGeometry
from convnet.ops._checks import BFLOAT16
from convnet.reference import conv as ref
from convnet.reference.precision import round_tf32, to_bf16

U = 2.0 ** -24
PRECISIONS = ("fp32", "tf32")


def _case(g, seed=0):
    """(x, w, b, kwargs, geometry) of a geometry tuple (name, C, H, W, N, F, KH, KW, stride, pad, groups)."""
    _, c, h, w, n, f, kh, kw, stride, pad, groups = g
    geo = ConvGeometry.of((c, h, w, n), (c // groups, kh, kw, f), stride=stride, padding=pad, groups=groups)
    rng = np.random.default_rng(seed)
    return (rand(rng, geo.x_shape), rand(rng, geo.w_shape), rand(rng, (geo.F,)),
            dict(stride=stride, padding=pad, groups=groups), geo)


def _reference(x, wt, b, kwargs, precision):
    """(float64 conv + bias, the same of absolute values S, the bound's multiplier of u*S): K + 1 terms summed in
    any order in float32 for fp32 (test_conv.py); twice (K + 2) for tf32, whose products of rounded inputs are exact
    (test_conv_tf32.py)."""
    f64 = lambda a: None if a is None else np.asarray(a, np.float64)  # noqa: E731
    if precision == "tf32":
        x, wt = round_tf32(x), round_tf32(wt)
    x, wt, b = f64(x), f64(wt), f64(b)
    want = ref.conv_forward(x, wt, b, **kwargs)
    s = ref.conv_forward(np.abs(x), np.abs(wt), None if b is None else np.abs(b), **kwargs)
    k = wt.shape[0] * wt.shape[1] * wt.shape[2]
    return want, s, (k + 1 if precision == "fp32" else 2 * (k + 2))


def _within(name, got, want, bound):
    got = to_host(got).astype(np.float64)
    assert np.isfinite(got).all(), f"{name}: non-finite values"
    err = np.abs(got - want)
    bad = err > bound
    assert not bad.any(), (f"{name}: {int(bad.sum())}/{err.size} elements off; worst |err| {err.max():.3g}, "
                           f"bound there {bound.flat[np.argmax(err - bound)]:.3g}")


def _fused_and_unfused(dev, x, wt, b, kwargs, precision, **acc):
    """(fused, unfused) on ``dev``; ``acc`` may hold alpha, beta and ``out`` (a host array both start from)."""
    X, W = dev.asarray(x), dev.asarray(wt)
    B = None if b is None else dev.asarray(b)
    out = acc.pop("out", None)
    o1, o2 = (None, None) if out is None else (dev.asarray(out.copy()), dev.asarray(out.copy()))
    fused = ops.conv_forward(dev, X, W, B, out=o1, precision=precision, relu=True, **kwargs, **acc)
    plain = ops.conv_forward(dev, X, W, B, out=o2, precision=precision, **kwargs, **acc)
    unfused = ops.relu_forward(dev, plain)
    dev.synchronize()
    return fused, unfused, plain


def _clamps(name, plain, fused):
    """The ReLU did something: the unfused output has negatives (and positives), the fused one none."""
    plain, fused = to_host(plain), to_host(fused)
    assert (plain < 0).mean() > 0.1 and (plain > 0).mean() > 0.1, f"{name}: data too one-sided to test a ReLU"
    assert (fused >= 0).all()


@pytest.mark.parametrize("g", SMALL, ids=[g[0] for g in SMALL])
def test_fp32_fused_equals_unfused_and_reference(any_device, g):
    x, wt, b, kwargs, _ = _case(g)
    fused, unfused, plain = _fused_and_unfused(any_device, x, wt, b, kwargs, "fp32")
    assert_identical("fused vs conv_forward + relu_forward", fused, unfused)
    _clamps(g[0], plain, fused)
    want, s, terms = _reference(x, wt, b, kwargs, "fp32")
    _within(g[0], fused, np.maximum(want, 0.0), terms * U * s + 1e-30)


@pytest.mark.parametrize("g", TF32_GEOMETRIES, ids=[g[0] for g in TF32_GEOMETRIES])
def test_tf32_fused_equals_unfused_and_reference(any_device, g):
    x, wt, b, kwargs, _ = _case(g)
    fused, unfused, plain = _fused_and_unfused(any_device, x, wt, b, kwargs, "tf32")
    assert_identical("fused vs conv_forward + relu_forward", fused, unfused)
    _clamps(g[0], plain, fused)
    want, s, terms = _reference(x, wt, b, kwargs, "tf32")
    _within(g[0], fused, np.maximum(want, 0.0), terms * U * s + 1e-30)


def _accumulate_bound(terms, s, alpha, beta, old):
    """out = fl(fl(alpha * fl(conv + b)) + fl(beta * old)): the conv's error (terms * u * S) scaled by |alpha|, plus
    one rounding each of the two products and the sum, each at most u times |alpha| S + |beta old| (a bound of every
    intermediate's magnitude)."""
    return abs(alpha) * terms * U * s + 3 * U * (abs(alpha) * s + np.abs(beta * old)) + 1e-30


# the 4-byte path with groups (N = 5) and the 16-byte path (N = 8, F/groups = 20)
ACC_CASES = [SMALL[0], SMALL[2]]


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("g", ACC_CASES, ids=[g[0] for g in ACC_CASES])
def test_alpha_beta_accumulate_then_relu(any_device, g, precision):
    """The ReLU applies to the accumulated value: max(alpha * (conv + b) + beta * old, 0)."""
    x, wt, b, kwargs, geo = _case(g, seed=1)
    old = rand(np.random.default_rng(2), geo.y_shape, low=-2.0, high=2.0)
    alpha, beta = 0.75, -0.5
    fused, unfused, _ = _fused_and_unfused(any_device, x, wt, b, kwargs, precision, alpha=alpha, beta=beta,
                                           out=old)
    assert_identical("fused vs conv_forward + relu_forward", fused, unfused)
    want, s, terms = _reference(x, wt, b, kwargs, precision)
    clamped = np.maximum(alpha * want + beta * old.astype(np.float64), 0.0)
    _within(g[0], fused, clamped, _accumulate_bound(terms, s, alpha, beta, old.astype(np.float64)))
    # the old values matter: a ReLU before the accumulate (max(conv + b, 0) * alpha + beta * old) differs
    assert (to_host(fused) == 0).any() and (alpha * np.maximum(want, 0.0) + beta * old < 0).any()


@pytest.mark.parametrize("precision", PRECISIONS)
def test_no_bias(any_device, precision):
    x, wt, _, kwargs, _ = _case(SMALL[5], seed=3)
    fused, unfused, _ = _fused_and_unfused(any_device, x, wt, None, kwargs, precision)
    assert_identical("fused vs conv_forward + relu_forward", fused, unfused)
    want, s, terms = _reference(x, wt, None, kwargs, precision)
    _within("no bias", fused, np.maximum(want, 0.0), terms * U * s + 1e-30)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_nan_and_negative_zero_become_plus_zero(any_device, precision):
    """relu_forward's special values: a NaN output (from a NaN input) and -0 (alpha = -1 times a +0 sum: filter 0's
    weights and bias are zero) both become +0, on the 16-byte and the 4-byte path."""
    for g in (SMALL[2], SMALL[0]):
        x, wt, b, kwargs, _ = _case(g, seed=4)
        x[0, 3, 4, 1] = np.nan
        wt[..., 0] = 0.0
        b[0] = 0.0
        fused, unfused, plain = _fused_and_unfused(any_device, x, wt, b, kwargs, precision, alpha=-1.0)
        plain, fused = to_host(plain), to_host(fused)
        zeros = plain[0][~np.isnan(plain[0])]  # 0 * NaN is NaN in filter 0 too
        assert np.isnan(plain).any() and zeros.size and np.signbit(zeros).all() and (zeros == 0).all()
        assert_identical(f"{g[0]}: fused vs conv_forward + relu_forward", fused, unfused)
        assert not np.signbit(fused).any() and not np.isnan(fused).any()


@contextlib.contextmanager
def _forced_row(dev, precision, row):
    if precision == "fp32":
        dev.kernels.conv_set_tile_override(row, 0)
    else:
        dev.kernels.conv_tf32_set_overrides(row, 0)
    try:
        yield
    finally:
        if precision == "fp32":
            dev.kernels.conv_set_tile_override(-1, 0)
        else:
            dev.kernels.conv_tf32_set_overrides(-1, 0)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("dev", COMPILED_DEVICES)
def test_every_table_row(dev, precision):
    """Each dispatch-table row's fused kernel (16-byte and scalar paths; a row without a scalar path falls back to the
    automatic choice there) against its own unfused kernel and the reference."""
    k = dev.kernels
    rows = k.conv_tile_count() if precision == "fp32" else k.conv_tf32_tile_count()
    for g in (SMALL[2], SMALL[0]):
        x, wt, b, kwargs, _ = _case(g, seed=5)
        want, s, terms = _reference(x, wt, b, kwargs, precision)
        for row in range(rows):
            with _forced_row(dev, precision, row):
                fused, unfused, _ = _fused_and_unfused(dev, x, wt, b, kwargs, precision)
            assert_identical(f"{g[0]} row {row}", fused, unfused)
            _within(f"{g[0]} row {row}", fused, np.maximum(want, 0.0), terms * U * s + 1e-30)


def test_bad_relu_is_a_type_error(any_device):
    x, wt, b, kwargs, _ = _case(SMALL[5])
    X, W = any_device.asarray(x), any_device.asarray(wt)
    for bad in ("yes", 1, 0, None, 1.0):
        with pytest.raises(TypeError, match="relu must be True or False"):
            ops.conv_forward(any_device, X, W, relu=bad, **kwargs)


@pytest.mark.parametrize("out_dtype", ["float32", "bfloat16"])
def test_relu_with_bf16_is_the_bf16_forward_then_relu(any_device, out_dtype):
    """relu=True with "bf16" (fused into the BF16 kernel on emu/cuda, relu_forward on the result on numpy and cpu)
    is the unfused pair's result bit for bit, with float32 and with bfloat16 outputs (never the forward without its
    ReLU). The fused kernel's tiles, paths and special values: the bf16 tests below."""
    x, wt, b, kwargs, _ = _case(SMALL[5])
    dev = any_device
    g = ConvGeometry.of(x.shape, wt.shape, **kwargs)
    dtype = BFLOAT16 if out_dtype == "bfloat16" else np.float32
    args = (dev.asarray(x), dev.asarray(wt), dev.asarray(b))
    fused = ops.conv_forward(dev, *args, precision="bf16", relu=True, out=dev.empty(g.y_shape, dtype), **kwargs)
    plain = ops.conv_forward(dev, *args, precision="bf16", out=dev.empty(g.y_shape, dtype), **kwargs)
    want = to_host(ops.relu_forward(dev, plain))
    got = to_host(fused)
    assert (want.astype(np.float32) < 0).sum() == 0 and (to_host(plain).astype(np.float32) < 0).any()
    assert_identical("fused bf16 forward", got, want)


def test_net_steps_fused_bit_identical_to_unfused(any_device, monkeypatch):
    """Two SGD steps of the fmnist net (three ReLU convolutions) with the fused epilogue give the losses and
    parameters of the unfused path bit for bit: the layer keeps y for the ReLU backward, as the separate ReLU did."""
    from convnet.model_file import load_model
    from convnet.optim import SGD

    rng = np.random.default_rng(6)
    x = rand(rng, (1, 28, 28, 4), low=-0.5, high=0.5)
    y = rng.integers(0, 10, 4).astype(np.int32)
    conv_forward = ops.conv_forward

    def unfused(dev, *args, relu=False, **kw):  # the conv layer's forward before the fusion
        out = conv_forward(dev, *args, **kw)
        return ops.relu_forward(dev, out) if relu else out

    def train(fused):
        if not fused:
            monkeypatch.setattr(ops, "conv_forward", unfused)
        try:
            net, _ = load_model("fmnist", device=any_device, seed=3)
            opt = SGD(net, lr=0.05, momentum=0.9, weight_decay=5e-4)
            losses = []
            for step in range(2):
                net.forward(x, y, train=True, step=step)
                net.backward()
                opt.step()
                losses.append(float(net.loss))
            return losses, {k: to_host(layer.params[p]).copy() for k, layer, p in net.param_items()}
        finally:
            monkeypatch.setattr(ops, "conv_forward", conv_forward)

    (la, pa), (lb, pb) = train(True), train(False)
    assert la == lb and la[0] != la[1]
    assert pa.keys() == pb.keys()
    for k in pa:
        assert_identical(k, pa[k], pb[k])


# ------------------------------------------------------------------------------------------------------------ BF16
# Each geometry takes the vector path of its input dtype (bfloat16: cp.async; float32: 16-byte registers) or the
# one-element path, as conv_bf16_plan names it.
BF16_VECTOR, BF16_ONE_ELEMENT = BF16_GEOMETRIES["3ch-N8-F24"], BF16_GEOMETRIES["stride2-pad1-groups2-N5"]
BF16_PATHS = {  # (geometry, bfloat16 inputs) -> the load path
    ("3ch-N8-F24", True): "cp.async 16-byte", ("3ch-N8-F24", False): "float32 16-byte register",
    ("stride2-pad1-groups2-N5", True): "bfloat16 1-element register",
    ("stride2-pad1-groups2-N5", False): "float32 1-element register",
}
BF16_IN = [np.dtype(np.float32), BFLOAT16]
BF16_IN_IDS = ["float32-in", "bfloat16-in"]
BF16_OUT_IDS = ["float32-out", "bfloat16-out"]


def _same_bits(name, got, want):
    """Same dtype and bit patterns (also -0 against +0, which assert_identical's == would let pass)."""
    got, want = to_host(got), to_host(want)
    assert got.dtype == want.dtype and got.shape == want.shape, \
        f"{name}: {got.dtype}{got.shape} vs {want.dtype}{want.shape}"
    bits = np.uint16 if got.dtype == BFLOAT16 else np.uint32
    diff = np.argwhere(got.view(bits) != want.view(bits))
    assert not diff.size, f"{name}: {len(diff)} elements differ in their bits, first at {tuple(diff[0])}"


def _bf16_fused_and_unfused(dev, x, wt, b, kwargs, in_dtype, out_dtype, old=None, **acc):
    """(fused, unfused, plain) of the BF16 forward on ``dev``: x and wt (float32 host arrays) passed as ``in_dtype``
    (bfloat16: rounded to it first), outputs of ``out_dtype``, both starting from ``old`` (a host array) if given."""
    if in_dtype == BFLOAT16:
        x, wt = to_bf16(x), to_bf16(wt)
    X, W = dev.asarray(x), dev.asarray(wt)
    B = None if b is None else dev.asarray(b)
    geo = ConvGeometry.of(x.shape, wt.shape, **kwargs)

    def start():
        return dev.asarray(old.astype(out_dtype)) if old is not None else dev.empty(geo.y_shape, out_dtype)

    fused = ops.conv_forward(dev, X, W, B, out=start(), precision="bf16", relu=True, **kwargs, **acc)
    plain = ops.conv_forward(dev, X, W, B, out=start(), precision="bf16", **kwargs, **acc)
    unfused = ops.relu_forward(dev, plain)
    dev.synchronize()
    return fused, unfused, plain


def _bf16_bound(want, s_rounded, k, out_dtype, fp32_bound=None):
    """tests/test_conv_bf16.py's per-element bound (its module docstring), for a float32 or bfloat16 output."""
    fp32 = 2 * (k + 2) * U * s_rounded if fp32_bound is None else fp32_bound
    return BF16_UNIT * np.abs(want) + 2 * fp32 + 1e-30 if out_dtype == BFLOAT16 else fp32 + 1e-30


@contextlib.contextmanager
def _forced_bf16_row(dev, row):
    dev.kernels.conv_bf16_set_overrides(row, 0)
    try:
        yield
    finally:
        dev.kernels.conv_bf16_set_overrides(-1, 0)


@pytest.mark.parametrize("out_dtype", BF16_IN, ids=BF16_OUT_IDS)
@pytest.mark.parametrize("in_dtype", BF16_IN, ids=BF16_IN_IDS)
@pytest.mark.parametrize("dev", COMPILED_DEVICES)
def test_bf16_every_tile_and_path(dev, in_dtype, out_dtype):
    """Each tile row x each load path of the BF16 forward: the fused kernel against its own unfused kernel and
    relu_forward (bits) and the clamped reference on bfloat16-rounded inputs."""
    for geom in (BF16_VECTOR, BF16_ONE_ELEMENT):
        x, wt, b, kwargs = _case(geom, seed=7)[:4]
        geo = ConvGeometry.of(x.shape, wt.shape, **kwargs)
        assert BF16_PATHS[geom[0], in_dtype == BFLOAT16] in dev.kernels.conv_bf16_plan(geo, in_dtype == BFLOAT16)
        want, _, s_rounded, _, k = _bf16_references(x, wt, b, kwargs)
        for row in range(dev.kernels.conv_bf16_tile_count()):
            with _forced_bf16_row(dev, row):
                fused, unfused, plain = _bf16_fused_and_unfused(dev, x, wt, b, kwargs, in_dtype, out_dtype)
            name = f"{geom[0]} row {row}"
            _same_bits(name, fused, unfused)
            _clamps(name, to_host(plain).astype(np.float32), to_host(fused).astype(np.float32))
            _within(name, fused, np.maximum(want, 0.0), _bf16_bound(np.maximum(want, 0.0), s_rounded, k, out_dtype))


@pytest.mark.parametrize("out_dtype", BF16_IN, ids=BF16_OUT_IDS)
@pytest.mark.parametrize("in_dtype", BF16_IN, ids=BF16_IN_IDS)
def test_bf16_alpha_beta_accumulate_then_relu(any_device, in_dtype, out_dtype):
    """max(alpha * (conv + b) + beta * old, 0), the old values read in the output's dtype: bits of the unfused pair,
    and the clamped reference within the accumulate bound (a bfloat16 output adds its one rounding)."""
    x, wt, b, kwargs, geo = _case(BF16_VECTOR, seed=1)
    old = rand(np.random.default_rng(2), geo.y_shape, low=-2.0, high=2.0)
    old = old if out_dtype != BFLOAT16 else to_bf16(old)
    alpha, beta = 0.75, -0.5
    fused, unfused, _ = _bf16_fused_and_unfused(any_device, x, wt, b, kwargs, in_dtype, out_dtype, old=old,
                                                alpha=alpha, beta=beta)
    _same_bits("fused vs conv_forward + relu_forward", fused, unfused)
    want, _, s_rounded, _, k = _bf16_references(x, wt, b, kwargs)
    old64 = old.astype(np.float64)
    clamped = np.maximum(alpha * want + beta * old64, 0.0)
    acc_bound = _accumulate_bound(2 * (k + 2), s_rounded, alpha, beta, old64)
    _within("bf16 alpha/beta", fused, clamped, _bf16_bound(clamped, s_rounded, k, out_dtype, acc_bound))
    # the old values matter: a ReLU before the accumulate (max(conv + b, 0) * alpha + beta * old) differs
    assert (to_host(fused).astype(np.float32) == 0).any() and (alpha * np.maximum(want, 0.0) + beta * old64 < 0).any()


@pytest.mark.parametrize("out_dtype", BF16_IN, ids=BF16_OUT_IDS)
@pytest.mark.parametrize("in_dtype", BF16_IN, ids=BF16_IN_IDS)
def test_bf16_nan_and_negative_zero_become_plus_zero(any_device, in_dtype, out_dtype):
    """relu_forward's special values through the BF16 epilogue: a NaN output (from a NaN input) and -0 (alpha = -1
    times a +0 sum: filter 0's weights and bias are zero; -0 stays -0 when rounded to bfloat16) both become +0, on the
    vector and the one-element paths, with no bias too."""
    for geom in (BF16_VECTOR, BF16_ONE_ELEMENT):
        x, wt, b, kwargs, _ = _case(geom, seed=4)
        x[0, 3, 4, 1] = np.nan
        wt[..., 0] = 0.0
        b[0] = 0.0
        for bias in (b, None):
            fused, unfused, plain = _bf16_fused_and_unfused(any_device, x, wt, bias, kwargs, in_dtype, out_dtype,
                                                            alpha=-1.0)
            plain, fused = to_host(plain).astype(np.float32), to_host(fused)
            zeros = plain[0][~np.isnan(plain[0])]  # 0 * NaN is NaN in filter 0 too
            assert np.isnan(plain).any() and zeros.size and np.signbit(zeros).all() and (zeros == 0).all()
            _same_bits(f"{geom[0]}: fused vs conv_forward + relu_forward", fused, unfused)
            f32 = fused.astype(np.float32)
            assert not np.signbit(f32).any() and not np.isnan(f32).any()


def test_bf16_planted_defects_have_no_relu_epilogue():
    """The emulator's planted-defect variants are the plain kernels: asking them for the ReLU is a clear error."""
    x, wt, b, kwargs, _ = _case(BF16_VECTOR)
    EMU.kernels.conv_bf16_set_overrides(-1, 2)
    try:
        with pytest.raises(ValueError, match="planted defects have no ReLU epilogue"):
            ops.conv_forward(EMU, to_bf16(x), to_bf16(wt), b, precision="bf16", relu=True, **kwargs)
    finally:
        EMU.kernels.conv_bf16_set_overrides(-1, 0)
