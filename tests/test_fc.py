"""Fully-connected layers: NumPy reference, then the op on every available device."""
import numpy as np
import pytest

from convnet import ops
from convnet.reference import fc as ref
from helpers import assert_close, assert_raises_each, check_grad


def test_reference_gradients():
    rng = np.random.default_rng(9)
    x = rng.standard_normal((6, 4))
    w = rng.standard_normal((5, 6))
    b = rng.standard_normal(5)
    r = rng.standard_normal((5, 4))
    f = lambda xx, ww, bb: float((ref.fc_forward(xx, ww, bb) * r).sum())
    check_grad(lambda z: f(z, w, b), x, ref.fc_backward_data(r, w))
    check_grad(lambda z: f(x, z, b), w, ref.fc_backward_weights(x, r))
    check_grad(lambda z: f(x, w, z), b, ref.fc_backward_bias(r))


# ---------------------------------------------------------------------------------------------------- op layer
@pytest.mark.parametrize("alpha,beta", [(1.0, 0.0), (0.5, 0.0), (2.0, 1.0), (-1.0, 0.25)])
@pytest.mark.sanitize
def test_ops_match_reference(any_device, alpha, beta):
    dev = any_device
    rng = np.random.default_rng(40)
    I, O, N = 33, 17, 12
    x, w, b = (rng.standard_normal(s).astype(np.float32) for s in ((I, N), (O, I), (O,)))
    dy = rng.standard_normal((O, N)).astype(np.float32)
    cases = [
        (ops.fc_forward, (x, w, b), ref.fc_forward(x, w, b), (O, N)),
        (ops.fc_forward, (x, w), ref.fc_forward(x, w), (O, N)),
        (ops.fc_backward_data, (dy, w), ref.fc_backward_data(dy, w), (I, N)),
        (ops.fc_backward_weights, (x, dy), ref.fc_backward_weights(x, dy), (O, I)),
        (ops.fc_backward_bias, (dy,), ref.fc_backward_bias(dy), (O,)),
    ]
    for fn, args, want, shape in cases:
        prior = rng.standard_normal(shape).astype(np.float32)
        if beta == 0.0:
            prior[...] = np.nan  # beta = 0 must not read out
        out = dev.asarray(prior.copy())
        got = fn(dev, *(dev.asarray(a) for a in args), out=out, alpha=alpha, beta=beta)
        assert got is out
        expect = alpha * want + (beta * prior if beta else 0)
        assert_close(fn.__name__, got, expect, rtol=1e-5, atol=1e-5)
        fresh = fn(dev, *(dev.asarray(a) for a in args))
        assert_close(fn.__name__ + " (fresh)", fresh, want, rtol=1e-5, atol=1e-5)


def test_float64_on_numpy():
    rng = np.random.default_rng(41)
    x, w = rng.standard_normal((5, 3)), rng.standard_normal((4, 5))
    y = ops.fc_forward("numpy", x, w)
    assert y.dtype == np.float64
    np.testing.assert_allclose(y, w @ x)


def test_bad_inputs(any_device):
    dev = any_device
    x = dev.asarray(np.zeros((5, 3), np.float32))
    w = dev.asarray(np.zeros((4, 5), np.float32))
    a = dev.asarray(np.zeros((4, 4), np.float32))
    assert_raises_each(
        (ValueError, r"x must have shape \(5, N\)",
         lambda: ops.fc_forward(dev, dev.asarray(np.zeros((6, 3), np.float32)), w)),
        (ValueError, r"bias must have shape \(4\)",
         lambda: ops.fc_forward(dev, x, w, dev.asarray(np.zeros(5, np.float32)))),
        (ValueError, "dy must have shape", lambda: ops.fc_backward_data(dev, x, w)),
        (ValueError, "same number of images",
         lambda: ops.fc_backward_weights(dev, x, dev.asarray(np.zeros((4, 2), np.float32)))),
        (ValueError, "out must have shape",
         lambda: ops.fc_forward(dev, x, w, out=dev.asarray(np.zeros((3, 4), np.float32)))),
        (TypeError, "alpha", lambda: ops.fc_forward(dev, x, w, alpha="1")),
        (ValueError, "out must not overlap x",
         lambda: ops.fc_forward(dev, a, dev.asarray(np.zeros((4, 4), np.float32)), out=a)),
    )


@pytest.mark.sanitize
def test_beta_without_out_does_not_read_a_new_buffer(kernel_device):
    """beta scales the caller's ``out``; with no ``out`` there is nothing to accumulate into (regression: a freshly
    allocated output's garbage used to be scaled in)."""
    rng = np.random.default_rng(0)
    host = {"x": rng.uniform(-1, 1, (2, 7, 6, 5)).astype(np.float32),
            "w": rng.uniform(-1, 1, (2, 3, 3, 4)).astype(np.float32),
            "a": rng.uniform(-1, 1, (6, 5)).astype(np.float32), "m": rng.uniform(-1, 1, (3, 6)).astype(np.float32)}
    d = {k: kernel_device.asarray(v) for k, v in host.items()}
    calls = [
        (lambda dev, a, **k: ops.conv_forward(dev, a["x"], a["w"], padding=1, **k)),
        (lambda dev, a, **k: ops.conv_backward_bias(dev, a["x"], **k)),
        (lambda dev, a, **k: ops.fc_forward(dev, a["a"], a["m"], **k)),
        (lambda dev, a, **k: ops.fc_backward_bias(dev, a["a"], **k)),
    ]
    for call in calls:
        want = 2.0 * call("numpy", host)
        for _ in range(2):  # a reused allocation would hold the previous result
            got = call(kernel_device, d, alpha=2.0, beta=0.5)
            np.testing.assert_allclose(kernel_device.to_numpy(got), want, rtol=1e-5, atol=1e-5)
