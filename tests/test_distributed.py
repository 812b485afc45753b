"""Data-parallel training (convnet.distributed, ``--distributed``), checked against single-process training.

The ranks run under ``mpirun`` (mpi4py and the MPI library of the ``mpi`` extra); each such test has a timeout and
kills the whole job when it runs out, so a rank that waits forever fails the test. This file is also the program
the ranks run (``python tests/test_distributed.py WORKER ...``, see the bottom).

What is compared, and how exactly (the numpy and emu devices, a net with a dropout layer after a pooling layer and
one after a fully-connected layer):

* the shards: the union of the ranks' shards of a batch is bit-identical to the single-process batch (images and
  labels, with random crops and flips);
* one rank under mpirun with --distributed is bit-identical to a run without it (the reducer leaves one rank's
  gradients alone);
* two ranks of B/2 images against one process of B: the loss of every step and the final parameters agree within
  float32 rounding, not bit for bit: each rank sums its gradients and loss over its half of the images, then the
  halves are added, where one process sums all B in one pass (another order of the same float32 additions);
* the ranks' parameters are bit-identical to each other after every step (a checksum, compared every step).

Dropout: masks are keyed on the element index in the *global* batch; a rank's forward says where its shard lies
(``net.forward(..., batch=(B, first))``), so its dropout layers draw exactly its images' part of the single-process
masks and the ranks train with the same masks as one process (checked here without MPI too: the shards' forwards
give the whole batch's outputs, and a split dropout layer's shard draws its part of the whole layer's mask).
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from fake_cupy import FakeCupy, FakeNccl  # noqa: E402
from helpers import subprocess_env  # noqa: E402

from convnet.data import Loader  # noqa: E402
from convnet.data.synthetic import synthetic  # noqa: E402
from convnet.distributed import GradReducer, World, backward_and_step, make_buckets, param_checksums  # noqa: E402
from convnet.model_file import build_net  # noqa: E402
from convnet.optim import SGD  # noqa: E402

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

[drop1]
type = dropout
inputs = pool1
keep = 0.75

[fc1]
type = fc
inputs = drop1
outputs = 16
neuron = relu

[drop2]
type = dropout
inputs = fc1
keep = 0.5

[fc2]
type = fc
inputs = drop2
outputs = 4

[probs]
type = softmax
inputs = fc2

[train]
dataset = synthetic
epochs = 2
batch_size = 16
lr = 0.01
flip = true
crop_pad = 1
"""


# --- launching ranks ------------------------------------------------------------------------------------------------
def _mpirun():
    """The mpirun of this Python's environment (the mpich wheel puts it beside the interpreter), else the PATH's."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return shutil.which("mpirun", path=path) or shutil.which("mpiexec", path=path)


def _mpi_missing():
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return "mpi4py is not installed (pip install 'convnet[mpi]')"
    if _mpirun() is None:
        return "no mpirun/mpiexec beside the interpreter or on the PATH (pip install 'convnet[mpi]': the mpich wheel)"
    return None


_MISSING = _mpi_missing()


def needs_mpi(test):
    """Skip ``test`` (saying why) where MPI is missing; fail it instead under CONVNET_REQUIRE_MPI=1 (CI, .ci/run)."""
    if _MISSING is None:
        return test
    if os.environ.get("CONVNET_REQUIRE_MPI") == "1":
        @functools.wraps(test)
        def fail(*args, **kwargs):
            pytest.fail(f"CONVNET_REQUIRE_MPI=1, but {_MISSING}")
        return fail
    return pytest.mark.skip(reason=_MISSING)(test)


def run_ranks(n, args, *, timeout=180, cwd=None, env=None):
    """``mpirun -n n python args...``: (returncode, stdout, stderr). The job is killed (the process group) when it
    runs past ``timeout`` seconds, and the test fails: a hang is a failure, never a stuck CI."""
    return run_job([["-n", n, sys.executable, *args]], timeout=timeout, cwd=cwd, env=env)


def run_job(parts, *, timeout=180, cwd=None, env=None):
    """``mpirun PART : PART ...`` (each part: the launcher's options, the program and its arguments, as for
    :func:`run_ranks`; one part per rank gives each rank its own command line or ``-wdir``)."""
    cmd = [_mpirun()]
    for i, part in enumerate(parts):
        cmd += [":"] * bool(i) + list(map(str, part))
    env = subprocess_env(HERE, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", **(env or {}))
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd, env=env,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        pytest.fail(f"{' '.join(cmd[1:])} did not finish within {timeout} s (a hang)\n{out}\n{err}")
    return p.returncode, out, err


# --- the training steps both sides run ------------------------------------------------------------------------------
def dataset():
    return synthetic((3, 12, 12), 4, 96, 16, seed=3)


def train_steps(device, steps, batch, world=None, bucket_mb=25.0, check=True):
    """``steps`` SGD steps of the tiny net from seed 0 on batches of ``batch`` images (the global batch; a rank of
    ``world`` takes its shard and averages gradients with the others). Returns (loss of every step, summed over the
    whole batch; final parameters)."""
    net, _ = build_net(TINY, "tiny.cfg", device=device, seed=0)
    dev = net.device
    ds = dataset()
    shard = (world.rank, world.size) if world is not None else (0, 1)
    loader = Loader(ds.train_x, ds.train_y, batch, train=True, out_hw=(12, 12), mean=ds.mean_image(),
                    scale=1 / 255, crop_pad=1, flip=True, seed=5, device=dev, prefetch=0, shard=shard)
    opt = SGD(net, lr=0.01, momentum=0.9, weight_decay=5e-4)
    reducer = GradReducer(net, world, bucket_mb=bucket_mb) if world is not None else None
    losses, step = [], 0
    shard_of = (batch, loader.shard_part()[0]) if world is not None else None  # where the rank's images lie
    for epoch in range(10):
        for x, y in loader.epoch(epoch):
            net.forward(x, y, train=True, step=step, batch=shard_of)
            backward_and_step(net, opt, reducer)
            loss = float(dev.to_numpy(net.loss))
            if world is not None:
                loss = float(world.sum(np.array([loss]), "the loss")[0])
                if check and world.size > 1:
                    world.check_same(*param_checksums(net), f"after step {step}")
            losses.append(loss)
            step += 1
            if step == steps:
                return losses, net.state_dict(), (reducer.stats if reducer else None)
    raise AssertionError("not enough batches")


# --- without MPI ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ranks", [2, 4])
def test_the_union_of_the_shards_is_the_single_process_batch_bit_for_bit(ranks):
    ds = dataset()
    common = dict(train=True, out_hw=(10, 10), mean=ds.mean_image(), scale=1 / 255, crop_pad=2, flip=True, seed=9,
                  prefetch=0)
    whole = Loader(ds.train_x, ds.train_y, 16, **common)
    shards = [Loader(ds.train_x, ds.train_y, 16, shard=(r, ranks), **common) for r in range(ranks)]
    assert len(whole) == len(shards[0]) == 6
    for epoch in (0, 1):
        for (x, y), *parts in zip(whole.epoch(epoch), *(s.epoch(epoch) for s in shards)):
            assert all(p[0].shape[-1] == 16 // ranks for p in parts)
            np.testing.assert_array_equal(np.concatenate([p[0] for p in parts], axis=-1), x)
            np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), y)


def test_evaluation_batches_are_dealt_round_robin():
    ds = dataset()
    common = dict(train=False, out_hw=(12, 12), mean=ds.mean_image(), prefetch=0)
    whole = [y for _, y in Loader(ds.test_x, ds.test_y, 5, **common).epoch(0)]  # 16 images: batches 5, 5, 5, 1
    got = {r: [y for _, y in Loader(ds.test_x, ds.test_y, 5, shard=(r, 3), **common).epoch(0)] for r in range(3)}
    assert [len(got[r]) for r in range(3)] == [2, 1, 1]
    for r in range(3):
        for k, y in enumerate(got[r]):
            np.testing.assert_array_equal(y, whole[r + 3 * k])


def test_a_batch_that_does_not_split_into_equal_shards_is_refused():
    ds = dataset()
    with pytest.raises(ValueError, match="does not split into 3 equal shards"):
        Loader(ds.train_x, ds.train_y, 16, train=True, out_hw=(12, 12), mean=ds.mean_image(), shard=(0, 3))


def test_buckets_follow_the_backward_order_and_their_size():
    net, _ = build_net(TINY, "tiny.cfg", device="numpy", seed=0)
    one = make_buckets(net, 1 << 30)
    assert len(one) == 1 and [e[0] for e in one[0].entries] == ["fc2/b", "fc2/w", "fc1/b", "fc1/w", "conv1/b",
                                                                 "conv1/w"]
    each = make_buckets(net, 1)  # every parameter closes its bucket
    assert [[e[0] for e in b.entries] for b in each] == [[k] for k in ["fc2/b", "fc2/w", "fc1/b", "fc1/w", "conv1/b",
                                                                        "conv1/w"]]
    assert sum(b.count for b in each) == net.num_params()


def test_distributed_without_mpi4py_says_how_to_install_it(monkeypatch, tmp_path):
    from convnet import train
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    status = train.main(["--distributed", "--device", "numpy", "--out", str(tmp_path / "r")])
    assert status == 2
    with pytest.raises(Exception, match=r"--distributed needs mpi4py .*pip install 'convnet\[mpi\]'"):
        train.run(["--distributed", "--device", "numpy", "--out", str(tmp_path / "r")])


@pytest.mark.parametrize("device", ["numpy", "emu"])
def test_the_shards_forwards_draw_the_whole_batchs_dropout_masks(device):
    """A batch of 16 cut into shards of 5, 6 and 5 images, each forwarded with ``batch=(16, first)``: the outputs are
    the whole batch's (same parameters, seed and step), so the shards drew their part of each dropout layer's mask
    (after pool1 and after fc1); without ``batch`` each shard draws other masks and the outputs differ."""
    net, _ = build_net(TINY, "tiny.cfg", device=device, seed=0)
    net.load_state_dict({k: v * 30 for k, v in net.state_dict().items()})  # outputs far from uniform: masks show
    dev = net.device
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 12, 12, 16)).astype(np.float32)
    whole = dev.to_numpy(net.forward(dev.asarray(x), train=True, step=3))
    edges = [0, 5, 11, 16]
    parts = [dev.asarray(np.ascontiguousarray(x[..., a:b])) for a, b in zip(edges[:-1], edges[1:])]
    shards = [dev.to_numpy(net.forward(p, train=True, step=3, batch=(16, a))) for p, a in zip(parts, edges)]
    np.testing.assert_allclose(np.concatenate(shards, axis=-1), whole, rtol=1e-5, atol=1e-7)
    alone = [dev.to_numpy(net.forward(p, train=True, step=3)) for p in parts]
    assert np.abs(np.concatenate(alone, axis=-1) - whole).max() > 1e-2  # the control: the masks do matter
    with pytest.raises(ValueError, match=r"batch = \(B, first\) = \(16, 12\) must hold the input's 5 images"):
        net.forward(parts[0], train=True, step=3, batch=(16, 12))
    for bad in ((16.0, 0), (16, True), 16, (16, 0, 1)):
        with pytest.raises(ValueError, match="batch must be a pair"):
            net.forward(parts[0], train=True, step=3, batch=bad)


SPLIT_DROP = """
[data]
type = data
channels = 5
size = 3

[fc]
type = fc
inputs = data
outputs = 7

[dropb]
type = dropout
inputs = data
maskOf = drop
maskStart = 2

[dropf]
type = dropout
inputs = fc
maskOf = dropfc
maskStart = 4

[out]
type = fc
inputs = dropb, dropf
outputs = 2

[probs]
type = softmax
inputs = out
"""


@pytest.mark.parametrize("layer, units, pixels", [("dropb", 5, 9), ("dropf", 7, 1)])
def test_a_shard_of_a_split_dropout_layer_draws_its_part_of_the_whole_layers_mask(layer, units, pixels):
    """maskOf/maskStart with a shard: units [start, start + units) of the stream's layer, images [first, first + n)
    of the global batch: exactly that block of the whole layer's mask (conv-side (C, H, W, N) and fc-side (F, N))."""
    from convnet import ops
    net, _ = build_net(SPLIT_DROP, "split.cfg", device="emu", seed=0)
    lay = net.layers[layer]
    start, B, first, n = lay.mask_start, 11, 6, 4
    assert lay.out_shape[0] == units
    x = np.ones((*lay.out_shape, n), np.float32)
    y = net.device.to_numpy(lay.forward(net.device.asarray(x), {"train": True, "seed": 77, "batch": (B, first)}))
    whole = ops.dropout_mask("numpy", (start + units, pixels, B), lay.keep, 77)  # the whole layer's mask, from unit 0
    want = whole[start:, :, first:first + n].reshape(x.shape)
    np.testing.assert_array_equal(y != 0, want)


class OneRank:
    """A World of one rank without MPI (the NCCL path's single-GPU case)."""
    rank, size, local_rank, local_size, timeout_s = 0, 1, 0, 1, 60.0

    def bcast(self, obj, root=0):
        return obj


def test_a_rank_without_a_gpu_is_an_error_naming_it(monkeypatch):
    from convnet.config import ConfigError
    from convnet.devices import backend_cuda, get_device
    from convnet.distributed import rank_device
    fake = FakeCupy(devices=1).install(monkeypatch)
    FakeNccl().install(fake)
    monkeypatch.setattr(backend_cuda.CudaDevice, "available", lambda self: (True, "a fake GPU"))
    world = OneRank()
    assert str(rank_device("cuda", world, get_device)) == "cuda:0"
    world.rank = world.local_rank = 1
    world.size = world.local_size = 2
    with pytest.raises(ConfigError, match=r"rank 1 \(rank 1 on its node\) has no GPU: the node has 1 and runs 2"):
        rank_device("cuda", world, get_device)
    with pytest.raises(ConfigError, match="every rank takes cuda:<its rank on the node>"):
        rank_device("cuda:0", world, get_device)


def test_the_nccl_path_with_one_rank_does_nothing_and_leaves_the_gradients_alone(monkeypatch):
    """The cuda path on a fake CuPy + NCCL (tests/helpers): with one rank the gradients are their own average, so
    the reducer makes no communicator and no stream, packs, reduces and unpacks nothing, and the host never waits;
    the gradients are bit-identical to a backward without the reducer (emu's, whose kernels the fake runs). Two ranks
    on the fake: tests/test_gpu_placement.py."""
    from convnet.devices import backend_cuda
    from convnet.distributed import NcclTransport
    fake = FakeCupy(devices=1).install(monkeypatch)
    FakeNccl().install(fake)
    monkeypatch.setattr(backend_cuda.CudaDevice, "available", lambda self: (True, "a fake GPU"))
    net, _ = build_net(TINY, "tiny.cfg", device="cuda:0", seed=0)
    ref, _ = build_net(TINY, "tiny.cfg", device="emu", seed=0)
    reducer = GradReducer(net, OneRank(), bucket_mb=2000 * 4 / 2**20)  # fc2 + fc1/b | fc1/w | conv1
    assert isinstance(reducer.transport, NcclTransport) and len(reducer.buckets) >= 2
    assert not hasattr(reducer.transport, "comm") and not hasattr(reducer.transport, "stream")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 12, 12, 8)).astype(np.float32)
    y = rng.integers(0, 4, 8).astype(np.int32)
    net.forward(net.device.asarray(x), net.device.asarray(y, np.int32), train=True, step=0)
    fake.recording = True
    net.backward()
    alone = len(fake.calls)
    net.forward(net.device.asarray(x), net.device.asarray(y, np.int32), train=True, step=0)
    fake.calls.clear()
    net.backward(on_grads=reducer.on_grads)
    reducer.finish()
    fake.recording = False
    assert len(fake.calls) == alone and not [e for e in fake.calls if e[0] == "nccl allReduce"]
    ref.forward(x, y, train=True, step=0)
    ref.backward()
    for (k, l, p), (_, lr, _) in zip(net.param_items(), ref.param_items()):
        np.testing.assert_array_equal(l.device.to_numpy(l.grads[p]), lr.grads[p], err_msg=k)


# --- under mpirun -----------------------------------------------------------------------------------------------------
@needs_mpi
@pytest.mark.parametrize("device", ["numpy", "emu"])
def test_two_ranks_of_half_the_batch_train_as_one_process_within_float32_rounding(tmp_path, device):
    steps = 6
    rc, out, err = run_ranks(2, [__file__, "steps", device, steps, 16, 1e-9, tmp_path / "dist.npz"])
    assert rc == 0, err
    got = np.load(tmp_path / "dist.npz")
    losses, params, _ = train_steps(device, steps, 16)
    assert len(got["losses"]) == steps
    np.testing.assert_allclose(got["losses"], losses, rtol=2e-6)
    for k, v in params.items():
        np.testing.assert_allclose(got[f"param/{k}"], v, rtol=1e-5, atol=1e-7, err_msg=k)
    # the training moved the parameters far more than the tolerance: the comparison can fail
    init, _ = build_net(TINY, "tiny.cfg", device="numpy", seed=0)
    moved = max(np.abs(v - init.state_dict()[k]).max() for k, v in params.items())
    assert moved > 1e-3
    # every bucket (one parameter each) was reduced once per step, overlapping the backward
    stats = json.loads(str(got["stats"]))
    assert stats["steps"] == steps and stats["buckets"] == 6 * steps


@needs_mpi
def test_one_rank_under_mpirun_is_bit_identical_to_one_process(tmp_path):
    rc, out, err = run_ranks(1, [__file__, "steps", "numpy", 4, 16, 25.0, tmp_path / "one.npz"])
    assert rc == 0, err
    got = np.load(tmp_path / "one.npz")
    losses, params, _ = train_steps("numpy", 4, 16)
    np.testing.assert_array_equal(got["losses"], losses)
    for k, v in params.items():
        np.testing.assert_array_equal(got[f"param/{k}"], v, err_msg=k)


@needs_mpi
def test_the_command_with_two_ranks_trains_resumes_and_checkpoints_on_rank_0(tmp_path):
    """``mpirun -n 2 python -m convnet.train --distributed`` against the same command in one process: the epochs'
    train and test losses within float32 rounding, the errors exactly, the checkpoint's parameters within rounding;
    rank 0 alone writes and logs; a stop after 3 steps resumed with ONE process continues the same run."""
    model = tmp_path / "tiny.cfg"
    model.write_text(TINY)
    common = ["--model", model, "--device", "numpy", "--synthetic-train", 96, "--synthetic-test", 24, "--no-progress",
              "--no-plots", "--seed", 2]
    from convnet import train
    assert train.main([*map(str, common), "--out", str(tmp_path / "one")]) == 0
    rc, out, err = run_ranks(2, ["-m", "convnet.train", "--distributed", *common, "--out", tmp_path / "two"])
    assert rc == 0, err
    assert out.count("data-parallel over 2 rank(s)") == 1 and out.count("epoch 2:") == 1  # rank 0 alone logs
    one = [json.loads(line) for line in open(tmp_path / "one" / "log.jsonl")]
    two = [json.loads(line) for line in open(tmp_path / "two" / "log.jsonl")]
    assert len(one) == len(two) == 2 and two[0]["ranks"] == 2
    for a, b in zip(one, two):
        assert a["train_error"] == b["train_error"] and a["test_error"] == b["test_error"]
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["test_loss"] == pytest.approx(b["test_loss"], rel=1e-5)
    p1, p2 = np.load(tmp_path / "one" / "checkpoint.npz"), np.load(tmp_path / "two" / "checkpoint.npz")
    for k in p1.files:
        if k.startswith(("param/", "velocity/")):
            np.testing.assert_allclose(p2[k], p1[k], rtol=1e-4, atol=1e-7, err_msg=k)
    # stop after 3 steps with two ranks, continue with one: the same run as the uninterrupted one
    rc, out, err = run_ranks(2, ["-m", "convnet.train", "--distributed", *common, "--out", tmp_path / "three",
                                 "--max-steps", 3])
    assert rc == 0, err
    assert "continue with --resume" in out
    assert train.main(["--resume", str(tmp_path / "three"), "--no-progress", "--no-plots"]) == 0
    p3 = np.load(tmp_path / "three" / "checkpoint.npz")
    for k in p1.files:
        if k.startswith("param/"):
            np.testing.assert_allclose(p3[k], p1[k], rtol=1e-4, atol=1e-7, err_msg=k)


@needs_mpi
@pytest.mark.parametrize("case, message", [
    (["--batch-size", "15"], "--batch-size 15 does not split into 2 equal shards"),
    (["--device", "cuda"], "has no GPU"),
])
def test_bad_setups_fail_fast_with_a_message(tmp_path, case, message):
    model = tmp_path / "tiny.cfg"
    model.write_text(TINY)
    t0 = time.monotonic()
    rc, out, err = run_ranks(2, ["-m", "convnet.train", "--distributed", "--model", model, "--device", "numpy",
                                 "--no-progress", "--no-plots", "--out", tmp_path / "r", *case], timeout=120)
    assert rc != 0 and message in err, (rc, out, err)
    assert time.monotonic() - t0 < 100


@needs_mpi
def test_diverged_parameters_are_an_error_on_every_rank(tmp_path):
    rc, out, err = run_ranks(2, [__file__, "diverge"], timeout=120)
    assert rc != 0
    assert "the ranks' parameters diverged in the test: 'fc1/w' differs on rank(s) 1 from rank 0" in out + err


@needs_mpi
def test_a_rank_that_leaves_does_not_hang_the_others(tmp_path):
    t0 = time.monotonic()
    rc, out, err = run_ranks(2, [__file__, "leave"], timeout=120, env={"CONVNET_DIST_TIMEOUT": "10"})
    assert rc != 0
    assert time.monotonic() - t0 < 100


TRAIN = ["-m", "convnet.train", "--distributed", "--device", "numpy", "--batch-size", 16, "--epochs", 2,
         "--no-progress", "--no-plots"]


@needs_mpi
def test_a_rank_failing_before_mpi_starts_ends_the_job_with_its_message(tmp_path):
    """Rank 1's command line does not parse (it stops before starting MPI, where rank 0 waits for it): it starts MPI
    to abort the job, within seconds, without any timeout set."""
    model = tmp_path / "tiny.cfg"
    model.write_text(TINY)
    command = [sys.executable, *TRAIN, "--model", model, "--out", tmp_path / "r"]
    t0 = time.monotonic()
    rc, out, err = run_job([["-n", 1, *command], ["-n", 1, *command, "--lr", -1]], timeout=60)
    assert time.monotonic() - t0 < 30, err
    assert rc != 0 and "error: argument --lr: must be > 0, got -1" in err, (rc, out, err)
    assert not (tmp_path / "r").exists()


@needs_mpi
def test_a_rank_that_never_starts_mpi_ends_the_others_after_the_timeout(tmp_path):
    """Rank 0 ends before starting MPI without a word (a missing package, a crash): rank 1, waiting in MPI_Init, is
    ended by its watchdog after CONVNET_DIST_TIMEOUT seconds, saying why."""
    model = tmp_path / "tiny.cfg"
    model.write_text(TINY)
    t0 = time.monotonic()
    rc, out, err = run_job([["-n", 1, sys.executable, "-c", "import sys; sys.exit(3)"],
                            ["-n", 1, sys.executable, *TRAIN, "--model", model, "--out", tmp_path / "r"]],
                           timeout=60, env={"CONVNET_DIST_TIMEOUT": "4"})
    assert time.monotonic() - t0 < 30, err
    assert rc != 0
    assert "error (rank 1): MPI did not start within 4 s: another rank of the job ended before starting it" in err


@needs_mpi
@pytest.mark.parametrize("kind, shown", [("bug", "RuntimeError: a bug on rank 1"),
                                         ("debug", "DataError: no data on rank 1")])
def test_a_rank_failing_after_mpi_started_ends_the_job_with_its_traceback(tmp_path, kind, shown):
    """Rank 1 fails while loading its data, after MPI started, where rank 0 waits for it in a collective: with an
    exception the command does not handle (a bug), or a user error under --debug; either way its traceback is printed
    and the job ends at once (the default timeout, 600 s, never comes into play)."""
    model = tmp_path / "tiny.cfg"
    model.write_text(TINY)
    t0 = time.monotonic()
    rc, out, err = run_ranks(2, [__file__, "crash", kind, *TRAIN[2:], "--model", model, "--out", tmp_path / "r"],
                             timeout=60)
    assert time.monotonic() - t0 < 30, err
    assert rc != 0 and "Traceback (most recent call last)" in err and shown in err, (rc, out, err)


def _cifar_dir(d, seed):
    """A small CIFAR-10 batch directory: the same labels for every ``seed``, other images."""
    from convnet.data import write_cifar_batch
    d.mkdir(parents=True)
    labels = np.arange(32) % 10
    for name in ("data_batch_1", "test_batch"):
        images = np.random.default_rng(seed).integers(0, 256, (32, 32, 32, 3), dtype=np.uint8)
        write_cifar_batch(d / name, images, labels)


@needs_mpi
@pytest.mark.parametrize("case", ["flags", "seed", "model", "data"])
def test_ranks_started_differently_stop_at_once_naming_what_differs(tmp_path, case):
    """Every rank compares its command line, its resolved settings and model text, and its data with the others'
    right after the start: a difference stops every rank at once (exit 2), each naming the differing settings and
    their values on each rank. "model" and "data": the same command line in two working directories whose model file
    or data differ."""
    tiny10 = TINY.replace("outputs = 4", "outputs = 10")
    for rank, (name, text) in enumerate([("a", tiny10), ("b", tiny10.replace("outputs = 16", "outputs = 12"))]):
        (tmp_path / name).mkdir()
        (tmp_path / name / "tiny.cfg").write_text(text if case == "model" else tiny10)
        _cifar_dir(tmp_path / name / "data", seed=rank if case == "data" else 0)
    command = [sys.executable, *TRAIN, "--model", "tiny.cfg", "--dataset", "cifar10", "--data", "data",
               "--out", tmp_path / "r"]
    extra = {"flags": ["--batch-size", 32, "--epochs", 3], "seed": ["--seed", 7]}.get(case, [])
    want = {"flags": "the ranks' command lines differ: --batch-size: 16 on rank 0, 32 on rank 1; --epochs: 2 on "
                     "rank 0, 3 on rank 1; every rank must run the same command",
            "seed": "the ranks' command lines differ: --seed: not given on rank 0, 7 on rank 1; every rank",
            "model": "the ranks' settings differ: the model file's text: sha256:",
            "data": "the ranks' data differ: mean image: sha256:"}[case]
    t0 = time.monotonic()
    rc, out, err = run_job([["-n", 1, "-wdir", tmp_path / "a", *command],
                            ["-n", 1, "-wdir", tmp_path / "b", *command, *extra]], timeout=60)
    assert time.monotonic() - t0 < 30, err
    assert rc == 2, (rc, out, err)
    for rank in (0, 1):
        line = next((l for l in err.splitlines() if l.startswith(f"error (rank {rank} of 2): ")), "")
        assert want in line, err
        if case in ("model", "data"):  # that alone differs
            assert line.count("sha256:") == 2 and line.count(" on rank ") == 2, line
    assert not (tmp_path / "r").exists()


@needs_mpi
def test_the_nccl_path_with_two_ranks_averages_the_gradients_of_the_whole_batch(tmp_path):
    """Two ranks, each on its own fake GPU (cuda:<local rank>), the NCCL transport (its allReduce on the fake through
    MPI): each rank's averaged gradients equal the gradients of the whole batch in one process (emu, whose kernels
    the fake runs) within float32 rounding, and are bit-identical on the two ranks."""
    rc, out, err = run_ranks(2, [__file__, "nccl", tmp_path], timeout=180)
    assert rc == 0, err
    g = [np.load(tmp_path / f"nccl{r}.npz") for r in range(2)]
    assert g[0]["device"] == "cuda:0" and g[1]["device"] == "cuda:1"
    ref, _ = build_net(TINY, "tiny.cfg", device="emu", seed=0)
    x, y = _nccl_batch()
    ref.forward(x, y, train=True, step=0)
    ref.backward()
    for k, l, p in ref.param_items():
        np.testing.assert_array_equal(g[0][k], g[1][k], err_msg=k)
        np.testing.assert_allclose(g[0][k], l.grads[p], rtol=1e-5, atol=1e-8, err_msg=k)


@needs_mpi
def test_scaling_bench_runs_one_and_two_ranks(tmp_path):
    """benchmarks/scaling_bench.py (the data-parallel scaling measurement) on numpy with 1 and 2 ranks: a row per rank count with
    its images/s and, for 2 ranks, the reductions' time; written to --out."""
    bench = Path(__file__).resolve().parents[1] / "benchmarks" / "scaling_bench.py"
    out = tmp_path / "scaling.md"
    done = subprocess.run([sys.executable, str(bench), "--device", "numpy", "--ranks", "1,2", "--steps", "2",
                           "--warmup", "1", "--out", str(out)], capture_output=True, text=True, timeout=240,
                          env=subprocess_env())
    assert done.returncode == 0, done.stderr[-2000:]
    runs = json.loads(out.read_text().split("```json\n", 1)[1].rsplit("```", 1)[0])
    assert [r["ranks"] for r in runs] == [1, 2]
    assert all(r["images_per_s"] > 0 and r["reducer"] == "HostTransport" for r in runs)
    assert runs[1]["reduce_ms"] > 0 and runs[1]["grad_bytes"] == runs[0]["grad_bytes"] > 0


def _nccl_batch():
    rng = np.random.default_rng(1)
    return rng.standard_normal((3, 12, 12, 8)).astype(np.float32), rng.integers(0, 4, 8).astype(np.int32)


# --- the programs the ranks run -------------------------------------------------------------------------------------
def _worker_steps(device, steps, batch, bucket_mb, out):
    world = World()
    losses, params, stats = train_steps(device, int(steps), int(batch), world, float(bucket_mb))
    if world.rank == 0:
        np.savez(out, losses=np.array(losses), stats=json.dumps(stats),
                 **{f"param/{k}": v for k, v in params.items()})


def _worker_diverge():
    from convnet.distributed import DistributedError
    world = World(timeout_s=60)
    net, _ = build_net(TINY, "tiny.cfg", device="numpy", seed=0)
    world.check_same(*param_checksums(net), "at the start")
    if world.rank == 1:
        net.layers["fc1"].params["w"][3, 4] = np.nextafter(net.layers["fc1"].params["w"][3, 4], np.float32(1))
    try:
        world.check_same(*param_checksums(net), "in the test")
    except DistributedError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)


def _worker_leave():
    world = World()
    if world.rank == 1:
        sys.exit(3)  # leaves without a word; rank 0 must not wait for it forever
    world.sum(np.zeros(1), "a sum rank 1 never joins")


def _worker_crash(kind, *argv):
    """``python -m convnet.train argv`` on every rank, where rank 1 fails while loading its data: a bug, or a user
    error under --debug."""
    from convnet import train
    from convnet.data import DataError
    from convnet.distributed import active_world
    from convnet.training import inputs
    load = inputs.checked_dataset

    def fail_on_rank_1(cfg, net):
        if active_world().rank == 1:
            raise RuntimeError("a bug on rank 1") if kind == "bug" else DataError("no data on rank 1")
        return load(cfg, net)

    inputs.checked_dataset = fail_on_rank_1
    sys.exit(train.main([*argv, *(["--debug"] if kind == "debug" else [])]))


def _worker_nccl(out):
    from convnet.devices import backend_cuda, get_device
    from convnet.distributed import NcclTransport, rank_device
    mp = pytest.MonkeyPatch()
    fake = FakeCupy(devices=2).install(mp)
    FakeNccl().install(fake)
    mp.setattr(backend_cuda.CudaDevice, "available", lambda self: (True, "a fake GPU"))
    world = World()
    dev = rank_device("cuda", world, get_device)
    net, _ = build_net(TINY, "tiny.cfg", device=dev, seed=0)
    reducer = GradReducer(net, world, bucket_mb=1e-9)
    assert isinstance(reducer.transport, NcclTransport)
    x, y = _nccl_batch()
    part = slice(4 * world.rank, 4 * world.rank + 4)
    with dev.activate():
        xd, yd = dev.asarray(np.ascontiguousarray(x[..., part])), dev.asarray(y[part], np.int32)
    net.forward(xd, yd, train=True, step=0, batch=(8, 4 * world.rank))
    net.backward(on_grads=reducer.on_grads)
    reducer.finish()
    np.savez(Path(out) / f"nccl{world.rank}.npz", device=str(dev),
             **{k: l.device.to_numpy(l.grads[p]) for k, l, p in net.param_items()})


if __name__ == "__main__":
    workers = {"steps": _worker_steps, "diverge": _worker_diverge, "leave": _worker_leave, "nccl": _worker_nccl,
               "crash": _worker_crash}
    workers[sys.argv[1]](*sys.argv[2:])


def test_each_bucket_is_updated_right_after_its_own_reduction():
    """finish(opt.step): the optimizer is called once per bucket, in bucket order, with that bucket's parameters,
    right after the bucket's reduction completes (not after all of them); together they update every parameter
    once, to the same values as one opt.step() after finish()."""
    from convnet.distributed import HostTransport

    class Recording(HostTransport):
        def finish(self, b):
            order.append(("reduced", b.index))
            super().finish(b)

    order = []
    nets = [build_net(TINY, "tiny.cfg", device="numpy", seed=0)[0] for _ in range(2)]
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 12, 12, 8)).astype(np.float32)
    y = rng.integers(0, 4, 8).astype(np.int32)
    for i, net in enumerate(nets):
        world = OneRank()
        world.MPI = None  # one rank: the host transport makes no MPI call
        transport = (Recording if i == 0 else HostTransport)(world)
        reducer = GradReducer(net, world, bucket_mb=2000 * 4 / 2**20, transport=transport)
        opt = SGD(net, lr=0.1, momentum=0.9, weight_decay=5e-4)
        net.forward(x, y, train=True, step=0)
        net.backward(on_grads=reducer.on_grads)
        if i == 0:
            def step(items, opt=opt):
                order.append(("updated", [k for k, _, _ in items]))
                opt.step(items)
            reducer.finish(step)
        else:
            reducer.finish()
            opt.step()
    buckets = reducer.buckets  # the second net's: the same cut
    assert len(buckets) >= 2
    assert order == [e for b in buckets for e in (("reduced", b.index), ("updated", [k for k, *_ in b.entries]))]
    assert sorted(k for e in order if e[0] == "updated" for k in e[1]) == sorted(k for k, _, _ in nets[0].param_items())
    for (k, l, p), (_, l2, _) in zip(nets[0].param_items(), nets[1].param_items()):
        np.testing.assert_array_equal(l.params[p], l2.params[p], err_msg=k)
