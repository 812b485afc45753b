"""Pooling: NumPy reference (gradient checks, conventions) and, when built, the emu/cuda kernels against it."""
import numpy as np
import pytest

from convnet.reference import pool as ref
from _fd import check_grad


def distinct(rng, shape, dtype=np.float64):
    """Values spaced >= 1e-3 apart: no ties, no kinks for central differences."""
    n = int(np.prod(shape))
    return (rng.permutation(n).astype(dtype) * 1e-2 + rng.uniform(0, 1e-3, n)).reshape(shape) - n * 5e-3


def naive_pool(x, mode, win, st, pad):
    C, H, W, N = x.shape
    OH = (H + 2 * pad[0] - win[0]) // st[0] + 1
    OW = (W + 2 * pad[1] - win[1]) // st[1] + 1
    y = np.zeros((C, OH, OW, N), x.dtype)
    for oh in range(OH):
        for ow in range(OW):
            h0, w0 = oh * st[0] - pad[0], ow * st[1] - pad[1]
            blk = x[:, max(h0, 0):min(h0 + win[0], H), max(w0, 0):min(w0 + win[1], W), :]
            y[:, oh, ow, :] = blk.max(axis=(1, 2)) if mode == "max" else blk.mean(axis=(1, 2))
    return y


def test_alexnet_output_sizes():
    sizes = [55]
    for _ in range(3):
        sizes.append(ref.pool_output_size(sizes[-1], 3, 2, 0))
    assert sizes == [55, 27, 13, 6]
    assert ref.pool_output_size(224, 2, 2, 0) == 112
    assert ref.pool_output_size(7, 3, 2, 1) == 4


@pytest.mark.parametrize("mode", ["max", "avg"])
@pytest.mark.parametrize("geom", [(3, 2, 0), (2, 2, 0), (3, 2, 1), ((3, 2), (2, 1), (1, 0)), (1, 1, 0), (5, 3, 2)])
def test_reference_matches_naive(mode, geom):
    rng = np.random.default_rng(1)
    win, st, pad = (ref.pair(g) for g in geom)
    x = rng.standard_normal((3, 9, 8, 5))
    y = ref.pool_forward(x, mode=mode, window=win, stride=st, padding=pad)
    np.testing.assert_allclose(y, naive_pool(x, mode, win, st, pad), rtol=1e-12)


@pytest.mark.parametrize("mode", ["max", "avg"])
@pytest.mark.parametrize("geom", [(3, 2, 0), (2, 2, 0), (3, 2, 1), ((3, 2), (1, 2), (1, 1)), (3, 3, 1)])
def test_reference_gradient(mode, geom):
    rng = np.random.default_rng(2)
    win, st, pad = geom
    x = distinct(rng, (2, 7, 6, 3))
    kw = dict(mode=mode, window=win, stride=st, padding=pad)
    y = ref.pool_forward(x, **kw)
    r = rng.standard_normal(y.shape)
    dx = ref.pool_backward(x, y, r, **kw)
    check_grad(lambda z: float((ref.pool_forward(z, **kw) * r).sum()), x, dx, n=84)


def test_reference_max_ties_all_receive():
    # every input equal to the window max gets the full window gradient (cuda-convnet's recompute rule)
    x = np.zeros((1, 3, 3, 1))
    y = ref.pool_forward(x, mode="max", window=3, stride=2)
    dx = ref.pool_backward(x, y, np.full(y.shape, 2.0), mode="max", window=3, stride=2)
    np.testing.assert_array_equal(dx, np.full(x.shape, 2.0))
    # overlapping windows: a shared maximum collects both windows' gradients
    x = np.array([1., 0, 5, 0, 1]).reshape(1, 1, 5, 1)
    y = ref.pool_forward(x, mode="max", window=(1, 3), stride=(1, 2))
    dx = ref.pool_backward(x, y, np.array([1., 10.]).reshape(1, 1, 2, 1), mode="max", window=(1, 3), stride=(1, 2))
    np.testing.assert_array_equal(dx.ravel(), [0, 0, 11, 0, 0])


def test_reference_float32_dtype():
    x = np.random.default_rng(0).standard_normal((2, 13, 13, 4)).astype(np.float32)
    y = ref.pool_forward(x, mode="avg", window=3, stride=2)
    assert y.dtype == np.float32 and y.shape == (2, 6, 6, 4)
    assert ref.pool_backward(x, y, y, mode="avg", window=3, stride=2).dtype == np.float32


@pytest.mark.parametrize("bad", [dict(window=0), dict(stride=0), dict(padding=2, window=3), dict(window=9)])
def test_reference_bad_geometry(bad):
    kw = dict(mode="max", window=3, stride=2, padding=0)
    kw.update(bad)
    with pytest.raises(ValueError):
        ref.pool_forward(np.zeros((1, 5, 5, 1)), **kw)
