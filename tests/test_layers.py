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
    with pytest.raises(LayerError, match=r"layer 'f': neuron 'tanh': tanh takes 2 parameters"):
        FC("f", "x", outputs=2, neuron="tanh")
    with pytest.raises(LayerError, match=r"layer 'f': unknown neuron 'swish' \(known: relu, tanh\[a,b\]"):
        FC("f", "x", outputs=2, neuron="swish")
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


@pytest.mark.parametrize("kind", ["rnorm", "cnorm"])
def test_same_map_norm_layers_call_their_ops_with_cuda_convnet_keys(kind):
    """scale, pow, minDiv are the ops' alpha, beta, k (the op divides alpha by the window's area)."""
    from convnet import ops
    from convnet.layers import CNorm, RNorm
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 6, 5, 2)) * 2
    dy = rng.standard_normal(x.shape)
    cls = RNorm if kind == "rnorm" else CNorm
    layer = _setup(cls("n", "x", size=3, scale=2.0, pow=0.6, min_div=1.5), (3, 6, 5))
    assert layer.out_shape == (3, 6, 5)
    ctx = {}
    y = layer.forward(x, ctx)
    dx = layer.backward(dy, ctx)
    kw = dict(size=3, alpha=2.0, beta=0.6, k=1.5)
    fwd, bwd = getattr(ops, f"{kind}_forward"), getattr(ops, f"{kind}_backward")
    saved = fwd(DEV, x, **kw)
    np.testing.assert_array_equal(y, saved[0])
    np.testing.assert_array_equal(dx, bwd(DEV, x, *saved[1:], dy, **kw))
    assert layer.describe() == f"{kind} 3x3 scale=2 pow=0.6 minDiv=1.5"
    with pytest.raises(LayerError, match="needs an image input"):
        _setup(cls("n", "x", size=3, scale=1.0, pow=0.75), (10,))
    with pytest.raises(LayerError, match="minDiv must be > 0"):
        cls("n", "x", size=3, scale=1.0, pow=0.75, min_div=0.0)
def test_neuron_layer_and_fused_neurons_run_the_neuron_ops():
    from convnet import ops
    from convnet.layers import NeuronLayer
    rng = np.random.default_rng(4)
    x = rng.uniform(-2, 2, (3, 4, 4, 5))
    dy = rng.standard_normal(x.shape)
    for text in ("tanh[1.7,0.6]", "abs", "softrelu", "brelu[1.2]", "linear[2,-1]", "relu"):
        layer = _setup(NeuronLayer("n", "x", neuron=text), (3, 4, 4))
        ctx = {}
        y = layer.forward(x, ctx)
        np.testing.assert_array_equal(y, ops.neuron_forward(DEV, x, text))
        np.testing.assert_array_equal(layer.backward(dy, ctx), ops.neuron_backward(DEV, x, y, dy, text))
        assert layer.describe() == f"neuron {text}" and layer.flops() == 3 * 4 * 4
    ident = _setup(NeuronLayer("n", "x", neuron="ident"), (3, 4, 4))
    assert ident.forward(x, {}) is x and ident.backward(dy, {}) is dy and ident.flops() == 0
    conv = _setup(Conv("c", "x", filters=2, size=3, padding=1, init_w=0.5, neuron="logistic"), (3, 4, 4))
    ctx = {}
    pre = ops.conv_forward(DEV, x, conv.params["w"], conv.params["b"], padding=1)
    y = conv.forward(x, ctx)
    np.testing.assert_allclose(y, 1 / (1 + np.exp(-pre)), rtol=1e-14)
    g = rng.standard_normal(y.shape)
    conv.backward(g, ctx)
    np.testing.assert_allclose(conv.grads["b"], (g * y * (1 - y)).sum(axis=(1, 2, 3)), rtol=1e-12)
    assert conv.describe().endswith(" logistic")


def test_eltsum_and_eltmax_layers_split_the_joined_input():
    from convnet.layers import EltMax, EltSum
    rng = np.random.default_rng(5)
    a, b, c = (rng.standard_normal((2, 3, 3, 4)) for _ in range(3))
    joined = np.concatenate([a, b, c])  # what the graph hands a layer with three same-shaped inputs
    dy = rng.standard_normal(a.shape)
    s = _setup(EltSum("s", "a,b,c", coeffs=[0.5, -1, 2]), (6, 3, 3))
    np.testing.assert_allclose(s.forward(joined, {}), 0.5 * a - b + 2 * c, rtol=1e-14)
    np.testing.assert_allclose(s.backward(dy, {}), np.concatenate([0.5 * dy, -dy, 2 * dy]), rtol=1e-15)
    m = _setup(EltMax("m", "a,b,c"), (6, 3, 3))
    ctx = {}
    np.testing.assert_array_equal(m.forward(joined, ctx), np.maximum(np.maximum(a, b), c))
    which = np.argmax([a, b, c], axis=0)
    dx = m.backward(dy, ctx)
    for i in range(3):
        np.testing.assert_array_equal(dx[2 * i:2 * i + 2], np.where(which == i, dy, 0))
    assert EltSum("s", "a,b").coeffs == (1.0, 1.0)
    with pytest.raises(LayerError, match="layer 's': coeffs has 1 numbers for 2 inputs"):
        EltSum("s", "a,b", coeffs=[1])
    with pytest.raises(LayerError, match="layer 's': coeffs must be finite numbers"):
        EltSum("s", "a,b", coeffs=[1, float("nan")])
    with pytest.raises(LayerError, match="layer 'm': an eltmax layer joins at least 2 inputs, got 1"):
        EltMax("m", "a")
    with pytest.raises(LayerError, match=r"the inputs of an eltmax layer must have one shape, got a \(2, 3, 3\), "
                                         r"b \(4, 3, 3\)"):
        layer = EltMax("m", "a,b")
        layer.input_shapes = [(2, 3, 3), (4, 3, 3)]
        layer.output_shape((6, 3, 3))


@pytest.mark.parametrize("shared", [0, 1])
def test_local_layer_calls_its_ops_with_unshared_filters(shared):
    from convnet import ops
    from convnet.layers import Local
    rng = np.random.default_rng(3)
    layer = _setup(Local("l", "x", filters=4, size=3, stride=2, padding=1, groups=2, shared_biases=shared,
                         init_b=0.5), (6, 7, 5))
    assert layer.out_shape == (4, 4, 3)
    assert layer.param_shapes() == {"w": (12, 3, 3, 3, 4), "b": (4,) if shared else (4, 4, 3)}
    assert layer.params["w"].std() > 0 and (layer.params["b"] == 0.5).all()
    assert layer.param_count() == 12 * 27 * 4 + (4 if shared else 48)
    x = rng.standard_normal((6, 7, 5, 2))
    dy = rng.standard_normal((4, 4, 3, 2))
    ctx = {}
    y = layer.forward(x, ctx)
    dx = layer.backward(dy, ctx)
    kw = dict(stride=2, padding=1, groups=2)
    np.testing.assert_array_equal(y, ops.local_forward(DEV, x, layer.params["w"], layer.params["b"], **kw))
    np.testing.assert_array_equal(dx, ops.local_backward_data(DEV, dy, layer.params["w"], (7, 5), **kw))
    np.testing.assert_array_equal(layer.grads["w"], ops.local_backward_filter(DEV, x, dy, (3, 3), **kw))
    np.testing.assert_array_equal(layer.grads["b"], ops.local_backward_bias(DEV, dy, shared=bool(shared)))
    assert layer.describe() == "local 4 3x3/2 pad 1 groups 2" + (" shared biases" if shared else "")
    with pytest.raises(LayerError, match="sharedBiases must be 0 .per position. or 1"):
        Local("l", "x", filters=4, size=3, shared_biases=2)
    with pytest.raises(LayerError, match="not divisible by groups"):
        Local("l", "x", filters=5, size=3, groups=2)
    with pytest.raises(LayerError, match="larger than the padded input"):
        _setup(Local("l", "x", filters=4, size=9), (3, 5, 5))
