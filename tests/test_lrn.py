"""Cross-map LRN: NumPy reference (gradient checks, both alpha conventions) and, when built, the kernels."""
import numpy as np
import pytest

from convnet.reference import lrn as ref
from _fd import check_grad


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
