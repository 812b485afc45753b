"""Softmax + cross-entropy and top-k errors: NumPy reference and, when built, the kernels."""
import numpy as np
import pytest

from convnet.reference import softmax as ref
from _fd import check_grad


def test_reference_values():
    rng = np.random.default_rng(7)
    l = rng.standard_normal((10, 6))
    lab = rng.integers(0, 10, 6).astype(np.int32)
    loss, p, d = ref.softmax_cross_entropy(l, lab)
    e = np.exp(l)
    pn = e / e.sum(0)
    np.testing.assert_allclose(p, pn, rtol=1e-13)
    np.testing.assert_allclose(loss, -np.log(pn[lab, np.arange(6)]).sum(), rtol=1e-13)
    assert loss.shape == ()
    oh = np.zeros_like(pn)
    oh[lab, np.arange(6)] = 1
    np.testing.assert_allclose(d, pn - oh, atol=1e-15)


def test_reference_gradient():
    rng = np.random.default_rng(8)
    l = rng.standard_normal((7, 5)) * 3
    lab = rng.integers(0, 7, 5).astype(np.int32)
    _, _, d = ref.softmax_cross_entropy(l, lab)
    check_grad(lambda z: float(ref.softmax_cross_entropy(z, lab)[0]), l, d, n=35)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_reference_huge_logits(dtype):
    l = np.array([[1e4, -1e4, 0], [0, 1e4, 1e4], [-1e4, 0, 1e4]], dtype=dtype)
    lab = np.array([1, 1, 0], np.int32)
    loss, p, d = ref.softmax_cross_entropy(l, lab)
    assert np.isfinite(loss) and np.isfinite(p).all() and np.isfinite(d).all()
    # columns are images: img0 label logit 0 vs max 1e4 -> 1e4; img1 label is the max -> ~0;
    # img2 label logit 0 vs two logits of 1e4 -> 1e4 + log 2
    np.testing.assert_allclose(loss, 2e4 + np.log(2), rtol=1e-6)


def test_reference_topk():
    s = np.array([[5, 1, 0, 3],
                  [4, 2, 0, 3],
                  [3, 3, 0, 3],
                  [2, 4, 0, 3],
                  [1, 5, 0, 3],
                  [0, 6, 0, 3]], float)
    lab = np.array([0, 0, 2, 5], np.int32)
    # ranks (classes strictly higher): img0 0, img1 5, img2 0 (all tie), img3 0 (all tie)
    assert ref.topk_errors(s, lab, ks=(1, 5)) == (1, 1)
    assert ref.topk_errors(s, lab, ks=(1, 6, 2)) == (1, 0, 1)
