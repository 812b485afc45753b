"""Locally connected layers (unshared filters per output position): the NumPy reference against a definition
written with loops and finite differences (float64), and every device's ops against the reference."""
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import assume, given, settings, strategies as st

from convnet import ops
from convnet.devices import Device
from convnet.geometry import ConvGeometry, LocalGeometry
from convnet.reference import conv as conv_ref
from convnet.reference import local as ref
from helpers import (EMU, NUMPY, assert_close, assert_raises_each, assert_schedules_identical, check_grad,
                     misaligned, rand, to_host)

# (C, H, W, N, F, (KH, KW), stride, padding, groups): cuda-convnet's CIFAR local layer (reduced), stride larger
# than the filter, non-square everything, groups, 1x1, a filter as large as the padded input, N past 32
GEOMETRIES = [
    (4, 8, 8, 8, 8, (3, 3), 1, 1, 1),
    (6, 7, 9, 5, 4, (3, 2), (2, 3), (1, 2), 2),
    (3, 5, 5, 33, 17, (3, 3), 1, 1, 1),
    (1, 4, 6, 1, 1, (1, 1), 1, 0, 1),
    (8, 9, 9, 3, 36, (5, 3), 2, 2, 4),
    (2, 5, 4, 2, 3, (2, 2), 4, 0, 1),
    (3, 3, 2, 7, 6, (5, 4), 1, (1, 1), 3),
]


def gid(g):
    c, h, w, n, f, k, s, p, grp = g
    return f"{c}x{h}x{w}x{n}-f{f}-k{k[0]}x{k[1]}-s{s}-p{p}-g{grp}"


def make(rng, geo, dtype=np.float64, bias="shared"):
    c, h, w, n, f, k, s, p, grp = geo
    g = ConvGeometry.of((c, h, w, n), (c // grp, *k, f), stride=s, padding=p, groups=grp)
    x = rand(rng, (c, h, w, n), dtype, -2.0, 2.0)
    wt = rand(rng, (g.OH * g.OW, c // grp, *k, f), dtype)
    b = None if bias is None else rand(rng, (f,) if bias == "shared" else (f, g.OH, g.OW), dtype)
    return x, wt, b, dict(stride=s, padding=p, groups=grp)


# ---------------------------------------------------------------------------------------------------- reference
@pytest.mark.parametrize("bias", [None, "shared", "per_position"])
@pytest.mark.parametrize("geo", GEOMETRIES, ids=gid)
def test_reference_matches_loops(geo, bias):
    x, w, b, kw = make(np.random.default_rng(1), geo, bias=bias)
    np.testing.assert_allclose(ref.local_forward(x, w, b, **kw), ref.local_forward_naive(x, w, b, **kw),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("geo", GEOMETRIES[:3], ids=gid)
def test_reference_with_equal_filters_is_convolution(geo):
    """Every position given the same filters: the convolution (an independent implementation)."""
    x, w, b, kw = make(np.random.default_rng(2), geo)
    w[:] = w[0]
    np.testing.assert_allclose(ref.local_forward(x, w, b, **kw), conv_ref.conv_forward(x, w[0], b, **kw),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("geo", GEOMETRIES, ids=gid)
def test_reference_gradients_float64(geo):
    rng = np.random.default_rng(3)
    x, w, b, kw = make(rng, geo, bias="per_position")
    h, wd = x.shape[1:3]
    r = rng.standard_normal(ref.local_forward(x, w, b, **kw).shape)
    check_grad(lambda z: float((ref.local_forward(z, w, b, **kw) * r).sum()), x,
               ref.local_backward_data(r, w, (h, wd), **kw), n=40)
    check_grad(lambda z: float((ref.local_forward(x, z, b, **kw) * r).sum()), w,
               ref.local_backward_filter(x, r, w.shape[2:4], **kw), n=40)
    check_grad(lambda z: float((ref.local_forward(x, w, z, **kw) * r).sum()), b,
               ref.local_backward_bias(r, shared=False), n=20)
    check_grad(lambda z: float((ref.local_forward(x, w, z, **kw) * r).sum()), b[:, 0, 0].copy(),
               ref.local_backward_bias(r), n=20)


def test_reference_float32():
    x, w, b, kw = make(np.random.default_rng(4), GEOMETRIES[1], np.float32)
    y = ref.local_forward(x, w, b, **kw)
    assert y.dtype == np.float32
    assert ref.local_backward_data(y, w, x.shape[1:3], **kw).dtype == np.float32
    assert ref.local_backward_filter(x, y, w.shape[2:4], **kw).dtype == np.float32
    assert ref.local_backward_bias(y).dtype == ref.local_backward_bias(y, shared=False).dtype == np.float32


# ---------------------------------------------------------------------------------------------------- ops
def run(dev, x, w, b, dy, *, shared, **kw):
    xd, wd, dyd = dev.asarray(x), dev.asarray(w), dev.asarray(dy)
    y = ops.local_forward(dev, xd, wd, None if b is None else dev.asarray(b), **kw)
    dx = ops.local_backward_data(dev, dyd, wd, x.shape[1:3], **kw)
    dw = ops.local_backward_filter(dev, xd, dyd, w.shape[2:4], **kw)
    db = ops.local_backward_bias(dev, dyd, shared=shared)
    return tuple(to_host(a) for a in (y, dx, dw, db))


def assert_matches_reference(x, w, b, dy, got, *, shared, **kw):
    """float32 results against the float64 reference (sums over K or N in another order)."""
    x64, w64, dy64 = (a.astype(np.float64) for a in (x, w, dy))
    b64 = None if b is None else b.astype(np.float64)
    y, dx, dw, db = got
    assert_close("y", y, ref.local_forward(x64, w64, b64, **kw), rtol=1e-4, atol=1e-4)
    assert_close("dx", dx, ref.local_backward_data(dy64, w64, x.shape[1:3], **kw), rtol=1e-4, atol=1e-4)
    assert_close("dw", dw, ref.local_backward_filter(x64, dy64, w.shape[2:4], **kw), rtol=1e-4, atol=1e-4)
    assert_close("db", db, ref.local_backward_bias(dy64, shared=shared), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numpy_device_op(dtype):
    rng = np.random.default_rng(5)
    x, w, b, kw = make(rng, GEOMETRIES[1], dtype, bias="per_position")
    dy = rand(rng, ref.local_forward(x, w, b, **kw).shape, dtype)
    y, dx, dw, db = run(NUMPY, x, w, b, dy, shared=False, **kw)
    np.testing.assert_array_equal(y, ref.local_forward(x, w, b, **kw))
    np.testing.assert_array_equal(dx, ref.local_backward_data(dy, w, x.shape[1:3], **kw))
    np.testing.assert_array_equal(dw, ref.local_backward_filter(x, dy, w.shape[2:4], **kw))
    np.testing.assert_allclose(db, ref.local_backward_bias(dy, shared=False), rtol=1e-6)
    assert y.dtype == dx.dtype == dw.dtype == db.dtype == dtype


@pytest.mark.parametrize("bias", [None, "shared", "per_position"])
@pytest.mark.parametrize("geo", GEOMETRIES, ids=gid)
@pytest.mark.sanitize
def test_kernel_matches_reference(kernel_device, geo, bias):
    rng = np.random.default_rng(6 + geo[3])
    x, w, b, kw = make(rng, geo, np.float32, bias=bias)
    dy = rand(rng, ref.local_forward(x, w, b, **kw).shape)
    shared = bias != "per_position"
    assert_matches_reference(x, w, b, dy, run(kernel_device, x, w, b, dy, shared=shared, **kw), shared=shared,
                             **kw)


def test_kernel_accumulates_alpha_beta(kernel_device):
    dev = kernel_device
    rng = np.random.default_rng(7)
    x, w, b, kw = make(rng, GEOMETRIES[1], np.float32, bias="per_position")
    y0 = ref.local_forward(x, w, b, **kw)
    dy = rand(rng, y0.shape)
    xd, wd, dyd = dev.asarray(x), dev.asarray(w), dev.asarray(dy)
    cases = [
        (lambda out: ops.local_forward(dev, xd, wd, dev.asarray(b), out=out, alpha=0.5, beta=2.0, **kw), y0),
        (lambda out: ops.local_backward_data(dev, dyd, wd, x.shape[1:3], out=out, alpha=0.5, beta=2.0, **kw),
         ref.local_backward_data(dy, w, x.shape[1:3], **kw)),
        (lambda out: ops.local_backward_filter(dev, xd, dyd, w.shape[2:4], out=out, alpha=0.5, beta=2.0, **kw),
         ref.local_backward_filter(x, dy, w.shape[2:4], **kw)),
        (lambda out: ops.local_backward_bias(dev, dyd, shared=False, out=out, alpha=0.5, beta=2.0),
         ref.local_backward_bias(dy, shared=False)),
    ]
    for i, (call, want) in enumerate(cases):
        old = rand(rng, want.shape)
        out = dev.asarray(old.copy())  # asarray may share old's memory on a host device
        assert call(out) is out
        assert_close(f"case {i}", out, 0.5 * want.astype(np.float64) + 2.0 * old, rtol=1e-4, atol=1e-4)
    nan = dev.asarray(np.full(y0.shape, np.nan, np.float32))  # beta == 0: the old contents are never read
    ops.local_forward(dev, xd, wd, dev.asarray(b), out=nan, **kw)
    assert_close("y into NaN", nan, y0, rtol=1e-4, atol=1e-4)


def test_schedules_identical():
    rng = np.random.default_rng(8)
    x, w, b, kw = make(rng, GEOMETRIES[2], np.float32, bias="per_position")
    dy = rand(rng, ref.local_forward(x, w, b, **kw).shape)
    assert_schedules_identical(lambda: run(EMU, x, w, b, dy, shared=False, **kw), ("y", "dx", "dw", "db"), seed=3)


@settings(max_examples=30, deadline=None)
@given(C=st.integers(1, 4), H=st.integers(1, 7), W=st.integers(1, 7), N=st.sampled_from([1, 3, 32, 35]),
       F=st.integers(1, 20), KH=st.integers(1, 4), KW=st.integers(1, 4), sh=st.integers(1, 3), sw=st.integers(1, 3),
       ph=st.integers(0, 2), pw=st.integers(0, 2), groups=st.sampled_from([1, 2, 3]),
       shared=st.booleans())
def test_emu_random_geometries(C, H, W, N, F, KH, KW, sh, sw, ph, pw, groups, shared):
    assume(H + 2 * ph >= KH and W + 2 * pw >= KW)
    C, F = C * groups, F * groups
    geo = (C, H, W, N, F, (KH, KW), (sh, sw), (ph, pw), groups)
    rng = np.random.default_rng(C + 10 * H + 100 * W + N + F)
    x, w, b, kw = make(rng, geo, np.float32, bias="shared" if shared else "per_position")
    dy = rand(rng, ref.local_forward(x, w, b, **kw).shape)
    assert_matches_reference(x, w, b, dy, run(EMU, x, w, b, dy, shared=shared, **kw), shared=shared, **kw)


def test_emu_misaligned_pointers():
    rng = np.random.default_rng(9)
    x, w, b, kw = make(rng, GEOMETRIES[1], np.float32, bias="shared")
    dy = rand(rng, ref.local_forward(x, w, b, **kw).shape)
    x, w, b, dy = (misaligned(a) for a in (x, w, b, dy))
    assert_matches_reference(x, w, b, dy, run(EMU, x, w, b, dy, shared=True, **kw), shared=True, **kw)


def test_bad_inputs(kernel_device):
    dev = kernel_device
    rng = np.random.default_rng(10)
    x, w, b, kw = make(rng, GEOMETRIES[1], np.float32)  # x (6, 7, 9, 5), w (16, 3, 3, 2, 4), groups 2
    x, w, b = dev.asarray(x), dev.asarray(w), dev.asarray(b)
    y = ops.local_forward(dev, x, w, b, **kw)
    assert_raises_each(
        (ValueError, r"w must have shape \(OH\*OW, C/groups, KH, KW, F\) = \(16, 3, 3, 2, 4\)",
         lambda: ops.local_forward(dev, x, w[:15].copy(), **kw)),
        (ValueError, "5-D", lambda: ops.local_forward(dev, x, w[0].copy(), **kw)),
        (ValueError, r"bias must have shape \(F,\)", lambda: ops.local_forward(dev, x, w, w[0, 0, 0].copy(),
                                                                                **kw)),
        (ValueError, "groups=4 must divide", lambda: ops.local_forward(dev, x, w, stride=kw["stride"],
                                                                        padding=kw["padding"], groups=4)),
        (TypeError, "dtype float32", lambda: ops.local_forward(dev, dev.asarray(np.ones((6, 7, 9, 5))), w, **kw)),
        (ValueError, "input_hw", lambda: ops.local_backward_data(dev, y, w, (20, 20), **kw)),
        (ValueError, "images", lambda: ops.local_backward_filter(dev, x[..., :4].copy(), y, (3, 2), **kw)),
        (ValueError, "overlap", lambda: ops.local_forward(dev, x, w, out=x.reshape(-1)[:y.size].reshape(y.shape),
                                                          **kw)),
        (ValueError, "out must have shape", lambda: ops.local_backward_bias(dev, y, shared=False, out=b)),
    )


def test_launcher_rejects_bad_geometry():
    k = Device("emu").kernels
    buf = np.zeros(4096, np.float32)
    p = buf.ctypes.data
    good = LocalGeometry.of((2, 3, 3, 2), (9, 2, 1, 1, 2))

    def raw(**over):
        """Named fields as the bindings read them, without convnet.geometry's own validation."""
        fields = {f: getattr(good, f) for f in ("C", "H", "W", "N", "F", "KH", "KW", "stride_h", "stride_w",
                                                "pad_h", "pad_w", "groups", "OH", "OW")}
        return SimpleNamespace(**{**fields, **over})

    with pytest.raises(ValueError, match="groups"):
        k.local_forward(p, p, 0, 0, p, raw(groups=3), 1.0, 0.0, 0)
    with pytest.raises(ValueError, match="disagree on the output size"):
        k.local_backward_data(p, p, p, raw(OH=2), 1.0, 0.0, 0)
    with pytest.raises(ValueError, match="null pointer"):
        k.local_backward_filter(p, 0, p, good, 1.0, 0.0, 0)
    with pytest.raises(ValueError, match="null bias"):
        k.local_forward(p, p, 0, 1, p, good, 1.0, 0.0, 0)
    with pytest.raises(ValueError, match="bias_mode"):
        k.local_forward(p, p, p, 3, p, good, 1.0, 0.0, 0)
    with pytest.raises(ValueError, match="too many filter or image tiles"):
        k.local_forward(p, p, 0, 0, p, raw(N=32 * 65536), 1.0, 0.0, 0)


def test_each_pass_is_one_launcher_call_for_all_positions(monkeypatch):
    """The cuda path (CuPy faked, the emulator's kernels behind it): the forward pass and each gradient is one call
    of its launcher for every output position (which launches one grid: csrc/kernels/local.cu), not one per
    position."""
    from fake_cupy import FakeCupy
    fake = FakeCupy(devices=1).install(monkeypatch)
    dev = Device("cuda", 0)
    rng = np.random.default_rng(11)
    x, w, b, kw = make(rng, GEOMETRIES[0], np.float32, bias="per_position")
    y = ref.local_forward(x, w, b, **kw)
    X, W, B, DY = (dev.asarray(a) for a in (x, w, b, rand(rng, y.shape)))
    calls = {
        "local_forward": lambda: ops.local_forward(dev, X, W, B, **kw),
        "local_backward_data": lambda: ops.local_backward_data(dev, DY, W, x.shape[1:3], **kw),
        "local_backward_filter": lambda: ops.local_backward_filter(dev, X, DY, w.shape[2:4], **kw),
    }
    for name, call in calls.items():
        fake.calls.clear()
        fake.recording = True
        out = call()
        fake.recording = False
        launches = [e for e in fake.calls if e[0].startswith("launch")]
        assert len(launches) == 1, (name, launches)
        if name == "local_forward":
            assert_close("y", out, y, rtol=1e-4, atol=1e-4)
