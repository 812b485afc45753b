"""Fully-connected layers: NumPy reference, then the op on every available device."""
import numpy as np

from convnet.reference import fc as ref
from _fd import check_grad


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
