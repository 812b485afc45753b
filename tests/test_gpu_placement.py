"""Which GPU the cuda path works on. A run on a GPU other than GPU 0 (``--device cuda:1``, a data-parallel rank >= 1,
a model's second tower) must allocate, launch and compute there only: CuPy allocates and runs an array-module call on
the *current* GPU, whatever GPU the operands are on, and every thread starts with GPU 0 current.

On the CPU the cuda path runs on tests/helpers.FakeCupy, which remembers the GPU each array was allocated on, raises
CrossDeviceError for a kernel launch, copy or array-module call with an operand on another GPU than the current one,
and logs which GPU was current for every call. With ``pytest -m cuda`` the same runs go to real GPUs, CuPy's
allocations and the kernel launches logged with the GPU current at the time (the cuda:1 forms need two GPUs).
"""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from helpers import EMU, CrossDeviceError, FakeCupy, FakeNccl  # noqa: E402
from imagefolder_fixture import make_tree  # noqa: E402
from test_distributed import needs_mpi, run_ranks  # noqa: E402
from test_imagenet import TINY_RGB  # noqa: E402
from test_train import TINY  # noqa: E402
from test_two_towers import TWO_TOWERS  # noqa: E402

from convnet.devices import device_report  # noqa: E402
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
        real = backend_cuda.CudaBackend.kernels
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

        monkeypatch.setattr(backend_cuda.CudaBackend, "kernels", lambda backend, device: Kernels(real(backend, device)))


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
            *(["--data", str(request.getfixturevalue("prepared"))] if data else []), *flags]
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
    pytest.param("cuda:0,cuda:1", "fake", id="fake-cuda:0,cuda:1"),
    pytest.param("cuda:0,cuda:1", "cuda", id="cuda:0,cuda:1", marks=real_gpus(2)),
], indirect=["gpus"])
def test_a_softmax_on_the_second_tower_sums_the_loss_and_errors_on_its_gpu(tmp_path, devices, gpus):
    """The softmax on tower 1, the data on tower 0: the training sums, the multiview evaluation and the top-k counts
    are made on the softmax's device (the batches' labels copied there), with the numbers of the whole net on one
    numpy device (bit for bit on two virtual numpy devices)."""
    cfg = tmp_path / "model.cfg"
    cfg.write_text(SOFTMAX_ON_TOWER_1)
    args = ["--model", str(cfg), "--no-progress", "--no-plots", "--synthetic-train", "64", "--synthetic-test", "32",
            "--epochs", "2", "--multiview"]
    want = _trained(run([*args, "--out", str(tmp_path / "one"), "--device", "numpy"], log=lambda s: None),
                    tmp_path / "one")
    res = run([*args, "--out", str(tmp_path / "two"), "--devices", devices], log=lambda s: None)
    assert_same_training(_trained(res, tmp_path / "two"), want, exact=gpus is None)
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
              "--epochs", "2", "--multiview"]
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
