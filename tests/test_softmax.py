"""Softmax + cross-entropy and top-k errors: NumPy reference and, when built, the kernels."""
import numpy as np
import pytest

from convnet import ops
from convnet.devices import Device
from convnet.reference import softmax as ref
from helpers import EMU, NUMPY, assert_close, assert_raises_each, assert_schedules_identical, check_grad, to_host


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


# ---------------------------------------------------------------------------------------------------- op layer
def run_xent(dev, logits, labels):
    loss, p, d = ops.softmax_cross_entropy(dev, dev.asarray(logits), dev.asarray(labels))
    assert loss.shape == ()
    return float(to_host(loss)), to_host(p), to_host(d)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numpy_device_op(dtype):
    rng = np.random.default_rng(30)
    l = rng.standard_normal((10, 7)).astype(dtype)
    lab = rng.integers(0, 10, 7).astype(np.int32)
    loss, p, d = ops.softmax_cross_entropy(NUMPY, l, lab)
    lr, pr, dr = ref.softmax_cross_entropy(l, lab)
    assert loss == lr and p.dtype == dtype
    assert ops.topk_errors(NUMPY, l, lab, ks=(1, 3)) == ref.topk_errors(l, lab, (1, 3))


# (classes, N): AlexNet's 1000 classes; fewer classes than lanes; N not a multiple of 32
XENT_CASES = [(1000, 8), (10, 37), (3, 5), (1, 4), (100, 64)]


@pytest.mark.parametrize("K,N", XENT_CASES)
def test_kernel_matches_reference(kernel_device, K, N):
    rng = np.random.default_rng(31 + K + N)
    l = (rng.standard_normal((K, N)) * 4).astype(np.float32)
    lab = rng.integers(0, K, N).astype(np.int32)
    loss, p, d = run_xent(kernel_device, l, lab)
    lr, pr, dr = ref.softmax_cross_entropy(l.astype(np.float64), lab)
    assert abs(loss - float(lr)) <= 1e-5 * max(1.0, abs(float(lr)))
    assert_close("probs", p, pr, rtol=1e-5, atol=1e-8)
    assert_close("dlogits", d, dr, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("scale", [1e4, 1e30])
def test_kernel_huge_logits(kernel_device, scale):
    rng = np.random.default_rng(32)
    K, N = 20, 9
    l = (rng.choice([-1.0, 0.0, 1.0], (K, N)) * scale).astype(np.float32)
    lab = rng.integers(0, K, N).astype(np.int32)
    loss, p, d = run_xent(kernel_device, l, lab)
    assert np.isfinite(loss) and np.isfinite(p).all() and np.isfinite(d).all()
    lr, pr, dr = ref.softmax_cross_entropy(l.astype(np.float64), lab)
    assert abs(loss - float(lr)) <= 1e-6 * abs(float(lr)) + 1e-3
    assert_close("probs", p, pr, rtol=1e-6, atol=1e-7)


def test_kernel_topk(kernel_device):
    rng = np.random.default_rng(33)
    K, N = 1000, 70
    s = rng.integers(0, 6, (K, N)).astype(np.float32)  # heavy ties
    lab = rng.integers(0, K, N).astype(np.int32)
    s[lab[:10], np.arange(10)] = 9.0                     # ten sure hits
    ks = (1, 5, 100, 1000, 2000)
    got = ops.topk_errors(kernel_device, kernel_device.asarray(s), kernel_device.asarray(lab), ks=ks)
    assert got == ref.topk_errors(s, lab, ks)
    assert got[-1] == 0 and got[-2] == 0
    l = rng.standard_normal((10, 37)).astype(np.float32)
    lab = rng.integers(0, 10, 37).astype(np.int32)
    assert ops.topk_errors(kernel_device, kernel_device.asarray(l), kernel_device.asarray(lab)) == \
        ref.topk_errors(l, lab)


def test_schedules_identical():
    rng = np.random.default_rng(34)
    l = rng.standard_normal((50, 40)).astype(np.float32)
    lab = rng.integers(0, 50, 40).astype(np.int32)
    assert_schedules_identical(lambda: run_xent(EMU, l, lab) + (ops.topk_errors(EMU, l, lab, ks=(1, 2, 5)),),
                               ("loss", "probs", "dlogits", "top-k errors"), seed=7)


def test_bad_inputs(kernel_device):
    dev = kernel_device
    l = dev.asarray(np.zeros((5, 4), np.float32))
    lab = dev.asarray(np.zeros(4, np.int32))
    xent, topk = ops.softmax_cross_entropy, ops.topk_errors
    assert_raises_each(
        (TypeError, "labels must have dtype int32", lambda: xent(dev, l, dev.asarray(np.zeros(4, np.int64)))),
        (ValueError, r"labels must have shape \(4\)", lambda: xent(dev, l, dev.asarray(np.zeros(3, np.int32)))),
        (ValueError, "2-D", lambda: xent(dev, dev.asarray(np.zeros(5, np.float32)), lab)),
        (TypeError, "dtype float32", lambda: xent(dev, dev.asarray(np.zeros((5, 4), np.float64)), lab)),
        (ValueError, "ks must be", lambda: topk(dev, l, lab, ks=(0,))),
        (ValueError, "ks must be", lambda: topk(dev, l, lab, ks=tuple(range(1, 11)))),
    )
    if dev.kind != "cuda":  # labels are range-checked in host memory only
        assert_raises_each(
            (ValueError, r"labels must be in \[0, 5\)",
             lambda: xent(dev, l, dev.asarray(np.array([0, 1, 5, 2], np.int32)))),
            (ValueError, "labels must be in", lambda: topk(dev, l, dev.asarray(np.array([0, -1, 1, 2], np.int32)))),
        )


def test_kernel_invalid_label_is_nan():
    """Past the Python checks (as on cuda, which does not sync to check labels) a bad label gives a NaN loss."""
    dev = Device("emu")
    k = dev.kernels
    l = np.zeros((5, 2), np.float32)
    lab = np.array([1, 7], np.int32)
    p, d, per = np.empty_like(l), np.empty_like(l), np.empty(2, np.float32)
    loss = np.empty((), np.float32)
    k.softmax_cross_entropy(*(a.ctypes.data for a in (l, lab, p, d, per, loss)), 5, 2, 0)
    assert np.isfinite(per[0]) and np.isnan(per[1]) and np.isnan(loss)
    errors = np.empty(2, np.int32)
    k.topk_errors(l.ctypes.data, lab.ctypes.data, errors.ctypes.data, [1, 5], 5, 2, 0)
    assert list(errors) == [1, 1]


# ---------------------------------------------------------------------------------------------------- softmax_forward
@pytest.mark.parametrize("shape", [(10, 7), (1, 3), (1000, 33), (17, 64)])
def test_softmax_forward(kernel_device, shape):
    """Probabilities without labels (inference, evaluation): the same kernel as softmax_cross_entropy's probs."""
    rng = np.random.default_rng(shape[0] * 100 + shape[1])
    l = (rng.standard_normal(shape) * 30).astype(np.float32)
    lab = rng.integers(0, shape[0], shape[1]).astype(np.int32)
    dev = kernel_device
    p = ops.softmax_forward(dev, dev.asarray(l))
    assert_close("probs", p, ref.softmax(l.astype(np.float64)), rtol=1e-5, atol=1e-7)
    _, p_xent, _ = ops.softmax_cross_entropy(dev, dev.asarray(l), dev.asarray(lab))
    np.testing.assert_array_equal(to_host(p), to_host(p_xent))  # bit-identical to the fused kernel's probs
    out = dev.asarray(np.full(shape, np.nan, np.float32))
    assert ops.softmax_forward(dev, dev.asarray(l), out=out) is out
    np.testing.assert_array_equal(to_host(out), to_host(p))


def test_softmax_forward_numpy_and_bad_inputs():
    l = np.random.default_rng(3).standard_normal((5, 4))
    np.testing.assert_array_equal(ops.softmax_forward(NUMPY, l), ref.softmax(l))
    for dev in (NUMPY, EMU):
        with pytest.raises(ValueError, match="2-D"):
            ops.softmax_forward(dev, np.zeros((5,), np.float32))
        with pytest.raises(ValueError, match="out must have shape"):
            ops.softmax_forward(dev, np.zeros((5, 4), np.float32), out=np.zeros((4, 5), np.float32))
        x = np.ones((5, 4), np.float32)
        with pytest.raises(ValueError, match="overlap"):
            ops.softmax_forward(dev, x, out=x)
