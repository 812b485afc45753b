"""The NumPy convolution reference: against direct loops, finite differences (float64), and adjointness.

Tolerances:
- float64 reference vs the float64 direct loop: 1e-12 relative (both are exact sums of at most a few hundred
  products; only summation order differs, error ~ K * eps64 ~ 1e-14).
- float32 reference vs float64: 1e-5 relative to max|y| (K <= ~1200 products, float32 eps 6e-8, BLAS blocked
  summation grows ~ sqrt(K) * eps in practice; 1e-5 leaves 10x margin).
- central finite differences in float64 with step 1e-6: truncation O(h^2) is 0 for a linear/bilinear function,
  rounding ~ eps64 * |L| / h ~ 1e-10 relative; we use 1e-6 relative.
"""
import numpy as np
import pytest

from convnet.reference import conv as ref
from helpers import numeric_grad, sample_indices

GEOMS = [
    # C, H, W, N, F, KH, KW, stride, pad, groups
    (1, 5, 5, 2, 3, 3, 3, 1, 0, 1),
    (3, 7, 6, 3, 4, 3, 2, 2, 1, 1),
    (4, 6, 9, 1, 6, 3, 3, (1, 2), (1, 0), 2),
    (6, 8, 7, 2, 9, 5, 3, 3, 2, 3),
    (3, 11, 11, 2, 4, 11, 11, 4, 2, 1),  # AlexNet conv1-like: stride 4 pad 2 (filter 11x11)
    (2, 4, 4, 2, 2, 1, 1, 1, 0, 1),
]


def _make(geom, rng, dtype=np.float64):
    c, h, w, n, f, kh, kw, s, p, g = geom
    x = rng.standard_normal((c, h, w, n)).astype(dtype)
    wt = rng.standard_normal((c // g, kh, kw, f)).astype(dtype)
    b = rng.standard_normal(f).astype(dtype)
    return x, wt, b, dict(stride=s, padding=p, groups=g)


@pytest.mark.parametrize("geom", GEOMS)
def test_forward_matches_naive(geom):
    rng = np.random.default_rng(0)
    x, w, b, kw = _make(geom, rng)
    y = ref.conv_forward(x, w, b, **kw)
    yn = ref.conv_forward_naive(x, w, b, **kw)
    assert y.shape == yn.shape
    np.testing.assert_allclose(y, yn, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("geom", GEOMS)
def test_float32_close_to_float64(geom):
    rng = np.random.default_rng(1)
    x, w, b, kw = _make(geom, rng)
    y64 = ref.conv_forward(x, w, b, **kw)
    y32 = ref.conv_forward(x.astype(np.float32), w.astype(np.float32), b.astype(np.float32), **kw)
    assert y32.dtype == np.float32
    assert np.max(np.abs(y32 - y64)) <= 1e-5 * np.max(np.abs(y64))
    dy = rng.standard_normal(y64.shape)
    hw = x.shape[1:3]
    dx64 = ref.conv_backward_data(dy, w, hw, **kw)
    dx32 = ref.conv_backward_data(dy.astype(np.float32), w.astype(np.float32), hw, **kw)
    assert dx32.dtype == np.float32
    assert np.max(np.abs(dx32 - dx64)) <= 1e-5 * np.max(np.abs(dx64))
    fhw = w.shape[1:3]
    dw64 = ref.conv_backward_filter(x, dy, fhw, **kw)
    dw32 = ref.conv_backward_filter(x.astype(np.float32), dy.astype(np.float32), fhw, **kw)
    assert dw32.dtype == np.float32
    assert np.max(np.abs(dw32 - dw64)) <= 1e-5 * np.max(np.abs(dw64))


@pytest.mark.parametrize("geom", GEOMS)
def test_finite_difference_gradients(geom):
    rng = np.random.default_rng(2)
    x, w, b, kw = _make(geom, rng)
    y = ref.conv_forward(x, w, b, **kw)
    dy = rng.standard_normal(y.shape)
    inputs = dict(x=x, w=w, bias=b)
    grads = dict(x=ref.conv_backward_data(dy, w, x.shape[1:3], **kw),
                 w=ref.conv_backward_filter(x, dy, w.shape[1:3], **kw),
                 bias=ref.conv_backward_bias(dy))
    for name, grad in grads.items():
        idx = sample_indices(rng, inputs[name].size, 40)
        fd = numeric_grad(lambda z: float(np.sum(ref.conv_forward(**{**inputs, name: z}, **kw) * dy)), inputs[name],
                          1e-6, idx)
        an = grad.reshape(-1)[idx]
        scale = max(1.0, np.max(np.abs(an)))
        np.testing.assert_allclose(an, fd, rtol=0, atol=1e-6 * scale)


@pytest.mark.parametrize("geom", GEOMS)
def test_adjoint_identity(geom):
    """<conv(x), dy> == <x, dX(dy)> == <w, dW(x, dy)> exactly up to rounding (all of x and w, not a sample)."""
    rng = np.random.default_rng(3)
    x, w, _, kw = _make(geom, rng)
    y = ref.conv_forward(x, w, None, **kw)
    dy = rng.standard_normal(y.shape)
    lhs = np.sum(y * dy)
    dx = ref.conv_backward_data(dy, w, x.shape[1:3], **kw)
    dw = ref.conv_backward_filter(x, dy, w.shape[1:3], **kw)
    np.testing.assert_allclose(np.sum(x * dx), lhs, rtol=1e-11)
    np.testing.assert_allclose(np.sum(w * dw), lhs, rtol=1e-11)


def test_chunking_is_invisible(monkeypatch):
    rng = np.random.default_rng(4)
    x, w, b, kw = _make((4, 9, 8, 7, 6, 3, 3, 2, 1, 2), rng)
    y = ref.conv_forward(x, w, b, **kw)
    dy = rng.standard_normal(y.shape)
    dx = ref.conv_backward_data(dy, w, x.shape[1:3], **kw)
    dw = ref.conv_backward_filter(x, dy, w.shape[1:3], **kw)
    monkeypatch.setattr(ref, "_COL_BUDGET", 50)  # forces one image per chunk
    np.testing.assert_allclose(ref.conv_forward(x, w, b, **kw), y, rtol=1e-13)
    np.testing.assert_allclose(ref.conv_backward_data(dy, w, x.shape[1:3], **kw), dx, rtol=1e-13)
    np.testing.assert_allclose(ref.conv_backward_filter(x, dy, w.shape[1:3], **kw), dw, rtol=1e-12)


def test_output_hw_and_alexnet_shapes():
    assert ref.conv_output_hw(227, 11, 4, 0) == (55, 55)
    assert ref.conv_output_hw(224, 11, 4, 2) == (55, 55)
    assert ref.conv_output_hw(27, 5, 1, 2) == (27, 27)
    assert ref.conv_output_hw(13, 3, 1, 1) == (13, 13)
    assert ref.conv_output_hw((7, 9), (3, 2), (2, 3), (1, 0)) == (4, 3)


def test_bad_groups():
    with pytest.raises(ValueError):
        ref.conv_forward(np.zeros((3, 4, 4, 1)), np.zeros((1, 3, 3, 4)), groups=2)
