"""Training in a precision (``--precision``, ``[train] precision``, ``Net(precision=...)``): the defaults per device,
the one-line errors, what a run records, resume and evaluation, and a TF32 run following the FP32 one.

How close a TF32 run stays to the FP32 one is a *measured* bound, not a derived one: the first step's loss differs
only by the TF32 rounding of the conv and fc inputs (2**-11 relative per operand; measured 3e-5 on the fmnist net),
but SGD amplifies any difference from step to step -- even two FP32 runs that sum in different orders (emu and cpu)
part by a few hundredths of the loss within 40 steps -- so no useful per-step bound follows from the rounding. What
holds is that the *mean* loss over windows of steps stays together: on the fmnist net and the synthetic dataset (seeded,
so the numbers repeat) the worst window differed by 0.0052 (cpu, 25-step windows, 200 steps) and by 0.0071 (emu TF32 vs
FP32, 10-step windows, 40 steps). The tests allow 0.1 times the FP32 window mean plus 0.01: twice to ten times the
measured gaps, far below what a broken precision costs (a run that stops learning, or diverges, misses it by the loss
itself). The op tests (test_fc.py, test_conv_tf32*.py) hold the roundings to derived tolerances; these hold the
training loop to using them.

BF16 (activations and their gradients stored in bfloat16, 2**-9 relative per value, inputs of every multiplication
rounded to bfloat16) is held the same way with a wider bound, measured on the loaded 2-vCPU machine this was written
on: the first step's loss differed from FP32 by 9e-5 (cpu) and 3.2e-4 (emu's BF16 kernels against cpu's FP32); the
worst window mean by 0.018 (cpu, 25-step windows, 200 steps, where the FP32 mean was 0.072) and by 0.012 (emu, 10-step
windows, 40 steps, FP32 mean 1.88). The tests allow 0.2 times the FP32 window mean plus 0.04 (3 times the measured
gap on cpu, where it is tightest) and 1e-3 on the first step (3 times emu's).
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from convnet import checkpoint as ckpt
from convnet.data import load_dataset
from convnet.devices import Device
from convnet.graph import resolve_precision
from convnet.model_file import ModelFileError, build_net, load_model
from convnet.optim import SGD
from convnet.summary import activation_bytes
from convnet.reference.storage import BFLOAT16
from convnet.train import run
from helpers import CPU, EMU, NUMPY
from models import TINY


def _losses(device, precision, steps, batch):
    """The per-image training loss of each step of the fmnist net (seed 0) on the synthetic dataset."""
    ds = load_dataset("synthetic", shape=(1, 28, 28), classes=10, seed=0, synthetic_size=(steps * batch, 8))
    net, _ = load_model("fmnist", device=device, seed=0, precision=precision)
    assert net.precision == precision
    opt = SGD(net, lr=0.01)
    images = np.moveaxis(ds.train_x.astype(np.float32) / 255 - 0.5, 0, -1)  # (N, H, W, C) -> (H, W, C, N)
    images = np.ascontiguousarray(np.moveaxis(images, 2, 0))  # (C, H, W, N)
    losses = []
    for step in range(steps):
        part = slice(step * batch, (step + 1) * batch)
        x, y = device.asarray(images[..., part]), device.asarray(ds.train_y[part].astype(np.int32))
        net.forward(x, y, train=True, step=step)
        net.backward()
        opt.step()
        losses.append(float(net.loss) / batch)
    return np.array(losses)


def _assert_follows(tf32, fp32, window, relative=0.1, absolute=0.01):
    assert np.isfinite(tf32).all(), tf32
    assert abs(tf32[0] - fp32[0]) <= 1e-3, (tf32[0], fp32[0])  # the same weights: the rounding alone (3e-5 measured)
    assert (tf32 != fp32).any(), "the run trained bit for bit as fp32: the precision was not used"
    for start in range(0, len(fp32), window):
        a, b = fp32[start:start + window].mean(), tf32[start:start + window].mean()
        assert abs(a - b) <= relative * a + absolute, (f"steps {start}..{start + window - 1}: mean loss fp32 {a:.4f}, "
                                                       f"reduced precision {b:.4f}")
    assert fp32[-window:].mean() < 0.75 * fp32[:window].mean()  # the run learns, so following it means something


def test_tf32_training_follows_fp32_on_cpu():
    _assert_follows(_losses(CPU, "tf32", 200, 16), _losses(CPU, "fp32", 200, 16), window=25)


def test_tf32_training_follows_fp32_on_emu():
    """TF32 through the emulated tensor-core kernels, against the FP32 run on cpu: emu's FP32 is cpu's up to the
    order of its sums (test_train.py's emu/numpy step check), and an emu FP32 run would double this test's time."""
    _assert_follows(_losses(EMU, "tf32", 40, 8), _losses(CPU, "fp32", 40, 8), window=10)


def test_bf16_training_follows_fp32_on_cpu():
    _assert_follows(_losses(CPU, "bf16", 200, 16), _losses(CPU, "fp32", 200, 16), window=25, relative=0.2,
                    absolute=0.04)


def test_bf16_training_follows_fp32_on_emu():
    """BF16 through the emulated tensor-core kernels (forward, both backward), against the FP32 run on cpu."""
    _assert_follows(_losses(EMU, "bf16", 40, 8), _losses(CPU, "fp32", 40, 8), window=10, relative=0.2, absolute=0.04)


def test_bf16_net_stores_activations_and_gradients_in_bfloat16(monkeypatch):
    """Every layer output but the images and the probabilities is bfloat16 and every gradient a layer's backward gets
    is bfloat16, but for a layer without bfloat16 ops (rnorm here: it gets float32 in both passes, converted at its
    boundary); parameters, their gradients and the loss are float32."""
    model = TINY.replace("inputs = pool1\noutputs = 16", "inputs = rn\noutputs = 16").replace(
        "[fc2]", "[rn]\ntype = rnorm\ninputs = pool1\nsize = 3\nscale = 0.001\npow = 0.75\n[fc2]")
    seen = {}

    def spy(method, key):
        def run(self, a, ctx):
            if a is not None:
                seen.setdefault(self.name, {})[key] = a.dtype
            return method(self, a, ctx)
        return run

    net, _ = build_net(model, device="numpy", precision="bf16")
    for cls in {type(l) for l in net.order}:
        monkeypatch.setattr(cls, "forward", spy(cls.forward, "x"))
        monkeypatch.setattr(cls, "backward", spy(cls.backward, "dy"))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((*net.data_layer.out_shape, 5)).astype(np.float32)
    probs = net.forward(x, rng.integers(0, net.num_classes, 5).astype(np.int32), train=True)
    net.backward()
    assert probs.dtype == np.float32 and net.loss.dtype == np.float32
    natives = {l.name for l in net.order[1:] if l.bf16_native()}
    assert natives == {"conv1", "pool1", "fc2", "drop2", "fc3"}, natives
    for l in net.order[1:]:
        if l is not net.cost_layer:
            assert seen[l.name]["dy"] == (BFLOAT16 if l.name in natives else np.float32), l.name
        if l.name not in natives:
            assert seen[l.name]["x"] == np.float32, l.name
        assert all(p.dtype == np.float32 for p in (*l.params.values(), *l.grads.values())), l.name
    assert seen["conv1"]["x"] == np.float32 and seen["fc2"]["x"] == BFLOAT16  # the images; rn's output, stored


BOUNDARY = """
[data]
type = data
channels = 2
size = 9
[c1]
type = conv
inputs = data
filters = 4
size = 3
padding = 1
neuron = relu
[c2]
type = conv
inputs = c1
filters = 4
size = 3
stride = 2
neuron = tanh[1,1]
[p]
type = pool
inputs = c2
pool = avg
size = 3
stride = 2
padding = 1
[c3]
type = conv
inputs = c1
filters = 3
size = 4
stride = 2
[fc]
type = fc
inputs = p, c3
outputs = 5
[probs]
type = softmax
inputs = fc
"""


def test_bf16_layers_at_their_boundary_give_emu_numpys_gradients():
    """Layers that run in float32 between conversions (a conv with a tanh neuron, padded average pooling, the
    softmax) and an fc layer joining two inputs: emu's bf16 step equals numpy's up to the order of the FP32 sums, which
    may move a stored bfloat16 value by one rounding (2**-8) now and then: 2**-6 of each gradient's largest entry is
    allowed (measured: 8e-8, no rounding moved). The bf16 gradients differ from the fp32 ones (the rounding is used)."""
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((2, 9, 9, 6)).astype(np.float32), rng.integers(0, 5, 6).astype(np.int32)
    grads = {}
    for device, precision in ((NUMPY, "fp32"), (NUMPY, "bf16"), (EMU, "bf16")):
        net, _ = build_net(BOUNDARY, device=device, precision=precision, seed=1)
        net.forward(device.asarray(x), device.asarray(y), train=True)
        net.backward()
        grads[device.kind, precision] = {l.name: device.to_numpy(l.grads["w"]) for l in net.order if l.grads}
    assert {l.name for l in net.order[1:] if not l.bf16_native()} == {"c2", "p", "probs"}
    for name, want in grads["numpy", "bf16"].items():
        got, fp32 = grads["emu", "bf16"][name], grads["numpy", "fp32"][name]
        assert np.isfinite(got).all() and got.dtype == np.float32, name
        assert np.abs(got - want).max() <= 2 ** -6 * np.abs(want).max(), name
        assert (want != fp32).any(), name


# ------------------------------------------------------------------------------------------- defaults and errors
def test_defaults_tf32_only_on_a_gpu_with_tensor_cores(monkeypatch):
    from fake_cupy import FakeCupy
    for dev in (NUMPY, CPU, EMU):
        assert (dev.default_precision, dev.tensor_cores, resolve_precision(None, [dev])) == ("fp32", False, "fp32")
        assert resolve_precision("tf32", [dev]) == "tf32"  # emulated (rounded) off the GPU
    fake = FakeCupy(devices=1, compute_capability="80").install(monkeypatch)
    gpu = Device("cuda", 0)
    assert (gpu.tensor_cores, gpu.default_precision, resolve_precision(None, [gpu])) == (True, "tf32", "tf32")
    assert resolve_precision(None, [gpu, CPU]) == "fp32"  # a net partly on the host keeps fp32 by default
    fake.compute_capability = "75"
    assert (gpu.tensor_cores, gpu.default_precision, gpu.precisions) == (False, "fp32", ("fp32",))
    with pytest.raises(ValueError, match=r"^precision tf32 is not supported on cuda:0 \(it runs fp32\): tf32 needs a "
                                         r"GPU of compute capability 8.0 or newer \(tensor cores\)$"):
        resolve_precision("tf32", [gpu])


@pytest.mark.parametrize("precision, message", [
    ("fp16", "precision must be one of fp32, tf32, bf16, got 'fp16'")])
def test_a_precision_that_cannot_run_is_a_one_line_error(precision, message):
    with pytest.raises(ModelFileError, match=f"^fmnist.cfg: {message}$"):
        load_model("fmnist", device="numpy", precision=precision)


def test_bf16_needs_float32():
    with pytest.raises(ModelFileError, match="precision bf16 needs dtype float32"):
        load_model("fmnist", device="numpy", precision="bf16", dtype=np.float64)


def test_a_bf16_run_saves_float32_weights_resumes_and_evaluates_in_bf16(tmp_path, monkeypatch):
    from convnet.trainer import Trainer
    res = _run(tmp_path, "bf16", "--device", "emu", "--precision", "bf16")
    assert res["status"] == "done" and _saved_precision(tmp_path / "bf16") == "bf16"
    with np.load(tmp_path / "bf16" / "checkpoint.npz") as z:
        assert all(z[k].dtype == np.float32 for k in z.files if k != "meta")
    seen = []
    evaluate = Trainer.evaluate
    monkeypatch.setattr(Trainer, "evaluate", lambda self, **kw: seen.append(self.net.precision) or evaluate(self, **kw))
    res = run(["--resume", str(tmp_path / "bf16"), "--epochs", "2", "--no-progress", "--no-plots"], log=lambda s: None)
    assert res["status"] == "done" and _saved_precision(tmp_path / "bf16") == "bf16" and "bf16" in seen


# ------------------------------------------------------------------------------------ what a run records
def _run(tmp_path, name, *extra, log=None, model=TINY):
    (tmp_path / "m.cfg").write_text(model)
    return run(["--model", str(tmp_path / "m.cfg"), "--out", str(tmp_path / name), "--no-progress", "--no-plots",
                "--synthetic-train", "64", "--synthetic-test", "32", "--epochs", "1", *extra],
               log=log or (lambda s: None))


def _saved_precision(path):
    return ckpt.load(path)["meta"]["config"]["precision"]


def test_the_run_records_its_precision_and_a_resume_may_change_it(tmp_path):
    logs = []
    _run(tmp_path, "default", "--device", "cpu", log=logs.append)
    assert _saved_precision(tmp_path / "default") == "fp32"  # the device's default, resolved and saved
    assert "precision fp32" in logs[0]
    assert json.loads((tmp_path / "default" / "log.jsonl").read_text().splitlines()[0])["precision"] == "fp32"
    _run(tmp_path, "tf32", "--device", "cpu", "--precision", "tf32")
    assert _saved_precision(tmp_path / "tf32") == "tf32"
    # checkpoints hold FP32 parameters in every precision: a resume keeps the saved precision, or takes --precision
    logs = []
    res = run(["--resume", str(tmp_path / "tf32"), "--epochs", "2", "--no-progress", "--no-plots", "--precision",
               "fp32"], log=logs.append)
    assert res["status"] == "done" and _saved_precision(tmp_path / "tf32") == "fp32"
    assert "resumed from a checkpoint trained in tf32: its FP32 parameters go on in fp32" in logs
    run(["--resume", str(tmp_path / "tf32"), "--epochs", "3", "--no-progress", "--no-plots"], log=lambda s: None)
    assert _saved_precision(tmp_path / "tf32") == "fp32"
    with np.load(tmp_path / "tf32" / "checkpoint.npz") as z:
        assert all(z[k].dtype == np.float32 for k in z.files if k != "meta")


def test_train_section_sets_the_precision_and_evaluation_uses_it(tmp_path, monkeypatch):
    from convnet.trainer import Trainer
    _run(tmp_path, "r", "--device", "cpu", model=TINY + "precision = tf32\n")
    assert _saved_precision(tmp_path / "r") == "tf32"
    seen = []
    evaluate = Trainer.evaluate
    monkeypatch.setattr(Trainer, "evaluate", lambda self, **kw: seen.append(self.net.precision) or evaluate(self, **kw))
    run(["--eval-only", "--resume", str(tmp_path / "r"), "--no-plots", "--device", "cpu"], log=lambda s: None)
    assert seen == ["tf32"]


def test_a_model_file_with_a_bad_precision_names_the_key(tmp_path):
    with pytest.raises(Exception, match=r"\[train\] precision.*must be one of fp32, tf32, bf16"):
        _run(tmp_path, "r", "--device", "cpu", model=TINY + "precision = fp64\n")


def test_summary_gives_activation_bytes_per_precision():
    net, _ = load_model("fmnist", device="numpy", init_params=False)
    line = net.summary().splitlines()[-1]
    values = sum(int(np.prod(l.out_shape)) for l in net.order)
    kept = int(np.prod(net.data_layer.out_shape)) + int(np.prod(net.cost_layer.out_shape))  # float32 in bf16 too
    assert line == (f"activations per image (layer outputs): fp32 {4 * values:,} B, tf32 {4 * values:,} B, bf16 "
                    f"{2 * (values - kept) + 4 * kept:,} B (bf16: bfloat16 but for the images and probabilities)")
    with pytest.raises(ValueError, match="precision must be one of"):
        activation_bytes(net, "fp16")


@pytest.mark.parametrize("precision", ["fp32", "tf32"])
def test_conv_and_fc_layers_run_all_three_passes_in_the_nets_precision(monkeypatch, precision):
    """Every conv and fc multiplication of a training step (forward, input gradient, weight gradient) is asked for
    in the net's precision; nothing else is (pooling, dropout, softmax stay in the activations' dtype)."""
    from convnet import ops
    asked = []
    for name in ("conv_forward", "conv_backward_data", "conv_backward_filter", "fc_forward", "fc_backward_data",
                 "fc_backward_weights"):
        op = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _op=op, _name=name, **kw: asked.append(
            (_name, kw.get("precision"))) or _op(*a, **kw))
    net, _ = load_model("fmnist", device="numpy", seed=0, precision=precision)
    rng = np.random.default_rng(0)
    net.forward(rng.standard_normal((1, 28, 28, 4)).astype(np.float32), rng.integers(0, 10, 4).astype(np.int32),
                train=True)
    net.backward()
    convs, fcs = 3, 2  # conv1 takes the images: no input gradient
    assert sorted(asked) == sorted([("conv_forward", precision)] * convs + [("conv_backward_filter", precision)] * convs
                                   + [("conv_backward_data", precision)] * (convs - 1) + [("fc_forward", precision),
                                   ("fc_backward_weights", precision), ("fc_backward_data", precision)] * fcs)
