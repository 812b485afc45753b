"""The layer graph: finite-difference gradient check of a whole small network (float64, numpy), multi-input
joins, gradient summing, groups, and layers on different (virtual) devices."""
import numpy as np
import pytest

from convnet.devices import Device
from convnet.graph import Net
from convnet.layers import FC, LRN, Conv, Data, Dropout, LayerError, Pool, ReLU, SoftmaxCost
from convnet.model_file import build_net

# Two towers joined channel-wise, groups, LRN per group, a layer read by two consumers, a flattened join of an
# image and a vector, dropout, every layer type.
GRAD_NET = """
[data]
type = data
channels = 2
size = 9
[conv1a]
type = conv
inputs = data
filters = 4
size = 3
padding = 1
neuron = relu
initW = 0.4
initB = 0.1
[conv1b]
type = conv
inputs = data
filters = 4
size = 3
stride = 2
padding = 1
initW = 0.4
[relu1b]
type = relu
inputs = conv1b
[pool1a]
type = pool
inputs = conv1a
pool = max
size = 3
stride = 2
padding = 1
[join]
type = lrn
inputs = pool1a,relu1b
size = 3
alpha = 0.5
beta = 0.75
k = 2
groups = 2
[conv2]
type = conv
inputs = join
filters = 6
size = 3
padding = 1
groups = 2
neuron = relu
initW = 0.3
initB = 0.05
[pool2]
type = pool
inputs = conv2
pool = avg
size = 3
stride = 2
[fc3]
type = fc
inputs = pool2
outputs = 7
neuron = relu
initW = 0.3
initB = 0.1
[drop3]
type = dropout
inputs = fc3
keep = 0.7
[fc4]
type = fc
inputs = drop3,pool2,conv2
outputs = 5
initW = 0.2
[probs]
type = softmax
inputs = fc4
"""


def _net(dtype="float64", device="numpy", seed=3):
    net, _ = build_net(GRAD_NET, "grad-net", device=device, dtype=dtype, seed=seed)
    return net


def _batch(net, n=6, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((*net.data_layer.out_shape, n))
    y = rng.integers(0, net.num_classes, size=n).astype(np.int32)
    return x, y


def test_shapes_of_joins():
    net = _net()
    assert net.layers["pool1a"].out_shape == (4, 5, 5)
    assert net.layers["relu1b"].out_shape == (4, 5, 5)
    assert net.layers["join"].in_shape == (8, 5, 5)  # channel-wise join of two towers
    assert net.layers["conv2"].params["w"].shape == (4, 3, 3, 6)  # groups=2: 8/2 channels per group
    assert net.layers["fc4"].in_shape == (7 + 6 * 2 * 2 + 6 * 5 * 5,)  # flattened join


def test_whole_network_gradient_finite_differences():
    net = _net()
    x, y = _batch(net)
    step = 5  # fixed dropout masks

    def loss():
        net.forward(x, y, train=True, step=step)
        return float(net.loss) / x.shape[-1]

    net.forward(x, y, train=True, step=step)
    net.backward()
    analytic = {k: l.grads[p].copy() for k, l, p in net.param_items()}
    rng = np.random.default_rng(1)
    eps = 1e-6
    worst = 0.0
    checked = 0
    for key, layer, p in net.param_items():
        w = layer.params[p]
        flat = w.reshape(-1)
        idx = rng.choice(flat.size, size=min(flat.size, 16), replace=False)
        num = np.empty(len(idx))
        for j, i in enumerate(idx):
            old = flat[i]
            flat[i] = old + eps
            lp = loss()
            flat[i] = old - eps
            lm = loss()
            flat[i] = old
            num[j] = (lp - lm) / (2 * eps)
        an = analytic[key].reshape(-1)[idx]
        rel = np.linalg.norm(an - num) / max(np.linalg.norm(an) + np.linalg.norm(num), 1e-12)
        worst = max(worst, rel)
        checked += len(idx)
        assert rel < 1e-6, f"{key}: relative error {rel:.2e}\nanalytic {an}\nnumeric  {num}"
    assert checked > 100
    # the gradient is not trivially zero
    assert all(np.abs(g).max() > 0 for g in analytic.values())


def test_input_gradient_matches_finite_differences_through_the_towers():
    # make conv1a's input gradient observable: check d loss / d conv1a output via a perturbation of its bias
    net = _net()
    x, y = _batch(net, seed=4)
    net.forward(x, y, train=False)
    net.backward()
    g = net.layers["conv1b"].grads["b"].copy()
    b = net.layers["conv1b"].params["b"]
    num = np.empty_like(g)
    for i in range(len(b)):
        old = b[i]
        b[i] = old + 1e-6
        net.forward(x, y)
        lp = float(net.loss)
        b[i] = old - 1e-6
        net.forward(x, y)
        lm = float(net.loss)
        b[i] = old
        num[i] = (lp - lm) / 2e-6 / x.shape[-1]
    np.testing.assert_allclose(g, num, rtol=1e-5, atol=1e-9)


def test_virtual_devices_give_identical_results():
    """Layers on a second (virtual) device: the graph copies activations and gradients between devices."""
    a = _net()
    b = _net()
    for name in ("conv1b", "relu1b", "conv2", "fc4"):
        layer = b.layers[name]
        layer.device = Device("numpy", 1)
        layer.params = {k: layer.device.asarray(v) for k, v in layer.params.items()}  # its parameters move with it
    x, y = _batch(a)
    pa = a.forward(x, y, train=True, step=1)
    a.backward()
    pb = b.forward(x, y, train=True, step=1)
    b.backward()
    assert np.array_equal(pa, pb)
    for (k, la, p), (_, lb, _) in zip(a.param_items(), b.param_items()):
        assert np.array_equal(la.grads[p], lb.grads[p]), k


def test_python_api_builds_the_same_net_as_a_model_file():
    layers = [Data("data", channels=1, size=8),
              Conv("conv1", "data", filters=4, size=3, padding=1, init_w=0.1, neuron="relu"),
              Pool("pool1", "conv1", pool="max", size=2, stride=2),
              LRN("norm1", "pool1", size=3),
              FC("fc2", "norm1", outputs=6, init_w=0.1),
              ReLU("relu2", "fc2"),
              Dropout("drop2", "relu2", keep=0.5),
              FC("fc3", "drop2", outputs=3, init_w=0.1),
              SoftmaxCost("probs", "fc3")]
    net = Net(layers, device="numpy", seed=0)
    assert net.layers["fc3"].out_shape == (3,)
    assert net.num_params() == (4 * 9 + 4) + (6 * 64 + 6) + (3 * 6 + 3)
    x = np.random.default_rng(0).standard_normal((1, 8, 8, 5)).astype(np.float32)
    p = net.forward(x)
    assert p.shape == (3, 5) and p.dtype == np.float32
    np.testing.assert_allclose(p.sum(axis=0), 1, rtol=1e-5)


def test_graph_errors():
    d = Data("data", channels=1, size=8)
    with pytest.raises(LayerError, match="input 'nope' is not defined"):
        Net([d, FC("fc", "nope", outputs=2), SoftmaxCost("p", "fc")])
    with pytest.raises(LayerError, match="duplicate layer name 'fc'"):
        Net([d, FC("fc", "data", outputs=2), FC("fc", "data", outputs=2), SoftmaxCost("p", "fc")])
    with pytest.raises(LayerError, match="softmax"):
        Net([d, FC("fc", "data", outputs=2)])
    with pytest.raises(LayerError, match="feeds nothing"):
        Net([d, FC("fc", "data", outputs=2), FC("dead", "data", outputs=2), SoftmaxCost("p", "fc")])
    with pytest.raises(LayerError, match=r"layer 'c': filter 11x11 is larger than the padded input 8x8"):
        Net([d, Conv("c", "data", filters=2, size=11), FC("fc", "c", outputs=2), SoftmaxCost("p", "fc")])
    with pytest.raises(LayerError, match="layer 'c': groups=2 must divide the number of input channels 1"):
        Net([d, Conv("c", "data", filters=2, size=3, groups=2), FC("fc", "c", outputs=2), SoftmaxCost("p", "fc")])
    net = Net([d, FC("fc", "data", outputs=2), SoftmaxCost("p", "fc")])
    with pytest.raises(ValueError, match="data layer expects"):
        net.forward(np.zeros((1, 9, 9, 2), np.float32))
    with pytest.raises(RuntimeError, match="forward"):
        net.backward()


NORM_NET = """
[data]
type = data
channels = 2
size = 7
[conv]
type = conv
inputs = data
filters = 3
size = 3
padding = 1
initW = 0.5
initB = 0.1
[rnorm]
type = rnorm
inputs = conv
size = 3
scale = 4
pow = 0.75
[cnorm]
type = cnorm
inputs = rnorm
sizeX = 4
scale = 3
pow = 0.6
minDiv = 1.5
[fc]
type = fc
inputs = cnorm
outputs = 4
initW = 0.3
[probs]
type = softmax
inputs = fc
"""


def test_same_map_and_contrast_norm_gradients_through_a_net():
    """Finite differences (float64) of the loss through rnorm and cnorm layers, for every parameter (the conv's
    weights and biases are reached through every gradient of the two layers)."""
    net, _ = build_net(NORM_NET, "norm-net", device="numpy", dtype="float64", seed=2)
    x, y = _batch(net, n=3, seed=5)
    _param_gradients_match_finite_differences(net, x, y)


# Every neuron kind a layer file writes (fused into conv/fc and as layers), eltsum with coefficients and eltmax.
NEURON_NET = """
[data]
type = data
channels = 2
size = 7
[conv1]
type = conv
inputs = data
filters = 3
size = 3
padding = 1
neuron = tanh[1.5,0.7]
initW = 0.4
initB = 0.1
[conv2]
type = conv
inputs = data
filters = 3
size = 3
padding = 1
neuron = softrelu
initW = 0.4
[n1]
type = neuron
inputs = conv1
neuron = logistic
[n2]
type = neuron
inputs = conv2
neuron = brelu[0.9]
[sum]
type = eltsum
inputs = n1,n2
coeffs = 0.5,-1.5
[max]
type = eltmax
inputs = conv1,n2,conv2
[abs]
type = neuron
inputs = sum
neuron = abs
[sq]
type = neuron
inputs = max
neuron = square
[fc3]
type = fc
inputs = abs,sq
outputs = 6
neuron = linear[2,0.1]
initW = 0.2
[probs]
type = softmax
inputs = fc3
"""


def _param_gradients_match_finite_differences(net, x, y, *, rel=1e-6):
    def loss():
        net.forward(x, y, train=True)
        return float(net.loss) / x.shape[-1]

    net.forward(x, y, train=True)
    net.backward()
    rng = np.random.default_rng(1)
    for key, layer, p in net.param_items():
        flat = layer.params[p].reshape(-1)
        idx = rng.choice(flat.size, size=min(flat.size, 12), replace=False)
        an = layer.grads[p].reshape(-1)[idx].copy()
        num = np.empty(len(idx))
        for j, i in enumerate(idx):
            old = flat[i]
            flat[i] = old + 1e-6
            lp = loss()
            flat[i] = old - 1e-6
            lm = loss()
            flat[i] = old
            num[j] = (lp - lm) / 2e-6
        err = np.linalg.norm(an - num) / max(np.linalg.norm(an) + np.linalg.norm(num), 1e-12)
        assert err < rel, f"{key}: relative error {err:.2e}\nanalytic {an}\nnumeric  {num}"
        assert np.abs(an).max() > 0, f"{key}: zero gradient"


def test_neurons_and_joins_gradient_finite_differences():
    net, _ = build_net(NEURON_NET, "neuron-net", device="numpy", dtype="float64", seed=2)
    assert net.layers["max"].out_shape == (3, 7, 7) and net.layers["fc3"].in_shape == (6, 7, 7)
    x, y = _batch(net, n=5)
    _param_gradients_match_finite_differences(net, x, y)


@pytest.mark.parametrize("device", ["cpu", "emu"])
def test_neurons_and_joins_net_matches_numpy_on_other_devices(device):
    ref_net, _ = build_net(NEURON_NET, "neuron-net", device="numpy", dtype="float32", seed=4)
    net, _ = build_net(NEURON_NET, "neuron-net", device=device, dtype="float32", seed=4)
    x, y = _batch(ref_net, n=5)
    x = x.astype(np.float32)
    want = ref_net.forward(x, y, train=True)
    ref_net.backward()
    got = net.forward(net.data_layer.device.asarray(x), net.data_layer.device.asarray(y), train=True)
    net.backward()
    dev = net.data_layer.device
    np.testing.assert_allclose(dev.to_numpy(got), want, rtol=1e-4, atol=1e-6)
    for (key, layer, p), (_, ref_layer, _) in zip(net.param_items(), ref_net.param_items()):
        np.testing.assert_allclose(dev.to_numpy(layer.grads[p]), ref_layer.grads[p], rtol=1e-3, atol=1e-5,
                                   err_msg=key)


LOCAL_NET = """
[data]
type = data
channels = 2
size = 7
[local1]
type = local
inputs = data
filters = 4
size = 3
stride = 2
padding = 1
groups = 2
initW = 0.5
initB = 0.1
neuron = relu
[local2]
type = local
inputs = local1
filters = 3
size = 2
sharedBiases = 1
initW = 0.5
initB = 0.2
[fc]
type = fc
inputs = local2
outputs = 4
initW = 0.3
[probs]
type = softmax
inputs = fc
"""


def test_locally_connected_gradients_through_a_net():
    """Finite differences (float64) of the loss for both local layers' filters and biases (per position in the
    first, shared in the second), through the second's input gradient."""
    net, _ = build_net(LOCAL_NET, "local-net", device="numpy", dtype="float64", seed=3)
    assert net.layers["local1"].params["b"].shape == (4, 4, 4)
    assert net.layers["local2"].params["b"].shape == (3,)
    x, y = _batch(net, n=3, seed=6)
    _param_gradients_match_finite_differences(net, x, y)


RELU_POOL_NET = """
[data]
type = data
channels = 2
size = 11
[conv1]
type = conv
inputs = data
filters = 4
size = 3
padding = 1
neuron = relu
initW = 0.5
[pool1]
type = pool
inputs = conv1
size = 3
stride = 2
[conv2]
type = conv
inputs = pool1
filters = 3
size = 3
padding = 1
neuron = relu
initW = 0.5
[pool2]
type = pool
inputs = conv2
size = 2
stride = 2
[relu3]
type = relu
inputs = pool2
[pool3]
type = pool
inputs = relu3
size = 2
stride = 1
[fc4]
type = fc
inputs = pool3,conv2
outputs = 5
initW = 0.2
[probs]
type = softmax
inputs = fc4
"""


@pytest.mark.parametrize("device,precision", [("numpy", "fp32"), ("cpu", "fp32"), ("emu", "fp32"), ("numpy", "bf16"),
                                              ("emu", "bf16")])
def test_relu_backward_fused_into_the_max_pool_gives_the_same_bits(device, precision, monkeypatch):
    """A ReLU output read only by a max pool: the pool applies the ReLU's mask (relu_input) and the producer skips
    its ReLU backward; a ReLU output with two readers (conv2: pool2 and fc4) keeps its own. The gradients are those
    of the unfused net, bit for bit (bf16: on the bfloat16 activations)."""
    net, _ = build_net(RELU_POOL_NET, "relu-pool", device=device, dtype="float32", seed=5, precision=precision)
    fused = {l.name: (l.relu_input, l.relu_grad_fused) for l in net.order}
    assert fused["pool1"] == (True, False) and fused["conv1"] == (False, True)
    assert fused["pool3"] == (True, False) and fused["relu3"] == (False, True)
    assert fused["pool2"] == fused["conv2"] == (False, False)
    monkeypatch.setattr(Net, "_fuse_relu_backward", lambda self: None)  # layers start unfused
    plain, _ = build_net(RELU_POOL_NET, "relu-pool", device=device, dtype="float32", seed=5, precision=precision)
    assert not any(l.relu_input or l.relu_grad_fused for l in plain.order)
    x, y = _batch(net, n=7)
    dev = net.data_layer.device
    for n in (net, plain):
        n.forward(dev.asarray(x.astype(np.float32)), dev.asarray(y), train=True)
        n.backward()
    for (key, layer, p), (_, other, _) in zip(net.param_items(), plain.param_items()):
        got, want = dev.to_numpy(layer.grads[p]), dev.to_numpy(other.grads[p])
        assert got.any(), key
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32), err_msg=key)
