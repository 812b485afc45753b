"""Which GPU the cuda path works on. A run on a GPU other than GPU 0 (``--device cuda:1``, a data-parallel rank >= 1,
a model's second tower) must allocate, launch and compute there only: CuPy allocates and runs an array-module call on
the *current* GPU, whatever GPU the operands are on, and every thread starts with GPU 0 current.

On the CPU the cuda path runs on tests/fake_cupy.py, which remembers the GPU each array was allocated on, raises
CrossDeviceError for a kernel launch, copy or array-module call with an operand on another GPU than the current one,
and logs which GPU was current for every call. With ``pytest -m cuda`` the same runs go to real GPUs, CuPy's
allocations and the kernel launches logged with the GPU current at the time (the cuda:1 forms need two GPUs).

How the streams are ordered: the fake's ``waits_for`` orders the recorded calls as a GPU would (each stream in
order, events, host synchronisations, and the legacy default stream's implicit barriers: a blocking stream and the
null stream wait for each other), so a test can tell work ordered by the program's events from work serialised by
accident.

* streams: every stream the cuda device makes is non-blocking; a one-placement net computes on a stream of its own;
  the gradient all-reduce of a bucket (NCCL's stream) and the loader's stream are ordered with the compute by events
  only, never by an implicit barrier;
* two towers on one GPU sharing memory without a copy: the reverse wait (the lender's stream waits for the reader);
* the prepared loader's GPU upload is uint8, converted on the device to the host path's bits;
* cuBLAS gets a deterministic workspace configuration unless the user chose one.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from fake_cupy import CrossDeviceError, FakeCupy, FakeNccl  # noqa: E402
from helpers import EMU  # noqa: E402
from imagefolder_fixture import make_tree  # noqa: E402
from test_distributed import needs_mpi, run_ranks  # noqa: E402
from test_imagenet import TINY_RGB  # noqa: E402
from test_train import TINY  # noqa: E402
from test_two_towers import TWO_TOWERS  # noqa: E402

from convnet.data import Loader, PreparedLoader, load_dataset  # noqa: E402
from convnet.data.prepare import prepare  # noqa: E402
from convnet.devices import backend_cuda, device_report, get_device  # noqa: E402
from convnet.distributed import GradReducer  # noqa: E402
from convnet.model_file import build_net  # noqa: E402
from convnet.optim import SGD  # noqa: E402
from convnet.train import main, run  # noqa: E402


# the two-tower model with its softmax on the second tower: the loss, the probabilities and the test sums on GPU 1,
# the batches (and their labels) on GPU 0
SOFTMAX_ON_TOWER_1 = TWO_TOWERS.replace("type = softmax\ninputs = fc\ndevice = 0", "type = softmax\ninputs = fc\n"
                                                                                     "device = 1")
assert SOFTMAX_ON_TOWER_1 != TWO_TOWERS


def _gpus_missing(n):
    """Why real GPUs 0..n-1 cannot run these tests (None: they can)."""
    report = {e["device"]: e for e in device_report()}
    if "cuda" in report:  # no GPU at all: the report's one entry says why
        return report["cuda"]["detail"]
    entry = report.get(f"cuda:{n - 1}")
    if entry is None:
        return f"only {sum(d.startswith('cuda:') for d in report)} GPU(s) present"
    return None if all(report[f"cuda:{i}"]["usable"] for i in range(n)) else entry["detail"]


def real_gpus(n):
    """A parameter mark: the test runs on n real GPUs (``cuda``), skipped with the reason where there are fewer."""
    missing = _gpus_missing(n)
    return [pytest.mark.cuda] + ([pytest.mark.skip(reason=missing)] if missing else [])


class GpuLog:
    """Where work went on real GPUs: every CuPy allocation and every launch of our kernels, logged as
    ``(what, current GPU)`` (the GPU an allocation lands on, the GPU a launch runs on)."""

    def __init__(self, monkeypatch):
        import cupy as cp
        from convnet.devices import backend_cuda

        self.calls = []
        previous = cp.cuda.get_allocator()

        def malloc(size):
            self.calls.append(("alloc", cp.cuda.Device().id))
            return previous(size)

        cp.cuda.set_allocator(malloc)
        self.restore = lambda: cp.cuda.set_allocator(previous)
        real = backend_cuda.CudaDevice.kernels.fget
        log = self.calls

        class Kernels:
            def __init__(self, module):
                self.module = module

            def __getattr__(self, name):
                attr = getattr(self.module, name)
                if not callable(attr) or name.endswith(FakeCupy.HOST_ONLY) or isinstance(attr, type):
                    return attr

                def launch(*args):
                    log.append((f"launch {name}", cp.cuda.Device().id))
                    return attr(*args)
                return launch

        monkeypatch.setattr(backend_cuda.CudaDevice, "kernels", property(lambda dev: Kernels(real(dev))))


@pytest.fixture
def gpus(request, monkeypatch):
    """``(kind, calls)``: "fake" (a FakeCupy of two GPUs installed, recording) or "cuda" (real GPUs, a GpuLog);
    ``calls`` the list of ``(what, current GPU, ...)`` the run fills. None: neither (a host device's run)."""
    if request.param is None:
        return None
    if request.param == "fake":
        fake = FakeCupy(devices=2).install(monkeypatch, usable=True)
        fake.recording = True
        return "fake", fake.calls
    log = GpuLog(monkeypatch)
    request.addfinalizer(log.restore)
    return "cuda", log.calls


def _trained(res, out):
    """A run's per-epoch numbers and its checkpoint's arrays (not its metadata)."""
    hist = [(h["train_loss"], h["train_error"], h["test_loss"], h["test_error"]) for h in res["history"]]
    with np.load(out / "checkpoint.npz") as z:
        return hist, {k: z[k] for k in z.files if k != "meta"}


def assert_same_training(got, want, exact):
    """The same epochs' numbers and checkpoint: bit for bit (``exact``), else within float32 rounding."""
    if exact:
        assert got[0] == want[0]
    else:
        for g, w in zip(got[0], want[0]):
            assert g == pytest.approx(w, rel=1e-3, abs=1e-5)
    assert got[1].keys() == want[1].keys()
    for k in want[1]:
        if exact:
            np.testing.assert_array_equal(got[1][k], want[1][k], err_msg=k)
        else:
            np.testing.assert_allclose(got[1][k], want[1][k], rtol=1e-3, atol=1e-5, err_msg=k)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A tiny prepared ImageNet-style set (32x32 images: ten 24x24 crops of each)."""
    from convnet.data.prepare import prepare
    tree = make_tree(tmp_path_factory.mktemp("src"))
    dst = tmp_path_factory.mktemp("prep") / "out"
    prepare("imagenet", tree, dst, size=32, shard_size=4, jobs=1, progress=False, log=lambda s: None)
    return dst


RUNS = {  # model, data, evaluation flags
    "multiview": (TINY, None, ["--multiview", "--synthetic-train", "64", "--synthetic-test", "32"]),
    "ten-crops": (TINY_RGB, "prepared", ["--eval-crops", "10", "--workers", "0"]),
    "ten-crops-workers": (TINY_RGB, "prepared", ["--eval-crops", "10", "--workers", "1"]),
}


@pytest.mark.parametrize("gpus, gpu", [
    pytest.param("fake", 1, id="fake-cuda:1"),
    pytest.param("cuda", 0, id="cuda:0", marks=real_gpus(1)),
    pytest.param("cuda", 1, id="cuda:1", marks=real_gpus(2)),
], indirect=["gpus"])
@pytest.mark.parametrize("what", list(RUNS))
def test_a_whole_run_on_one_gpu_allocates_and_launches_only_there(tmp_path, request, gpus, gpu, what):
    """Training and evaluation (--multiview; --eval-crops 10 on a prepared set, batches from the loader's thread or
    from worker processes) on cuda:N: every allocation, kernel launch, copy and array-module call with GPU N current,
    and the numbers of the same run on emu."""
    model, data, flags = RUNS[what]
    cfg = tmp_path / "model.cfg"
    cfg.write_text(model)
    args = ["--model", str(cfg), "--no-progress", "--no-plots", "--epochs", "1" if gpus[0] == "cuda" else "2",
            *(["--data", str(request.getfixturevalue("prepared"))] if data else []), *flags,
            "--precision", "fp32"]  # emu's (a GPU with tensor cores defaults to tf32)
    kind, calls = gpus
    want = _trained(run([*args, "--out", str(tmp_path / "emu"), "--device", "emu"], log=lambda s: None),
                    tmp_path / "emu")
    res = run([*args, "--out", str(tmp_path / "gpu"), "--device", f"cuda:{gpu}"], log=lambda s: None)
    assert res["history"][-1]["device"] == f"cuda:{gpu}"
    assert_same_training(_trained(res, tmp_path / "gpu"), want, exact=kind == "fake")  # the fake runs emu's kernels
    assert any(c[0].startswith("launch") for c in calls)
    elsewhere = sorted({c[0] for c in calls if c[1] != gpu})
    assert not elsewhere, f"with GPU {gpu}'s run: {elsewhere} on another GPU"


@pytest.mark.parametrize("devices, gpus", [
    pytest.param("numpy:0,numpy:1", None, id="numpy:0,numpy:1"),
    pytest.param("emu:0,emu:1", None, id="emu:0,emu:1"),
    pytest.param("cuda:0,cuda:1", "fake", id="fake-cuda:0,cuda:1"),
    pytest.param("cuda:0,cuda:1", "cuda", id="cuda:0,cuda:1", marks=real_gpus(2)),
], indirect=["gpus"])
def test_a_softmax_on_the_second_tower_sums_the_loss_and_errors_on_its_gpu(tmp_path, devices, gpus):
    """The softmax on tower 1, the data on tower 0: the training sums, the multiview evaluation and the top-k counts
    are made on the softmax's device (the batches' labels copied there), with the numbers of the whole net on one
    numpy device (bit for bit on two virtual numpy devices). On emu the labels reach the softmax through a copy on an
    emulated stream: the softmax may not read them on the host before that copy has run."""
    cfg = tmp_path / "model.cfg"
    cfg.write_text(SOFTMAX_ON_TOWER_1)
    args = ["--model", str(cfg), "--no-progress", "--no-plots", "--synthetic-train", "64", "--synthetic-test", "32",
            "--epochs", "2", "--multiview", "--precision", "fp32"]
    want = _trained(run([*args, "--out", str(tmp_path / "one"), "--device", "numpy"], log=lambda s: None),
                    tmp_path / "one")
    res = run([*args, "--out", str(tmp_path / "two"), "--devices", devices], log=lambda s: None)
    assert_same_training(_trained(res, tmp_path / "two"), want, exact=devices.startswith("numpy"))
    if gpus is not None:
        assert {c[1] for c in gpus[1] if c[0].startswith("launch")} == {0, 1}


@pytest.mark.parametrize("kind", ["fake", pytest.param("cuda", marks=real_gpus(2))])
@needs_mpi
def test_two_data_parallel_ranks_each_work_on_their_own_gpu_only(tmp_path, kind):
    """``mpirun -n 2 python -m convnet.train --distributed --device cuda``: rank r on cuda:r (NCCL's reductions
    included) allocates, launches and computes with GPU r current only, and the run trains as one process on emu
    does (within float32 rounding: the ranks sum their halves of each batch)."""
    cfg = tmp_path / "tiny.cfg"
    cfg.write_text(TINY)
    common = ["--model", str(cfg), "--synthetic-train", "96", "--synthetic-test", "32", "--no-progress", "--no-plots",
              "--epochs", "2", "--multiview", "--precision", "fp32"]
    assert main([*common, "--device", "emu", "--out", str(tmp_path / "one")]) == 0
    rc, out, err = run_ranks(2, [__file__, "ranks", kind, tmp_path, *common, "--distributed", "--device", "cuda",
                                 "--out", tmp_path / "two"], timeout=180)
    assert rc == 0, err
    for r in range(2):
        seen = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert seen["launched on"] == [r], seen
        assert kind != "fake" or seen["allreduces"] > 0, seen  # (NCCL's calls are seen on the fake only)
        assert seen["elsewhere"] == [], f"rank {r} on cuda:{r}: {seen['elsewhere']} on another GPU"
    one = [json.loads(line) for line in open(tmp_path / "one" / "log.jsonl")]
    two = [json.loads(line) for line in open(tmp_path / "two" / "log.jsonl")]
    assert len(one) == len(two) == 2 and two[0]["ranks"] == 2
    for a, b in zip(one, two):
        for k in ("train_loss", "test_loss"):
            assert b[k] == pytest.approx(a[k], rel=1e-4), k
    p1, p2 = np.load(tmp_path / "one" / "checkpoint.npz"), np.load(tmp_path / "two" / "checkpoint.npz")
    for k in p1.files:
        if k.startswith("param/"):
            np.testing.assert_allclose(p2[k], p1[k], rtol=1e-3, atol=1e-5, err_msg=k)


def test_the_loaders_thread_has_the_loaders_gpu_current_throughout(monkeypatch):
    """The loader's background thread makes its device current when it starts, not only around each upload: a
    thread starts with GPU 0 current, and any CUDA call there outside an activation would open a context on GPU 0."""
    from convnet.data import Loader
    from convnet.devices import get_device

    fake = FakeCupy(devices=2).install(monkeypatch, usable=True)
    dev = get_device("cuda:1")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (12, 8, 8, 1), dtype=np.uint8)
    labels = rng.integers(0, 4, 12).astype(np.int32)
    loader = Loader(images, labels, 4, train=True, out_hw=(8, 8), mean=images.mean(0), device=dev, prefetch=2)
    make_batch, current = Loader.make_batch, []

    def spy(self, *args, **kwargs):
        current.append(fake.current)
        return make_batch(self, *args, **kwargs)

    monkeypatch.setattr(Loader, "make_batch", spy)
    got = [(x, y) for x, y in loader.epoch(0)]
    assert current == [1, 1, 1]
    for b, (x, y) in enumerate(got):  # and the batches are right: the host loader's
        want_x, want_y = Loader(images, labels, 4, train=True, out_hw=(8, 8), mean=images.mean(0),
                                prefetch=0).make_batch(0, b)
        assert x.device.id == 1 and y.device.id == 1
        np.testing.assert_array_equal(x.get(), want_x)
        np.testing.assert_array_equal(y.get(), want_y)


def test_the_bad_label_counter_is_read_and_reset_on_its_layers_gpu(monkeypatch):
    """The softmax layer's device counter of out-of-range labels, on GPU 1, read and reset from a thread on GPU 0
    (the trainer's, when the softmax is on another tower than the data): the count, then zero after the reset."""
    from convnet.devices import get_device
    from convnet.model_file import build_net

    fake = FakeCupy(devices=2).install(monkeypatch, usable=True)
    dev = get_device("cuda:1")
    net, _ = build_net(TINY, "tiny.cfg", device=dev, seed=0)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 8, 8, 6)).astype(np.float32)
    y = np.array([0, 9, 3, -2, 1, 4], np.int32)  # three outside [0, 4)
    with dev.activate():
        net.forward(dev.asarray(x), dev.asarray(y), train=True)
    with fake.cuda.Device(0):
        assert net.cost_layer.take_bad_labels() == 3
        assert net.cost_layer.take_bad_labels() == 0


def test_the_fake_gpu_refuses_operands_of_another_gpu(monkeypatch):
    """The test double itself: an array belongs to the GPU current at its allocation (a view to its base's); array
    arithmetic, array-module functions and methods, gathers, stores, kernel launches and same-GPU copies with an
    operand on another GPU raise; views, reads to the host and the explicit peer copy do not."""
    fake = FakeCupy(devices=2).install(monkeypatch)
    rt = fake.cuda.runtime
    rng = np.random.default_rng(0)
    host = rng.standard_normal((4, 6)).astype(np.float32)
    with fake.cuda.Device(1):
        a = fake.asarray(host)
        idx = fake.asarray(np.array([2, 0], np.int64))
    with fake.cuda.Device(0):
        b = fake.zeros((4, 6), np.float32)
    assert a.device.id == 1 and b.device.id == 0 and a[1:].device.id == 1 and a.T.device.id == 1
    kernels = fake.kernels(EMU.kernels)
    n = host.size
    with fake.cuda.Device(0):
        np.testing.assert_array_equal(a.get(), host)  # CuPy reads any GPU's array
        np.testing.assert_array_equal(a.view(np.int32).get(), host.view(np.int32))
        assert a.transpose(1, 0).device.id == 1
        for what, call in [("__add__", lambda: a + 1), ("__iadd__", lambda: b.__iadd__(a)),
                           ("maximum", lambda: fake.maximum(a, 0)), ("sum", lambda: a.sum()),
                           ("copy", lambda: a.copy()), ("ascontiguousarray", lambda: fake.ascontiguousarray(a.T)),
                           ("asarray", lambda: fake.asarray(a)), ("advanced indexing", lambda: a[idx]),
                           ("setitem", lambda: b.__setitem__(Ellipsis, a)), ("__neg__", lambda: -a),
                           ("launch relu_forward", lambda: kernels.relu_forward(a.data.ptr, b.data.ptr, n, 0)),
                           ("memcpyAsync", lambda: rt.memcpyAsync(b.data.ptr, a.data.ptr, a.nbytes,
                                                                  rt.memcpyDeviceToDevice, 0))]:
            with pytest.raises(CrossDeviceError, match=f"{what}.*GPU 1.*GPU 0"):
                call()
        rt.memcpyPeerAsync(b.data.ptr, 0, a.data.ptr, 1, a.nbytes, 0)  # the explicit way between GPUs
        np.testing.assert_array_equal(b.get(), host)
        with pytest.raises(CrossDeviceError, match="source given an address on GPU 0, declared on GPU 1"):
            rt.memcpyPeerAsync(a.data.ptr, 1, b.data.ptr, 1, a.nbytes, 0)
    with fake.cuda.Device(1):
        kernels.relu_forward(a.data.ptr, a.data.ptr, n, 0)  # on its own GPU: runs
        np.testing.assert_array_equal(a.get(), np.maximum(host, 0))
        np.testing.assert_array_equal((a * 2).get(), 2 * np.maximum(host, 0))
        np.testing.assert_array_equal(a[idx].get(), np.maximum(host, 0)[[2, 0]])


# --- streams ----------------------------------------------------------------------------------------------------
STREAMS_NET = """
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
    net, _ = build_net(STREAMS_NET, "tiny.cfg", device="cuda:0", seed=0)
    ref, _ = build_net(STREAMS_NET, "tiny.cfg", device="emu", seed=0)
    reducer = GradReducer(net, TwoRanks(), bucket_mb=2000 * 4 / 2**20)
    assert len(reducer.buckets) >= 2
    compute = getattr(net.placements.stream_of(net.layers["conv1"]), "ptr", 0)  # None: the current (null) stream
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
def prepared_dataset(prepared):
    return load_dataset("imagenet", prepared)


@pytest.mark.parametrize("train", [True, False], ids=["train", "ten-views"])
def test_prepared_batches_go_up_as_uint8_and_convert_to_the_host_paths_bits(prepared_dataset, monkeypatch, train):
    """Worker processes hand a GPU loader uint8 crops, uploaded as they are (a quarter of float32's bytes) and
    converted on the device -- float, minus the mean, plus the PCA lighting, times the scale -- to the bits the host
    path computes (the fake runs the device's arithmetic with NumPy's float32 rounding)."""
    ds = prepared_dataset
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
    t0, t1 = (net.placements.stream_of(net.layers[n]) for n in ("conva", "convb"))
    assert net.placements.stream_of(net.layers["shared"]) is t0 and t0 is not t1
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


# --- the program each rank runs under mpirun ----------------------------------------------------------------------
def _worker_ranks(kind, out, *argv):
    """One rank of ``mpirun -n 2``: ``convnet.train`` on the fake GPUs (or real ones), then where its work went."""
    from convnet.distributed import active_world

    mp = pytest.MonkeyPatch()
    if kind == "fake":
        fake = FakeCupy(devices=2).install(mp, usable=True)
        FakeNccl().install(fake)
        fake.recording = True
        calls = fake.calls
    else:
        calls = GpuLog(mp).calls
    status = main(list(argv))
    world = active_world()
    rank = world.rank
    if status == 0:
        (Path(out) / f"rank{rank}.json").write_text(json.dumps({
            "launched on": sorted({c[1] for c in calls if c[0].startswith("launch")}),
            "allreduces": sum(c[0] == "nccl allReduce" for c in calls),
            "elsewhere": sorted({c[0] for c in calls if c[1] != rank})}))
    sys.exit(status)


if __name__ == "__main__":
    {"ranks": _worker_ranks}[sys.argv[1]](*sys.argv[2:])
