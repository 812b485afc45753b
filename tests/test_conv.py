"""Convolution kernels (emu always, cuda when a GPU is usable) against the float64 NumPy reference.

Tolerances (float32 kernels vs the float64 reference, inputs uniform in [-1, 1)):
- per element, the rigorous bound for a dot product of K terms summed in any order in float32:
      |got - want| <= K * u * (|A| |B|)   with u = 2**-24 and (|A| |B|) the same convolution of absolute values,
  which any correct summation order satisfies (with FMA or without) and any wrong or missing term violates
  (a missing term of size ~0.1 is far above K * u * sum|terms| ~ 1e-4 * 0.25 for K = 3200);
- normwise, max|got - want| <= 1e-5 * max(|A| |B|): the "about 1e-5 relative" accuracy target, relative to the
  magnitude of the summed terms (relative to max|want| it would be meaningless for sums that cancel, e.g. a
  bias gradient of three numbers). Rounding errors of a K-term float32 sum grow like sqrt(K) * u * |partial
  sums| in practice: about 1e-6 of max(|A| |B|) for K <= 3200.
Schedules: every fiber order gives bit-identical results (no atomics, fixed reduction orders).
"""
from __future__ import annotations

import contextlib
import re
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import EMU, assert_raises_each, assert_schedules_identical, rand, to_host
from convnet import ops
from convnet.devices import Device
from convnet.geometry import ConvGeometry
from convnet.reference import conv as ref

U = 2.0 ** -24

# (name, C, H, W, N, F, KH, KW, stride, pad, groups)
ALEXNET_2012 = [  # the two-tower model, batch 4 (vector path); conv1 at its true geometry
    ("conv1", 3, 224, 224, 4, 96, 11, 11, 4, 2, 1),
    ("conv2", 96, 27, 27, 1, 256, 5, 5, 1, 2, 2),     # true channels, batch 1 (scalar path)
    ("conv3", 256, 13, 13, 2, 384, 3, 3, 1, 1, 1),    # true channels, batch 2
    ("conv4", 384, 13, 13, 4, 384, 3, 3, 1, 1, 2),
    ("conv5", 384, 13, 13, 4, 256, 3, 3, 1, 1, 2),
]
ALEXNET_ONE_TOWER = [  # one-tower variant (64/192/384/256/256, no groups), true channel counts
    ("conv1", 3, 224, 224, 1, 64, 11, 11, 4, 2, 1),  # batch 1: scalar path
    ("conv2", 64, 27, 27, 2, 192, 5, 5, 1, 2, 1),
    ("conv3", 192, 13, 13, 3, 384, 3, 3, 1, 1, 1),
    ("conv4", 384, 13, 13, 4, 256, 3, 3, 1, 1, 1),
    ("conv5", 256, 13, 13, 1, 256, 3, 3, 1, 1, 1),
]
SMALL = [
    ("stride2-pad1-groups2", 4, 9, 7, 5, 6, 3, 3, 2, 1, 2),
    ("stride4-pad2-1ch", 1, 19, 17, 3, 5, 5, 4, 4, 2, 1),
    ("3ch-F-not-mult-16", 3, 10, 11, 8, 20, 3, 5, 1, (2, 1), 1),
    ("stride-gt-filter", 2, 11, 10, 4, 8, 2, 2, 3, 0, 1),
    ("1x1-filter", 8, 5, 6, 4, 12, 1, 1, 1, 0, 4),
    ("odd-everything", 5, 7, 9, 3, 7, 3, 2, (2, 1), (1, 0), 1),
    ("batch1-groups3", 6, 8, 8, 1, 9, 3, 3, 1, 1, 3),
    ("pad-ge-filter", 2, 4, 5, 4, 4, 2, 3, 1, 3, 1),
    ("wgrad-split", 8, 16, 16, 8, 16, 3, 3, 1, 1, 1),  # OH*OW*N = 2048: room for 8 chunks of 256
    ("direct-dgrad-N40", 3, 9, 10, 40, 6, 5, 5, 2, 2, 1),  # 3 channels: direct input-gradient kernel, 2 image groups
    ("direct-dgrad-1ch-stride1", 2, 13, 11, 33, 4, 3, 4, 1, 1, 2),
]
SPLIT_CASES = [SMALL[8], ("split-scalar-groups", 6, 15, 13, 3, 9, 3, 3, 1, 1, 3)]


@contextlib.contextmanager
def forced(device, row=-1, wgrad_splits=0):
    """Force a dispatch-table row and/or the filter-gradient split count (compiled kernels only; a no-op on the host
    devices, which have neither)."""
    if device.runs_reference:
        yield
        return
    k = device.kernels
    k.conv_set_tile_override(row, wgrad_splits)
    try:
        yield
    finally:
        k.conv_set_tile_override(-1, 0)


def _params(g):
    _, c, h, w, n, f, kh, kw, s, p, groups = g
    return dict(stride=s, padding=p, groups=groups)


def _geometry(g) -> ConvGeometry:
    _, c, h, w, n, f, kh, kw, s, p, groups = g
    return ConvGeometry.of((c, h, w, n), (c // groups, kh, kw, f), stride=s, padding=p, groups=groups)


def _data(g, seed):
    geo = _geometry(g)
    rng = np.random.default_rng(seed)
    x = rand(rng, geo.x_shape)
    wt = rand(rng, geo.w_shape)
    b = rand(rng, (geo.F,))
    dy = rand(rng, geo.y_shape)
    return x, wt, b, dy


def _check(name, got, want, bound_terms, k):
    """Both tolerances of the module docstring. bound_terms = the reference applied to absolute values."""
    got = to_host(got).astype(np.float64)
    err = np.abs(got - want)
    scale = max(np.max(bound_terms), 1e-30)
    assert np.isfinite(got).all(), f"{name}: non-finite output"
    assert err.max() <= 1e-5 * scale, f"{name}: normwise error {err.max() / scale:.3g} > 1e-5"
    bound = k * U * bound_terms + 1e-30
    bad = err > bound
    assert not bad.any(), (f"{name}: {int(bad.sum())}/{bad.size} elements beyond the rigorous bound; worst "
                           f"{np.max(err - bound):.3g} at {np.unravel_index(np.argmax(err - bound), err.shape)}")


def _run_and_check(dev, g, seed=0, which=("fwd", "dgrad", "wgrad", "bias")):
    geo = _geometry(g)
    h, w, n, kh, kw, cg, fg, oh, ow = geo.H, geo.W, geo.N, geo.KH, geo.KW, geo.Cg, geo.Fg, geo.OH, geo.OW
    kwargs = _params(g)
    x, wt, b, dy = _data(g, seed)
    x64, w64, b64, dy64 = (a.astype(np.float64) for a in (x, wt, b, dy))
    ax, aw, ab, ady = (np.abs(a) for a in (x64, w64, b64, dy64))
    X, Wt, B, DY = (dev.asarray(a) for a in (x, wt, b, dy))
    if "fwd" in which:
        y = ops.conv_forward(dev, X, Wt, B, **kwargs)
        _check("forward", y, ref.conv_forward(x64, w64, b64, **kwargs),
               ref.conv_forward(ax, aw, ab, **kwargs), cg * kh * kw + 1)
    if "dgrad" in which:
        dx = ops.conv_backward_data(dev, DY, Wt, (h, w), **kwargs)
        _check("backward_data", dx, ref.conv_backward_data(dy64, w64, (h, w), **kwargs),
               ref.conv_backward_data(ady, aw, (h, w), **kwargs), fg * kh * kw)
    if "wgrad" in which:
        dw = ops.conv_backward_filter(dev, X, DY, (kh, kw), **kwargs)
        _check("backward_filter", dw, ref.conv_backward_filter(x64, dy64, (kh, kw), **kwargs),
               ref.conv_backward_filter(ax, ady, (kh, kw), **kwargs), oh * ow * n)
    if "bias" in which:
        db = ops.conv_backward_bias(dev, DY)
        _check("backward_bias", db, ref.conv_backward_bias(dy64), ref.conv_backward_bias(ady), oh * ow * n)


@pytest.mark.parametrize("g", ALEXNET_2012, ids=[f"2012-{g[0]}" for g in ALEXNET_2012])
def test_alexnet_2012_layers(kernel_device, g):
    _run_and_check(kernel_device, g)


@pytest.mark.parametrize("g", ALEXNET_ONE_TOWER, ids=[f"1tower-{g[0]}" for g in ALEXNET_ONE_TOWER])
def test_alexnet_one_tower_layers(kernel_device, g):
    _run_and_check(kernel_device, g)


@pytest.mark.parametrize("g", SMALL, ids=[g[0] for g in SMALL])
@pytest.mark.sanitize
def test_small_geometries(kernel_device, g):
    _run_and_check(kernel_device, g)


@pytest.mark.parametrize("splits", [2, 3, 8])
@pytest.mark.parametrize("g", SPLIT_CASES, ids=[g[0] for g in SPLIT_CASES])
@pytest.mark.sanitize
def test_filter_gradient_split(compiled_device, g, splits):
    """The filter gradient summed in chunks (partial sums + a reduction kernel), as the GPU plans do."""
    geo = _geometry(g)
    with forced(compiled_device, wgrad_splits=splits):
        plan = compiled_device.kernels.conv_plan(compiled_device.kernels.ConvPass.backward_filter, _geom_tuple(g))
        assert int(re.search(r"(\d+) split", plan).group(1)) == min(splits, geo.OH * geo.OW * geo.N // 256), plan
        _run_and_check(compiled_device, g, seed=splits, which=("wgrad",))


@st.composite
def geometries(draw):
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    c = groups * draw(st.integers(1, 4))
    f = groups * draw(st.integers(1, 6))
    kh, kw = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    sh, sw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    ph, pw = draw(st.integers(0, 3)), draw(st.integers(0, 3))
    h = draw(st.integers(max(1, kh - 2 * ph), 12))
    w = draw(st.integers(max(1, kw - 2 * pw), 12))
    n = draw(st.sampled_from([1, 2, 3, 4, 5, 8]))
    return ("random", c, h, w, n, f, kh, kw, (sh, sw), (ph, pw), groups)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(g=geometries(), seed=st.integers(0, 2**31 - 1))
def test_random_geometries_emu(g, seed):
    _run_and_check(EMU, g, seed)


SCHEDULE_CASES = [SMALL[0], SMALL[1], SMALL[8], ("conv2-like", 8, 9, 9, 4, 8, 5, 5, 1, 2, 2)]


@pytest.mark.parametrize("g", SCHEDULE_CASES, ids=[g[0] for g in SCHEDULE_CASES])
def test_schedules_bit_identical(g):
    dev = EMU
    kwargs = _params(g)
    geo = _geometry(g)
    x, wt, b, dy = _data(g, 7)

    def run():
        with forced(dev, wgrad_splits=3):
            return (ops.conv_forward(dev, x, wt, b, **kwargs),
                    ops.conv_backward_data(dev, dy, wt, (geo.H, geo.W), **kwargs),
                    ops.conv_backward_filter(dev, x, dy, (geo.KH, geo.KW), **kwargs),
                    ops.conv_backward_bias(dev, dy))

    assert_schedules_identical(run, ("forward", "backward_data", "backward_filter", "backward_bias"), seed=3)


@pytest.mark.parametrize("g", [SMALL[0], SMALL[5], SMALL[8]], ids=["vec", "scalar", "split"])
@pytest.mark.sanitize
def test_alpha_beta_accumulate(kernel_device, g):
    with forced(kernel_device, wgrad_splits=3 if g is SMALL[8] else 0):
        _alpha_beta_cases(kernel_device, g)


def _alpha_beta_cases(kernel_device, g):
    dev = kernel_device
    kwargs = _params(g)
    _, c, h, w, n, f, kh, kw, *_ = g
    x, wt, b, dy = _data(g, 11)
    X, Wt, B, DY = (dev.asarray(a) for a in (x, wt, b, dy))
    rng = np.random.default_rng(5)
    alpha, beta = 0.75, -1.25
    cases = [
        ("forward", lambda out, a, bt: ops.conv_forward(dev, X, Wt, B, out=out, alpha=a, beta=bt, **kwargs),
         ops.conv_forward(dev, X, Wt, B, **kwargs)),
        ("backward_data", lambda out, a, bt: ops.conv_backward_data(dev, DY, Wt, (h, w), out=out, alpha=a, beta=bt,
                                                                    **kwargs),
         ops.conv_backward_data(dev, DY, Wt, (h, w), **kwargs)),
        ("backward_filter", lambda out, a, bt: ops.conv_backward_filter(dev, X, DY, (kh, kw), out=out, alpha=a,
                                                                        beta=bt, **kwargs),
         ops.conv_backward_filter(dev, X, DY, (kh, kw), **kwargs)),
        ("backward_bias", lambda out, a, bt: ops.conv_backward_bias(dev, DY, out=out, alpha=a, beta=bt),
         ops.conv_backward_bias(dev, DY)),
    ]
    for name, fn, plain in cases:
        plain = to_host(plain).astype(np.float64)
        old = rand(rng, plain.shape)
        out = dev.asarray(old.copy())  # (on emu asarray may not copy)
        res = fn(out, alpha, beta)
        assert res is out
        want = alpha * plain + beta * old.astype(np.float64)
        err = np.max(np.abs(to_host(out) - want))
        assert err <= 1e-6 * max(1.0, np.max(np.abs(want))), f"{name}: alpha/beta error {err}"
        # beta == 0 never reads out: NaN there must not leak
        out = dev.asarray(np.full(plain.shape, np.nan, np.float32))
        fn(out, 2.0, 0.0)
        assert np.isfinite(to_host(out)).all(), f"{name}: beta=0 read the old output"
        np.testing.assert_allclose(to_host(out), 2.0 * plain, rtol=1e-6, atol=1e-6)


def test_numpy_device_float64_and_accumulate():
    g = SMALL[0]
    kwargs = _params(g)
    _, c, h, w, n, f, kh, kw, *_ = g
    x, wt, b, dy = (a.astype(np.float64) for a in _data(g, 1))
    y = ops.conv_forward("numpy", x, wt, b, **kwargs)
    assert y.dtype == np.float64
    np.testing.assert_allclose(y, ref.conv_forward_naive(x, wt, b, **kwargs), rtol=1e-12, atol=1e-12)
    out = np.ones_like(y)
    ops.conv_forward("numpy", x, wt, b, out=out, alpha=2.0, beta=0.5, **kwargs)
    np.testing.assert_allclose(out, 2 * y + 0.5, rtol=1e-13)
    dw = ops.conv_backward_filter("numpy", x, dy, (kh, kw), **kwargs)
    np.testing.assert_allclose(dw, ref.conv_backward_filter(x, dy, (kh, kw), **kwargs))


# Bias-gradient shapes whose rows are cut into several chunks (per filter >= 2 x 2048 floats, few filters): odd
# lengths (scalar path, a short last chunk), multiples of 4 (16-byte path), more filters than blocks wanted.
BIAS_CHUNKED = [(1, 4099), (3, 5, 7, 293), (2, 6, 6, 300), (1, 8190), (300, 5000), (5, 3, 4, 513)]


def _bias_chunks(dev, f, per_filter):
    return int(re.search(r"(\d+) chunk\(s\)", dev.kernels.conv_bias_plan(f, per_filter)).group(1))


@pytest.mark.sanitize
def test_bias_gradient_odd_sizes(kernel_device):
    dev = kernel_device
    rng = np.random.default_rng(2)
    for shape in [(5, 3, 3, 1), (7, 1, 1, 3), (3, 13, 13, 8), (2, 5)] + BIAS_CHUNKED:
        dy = rand(rng, shape)
        db = ops.conv_backward_bias(dev, dev.asarray(dy))
        want = dy.astype(np.float64).reshape(shape[0], -1).sum(axis=1)
        k = dy.size // shape[0]
        _check(f"bias {shape}", db, want, np.abs(dy.astype(np.float64)).reshape(shape[0], -1).sum(axis=1), k)


def test_bias_gradient_chunked(compiled_device):
    """Rows cut into chunks (partial sums in a workspace, then a fixed-order sum): both load paths (a misaligned dy
    takes the scalar one), accumulate into out, and the workspace is what the plan says."""
    dev = compiled_device
    k = dev.kernels
    rng = np.random.default_rng(21)
    for shape in BIAS_CHUNKED:
        f, per = shape[0], int(np.prod(shape[1:]))
        chunks = _bias_chunks(dev, f, per)
        assert chunks > 1, (shape, k.conv_bias_plan(f, per))
        assert k.conv_backward_bias_workspace(f, per) == f * chunks
        dy = rand(rng, shape)
        want = dy.astype(np.float64).reshape(f, -1).sum(axis=1)
        bound = np.abs(dy.astype(np.float64)).reshape(f, -1).sum(axis=1)
        buf = dev.asarray(rand(rng, (dy.size + 1,)))
        view = buf[1:].reshape(shape)  # 4 bytes past the allocation's start: not 16-byte aligned
        view[...] = dev.asarray(dy)
        _check(f"bias {shape} misaligned", ops.conv_backward_bias(dev, view), want, bound, per)
        _check(f"bias {shape}", ops.conv_backward_bias(dev, dev.asarray(dy)), want, bound, per)
        out0 = rand(rng, (f,))
        out = dev.asarray(out0.copy())  # (on emu asarray does not copy)
        ops.conv_backward_bias(dev, dev.asarray(dy), out=out, alpha=0.5, beta=2.0)
        _check(f"bias {shape} accumulate", out, 0.5 * want + 2.0 * out0.astype(np.float64),
               0.5 * bound + 2.0 * np.abs(out0.astype(np.float64)), per + 1)
    assert k.conv_backward_bias_workspace(5, 2047) == 0 and _bias_chunks(dev, 5, 2047) == 1  # short rows: one block


def test_bias_gradient_chunked_schedules():
    """The chunked bias gradient is bit-identical under every emulator schedule (no atomics, fixed orders)."""
    rng = np.random.default_rng(22)
    dys = [rand(rng, shape) for shape in BIAS_CHUNKED[:3]]
    assert_schedules_identical(lambda: tuple(ops.conv_backward_bias(EMU, dy) for dy in dys),
                               tuple(f"bias {dy.shape}" for dy in dys), seed=5)


def test_bias_gradient_launcher_checks():
    k = EMU.kernels
    dy = np.zeros((2, 5000), np.float32)
    db = np.zeros(2, np.float32)
    need = k.conv_backward_bias_workspace(2, 5000)
    assert need > 0
    ws = np.zeros(need - 1, np.float32)
    with pytest.raises(ValueError, match="workspace too small"):
        k.conv_backward_bias(dy.ctypes.data, db.ctypes.data, ws.ctypes.data, need - 1, 2, 5000, 1.0, 0.0, 0)
    with pytest.raises(ValueError, match="workspace too small"):
        k.conv_backward_bias(dy.ctypes.data, db.ctypes.data, 0, 0, 2, 5000, 1.0, 0.0, 0)
    with pytest.raises(ValueError, match="must be >= 1"):
        k.conv_backward_bias_workspace(0, 5)


# ---------------------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("devname", ["numpy", "emu"])
def test_bad_inputs(devname):
    dev = Device(devname)
    x = dev.asarray(np.zeros((4, 8, 8, 2), np.float32))
    w = dev.asarray(np.zeros((2, 3, 3, 6), np.float32))
    dy = dev.asarray(np.zeros((6, 8, 8, 2), np.float32))
    fwd, bwd_data, bwd_filter, bwd_bias = (ops.conv_forward, ops.conv_backward_data, ops.conv_backward_filter,
                                           ops.conv_backward_bias)
    assert_raises_each(
        (TypeError, "x must", lambda: fwd(dev, [[1.0]], w, padding=1, groups=2)),
        (TypeError, "dtype", lambda: fwd(dev, x, w.astype(np.float64), padding=1, groups=2)),
        (ValueError, "4-D", lambda: fwd(dev, x[0], w, padding=1, groups=2)),
        (ValueError, "w must have shape", lambda: fwd(dev, x, w, padding=1, groups=1)),
        (ValueError, "groups=3 must divide", lambda: fwd(dev, x, w, padding=1, groups=3)),
        (ValueError, "groups must be >= 1", lambda: fwd(dev, x, w, groups=0)),
        (ValueError, "stride must be >= 1", lambda: fwd(dev, x, w, stride=0, padding=1, groups=2)),
        (ValueError, "padding must be >= 0", lambda: fwd(dev, x, w, padding=-1, groups=2)),
        (TypeError, "stride must be an int", lambda: fwd(dev, x, w, stride=1.5, groups=2)),
        (ValueError, "larger than the padded input",
         lambda: fwd(dev, dev.asarray(np.zeros((4, 2, 8, 2), np.float32)), w, groups=2)),
        (ValueError, "bias must have shape",
         lambda: fwd(dev, x, w, dev.asarray(np.zeros(5, np.float32)), padding=1, groups=2)),
        (ValueError, "out must have shape",
         lambda: fwd(dev, x, w, padding=1, groups=2, out=dev.asarray(np.zeros((6, 8, 8, 3), np.float32)))),
        (ValueError, "C-contiguous",
         lambda: fwd(dev, x, dev.asarray(np.zeros((2, 3, 3, 12), np.float32))[..., ::2], padding=1, groups=2)),
        (TypeError, "alpha", lambda: fwd(dev, x, w, padding=1, groups=2, alpha=float("nan"))),
        (ValueError, "spatial size", lambda: bwd_data(dev, dy, w, (8, 8), padding=0, groups=2)),
        (ValueError, "filters", lambda: bwd_data(dev, dy[:5], w, (8, 8), padding=1, groups=2)),
        (ValueError, "images",
         lambda: bwd_filter(dev, x, dev.asarray(np.zeros((6, 8, 8, 1), np.float32)), (3, 3), padding=1, groups=2)),
        (ValueError, "spatial size", lambda: bwd_filter(dev, x, dy, (5, 5), padding=1, groups=2)),
        (ValueError, "at least 2-D", lambda: bwd_bias(dev, dy[0, 0, 0])),
    )
    # out never overlaps an input, on every device (one rule: a call that works on numpy works on the kernels)
    sq = dev.asarray(np.zeros((6, 8, 8, 2), np.float32))
    assert_raises_each(
        (ValueError, "must not overlap x",
         lambda: fwd(dev, sq, dev.asarray(np.zeros((6, 3, 3, 6), np.float32)), padding=1, out=sq)),
        (ValueError, "must not overlap dy", lambda: bwd_bias(dev, dy, out=dy.reshape(-1)[:6])),
    )
    if devname == "emu":  # float32 only
        assert_raises_each(
            (TypeError, "dtype", lambda: fwd(dev, x.astype(np.float64), w.astype(np.float64), padding=1, groups=2)),
        )


def test_kernel_launchers_reject_bad_geometry():
    """The C++ launchers re-check what the op layer checks (std::invalid_argument -> ValueError)."""
    k = Device("emu").kernels

    def raw(c, h, w, n, f, kh, kw, sh, sw, ph, pw, groups, oh=1, ow=1):
        """Named fields as the bindings read them, without convnet.geometry's own validation."""
        return SimpleNamespace(C=c, H=h, W=w, N=n, F=f, KH=kh, KW=kw, stride_h=sh, stride_w=sw, pad_h=ph, pad_w=pw,
                               groups=groups, OH=oh, OW=ow)

    with pytest.raises(ValueError, match="2\\^31"):
        k.conv_backward_filter_workspace(raw(3, 2**15, 2**15, 4, 8, 3, 3, 1, 1, 1, 1, 1))  # 2^32 input elements
    with pytest.raises(ValueError, match="groups"):
        k.conv_backward_filter_workspace(raw(4, 8, 8, 2, 6, 3, 3, 1, 1, 1, 1, 3))
    with pytest.raises(ValueError, match="stride"):
        k.conv_backward_filter_workspace(raw(4, 8, 8, 2, 6, 3, 3, 0, 1, 1, 1, 1))
    with pytest.raises(ValueError, match="larger than the padded"):
        k.conv_backward_filter_workspace(raw(4, 2, 8, 2, 6, 3, 3, 1, 1, 0, 0, 1))
    with pytest.raises(ValueError, match="disagree on the output size"):
        k.conv_backward_filter_workspace(raw(4, 8, 8, 2, 6, 3, 3, 1, 1, 1, 1, 1, oh=7, ow=8))
    with pytest.raises(AttributeError, match="pad_w"):
        k.conv_backward_filter_workspace(SimpleNamespace(C=4, H=8, W=8, N=2, F=6, KH=3, KW=3, stride_h=1,
                                                         stride_w=1, pad_h=1, groups=1, OH=8, OW=8))
    with pytest.raises(ValueError, match="workspace too small"):
        x = np.zeros((8, 16, 16, 8), np.float32)
        dy = np.zeros((16, 16, 16, 8), np.float32)
        dw = np.zeros((8, 3, 3, 16), np.float32)
        k.conv_backward_filter(x.ctypes.data, dy.ctypes.data, dw.ctypes.data, 0, 0,
                               ConvGeometry(8, 16, 16, 8, 16, 3, 3, 1, 1, 1, 1, 1), 1.0, 0.0, 0)


# ------------------------------------------------------------------------------------------ dispatch table
TILE_CASES = [
    SMALL[0],  # groups 2, stride 2, N = 5: scalar path
    SMALL[2],  # 3 channels, F = 20, N = 8: 16-byte path
    SMALL[8],  # split filter gradient
    ("ragged-vec", 6, 11, 9, 4, 12, 3, 3, 1, 1, 2),
    ("wide-F-vec", 2, 6, 5, 4, 100, 3, 3, 1, 1, 1),  # 100 filters: two column tiles of the 96-wide row
]


def _geom_tuple(g):
    _, c, h, w, n, f, kh, kw, s, p, groups = g
    return ConvGeometry.of((c, h, w, n), (c // groups, kh, kw, f), stride=s, padding=p, groups=groups)


N_TILE_ROWS = 8


@pytest.mark.parametrize("row", range(N_TILE_ROWS))
@pytest.mark.sanitize
def test_every_tile_row(compiled_device, row):
    """Force each row of the dispatch table (both load paths) on ragged geometries."""
    k = compiled_device.kernels
    assert k.conv_tile_count() == N_TILE_ROWS, "update N_TILE_ROWS when the dispatch table changes"
    for splits in (0, 2):
        with forced(compiled_device, row, splits):
            for g in TILE_CASES:
                _run_and_check(compiled_device, g, seed=row, which=("fwd", "dgrad", "wgrad") if splits == 0 else
                               ("wgrad",))


def test_alexnet_batch128_plans_use_fast_paths():
    """At batch 128 every AlexNet layer takes the 16-byte path with a big tile (the plan is device-independent)."""
    k = Device("emu").kernels
    for name, c, h, w, _, f, kh, kw, s, p, groups in ALEXNET_2012:
        geo = ConvGeometry.of((c, h, w, 128), (c // groups, kh, kw, f), stride=s, padding=p, groups=groups)
        for op in (k.ConvPass.forward, k.ConvPass.backward_data, k.ConvPass.backward_filter):
            plan = k.conv_plan(op, geo)
            assert "16-byte path" in plan or "direct kernel" in plan, f"{name}: {plan}"
            if name == "conv1" and op == k.ConvPass.backward_data:  # 3 channels: the direct kernel, not the GEMM
                assert "direct kernel" in plan, plan
                continue
            tm, tn = (int(v) for v in re.search(r"\((\d+)x(\d+) per thread", plan).groups())
            if name != "conv1":  # conv2-5: register tiles of at least 8x8 (no shared-memory-bound 4xN tiles)
                assert tm >= 8 and tn >= 8, f"{name}: {plan}"


def test_alexnet_batch128_wgrad_and_bias_plans():
    """conv1's filter gradient takes the 96-wide tile (96 filters fill it), and the bias gradient of every AlexNet
    layer (both models) launches at least 2 blocks per SM of a 132-SM GPU."""
    k = Device("emu").kernels
    for name, c, h, w, _, f, kh, kw, s, p, groups in ALEXNET_2012 + ALEXNET_ONE_TOWER:
        geo = ConvGeometry.of((c, h, w, 128), (c // groups, kh, kw, f), stride=s, padding=p, groups=groups)
        plan = k.conv_plan(k.ConvPass.backward_filter, geo)
        if (name, f) == ("conv1", 96):
            assert "tile 128x96x8" in plan, plan
        bias = k.conv_bias_plan(f, geo.OH * geo.OW * 128)
        blocks = int(re.search(r"\((\d+) blocks", bias).group(1))
        assert blocks >= 2 * 132 and "16-byte" in bias, f"{name}: {bias}"
