"""Ops on a stream other than the current one: every allocation and every array-module call of an op is ordered on
the op's ``stream``, so CuPy's per-stream memory pool never hands a buffer in use to another stream, and no part of
an op runs ahead on the current stream.

On the GPU each op runs on a non-default, busy stream and is compared with numpy. Off the GPU the same ops run on emu
with a stand-in stream object, and the test proves from the allocation calls that every buffer an op allocates is
allocated on the op's stream."""
from __future__ import annotations

import copy
import time

import numpy as np
import pytest

from convnet import ops
from convnet.devices import Device
from fake_cupy import FakeCupy
from helpers import EMU, NUMPY, rand, to_host

SHAPE_HELPERS = {"conv_output_shape", "pool_output_shape"}


def _inputs(rng):
    x = rand(rng, (8, 9, 9, 4))
    w = rand(rng, (4, 3, 3, 6))
    y = rand(rng, (6, 9, 9, 4))
    p = rand(rng, (8, 4, 4, 4))
    logits = rand(rng, (10, 5), low=-3, high=3)
    labels = rng.integers(0, 10, 5).astype(np.int32)
    fx, fw, fy = rand(rng, (12, 5)), rand(rng, (7, 12)), rand(rng, (7, 5))
    return dict(x=x, w=w, y=y, p=p, b=rand(rng, (6,)), logits=logits, labels=labels, fx=fx, fw=fw, fy=fy,
                fb=fy[:, 0].copy(), sw=rand(rng, (7, 12)), sg=rand(rng, (7, 12)), sv=rand(rng, (7, 12)),
                mw=rand(rng, (5, 3)), mg=rand(rng, (5, 3)), mv=rand(rng, (5, 3)),
                lw=rand(rng, (81, 4, 3, 3, 6)), lb=rand(rng, (6, 9, 9)))


# op name -> call(dev, a, stream) where a holds the inputs on dev; the result is an array or a tuple of arrays/ints
CALLS = {
    "relu_forward": lambda d, a, s: ops.relu_forward(d, a["x"], stream=s),
    "relu_backward": lambda d, a, s: ops.relu_backward(d, a["x"], a["x"], stream=s),
    "dropout_forward": lambda d, a, s: ops.dropout_forward(d, a["x"], 0.5, 7, 3, stream=s),
    "dropout_backward": lambda d, a, s: ops.dropout_backward(d, a["x"], 0.5, 7, 3, stream=s),
    "dropout_mask": lambda d, a, s: ops.dropout_mask(d, (8, 9, 9, 4), 0.5, 7, 3, stream=s),
    "neuron_forward": lambda d, a, s: ops.neuron_forward(d, a["x"], "tanh[1.5,0.5]", stream=s),
    "neuron_backward": lambda d, a, s: ops.neuron_backward(d, a["x"], None, a["x"], "square", stream=s),
    "eltsum_forward": lambda d, a, s: ops.eltsum_forward(d, [a["sw"], a["sg"]], [0.5, 2.0], stream=s),
    "eltsum_backward": lambda d, a, s: ops.eltsum_backward(d, a["sw"], -0.5, stream=s),
    "eltmax_forward": lambda d, a, s: ops.eltmax_forward(d, [a["sw"], a["sg"], a["sv"]], stream=s),
    "eltmax_backward": lambda d, a, s: ops.eltmax_backward(
        d, ops.eltmax_forward(d, [a["sw"], a["sg"]], stream=s)[1], a["sv"], 1, stream=s),
    "conv_forward": lambda d, a, s: ops.conv_forward(d, a["x"], a["w"], a["b"], padding=1, groups=2, relu=True,
                                                     stream=s),  # relu: the host devices' second op on the stream too
    "conv_backward_data": lambda d, a, s: ops.conv_backward_data(d, a["y"], a["w"], (9, 9), padding=1, groups=2,
                                                                 stream=s),
    "conv_backward_filter": lambda d, a, s: ops.conv_backward_filter(d, a["x"], a["y"], 3, padding=1, groups=2,
                                                                     stream=s),
    "conv_backward_bias": lambda d, a, s: ops.conv_backward_bias(d, a["y"], stream=s),
    "local_forward": lambda d, a, s: ops.local_forward(d, a["x"], a["lw"], a["lb"], padding=1, groups=2, stream=s),
    "local_backward_data": lambda d, a, s: ops.local_backward_data(d, a["y"], a["lw"], (9, 9), padding=1, groups=2,
                                                                   stream=s),
    "local_backward_filter": lambda d, a, s: ops.local_backward_filter(d, a["x"], a["y"], 3, padding=1, groups=2,
                                                                       stream=s),
    "local_backward_bias": lambda d, a, s: ops.local_backward_bias(d, a["y"], shared=False, stream=s),
    "pool_forward": lambda d, a, s: ops.pool_forward(d, a["x"], mode="max", window=3, stride=2, stream=s),
    "pool_backward": lambda d, a, s: ops.pool_backward(
        d, a["x"], ops.pool_forward(d, a["x"], stream=s), a["p"], mode="max", window=3, stride=2, padding=0,
        stream=s),
    "lrn_forward": lambda d, a, s: ops.lrn_forward(d, a["x"], groups=2, stream=s),
    "lrn_backward": lambda d, a, s: ops.lrn_backward(d, a["x"], None, None, a["x"], size=5, alpha=1e-2, beta=0.75,
                                                     k=2.0, convention="sum", groups=2, stream=s),
    "rnorm_forward": lambda d, a, s: ops.rnorm_forward(d, a["x"], size=3, alpha=2.0, stream=s),
    "rnorm_backward": lambda d, a, s: ops.rnorm_backward(
        d, a["x"], ops.rnorm_forward(d, a["x"], size=3, alpha=2.0, stream=s)[1], a["x"], size=3, alpha=2.0,
        beta=0.75, k=1.0, stream=s),
    "cnorm_forward": lambda d, a, s: ops.cnorm_forward(d, a["x"], size=4, alpha=2.0, stream=s),
    "cnorm_backward": lambda d, a, s: ops.cnorm_backward(
        d, a["x"], *ops.cnorm_forward(d, a["x"], size=4, alpha=2.0, stream=s)[1:], a["x"], size=4, alpha=2.0,
        beta=0.75, k=1.0, stream=s),
    "softmax_forward": lambda d, a, s: ops.softmax_forward(d, a["logits"], stream=s),
    "softmax_cross_entropy": lambda d, a, s: ops.softmax_cross_entropy(d, a["logits"], a["labels"], stream=s),
    "topk_errors": lambda d, a, s: ops.topk_errors(d, a["logits"], a["labels"], ks=(1, 3), stream=s),
    "fc_forward": lambda d, a, s: ops.fc_forward(d, a["fx"], a["fw"], a["fb"], stream=s),
    "fc_backward_data": lambda d, a, s: ops.fc_backward_data(d, a["fy"], a["fw"], stream=s),
    "fc_backward_weights": lambda d, a, s: ops.fc_backward_weights(d, a["fx"], a["fy"], stream=s),
    "fc_backward_bias": lambda d, a, s: ops.fc_backward_bias(d, a["fy"], stream=s),
    "copy": lambda d, a, s: ops.copy(d, a["x"], d, stream=s),
    "concat": lambda d, a, s: ops.concat(d, [a["x"], a["p"].reshape(-1, 4)[:81].reshape(1, 9, 9, 4)], stream=s),
    "add": lambda d, a, s: ops.add(d, a["fx"], a["fx"], stream=s),
    "scale": lambda d, a, s: ops.scale(d, a["fy"], 0.25, stream=s),
    "window": lambda d, a, s: ops.window(d, a["x"], (-1, 2), (11, 5), fill=float("-inf"), stream=s),
    "multiply": lambda d, a, s: ops.multiply(d, a["x"], a["x"], stream=s),
    "sgd_update": lambda d, a, s: ops.sgd_update(d, a["sw"], a["sg"], a["sv"], lr=0.1, momentum=0.9,
                                                 weight_decay=5e-4, stream=s),
    "sgd_update_many": lambda d, a, s: tuple(x for part in ops.sgd_update_many(
        d, [a["sw"], a["mw"]], [a["sg"], a["mg"]], [a["sv"], a["mv"]], lrs=[0.1, 0.05], momentums=[0.9, 0.5],
        weight_decays=[5e-4, 0.0], stream=s) for x in part),
}
# update arrays the caller gave: nothing to allocate (and the inputs change)
IN_PLACE_OPS = {"sgd_update", "sgd_update_many"}


def test_every_op_is_listed():
    assert set(CALLS) == set(ops.__all__) - SHAPE_HELPERS


def _flatten(result):
    items = result if isinstance(result, tuple) else (result,)
    return [np.asarray(i) if isinstance(i, (int, np.integer)) else to_host(i) for i in items if i is not None]


def _on(dev, arrays):
    return {k: dev.asarray(v, v.dtype) for k, v in arrays.items()}


def _busy_stream(dev):
    """A new stream of ``dev`` with work queued ahead of the op: on emu an emulated stream, slowed down, so the op
    runs later on its worker (its inputs must be read then, its outputs written then); None on cpu (no streams)."""
    if dev.kind != "cuda":
        stream = dev.new_stream()
        if stream is not None:
            stream.delay = 0.002
            stream.submit(lambda: time.sleep(0.02))
        return stream
    import cupy as cp
    # The inputs were uploaded on the current (null) stream, which a non-blocking stream does not wait for: they
    # must be complete before the op runs on the new stream (the ops order themselves on their stream, not on the
    # stream that wrote their inputs).
    dev.synchronize()
    with dev.activate():
        s = cp.cuda.Stream(non_blocking=True)
        with s:  # queue a few milliseconds of work ahead of the op
            a = cp.ones((4096, 4096), cp.float32)
            for _ in range(3):
                a = a @ a * cp.float32(1e-4)
    return s


@pytest.mark.parametrize("name", sorted(CALLS))
def test_op_on_a_busy_non_default_stream(kernel_device, name):
    host = _inputs(np.random.default_rng(5))
    want = _flatten(CALLS[name](NUMPY, copy.deepcopy(host), None))
    dev = kernel_device
    inputs = _on(dev, host)
    stream = _busy_stream(dev)  # after the upload of the inputs (it synchronises the device first)
    got = CALLS[name](dev, inputs, stream)
    if stream is not None:
        stream.synchronize()
    got = _flatten(got)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, name
        np.testing.assert_allclose(g.astype(np.float64), w.astype(np.float64), rtol=2e-5, atol=2e-6, err_msg=name)


@pytest.mark.parametrize("name", sorted(CALLS))
def test_op_allocates_only_on_its_stream(monkeypatch, name):
    """Every buffer an op allocates (outputs, scratch, workspaces) is allocated on the op's stream, and its
    array-module work runs inside ``on_stream(stream)``."""
    host = _inputs(np.random.default_rng(6))
    a = _on(EMU, host)
    stream = EMU.new_stream()
    seen, entered = [], []
    empty, zeros, on_stream = Device.empty, Device.zeros, Device.on_stream

    def record_empty(self, shape, dtype=np.float32, stream=None):
        seen.append(("empty", tuple(np.atleast_1d(shape)), stream))
        return empty(self, shape, dtype, stream=stream)

    def record_zeros(self, shape, dtype=np.float32, stream=None):
        seen.append(("zeros", tuple(np.atleast_1d(shape)), stream))
        return zeros(self, shape, dtype, stream=stream)

    def record_on_stream(self, s=None):
        entered.append(s)
        return on_stream(self, s)

    monkeypatch.setattr(Device, "empty", record_empty)
    monkeypatch.setattr(Device, "zeros", record_zeros)
    monkeypatch.setattr(Device, "on_stream", record_on_stream)
    CALLS[name](EMU, a, stream)
    stream.synchronize()
    assert seen or name in IN_PLACE_OPS, f"{name} allocated nothing through the device (its outputs must come from " \
                                         f"somewhere)"
    wrong = [c for c in seen if c[2] is not stream]
    assert not wrong, f"{name} allocated off its stream: {wrong}"
    assert all(s is stream for s in entered), f"{name} entered on_stream with another stream: {entered}"


@pytest.mark.parametrize("dev", [NUMPY, EMU], ids=str)
def test_elementwise_in_place_but_never_partially_overlapping(dev):
    buf = dev.asarray(rand(np.random.default_rng(1), (64,)))
    x, shifted = buf[:48], buf[16:64]
    assert ops.relu_forward(dev, x, out=x) is x  # exactly in place is fine
    with pytest.raises(ValueError, match="partially overlaps x"):
        ops.relu_forward(dev, x, out=shifted)
    with pytest.raises(ValueError, match="partially overlaps dy"):
        ops.relu_backward(dev, x.copy(), x, out=shifted)
    with pytest.raises(ValueError, match="partially overlaps x"):
        ops.dropout_forward(dev, x, 0.5, 1, out=shifted)
    with pytest.raises(ValueError, match="partially overlaps dy"):
        ops.dropout_backward(dev, x, 0.5, 1, out=shifted)


# ---------------------------------------------------------------------------------------------- a fake second GPU
# CuPy on the op's stream, no kernel of ours
ARRAY_MODULE_OPS = {"concat", "add", "scale", "window", "multiply", "sgd_update", "sgd_update_many"}
FAKE_GPU_OPS = sorted(set(CALLS) - {"copy"})  # copy: tests/test_two_towers.py runs it on a fake runtime


@pytest.mark.parametrize("explicit", [True, False], ids=["stream", "current-stream"])
@pytest.mark.parametrize("name", FAKE_GPU_OPS)
def test_op_on_a_fake_second_gpu_uses_its_device_and_stream(monkeypatch, name, explicit):
    """The cuda path of every op, on the CPU: CuPy replaced by tests/fake_cupy.py (CuPy's device/stream rules,
    numpy memory) and convnet._cuda by the emulator. With GPU 0 current, an op on cuda:1 makes every allocation,
    array-module call, result read and kernel launch with GPU 1 current and on the op's stream: ``stream=`` given, or
    (None) GPU 1's current stream -- not GPU 0's, which is what is current where the op is called."""
    fake = FakeCupy(devices=2).install(monkeypatch)
    dev = Device("cuda", 1)
    host = _inputs(np.random.default_rng(7))
    want = _flatten(CALLS[name](NUMPY, copy.deepcopy(host), None))
    a = _on(dev, host)
    assert all(v._dev == 1 for v in a.values())
    with fake.cuda.Device(1):
        ours = fake.cuda.Stream()
    fake.stacks[0].append(fake.cuda.Stream())  # GPU 0's current stream: must not be used
    if not explicit:
        fake.stacks[1].append(ours)  # GPU 1's current stream (GPU 0 stays the current device)
    fake.recording = True
    got = CALLS[name](dev, a, ours if explicit else None)
    fake.recording = False
    assert fake.current == 0
    launches = [e for e in fake.calls if e[0].startswith("launch")]  # the stream is the handle passed (not current)
    wrong = [e for e in fake.calls if (e[1], e[3] if e in launches else e[2]) != (1, ours.ptr)]
    assert not wrong, f"{name}: work off GPU 1's stream {ours.ptr} (what, device, current stream, handle): {wrong}"
    assert launches or name.startswith("fc_") or name in ARRAY_MODULE_OPS, f"{name} launched no kernel"
    got = _flatten(got)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, name
        np.testing.assert_allclose(g.astype(np.float64), w.astype(np.float64), rtol=2e-5, atol=2e-6, err_msg=name)


def test_reading_an_array_of_another_gpu_orders_on_that_gpu(monkeypatch):
    """to_numpy of a GPU-1 array with GPU 0 current copies on GPU 1's current stream (CuPy's get() uses the current
    device's stream, which is not ordered after GPU 1's work)."""
    fake = FakeCupy(devices=2).install(monkeypatch)
    a = fake.array_on(1, np.arange(4, dtype=np.float32))
    with fake.cuda.Device(1):
        fake.stacks[1].append(fake.cuda.Stream())
    fake.recording = True
    host = Device("cuda", 0).to_numpy(a)
    assert fake.calls == [("get", 1, fake.stacks[1][-1].ptr, None)] and fake.current == 0
    assert type(host) is np.ndarray and host.tolist() == [0, 1, 2, 3]
    assert Device("cuda", 1).to_numpy(np.ones(2)).tolist() == [1.0, 1.0]  # host arrays pass through
