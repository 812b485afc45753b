"""Layers: groups are towers (a grouped layer equals separate layers on channel halves), neurons, dropout,
FLOP counts, shape errors."""
import numpy as np
import pytest

from convnet.devices import Device
from convnet.graph import Net
from convnet.layers import FC, LRN, Conv, Data, Dropout, LayerError, Pool, SoftmaxCost

DEV = Device("numpy")


def _setup(layer, in_shape, seed=0):
    layer.device = DEV
    layer.in_shape = in_shape
    layer.out_shape = layer.output_shape(in_shape)
    if layer.learnable:
        layer.params = layer.init_params(np.random.default_rng(seed), np.float64)
    return layer


def test_grouped_conv_equals_two_towers():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 7, 7, 3))
    g = _setup(Conv("g", "x", filters=4, size=3, padding=1, groups=2, init_w=1.0, neuron="relu"), (6, 7, 7))
    g.params["b"] = rng.standard_normal(4)
    y = g.forward(x, {})
    for t in range(2):
        a = _setup(Conv("a", "x", filters=2, size=3, padding=1, init_w=1.0, neuron="relu"), (3, 7, 7))
        a.params = {"w": g.params["w"][..., 2 * t:2 * t + 2].copy(), "b": g.params["b"][2 * t:2 * t + 2].copy()}
        np.testing.assert_allclose(y[2 * t:2 * t + 2], a.forward(x[3 * t:3 * t + 3], {}), rtol=1e-12)


def test_grouped_lrn_window_stays_inside_each_tower():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((8, 3, 3, 2)) * 3
    g = _setup(LRN("g", "x", size=5, alpha=0.1, beta=0.75, k=2.0, groups=2), (8, 3, 3))
    one = _setup(LRN("o", "x", size=5, alpha=0.1, beta=0.75, k=2.0), (4, 3, 3))
    ctx = {}
    y = g.forward(x, ctx)
    np.testing.assert_allclose(y[:4], one.forward(x[:4], {}), rtol=1e-12)
    np.testing.assert_allclose(y[4:], one.forward(x[4:], {}), rtol=1e-12)
    full = _setup(LRN("f", "x", size=5, alpha=0.1, beta=0.75, k=2.0), (8, 3, 3)).forward(x, {})
    assert not np.allclose(full[3], y[3])  # without groups the window would cross the boundary
    dy = rng.standard_normal(x.shape)
    dx = g.backward(dy, ctx)
    c1 = {}
    one.forward(x[4:], c1)
    np.testing.assert_allclose(dx[4:], one.backward(dy[4:], c1), rtol=1e-12)


def test_dropout_train_and_test():
    d = _setup(Dropout("d", "x", keep=0.5), (1000,))
    x = np.ones((1000, 4))
    assert d.forward(x, {"train": False}) is x
    ctx = {"train": True, "seed": 7}
    y = d.forward(x, ctx)
    kept = y != 0
    assert 0.4 < kept.mean() < 0.6 and np.all(y[kept] == 2.0)
    assert np.array_equal(d.forward(x, {"train": True, "seed": 7}), y)  # the mask is a function of the seed
    assert not np.array_equal(d.forward(x, {"train": True, "seed": 8}), y)
    dx = d.backward(np.ones_like(x), ctx)
    assert np.array_equal(dx != 0, kept)  # the backward regenerates the same mask
    with pytest.raises(LayerError, match="keep must be in"):
        Dropout("d", "x", keep=0)


def test_flops_and_params_of_a_layer():
    c = _setup(Conv("c", "x", filters=8, size=3, stride=2, padding=1, groups=2), (4, 9, 9))
    assert c.out_shape == (8, 5, 5)
    assert c.param_count() == 2 * 3 * 3 * 8 + 8
    assert c.flops() == 2 * 8 * 25 * 2 * 9 + 8 * 25
    f = _setup(FC("f", "x", outputs=5), (2, 3, 3))
    assert f.param_count() == 5 * 18 + 5 and f.flops() == 2 * 5 * 18 + 5


def test_layer_shape_errors():
    with pytest.raises(LayerError, match="needs an image input"):
        _setup(Conv("c", "x", filters=2, size=3), (10,))
    with pytest.raises(LayerError, match="needs an image input"):
        _setup(Pool("p", "x"), (10,))
    with pytest.raises(LayerError, match=r"layer 'p': padding 2 along height must be <= window // 2"):
        _setup(Pool("p", "x", size=3, padding=2), (1, 9, 9))
    with pytest.raises(LayerError, match="pool must be 'max' or 'avg'"):
        Pool("p", "x", pool="min")
    with pytest.raises(LayerError, match="convention must be"):
        LRN("l", "x", convention="median")
    with pytest.raises(LayerError, match="layer 'f': neuron: unknown neuron 'sigmoid'"):
        FC("f", "x", outputs=2, neuron="sigmoid")
    with pytest.raises(LayerError, match=r"layer 'f': neuron: neuron tanh takes 2 parameter\(s\) tanh\[a,b\]"):
        FC("f", "x", outputs=2, neuron="tanh")
    with pytest.raises(LayerError, match="layer 'l': groups=3 must divide the number of channels 4"):
        _setup(LRN("l", "x", groups=3), (4, 2, 2))
    with pytest.raises(LayerError, match="softmax needs"):
        Net([Data("data", channels=1, size=4), Conv("c", "data", filters=2, size=3), SoftmaxCost("p", "c")])


def test_float_keys_must_be_finite_and_in_range():
    """A NaN scale, std or multiplier is refused (it would build a net that trains at chance level forever)."""
    from convnet.layers import FC, LRN, Data, LayerError, SoftmaxCost
    nan, inf = float("nan"), float("inf")
    for make, match in (
            (lambda: Data("d", channels=1, size=4, scale=nan), "scale must be a finite number"),
            (lambda: Data("d", channels=1, size=4, scale=0.0), "scale must be > 0"),
            (lambda: FC("f", "d", outputs=2, init_w=nan), "initW must be a finite number >= 0"),
            (lambda: FC("f", "d", outputs=2, init_w=inf), "initW must be a finite number >= 0"),
            (lambda: FC("f", "d", outputs=2, init_b=inf), "initB must be a finite number"),
            (lambda: FC("f", "d", outputs=2, lr_w=-1.0), "lrW must be >= 0"),
            (lambda: FC("f", "d", outputs=2, wd_b=nan), "wdB must be a finite number"),
            (lambda: FC("f", "d", outputs=2.5), "outputs must be an integer"),
            (lambda: FC("f", "d", outputs=2**31), "outputs must be < 2\\*\\*31"),
            (lambda: LRN("n", "d", k=0.0), "k must be > 0"),
            (lambda: LRN("n", "d", alpha=nan), "alpha must be a finite number"),
            (lambda: SoftmaxCost("p", "f", coeff=nan), "coeff must be a finite number")):
        with pytest.raises(LayerError, match=match):
            make()
