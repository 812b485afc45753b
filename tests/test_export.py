"""ONNX export (convnet.export): the exported graph, run by onnxruntime on raw pixels, gives our probabilities."""
import math
import re
import subprocess
import sys

import numpy as np
import pytest

from helpers import CPU, NUMPY, ROOT, subprocess_env
from models import TINY

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from convnet import export  # noqa: E402
from convnet.data.loader import Loader  # noqa: E402
from convnet.layers import Conv, ReLU  # noqa: E402
from convnet.model_file import build_net, load_model, shipped_models  # noqa: E402


def _lively(net, rng, logit_std=4.0, x=None, positive=()):
    """Random weights that keep activations of order one or more (He), random biases, and a last layer scaled so that
    the logits of ``x`` spread by ``logit_std``: probabilities far from uniform, so that every op shows in them.
    The layers named in ``positive`` get positive weights and biases (non-negative outputs for non-negative inputs)."""
    state = {}
    for key, layer, p in net.param_items():
        shape = tuple(layer.params[p].shape)
        if p == "w":
            fan_in = (math.prod(shape[-4:-1]) if isinstance(layer, Conv) else shape[1])  # local: one position's
            state[key] = rng.standard_normal(shape) * math.sqrt(2.0 / fan_in)
        else:
            state[key] = rng.uniform(-0.5, 0.5, shape)
        if layer.name in positive:
            state[key] = np.abs(state[key])
    net.load_state_dict(state)
    if x is not None:
        net.forward(x)
        last = net.cost_layer.inputs[0]
        factor = logit_std / float(np.std(net.device.to_numpy(net.logits)))
        for p in ("w", "b"):
            state[f"{last}/{p}"] = state[f"{last}/{p}"] * factor
        net.load_state_dict(state)


def _run_onnx(path, images):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (name,) = [i.name for i in session.get_inputs()]
    return session.run(None, {name: images})[0]


def _assert_same_probs(got, want):
    """Within 1e-5, and the log-probabilities too (small probabilities count)."""
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    live = want > 1e-20
    np.testing.assert_allclose(np.log(np.maximum(got[live], 1e-38)), np.log(want[live]), rtol=0, atol=1e-3)


def _compare(net, tmp_path, rng, *, n=3, layout="nchw", mean=True, positive=()):
    """Export ``net`` (lively weights, a random mean image) and compare onnxruntime's probabilities on raw pixels
    with ours on the same pixels preprocessed as our loaders do."""
    c, h, w = net.data_layer.out_shape
    raw = rng.uniform(0, 255, (n, c, h, w)).astype(np.float32)
    m = rng.uniform(0, 255, (h, w, c)).astype(np.float32) if mean else None
    x = raw - m.transpose(2, 0, 1)[None] if mean else raw.copy()
    if net.data_layer.scale != 1.0:
        x *= np.float32(net.data_layer.scale)
    x = net.data_layer.device.asarray(np.ascontiguousarray(x.transpose(1, 2, 3, 0)), net.dtype)
    _lively(net, rng, x=x, positive=positive)
    ours = net.device.to_numpy(net.forward(x)).T
    assert np.isfinite(ours).all()
    path = export.to_onnx(net, tmp_path / f"{net.name}.onnx", mean=m, layout=layout)
    onnx.checker.check_model(str(path), full_check=True)
    images = raw if layout == "nchw" else np.ascontiguousarray(raw.transpose(1, 2, 3, 0))
    _assert_same_probs(_run_onnx(path, images), ours)
    return ours, x


@pytest.mark.parametrize("name", shipped_models())
def test_every_shipped_model_runs_in_onnxruntime_with_our_probabilities(name, tmp_path):
    net, _ = load_model(name, device=CPU)  # alexnet at 224 is slow on the numpy reference
    ours, _ = _compare(net, tmp_path, np.random.default_rng(len(name)), n=2)
    assert ours.max() > 0.2  # not near uniform: the comparison sees every layer


LOCAL_NET = """
[data]
type = data
channels = 4
size = {h},{w}
[local1]
type = local
inputs = data
filters = 6
size = {k}
stride = {stride}
padding = {pad}
groups = {groups}
sharedBiases = {shared}
rounding = {rounding}
neuron = tanh[1.5,0.5]
[local2]
type = local
inputs = local1
filters = 3
size = 2
[fc3]
type = fc
inputs = local2
outputs = 5
[probs]
type = softmax
inputs = fc3
"""


@pytest.mark.parametrize("h, w, k, stride, pad, groups, shared, rounding", [
    (7, 9, 3, 1, 1, 1, 0, "down"), (8, 8, 3, 2, 0, 2, 1, "down"), (9, 7, 4, 3, 2, 2, 0, "up"),
    (10, 6, 5, 2, 1, 1, 1, "up"), (6, 6, 1, 1, 0, 2, 0, "down"),
])
def test_local_layers_run_in_onnxruntime_with_our_probabilities(h, w, k, stride, pad, groups, shared, rounding,
                                                                 tmp_path):
    """Unshared filters (per-position filter banks by Einsum on one-hot patches), groups, both bias kinds, rounding
    up's overhanging windows, rectangular images."""
    text = LOCAL_NET.format(h=h, w=w, k=k, stride=stride, pad=pad, groups=groups, shared=shared, rounding=rounding)
    net, _ = build_net(text, "local.cfg", device=NUMPY)
    assert net.layers["local1"].param_shapes()["b"] == ((6,) if shared else (6, *net.layers["local1"].out_shape[1:]))
    ours, _ = _compare(net, tmp_path, np.random.default_rng(h * k + stride), n=3)
    assert ours.max() > 0.3


LRN_NET = """
[data]
type = data
channels = 2
size = 7,9
[conv1]
type = conv
inputs = data
filters = 12
size = 3
padding = 1
neuron = relu
[rnorm1]
type = lrn
inputs = conv1
size = {size}
alpha = {alpha}
beta = 0.75
k = {k}
convention = {convention}
groups = {groups}
[fc2]
type = fc
inputs = rnorm1
outputs = 5
[probs]
type = softmax
inputs = fc2
"""


@pytest.mark.parametrize("size, convention, groups", [
    (4, "sum", 1), (2, "mean", 1), (6, "sum", 2), (4, "mean", 3),  # even sizes: ONNX's window is off by one
    (3, "sum", 2), (5, "mean", 3), (1, "sum", 4),  # groups: the window stays within a group
    (5, "sum", 1), (3, "mean", 1), (1, "mean", 1), (7, "sum", 1),  # ONNX's own LRN
])
def test_lrn_of_any_size_convention_and_groups_exports_exactly(size, convention, groups, tmp_path):
    # alpha large enough that the normalisation changes the activations by a factor of about 2 or more
    text = LRN_NET.format(size=size, convention=convention, groups=groups, k=1.5,
                          alpha=0.002 * (size if convention == "mean" else 1))
    net, _ = build_net(text, "lrn", device=NUMPY)
    rng = np.random.default_rng(size * 10 + groups)
    ours, x = _compare(net, tmp_path, rng, n=4)
    net.layers["rnorm1"].alpha = 0.0  # without the normalisation the probabilities are others: the test sees it
    assert np.abs(net.forward(x).T - ours).max() > 1e-2


RNORM_NET = LRN_NET.replace("""type = lrn
inputs = conv1
size = {size}
alpha = {alpha}
beta = 0.75
k = {k}
convention = {convention}
groups = {groups}""", """type = {type}
inputs = conv1
size = {size}
scale = {scale}
pow = 0.75
minDiv = {min_div}""")


@pytest.mark.parametrize("type_, size, min_div", [
    ("rnorm", 3, 1.0), ("rnorm", 4, 2.0), ("rnorm", 1, 0.5), ("rnorm", 9, 1.0),  # 9: wider than the 7x9 image
    ("cnorm", 3, 1.0), ("cnorm", 2, 1.5), ("cnorm", 5, 1.0), ("cnorm", 10, 2.0),
])
def test_rnorm_and_cnorm_of_any_size_export_exactly(type_, size, min_div, tmp_path):
    text = RNORM_NET.format(type=type_, size=size, scale=0.05 * size * size, min_div=min_div)
    assert "type = lrn" not in text
    net, _ = build_net(text, type_, device=NUMPY)
    rng = np.random.default_rng(size * 10 + len(type_))
    ours, x = _compare(net, tmp_path, rng, n=4)
    net.layers["rnorm1"].scale = 0.0  # without the normalisation the probabilities are others: the test sees it
    net.layers["rnorm1"].min_div = 1.0
    assert np.abs(net.forward(x).T - ours).max() > 1e-2


NEURON_NET = """
[data]
type = data
channels = 2
size = 6,5
[conv1]
type = conv
inputs = data
filters = 6
size = 3
padding = 1
neuron = {conv}
[act]
type = neuron
inputs = conv1
neuron = {act}
[fc2]
type = fc
inputs = act
outputs = 8
neuron = {fc}
[fc3]
type = fc
inputs = fc2
outputs = 5
[probs]
type = softmax
inputs = fc3
"""


@pytest.mark.parametrize("conv, act, fc", [
    ("tanh[1.5,0.5]", "logistic", "softrelu"),
    ("abs", "sqrt", "square"),  # sqrt of the abs: no NaN
    ("brelu[1.2]", "linear[0.5,-0.25]", "relu"),
    ("logistic", "softrelu", "tanh[-1.7159,0.6667]"),
    ("linear[2,1]", "brelu[0.5]", "abs"),
])
def test_every_neuron_exports_fused_and_as_a_neuron_layer(conv, act, fc, tmp_path):
    net, _ = build_net(NEURON_NET.format(conv=conv, act=act, fc=fc), "neurons", device=NUMPY)
    rng = np.random.default_rng(len(conv + act + fc))
    ours, x = _compare(net, tmp_path, rng, n=4)
    net.layers["act"].neuron = None  # without the neuron layer the probabilities are others: the test sees it
    assert np.abs(net.forward(x).T - ours).max() > 1e-3


JOIN_NET = """
[data]
type = data
channels = 3
size = 5,6
[conv1]
type = conv
inputs = data
filters = 4
size = 3
padding = 1
[conv2]
type = conv
inputs = data
filters = 4
size = 1
neuron = tanh[1,0.05]
[sum]
type = eltsum
inputs = conv1,conv2,conv1
coeffs = {coeffs}
[max]
type = eltmax
inputs = sum,conv2
[fc]
type = fc
inputs = max,conv1
outputs = 5
[probs]
type = softmax
inputs = fc
"""


@pytest.mark.parametrize("coeffs", ["1,1,1", "0.5,-2,1.5"])
def test_eltsum_and_eltmax_export_exactly(coeffs, tmp_path):
    net, _ = build_net(JOIN_NET.format(coeffs=coeffs), "joins", device=NUMPY)
    ours, x = _compare(net, tmp_path, np.random.default_rng(len(coeffs)), n=4)
    net.layers["sum"].coeffs = (1.0, 0.0, 0.0)  # other coefficients give other probabilities: the test sees them
    assert np.abs(net.forward(x).T - ours).max() > 1e-3


# two towers (devices 0 and 1) exchanging the way AlexNet's do, with every kind of join: channel-wise (conv3 reads
# both towers' maps), flattened images (fc4 reads both pools), features (fc5 reads both fc4s), an image and features
# (fc6 reads pool3b and fc5a); padded pools of both kinds, non-square windows, a relu layer, dropout
TOWERS = """
[data]
type = data
channels = 3
size = 13,11
scale = 0.0125
[conv1a]
type = conv
inputs = data
filters = 6
size = 3,5
stride = 2,1
padding = 1,2
neuron = relu
device = 0
[conv1b]
type = conv
inputs = data
filters = 4
size = 3
stride = 2,1
padding = 1
neuron = relu
device = 1
[pool1a]
type = pool
inputs = conv1a
pool = max
size = 3
stride = 2
padding = 1
device = 0
[pool1b]
type = pool
inputs = conv1b
pool = avg
size = 3,2
stride = 2
padding = 1
device = 1
[conv3a]
type = conv
inputs = pool1a, pool1b
filters = 6
size = 3
padding = 1
groups = 2
device = 0
[relu3a]
type = relu
inputs = conv3a
device = 0
[pool3b]
type = pool
inputs = pool1b
pool = avg
size = 2
stride = 1
device = 1
[fc4a]
type = fc
inputs = relu3a, pool3b
outputs = 8
neuron = relu
device = 0
[fc4b]
type = fc
inputs = relu3a, pool3b
outputs = 8
neuron = relu
device = 1
[drop4b]
type = dropout
inputs = fc4b
device = 1
[fc5a]
type = fc
inputs = fc4a, drop4b
outputs = 7
device = 0
[fc6]
type = fc
inputs = pool3b, fc5a
outputs = 6
device = 0
[probs]
type = softmax
inputs = fc6
device = 0
"""


@pytest.mark.parametrize("layout", ["nchw", "chwn"])
def test_two_tower_net_on_two_devices_exports_with_its_joins(layout, tmp_path):
    net, _ = build_net(TOWERS, "towers", devices="numpy:0,numpy:1")
    assert {str(l.device) for l in net.order} == {"numpy", "numpy:1"}
    assert net.layers["conv3a"].in_shape[0] == 10 and net.layers["fc6"].in_shape == (4 * 3 * 5 + 7,)
    _compare(net, tmp_path, np.random.default_rng(7), n=5, layout=layout)


def test_no_mean_exports_scale_only(tmp_path):
    net, _ = build_net(TOWERS, "towers", device=NUMPY)
    _compare(net, tmp_path, np.random.default_rng(8), mean=False)
    ops = [n.op_type for n in onnx.load(str(tmp_path / "towers.onnx")).graph.node]
    assert "Sub" not in ops and "Mul" in ops and "Dropout" not in ops


def test_the_exported_model_takes_the_raw_pixels_of_our_centre_test_view(tmp_path):
    """Images and mean larger than the input (a prepared ImageNet's 256 for 224): our evaluation loader crops both at
    the centre; the exported model takes the cropped raw pixels and crops the mean itself."""
    rng = np.random.default_rng(3)
    net, _ = build_net(TOWERS, "towers", device=NUMPY)
    images = rng.integers(0, 256, (6, 18, 14, 3), dtype=np.uint8)  # (N, H, W, C): 5 and 3 pixels to spare
    mean = rng.uniform(0, 255, (18, 14, 3)).astype(np.float32)
    loader = Loader(images, np.zeros(6, np.int64), 6, train=False, out_hw=(13, 11), mean=mean, scale=0.0125,
                    device=NUMPY, prefetch=0)
    (x, _), = list(loader.epoch(0))
    _lively(net, rng, x=x)
    ours = net.forward(x).T
    path = export.to_onnx(net, tmp_path / "t.onnx", mean=mean)
    crop = images[:, 2:15, 1:12].transpose(0, 3, 1, 2).astype(np.float32)
    _assert_same_probs(_run_onnx(path, crop), ours)


def test_a_run_directory_exports_from_the_command_line(tmp_path, capsys):
    from convnet.train import run
    from convnet import checkpoint as ckpt
    model = tmp_path / "tiny.cfg"
    model.write_text(TINY)
    run(["--model", str(model), "--out", str(tmp_path / "run"), "--no-progress", "--no-plots", "--device", "numpy",
         "--epochs", "1", "--synthetic-train", "64", "--synthetic-test", "16"], log=lambda s: None)
    out = tmp_path / "tiny.onnx"
    assert export.main(["onnx", str(tmp_path / "run"), str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    net, mean = export.load_checkpoint_net(tmp_path / "run")
    state = ckpt.load(tmp_path / "run")
    assert mean is not None and np.array_equal(mean, state["mean"])
    for k, v in state["params"].items():
        assert np.array_equal(net.state_dict()[k], v)
    rng = np.random.default_rng(0)
    raw = rng.uniform(0, 255, (4, 1, 8, 8)).astype(np.float32)
    x = np.ascontiguousarray(((raw - mean.transpose(2, 0, 1)[None]) * np.float32(0.0039215686)).transpose(1, 2, 3, 0))
    _assert_same_probs(_run_onnx(out, raw), net.forward(x).T)
    # CHWN input: the same probabilities
    assert export.main(["onnx", str(tmp_path / "run" / "checkpoint.npz"), str(tmp_path / "c.onnx"),
                        "--layout", "chwn"]) == 0
    _assert_same_probs(_run_onnx(tmp_path / "c.onnx", np.ascontiguousarray(raw.transpose(1, 2, 3, 0))),
                       net.forward(x).T)
    # an existing output is kept unless --overwrite
    assert export.main(["onnx", str(tmp_path / "run"), str(out)]) == 2
    assert "exists" in capsys.readouterr().err
    assert export.main(["onnx", str(tmp_path / "run"), str(out), "--overwrite"]) == 0
    # the command itself
    r = subprocess.run([sys.executable, "-m", "convnet.export", "onnx", str(tmp_path / "run"), str(tmp_path / "s.onnx")],
                       env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert onnx.load(str(tmp_path / "s.onnx")).SerializeToString() == onnx.load(str(out)).SerializeToString()


def test_a_missing_checkpoint_is_a_one_line_error(tmp_path, capsys):
    assert export.main(["onnx", str(tmp_path / "nothing"), str(tmp_path / "x.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not found" in err and err.count("\n") == 1
    assert not (tmp_path / "x.onnx").exists()


class _Unknown(ReLU):
    type = "mystery"


def test_a_layer_type_without_export_is_refused_by_name(tmp_path):
    net, _ = build_net(TOWERS, "towers", device=NUMPY)
    layers = [l for l in net.order]
    odd = _Unknown("odd", ["fc6"])
    net2 = type(net)([*layers[:-1], odd, type(layers[-1])("probs", ["odd"])], device=NUMPY)
    with pytest.raises(export.ExportError, match="layer 'odd': type 'mystery' has no ONNX export"):
        export.to_onnx(net2, tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


def test_a_key_the_export_does_not_know_is_refused_unless_it_keeps_its_default(monkeypatch, tmp_path):
    from convnet.layers import Key, Pool
    monkeypatch.setattr(Pool, "keys", (*Pool.keys, Key("dilation", "int", 1)))
    net, _ = build_net(TOWERS, "towers", device=NUMPY)
    for layer in net.order:
        layer.dilation = 1
    export.build_model(net)  # dilation = 1 everywhere: the default, the rule the export writes
    net.layers["pool1b"].dilation = 2
    with pytest.raises(export.ExportError, match="layer 'pool1b': dilation = 2 has no ONNX export here"):
        export.build_model(net)


def test_an_output_size_rule_onnx_lacks_is_refused(tmp_path):
    net, _ = build_net(TOWERS, "towers", device=NUMPY)
    c, h, w = net.layers["pool1a"].out_shape
    net.layers["pool1a"].out_shape = (c, h + 1, w)  # as a rounding-up rule would give
    with pytest.raises(export.ExportError, match="layer 'pool1a': its pooling output size"):
        export.build_model(net)


CC_LAYERS = """[data]
type=data
dataIdx=0

[labels]
type=data
dataIdx=1

[conv1]
type=conv
inputs=data
channels=3
filters=4
padding=1
stride={stride}
filterSize=3

[pool1]
type=pool
pool=max
inputs=conv1
sizeX=2
stride=2
channels=4

[drop]
type={dropout}
inputs=pool1

[fc10]
type=fc
outputs=3
inputs=drop

[probs]
type=softmax
inputs=fc10

[logprob]
type=cost.logreg
inputs=labels,probs
"""
CC_PARAMS = "[conv1]\nepsW=0.001\nepsB=0.002\nmomW=0.9\nmomB=0.9\nwc=0.004\n"


POOL_NET = """
[data]
type = data
channels = 3
size = {h},{w}
[conv1]
type = conv
inputs = data
filters = 4
size = 3
padding = 1
[pool1]
type = pool
inputs = conv1
pool = {pool}
size = {size}
stride = {stride}
rounding = up
start = {start}
outputsX = {outputs}
[fc]
type = fc
inputs = pool1
outputs = 5
[probs]
type = softmax
inputs = fc
"""


@pytest.mark.parametrize("pool, size, stride, start, outputs, hw, out", [
    ("max", 3, 2, 0, 0, (7, 8), (3, 4)),  # columns: the last window hangs over the edge (the floor rule: 3)
    ("avg", 3, 2, 0, 0, (8, 9), (4, 4)),  # rows hang over
    ("avg", 3, 2, -1, 0, (8, 9), (4, 5)),  # from before the image
    ("max", 3, 1, -2, 0, (5, 6), (5, 6)),
    ("avg", 2, 2, 1, 2, (7, 7), (2, 2)),  # from inside, fewer windows than fit: cropped at both ends
    ("max", 4, 3, 0, 0, (9, 10), (3, 3)),
    ("avg", 3, 2, 0, 0, (7, 7), (3, 3)),  # the floor rule's windows
])
def test_cuda_convnets_pool_windows_export_exactly(pool, size, stride, start, outputs, hw, out, tmp_path):
    text = POOL_NET.format(h=hw[0], w=hw[1], pool=pool, size=size, stride=stride, start=start, outputs=outputs)
    net, _ = build_net(text, "pools", device=NUMPY)
    assert net.layers["pool1"].out_shape[1:] == out
    _compare(net, tmp_path, np.random.default_rng(size * 10 + stride), n=3)


@pytest.mark.parametrize("name", ["80sec", "18pct", "conv-local-13pct"])
def test_cuda_convnets_own_cifar_nets_export_exactly(name, tmp_path):
    """The original files: rounding-up convs and pools, detached neuron layers, rnorm (18pct), locally connected
    layers (13pct)."""
    folder = ROOT / "tests" / "data" / "cuda-convnet" / "cuda-convnet"
    net = load_model(str(folder / f"layers-{name}.cfg"), params=str(folder / f"layer-params-{name}.cfg"),
                     input_shape=(3, 32, 32), device=CPU)[0]
    assert net.layers["pool1"].out_shape[1:] == (16, 16)  # cuda-convnet's rule (the floor rule: 15x15)
    ours, _ = _compare(net, tmp_path, np.random.default_rng(len(name)), n=2)
    assert ours.max() > 0.2


def _cuda_convnet_net(tmp_path, shape, stride, dropout):
    a, b = tmp_path / "layers.cfg", tmp_path / "params.cfg"
    a.write_text(CC_LAYERS.format(stride=stride, dropout=dropout))
    b.write_text(CC_PARAMS)
    return load_model(str(a), params=str(b), input_shape=shape, device="numpy")[0]


@pytest.mark.parametrize("shape, stride, conv_out, dropout", [
    ((3, 10, 10), 2, (6, 6), "dropout"), ((3, 10, 9), 3, (4, 4), "dropout2"), ((3, 8, 8), 1, (8, 8), "dropout2")])
def test_cuda_convnets_rounding_up_conv_and_dropout2_export_exactly(tmp_path, shape, stride, conv_out, dropout):
    """The conv's last windows reach zeros past the padding (more end padding in ONNX); the pool after it has the
    floor rule's windows; dropout2 multiplies by keep at test time."""
    net = _cuda_convnet_net(tmp_path, shape, stride, dropout)
    assert net.layers["conv1"].rounding == "up" and net.layers["conv1"].out_shape[1:] == conv_out
    assert net.layers["drop"].scaling == ("test" if dropout == "dropout2" else "train")
    ours, x = _compare(net, tmp_path, np.random.default_rng(stride), n=3)
    if dropout == "dropout2":  # without the factor the probabilities are others: the test sees it
        net.layers["drop"].scaling = "train"
        assert np.abs(net.forward(x).T - ours).max() > 1e-3


@pytest.mark.parametrize("mean, message", [
    (np.zeros((13, 11)), r"must be \(H, W, 3\)"),
    (np.zeros((13, 11, 1)), r"must be \(H, W, 3\)"),
    (np.zeros((12, 11, 3)), r"H >= 13"),
    (np.full((13, 11, 3), np.nan), "NaN"),
])
def test_a_mean_image_that_does_not_fit_is_refused(mean, message, tmp_path):
    net, _ = build_net(TOWERS, "towers", device=NUMPY)
    with pytest.raises(export.ExportError, match=message):
        export.to_onnx(net, tmp_path / "x.onnx", mean=mean)


def test_bad_layout_and_a_net_without_parameters_are_refused(tmp_path):
    net, _ = build_net(TOWERS, "towers", device=NUMPY)
    with pytest.raises(export.ExportError, match="layout must be 'nchw' or 'chwn'"):
        export.build_model(net, layout="nhwc")
    shapes, _ = build_net(TOWERS, "towers", device=NUMPY, init_params=False)
    with pytest.raises(export.ExportError, match="no parameters"):
        export.build_model(shapes)


def test_a_float64_net_exports_as_float32(tmp_path):
    net, _ = build_net(TOWERS, "towers", device=NUMPY, dtype="float64")
    _compare(net, tmp_path, np.random.default_rng(9))
    inits = onnx.load(str(tmp_path / "towers.onnx")).graph.initializer
    assert {i.data_type for i in inits} == {onnx.TensorProto.FLOAT}


def test_without_onnx_installed_the_error_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx raises ImportError
    net, _ = build_net(TOWERS, "towers", device=NUMPY)
    with pytest.raises(export.ExportError, match=r"pip install 'convnet\[onnx\]'"):
        export.to_onnx(net, tmp_path / "x.onnx")


NORM_NET = """
[data]
type = data
channels = 2
size = 7,6
scale = 0.01
[conv1]
type = conv
inputs = data
filters = 5
size = 3
padding = 1
neuron = relu
[norm1]
type = {type}
inputs = conv1
size = {size}
scale = {scale}
pow = 0.75
minDiv = 0.5
[fc2]
type = fc
inputs = norm1
outputs = 5
[probs]
type = softmax
inputs = fc2
"""


@pytest.mark.parametrize("kind", ["rnorm", "cnorm"])
@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 6, 9])  # even: one more row before; 9: larger than the 7x6 image
def test_rnorm_and_cnorm_windows_larger_than_the_image_and_even_export_exactly(kind, size, tmp_path):
    # scale large enough that the window sums change the activations by a factor of about 2 or more
    net, _ = build_net(NORM_NET.format(type=kind, size=size, scale=4.0), kind, device=NUMPY)
    ours, x = _compare(net, tmp_path, np.random.default_rng(size), n=4)
    if kind == "cnorm" and size == 1:  # each pixel is its window's mean: m = 0, and y = x * minDiv^-pow
        return
    net.layers["norm1"].scale = 0.0  # without the window sums the probabilities are others: the test sees them
    assert np.abs(net.forward(x).T - ours).max() > 1e-2


SLOTS_NET = """
[data]
type = data
channels = 3
size = 6,5
[conv1]
type = conv
inputs = data
filters = 6
size = 3
padding = 1
neuron = {0}
[act1]
type = neuron
inputs = conv1
neuron = {1}
[fc2]
type = fc
inputs = act1
outputs = 8
neuron = {2}
[act2]
type = neuron
inputs = fc2
neuron = {3}
[fc3]
type = fc
inputs = act2
outputs = 4
[probs]
type = softmax
inputs = fc3
"""


@pytest.mark.parametrize("neurons", [
    # each neuron fused on a conv, as a layer on images, fused on an fc and as a layer on features
    ("tanh[1.7,0.6]", "logistic", "softrelu", "abs"),
    ("abs", "sqrt", "square", "tanh[-1.2,1.5]"),
    ("brelu[1.5]", "linear[0.5,-0.3]", "tanh[2,0.5]", "softrelu"),
    ("softrelu", "abs", "brelu[0.8]", "linear[-1.5,0.2]"),
    ("square", "tanh[1.2,1.5]", "linear[-1.5,0.2]", "logistic"),
    ("linear[2,0.1]", "brelu[2]", "logistic", "square"),
    ("logistic", "square", "abs", "brelu[0.7]"),
    ("relu", "softrelu", "relu", "relu"),
    ("sqrt", "relu", "sqrt", "sqrt"),  # sqrt fused: positive weights on non-negative pixels
])
def test_every_neuron_in_every_slot_exports_exactly(neurons, tmp_path):
    net, _ = build_net(SLOTS_NET.format(*neurons), "neurons", device=NUMPY)
    positive = ("conv1", "fc2") if neurons[0] == "sqrt" else ()
    ours, x = _compare(net, tmp_path, np.random.default_rng(len("".join(neurons))), n=4, mean=not positive,
                       positive=positive)
    for name in ("conv1", "act1", "fc2", "act2"):  # the identity everywhere: other probabilities
        net.layers[name].neuron = None
    assert np.abs(net.forward(x).T - ours).max() > 1e-2


JOINS_NET = """
[data]
type = data
channels = 2
size = 5,6
[conv1a]
type = conv
inputs = data
filters = 4
size = 3
padding = 1
[conv1b]
type = conv
inputs = data
filters = 4
size = 3
padding = 1
[conv1c]
type = conv
inputs = data
filters = 4
size = 3
padding = 1
[sum1]
type = eltsum
inputs = conv1a, conv1b
coeffs = 0.7, -1.3
[max1]
type = eltmax
inputs = conv1a, conv1b, conv1c
[fc2a]
type = fc
inputs = sum1
outputs = 6
[fc2b]
type = fc
inputs = max1
outputs = 6
[fc2c]
type = fc
inputs = sum1, max1
outputs = 6
[sum2]
type = eltsum
inputs = fc2a, fc2b, fc2c
[max2]
type = eltmax
inputs = fc2a, fc2c
[scaled2]
type = eltsum
inputs = max2
coeffs = -2
[fc3]
type = fc
inputs = sum2, scaled2
outputs = 5
[probs]
type = softmax
inputs = fc3
"""


def test_eltsum_and_eltmax_of_images_and_features_export_exactly(tmp_path):
    net, _ = build_net(JOINS_NET, "joins", device=NUMPY)
    ours, x = _compare(net, tmp_path, np.random.default_rng(11), n=5)
    ops = [n.op_type for n in onnx.load(str(tmp_path / "joins.onnx")).graph.node]
    assert ops.count("Sum") == 3 and ops.count("Max") == 2
    net.layers["sum1"].coeffs = (0.7, 1.3)  # another coefficient: other probabilities
    assert np.abs(net.forward(x).T - ours).max() > 1e-2


# two towers (devices 0 and 1) exchanging the way AlexNet's do, with every kind of join: channel-wise (conv3 reads
# both towers' maps), flattened images (fc4 reads both pools), features (fc5 reads both fc4s), an image and features
# (fc6 reads pool3b and fc5a); padded pools of both kinds, non-square windows, a relu layer, dropout
