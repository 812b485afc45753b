"""cuda-convnet's and cuda-convnet2's own layer files (tests/data/cuda-convnet/) load with their authors' meaning:
parameter counts and every layer's shape by cuda-convnet's rules, the learning-rate rules, the rounding-up output
size computed as cuda-convnet computes it, one-line errors for what is not implemented, and training on the cpu."""
import math
import re

import numpy as np
import pytest

from convnet.devices import Device
from convnet.layers import Conv, Dropout, LayerError, Local, Pool, RateSchedule, rate_schedule
from convnet.neurons import NEURONS, Neuron
from convnet.model_file import ModelFileError, build_net, load_model, resolve_model
from convnet.optim import SGD
from helpers import ROOT, check_grad

DATA = ROOT / "tests" / "data" / "cuda-convnet"
CC1, CC2 = DATA / "cuda-convnet", DATA / "cuda-convnet2"
NUMPY = Device("numpy")


def pair(folder, name):
    return str(folder / f"layers-{name}.cfg"), str(folder / f"layer-params-{name}.cfg")


def load(folder, name, shape=(3, 32, 32), **kw):
    layers, params = pair(folder, name)
    kw.setdefault("init_params", False)
    return load_model(layers, params=params, input_shape=shape, device=kw.pop("device", "numpy"), **kw)[0]


def shapes(net):
    return {name: tuple(l.out_shape) for name, l in net.layers.items()}


# ---------------------------------------------------------------------------------------------- counts, shapes
def test_layers_80sec_parameters_and_shapes():
    net = load(CC1, "80sec")
    assert sum(l.param_count() for l in net.order) == 145_578
    # cuda-convnet: conv 1 + ceil((32 + 4 - 5) / 1) = 32; pool ceil((32 - 0 - 3) / 2) + 1 = 16 -> 8 -> 4
    assert shapes(net) == {"data": (3, 32, 32), "conv1": (32, 32, 32), "pool1": (32, 16, 16),
                           "pool1_neuron": (32, 16, 16), "conv2": (32, 16, 16), "pool2": (32, 8, 8),
                           "conv3": (64, 8, 8), "pool3": (64, 4, 4), "fc64": (64,), "fc10": (10,), "probs": (10,)}
    assert [net.layers[n].neuron for n in ("conv1", "conv2", "conv3", "fc64", "fc10")] == \
        [None, "relu", "relu", "relu", None]
    assert net.layers["pool1_neuron"].type == "neuron" and net.layers["pool1_neuron"].neuron == Neuron("relu")
    assert net.layers["conv2"].inputs == ["pool1_neuron"]
    assert net.layers["probs"].type == "softmax" and net.layers["probs"].coeff == 1.0
    assert [net.layers[n].pool for n in ("pool1", "pool2", "pool3")] == ["max", "avg", "avg"]


def test_layers_18pct_parameters_shapes_and_its_same_map_rnorm():
    net = load(CC1, "18pct")
    assert sum(l.param_count() for l in net.order) == 89_578  # 2,432 + 25,632 + 51,264 + 64*4*4*10 + 10
    s = shapes(net)
    assert s["pool1"] == s["rnorm1"] == (32, 16, 16) and s["rnorm2"] == (32, 8, 8) and s["pool3"] == (64, 4, 4)
    for name in ("rnorm1", "rnorm2"):
        r = net.layers[name]  # cuda-convnet's rnorm: same-map, scale divided by size**2 in the op
        assert (r.type, r.size, r.scale, r.pow, r.min_div, r.in_channels) == ("rnorm", 3, 5e-5, 0.75, 1.0, 32)
    assert net.layers["conv2"].inputs == ["rnorm1"] and net.layers["conv3"].inputs == ["rnorm2"]


def test_cuda_convnet2_imagenet_1gpu_at_224():
    net = load(CC2, "imagenet-1gpu", (3, 224, 224))
    assert sum(l.param_count() for l in net.order) == 61_100_840
    s = shapes(net)
    # conv1: 1 + ceil((224 - 11) / 4) = 55 (the floor rule would give 54); pools ceil: 55 -> 27 -> 13 -> 6
    assert s["conv1"] == (64, 55, 55) and s["pool1"] == (64, 27, 27) and s["conv2"] == (192, 27, 27)
    assert s["pool2"] == (192, 13, 13) and s["conv5"] == (256, 13, 13) and s["pool3"] == (256, 6, 6)
    assert s["fc4096a"] == (4096,) and s["fc1000"] == (1000,) and s["probs"] == (1000,)
    lrn = net.layers["rnorm1"]  # cmrnorm: scale / size, pow, minDiv
    assert (lrn.type, lrn.size, lrn.alpha, lrn.beta, lrn.k, lrn.convention) == ("lrn", 5, 1e-4, 0.75, 2.0, "mean")
    d = net.layers["dropout1"]
    assert (d.type, d.keep, d.scaling) == ("dropout", 0.5, "test")  # dropout2: scaled at test time
    assert "labvec" not in net.layers and "logprob" not in net.layers


@pytest.mark.parametrize("folder, name, count, local3", [(CC1, "conv-local-11pct", 3_672_906, 64),
                                                          (CC1, "conv-local-13pct", 1_901_386, 32),
                                                          (CC2, "cifar10-11pct", 3_672_906, 64)])
def test_conv_local_nets_parameters_shapes_and_local_layers(folder, name, count, local3):
    net = load(folder, name)
    # conv 5x5 pad 2 keeps 32; pools round up: ceil((32 - 3) / 2) + 1 = 16 -> 8; the local layers 3x3 pad 1 keep 8
    # local: w = positions * C*3*3 * F and a bias per filter and position (cuda-convnet's unshared layers)
    hand = (3 * 25 * 64 + 64) + (64 * 25 * 64 + 64) + 64 * (64 * 9 * local3 + local3) \
        + 64 * (local3 * 9 * 32 + 32) + (32 * 64 * 10 + 10)
    assert sum(l.param_count() for l in net.order) == count == hand
    s = shapes(net)
    assert s["conv1"] == (64, 32, 32) and s["pool1"] == (64, 16, 16) and s["conv2"] == (64, 16, 16)
    assert s["pool2"] == (64, 8, 8) and s["local3"] == (local3, 8, 8) and s["local4"] == (32, 8, 8)
    assert s["fc10"] == (10,) and s["probs"] == (10,)
    for n, c, f in (("local3", 64, local3), ("local4", local3, 32)):
        l = net.layers[n]
        assert (l.type, l.size, l.stride, l.padding, l.shared_biases, l.rounding) == \
            ("local", (3, 3), (1, 1), (1, 1), 0, "up")
        assert l.param_shapes() == {"w": (64, c, 3, 3, f), "b": (f, 8, 8)}
        assert l.neuron == Neuron("relu") and l.init_w == 0.04
        assert l.lr_abs == {"w": 0.001, "b": 0.002} and l.momentum == {"w": 0.9, "b": 0.9} and l.wc == 0.004
    assert net.layers["local3"].inputs == ["pool2"] and net.layers["fc10"].inputs == ["local4"]


def test_a_local_sections_shared_biases_key_is_cuda_convnets_a_bias_per_position(tmp_path):
    """cuda-convnet reads sharedBiases for conv layers only: its local layers keep a bias per filter and position."""
    for v in ("0", "1"):
        a, b = _files(tmp_path, BASE_LAYERS.replace("type=conv", "type=local").replace("sharedBiases=1",
                                                                                       f"sharedBiases={v}"))
        net = load_model(a, params=b, input_shape=(3, 12, 12), init_params=False)[0]
        assert net.layers["conv1"].type == "local" and net.layers["conv1"].param_shapes()["b"] == (16, 12, 12)
    a, b = _files(tmp_path, BASE_LAYERS.replace("type=conv", "type=local").replace("sharedBiases=1",
                                                                                   "sharedBiases=maybe"))
    with pytest.raises(ModelFileError, match=r"\[conv1\] sharedbiases: cannot read 'maybe'"):
        load_model(a, params=b, input_shape=(3, 12, 12), init_params=False)
    a, b = _files(tmp_path, BASE_LAYERS.replace("type=conv", "type=local").replace("channels=3", "channels=4"))
    with pytest.raises(ModelFileError, match=r"layer 'conv1': channels = 4, but its input has 3 channels"):
        load_model(a, params=b, input_shape=(3, 12, 12), init_params=False)


# ---------------------------------------------------------------------------------------------- learning rates
def test_absolute_per_layer_rates_momenta_and_decays():
    net = load(CC1, "80sec", init_params=True)
    opt = SGD(net, lr=0.01, momentum=0.5, weight_decay=0.1)
    conv1, fc64 = net.layers["conv1"], net.layers["fc64"]
    assert opt.settings(conv1, "w") == (0.001, 0.9, 0.004)
    assert opt.settings(conv1, "b") == (0.002, 0.9, 0.0)  # cuda-convnet decays weights, not biases
    assert opt.settings(fc64, "w") == (0.001, 0.9, 0.03)
    opt.lr = 0.001  # a step schedule's drop by 10 scales the absolute rates with it
    assert opt.settings(conv1, "w")[0] == pytest.approx(0.0001, rel=1e-12)
    # a layer without them follows the run's settings
    own, _ = build_net(TINY, "tiny.cfg", device="numpy")
    opt = SGD(own, lr=0.01, momentum=0.5, weight_decay=0.1)
    assert opt.settings(own.layers["fc"], "w") == (0.01, 0.5, 0.1)
    assert opt.settings(own.layers["fc"], "b") == (0.01, 0.5, 0.0)


def test_cuda_convnet2_schedules():
    s = rate_schedule("epsW", "dexp[base=0.01;tgtFactor=250;numSteps=4]")
    assert s == RateSchedule("dexp", 0.01, 250.0, 4)
    want = [0.01, 0.01 * 250 ** (-1 / 3), 0.01 * 250 ** (-2 / 3), 0.01 / 250]  # cuda-convnet2's lr.cu
    for progress, i in ((0.0, 0), (0.25, 0), (0.26, 1), (0.5, 1), (0.74, 2), (0.76, 3), (1.0, 3)):
        assert s.value(progress) == pytest.approx(want[i], rel=1e-12)
    assert rate_schedule("e", "linear[base=1;tgtFactor=4]").value(0.5) == pytest.approx(0.625)
    assert rate_schedule("e", "exp[base=1;tgtFactor=4]").value(0.5) == pytest.approx(0.5)
    assert rate_schedule("e", "const[base=0.3]").value(0.9) == 0.3
    assert rate_schedule("e", "0.25") == 0.25
    for bad, match in (("dexp[base=0.01;tgtFactor=250]", "takes base;tgtFactor;numSteps"),
                       ("cosine[base=1]", "unknown schedule"), ("exp[base=x;tgtFactor=2]", "must be a number"),
                       ("-1", "must be a finite number >= 0"), ("exp[base=1;tgtFactor=0]", "tgtFactor > 0")):
        with pytest.raises(ValueError, match=match):
            rate_schedule("epsW", bad)
    net = load(CC2, "imagenet-1gpu", (3, 224, 224))
    net_layer = net.layers["conv2"]
    assert net_layer.lr_abs["w"] == s and net_layer.momentum == {"w": 0.9, "b": 0.9} and net_layer.wc == 0.0005


def test_one_sgd_step_applies_cuda_convnets_update():
    """v = mom v - wc eps w - eps g; w += v (cuda-convnet's Weights::update), with the layer's own settings."""
    net = load(CC1, "80sec", init_params=True, seed=3)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 32, 32, 8)).astype(np.float32) * 50
    y = rng.integers(0, 10, 8).astype(np.int32)
    before = {k: np.array(l.params[p], np.float64) for k, l, p in net.param_items()}
    net.forward(x, y, train=True)
    net.backward()
    grads = {k: np.array(l.grads[p], np.float64) for k, l, p in net.param_items()}
    opt = SGD(net, lr=0.5, momentum=0.0, weight_decay=0.0)
    opt.step()
    for key, eps, wc in (("conv1/w", 0.001, 0.004), ("conv1/b", 0.002, 0.0), ("fc64/w", 0.001, 0.03),
                         ("fc10/b", 0.002, 0.0)):
        layer, p = net.layers[key.split("/")[0]], key.split("/")[1]
        want = before[key] - wc * eps * before[key] - eps * grads[key]
        np.testing.assert_allclose(layer.params[p], want, rtol=1e-5, atol=1e-9, err_msg=key)
        assert not np.allclose(grads[key], 0)


def test_absolute_and_multiplier_keys_are_exclusive():
    with pytest.raises(ModelFileError, match=r"\[fc\]: layer 'fc': give epsW \(absolute\) or lrW"):
        build_net(TINY.replace("outputs = 3", "outputs = 3\nepsW = 0.1\nlrW = 2"), "tiny.cfg")


# ---------------------------------------------------------------------------------------------- rounding up
def cc_pool(x, mode, k, s, start, count):
    """cuda-convnet's pooling, written out: window (i, j) covers rows/columns [start + i*s, start + i*s + k)
    clipped to the image; avg divides by the pixels inside."""
    C, H, W, N = x.shape
    y = np.zeros((C, count, count, N), x.dtype)
    for i in range(count):
        for j in range(count):
            r = [a for a in range(start + i * s, start + i * s + k) if 0 <= a < H]
            c = [b for b in range(start + j * s, start + j * s + k) if 0 <= b < W]
            win = x[:, r][:, :, c]
            y[:, i, j] = win.max(axis=(1, 2)) if mode == "max" else win.mean(axis=(1, 2))
    return y


def cc_conv(x, w, b, stride, pad):
    """cuda-convnet's convolution: 1 + ceil((H + 2 pad - k) / stride) outputs, zeros outside the image."""
    C, H, W, N = x.shape
    _, k, _, F = w.shape
    n = 1 + math.ceil((H + 2 * pad - k) / stride)
    y = np.zeros((F, n, n, N), x.dtype)
    for i in range(n):
        for j in range(n):
            for a in range(k):
                for c in range(k):
                    r, q = i * stride - pad + a, j * stride - pad + c
                    if 0 <= r < H and 0 <= q < W:
                        y[:, i, j] += np.einsum("cf,cn->fn", w[:, a, c], x[:, r, q])
    return y + b[:, None, None, None]


POOL_CASES = [  # (mode, H, k, s, start, outputsX)
    ("max", 32, 3, 2, 0, 0), ("avg", 32, 3, 2, 0, 0), ("avg", 16, 3, 2, 0, 0), ("max", 7, 3, 3, 0, 0),
    ("avg", 9, 4, 3, -1, 0), ("max", 10, 3, 2, 1, 0), ("avg", 11, 5, 2, -2, 0), ("max", 13, 3, 2, 0, 4),
    ("avg", 6, 2, 2, 0, 0), ("max", 5, 5, 1, 0, 0),
]


def _layer(layer, in_shape, device, dtype, seed=0):
    layer.device = device
    layer.in_shape = in_shape
    layer.out_shape = layer.output_shape(in_shape)
    if layer.learnable:
        layer.params = {k: device.asarray(v, dtype) for k, v in
                        layer.init_params(np.random.default_rng(seed), dtype).items()}
    return layer


@pytest.mark.parametrize("mode, H, k, s, start, outputs_x", POOL_CASES)
def test_pool_rounding_up_is_cuda_convnets_and_its_gradient_is_exact(mode, H, k, s, start, outputs_x):
    rng = np.random.default_rng(H * 7 + k)
    x = rng.standard_normal((3, H, H, 5))
    count = outputs_x or math.ceil((H - start - k) / s) + 1
    make = lambda: Pool("p", "x", pool=mode, size=k, stride=s, rounding="up", start=start, outputs_x=outputs_x)
    p = _layer(make(), (3, H, H), NUMPY, np.float64)
    assert p.out_shape == (3, count, count)
    ctx = {}
    y = p.forward(x, ctx)
    np.testing.assert_allclose(y, cc_pool(x, mode, k, s, start, count), rtol=1e-13, atol=1e-13)
    dy = rng.standard_normal(y.shape)
    dx = p.backward(dy, ctx)
    check_grad(lambda v: float(np.sum(cc_pool(v, mode, k, s, start, count) * dy)), x, dx, n=40)
    for dev in (Device("cpu"), Device("emu")):  # the float32 devices agree with the float64 reference
        q = _layer(make(), (3, H, H), dev, np.float32)
        c = {}
        x32 = x.astype(np.float32)
        y32 = q.forward(dev.asarray(x32, np.float32), c)
        np.testing.assert_allclose(dev.to_numpy(y32), cc_pool(x32.astype(np.float64), mode, k, s, start, count),
                                   rtol=1e-5, atol=1e-6, err_msg=str(dev))
        dx32 = q.backward(dev.asarray(dy.astype(np.float32), np.float32), c)
        np.testing.assert_allclose(dev.to_numpy(dx32), dx, rtol=1e-4, atol=1e-5, err_msg=str(dev))


@pytest.mark.parametrize("H, k, stride, pad", [(224 // 8, 11, 4, 0), (9, 3, 2, 1), (10, 4, 3, 2), (7, 3, 1, 1),
                                               (12, 5, 4, 0)])
def test_conv_rounding_up_is_cuda_convnets_and_its_gradient_is_exact(H, k, stride, pad):
    rng = np.random.default_rng(H + k)
    x = rng.standard_normal((2, H, H, 3))
    make = lambda: Conv("c", "x", filters=4, size=k, stride=stride, padding=pad, rounding="up", init_w=0.5)
    c = _layer(make(), (2, H, H), NUMPY, np.float64)
    c.params["b"] = rng.standard_normal(4)
    ctx = {}
    y = c.forward(x, ctx)
    want = cc_conv(x, c.params["w"], c.params["b"], stride, pad)
    assert y.shape == want.shape and c.out_shape == want.shape[:3]
    np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-12)
    dy = rng.standard_normal(y.shape)
    dx = c.backward(dy, ctx)
    w0 = c.params["w"].copy()
    check_grad(lambda v: float(np.sum(cc_conv(v, w0, c.params["b"], stride, pad) * dy)), x, dx, n=40)
    check_grad(lambda v: float(np.sum(cc_conv(x, v, c.params["b"], stride, pad) * dy)), w0, c.grads["w"], n=40)
    for dev in (Device("cpu"), Device("emu")):
        q = _layer(make(), (2, H, H), dev, np.float32)
        q.params = {"w": dev.asarray(w0.astype(np.float32), np.float32),
                    "b": dev.asarray(c.params["b"].astype(np.float32), np.float32)}
        cx = {}
        y32 = q.forward(dev.asarray(x.astype(np.float32), np.float32), cx)
        np.testing.assert_allclose(dev.to_numpy(y32), want, rtol=1e-4, atol=1e-4, err_msg=str(dev))
        dx32 = q.backward(dev.asarray(dy.astype(np.float32), np.float32), cx)
        np.testing.assert_allclose(dev.to_numpy(dx32), dx, rtol=1e-4, atol=1e-4, err_msg=str(dev))


def cc_local(x, w, b, stride, pad):
    """cuda-convnet's locally connected layer: conv's output count and zeros outside the image, a filter bank
    ``w[position]`` (C, k, k, F) and a bias ``b[:, i, j]`` per output position."""
    C, H, W, N = x.shape
    k, F = w.shape[2], w.shape[-1]
    n = 1 + math.ceil((H + 2 * pad - k) / stride)
    y = np.zeros((F, n, n, N), x.dtype)
    for i in range(n):
        for j in range(n):
            for a in range(k):
                for c in range(k):
                    r, q = i * stride - pad + a, j * stride - pad + c
                    if 0 <= r < H and 0 <= q < W:
                        y[:, i, j] += np.einsum("cf,cn->fn", w[i * n + j, :, a, c], x[:, r, q])
    return y + b[:, :, :, None]


@pytest.mark.parametrize("H, k, stride, pad", [(9, 3, 2, 1), (10, 4, 3, 2), (7, 3, 1, 1), (8, 5, 4, 0), (6, 2, 3, 0)])
def test_local_rounding_up_is_cuda_convnets_and_its_gradient_is_exact(H, k, stride, pad):
    rng = np.random.default_rng(H * 3 + k)
    x = rng.standard_normal((2, H, H, 3))
    make = lambda: Local("l", "x", filters=3, size=k, stride=stride, padding=pad, rounding="up", init_w=0.5)
    c = _layer(make(), (2, H, H), NUMPY, np.float64)
    c.params["b"] = rng.standard_normal(c.params["b"].shape)
    ctx = {}
    y = c.forward(x, ctx)
    w0, b0 = c.params["w"].copy(), c.params["b"].copy()
    want = cc_local(x, w0, b0, stride, pad)
    assert y.shape == want.shape and c.out_shape == want.shape[:3]
    np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-12)
    dy = rng.standard_normal(y.shape)
    dx = c.backward(dy, ctx)
    assert dx.shape == x.shape
    check_grad(lambda v: float(np.sum(cc_local(v, w0, b0, stride, pad) * dy)), x, dx, n=40)
    check_grad(lambda v: float(np.sum(cc_local(x, v, b0, stride, pad) * dy)), w0, c.grads["w"], n=40)
    np.testing.assert_allclose(c.grads["b"], dy.sum(axis=3), rtol=1e-12, atol=1e-12)
    for dev in (Device("cpu"), Device("emu")):
        q = _layer(make(), (2, H, H), dev, np.float32)
        q.params = {"w": dev.asarray(w0.astype(np.float32), np.float32),
                    "b": dev.asarray(b0.astype(np.float32), np.float32)}
        cx = {}
        y32 = q.forward(dev.asarray(x.astype(np.float32), np.float32), cx)
        np.testing.assert_allclose(dev.to_numpy(y32), want, rtol=1e-4, atol=1e-4, err_msg=str(dev))
        dx32 = q.backward(dev.asarray(dy.astype(np.float32), np.float32), cx)
        np.testing.assert_allclose(dev.to_numpy(dx32), dx, rtol=1e-4, atol=1e-4, err_msg=str(dev))
        np.testing.assert_allclose(dev.to_numpy(q.grads["w"]), c.grads["w"], rtol=1e-4, atol=1e-4, err_msg=str(dev))


def test_pool_rule_keys_are_checked():
    with pytest.raises(LayerError, match="start and outputsX belong to cuda-convnet's output-size rule"):
        Pool("p", "x", start=1)
    with pytest.raises(LayerError, match="with rounding = up the windows begin at start"):
        Pool("p", "x", rounding="up", padding=1)
    p = Pool("p", "x", size=3, stride=2, rounding="up", start=4)
    p.device = NUMPY
    with pytest.raises(LayerError, match="do not each overlap"):
        p.output_shape((1, 5, 5))


def test_dropout2_scales_at_test_time():
    d = _layer(Dropout("d", "x", keep=0.25, scaling="test"), (400,), NUMPY, np.float64)
    x = np.ones((400, 4))
    np.testing.assert_array_equal(d.forward(x, {"train": False}), x * 0.25)
    ctx = {"train": True, "seed": 3}
    y = d.forward(x, ctx)
    assert set(np.unique(y)) == {0.0, 1.0}  # kept units unscaled in training
    np.testing.assert_array_equal(d.backward(np.full_like(x, 2.0), ctx), 2.0 * y)


# ---------------------------------------------------------------------------------------------- errors
BASE_LAYERS = """[data]
type=data
dataIdx=0

[labels]
type=data
dataIdx=1

[conv1]
type=conv
inputs=data
channels=3
filters=16
padding=2
stride=1
filterSize=5
sharedBiases=1
partialSum=4

[pool1]
type=pool
pool=max
inputs=conv1
sizeX=3
stride=2
channels=16

[fc10]
type=fc
outputs=10
inputs=pool1

[probs]
type=softmax
inputs=fc10

[logprob]
type=cost.logreg
inputs=labels,probs
"""
BASE_PARAMS = """[conv1]
epsW=0.001
epsB=0.002
momW=0.9
momB=0.9
wc=0.004

[fc10]
epsW=0.001
epsB=0.002
momW=0.9
momB=0.9
wc=0.01

[logprob]
coeff=1
"""


def _files(tmp_path, layers=BASE_LAYERS, params=BASE_PARAMS):
    a, b = tmp_path / "layers-t.cfg", tmp_path / "layer-params-t.cfg"
    a.write_text(layers)
    b.write_text(params)
    return str(a), str(b)


def test_a_pair_merges_by_section_and_the_merged_text_rebuilds_the_net(tmp_path):
    a, b = _files(tmp_path)
    text, source = resolve_model(a, b, (3, 12, 12))
    assert source == f"{a} + {b}" and "epsw = 0.001" in text
    net, _ = build_net(text, source, device="numpy")  # what a checkpoint stores and a resume rebuilds
    assert shapes(net) == {"data": (3, 12, 12), "conv1": (16, 12, 12), "pool1": (16, 6, 6), "fc10": (10,),
                           "probs": (10,)}
    assert net.layers["fc10"].wc == 0.01
    net2 = load_model(a, params=b, input_shape=(3, 12, 12), device="numpy")[0]
    for k, l, p in net.param_items():
        np.testing.assert_array_equal(l.params[p], net2.layers[l.name].params[p])


@pytest.mark.parametrize("layers_edit, params_edit, match", [
    (("type=conv", "type=blur"), None, r"\[conv1\] type: blur \(a Gaussian blur layer\) is not implemented"),
    (("type=conv", "type=convolution"), None, r"\[conv1\] type: unknown layer type 'convolution'"),
    (("partialSum=4", "randSparse=0"), None, r"\[conv1\] randsparse: not implemented for a cuda-convnet conv"),
    (("sharedBiases=1", "sharedBiases=0"), None, r"\[conv1\] sharedBiases: 0 \(a bias per filter and "),
    (("sharedBiases=1", "neuron=abstanh[1.7,0.66]"), None, r"\[conv1\]: layer 'conv1': unknown neuron 'abstanh"),
    (("sharedBiases=1", "neuron=tanh[1.7]"), None, r"\[conv1\]: layer 'conv1': neuron 'tanh\[1.7\]': tanh takes 2"),
    (("channels=16\n", "channels=16\nneuron=drelu[1]\n"), None, r"\[pool1\] neuron: unknown neuron 'drelu\[1\]' \(kn"),
    (("channels=16\n", "channels=16\nneuron=brelu[0]\n"), None, r"\[pool1\] neuron: neuron brelu\[a\] needs a > 0"),
    (("dataIdx=1", "dataIdx=2"), None, r"\[labels\] dataIdx: 2 \(a third data stream\) is not implemented"),
    (("inputs=fc10", "inputs=labels"), None, r"\[probs\] inputs: 'labels' is the labels data layer"),
    (("inputs=labels,probs", "inputs=probs"), None, r"\[logprob\] inputs: cost.logreg reads the labels"),
    (("channels=3", "channels=4"), None, r"cfg: layer 'conv1': channels = 4, but its input has 3 channels"),
    (None, ("[logprob]", "[logprobs]"), r"layer-params-t.cfg \[logprobs\]: no layer 'logprobs' in "),
    (None, ("wc=0.004", "wc=0.004\nfilters=8"), r"layer-params-t.cfg \[conv1\] filters: also given in "),
    (None, ("wc=0.004", "wc=0.004\nupdatePeriod=4"), r"\[conv1\] updatePeriod: 4 \(an update every 4 batches\)"),
    (None, ("wc=0.004", "wc=0.004\nwball=0.1"), r"\[conv1\] wball: 0.1 \(a norm constraint"),
    (None, ("epsW=0.001", "epsW=dexp[base=0.01]"), r"\[conv1\]: layer 'conv1': epsW: dexp\[...\] takes "),
])
def test_one_line_errors_name_the_file_section_and_key(tmp_path, layers_edit, params_edit, match):
    layers, params = BASE_LAYERS, BASE_PARAMS
    if layers_edit:
        assert layers_edit[0] in layers
        layers = layers.replace(*layers_edit, 1)
    if params_edit:
        assert params_edit[0] in params
        params = params.replace(*params_edit, 1)
    a, b = _files(tmp_path, layers, params)
    with pytest.raises(ModelFileError, match=match) as e:
        load_model(a, params=b, input_shape=(3, 12, 12), init_params=False)
    assert "\n" not in str(e.value) and "layers-t.cfg" in str(e.value)


def test_gpu_lists_towers_and_inheritance(tmp_path):
    """gpu=i is a tower, a layer without gpu= runs where its first input runs (cuda-convnet2), and one list for the
    whole net (cuda-convnet2's data parallelism) is one tower; lists next to single GPUs are refused."""
    a, b = _files(tmp_path, BASE_LAYERS.replace("partialSum=4", "gpu=1"))
    net = load_model(a, params=b, input_shape=(3, 12, 12), devices="numpy,numpy:1", init_params=False)[0]
    assert [net.layers[n].tower for n in ("conv1", "pool1", "fc10", "probs")] == [1, 1, 1, 1]
    a, b = _files(tmp_path, BASE_LAYERS.replace("partialSum=4", "gpu=0,1").replace("inputs=labels,probs",
                                                                                    "inputs=labels,probs\ngpu=0,1"))
    net = load_model(a, params=b, input_shape=(3, 12, 12), init_params=False)[0]
    assert {net.layers[n].tower for n in net.layers} == {0}
    a, b = _files(tmp_path, BASE_LAYERS.replace("partialSum=4", "gpu=0,1").replace("outputs=10", "outputs=10\ngpu=0"))
    with pytest.raises(ModelFileError, match=r"\[conv1\] gpu: 0,1: layers replicated on several GPUs next to layers "
                                             r"on other GPUs"):
        load_model(a, params=b, input_shape=(3, 12, 12), init_params=False)


def test_layers_that_compute_nothing_go_and_keep_their_neuron(tmp_path):
    """pass, a disabled dropout and an ident neuron layer are their input; a neuron= on one of them stays."""
    extra = ("[pass1]\ntype=pass\ninputs=pool1\n\n[drop1]\ntype=dropout\ninputs=pass1\nenable=false\nneuron=relu\n\n"
             "[id1]\ntype=neuron\ninputs=drop1\nneuron=ident\n\n[fc10]")
    a, b = _files(tmp_path, BASE_LAYERS.replace("[fc10]", extra, 1).replace("inputs=pool1\n\n[probs]",
                                                                             "inputs=id1\n\n[probs]"))
    assert "inputs=id1" in open(a).read()
    net = load_model(a, params=b, input_shape=(3, 12, 12), init_params=False)[0]
    assert [n for n in net.layers] == ["data", "conv1", "pool1", "drop1", "fc10", "probs"]
    assert net.layers["drop1"].type == "neuron" and net.layers["drop1"].neuron == Neuron("relu")
    assert net.layers["drop1"].inputs == ["pool1"]
    assert net.layers["fc10"].inputs == ["drop1"]
    # a pass of several inputs is their concatenation (cuda-convnet2): its reader joins them
    a, b = _files(tmp_path, BASE_LAYERS.replace("[fc10]", "[both]\ntype=pass\ninputs=conv1,pool1\n\n[fc10]", 1)
                  .replace("inputs=pool1\n\n[probs]", "inputs=both\n\n[probs]"))
    net = load_model(a, params=b, input_shape=(3, 12, 12), init_params=False)[0]
    assert net.layers["fc10"].inputs == ["conv1", "pool1"]
    assert net.layers["fc10"].param_count() == 10 * (16 * 12 * 12 + 16 * 6 * 6) + 10
    a, b = _files(tmp_path, BASE_LAYERS.replace("inputs=fc10", "inputs=fc10\nneuron=relu"))
    with pytest.raises(ModelFileError, match=r"\[probs\] neuron: not implemented for a cuda-convnet softmax layer"):
        load_model(a, params=b, input_shape=(3, 12, 12), init_params=False)


def test_a_cuda_convnet_data_layer_needs_an_image_shape(tmp_path):
    a, b = _files(tmp_path)
    with pytest.raises(ModelFileError, match=r"\[data\]: the image shape is the data provider's in cuda-convnet: "
                                             r"give it \(--input-shape C,H,W"):
        load_model(a, params=b)


def _spelling(name):
    """A neuron written with parameters that every neuron accepts (tanh needs a != 0, brelu a > 0)."""
    params = NEURONS[name].params
    return f"{name}[{','.join(('1.5', '0.25')[:len(params)])}]" if params else name


@pytest.mark.parametrize("name", list(NEURONS))
def test_every_neuron_loads_on_conv_fc_pool_and_as_a_neuron_layer(tmp_path, name):
    """neuron= on conv and fc is fused, on a pool layer it becomes a type = neuron layer after it, and a cuda-convnet
    neuron layer is one, its parameters kept."""
    n = _spelling(name)
    layers = (BASE_LAYERS.replace("partialSum=4", f"partialSum=4\nneuron={n}")
              .replace("channels=16\n", f"channels=16\nneuron={n}\n")
              .replace("[fc10]", f"[act]\ntype=neuron\ninputs=pool1\nneuron={n}\n\n[fc10]", 1)
              .replace("inputs=pool1\n\n[probs]", f"inputs=act\nneuron={n}\n\n[probs]"))
    a, b = _files(tmp_path, layers)
    net = load_model(a, params=b, input_shape=(3, 12, 12), init_params=False)[0]
    want = Neuron(name, *(1.5, 0.25)[:len(NEURONS[name].params)])
    assert [n for n in net.layers] == ["data", "conv1", "pool1", "pool1_neuron", "act", "fc10", "probs"]
    for layer in ("conv1", "pool1_neuron", "act", "fc10"):
        assert net.layers[layer].neuron == want, layer
    assert net.layers["pool1_neuron"].type == net.layers["act"].type == "neuron"
    assert net.layers["act"].inputs == ["pool1_neuron"] and net.layers["fc10"].inputs == ["act"]


def test_a_neuron_keeps_every_digit_of_its_parameters(tmp_path):
    a, b = _files(tmp_path, BASE_LAYERS.replace("channels=16\n", "channels=16\nneuron=tanh[1.7159, 0.66666667]\n"))
    text, source = resolve_model(a, b, (3, 12, 12))
    net = build_net(text, source, device="numpy", init_params=False)[0]
    assert net.layers["pool1_neuron"].neuron == Neuron("tanh", 1.7159, 0.66666667)


def test_neuron_identities_add_no_layer(tmp_path):
    for n in ("ident", "linear", "linear[1,0]"):
        a, b = _files(tmp_path, BASE_LAYERS.replace("channels=16\n", f"channels=16\nneuron={n}\n"))
        net = load_model(a, params=b, input_shape=(3, 12, 12), init_params=False)[0]
        assert list(net.layers) == ["data", "conv1", "pool1", "fc10", "probs"], n


def test_cuda_convnet_only_types_are_refused_in_this_projects_form():
    """cost.logreg, dropout2 and pass have cuda-convnet's meaning only in its form; rnorm there and here is the
    same-map normalisation, cmrnorm here this project's lrn (its own defaults), never a silent substitute."""
    for t in ("cost.logreg", "dropout2", "pass"):
        with pytest.raises(ModelFileError, match=rf"\[n\] type: '{re.escape(t)}' is cuda-convnet's"):
            build_net(TINY.replace("[fc]", f"[n]\ntype = {t}\ninputs = data\n\n[fc]").replace(
                "inputs = data\noutputs", "inputs = n\noutputs"), "tiny.cfg")
    for t, keys, want in (("rnorm", "size = 3\nscale = 0.5\npow = 0.75", "rnorm"),
                          ("cnorm", "size = 3\nscale = 0.5\npow = 0.75", "cnorm"),
                          ("cmrnorm", "size = 1", "lrn")):
        net = build_net(TINY.replace("size = 4\n", "size = 4\n[n]\ntype = " + t + "\ninputs = data\n" + keys + "\n")
                        .replace("inputs = data\noutputs", "inputs = n\noutputs"), "tiny.cfg", device="numpy")[0]
        assert net.layers["n"].type == want


NORM_LAYERS = """[data]
type=data
dataIdx=0

[labels]
type=data
dataIdx=1

[norm]
type={t}
inputs=data
channels=3
size={size}

[fc10]
type=fc
outputs=10
inputs=norm

[probs]
type=softmax
inputs=fc10

[logprob]
type=cost.logreg
inputs=labels,probs
"""


def _cuda_convnet_norm(x, t, size, scale, power, min_div):
    """cuda-convnet's rnorm / cnorm written out: x / (minDiv + scale / size**2 * sum over the window clipped at the
    edges of s**2)**pow, s = x (rnorm) or x minus the mean of its own clipped window (cnorm); x is (C, H, W, N)."""
    c, h, w, n = x.shape
    lo = -(size // 2)  # cuda-convnet's window start relative to the pixel (centred for odd sizes)

    def window(a, i, j):
        return a[:, max(i + lo, 0):min(i + lo + size, h), max(j + lo, 0):min(j + lo + size, w), :]

    s = x.copy()
    if t == "cnorm":
        for i in range(h):
            for j in range(w):
                s[:, i, j, :] = x[:, i, j, :] - window(x, i, j).mean(axis=(1, 2))
    out = np.empty_like(x)
    for i in range(h):
        for j in range(w):
            denom = min_div + scale / size ** 2 * (window(s, i, j) ** 2).sum(axis=(1, 2))
            out[:, i, j, :] = x[:, i, j, :] / denom ** power
    return out


@pytest.mark.parametrize("t, size, hw", [("rnorm", 3, (5, 4)), ("rnorm", 5, (3, 7)), ("cnorm", 3, (4, 6)),
                                         ("cnorm", 4, (5, 5))])
def test_rnorm_and_cnorm_sections_compute_cuda_convnets_normalisation(tmp_path, t, size, hw):
    """The params' scale is cuda-convnet's (divided by size**2 in the op), pow and minDiv as written."""
    params = "[norm]\nscale=0.3\npow=0.75\nminDiv=2\n\n[logprob]\ncoeff=1\n"
    a, b = _files(tmp_path, NORM_LAYERS.format(t=t, size=size), params)
    net = load_model(a, params=b, input_shape=(3, *hw), device="numpy")[0]
    layer = net.layers["norm"]
    assert (layer.type, layer.size, layer.scale, layer.pow, layer.min_div) == (t, size, 0.3, 0.75, 2.0)
    x = np.random.default_rng(size).standard_normal((3, *hw, 2)).astype(np.float32) * 3
    np.testing.assert_allclose(layer.forward(x, {}), _cuda_convnet_norm(x.astype(np.float64), t, size, 0.3, 0.75,
                                                                         2.0), rtol=2e-5, atol=1e-6)


def test_rnorm_channels_are_checked_against_the_input(tmp_path):
    a, b = _files(tmp_path, NORM_LAYERS.format(t="rnorm", size=3).replace("channels=3", "channels=4"),
                  "[norm]\nscale=0.3\npow=0.75\n")
    with pytest.raises(ModelFileError, match=r"layer 'norm': channels = 4, but its input has 3 channels"):
        load_model(a, params=b, input_shape=(3, 6, 6), init_params=False)
    a, b = _files(tmp_path, NORM_LAYERS.format(t="cnorm", size=3), "[norm]\npow=0.75\n")
    with pytest.raises(ModelFileError, match=r"cfg \[norm\]: missing required key 'scale' for a cnorm layer"):
        load_model(a, params=b, input_shape=(3, 6, 6), init_params=False)


ELT_LAYERS = BASE_LAYERS.replace("[pool1]", """[conv2]
type=conv
inputs=data
channels=3
filters=16
padding=2
stride=1
filterSize=5

[sum]
type=eltsum
inputs=conv1,conv2
coeffs=0.5,-2
neuron=tanh[1.5,0.25]

[max]
type=eltmax
inputs=sum,conv2,conv1

[pool1]""").replace("inputs=conv1\nsizeX", "inputs=max\nsizeX")


def test_cuda_convnet2_eltsum_and_eltmax_sections(tmp_path):
    a, b = _files(tmp_path, ELT_LAYERS)
    net = load_model(a, params=b, input_shape=(3, 6, 6), device="numpy", seed=2)[0]
    s, m = net.layers["sum"], net.layers["max"]
    assert (s.type, s.coeffs, s.inputs) == ("eltsum", (0.5, -2.0), ["conv1", "conv2"])
    assert net.layers["sum_neuron"].neuron == Neuron("tanh", 1.5, 0.25)
    assert (m.type, m.inputs) == ("eltmax", ["sum_neuron", "conv2", "conv1"])
    x = np.random.default_rng(0).standard_normal((3, 6, 6, 4)).astype(np.float32)
    c1, c2 = (net.layers[n].forward(x, {}) for n in ("conv1", "conv2"))
    want = np.maximum(np.maximum(1.5 * np.tanh(0.25 * (0.5 * c1 - 2 * c2)), c2), c1)
    got = net.layers["max"].forward(np.concatenate([net.layers["sum_neuron"].forward(net.layers["sum"].forward(
        np.concatenate([c1, c2]), {}), {}), c2, c1]), {})
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    a, b = _files(tmp_path, ELT_LAYERS.replace("coeffs=0.5,-2", "coeffs=0.5"))
    with pytest.raises(ModelFileError, match=r"layer 'sum': coeffs has 1 numbers for 2 inputs"):
        load_model(a, params=b, input_shape=(3, 6, 6), init_params=False)
    a, b = _files(tmp_path, ELT_LAYERS.replace("[sum]", "[both]\ntype=pass\ninputs=conv1,conv2\n\n[sum]")
                  .replace("inputs=conv1,conv2\ncoeffs=0.5,-2", "inputs=both\ncoeffs=1"))
    with pytest.raises(ModelFileError, match=r"\[sum\] inputs: 'both' is a pass layer of several inputs"):
        load_model(a, params=b, input_shape=(3, 6, 6), init_params=False)


# ---------------------------------------------------------------------------------------------- training
def test_layers_80sec_trains_on_cifar_shaped_data_on_the_cpu(tmp_path):
    from convnet.train import run
    layers, params = pair(CC1, "80sec")
    res = run(["--model", layers, "--params", params, "--dataset", "synthetic", "--out", str(tmp_path / "r"),
               "--no-progress", "--no-plots", "--device", "cpu", "--epochs", "2", "--batch-size", "32",
               "--synthetic-train", "256", "--synthetic-test", "64", "--lr", "0.001", "--input-shape", "3,32,32"],
              log=lambda s: None)
    h = res["history"]
    assert len(h) == 2 and all(np.isfinite(r["train_loss"]) for r in h)
    assert h[-1]["train_loss"] < h[0]["train_loss"], [r["train_loss"] for r in h]


def test_layers_18pct_trains_a_few_steps_on_the_cpu():
    layers, params = pair(CC1, "18pct")
    net = load_model(layers, params=params, input_shape=(3, 32, 32), device="cpu", seed=1)[0]
    assert [net.layers[n].type for n in ("rnorm1", "rnorm2")] == ["rnorm", "rnorm"]
    opt = SGD(net, lr=0.001, momentum=0.9, weight_decay=0.0)
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((3, 32, 32, 64)) * 60).astype(np.float32)  # mean-subtracted 0..255 pixels
    y = rng.integers(0, 10, 64).astype(np.int32)
    losses = []
    for step in range(8):
        net.forward(x, y, train=True, step=step)
        net.backward()
        opt.step()
        losses.append(float(net.device.to_numpy(net.loss)) / 64)
    assert all(np.isfinite(losses)) and losses[0] == pytest.approx(math.log(10), rel=1e-3)
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < losses[0] - 5e-4, losses


@pytest.mark.parametrize("name", ["conv-local-11pct", "conv-local-13pct"])
def test_conv_local_nets_train_a_few_steps_on_the_cpu_and_on_emu_alike(name):
    layers, params = pair(CC1, name)
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((3, 32, 32, 8)) * 60).astype(np.float32)  # mean-subtracted 0..255 pixels
    y = rng.integers(0, 10, 8).astype(np.int32)
    runs = {}
    for dev in ("cpu", "emu"):
        net = load_model(layers, params=params, input_shape=(3, 32, 32), device=dev, seed=1)[0]
        opt = SGD(net, lr=0.001, momentum=0.9, weight_decay=0.0)  # the layers' absolute rates apply
        losses = []
        for step in range(4):
            net.forward(net.device.asarray(x, np.float32), y, train=True, step=step)
            net.backward()
            opt.step()
            losses.append(float(net.device.to_numpy(net.loss)) / 8)
        runs[dev] = losses
        assert all(np.isfinite(losses)) and losses[0] == pytest.approx(math.log(10), rel=1e-2), (dev, losses)
        assert all(b < a for a, b in zip(losses, losses[1:])), (dev, losses)
    np.testing.assert_allclose(runs["emu"], runs["cpu"], rtol=1e-4)


TINY = """
[data]
type = data
channels = 1
size = 4
[fc]
type = fc
inputs = data
outputs = 3
[probs]
type = softmax
inputs = fc
"""


SMALL_LAYERS = """[data]
type=data
dataIdx=0

[labels]
type=data
dataIdx=1

[conv1]
type=conv
inputs=data
channels=3
filters=8
padding=1
stride=2
filterSize=5
initW=0.05
partialSum=1

[pool1]
type=pool
pool=avg
inputs=conv1
sizeX=2
stride=2
channels=8
neuron=relu

[pool2]
type=pool
pool=max
inputs=pool1
sizeX=2
stride=2
start=-1
channels=8

[fc10]
type=fc
outputs=10
inputs=pool2
initW=0.05

[probs]
type=softmax
inputs=fc10

[logprob]
type=cost.logreg
inputs=labels,probs
"""


@pytest.mark.parametrize("kind", ["conv", "local"])
def test_rounding_up_layers_run_on_the_fake_gpu_as_on_emu(tmp_path, monkeypatch, kind):
    """The overhanging windows (conv1, or a local conv1, 1 + ceil(7/2) = 5, the floor rule 4; pool1 3, floor 2;
    pool2 from start -1) train on the cuda path (the fake CuPy, with the emulator's kernels) exactly as on emu."""
    from fake_cupy import FakeCupy

    from convnet.train import run
    a, b = _files(tmp_path, SMALL_LAYERS.replace("type=conv", f"type={kind}"),
                  BASE_PARAMS.replace("[conv1]", "[conv1]\nupdatePeriod=1"))
    net = load_model(a, params=b, input_shape=(3, 10, 10), init_params=False)[0]
    assert net.layers["conv1"].type == kind
    assert shapes(net)["conv1"] == (8, 5, 5) and shapes(net)["pool1"] == (8, 3, 3)
    assert shapes(net)["pool2"] == (8, 2, 2)  # ceil((3 + 1 - 2) / 2) + 1
    args = ["--model", a, "--params", b, "--input-shape", "3,10,10", "--dataset", "synthetic", "--no-progress",
            "--no-plots", "--epochs", "2", "--batch-size", "16", "--synthetic-train", "64", "--synthetic-test", "32",
            "--precision", "fp32"]
    emu = run([*args, "--out", str(tmp_path / "emu"), "--device", "emu"], log=lambda s: None)["history"]
    FakeCupy(devices=2).install(monkeypatch, usable=True)
    gpu = run([*args, "--out", str(tmp_path / "gpu"), "--device", "cuda:1"], log=lambda s: None)["history"]
    assert gpu[-1]["device"] == "cuda:1"
    for g, e in zip(gpu, emu):
        assert (g["train_loss"], g["test_loss"], g["test_error"]) == (e["train_loss"], e["test_loss"], e["test_error"])
    assert emu[-1]["train_loss"] < emu[0]["train_loss"]


def test_a_run_keeps_the_merged_text_and_a_resume_needs_neither_file(tmp_path):
    from convnet.config import ConfigError
    from convnet.train import run
    a, b = _files(tmp_path, SMALL_LAYERS)
    args = ["--dataset", "synthetic", "--no-progress", "--no-plots", "--batch-size", "16", "--synthetic-train", "32",
            "--synthetic-test", "16", "--device", "numpy", "--out", str(tmp_path / "r")]
    run(["--model", a, "--params", b, "--input-shape", "3,10,10", "--epochs", "1", *args], log=lambda s: None)
    (tmp_path / "layers-t.cfg").unlink()
    (tmp_path / "layer-params-t.cfg").unlink()
    res = run(["--resume", str(tmp_path / "r"), "--epochs", "2", "--no-progress", "--no-plots"], log=lambda s: None)
    assert len(res["history"]) == 2
    with pytest.raises(ConfigError, match=r"--params other.cfg differs from the checkpoint's"):
        run(["--resume", str(tmp_path / "r"), "--params", "other.cfg"], log=lambda s: None)
    with pytest.raises(ConfigError, match=r"--input-shape must be C,H,W \(three positive integers\), got '3,0,4'"):
        run(["--model", a, "--input-shape", "3,0,4", *args], log=lambda s: None)


def test_the_run_tells_the_optimizer_its_progress_for_cuda_convnet2_schedules(tmp_path, monkeypatch):
    from convnet.train import run
    seen = []
    step = SGD.step

    def recording(self, items=None):
        seen.append((self.progress, self.settings(self.net.layers["conv1"], "w")[0]))
        return step(self, items)

    monkeypatch.setattr(SGD, "step", recording)
    a, b = _files(tmp_path, SMALL_LAYERS, BASE_PARAMS.replace("epsW=0.001", "epsW=dexp[base=0.01;tgtFactor=100;"
                                                                            "numSteps=2]", 1))
    run(["--model", a, "--params", b, "--input-shape", "3,10,10", "--dataset", "synthetic", "--no-progress",
         "--no-plots", "--epochs", "2", "--batch-size", "16", "--synthetic-train", "32", "--synthetic-test", "16",
         "--device", "numpy", "--out", str(tmp_path / "r")], log=lambda s: None)
    assert [p for p, _ in seen] == [0.0, 0.25, 0.5, 0.75]  # (epoch + batch / batches) / epochs
    assert [lr for _, lr in seen] == [0.01, 0.01, 0.01, 0.0001]  # dexp: base until half-way, then base / 100
