"""Cross-map LRN: NumPy reference (gradient checks, both alpha conventions) and, when built, the kernels."""
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from convnet import ops
from convnet.devices import Device
from convnet.geometry import LrnGeometry
from convnet.reference import lrn as ref
from helpers import (EMU, NUMPY, assert_close, assert_identical, assert_raises_each, assert_schedules_identical,
                     check_grad, misaligned, rand, to_host)


def naive_lrn(x, size, alpha, beta, k, convention):
    C = x.shape[0]
    a = alpha if convention == "sum" else alpha / size
    y = np.empty_like(x)
    d = np.empty_like(x)
    for i in range(C):
        lo = max(0, i - size // 2)
        hi = min(C, i - size // 2 + size)
        d[i] = k + a * (x[lo:hi] ** 2).sum(axis=0)
        y[i] = x[i] / d[i] ** beta
    return y, d


PARAMS = [dict(size=5, alpha=1e-4, beta=0.75, k=2.0),       # the paper
          dict(size=3, alpha=0.5, beta=0.6, k=1.0),          # strong enough for the sum term to matter
          dict(size=4, alpha=0.3, beta=1.2, k=1.5),          # even window
          dict(size=1, alpha=0.2, beta=0.75, k=1.0),
          dict(size=9, alpha=0.4, beta=0.5, k=0.5)]          # window wider than C


@pytest.mark.parametrize("convention", ["sum", "mean"])
@pytest.mark.parametrize("p", PARAMS)
def test_reference_matches_naive(convention, p):
    x = np.random.default_rng(3).standard_normal((7, 3, 2, 4))
    y, d = ref.lrn_forward(x, convention=convention, **p)
    yn, dn = naive_lrn(x, convention=convention, **p)
    np.testing.assert_allclose(d, dn, rtol=1e-13)
    np.testing.assert_allclose(y, yn, rtol=1e-13)


@pytest.mark.parametrize("convention", ["sum", "mean"])
@pytest.mark.parametrize("p", PARAMS)
def test_reference_gradient(convention, p):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((7, 3, 2, 4)) * 2
    kw = dict(convention=convention, **p)
    y, d = ref.lrn_forward(x, **kw)
    r = rng.standard_normal(y.shape)
    dx = ref.lrn_backward(x, y, d, r, **kw)
    check_grad(lambda z: float((ref.lrn_forward(z, **kw)[0] * r).sum()), x, dx, n=80)


def test_conventions_differ_by_size():
    x = np.random.default_rng(5).standard_normal((6, 2, 2, 3))
    y1, d1 = ref.lrn_forward(x, size=5, alpha=5e-4, beta=0.75, k=2.0, convention="mean")
    y2, d2 = ref.lrn_forward(x, size=5, alpha=1e-4, beta=0.75, k=2.0, convention="sum")
    np.testing.assert_allclose(d1, d2, rtol=1e-14)
    np.testing.assert_allclose(y1, y2, rtol=1e-14)


def test_reference_float32():
    x = np.random.default_rng(6).standard_normal((8, 5, 5, 4)).astype(np.float32)
    y, d = ref.lrn_forward(x)
    assert y.dtype == d.dtype == np.float32
    assert ref.lrn_backward(x, y, d, y).dtype == np.float32


def test_reference_bad():
    with pytest.raises(ValueError, match="convention"):
        ref.lrn_forward(np.ones((2, 1, 1, 1)), convention="avg")
    with pytest.raises(ValueError, match="size"):
        ref.lrn_forward(np.ones((2, 1, 1, 1)), size=0)


# ---------------------------------------------------------------------------------------------------- op layer
def run_lrn(dev, x, dy, method="recompute", **kw):
    xd = dev.asarray(x)
    y, d = ops.lrn_forward(dev, xd, **kw)
    dx = ops.lrn_backward(dev, xd, y, d, dev.asarray(dy), method=method, **kw)
    return to_host(y), to_host(d), to_host(dx)


def assert_matches_reference(dev, x, dy, y, d, dx, **kw):
    """The kernels' y, denom, dx against the float32 reference; returns the reference dx.

    denom: the same float32 operations in the same order as the reference; y, dx differ by __powf's few ulps."""
    yr, dr = ref.lrn_forward(x, **kw)
    dxr = ref.lrn_backward(x, yr, dr, dy, **kw)
    assert_close("denom", d, dr, rtol=2e-7 if dev.kind == "emu" else 1e-6)
    assert_close("y", y, yr, rtol=2e-6, atol=1e-7)
    assert_close("dx", dx, dxr, rtol=1e-5, atol=2e-6)
    return dxr


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numpy_device_op(dtype):
    x = np.random.default_rng(20).standard_normal((6, 3, 3, 2)).astype(dtype)
    kw = dict(size=5, alpha=1e-2, beta=0.75, k=2.0, convention="mean")
    y, d = ops.lrn_forward(NUMPY, x, **kw)
    yr, dr = ref.lrn_forward(x, **kw)
    np.testing.assert_array_equal(y, yr)
    np.testing.assert_array_equal(d, dr)
    assert y.dtype == dtype
    dx = ops.lrn_backward(NUMPY, x, y, d, y, **kw)
    np.testing.assert_array_equal(dx, ref.lrn_backward(x, yr, dr, yr, **kw))


# (C, H, W, N), params: AlexNet's (reduced channels), both register-window sizes (5, 3), generic sizes (4, 1, 9),
# many channels (several channel segments), odd N (scalar path)
LRN_CASES = [
    ((12, 27, 27, 8), dict(size=5, alpha=1e-4, beta=0.75, k=2.0)),     # conv1/conv2-like, the paper's values
    ((40, 3, 5, 4), dict(size=5, alpha=0.5, beta=0.75, k=1.0)),        # 3 channel segments, strong normalisation
    ((7, 4, 3, 5), dict(size=3, alpha=0.8, beta=0.6, k=1.5)),          # N = 5: scalar path
    ((6, 3, 3, 4), dict(size=4, alpha=0.6, beta=1.1, k=1.0)),          # even window (generic kernel)
    ((37, 2, 3, 3), dict(size=9, alpha=0.3, beta=0.5, k=0.7)),         # generic kernel, segments, N = 3
    ((3, 2, 2, 8), dict(size=7, alpha=0.4, beta=0.75, k=2.0)),         # window wider than C
    ((5, 3, 2, 4), dict(size=1, alpha=0.9, beta=0.75, k=1.0)),         # no cross-map term
    ((2, 5, 5, 33), dict(size=5, alpha=0.5, beta=0.75, k=2.0)),        # C < window, N = 33
]


def lrn_id(c):
    return "x".join(map(str, c[0])) + f"-n{c[1]['size']}"


@pytest.mark.parametrize("convention", ["sum", "mean"])
@pytest.mark.parametrize("case", LRN_CASES, ids=lrn_id)
@pytest.mark.sanitize
def test_kernel_matches_reference(kernel_device, case, convention):
    shape, p = case
    rng = np.random.default_rng(21 + len(shape) + p["size"])
    x = rand(rng, shape, low=-2.0, high=2.0)
    dy = rand(rng, shape)
    kw = dict(convention=convention, **p)
    y, d, dx = run_lrn(kernel_device, x, dy, **kw)
    dxr = assert_matches_reference(kernel_device, x, dy, y, d, dx, **kw)
    # the reuse variant (reads y, denom) and the denom-free forward give the same answers
    _, _, dx_reuse = run_lrn(kernel_device, x, dy, method="reuse", **kw)
    assert_close("dx (reuse)", dx_reuse, dxr, rtol=1e-5, atol=2e-6)
    xd = kernel_device.asarray(x)
    y2, none = ops.lrn_forward(kernel_device, xd, with_denom=False, **kw)
    assert none is None
    if kernel_device.kind == "emu":
        assert_identical("y (no denom)", to_host(y2), y)
        dx2 = ops.lrn_backward(kernel_device, xd, None, None, kernel_device.asarray(dy), **kw)
        assert_identical("dx (no y, denom)", to_host(dx2), dx)


@pytest.mark.sanitize
def test_kernel_gradient_float64_reference(kernel_device):
    """The float32 kernel's dx against the float64 reference dx (itself checked by finite differences)."""
    rng = np.random.default_rng(22)
    x = rand(rng, (9, 4, 4, 8), low=-2.0, high=2.0)
    dy = rand(rng, x.shape)
    kw = dict(size=5, alpha=0.5, beta=0.75, k=1.0, convention="mean")
    _, _, dx = run_lrn(kernel_device, x, dy, **kw)
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    y64, d64 = ref.lrn_forward(x64, **kw)
    assert_close("dx", dx, ref.lrn_backward(x64, y64, d64, dy64, **kw), rtol=1e-5, atol=1e-6)


def test_schedules_identical():
    rng = np.random.default_rng(23)
    x = rand(rng, (20, 3, 3, 8), low=-2.0, high=2.0)
    dy = rand(rng, x.shape)
    kw = dict(size=5, alpha=0.1, beta=0.75, k=2.0, convention="sum")
    for method in ("recompute", "reuse"):
        assert_schedules_identical(lambda: run_lrn(EMU, x, dy, method, **kw), ("y", "denom", "dx"), seed=5)


def test_bad_inputs(kernel_device):
    dev = kernel_device
    x = dev.asarray(np.ones((4, 3, 3, 4), np.float32))
    kw = dict(size=5, alpha=1e-4, beta=0.75, k=2.0, convention="sum")
    fwd, bwd = ops.lrn_forward, ops.lrn_backward
    assert_raises_each(
        (ValueError, "convention", lambda: fwd(dev, x, convention="paper")),
        (ValueError, "size", lambda: fwd(dev, x, size=0)),
        (ValueError, "k must be > 0", lambda: fwd(dev, x, k=0.0)),
        (ValueError, "alpha must be >= 0", lambda: fwd(dev, x, alpha=-1.0)),
        (TypeError, "beta", lambda: fwd(dev, x, beta=float("nan"))),
        (TypeError, "dtype float32", lambda: fwd(dev, dev.asarray(np.ones((4, 3, 3, 4), np.float64)))),
        (ValueError, "4-D", lambda: fwd(dev, dev.asarray(np.ones((4, 3, 3), np.float32)))),
    )
    y, d = fwd(dev, x, **kw)
    assert_raises_each(
        (ValueError, "denom must have shape", lambda: bwd(dev, x, y, d[:2].copy(), y, **kw)),
        (ValueError, "overlap", lambda: bwd(dev, x, y, d, y, out=y, **kw)),
        (TypeError, None, lambda: bwd(dev, x, y, d, y)),  # the parameters are required (keyword-only) in backward
        (ValueError, "method", lambda: bwd(dev, x, y, d, y, method="cache", **kw)),
        (ValueError, "needs y and denom", lambda: bwd(dev, x, y, None, y, method="reuse", **kw)),
    )


def test_launcher_rejects_bad_params():
    k = Device("emu").kernels
    buf = np.zeros(64, np.float32)
    p = buf.ctypes.data

    def raw(size=5, a=1e-4, beta=0.75, k=2.0, groups=1):
        """Named fields as the bindings read them, without convnet.geometry's own validation."""
        return SimpleNamespace(C=2, H=2, W=2, N=2, size=size, a=a, beta=beta, k=k, groups=groups)

    with pytest.raises(ValueError, match="k must be"):
        k.lrn_forward(p, p, p, raw(k=0.0), 0)
    with pytest.raises(ValueError, match="size"):
        k.lrn_backward(p, p, p, p, p, raw(size=0), 0, 0)
    with pytest.raises(ValueError, match="one group"):
        k.lrn_forward(p, p, p, raw(groups=2), 0)
    with pytest.raises(ValueError, match="variant"):
        k.lrn_backward(p, p, p, p, p, raw(), 3, 0)
    with pytest.raises(ValueError, match="null pointer .the reuse variant"):
        k.lrn_backward(p, 0, p, p, p, LrnGeometry.of((2, 2, 2, 2)), 1, 0)


@settings(max_examples=50, deadline=None)
@given(C=st.integers(1, 40), P=st.integers(1, 6), N=st.sampled_from([1, 3, 4, 8, 9, 36]), size=st.integers(1, 11),
       convention=st.sampled_from(["sum", "mean"]), method=st.sampled_from(["recompute", "reuse"]))
def test_emu_random_shapes(C, P, N, size, convention, method):
    rng = np.random.default_rng(C * 1000 + P * 100 + N + size)
    x = rand(rng, (C, P, 1, N), low=-2.0, high=2.0)
    dy = rand(rng, x.shape)
    kw = dict(size=size, alpha=0.4, beta=0.75, k=1.5, convention=convention)
    y, d, dx = run_lrn(EMU, x, dy, method, **kw)
    assert_matches_reference(EMU, x, dy, y, d, dx, **kw)


def test_emu_misaligned_pointers():
    dev = EMU
    rng = np.random.default_rng(24)
    x = misaligned(rand(rng, (9, 3, 3, 8), low=-2.0, high=2.0))
    dy = misaligned(rand(rng, x.shape))
    kw = dict(size=5, alpha=0.5, beta=0.75, k=2.0, convention="sum")
    for method in ("recompute", "reuse"):
        y, d = ops.lrn_forward(dev, x, **kw)
        dx = ops.lrn_backward(dev, x, y, d, dy, method=method, **kw)
        yr, dr = ref.lrn_forward(x, **kw)
        assert_close("y", y, yr, rtol=2e-6)
        assert_close("dx", dx, ref.lrn_backward(x, yr, dr, dy, **kw), rtol=1e-5, atol=2e-6)


# ---------------------------------------------------------------------------------------------------- groups
@pytest.mark.parametrize("groups, C, method", [(2, 8, "recompute"), (2, 8, "reuse"), (3, 9, "recompute"),
                                               (4, 4, "reuse")])
@pytest.mark.sanitize
def test_groups_normalise_each_group_alone(kernel_device, groups, C, method):
    """groups=G: each channel group is normalised on its own (the window never crosses a group boundary), exactly as
    G separate calls on the group slices; checked against the reference on each slice."""
    rng = np.random.default_rng(C * 10 + groups)
    x = rng.uniform(-2, 2, (C, 3, 2, 5)).astype(np.float32)
    dy = rng.uniform(-1, 1, x.shape).astype(np.float32)
    kw = dict(size=5, alpha=0.3, beta=0.75, k=1.5, convention="sum")
    for dev in (NUMPY, kernel_device):
        y, d, dx = run_lrn(dev, x, dy, method, groups=groups, **kw)
        cg = C // groups
        for g in range(groups):
            s = slice(g * cg, (g + 1) * cg)
            x64 = x[s].astype(np.float64)
            yr, dr = ref.lrn_forward(x64, **kw)
            assert_close(f"{dev} y group {g}", y[s], yr, rtol=2e-6)
            assert_close(f"{dev} denom group {g}", d[s], dr, rtol=2e-6)
            assert_close(f"{dev} dx group {g}", dx[s], ref.lrn_backward(x64, yr, dr, dy[s].astype(np.float64), **kw),
                         rtol=1e-4, atol=1e-6)
        # whole-tensor normalisation differs at the group boundaries: groups really are separate
        y1, _, _ = run_lrn(dev, x, dy, method, **kw)
        assert not np.array_equal(y1, y)


def test_groups_bad():
    x = np.ones((6, 2, 2, 4), np.float32)
    with pytest.raises(ValueError, match="groups=4 must divide the number of channels 6"):
        ops.lrn_forward(NUMPY, x, groups=4)
    with pytest.raises(ValueError, match="groups must be >= 1"):
        ops.lrn_backward(EMU, x, None, None, x.copy(), size=5, alpha=1e-4, beta=0.75, k=2.0, convention="sum",
                         groups=0)
