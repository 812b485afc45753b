"""The towers' streams.

* emu's emulated streams run their work on worker threads, asynchronously to the host, ordered by events -- so that
  a missing event wait between two towers is a wrong result here, in CI, and not a bug only a GPU would show: a test
  removes one wait from a two-tower step and sees the check fail.
* The cuda path of a two-tower step on a fake CUDA runtime (tests/fake_cupy.py: CuPy's device and stream rules,
  host memory): each tower's kernels on its own stream, every copy after an event wait, no host synchronisation."""
from __future__ import annotations

import gc
import threading
import time

import numpy as np
import pytest

from convnet import ops
from convnet.devices import Device, backend_cuda
from convnet.devices._host import HostDevice
from convnet.devices.host_streams import HostStream
from convnet.model_file import build_net
from convnet.optim import SGD
from fake_cupy import FakeCupy
from helpers import EMU, NUMPY, rand
from models import GROUPED_DROP, TOWERS_DROP

EMU1 = Device("emu", 1)


def _gate(stream):
    """Hold ``stream``'s worker until the returned event is set."""
    gate = threading.Event()
    stream.submit(lambda: gate.wait(30))
    return gate


# ------------------------------------------------------------------------------------------------ the streams
def test_a_stream_runs_its_work_in_order_after_the_host_has_moved_on():
    s = HostStream("emu:0")
    gate, seen = _gate(s), []
    for i in range(5):
        s.submit(lambda i=i: seen.append(i))
    assert seen == []  # submitted, not run: the host did not wait
    gate.set()
    s.synchronize()
    assert seen == [0, 1, 2, 3, 4]


def test_an_event_orders_one_streams_work_after_anothers():
    producer, consumer = HostStream("emu:0"), HostStream("emu:1")
    gate, seen = _gate(producer), []
    producer.submit(lambda: seen.append("written"))
    consumer.wait(producer.record())
    consumer.submit(lambda: seen.append("read"))
    time.sleep(0.05)
    assert seen == []  # the consumer waits for the producer's event, the producer for its gate
    gate.set()
    consumer.synchronize()
    assert seen == ["written", "read"]


def test_without_the_event_the_consumer_runs_first():
    """The control for the test above: the order comes from the event, not from luck."""
    producer, consumer = HostStream("emu:0"), HostStream("emu:1")
    gate, seen = _gate(producer), []
    producer.submit(lambda: seen.append("written"))
    consumer.submit(lambda: seen.append("read"))
    consumer.synchronize()
    gate.set()
    producer.synchronize()
    assert seen == ["read", "written"]


def test_an_error_is_raised_by_the_next_call_its_later_work_skipped_and_its_events_still_fire():
    s, other = HostStream("emu:1"), HostStream("emu:0")
    seen = []
    s.submit(lambda: (_ for _ in ()).throw(ValueError("bad launch")))
    s.submit(lambda: seen.append("after the error"))
    event = s.record()
    other.wait(event)  # must not hang
    other.submit(lambda: seen.append("other stream"))
    other.synchronize()
    with pytest.raises(ValueError, match="bad launch") as info:
        s.synchronize()
    assert "stream emu:1" in "".join(info.value.__notes__)
    assert seen == ["other stream"]
    s.submit(lambda: seen.append("usable again"))
    s.synchronize()
    assert seen == ["other stream", "usable again"]


def test_a_collected_stream_ends_its_worker():
    before = set(threading.enumerate())
    s = HostStream("emu:0")
    s.synchronize()
    (worker,) = set(threading.enumerate()) - before
    assert worker.is_alive()
    del s
    gc.collect()
    worker.join(timeout=5)
    assert not worker.is_alive()


# ---------------------------------------------------------------------------------------------------- emu ops
def test_an_emu_op_on_a_stream_returns_before_its_output_is_written():
    """The op is queued: its fresh output still holds emu's NaN fill until the stream runs it; reading the array with
    ``to_numpy`` waits for the stream, as ``cupy.ndarray.get()`` waits for the GPU."""
    s = EMU.new_stream()
    x = rand(np.random.default_rng(0), (4, 5, 6, 3))
    gate = _gate(s)
    y = ops.relu_forward(EMU, x, stream=s)
    assert np.isnan(y).all()  # read behind the stream's back: not written yet
    with EMU.on_stream(s):  # the current stream: an op without stream= goes there too
        z = ops.scale(EMU, y, 2.0)
    assert np.isnan(z).all()
    gate.set()
    np.testing.assert_array_equal(EMU.to_numpy(z), 2 * np.maximum(x, 0))


def test_the_numpy_and_cpu_devices_have_no_streams_and_emu_fills_new_arrays_with_nan():
    assert NUMPY.new_stream() is None and Device("cpu").new_stream() is None
    assert np.isnan(EMU.empty((3,))).all() and EMU.empty((3,), np.int32).dtype == np.int32


def test_a_copy_on_the_consumers_stream_waits_for_the_producers_stream():
    s0, s1 = EMU.new_stream(), EMU1.new_stream()
    x = rand(np.random.default_rng(1), (64,))
    gate = _gate(s0)
    y = ops.relu_forward(EMU, x, stream=s0)
    z = ops.copy(EMU1, y, EMU, stream=s1, src_stream=s0)
    w = ops.scale(EMU1, z, 3.0, stream=s1)
    gate.set()
    np.testing.assert_array_equal(EMU1.to_numpy(w), 3 * np.maximum(x, 0))


# ------------------------------------------------------------------------------- the two-tower step on streams
def _nets(devices, precision="fp32"):
    two, _ = build_net(TOWERS_DROP, "towers.cfg", devices=devices, seed=2, precision=precision)
    ref, _ = build_net(TOWERS_DROP, "towers.cfg", devices="numpy:0,numpy:1", seed=2, precision=precision)
    return two, ref


def _batch(step):
    rng = np.random.default_rng(100 + step)
    return rng.standard_normal((1, 8, 8, 8), dtype=np.float32), rng.integers(0, 4, 8).astype(np.int32)


def _step(net, step):
    x, y = _batch(step)
    probs = net.forward(x, y, train=True, step=step)
    net.backward()
    SGD(net, lr=0.05, momentum=0.9, weight_decay=5e-4).step()
    return net.device.to_numpy(probs).copy(), float(net.device.to_numpy(net.loss))


@pytest.mark.parametrize("devices", ["emu:0,emu:1", "emu:0,emu:0"])
def test_each_placement_has_a_stream_and_the_steps_equal_numpys(devices):
    """Two towers on two virtual devices, or on one (two streams, as two towers on one GPU): every placement gets an
    emulated stream of its own, and three training steps with slow streams equal the numpy run's."""
    two, ref = _nets(devices)
    streams = {two.placements.stream_of(two.layers[n]) for n in ("conva", "convb")}
    assert len(streams) == 2 and all(isinstance(s, HostStream) for s in streams)
    assert two.placements.stream_of(two.layers["probs"]) is two.placements.stream_of(two.layers["conva"])
    assert ref.placements.stream_of(ref.layers["conva"]) is None
    for s in streams:
        s.delay = 0.002  # both towers slow: the host runs far ahead of them
    for step in range(3):
        p, loss = _step(two, step)
        p_ref, loss_ref = _step(ref, step)
        np.testing.assert_allclose(p, p_ref, rtol=1e-5, atol=1e-6)
        assert loss == pytest.approx(loss_ref, rel=1e-5)


@pytest.mark.parametrize("devices", ["emu:0,emu:1", "emu:0,emu:0"])
def test_bf16_steps_on_slow_streams_follow_numpys(devices):
    """bf16 on two streams: the conversions to and from bfloat16 storage (and the bias gradients' conversion) run on
    the streams after the work that writes their inputs, on the device that holds them. A missed wait reads the NaN
    emu fills new arrays with. The bound: emu and numpy sum the FP32 products in different orders, which can move a
    stored bfloat16 value by one rounding (2**-8 relative); measured here: 1e-7, no rounding moved."""
    two, ref = _nets(devices, "bf16")
    for s in {two.placements.stream_of(two.layers[n]) for n in ("conva", "convb")}:
        s.delay = 0.002
    for step in range(3):
        p, loss = _step(two, step)
        p_ref, loss_ref = _step(ref, step)
        assert np.isfinite(p).all()
        np.testing.assert_allclose(p, p_ref, rtol=2 ** -8, atol=2 ** -12)
        assert loss == pytest.approx(loss_ref, rel=2 ** -8)


def test_a_net_on_one_placement_has_no_streams():
    net, _ = build_net(GROUPED_DROP, "grouped.cfg", device="emu", seed=2)
    assert all(net.placements.stream_of(l) is None for l in net.order)


def _without_one_wait(monkeypatch, chosen):
    """Make ``HostDevice.copy`` skip its event wait for the copies ``chosen(a, src, dst)`` (device indices) picks."""
    copy, skipped = HostDevice.copy, []

    def copy_maybe_unordered(self, a, src, out, stream=None, src_stream=None):
        if not chosen(a, src.index, self.index):
            return copy(self, a, src, out, stream, src_stream)
        skipped.append(a.shape)
        self.submit(lambda: np.copyto(out, a), stream)  # the copy, without waiting for the producer
        return out

    monkeypatch.setattr(HostDevice, "copy", copy_maybe_unordered)
    return skipped


@pytest.mark.parametrize("remove", [False, True], ids=["all-waits", "one-wait-removed"])
def test_removing_the_wait_before_one_copy_gives_a_wrong_result(monkeypatch, remove):
    """The copy of tower 1's dropout output to tower 0 (for the last fc layer) is ordered by an event on tower 1's
    stream (nothing else orders tower 0 after tower 1's dropout). Tower 1 is made slow; without that one wait tower 0
    copies the dropout output before it is written (emu's NaN fill) and the step is wrong -- every time, not now and
    then. With the wait the step equals numpy's."""
    two, ref = _nets("emu:0,emu:1")
    skipped = _without_one_wait(monkeypatch, lambda a, src, dst: remove and (src, dst) == (1, 0) and a.shape == (6, 8))
    two.placements.stream_of(two.layers["dropb"]).delay = 0.01
    p, loss = _step(two, 0)
    p_ref, loss_ref = _step(ref, 0)
    if not remove:
        assert skipped == []
        np.testing.assert_allclose(p, p_ref, rtol=1e-5, atol=1e-6)
        return
    assert skipped == [(6, 8)]
    assert not np.allclose(p, p_ref, rtol=1e-5, atol=1e-6, equal_nan=False)
    assert np.isnan(p).any() and np.isnan(loss)


# ------------------------------------------------------------------------------------- the cuda path, on a fake GPU
@pytest.mark.parametrize("devices", ["cuda:0,cuda:1", "cuda:0,cuda:0"])
def test_a_two_tower_step_on_gpus_runs_each_tower_on_its_stream_and_never_waits(monkeypatch, devices):
    """Forward and backward of the two-tower net on two (fake) GPUs, or both towers on one: every kernel launch and
    array-module call of a tower is on that tower's stream (never the null stream, where the loop works); every copy
    between the towers is on the consumer's stream right after it waits for an event recorded on the producer's; the
    host never synchronises; and the results are numpy's."""
    fake = FakeCupy(devices=2).install(monkeypatch)
    monkeypatch.setattr(backend_cuda.CudaDevice, "available", lambda self: (True, "a fake GPU"))
    two, ref = _nets(devices)
    x, y = _batch(0)
    xd, yd = two.device.asarray(x), two.device.asarray(y, np.int32)
    fake.recording = True
    probs = two.forward(xd, yd, train=True, step=0)
    two.backward()
    fake.recording = False
    log = fake.calls

    assert not [e for e in log if e[0] in ("get", "stream synchronize", "device synchronize")]
    tower = {0: two.placements.stream_of(two.layers["conva"]), 1: two.placements.stream_of(two.layers["convb"])}
    assert tower[0] is not tower[1]
    ptrs = {tower[0].ptr, tower[1].ptr}
    assert 0 not in ptrs
    launches = [e for e in log if e[0].startswith("launch")]
    assert launches and all(e[3] in ptrs for e in launches)
    if devices == "cuda:0,cuda:1":  # a tower's device tells its stream
        assert all(e[3] == tower[e[1]].ptr for e in launches)
    else:
        assert {e[3] for e in launches} == ptrs
    # Peer access is a setting of the device pair, made once per process (the first copy between the GPUs, in
    # whichever test comes first), not work on a stream: it is left out.
    setup = ("can access peer", "enable peer")
    work = [e for e in log if e not in launches and e[0] not in ("record", "wait") + setup
            and not e[0].startswith("memcpy")]
    assert work and all(e[2] in ptrs for e in work), [e for e in work if e[2] not in ptrs]
    copies = [i for i, e in enumerate(log) if e[0].startswith("memcpy")]
    # forward: the images to tower 1, conva -> fcb, convb -> fca, dropb -> out; backward: the gradients back
    assert len(copies) == 7, [log[i] for i in copies]
    for i in copies:
        record, wait, copy = log[i - 2], log[i - 1], log[i]
        assert (record[0], wait[0]) == ("record", "wait") and wait[3] == record[3]  # the event just recorded
        assert wait[2] == copy[3] != record[2]  # waited on by the consumer's stream, recorded on the producer's
    # the null stream only joins the towers (forks at the start of each pass, joins at the end)
    assert {e[0] for e in log if e[2] == 0 and not e[0].startswith("memcpy") and e[0] not in setup} <= {"record", "wait"}

    p_ref = ref.forward(x, y, train=True, step=0)
    ref.backward()
    np.testing.assert_allclose(two.device.to_numpy(probs), p_ref, rtol=1e-5, atol=1e-6)
    for (k, l, p), (_, lr, _) in zip(two.param_items(), ref.param_items()):
        np.testing.assert_allclose(l.device.to_numpy(l.grads[p]), lr.grads[p], rtol=1e-4, atol=1e-6, err_msg=k)
