"""Shipped model files, the summary (parameter counts), and clear errors for bad model files."""
import numpy as np
import pytest

from convnet import ops
from convnet.devices import Device
from convnet.model_file import ModelFileError, build_net, load_model, parse_model_text, shipped_models
from helpers import NUMPY, ROOT


def test_shipped_models_are_there():
    assert {"alexnet", "alexnet-2gpu", "alexnet-owt", "cifar-11pct", "cifar-18pct", "fmnist"} \
        <= set(shipped_models())


def _hand_count_alexnet():
    # conv: F * (C/groups * K * K) + F ; fc: out * in + out
    conv = [(96, 3, 11, 1), (256, 96, 5, 2), (384, 256, 3, 1), (384, 384, 3, 2), (256, 384, 3, 2)]
    fc = [(4096, 256 * 6 * 6), (4096, 4096), (1000, 4096)]
    return sum(f * (c // g) * k * k + f for f, c, k, g in conv) + sum(o * i + o for o, i in fc)


def test_alexnet_two_tower_parameter_count():
    assert _hand_count_alexnet() == 60_965_224
    net, train = load_model("alexnet", init_params=False)
    assert net.num_params() == 60_965_224
    shapes = {n: l.out_shape for n, l in net.layers.items()}
    assert shapes["conv1"] == (96, 55, 55)
    assert shapes["pool1"] == (96, 27, 27)
    assert shapes["conv2"] == (256, 27, 27)
    assert shapes["pool2"] == (256, 13, 13)
    assert shapes["conv5"] == (256, 13, 13)
    assert shapes["pool5"] == (256, 6, 6)
    assert net.layers["fc6"].in_shape == (256, 6, 6)
    assert [net.layers[n].groups for n in ("conv1", "conv2", "conv3", "conv4", "conv5")] == [1, 2, 1, 2, 2]
    s = net.summary()
    assert "60,965,224" in s
    # forward FLOPs (multiply-add = 2): about 1.45 G per image (docs/notes)
    assert 1.40e9 < net.flops() < 1.50e9
    assert train["lr"] == 0.01 and train["batch_size"] == 128


def test_alexnet_owt_parameter_count():
    net, _ = load_model("alexnet-owt", init_params=False)
    assert net.num_params() == 61_100_840


def test_alexnet_paper_initialisation():
    net, _ = load_model("alexnet", init_params=True, seed=0)
    for name, bias in [("conv1", 0), ("conv2", 1), ("conv3", 0), ("conv4", 1), ("conv5", 1), ("fc6", 1),
                       ("fc7", 1), ("fc8", 0)]:
        l = net.layers[name]
        assert np.all(l.params["b"] == bias), name
    w = net.layers["fc6"].params["w"]
    assert abs(float(w.std()) - 0.01) < 1e-4 and abs(float(w.mean())) < 1e-4


def test_small_models_summary_and_forward():
    for name, shape in (("fmnist", (1, 28, 28)), ("cifar-18pct", (3, 32, 32))):
        net, train = load_model(name)
        assert net.data_layer.out_shape == shape
        assert net.num_classes == 10
        x = np.zeros((*shape, 4), np.float32)
        p = net.forward(x)
        assert p.shape == (10, 4)
        assert "total" in net.summary()
        assert train["dataset"] in ("fashion-mnist", "cifar10")


def test_cifar_11pct_is_cuda_convnets_conv_local_11pct_net():
    """The shipped file and cuda-convnet's own pair build the same net: 3,672,906 parameters, the same shapes and
    per-layer learning settings, and the same probabilities from the same parameters."""
    folder = ROOT / "tests" / "data" / "cuda-convnet" / "cuda-convnet"
    ours, train = load_model("cifar-11pct", device="cpu", seed=4)
    layers, params = (str(folder / f"{f}-conv-local-11pct.cfg") for f in ("layers", "layer-params"))
    orig = load_model(layers, params=params, input_shape=(3, 32, 32), device="cpu", init_params=False)[0]
    assert ours.num_params() == orig.num_params() == 3_672_906
    assert (train["dataset"], train["lr"], train["momentum"]) == ("cifar10", 0.001, 0.9)
    assert list(ours.layers) == list(orig.layers)
    for name, a in ours.layers.items():
        b = orig.layers[name]
        assert (a.type, a.out_shape, a.inputs) == (b.type, b.out_shape, b.inputs), name
        for attr in ("lr_abs", "momentum", "wc", "init_w", "neuron", "shared_biases", "alpha", "beta", "k",
                     "convention", "size", "stride", "padding", "pool"):
            assert getattr(a, attr, None) == getattr(b, attr, None), (name, attr)
    assert [ours.layers[n].rounding for n in ("pool1", "pool2")] == ["up", "up"]
    from convnet.optim import SGD
    opt = SGD(ours, lr=train["lr"], momentum=train["momentum"], weight_decay=train["weight_decay"])
    assert opt.settings(ours.layers["local3"], "w") == (0.001, 0.9, 0.004)
    assert opt.settings(ours.layers["conv1"], "b") == (0.002, 0.9, 0.0)
    assert opt.settings(ours.layers["fc10"], "w") == (0.001, 0.9, 0.01)
    assert ours.layers["local3"].param_shapes() == {"w": (64, 64, 3, 3, 64), "b": (64, 8, 8)}
    rng = np.random.default_rng(0)
    for _, layer, p in ours.param_items():  # lively parameters (He): every layer shows in the probabilities
        shape = layer.params[p].shape
        fan_in = (shape[1] if layer.type == "fc" else int(np.prod(shape[-4:-1]))) if p == "w" else 50
        v = (rng.standard_normal(shape) * np.sqrt(2 / fan_in)).astype(np.float32)
        layer.params[p] = ours.device.asarray(v, np.float32)
        orig.layers[layer.name].params = {**orig.layers[layer.name].params, p: orig.device.asarray(v, np.float32)}
    x = rng.standard_normal((3, 32, 32, 4)).astype(np.float32)
    probs = ours.device.to_numpy(ours.forward(x))
    assert probs.max() > 0.3
    np.testing.assert_array_equal(probs, orig.device.to_numpy(orig.forward(x)))


BASE = """
[data]
type = data
channels = 1
size = 8
[fc]
type = fc
inputs = data
outputs = 3
[probs]
type = softmax
inputs = fc
"""


# cuda-convnet's neuron layer, fused neurons, eltsum with coefficients and eltmax
JOINS = """
[data]
type = data
channels = 1
size = 8
[a]
type = neuron
inputs = data
neuron = tanh[1.7159,0.6667]
[b]
type = neuron
inputs = data
neuron = abs
[s]
type = eltsum
inputs = a,b
coeffs = 0.5, 2
[m]
type = eltmax
inputs = s,a
[fc]
type = fc
inputs = m
outputs = 3
neuron = brelu[6]
[probs]
type = softmax
inputs = fc
"""


def test_neuron_and_join_layers_in_model_files():
    from convnet.neurons import Neuron
    net, _ = build_net(JOINS, "joins.cfg", device="numpy", dtype="float64")
    assert net.layers["a"].neuron == Neuron("tanh", 1.7159, 0.6667) and net.layers["fc"].neuron == "brelu[6]"
    assert net.layers["s"].coeffs == (0.5, 2.0) and net.layers["m"].out_shape == (1, 8, 8)
    x = np.random.default_rng(0).standard_normal((1, 8, 8, 3))
    a = 1.7159 * np.tanh(0.6667 * x)
    m = np.maximum(0.5 * a + 2 * np.abs(x), a)
    net.forward(x)
    fc = net.layers["fc"]
    want = np.clip(fc.params["w"] @ m.reshape(64, 3) + fc.params["b"][:, None], 0, 6)
    np.testing.assert_allclose(net.logits, want, rtol=1e-12)
    assert "neuron tanh[1.7159,0.6667]" in net.summary() and "eltsum 0.5,2" in net.summary()


@pytest.mark.parametrize("text, match", [
    (JOINS.replace("neuron = brelu[6]", "neuron = tanh"),
     r"joins.cfg \[fc\]: layer 'fc': neuron 'tanh': tanh takes 2 parameters \(written tanh\[a,b\]\), got 0"),
    (JOINS.replace("neuron = abs", "neuron = swish"),
     r"joins.cfg \[b\]: layer 'b': unknown neuron 'swish' \(known: relu, tanh\[a,b\], logistic, abs, square, sqrt, "
     r"softrelu, brelu\[a\], linear\[a,b\], or linear/ident for none\)"),
    (JOINS.replace("neuron = abs", ""), r"joins.cfg \[b\]: missing required key 'neuron' for a neuron layer"),
    (JOINS.replace("coeffs = 0.5, 2", "coeffs = 0.5"), r"joins.cfg \[s\]: layer 's': coeffs has 1 numbers for 2 inputs"),
    (JOINS.replace("coeffs = 0.5, 2", "coeffs = 0.5,x"),
     r"joins.cfg \[s\] coeffs: expected numbers separated by commas, got '0.5,x'"),
    (JOINS.replace("inputs = s,a", "inputs = s"), r"joins.cfg \[m\]: layer 'm': an eltmax layer joins at least 2"),
    (JOINS.replace("neuron = abs", "neuron = abs\n[c]\ntype = pool\ninputs = data\nsize = 2\nstride = 2")
     .replace("inputs = s,a", "inputs = s,c"),
     r"joins.cfg: layer 'm': the inputs of an eltmax layer must have one shape, got s \(1, 8, 8\), c \(1, 4, 4\)"),
])
def test_bad_neuron_and_join_layers(text, match):
    with pytest.raises(ModelFileError, match=match):
        build_net(text, "joins.cfg")


def test_base_model_builds():
    net, _ = build_net(BASE, "base.cfg")
    assert net.num_params() == 3 * 64 + 3


@pytest.mark.parametrize("text, match", [
    (BASE.replace("type = fc", "type = fcc"), r"base.cfg \[fc\]: unknown layer type 'fcc'"),
    (BASE.replace("outputs = 3", "outputs = three"), r"base.cfg \[fc\] outputs: expected an integer, got 'three'"),
    (BASE.replace("outputs = 3", "outputz = 3"), r"unknown key 'outputz' for a fc layer"),
    (BASE.replace("outputs = 3", ""), r"missing required key 'outputs'"),
    (BASE.replace("inputs = data", "inputs = dta"), r"input 'dta' is not defined"),
    (BASE.replace("inputs = fc", ""), r"\[probs\]: missing 'inputs'"),
    (BASE.replace("type = softmax", ""), r"\[probs\]: missing 'type'"),
    (BASE + "[fc]\ntype=fc\n", r"cannot parse"),
    ("just text", r"cannot parse"),
    ("", r"no layers"),
    (BASE.replace("[probs]\ntype = softmax\ninputs = fc", ""), r"exactly one softmax"),
    (BASE.replace("outputs = 3", "outputs = 3\ninitW = wide"), r"initW must be a number"),
    (BASE.replace("outputs = 3", "outputs = -3"), r"outputs must be > 0"),
    (BASE + "[train]\nepochz = 3\n", r"\[train\]: unknown key 'epochz'"),
    (BASE + "[train]\nflip = maybe\n", r"expected true/false"),
    (BASE.replace("size = 8", "size = 8\ninputs = fc"), r"data layer takes no inputs"),
    (BASE.replace("outputs = 3", "outputs = 1"),
     r"base.cfg: layer 'probs': a softmax over 1 class learns nothing \(its probability is always 1\); its input "
     r"needs at least 2 outputs"),
])
def test_bad_model_files(text, match):
    with pytest.raises(ModelFileError, match=match):
        build_net(text, "base.cfg")


def test_unknown_model_name_lists_the_shipped_ones(tmp_path):
    with pytest.raises(ModelFileError, match="unknown model 'lenet'.*fmnist"):
        load_model("lenet")
    with pytest.raises(ModelFileError, match="not found"):
        load_model(str(tmp_path / "nope.cfg"))
    p = tmp_path / "m.cfg"
    p.write_text(BASE)
    net, _ = load_model(str(p))
    assert net.num_classes == 3


def test_parse_aliases_and_comments():
    text = BASE.replace("outputs = 3", "neurons = 3   # cuda-convnet spelling\nlrW = 2 ; lr multiplier\n"
                                       "epsB = 0.002 ; cuda-convnet's absolute rate")
    specs, _ = parse_model_text(text)
    fc = dict((n, kw) for n, t, kw in specs)["fc"]
    assert fc["outputs"] == 3 and fc["lr_w"] == 2.0 and fc["eps_b"] == "0.002"


def test_per_layer_devices_in_model_files():
    """``device = i`` (or cuda-convnet's ``gpu = i``): tower i, on the i-th of the net's devices (default: every tower
    on the net's device); a device name: that device."""
    for key in ("gpu", "device"):
        specs, _ = parse_model_text(BASE.replace("outputs = 3", f"outputs = 3\n{key} = 1"))
        assert dict((n, kw) for n, t, kw in specs)["fc"]["device"] == 1
    text = BASE.replace("outputs = 3", "outputs = 3\ngpu = 1")
    net, _ = build_net(text, "base.cfg", device="numpy")
    assert net.devices == (Device("numpy"),) * 2 and net.layers["fc"].tower == 1
    assert str(net.layers["fc"].device) == "numpy" and net.layers["probs"].tower == 0
    net, _ = build_net(text, "base.cfg", devices="emu:0,numpy:1")
    assert net.device == Device("emu") and str(net.layers["fc"].device) == "numpy:1"
    assert str(net.layers["probs"].device) == "emu" and str(net.layers["data"].device) == "emu"
    with pytest.raises(ModelFileError, match=r"layer 'fc' is on device 1 \(a tower index\), but the net has 1 "
                                             r"device\(s\) \(numpy\)"):
        build_net(text, "base.cfg", devices="numpy")
    with pytest.raises(ModelFileError, match="not the first of the devices"):
        build_net(text, "base.cfg", device="emu", devices="numpy,numpy:1")
    net, _ = build_net(BASE.replace("outputs = 3", "outputs = 3\ndevice = numpy:1"), "base.cfg", device="numpy")
    assert str(net.layers["fc"].device) == "numpy:1" and str(net.layers["probs"].device) == "numpy"
    x = np.zeros((1, 8, 8, 2), np.float32)
    y = np.array([0, 2], np.int32)
    net.forward(x, y, train=True)
    net.backward()
    with pytest.raises(ModelFileError, match="expected a GPU index"):
        build_net(BASE.replace("outputs = 3", "outputs = 3\ngpu = x"), "base.cfg")


KEYS_NET = """
[data]
type = data
channels = 2
size = 8
[conv]
type = conv
inputs = data
filters = 4
size = 3
[pool]
type = pool
inputs = conv
[lrn]
type = cmrnorm
inputs = pool
[fc]
type = fc
inputs = lrn
outputs = 3
[probs]
type = softmax
inputs = fc
"""


@pytest.mark.parametrize("section, old, new, attr, value", [
    ("conv", "filters = 4", "numFilters = 6", "filters", 6),
    ("conv", "size = 3", "filterSize = 5", "size", (5, 5)),
    ("conv", "size = 3", "size = 3\npad = 1", "padding", (1, 1)),
    ("conv", "size = 3", "size = 3\nlrB = 2", "lr_mult", {"w": 1.0, "b": 2.0}),
    ("conv", "size = 3", "size = 3\nepsB = 0.25", "lr_abs", {"w": None, "b": 0.25}),
    ("conv", "size = 3", "size = 3\nINITW = he", "init_w", "he"),
    ("pool", "inputs = conv", "inputs = conv\nsizeX = 2", "size", (2, 2)),
    ("pool", "inputs = conv", "inputs = conv\nstride = 1,2", "stride", (1, 2)),
    ("lrn", "inputs = pool", "inputs = pool\nsize = 3", "size", 3),
    ("data", "size = 8", "size = 8x8", "size", (8, 8)),
])
def test_declared_keys_and_their_cuda_convnet_aliases(section, old, new, attr, value):
    head, _, rest = KEYS_NET.partition(f"[{section}]\n")
    text = head + f"[{section}]\n" + rest.replace(old, new, 1)
    net, _ = build_net(text, "keys.cfg")
    assert getattr(net.layers[section], attr) == value


def test_layer_keys_give_the_python_signature_and_the_known_keys_message():
    import inspect

    from convnet.layers import LAYER_TYPES
    for cls in LAYER_TYPES.values():
        sig = inspect.signature(cls).parameters
        for key in cls.keys:
            assert sig[key.arg].kind is inspect.Parameter.KEYWORD_ONLY
            assert (sig[key.arg].default is inspect.Parameter.empty) == key.required
    with pytest.raises(ModelFileError, match=r"unknown key 'groupz' for a conv layer \(known: inputs, device, gpu, "
                                             r"filters, size, stride, padding, groups, rounding, channels, initW"):
        parse_model_text(BASE.replace("type = fc\ninputs = data\noutputs = 3",
                                      "type = conv\ninputs = data\nfilters = 2\nsize = 3\ngroupz = 2"))


SHARED_MASK = """
[data]
type = data
channels = 1
size = 6
[conv]
type = conv
inputs = data
filters = 4
size = 3
padding = 1
[da]
type = dropout
inputs = conv
maskOf = d
[db]
type = dropout
inputs = conv
maskOf = d
maskStart = 4
[fc]
type = fc
inputs = da, db
outputs = 3
[probs]
type = softmax
inputs = fc
"""


def test_dropout_layers_sharing_a_mask_draw_their_units_of_it():
    """maskOf / maskStart on (C, H, W, N) images: db's channel c draws what channel 4 + c of one 8-channel layer
    draws (the op's start is maskStart * H*W*N), da the first 4; the graph seeds both by the stream's name."""
    net, _ = build_net(SHARED_MASK, "shared.cfg", device="numpy")
    da, db = net.layers["da"], net.layers["db"]
    assert da.random_stream == db.random_stream == "d" and net.layers["conv"].random_stream == "conv"
    assert db.describe() == "dropout keep 0.5 (mask of d from unit 4)"
    x = np.random.default_rng(0).uniform(1, 2, (4, 6, 6, 5)).astype(np.float32)
    whole = ops.dropout_forward(NUMPY, np.concatenate([x, x]), 0.5, 9)
    np.testing.assert_array_equal(da.forward(x, {"train": True, "seed": 9}), whole[:4])
    np.testing.assert_array_equal(db.forward(x, {"train": True, "seed": 9}), whole[4:])
    np.testing.assert_array_equal(db.backward(x, {"active": True, "seed": 9}), whole[4:])
    assert 0.3 < (whole[4:] != 0).mean() < 0.7


@pytest.mark.parametrize("edits, match", [
    ([("maskStart = 4", "maskStart = 3")],
     r"layers 'da' \(units 0-3\) and 'db' \(from unit 3\) overlap in the dropout mask 'd': they would draw the same "
     r"mask \(give maskStart = 4 or more"),
    ([("maskOf = d\nmaskStart", "maskStart")], r"\[db\]: layer 'db': maskStart = 4 needs maskOf"),
    ([("maskOf = d\nmaskStart", "maskOf = d, e\nmaskStart")],
     r"maskOf must be a name \(text without spaces or commas\), got 'd, e'"),
    ([("maskStart = 4", "maskStart = -4")], r"maskStart must be >= 0, got -4"),
    ([("padding = 1", "padding = 1\nstride = 2"), ("inputs = conv\nmaskOf = d\nmaskStart", "inputs = data\nmaskOf = d\n"
                                                                                            "maskStart")],
     r"layers 'da' and 'db' share the dropout mask 'd' but their units differ in shape \(\(3, 3\) vs \(6, 6\)\)"),
])
def test_bad_shared_masks(edits, match):
    text = SHARED_MASK
    for old, new in edits:
        assert old in text
        text = text.replace(old, new)
    with pytest.raises(ModelFileError, match=match):
        build_net(text, "shared.cfg", device="numpy")


def test_a_mask_stream_no_layer_of_the_net_names_is_a_warning(tmp_path):
    """maskOf naming no layer of the net, drawn by no other layer (a typo, or one tower of another net's layer): a
    ModelWarning naming the layer and the units it draws, logged once by the command as 'warning: ...'. Two layers
    sharing such a stream (the towers' halves of one layer: alexnet-2gpu) and a maskOf naming a layer are silent."""
    import warnings
    from convnet.layers import ModelWarning
    from convnet.train import run
    typo = SHARED_MASK.replace("maskOf = d\nmaskStart = 4", "maskOf = dd\nmaskStart = 4")
    with pytest.warns(ModelWarning) as caught:
        build_net(typo, "typo.cfg", device="numpy")
    assert sorted(str(w.message) for w in caught) == [
        f"layer '{l}': maskOf = {s} names no layer of this net and no other dropout layer shares it: it draws units "
        f"{u} of another net's layer {s} (check the name, or remove maskOf)" for l, s, u in (("da", "d", "0-3"),
                                                                                            ("db", "dd", "4-7"))]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_net(SHARED_MASK, "shared.cfg", device="numpy")
        build_net(SHARED_MASK.replace("maskOf = d\nmaskStart = 4", "maskOf = da\nmaskStart = 4").replace(
            "maskOf = d\n", ""), "named.cfg", device="numpy")  # db draws units 4-7 of da's own stream
        load_model("alexnet-2gpu", init_params=False)
    model = tmp_path / "typo.cfg"
    model.write_text(typo + "[train]\ndataset = synthetic\nbatch_size = 8\nepochs = 1\n")
    logs = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said in the log, not as a Python warning
        run(["--model", str(model), "--out", str(tmp_path / "r"), "--device", "numpy", "--no-progress", "--no-plots",
             "--synthetic-train", "16", "--synthetic-test", "8"], log=logs.append)
    said = [s for s in logs if s.startswith("warning: ")]
    assert len(said) == 2 and "layer 'db': maskOf = dd names no layer" in said[1], logs


NORM_FILE = """
[data]
type = data
channels = 2
size = 6
[rn]
type = rnorm
inputs = data
size = 3
scale = 0.001
pow = 0.75
[cn]
type = cnorm
inputs = rn
sizeX = 5
scale = 2
pow = 0.5
minDiv = 2
[fc]
type = fc
inputs = cn
outputs = 3
[probs]
type = softmax
inputs = fc
"""


def test_rnorm_and_cnorm_are_same_map_normalisations_with_cuda_convnet_keys():
    net, _ = build_net(NORM_FILE, "norm.cfg", device="numpy", dtype="float64")
    rn, cn = net.layers["rn"], net.layers["cn"]
    assert (rn.type, rn.size, rn.scale, rn.pow, rn.min_div) == ("rnorm", 3, 0.001, 0.75, 1.0)
    assert (cn.type, cn.size, cn.scale, cn.pow, cn.min_div) == ("cnorm", 5, 2.0, 0.5, 2.0)
    assert net.num_params() == 3 * 72 + 3
    x = np.random.default_rng(0).standard_normal((2, 6, 6, 4))
    ctx = {}
    y = rn.forward(x, ctx)  # normalised within each map: a map alone gives the same answer
    np.testing.assert_array_equal(y[1:], rn.forward(x[1:], {}))


@pytest.mark.parametrize("old, new, match", [
    ("scale = 0.001\n", "", r"norm.cfg \[rn\]: missing required key 'scale'"),
    ("pow = 0.5", "pow = -1", r"norm.cfg \[cn\]: .*pow must be >= 0, got -1"),
    ("minDiv = 2", "minDiv = 0", r"norm.cfg \[cn\]: .*minDiv must be > 0"),
    ("size = 3\nscale", "size = 0\nscale", r"norm.cfg \[rn\]: .*size must be > 0"),
    ("inputs = data\nsize = 3", "inputs = data\nsize = 3\nalpha = 1", r"unknown key 'alpha' for a rnorm layer"),
])
def test_bad_rnorm_and_cnorm_keys(old, new, match):
    with pytest.raises(ModelFileError, match=match):
        build_net(NORM_FILE.replace(old, new, 1), "norm.cfg")


# cuda-convnet's layers-conv-local-11pct net on 32x32 CIFAR images, in this format (the pools padded by one so that
# the floor rule gives cuda-convnet's 16 and 8)
LOCAL_11PCT = """
[data]
type = data
channels = 3
size = 32
[conv1]
type = conv
inputs = data
filters = 64
padding = 2
filterSize = 5
neuron = relu
initW = 0.0001
[pool1]
type = pool
inputs = conv1
sizeX = 3
stride = 2
padding = 1
[rnorm1]
type = cmrnorm
inputs = pool1
size = 9
[conv2]
type = conv
inputs = rnorm1
filters = 64
padding = 2
filterSize = 5
neuron = relu
initW = 0.01
[rnorm2]
type = cmrnorm
inputs = conv2
size = 9
[pool2]
type = pool
inputs = rnorm2
sizeX = 3
stride = 2
padding = 1
[local3]
type = local
inputs = pool2
filters = 64
padding = 1
filterSize = 3
neuron = relu
initW = 0.04
[local4]
type = local
inputs = local3
filters = 32
padding = 1
filterSize = 3
neuron = relu
initW = 0.04
[fc10]
type = fc
inputs = local4
outputs = 10
initW = 0.01
[probs]
type = softmax
inputs = fc10
"""


def test_local_layers_count_parameters_by_cuda_convnet_rules():
    """Unshared filters per output position and one bias per filter and position: cuda-convnet's 11% net has
    3,672,906 parameters; with sharedBiases = 1 the local layers keep one bias per filter."""
    net, _ = build_net(LOCAL_11PCT, "11pct.cfg", init_params=False)
    local3 = net.layers["local3"]
    assert local3.out_shape == (64, 8, 8) and local3.param_shapes() == {"w": (64, 64, 3, 3, 64), "b": (64, 8, 8)}
    assert net.num_params() == 3_672_906
    shared = LOCAL_11PCT.replace("filters = 32\n", "filters = 32\nsharedBiases = 1\n")
    assert build_net(shared, "11pct.cfg", init_params=False)[0].num_params() == 3_672_906 - 32 * 63


@pytest.mark.parametrize("old, new, match", [
    ("filters = 32\n", "filters = 32\nsharedBiases = 2\n", r"11pct.cfg \[local4\]: .*sharedBiases must be 0"),
    ("filters = 32\n", "", r"11pct.cfg \[local4\]: missing required key 'filters'"),
    ("filters = 32\n", "filters = 32\nchannels = 32\n", r"layer 'local4': channels = 32, but its input has 64"),
    ("filters = 64\npadding = 1", "filters = 64\npadding = 1\ngroups = 3",
     r"11pct.cfg \[local3\]: .*groups"),
])
def test_bad_local_keys(old, new, match):
    with pytest.raises(ModelFileError, match=match):
        build_net(LOCAL_11PCT.replace(old, new, 1), "11pct.cfg", init_params=False)


@pytest.mark.parametrize("device", ["cpu", "emu"])
def test_local_net_trains_alike_on_every_device(device):
    """A small net with both kinds of local layers: one SGD step's loss and gradients on cpu and emu against numpy."""
    text = (LOCAL_11PCT.replace("size = 32", "size = 12").replace("filters = 64", "filters = 8")
            .replace("filters = 32", "filters = 4\nsharedBiases = 1").replace("size = 9", "size = 3"))
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 12, 12, 5)).astype(np.float32)
    y = rng.integers(0, 10, 5).astype(np.int32)
    results = []
    for dev in ("numpy", device):
        net, _ = build_net(text, "small.cfg", device=dev, seed=1)
        net.forward(net.devices[0].asarray(x), net.devices[0].asarray(y), train=True)
        net.backward()
        results.append((float(net.loss), {f"{n}.{p}": net.devices[0].to_numpy(g) for n in ("local3", "local4")
                                          for p, g in net.layers[n].grads.items()}))
    (loss0, g0), (loss1, g1) = results
    np.testing.assert_allclose(loss1, loss0, rtol=1e-5)
    for k in g0:
        np.testing.assert_allclose(g1[k], g0[k], rtol=1e-3, atol=1e-6, err_msg=k)
