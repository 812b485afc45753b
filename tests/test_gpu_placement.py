"""The cuda path as a GPU runs it, checked on the CPU with tests/helpers.FakeCupy (CuPy's device and stream rules,
the emulator's kernels). Its ``waits_for`` orders the recorded calls as a GPU would: each stream in order, events,
host synchronisations, and the legacy default stream's implicit barriers (a blocking stream and the null stream
wait for each other), so a test can tell work ordered by the program's events from work serialised by accident.

* streams: every stream the cuda device makes is non-blocking; a one-placement net computes on a stream of its own;
  the gradient all-reduce of a bucket (NCCL's stream) and the loader's stream are ordered with the compute by events
  only, never by an implicit barrier;
* two towers on one GPU sharing memory without a copy: the reverse wait (the lender's stream waits for the reader);
* the prepared loader's GPU upload is uint8, converted on the device to the host path's bits;
* cuBLAS gets a deterministic workspace configuration unless the user chose one.
"""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest

from helpers import FakeCupy, FakeNccl
from imagefolder_fixture import make_tree

from convnet.data import Loader, PreparedLoader, load_dataset
from convnet.data.prepare import prepare
from convnet.devices import backend_cuda, get_device
from convnet.distributed import GradReducer
from convnet.model_file import build_net
from convnet.optim import SGD

TINY = """
[data]
type = data
channels = 3
size = 12
[conv1]
type = conv
inputs = data
filters = 8
size = 3
padding = 1
neuron = relu
[pool1]
type = pool
inputs = conv1
pool = max
size = 2
stride = 2
[fc1]
type = fc
inputs = pool1
outputs = 16
neuron = relu
[fc2]
type = fc
inputs = fc1
outputs = 4
[probs]
type = softmax
inputs = fc2
"""


def _stream_of_call(e):
    """The stream handle a recorded call runs on (a launch's or copy's handle, else the current stream)."""
    return e[3] if e[0].startswith(("launch", "memcpy", "nccl")) else e[2]


def _batch(seed=0, n=8):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((3, 12, 12, n)).astype(np.float32), rng.integers(0, 4, n).astype(np.int32)


class TwoRanks:
    """A world of two ranks whose NCCL communicator is this process alone (installed by the test): each bucket is
    packed, all-reduced, scaled by 1/2 and unpacked as on rank 0 of two, the other rank contributing nothing."""
    rank, size, local_rank, local_size, timeout_s = 0, 2, 0, 2, 60.0

    def bcast(self, obj, root=0):
        return obj


def test_the_comm_stream_is_non_blocking_and_ordered_by_events_only(monkeypatch):
    """Data-parallel backward on a fake GPU: the net computes on a stream of its own (not the null stream), the
    NCCL stream waits for the gradients it reduces through events, no implicit barrier makes the next backward
    kernel wait for a bucket's all-reduce (they overlap), and the updates wait for the reductions."""
    fake = FakeCupy(devices=1).install(monkeypatch, usable=True)
    nccl = FakeNccl().install(fake)
    one = nccl.NcclCommunicator
    monkeypatch.setattr(nccl, "NcclCommunicator", lambda ndev, uid, rank: one(1, uid, 0))
    net, _ = build_net(TINY, "tiny.cfg", device="cuda:0", seed=0)
    ref, _ = build_net(TINY, "tiny.cfg", device="emu", seed=0)
    reducer = GradReducer(net, TwoRanks(), bucket_mb=2000 * 4 / 2**20)
    assert len(reducer.buckets) >= 2
    compute = getattr(net.stream_of(net.layers["conv1"]), "ptr", 0)  # None: the current (null) stream
    comm = reducer.transport.stream.ptr
    x, y = _batch()
    with net.device.activate():
        net.forward(net.device.asarray(x), net.device.asarray(y, np.int32), train=True, step=0)
    fake.recording = True
    net.backward(on_grads=reducer.on_grads)
    mark = len(fake.calls)
    reducer.finish(SGD(net, lr=0.0, momentum=0.0, weight_decay=0.0).step)
    fake.recording = False
    log = fake.calls
    assert not [e for e in log if e[0] in fake.HOST_SYNCS]  # the host never waits
    reduces = [i for i, e in enumerate(log) if e[0] == "nccl allReduce"]
    assert len(reduces) == len(reducer.buckets) and all(log[i][3] == log[i][2] == comm for i in reduces)
    # each gradient is copied into its bucket and back out on the comm stream
    assert len([e for e in log if e[0] == "setitem" and e[2] == comm]) == 2 * len(list(net.param_items()))
    kernels = [i for i, e in enumerate(log[:mark]) if e[0].startswith("launch") and e[3] == compute]
    overlapped = 0
    for i in reduces:
        before = [k for k in kernels if k < i]
        assert fake.waits_for(i, before[-1]), "an all-reduce does not wait for the gradients it reduces"
        after = [k for k in kernels if k > i]
        if after:  # the next backward kernel does not wait for this bucket's all-reduce
            assert not fake.waits_for(after[0], i), (log[i], log[after[0]])
            overlapped += 1
    assert overlapped >= 1 and 0 not in (compute, comm) and compute != comm
    updates = [k for k in range(mark, len(log)) if _stream_of_call(log[k]) == compute
               and log[k][0] not in ("record", "wait")]
    assert updates and all(fake.waits_for(k, reduces[0]) for k in updates)
    assert fake.waits_for(updates[-1], reduces[-1])
    ref.forward(x, y, train=True, step=0)
    ref.backward()
    for k, layer, p in net.param_items():  # each gradient: rank 0's half of the average
        want = ref.layers[layer.name].grads[p] * np.float32(0.5)
        np.testing.assert_array_equal(layer.device.to_numpy(layer.grads[p]), want, err_msg=k)


def test_the_loader_stream_is_non_blocking_and_ordered_by_events_only(monkeypatch):
    """A training epoch of the in-memory loader on a fake GPU, batches made ahead in the loader's thread while the
    consumer works on its own (null) stream: the loader's device work is on a stream of its own, each batch's first
    use waits for the batch's event, the loader's stream waits for events of the consumer's stream, and the legacy
    default stream adds no ordering between the two; the batches are the host loader's bits."""
    fake = FakeCupy(devices=1).install(monkeypatch, usable=True)
    dev = get_device("cuda:0")
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, (40, 10, 10, 3), dtype=np.uint8)
    labels = rng.integers(0, 4, 40).astype(np.int32)
    mean = rng.uniform(0, 255, (10, 10, 3)).astype(np.float32)
    common = dict(train=True, out_hw=(8, 8), mean=mean, scale=1 / 255, crop_pad=1, flip=True, seed=3, prefetch=2)
    ld, host = Loader(images, labels, 8, device=dev, **common), Loader(images, labels, 8, **common)
    fake.recording = True
    used = [(x * np.float32(1), y) for x, y in ld.epoch(0)]  # the consumer's work, on its current stream
    fake.recording = False
    log, loader = fake.calls, ld._stream.ptr
    assert loader != 0
    mine = [i for i, e in enumerate(log) if _stream_of_call(e) == loader]
    ready = [i for i in mine if log[i][0] == "record"]
    uses = [i for i, e in enumerate(log) if e[0] == "__mul__"]
    assert len(ready) == len(uses) == len(used) == 5 and all(log[i][2] == 0 for i in uses)
    assert all(fake.waits_for(u, r) for u, r in zip(uses, ready))  # each batch is ready before its use
    waits = [i for i in mine if log[i][0] == "wait"]
    released = {e[3]: e[2] for e in log if e[0] == "record"}
    # once the consumer has asked for a batch, each batch's work waits for the consumer's last request
    assert waits and all(released[log[w][3]] == 0 for w in waits)
    for i in mine:
        for j in uses:
            a, b = (j, i) if j > i else (i, j)
            assert fake.waits_for(a, b) == fake.waits_for(a, b, implicit=False), (log[b], log[a])
    for (x, y), (hx, hy) in zip(used, host.epoch(0)):
        assert dev.to_numpy(x).tobytes() == hx.tobytes() and dev.to_numpy(y).tolist() == hy.tolist()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    dst = tmp_path_factory.mktemp("prep") / "out"
    prepare("imagenet", make_tree(tmp_path_factory.mktemp("src")), dst, size=32, shard_size=4, jobs=1,
            progress=False, log=lambda s: None)
    return load_dataset("imagenet", dst)


@pytest.mark.parametrize("train", [True, False], ids=["train", "ten-views"])
def test_prepared_batches_go_up_as_uint8_and_convert_to_the_host_paths_bits(prepared, monkeypatch, train):
    """Worker processes hand a GPU loader uint8 crops, uploaded as they are (a quarter of float32's bytes) and
    converted on the device -- float, minus the mean, plus the PCA lighting, times the scale -- to the bits the host
    path computes (the fake runs the device's arithmetic with NumPy's float32 rounding)."""
    ds = prepared
    fake = FakeCupy(devices=1).install(monkeypatch, usable=True)
    uploads = []
    real_set = fake.ndarray.set
    monkeypatch.setattr(fake.ndarray, "set", lambda self, arr, stream=None: (uploads.append(arr.dtype),
                                                                              real_set(self, arr, stream)))
    x_, y_ = (ds.train_x, ds.train_y) if train else (ds.test_x, ds.test_y)

    def loader(device):
        return PreparedLoader(x_, y_, 4, train=train, out_hw=(24, 24), mean=ds.mean_image(),
                              eig=(ds.eigvals, ds.eigvecs), lighting=0.1 if train else 0.0, flip=True, scale=1 / 255,
                              seed=5, prefetch=2, workers=1, views=1 if train else 10, device=device)

    dev = get_device("cuda:0")
    with loader(dev) as gpu, loader(None) as host:
        fake.recording = True
        got = [(dev.to_numpy(x), dev.to_numpy(y)) for x, y in gpu.epoch(1)]
        fake.recording = False
        want = list(host.epoch(1))
    assert len(got) == len(want) > 0 and uploads and set(uploads) == {np.dtype(np.uint8)}
    sets = [e for e in fake.calls if e[0] == "set"]  # asynchronous copies from pinned memory, on the loader's stream
    assert len(sets) == len(got) and {e[2] for e in sets} == {gpu._stream.ptr}
    for (x, y), (hx, hy) in zip(got, want):
        assert x.dtype == hx.dtype == np.float32 and x.tobytes() == hx.tobytes() and (y == hy).all()


# ``shared`` is given its device by name: the towers on that GPU read it without a copy; in backward tower 1's
# gradient for it comes from tower 1's stream, tower 0's (when conva reads it) from shared's own; they are summed
SHARED = """
[data]
type = data
channels = 3
size = 8
[shared]
type = conv
inputs = data
filters = 4
size = 3
padding = 1
neuron = relu
device = {named}
[conva]
type = conv
inputs = {conva_input}
filters = 2
size = 3
padding = 1
device = 0
[convb]
type = conv
inputs = shared
filters = 2
size = 3
padding = 1
device = 1
[fc]
type = fc
inputs = conva, convb
outputs = 4
device = 0
[probs]
type = softmax
inputs = fc
device = 0
"""


@pytest.mark.parametrize("summed", [True, False], ids=["summed", "alone"])
def test_two_towers_on_one_gpu_give_back_memory_read_without_a_copy(monkeypatch, summed):
    """Two towers on one GPU: tower 1's gradient for ``shared`` is tower 1's memory, read on tower 0's stream without
    a copy -- by the sum with tower 0's gradient, or (``alone``: only tower 1 reads ``shared``) by ``shared``'s
    backward. Right after that read, before the memory is freed into tower 1's pool, tower 1's stream waits for
    tower 0's, so tower 1's next work cannot reuse it while the read may still run. The gradients are emu's."""
    text = SHARED.replace("{conva_input}", "shared" if summed else "data")
    fake = FakeCupy(devices=1).install(monkeypatch, usable=True)
    net, _ = build_net(text.format(named="cuda:0"), "shared.cfg", devices="cuda:0,cuda:0", seed=1)
    ref, _ = build_net(text.format(named="emu"), "shared.cfg", devices="emu,emu", seed=1)
    t0, t1 = (net.stream_of(net.layers[n]) for n in ("conva", "convb"))
    assert net.stream_of(net.layers["shared"]) is t0 and t0 is not t1
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((3, 8, 8, 6)).astype(np.float32), rng.integers(0, 4, 6).astype(np.int32)
    with net.device.activate():
        net.forward(net.device.asarray(x), net.device.asarray(y, np.int32), train=True)
    fake.recording = True
    net.backward()
    fake.recording = False
    log = fake.calls
    on_t0 = [i for i, e in enumerate(log) if e[0].startswith("launch") and e[3] == t0.ptr]
    adds = [i for i, e in enumerate(log) if e[0] == "add"]
    assert len(adds) == int(summed) and all(log[i][2] == t0.ptr for i in adds)
    # the read: the sum (then shared's backward reads the sum, tower 0's own memory), or shared's backward
    read = adds[0] if summed else on_t0[-1]
    until = next((i for i in on_t0 if i > read), len(log))  # tower 0's next kernel: the sum is freed by then
    back = [i for i in range(read + 1, until) if log[i][0] == "wait" and log[i][2] == t1.ptr]
    assert any(fake.waits_for(i, read) for i in back), "tower 1's stream does not wait for the read of its memory"
    ref.forward(x, y, train=True)
    ref.backward()
    for k, layer, p in net.param_items():
        np.testing.assert_array_equal(layer.device.to_numpy(layer.grads[p]), ref.layers[layer.name].grads[p],
                                      err_msg=k)


def test_cublas_gets_a_deterministic_workspace_unless_the_user_chose_one(monkeypatch):
    """cuBLAS picks its workspaces non-deterministically when several streams share a handle (CuPy's: one per device
    and thread): the cuda backend sets CUBLAS_WORKSPACE_CONFIG before it imports CuPy, unless it is set already."""
    fake = FakeCupy(devices=1)
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(backend_cuda, "_allocator_configured", True)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    assert backend_cuda.cupy() is fake
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    backend_cuda.cupy()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
