"""The paper's two-GPU split: the ``alexnet-2gpu`` model (two towers, ``device = 0|1``), the tower ->
device mapping (``devices`` / ``--devices``), the copy op between devices (host devices here; the cuda logic on a fake
CUDA runtime), the bytes exchanged per step checked against a count by hand, a missing copy between two virtual
devices caught by the device checks, and the equivalence of the two forms: the same training (dropout masks
included) from the same parameters, checkpoints that move between two devices and one, and the conversion of a
checkpoint between ``alexnet`` and ``alexnet-2gpu`` (:mod:`convnet.convert_towers`)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from convnet import checkpoint as ckpt
from convnet import ops
from convnet.convert_towers import ConversionError, Part, convert_checkpoint, convert_state, parameter_map
from convnet.convert_towers import main as convert_main
from convnet.devices import Device
from convnet.devices.backend_cuda import GpuCopier
from convnet.model_file import build_net, load_model, resolve_model
from convnet.optim import SGD
from convnet.train import run
from fake_cupy import FakeCupy
from helpers import EMU, NUMPY
from models import GROUPED_DROP, TOWERS_DROP, TWO_TOWERS

HOST_KINDS = ("numpy", "cpu", "emu")  # the kinds whose indices are virtual devices of the host

SIZE = 95  # small, and pool5 is still 2x2 (conv1 23, pool1 11, pool2 5): fc6 joins two real image inputs
BATCH = 3


def _text(name, size=SIZE):
    text, _ = resolve_model(name)
    assert text.count("size = 224") == 1
    return text.replace("size = 224", f"size = {size}")


def _grads(net):
    return {k: l.device.to_numpy(l.grads[p]) for k, l, p in net.param_items()}


def hand_count(size, batch, itemsize=4):
    """Bytes one training step of alexnet-2gpu copies each way, from the layer shapes worked out by hand:
    conv1 (size + 4 - 11) // 4 + 1 maps, each 3x3/2 pool (h - 3) // 2 + 1 (224: 55 -> 27 -> 13 -> 6)."""
    c1 = (size + 4 - 11) // 4 + 1
    p1 = (c1 - 3) // 2 + 1
    p2 = (p1 - 3) // 2 + 1
    p5 = (p2 - 3) // 2 + 1
    data, pool2, pool5, fc = 3 * size * size, 128 * p2 * p2, 128 * p5 * p5, 2048
    # tower 0 -> 1: forward the images (conv1b), pool2a (conv3b), pool5a (fc6b), drop6a (fc7b); backward the gradients
    # of pool2b (from conv3a), pool5b (fc6a), drop6b (fc7a), drop7b (fc8)
    to_1 = (data + pool2 + pool5 + fc) + (pool2 + pool5 + fc + fc)
    # tower 1 -> 0: forward pool2b (conv3a), pool5b (fc6a), drop6b (fc7a), drop7b (fc8); backward the gradients of
    # pool2a (from conv3b), pool5a (fc6b), drop6a (fc7b). The labels stay on tower 0 (data and probs are there).
    to_0 = (pool2 + pool5 + fc + fc) + (pool2 + pool5 + fc)
    return to_1 * itemsize * batch, to_0 * itemsize * batch


# --------------------------------------------------------------------------------------------------- the model
def test_alexnet_2gpu_is_alexnet_in_two_towers():
    one, _ = load_model("alexnet", init_params=False, device="numpy")
    two, train = load_model("alexnet-2gpu", init_params=False, device="numpy")
    assert two.num_params() == one.num_params() == 60_965_224
    assert two.flops() == one.flops()
    assert train == load_model("alexnet", init_params=False, device="numpy")[1]
    towers = {n: l.tower for n, l in two.layers.items()}
    assert towers["data"] == towers["fc8"] == towers["probs"] == 0
    for n, t in towers.items():
        if n[-1] in "ab":
            assert t == "ab".index(n[-1]), n
    shapes = {n: l.out_shape for n, l in two.layers.items()}
    for t in "ab":
        assert [shapes[f"conv{i}{t}"][0] for i in range(1, 6)] == [48, 128, 192, 192, 128]
        assert shapes[f"pool2{t}"] == (128, 13, 13) and shapes[f"pool5{t}"] == (128, 6, 6)
        assert shapes[f"fc6{t}"] == shapes[f"fc7{t}"] == (2048,)
        assert two.layers[f"fc6{t}"].in_shape == (256, 6, 6)
    # the towers exchange only at conv1b (the images), conv3, fc6, fc7 and fc8
    crossing = sorted(l.name for l in two.order if any(two.layers[i].tower != l.tower for i in l.inputs))
    assert crossing == ["conv1b", "conv3a", "conv3b", "fc6a", "fc6b", "fc7a", "fc7b", "fc8"]
    assert two.layers["conv3b"].inputs == ["pool2a", "pool2b"] and two.layers["fc8"].inputs == ["drop7a", "drop7b"]


@pytest.mark.parametrize("kind", HOST_KINDS)
def test_alexnet_2gpu_computes_the_grouped_alexnet_on_virtual_devices(kind):
    """Same function: alexnet's parameters copied over, the forward outputs and every parameter gradient of the two
    towers on kind:0/kind:1 (two virtual devices, whose arrays each accepts only its own) equal alexnet's on kind:0
    within float32 rounding (input 95x95, batch 3; dropout off: training is the next test)."""
    one, _ = build_net(_text("alexnet"), "alexnet.cfg", device=kind, seed=0)
    two, _ = build_net(_text("alexnet-2gpu"), "alexnet-2gpu.cfg", devices=f"{kind}:0,{kind}:1", seed=1)
    assert [str(d) for d in two.devices] == [kind, f"{kind}:1"]
    assert str(two.layers["conv5b"].device) == f"{kind}:1" and str(two.layers["fc8"].device) == kind
    two.load_state_dict(convert_state(one.state_dict(), one, two))
    w1 = two.layers["conv5b"].params["w"]
    assert two.devices[1].is_array(w1) and not two.devices[0].is_array(w1)  # tower 1's memory is its own
    rng = np.random.default_rng(7)
    x = rng.standard_normal((3, SIZE, SIZE, BATCH), dtype=np.float32)
    y = np.array([3, 999, 0], np.int32)
    p1, p2 = one.forward(x, y), two.forward(x, y)
    np.testing.assert_allclose(p2, p1, rtol=1e-5, atol=0)
    np.testing.assert_allclose(float(two.loss), float(one.loss), rtol=1e-6)
    one.backward()
    two.backward()
    g1, g2 = _grads(one), convert_state(_grads(two), two, one)
    assert g1.keys() == g2.keys() and len(g1) == 16
    for k in g1:
        scale = float(np.abs(g1[k]).max())
        assert scale > 0, k
        np.testing.assert_allclose(g2[k], g1[k], rtol=0, atol=2e-5 * scale, err_msg=k)
    # and the bytes that crossed are the hand count at this size (forward + backward of the step)
    to_1, to_0 = hand_count(SIZE, BATCH)
    assert two.exchange.bytes == {(kind, f"{kind}:1"): to_1, (f"{kind}:1", kind): to_0}
    assert one.exchange.bytes == {} and one.exchange_plan() == {}


def test_exchanged_bytes_of_alexnet_2gpu_at_batch_128():
    """The count of the full-size model from its shapes (no parameters, no run) against the hand count: per image,
    cuda:0 -> cuda:1 836,608 B (602,112 of them the images), cuda:1 -> cuda:0 234,496 B."""
    net, _ = load_model("alexnet-2gpu", init_params=False, devices="cuda:0,cuda:1")
    to_1, to_0 = hand_count(224, 128)
    assert (to_1, to_0) == (836_608 * 128, 234_496 * 128)
    assert net.exchange_plan(images=128) == {"cuda:0->cuda:1": to_1, "cuda:1->cuda:0": to_0}
    # both towers on one GPU: still copied (device to device), the towers named apart
    net, _ = load_model("alexnet-2gpu", init_params=False, devices="cuda:0,cuda:0")
    assert net.exchange_plan() == {"cuda:0[0]->cuda:0[1]": 836_608, "cuda:0[1]->cuda:0[0]": 234_496}
    s = net.summary()
    assert "cuda:0[0]->cuda:0[1] 836,608 B" in s and "towers 0=cuda:0, 1=cuda:0" in s
    assert "conv3b" in s and "device" in s.splitlines()[0]


def test_counted_bytes_equal_the_plan_for_towers_on_one_device():
    """By default both towers run on the net's one device; the copies and the count are the same as on two."""
    net, _ = build_net(_text("alexnet-2gpu"), "alexnet-2gpu.cfg", device="numpy", seed=0)
    assert net.devices == (NUMPY, NUMPY)
    x = np.random.default_rng(0).standard_normal((3, SIZE, SIZE, 2), dtype=np.float32)
    net.forward(x, np.array([1, 2], np.int32), train=True, step=0)
    net.backward()
    to_1, to_0 = hand_count(SIZE, 2)
    assert net.exchange.per_image() == {"numpy[0]->numpy[1]": to_1 / 2, "numpy[1]->numpy[0]": to_0 / 2}
    assert net.exchange_plan(images=2) == {"numpy[0]->numpy[1]": to_1, "numpy[1]->numpy[0]": to_0}
    net.forward(x)  # a forward starts a new count: here the forward's copies only
    assert net.exchange.bytes[("numpy[1]", "numpy[0]")] == 4 * 2 * (128 * 5 * 5 + 128 * 2 * 2 + 2 * 2048)


def test_gradients_are_summed_on_the_producers_device(monkeypatch):
    """Every copy goes through ops.copy, each gradient back to its producer's device (where it is summed)."""
    net, _ = build_net(TWO_TOWERS, "two.cfg", devices="numpy:0,numpy:1", dtype="float64")
    calls = []
    real = ops.copy

    def spy(dev, a, src, **kw):
        calls.append((str(src), str(dev), a.shape))
        return real(dev, a, src, **kw)

    monkeypatch.setattr(ops, "copy", spy)
    x = np.random.default_rng(1).standard_normal((1, 8, 8, 5))
    net.forward(x, np.arange(5, dtype=np.int32) % 4)
    forward = list(calls)
    # data -> convb (tower 1), conva -> fc (tower 1), labels stay on tower 0, fc's logits -> probs (tower 0)
    assert forward == [("numpy", "numpy:1", (1, 8, 8, 5)), ("numpy", "numpy:1", (3, 8, 8, 5)),
                       ("numpy:1", "numpy", (4, 5))]
    net.backward()
    assert calls[3:] == [("numpy", "numpy:1", (4, 5)), ("numpy:1", "numpy", (3, 8, 8, 5))]
    assert net.exchange_plan(images=5) == {"numpy->numpy:1": 8 * 5 * (64 + 192 + 4),
                                           "numpy:1->numpy": 8 * 5 * (4 + 192)}
    assert sum(net.exchange.bytes.values()) == sum(net.exchange_plan(images=5).values())


def test_a_layer_given_a_device_name_keeps_it():
    """``device = numpy:1`` is that device whatever the towers; it shares memory with a tower on the same device."""
    text = TWO_TOWERS.replace("outputs = 4\ndevice = 1", "outputs = 4\ndevice = numpy:1")
    net, _ = build_net(text, "two.cfg", devices="numpy,numpy:1")
    assert net.layers["fc"].tower is None and str(net.layers["fc"].device) == "numpy:1"
    same_place = net.placements.same_place
    assert same_place(net.layers["fc"], net.layers["convb"]) and not same_place(net.layers["fc"], net.layers["conva"])


# ------------------------------------------------------------------------------------------------- the copy op
@pytest.mark.parametrize("src, dst", [(NUMPY, Device("numpy", 1)), (EMU, Device("emu", 1)), (EMU, EMU),
                                      (NUMPY, EMU), (Device("emu", 1), NUMPY)], ids=str)
def test_copy_between_host_devices_is_a_real_copy(src, dst):
    a = src.asarray(np.arange(24, dtype=np.float32).reshape(2, 3, 4))
    b = ops.copy(dst, a, src)
    assert dst.is_array(b) and b.dtype == a.dtype and np.array_equal(b, a)
    assert not np.shares_memory(a, b)
    labels = src.asarray(np.array([3, 1], np.int32))
    assert np.array_equal(ops.copy(dst, labels, src), labels)
    out = dst.zeros((2, 3, 4), np.float32)
    assert ops.copy(dst, a, src, out=out) is out and np.array_equal(out, a)


def test_copy_checks_its_arguments():
    a = np.ones((2, 3), np.float32)
    with pytest.raises(TypeError, match="a must be a numpy.ndarray"):
        ops.copy(EMU, [1.0, 2.0], NUMPY)
    with pytest.raises(ValueError, match="C-contiguous"):
        ops.copy(EMU, a.T, NUMPY)
    with pytest.raises(ValueError, match=r"out must have shape \(2, 3\)"):
        ops.copy(EMU, a, NUMPY, out=np.zeros((3, 2), np.float32))
    with pytest.raises(TypeError, match="out must have dtype float32"):
        ops.copy(EMU, a, NUMPY, out=np.zeros((2, 3), np.float64))
    with pytest.raises(ValueError, match="out must not overlap a"):
        ops.copy(EMU, a, EMU, out=a)


# --------------------------------------------------------------------------- the cuda copy on a fake runtime
def _copier(n=16, **fake_settings):
    """A GpuCopier on a fake of two GPUs (recording), an array of GPU 0 and one of GPU 1, and what it warns."""
    fake, said = FakeCupy(devices=2), []
    vars(fake).update(fake_settings, recording=True)
    on0, on1 = fake.array_on(0, np.arange(n, dtype=np.float32)), fake.array_on(1, -np.arange(n, dtype=np.float32))
    return GpuCopier(cp=lambda: fake, warn=said.append), fake, on0, on1, said


def test_cuda_copy_between_two_gpus_is_peer_to_peer_ordered_by_events():
    copier, fake, on0, on1, said = _copier()
    assert copier.copy(on1, 1, 0, on0) is on0
    assert fake.calls == [  # (what, current GPU, stream, event or stream handle)
        ("can access peer", 0, 0, (0, 1)), ("can access peer", 0, 0, (1, 0)),  # once per pair, then enabled both ways
        ("enable peer", 0, 0, 1), ("enable peer", 1, 0, 0),
        ("record", 1, 0, 0), ("wait", 0, 0, 0),  # the consumer's stream waits for the producer's
        ("memcpy peer", 0, 0, 0),  # on the consumer's stream
        ("record", 0, 0, 1), ("wait", 1, 0, 1),  # a's memory is not reused before it was read
    ]
    assert (on0.get() == on1.get()).all()
    fake.calls.clear()
    with fake.cuda.Device(1):
        stream = fake.cuda.Stream(non_blocking=True)
    copier.copy(on0, 0, 1, on1, stream=stream)  # the other way, on a stream of the consumer's: no new peer setup
    assert [c[0] for c in fake.calls] == ["record", "wait", "memcpy peer", "record", "wait"]
    assert fake.calls[1][2] == fake.calls[2][3] == stream.ptr and fake.calls[2][1] == 1
    assert copier.peer == {(0, 1): True} and said == []


def test_cuda_copy_without_peer_access_is_staged_through_pinned_memory_and_said_once():
    copier, fake, on0, on1, said = _copier(peer_access=False)
    copier.copy(on0, 0, 1, on1)
    assert len(said) == 1 and "GPUs 0 and 1 cannot access each other's memory" in said[0]
    assert fake.calls[1:] == [  # (the first answer was no)
        ("memcpy", 0, 0, 0),  # device to pinned host, on the producer's stream
        ("record", 0, 0, 0), ("wait", 1, 0, 0),
        ("memcpy", 1, 0, 0),  # pinned host to device, on the consumer's stream
        ("record", 1, 0, 1),  # the pinned buffer is kept until this event has completed
    ]
    assert (on1.get() == on0.get()).all()
    assert len(copier._pending) == 1
    fake.events[1].done = False  # still copying: its buffer is kept
    copier.copy(on0, 0, 1, on1)
    assert len(said) == 1 and len(copier._pending) == 2  # said once per pair
    fake.events[1].done = True
    copier.copy(on0, 0, 1, on1)
    assert [e for e, _ in copier._pending] == [fake.events[-1]]  # the completed ones were let go


def test_cuda_copy_within_one_gpu_is_a_device_to_device_copy():
    copier, fake, on0, _, said = _copier()
    out = fake.array_on(0, np.zeros(16, np.float32))
    copier.copy(on0, 0, 0, out)  # one stream: ordered already
    assert fake.calls == [("memcpy", 0, 0, 0)]
    fake.calls.clear()
    other = fake.cuda.Stream(non_blocking=True)
    copier.copy(on0, 0, 0, out, stream=other)  # two streams of one GPU (two towers on it): events both ways
    s = other.ptr
    assert fake.calls == [("record", 0, 0, 0), ("wait", 0, s, 0), ("memcpy", 0, 0, s), ("record", 0, s, 1),
                          ("wait", 0, 0, 1)]
    assert copier.peer == {} and said == [] and (out.get() == on0.get()).all()
    fake.calls.clear()
    copier.copy(on0[:0], 0, 1, out)  # nothing to copy
    assert fake.calls == []


def test_cuda_peer_access_enabled_elsewhere_is_fine_and_other_errors_are_not():
    copier, fake, on0, on1, _ = _copier(peer_error=704)  # cudaErrorPeerAccessAlreadyEnabled
    copier.copy(on0, 0, 1, on1)
    assert copier.peer == {(0, 1): True}
    copier, fake, on0, on1, _ = _copier(peer_error=217)  # cudaErrorPeerAccessUnsupported
    with pytest.raises(RuntimeError, match="status 217"):
        copier.copy(on0, 0, 1, on1)


# ------------------------------------------------------------------------------------------ training, summary
@pytest.mark.parametrize("kind", HOST_KINDS)
def test_training_on_two_virtual_devices_logs_the_exchanged_bytes(tmp_path, kind):
    model = tmp_path / "two.cfg"
    model.write_text(TWO_TOWERS)
    logs = []
    res = run(["--model", str(model), "--out", str(tmp_path / "run"), "--no-progress", "--no-plots",
               "--synthetic-train", "32", "--synthetic-test", "16", "--devices", f"{kind}:0,{kind}:1"],
              log=logs.append)
    rec = res["history"][-1]
    # float32: forward the images (64) and conva (192) to tower 1 and the logits (4) back; backward the logits'
    # gradient (4) to tower 1 and conva's (192) back; convb sends none into the data
    plan = {f"{kind}->{kind}:1": 4 * (64 + 192 + 4), f"{kind}:1->{kind}": 4 * (4 + 192)}
    assert rec["exchanged_bytes_per_image"] == plan and rec["device"] == kind
    last = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[-1])
    assert last["exchanged_bytes_per_image"] == plan
    assert any(f"towers 0={kind}, 1={kind}:1" in line and f"{kind}->{kind}:1 1,040 B" in line for line in logs), logs


@pytest.mark.parametrize("crops", ["2", "10"])
def test_evaluation_with_views_on_a_virtual_device(tmp_path, crops):
    model = tmp_path / "two.cfg"
    model.write_text(TWO_TOWERS)
    run(["--model", str(model), "--out", str(tmp_path / "run"), "--no-progress", "--no-plots", "--synthetic-train",
         "32", "--synthetic-test", "16", "--devices", "numpy:1,numpy:0", "--eval-crops", crops], log=lambda s: None)


# which copy is left out (producer, consumer) -> the check that catches it, as an error message
MISSING_COPIES = {
    # forward, into an op: conv_forward on emu:1 is given the images of tower 0
    ("data", "convb"): r"x must be a numpy.ndarray for device {k}:1, got numpy.ndarray of {k}:0 \(untagged",
    # forward, into a join (not an op): the graph checks the inputs it concatenates
    ("conva", "fc"): r"layer 'fc' on {k}:1: input 'conva' is a numpy.ndarray of {k}:0 \(untagged host memory\), "
                     r"not an array of {k}:1 \(a copy between devices is missing\)",
    # forward, tower 1 -> tower 0: the softmax op on kind:0 is given tower 1's logits
    ("fc", "probs"): r"logits must be a numpy.ndarray for device {k}, got numpy.ndarray of {k}:1$",
    # backward: the gradient sent back to conva's device
    ("fc", "conva"): r"layer 'conva' on {k}: the gradient of its output from 'fc' is a numpy.ndarray of {k}:1, "
                     r"not an array of {k}",
}


@pytest.mark.parametrize("kind", HOST_KINDS)
@pytest.mark.parametrize("pair", MISSING_COPIES, ids="->".join)
def test_a_missing_copy_between_virtual_devices_fails_the_device_check(monkeypatch, kind, pair):
    """The graph's copy step for one exchange passes the array through unchanged (as a graph that forgot the copy
    would): the next op (or the join, or the gradient sum) on the other virtual device rejects it, naming both."""
    net, _ = build_net(TWO_TOWERS, "two.cfg", devices=f"{kind}:0,{kind}:1")
    real = net.placements.copy
    dropped = []

    def copy_but_one(a, src, dst):
        if (src.name, dst.name) == pair:
            dropped.append(pair)
            return a
        return real(a, src, dst)

    monkeypatch.setattr(net.placements, "copy", copy_but_one)
    x = np.random.default_rng(1).standard_normal((1, 8, 8, 5), dtype=np.float32)
    with pytest.raises(TypeError, match=MISSING_COPIES[pair].format(k=kind)):
        net.forward(x, np.arange(5, dtype=np.int32) % 4)
        net.backward()
    assert dropped == [pair]


def test_devices_flag_errors_and_summary(tmp_path, capsys):
    from convnet.train import main
    model = tmp_path / "two.cfg"
    model.write_text(TWO_TOWERS)
    out = str(tmp_path / "run")
    assert main(["--model", str(model), "--out", out, "--devices", "emu:0,tpu:1"]) == 2
    assert "argument --devices: unknown device 'tpu:1'" in capsys.readouterr().err
    assert main(["--model", str(model), "--out", out, "--devices", "emu:0,emu:1", "--device", "numpy"]) == 2
    assert "--device numpy is not the first of --devices emu:0,emu:1" in capsys.readouterr().err
    assert main(["--model", str(model), "--out", out, "--devices", "emu:0"]) == 2
    assert "layer 'convb' is on device 1 (a tower index), but the net has 1 device(s)" in capsys.readouterr().err
    assert main(["--model", "alexnet-2gpu", "--summary", "--devices", "cuda:0,cuda:1"]) == 0
    s = capsys.readouterr().out
    assert "towers 0=cuda:0, 1=cuda:1" in s and "cuda:0->cuda:1 836,608 B, cuda:1->cuda:0 234,496 B" in s
    assert "60,965,224 parameters" in s


# ----------------------------------------------------------------------------- the two forms are the same net
def test_parameter_map_of_the_shipped_models():
    """The conversion's mapping, derived from the two model files: each alexnet layer's filters (a conv weight's last
    axis) or units (an fc weight's first axis) are tower a's, then tower b's; fc8 is the same layer in both."""
    one, _ = load_model("alexnet", init_params=False, device="numpy")
    two, _ = load_model("alexnet-2gpu", init_params=False, device="numpy")
    parts = {m.key: m for m in parameter_map(one, two)}
    assert len(parts) == 16
    assert parts["conv1/w"] == Part("conv1/w", ("conv1a/w", "conv1b/w"), 3, (48, 48))
    assert parts["conv3/w"] == Part("conv3/w", ("conv3a/w", "conv3b/w"), 3, (192, 192))
    assert parts["fc6/w"] == Part("fc6/w", ("fc6a/w", "fc6b/w"), 0, (2048, 2048))
    assert parts["fc7/b"] == Part("fc7/b", ("fc7a/b", "fc7b/b"), 0, (2048, 2048))
    assert parts["fc8/w"] == Part("fc8/w", ("fc8/w",)) and parts["fc8/b"] == Part("fc8/b", ("fc8/b",))
    with pytest.raises(ConversionError, match=r"'conv1/b' has shape \(96,\) in alexnet but \(32,\) in fmnist"):
        parameter_map(one, load_model("fmnist", init_params=False, device="numpy")[0])


@pytest.mark.parametrize("kind", ["emu", "cpu"])
def test_training_the_two_forms_gives_the_same_losses_and_parameters(kind):
    """Three SGD steps with dropout on, alexnet (95x95, batch 3) on kind vs alexnet-2gpu on kind:0,kind:1 from the same
    parameters and seed: the towers' dropout layers draw their units of the one-device layers' masks (maskOf,
    maskStart), so the loss sequences and the parameters after the steps agree within float32 rounding."""
    one, _ = build_net(_text("alexnet"), "alexnet.cfg", device=kind, seed=4)
    two, _ = build_net(_text("alexnet-2gpu"), "alexnet-2gpu.cfg", devices=f"{kind}:0,{kind}:1", seed=4)
    two.load_state_dict(convert_state(one.state_dict(), one, two))
    start = one.state_dict()
    rng = np.random.default_rng(11)
    losses = {id(one): [], id(two): []}
    for step in range(3):
        x = rng.standard_normal((3, SIZE, SIZE, BATCH), dtype=np.float32)
        y = rng.integers(0, 1000, BATCH).astype(np.int32)
        for net in (one, two):
            net.forward(x, y, train=True, step=step)
            net.backward()
            SGD(net, lr=0.05, momentum=0.0, weight_decay=0.0).step()
            losses[id(net)].append(float(net.loss))
    np.testing.assert_allclose(losses[id(two)], losses[id(one)], rtol=1e-4)
    after_one, after_two = one.state_dict(), convert_state(two.state_dict(), two, one)
    for k in start:
        moved = after_one[k] - start[k]
        assert np.abs(moved).max() > 0, k
        np.testing.assert_allclose(after_two[k] - start[k], moved, rtol=0, atol=1e-3 * np.abs(moved).max(), err_msg=k)


def _train(tmp_path, model_text, out, *flags):
    model = tmp_path / f"{out}.cfg"
    model.write_text(model_text)
    return run(["--model", str(model), "--out", str(tmp_path / out), "--no-progress", "--no-plots",
                "--synthetic-train", "32", "--synthetic-test", "16", "--seed", "3", *flags], log=lambda s: None)


def _resume(tmp_path, out, *flags):
    return run(["--resume", str(tmp_path / out), "--no-progress", *flags], log=lambda s: None)


def _history(out):
    return [{k: r[k] for k in ("step", "train_loss", "train_error", "test_loss", "test_error")}
            for r in ckpt.load(out)["meta"]["history"]]


@pytest.mark.parametrize("kind", ["cpu", "emu"])
def test_checkpoints_move_between_two_devices_and_one(tmp_path, kind):
    """A run stopped in its first epoch on kind:0,kind:1 resumes with --device kind (both towers on it) and the other
    way round: the same parameters, momentum, loss sequence and test results as the run never moved (dropout on)."""
    two, one = f"{kind}:0,{kind}:1", kind
    _train(tmp_path, TOWERS_DROP, "ref", "--devices", two)
    ref = ckpt.load(tmp_path / "ref")
    for first, then in ((["--devices", two], ["--device", one]), (["--device", one], ["--devices", two])):
        out = f"moved-{then[0]}"
        assert _train(tmp_path, TOWERS_DROP, out, *first, "--max-steps", "3")["status"] == "max_steps"
        _resume(tmp_path, out, *then)
        moved = ckpt.load(tmp_path / out)
        assert moved["meta"]["config"]["devices"] == (two if then[0] == "--devices" else None)
        assert _history(tmp_path / out) == _history(tmp_path / "ref")
        for k in ref["params"]:
            assert np.array_equal(moved["params"][k], ref["params"][k]), k
            assert np.array_equal(moved["velocity"][k], ref["velocity"][k]), k
    ev = _resume(tmp_path, "ref", "--eval-only", "--device", one)  # evaluated on one device
    assert ev["test_loss"] == _history(tmp_path / "ref")[-1]["test_loss"]


def test_a_converted_checkpoint_continues_the_run_in_the_other_form(tmp_path, capsys):
    """python -m convnet.convert_towers: a grouped run stopped mid-epoch, converted to the two-tower form and resumed
    on cpu:0,cpu:1, ends where the grouped run does (losses within float32 rounding); converted back, it is the
    grouped state bit for bit."""
    _train(tmp_path, GROUPED_DROP, "grouped", "--device", "cpu")
    _train(tmp_path, GROUPED_DROP, "part", "--device", "cpu", "--max-steps", "3")
    towers = tmp_path / "towers.cfg"
    towers.write_text(TOWERS_DROP)
    (tmp_path / "conv").mkdir()
    assert convert_main([str(tmp_path / "part"), str(tmp_path / "conv" / "checkpoint.npz"), "--to", str(towers)]) == 0
    assert "wrote" in capsys.readouterr().out
    converted = ckpt.load(tmp_path / "conv")
    assert set(converted["velocity"]) == {f"{l}/{p}" for l in ("conva", "convb", "fca", "fcb", "out") for p in "bw"}
    assert converted["meta"]["config"]["model"] == str(towers) and "maskOf" in converted["meta"]["config"]["model_text"]
    _resume(tmp_path, "conv", "--devices", "cpu:0,cpu:1")
    got, want = _history(tmp_path / "conv"), _history(tmp_path / "grouped")
    assert [r["step"] for r in got] == [r["step"] for r in want] == [4, 8]
    for g, w in zip(got, want):
        np.testing.assert_allclose([g["train_loss"], g["test_loss"]], [w["train_loss"], w["test_loss"]], rtol=1e-5)
    # back to the grouped form: exactly the grouped state it came from
    back = tmp_path / "back.npz"
    convert_checkpoint(tmp_path / "conv" / "checkpoint.npz", back, str(tmp_path / "grouped.cfg"))
    back, final = ckpt.load(back), ckpt.load(tmp_path / "grouped")
    for k, v in final["params"].items():
        np.testing.assert_allclose(back["params"][k], v, rtol=1e-5, atol=1e-6, err_msg=k)
    assert back["meta"]["config"]["devices"] is None  # the grouped form has one tower
    # errors: an existing output, and a model whose parameters do not correspond
    assert convert_main([str(tmp_path / "part"), str(tmp_path / "back.npz"), "--to", str(towers)]) == 2
    assert "back.npz' exists" in capsys.readouterr().err
    assert convert_main([str(tmp_path / "part"), str(tmp_path / "x.npz"), "--to", "alexnet"]) == 2
    assert "error: parameter 'conv/b' of part has no counterpart in alexnet: neither" in capsys.readouterr().err


def test_converting_an_alexnet_checkpoint_keeps_its_outputs(tmp_path):
    """alexnet (95x95) saved, converted to alexnet-2gpu and loaded: the same forward outputs within float32 rounding;
    its momentum converted back is the original exactly."""
    one, _ = build_net(_text("alexnet"), "alexnet.cfg", device="cpu", seed=2)
    rng = np.random.default_rng(5)
    state = one.state_dict()
    velocity = {k: rng.standard_normal(v.shape, dtype=np.float32) for k, v in state.items()}
    config = {"model": "alexnet", "model_text": _text("alexnet"), "model_source": "alexnet.cfg", "devices": None}
    ckpt.save(tmp_path / "one.npz", params=state, velocity=velocity, mean=None, meta={"config": config, "step": 7})
    two_cfg = tmp_path / "alexnet-2gpu.cfg"
    two_cfg.write_text(_text("alexnet-2gpu"))
    convert_checkpoint(tmp_path / "one.npz", tmp_path / "two.npz", str(two_cfg))
    conv = ckpt.load(tmp_path / "two.npz")
    assert conv["meta"]["step"] == 7 and conv["meta"]["config"]["model_source"] == str(two_cfg)
    two, _ = build_net(conv["meta"]["config"]["model_text"], "two", devices="cpu:0,cpu:1")
    two.load_state_dict(conv["params"])
    x = rng.standard_normal((3, SIZE, SIZE, BATCH), dtype=np.float32)
    np.testing.assert_allclose(two.forward(x), one.forward(x), rtol=1e-5, atol=1e-7)
    one_cfg = tmp_path / "alexnet.cfg"
    one_cfg.write_text(_text("alexnet"))
    convert_checkpoint(tmp_path / "two.npz", tmp_path / "back.npz", str(one_cfg))
    back = ckpt.load(tmp_path / "back.npz")
    assert back["velocity"].keys() == velocity.keys()
    assert all(np.array_equal(back["velocity"][k], v) for k, v in velocity.items())
    with pytest.raises(ConversionError, match=r"parameter 'fc6/w' \(4096, 9216\) of alexnet is not its parts "
                                               r"in alexnet-2gpu, \(2048, 1024\) and \(2048, 1024\), joined"):
        convert_checkpoint(tmp_path / "two.npz", tmp_path / "x.npz", "alexnet")  # the shipped one: 224x224 inputs
