"""Same-map response normalisation (rnorm) and contrast normalisation (cnorm): the NumPy reference against a
definition written pixel by pixel and finite differences (float64), and the kernels against the reference."""
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from convnet import ops
from convnet.devices import Device
from convnet.geometry import RnormGeometry
from convnet.reference import rnorm as ref
from helpers import (EMU, NUMPY, assert_close, assert_raises_each, assert_schedules_identical, check_grad,
                     misaligned, rand, to_host)


def naive(x, *, size, alpha, beta, k, contrast):
    """cuda-convnet's definition, one pixel at a time: the window starts size//2 before the pixel, is clipped to the
    image, and alpha is divided by the full window's area; cnorm subtracts the mean over the clipped window."""
    C, H, W, N = x.shape
    a = alpha / size ** 2

    def win(h, w):
        return [(i, j) for i in range(h - size // 2, h - size // 2 + size)
                for j in range(w - size // 2, w - size // 2 + size) if 0 <= i < H and 0 <= j < W]

    s = x.copy()
    if contrast:
        for h in range(H):
            for w in range(W):
                s[:, h, w] = x[:, h, w] - np.mean([x[:, i, j] for i, j in win(h, w)], axis=0)
    y, d = np.empty_like(x), np.empty_like(x)
    for h in range(H):
        for w in range(W):
            d[:, h, w] = k + a * np.sum([s[:, i, j] ** 2 for i, j in win(h, w)], axis=0)
            y[:, h, w] = x[:, h, w] * d[:, h, w] ** -beta
    return y, s, d


def forward(kind):
    return ref.cnorm_forward if kind == "cnorm" else ref.rnorm_forward


PARAMS = [dict(size=5, alpha=1e-3, beta=0.75, k=1.0),       # cuda-convnet's CIFAR values
          dict(size=3, alpha=4.0, beta=0.6, k=1.0),         # strong enough for the window term to matter
          dict(size=4, alpha=3.0, beta=1.2, k=1.5),         # even window: one more row/column before the pixel
          dict(size=1, alpha=2.0, beta=0.75, k=1.0),
          dict(size=9, alpha=6.0, beta=0.5, k=0.5)]         # window larger than the image


@pytest.mark.parametrize("kind", ["rnorm", "cnorm"])
@pytest.mark.parametrize("p", PARAMS)
def test_reference_matches_cuda_convnet_definition(kind, p):
    x = np.random.default_rng(3).standard_normal((3, 5, 4, 2)) * 2
    got = forward(kind)(x, **p)
    y, s, d = naive(x, contrast=kind == "cnorm", **p)
    np.testing.assert_allclose(got[0], y, rtol=1e-13)
    np.testing.assert_allclose(got[-1], d, rtol=1e-13)
    if kind == "cnorm":
        np.testing.assert_allclose(got[1], s, rtol=1e-12, atol=1e-14)


def backward(kind, x, res, dy, **kw):
    if kind == "cnorm":
        return ref.cnorm_backward(x, res[1], res[2], dy, **kw)
    return ref.rnorm_backward(x, res[1], dy, **kw)


@pytest.mark.parametrize("kind", ["rnorm", "cnorm"])
@pytest.mark.parametrize("p", PARAMS)
@pytest.mark.parametrize("shape", [(2, 5, 4, 3), (1, 1, 7, 2), (2, 6, 1, 1)])
def test_reference_gradient(kind, p, shape):
    rng = np.random.default_rng(4)
    x = rng.standard_normal(shape) * 2
    res = forward(kind)(x, **p)
    r = rng.standard_normal(x.shape)
    dx = backward(kind, x, res, r, **p)
    check_grad(lambda z: float((forward(kind)(z, **p)[0] * r).sum()), x, dx, n=80)


def test_contrast_norm_of_a_constant_map_divides_by_min_div():
    """A constant map has no contrast: cnorm divides it by k**beta alone; rnorm does not."""
    x = np.full((1, 4, 5, 2), 3.0)
    y, m, d = ref.cnorm_forward(x, size=3, alpha=2.0, beta=0.5, k=4.0)
    np.testing.assert_allclose(m, 0.0, atol=1e-15)
    np.testing.assert_allclose(y, 1.5)
    assert (ref.rnorm_forward(x, size=3, alpha=2.0, beta=0.5, k=4.0)[0] < 1.4).all()


@pytest.mark.parametrize("kind", ["rnorm", "cnorm"])
def test_reference_float32(kind):
    x = np.random.default_rng(6).standard_normal((3, 5, 5, 4)).astype(np.float32)
    res = forward(kind)(x)
    assert all(a.dtype == np.float32 for a in res)
    assert backward(kind, x, res, res[0]).dtype == np.float32


# ---------------------------------------------------------------------------------------------------- ops
def run(dev, kind, x, dy, **kw):
    xd = dev.asarray(x)
    if kind == "cnorm":
        y, m, d = ops.cnorm_forward(dev, xd, **kw)
        dx = ops.cnorm_backward(dev, xd, m, d, dev.asarray(dy), **kw)
        return to_host(y), to_host(m), to_host(d), to_host(dx)
    y, d = ops.rnorm_forward(dev, xd, **kw)
    dx = ops.rnorm_backward(dev, xd, d, dev.asarray(dy), **kw)
    return to_host(y), None, to_host(d), to_host(dx)


def assert_matches_reference(kind, x, dy, got, **kw):
    """The kernels' results against the float32 reference (window sums in another order, __powf's few ulps)."""
    y, m, d, dx = got
    res = forward(kind)(x, **kw)
    assert_close("y", y, res[0], rtol=1e-5, atol=1e-6)
    assert_close("denom", d, res[-1], rtol=1e-5)
    if kind == "cnorm":
        assert_close("mean_diff", m, res[1], rtol=1e-5, atol=1e-5)
    assert_close("dx", dx, backward(kind, x, res, dy, **kw), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["rnorm", "cnorm"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numpy_device_op(kind, dtype):
    x = np.random.default_rng(20).standard_normal((3, 4, 5, 2)).astype(dtype)
    kw = dict(size=3, alpha=2.0, beta=0.75, k=2.0)
    y, m, d, dx = run(NUMPY, kind, x, x, **kw)
    res = forward(kind)(x, **kw)
    np.testing.assert_array_equal(y, res[0])
    np.testing.assert_array_equal(d, res[-1])
    np.testing.assert_array_equal(dx, backward(kind, x, res, x, **kw))
    assert y.dtype == dx.dtype == dtype


# (C, H, W, N), params: cuda-convnet's CIFAR layer (reduced), odd sizes and N, window larger than the image, 1x1
CASES = [
    ((4, 8, 8, 8), dict(size=5, alpha=1e-3, beta=0.75, k=1.0)),
    ((3, 5, 7, 5), dict(size=3, alpha=4.0, beta=0.6, k=1.5)),
    ((2, 6, 4, 3), dict(size=4, alpha=3.0, beta=1.1, k=1.0)),      # even window
    ((2, 3, 2, 4), dict(size=9, alpha=6.0, beta=0.5, k=0.7)),      # window larger than the image
    ((1, 1, 1, 33), dict(size=5, alpha=2.0, beta=0.75, k=2.0)),    # one pixel
    ((3, 4, 4, 2), dict(size=1, alpha=2.0, beta=0.75, k=1.0)),     # no neighbours
]


def case_id(c):
    return "x".join(map(str, c[0])) + f"-s{c[1]['size']}"


@pytest.mark.parametrize("kind", ["rnorm", "cnorm"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.sanitize
def test_kernel_matches_reference(kernel_device, kind, case):
    shape, p = case
    rng = np.random.default_rng(21 + p["size"] + shape[-1])
    x = rand(rng, shape, low=-2.0, high=2.0)
    dy = rand(rng, shape)
    assert_matches_reference(kind, x, dy, run(kernel_device, kind, x, dy, **p), **p)


@pytest.mark.parametrize("kind", ["rnorm", "cnorm"])
@pytest.mark.sanitize
def test_kernel_gradient_float64_reference(kernel_device, kind):
    """The float32 kernels' dx against the float64 reference dx (itself checked by finite differences)."""
    rng = np.random.default_rng(22)
    x = rand(rng, (3, 6, 5, 4), low=-2.0, high=2.0)
    dy = rand(rng, x.shape)
    kw = dict(size=3, alpha=4.0, beta=0.75, k=1.0)
    dx = run(kernel_device, kind, x, dy, **kw)[3]
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    assert_close("dx", dx, backward(kind, x64, forward(kind)(x64, **kw), dy64, **kw), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["rnorm", "cnorm"])
def test_schedules_identical(kind):
    rng = np.random.default_rng(23)
    x = rand(rng, (2, 5, 5, 8), low=-2.0, high=2.0)
    dy = rand(rng, x.shape)
    kw = dict(size=3, alpha=2.0, beta=0.75, k=2.0)
    names = ("y", "mean_diff", "denom", "dx") if kind == "cnorm" else ("y", "denom", "dx")
    assert_schedules_identical(lambda: [a for a in run(EMU, kind, x, dy, **kw) if a is not None], names, seed=5)


@settings(max_examples=40, deadline=None)
@given(kind=st.sampled_from(["rnorm", "cnorm"]), C=st.integers(1, 4), H=st.integers(1, 7), W=st.integers(1, 7),
       N=st.sampled_from([1, 3, 4, 8, 9]), size=st.integers(1, 8))
def test_emu_random_shapes(kind, C, H, W, N, size):
    rng = np.random.default_rng(C * 1000 + H * 100 + W * 10 + N + size)
    x = rand(rng, (C, H, W, N), low=-2.0, high=2.0)
    dy = rand(rng, x.shape)
    kw = dict(size=size, alpha=3.0, beta=0.75, k=1.5)
    assert_matches_reference(kind, x, dy, run(EMU, kind, x, dy, **kw), **kw)


def test_emu_misaligned_pointers():
    rng = np.random.default_rng(24)
    x = misaligned(rand(rng, (2, 4, 3, 5), low=-2.0, high=2.0))
    dy = misaligned(rand(rng, x.shape))
    kw = dict(size=3, alpha=2.0, beta=0.75, k=2.0)
    for kind in ("rnorm", "cnorm"):
        assert_matches_reference(kind, x, dy, run(EMU, kind, x, dy, **kw), **kw)


@pytest.mark.parametrize("kind", ["rnorm", "cnorm"])
def test_out_arrays_are_written(kernel_device, kind):
    dev = kernel_device
    rng = np.random.default_rng(25)
    x = rand(rng, (2, 3, 4, 4), low=-2.0, high=2.0)
    kw = dict(size=3, alpha=2.0, beta=0.75, k=1.0)
    xd = dev.asarray(x)
    fwd = ops.cnorm_forward if kind == "cnorm" else ops.rnorm_forward
    outs = tuple(dev.asarray(np.full(x.shape, np.nan, np.float32)) for _ in range(3 if kind == "cnorm" else 2))
    got = fwd(dev, xd, out=outs, **kw)
    assert all(g is o for g, o in zip(got, outs))
    for g, want in zip(got, forward(kind)(x, **kw)):
        assert_close("out", g, want, rtol=1e-5, atol=1e-5)


def test_bad_inputs(kernel_device):
    dev = kernel_device
    x = dev.asarray(np.ones((2, 3, 3, 4), np.float32))
    kw = dict(size=3, alpha=1e-3, beta=0.75, k=1.0)
    assert_raises_each(
        (ValueError, "size must be a positive int", lambda: ops.rnorm_forward(dev, x, size=0)),
        (ValueError, "k must be > 0", lambda: ops.cnorm_forward(dev, x, k=0.0)),
        (ValueError, "alpha must be >= 0", lambda: ops.rnorm_forward(dev, x, alpha=-1.0)),
        (TypeError, "beta", lambda: ops.cnorm_forward(dev, x, beta=float("nan"))),
        (TypeError, "dtype float32", lambda: ops.rnorm_forward(dev, dev.asarray(np.ones((2, 3, 3, 4))))),
        (ValueError, "4-D", lambda: ops.cnorm_forward(dev, dev.asarray(np.ones((2, 3, 3), np.float32)))),
        (ValueError, "out must be None or a tuple", lambda: ops.cnorm_forward(dev, x, out=x)),
    )
    y, d = ops.rnorm_forward(dev, x, **kw)
    cy, m, cd = ops.cnorm_forward(dev, x, **kw)
    assert_raises_each(
        (ValueError, "denom must have shape", lambda: ops.rnorm_backward(dev, x, d[:1].copy(), y, **kw)),
        (ValueError, "overlap", lambda: ops.rnorm_backward(dev, x, d, y, out=d, **kw)),
        (ValueError, "mean_diff must have shape", lambda: ops.cnorm_backward(dev, x, m[:1].copy(), cd, cy, **kw)),
        (ValueError, "overlap", lambda: ops.cnorm_backward(dev, x, m, cd, cy, out=m, **kw)),
        (TypeError, None, lambda: ops.rnorm_backward(dev, x, d, y)),  # the forward's parameters are required
        (TypeError, None, lambda: ops.cnorm_backward(dev, x, m, cd, cy, size=3)),
    )


def test_launcher_rejects_bad_params():
    k = Device("emu").kernels
    buf = np.zeros(64, np.float32)
    p = buf.ctypes.data

    def raw(size=3, a=1e-3, beta=0.75, k=1.0):
        """Named fields as the bindings read them, without convnet.geometry's own validation."""
        return SimpleNamespace(C=2, H=2, W=2, N=2, size=size, a=a, beta=beta, k=k)

    with pytest.raises(ValueError, match="k must be"):
        k.rnorm_forward(p, p, p, p, raw(k=0.0), 0)
    with pytest.raises(ValueError, match="size"):
        k.rnorm_backward(p, p, p, p, p, False, raw(size=0), 0)
    with pytest.raises(ValueError, match="null pointer"):
        k.cnorm_backward_mean(p, 0, p, p, RnormGeometry.of((2, 2, 2, 2), size=3), 0)
    with pytest.raises(ValueError, match="null pointer"):
        k.cnorm_mean_diff(0, p, raw(), 0)
