"""Checkpoints: atomic writes, contents, bit-exact resume on numpy (epoch boundary, mid-epoch, Ctrl-C)."""
import json
import os
import signal

import numpy as np
import pytest

from convnet import checkpoint as ckpt
from convnet.optim import SGD
from convnet.train import main, run
from models import TINY


@pytest.fixture
def tiny(tmp_path):
    p = tmp_path / "tiny.cfg"
    p.write_text(TINY.replace("epochs = 3", "epochs = 2"))
    return p


def _args(model, out, *extra):
    return ["--model", str(model), "--out", str(out), "--no-progress", "--no-plots", "--device", "numpy",
            "--synthetic-train", "96", "--synthetic-test", "32", "--seed", "5", *extra]


def _assert_same(a, b):
    assert a["params"].keys() == b["params"].keys()
    for k in a["params"]:
        assert np.array_equal(a["params"][k], b["params"][k]), f"param {k} differs"
        assert np.array_equal(a["velocity"][k], b["velocity"][k]), f"velocity {k} differs"
    ha, hb = a["meta"]["history"], b["meta"]["history"]
    strip = lambda h: [{k: v for k, v in r.items() if k not in ("train_time_s", "images_per_s", "elapsed_s", "cpu_s")} for r in h]
    assert strip(ha) == strip(hb)
    assert a["meta"]["step"] == b["meta"]["step"]


@pytest.fixture
def reference(tiny, tmp_path):
    run(_args(tiny, tmp_path / "ref"), log=lambda s: None)
    return ckpt.load(tmp_path / "ref")


def test_checkpoint_contents(reference):
    m = reference["meta"]
    assert m["epoch"] == 2 and m["batch"] == 0 and m["step"] == 2 * (96 // 16)
    assert m["config"]["seed"] == 5 and "[conv1]" in m["config"]["model_text"]
    assert set(m["optimizer"]) >= {"lr", "momentum", "weight_decay"} and m["rng"]["seed"] == 5
    assert reference["mean"].shape == (8, 8, 1)
    assert set(reference["params"]) == {"conv1/b", "conv1/w", "fc2/b", "fc2/w", "fc3/b", "fc3/w"}
    assert not any(np.array_equal(v, 0 * v) for v in reference["velocity"].values())


def test_resume_at_epoch_boundary_is_bit_exact(tiny, tmp_path, reference):
    out = tmp_path / "b"
    run(_args(tiny, out, "--epochs", "1"), log=lambda s: None)
    assert ckpt.load(out)["meta"]["epoch"] == 1
    res = run(["--resume", str(out), "--epochs", "2", "--no-progress"], log=lambda s: None)
    assert res["status"] == "done"
    _assert_same(ckpt.load(out), reference)


def test_resume_mid_epoch_is_bit_exact(tiny, tmp_path, reference):
    out = tmp_path / "c"
    res = run(_args(tiny, out, "--max-steps", "4"), log=lambda s: None)
    assert res["status"] == "max_steps"
    m = ckpt.load(out)["meta"]
    assert (m["epoch"], m["batch"], m["step"]) == (0, 4, 4)
    res = run(["--resume", str(out / "checkpoint.npz"), "--max-steps", "5"], log=lambda s: None)  # into epoch 2
    assert ckpt.load(out)["meta"]["step"] == 9
    run(["--resume", str(out)], log=lambda s: None)
    _assert_same(ckpt.load(out), reference)


def test_ctrl_c_saves_and_resume_is_bit_exact(tiny, tmp_path, reference, monkeypatch, capsys):
    out = tmp_path / "d"
    calls = {"n": 0}
    real = SGD.step

    def step(self):
        real(self)
        calls["n"] += 1
        if calls["n"] == 7:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in the middle of epoch 2

    monkeypatch.setattr(SGD, "step", step)
    assert main(_args(tiny, out)) == 130
    assert "interrupted (Ctrl-C)" in capsys.readouterr().out
    m = ckpt.load(out)["meta"]
    assert (m["epoch"], m["batch"], m["step"]) == (1, 1, 7)
    monkeypatch.setattr(SGD, "step", real)
    assert main(["--resume", str(out), "--no-progress"]) == 0
    _assert_same(ckpt.load(out), reference)


def test_atomic_write_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    p = tmp_path / "checkpoint.npz"
    params = {"a/w": np.arange(4.0)}
    ckpt.save(p, params=params, velocity={"a/w": np.zeros(4)}, mean=None, meta={"epoch": 1})
    assert ckpt.load(p)["meta"]["epoch"] == 1

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", boom)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save(p, params=params, velocity={"a/w": np.zeros(4)}, mean=None, meta={"epoch": 2})
    assert ckpt.load(p)["meta"]["epoch"] == 1  # the previous checkpoint is intact
    assert os.listdir(tmp_path) == ["checkpoint.npz"]  # no temporary file left behind


def test_bad_checkpoints(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="not found"):
        ckpt.load(tmp_path / "nope.npz")
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(ckpt.CheckpointError, match="cannot read"):
        ckpt.load(tmp_path / "junk.npz")
    np.savez(tmp_path / "other.npz", meta=np.array('{"format": "x"}'))
    with pytest.raises(ckpt.CheckpointError, match="not a convnet-checkpoint"):
        ckpt.load(tmp_path / "other.npz")
    assert main(["--resume", str(tmp_path / "nope.npz")]) == 2


def test_resume_mid_epoch_with_the_linear_schedule_is_bit_exact(tiny, tmp_path):
    ref, out = tmp_path / "lin-ref", tmp_path / "lin"
    run(_args(tiny, ref, "--schedule", "linear"), log=lambda s: None)
    run(_args(tiny, out, "--schedule", "linear", "--max-steps", "8"), log=lambda s: None)
    run(["--resume", str(out)], log=lambda s: None)
    _assert_same(ckpt.load(out), ckpt.load(ref))


# ---------------------------------------------------------------------------- bad, corrupt and interrupted checkpoints
def _meta_of(st):
    return {k: st["meta"][k] for k in ("epoch", "batch", "step")}


def test_non_finite_state_is_never_saved_nor_loaded(tmp_path, capsys):
    """Items 2, 3: a checkpoint of NaN/inf parameters is never written, and one on disk is never used."""
    p = tmp_path / "checkpoint.npz"
    for bad in (np.nan, np.inf):
        with pytest.raises(ckpt.CheckpointError, match="non-finite values .* param/a/w"):
            ckpt.save(p, params={"a/w": np.array([1.0, bad])}, velocity={"a/w": np.zeros(2)}, mean=None,
                      meta={"epoch": 1})
        with pytest.raises(ckpt.CheckpointError, match="velocity/a/w"):
            ckpt.save(p, params={"a/w": np.zeros(2)}, velocity={"a/w": np.array([bad, 0.0])}, mean=None, meta={})
    assert not p.exists() and os.listdir(tmp_path) == []
    np.savez(p, **{"param/a/w": np.array([np.nan, 1.0]), "meta": np.array('{"format": "%s"}' % ckpt.FORMAT)})
    with pytest.raises(ckpt.CheckpointError, match="non-finite values .*param/a/w.*diverged"):
        ckpt.load(p)
    for argv in (["--resume", str(p)], ["--eval-only", "--resume", str(p)]):
        assert main(argv) == 2
        assert "non-finite" in capsys.readouterr().err


def test_nan_weights_are_not_loaded_into_a_net():
    from convnet.layers import FC, Data, SoftmaxCost
    from convnet.graph import Net
    net = Net([Data("data", channels=1, size=2), FC("fc", "data", outputs=3), SoftmaxCost("p", "fc")],
              device="numpy")
    state = net.state_dict()
    good = {k: v.copy() for k, v in state.items()}
    state["fc/w"] = state["fc/w"].copy()
    state["fc/w"][0, 0] = np.nan
    with pytest.raises(ValueError, match="parameter 'fc/w' has non-finite values"):
        net.load_state_dict(state)
    assert all(np.array_equal(net.state_dict()[k], good[k]) for k in good)  # nothing half loaded


@pytest.fixture
def one_epoch(tiny, tmp_path):
    out = tmp_path / "one"
    run(_args(tiny, out, "--epochs", "1"), log=lambda s: None)
    return out


def test_corrupt_checkpoints_are_checkpoint_errors(one_epoch, tmp_path):
    """Truncated, empty and bit-flipped files: a CheckpointError naming the file (or, for a flip in a part of
    the zip nobody reads, a clean load), never BadZipFile/EOFError/KeyError/zlib tracebacks."""
    data = (one_epoch / "checkpoint.npz").read_bytes()
    p = tmp_path / "c.npz"
    for n in (0, 1, 4, 30, 100, len(data) // 3, len(data) // 2, len(data) - 22, len(data) - 1):
        p.write_bytes(data[:n])
        with pytest.raises(ckpt.CheckpointError, match=r"cannot read checkpoint .*c\.npz.: "):
            ckpt.load(p)
    rng = np.random.default_rng(0)
    loaded = 0
    for pos in sorted(set(np.linspace(0, len(data) - 1, 48).astype(int)) | set(rng.integers(0, len(data), 48))):
        flipped = bytearray(data)
        flipped[pos] ^= 1 << int(rng.integers(0, 8))
        p.write_bytes(bytes(flipped))
        try:
            st = ckpt.load(p)
        except ckpt.CheckpointError as e:
            assert "c.npz" in str(e) and "\n" not in str(e)
        else:
            loaded += 1
            ref = ckpt.load(one_epoch)  # what loads must be the checkpoint itself (CRC-32 catches data flips)
            assert all(np.array_equal(st["params"][k], ref["params"][k]) for k in ref["params"])
    assert loaded < 48
    np.savez(p, **{"param/a/w": np.zeros(2)})  # no meta
    with pytest.raises(ckpt.CheckpointError, match="no 'meta' entry"):
        ckpt.load(p)
    np.save(tmp_path / "plain.npy", np.zeros(3))
    with pytest.raises(ckpt.CheckpointError, match="not an .npz archive"):
        ckpt.load(tmp_path / "plain.npy")


def test_incomplete_or_mismatched_checkpoints_are_one_line_errors(one_epoch, tmp_path, capsys):
    """A checkpoint without a part a resume needs, or whose parameters do not fit its model."""
    st = ckpt.load(one_epoch)

    def write(name, params=None, velocity=None, drop=(), **meta_changes):
        meta = {k: v for k, v in st["meta"].items() if k not in drop}
        meta.update(meta_changes)
        out = tmp_path / name
        ckpt.save(out / "checkpoint.npz", params=st["params"] if params is None else params,
                  velocity=st["velocity"] if velocity is None else velocity, mean=st["mean"], meta=meta)
        return out

    cases = [
        (write("no-schedule", drop=("schedule",)), "incomplete: metadata 'schedule' should be a dict, got missing"),
        (write("bad-epoch", epoch="x"), "incomplete: metadata 'epoch' should be an integer"),
        (write("no-model", config={**st["meta"]["config"], "model_text": None}), "no model-file text"),
        (write("no-velocity", velocity={}), "parameters and momentum buffers differ"),
        (write("renamed", params={k.replace("fc3", "fcx"): v for k, v in st["params"].items()},
               velocity={k.replace("fc3", "fcx"): v for k, v in st["velocity"].items()}),
         "does not fit the model or is incomplete: .*no parameter 'fc3/"),
        (write("reshaped", params={**st["params"], "fc3/b": np.zeros(7, np.float32)}), "fc3/b': checkpoint shape"),
    ]
    for out, needle in cases:
        assert main(["--resume", str(out), "--epochs", "2"]) == 2, out
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and out.name in err, err
        assert __import__("re").search(needle, err), (needle, err)


def test_hand_edited_checkpoints_are_refused(tiny, tmp_path, capsys):
    """A checkpoint edited by hand: parameters or momentum that are not float32/float64 (they used to be cast
    silently: ints truncated, float16 rounded), a step that the position does not give (it keys the dropout masks),
    a history that does not match the epoch, null numbers in a history entry (a resume died on them or logged them).
    Each is one line naming the file and the value; the untouched checkpoint resumes."""
    out = tmp_path / "mid"
    run(_args(tiny, out, "--epochs", "2", "--max-steps", "8"), log=lambda s: None)  # epoch 1 (6 steps) + 2 batches
    st = ckpt.load(out)
    assert (st["meta"]["epoch"], st["meta"]["batch"], st["meta"]["step"]) == (1, 2, 8)
    hist = st["meta"]["history"]

    def write(name, params=None, velocity=None, **meta_changes):
        d = tmp_path / name
        ckpt.save(d / "checkpoint.npz", params={**st["params"], **(params or {})},
                  velocity={**st["velocity"], **(velocity or {})}, mean=st["mean"], meta={**st["meta"], **meta_changes})
        return d

    w = st["params"]["fc3/w"]
    cases = [
        (write("int", params={"fc3/w": (w * 1000).astype(np.int32)}), "parameter 'fc3/w' has dtype int32"),
        (write("half", params={"fc2/b": st["params"]["fc2/b"].astype(np.float16)}), "'fc2/b' has dtype float16"),
        (write("half-v", velocity={"fc3/w": st["velocity"]["fc3/w"].astype(np.float16)}),
         "momentum of 'fc3/w' has dtype float16"),
        (write("step", step=3), "step 3 is inconsistent with epoch 1, batch 2: the finished epochs end at step 6, "
                                "so the step is 8"),
        (write("step-0", step=0, history=[]), "epoch 1 but 0 history entries"),
        (write("epoch", epoch=0, step=2, history=[]), None),  # consistent: the position of epoch 1, batch 2
        (write("null", history=[{**hist[0], "train_loss": None}]), "history entry 1 has a missing or invalid value: "
                                                                    "train_loss = null"),
        (write("null-time", history=[{**hist[0], "elapsed_s": None}]), "elapsed_s = null"),
        (write("renumbered", history=[{**hist[0], "epoch": 3}]), "history entry 1 says epoch 3"),
    ]
    for d, needle in cases:
        rc = main(["--resume", str(d), "--epochs", "2", "--no-progress", "--no-plots"])
        err = capsys.readouterr().err
        if needle is None:
            assert rc == 0, err
            continue
        assert rc == 2 and len(err.strip().splitlines()) == 1 and str(d) in err, (d, err)
        assert needle in err, (needle, err)
    test_error_free = write("untested", history=[{**hist[0], "test_loss": None, "test_error": None}])
    assert main(["--resume", str(test_error_free), "--epochs", "2", "--no-progress", "--no-plots"]) == 0
    assert main(["--resume", str(out), "--epochs", "2", "--no-progress", "--no-plots"]) == 0


def test_batch_size_change_mid_epoch_is_refused(tiny, tmp_path, capsys):
    """The saved position is a batch index; another --batch-size in the middle of an epoch would skip or
    repeat images, so it is refused. At an epoch boundary it is fine."""
    out = tmp_path / "mid"
    run(_args(tiny, out, "--max-steps", "4"), log=lambda s: None)
    assert main(["--resume", str(out), "--batch-size", "32"]) == 2
    err = capsys.readouterr().err
    assert "--batch-size 32 differs from the checkpoint's 16" in err and "middle of epoch 1 (batch 4)" in err, err
    assert "Resume with --batch-size 16" in err
    assert main(["--resume", str(out), "--seed", "6"]) == 2 and "--seed 6 differs" in capsys.readouterr().err
    assert _meta_of(ckpt.load(out)) == {"epoch": 0, "batch": 4, "step": 4}  # untouched
    assert main(["--resume", str(out), "--epochs", "1", "--no-progress"]) == 0  # finish the epoch as saved
    assert main(["--resume", str(out), "--epochs", "2", "--batch-size", "32", "--no-progress"]) == 0
    assert _meta_of(ckpt.load(out)) == {"epoch": 2, "batch": 0, "step": 6 + 3}


def test_stale_temporaries_are_removed_and_log_agrees_with_checkpoint(one_epoch, capsys):
    """kill -9 during a checkpoint write leaves checkpoint.npz.*.tmp; the next start removes it. A kill
    between an epoch's checkpoint and its log line (or, in the old order, after the log line and before the
    checkpoint) never duplicates nor loses an epoch in log.jsonl."""
    out = one_epoch
    stale = out / "checkpoint.npz.k9x1.tmp"
    stale.write_bytes(b"\0" * 1000)
    log = out / "log.jsonl"
    line1 = log.read_text()
    log.write_text(line1 + line1.replace('"epoch": 1', '"epoch": 2'))  # the old order: epoch 2's line, no checkpoint
    assert main(["--resume", str(out), "--epochs", "2"]) == 0
    assert "removed 1 stale temporary file" in capsys.readouterr().out
    assert not stale.exists() and not list(out.glob("*.tmp"))
    epochs = [json.loads(s)["epoch"] for s in log.read_text().splitlines()]
    assert epochs == [1, 2]
    log.write_text(line1)  # the new order: epoch 2 checkpointed, its log line lost
    assert main(["--resume", str(out), "--epochs", "3"]) == 0
    assert [json.loads(s)["epoch"] for s in log.read_text().splitlines()] == [1, 2, 3]
    hist = ckpt.load(out)["meta"]["history"]
    assert [json.loads(s) for s in log.read_text().splitlines()] == hist


def test_second_ctrl_c_aborts_at_once(tiny, tmp_path, monkeypatch, capsys):
    """The first Ctrl-C stops after the step; a second one while the loader thread is being joined aborts
    at once (exit 130, no checkpoint), instead of being swallowed in the loader generator's clean-up."""
    import threading
    import time

    from convnet.data import Loader
    out = tmp_path / "cc"
    release = threading.Event()
    real_batch, real_step = Loader.make_batch, SGD.step
    state = {"n": 0, "timer": None, "t0": None}

    def slow_batch(self, epoch, b, order=None):
        if self.train and b == 4:  # the loader thread is busy here when training stops after batch 3
            release.wait(6)
        return real_batch(self, epoch, b, order)

    def step(self):
        real_step(self)
        state["n"] += 1
        if state["n"] == 4:
            state["t0"] = time.perf_counter()
            os.kill(os.getpid(), signal.SIGINT)  # first Ctrl-C
            state["timer"] = threading.Timer(0.4, os.kill, (os.getpid(), signal.SIGINT))  # second, during the join
            state["timer"].start()

    monkeypatch.setattr(Loader, "make_batch", slow_batch)
    monkeypatch.setattr(SGD, "step", step)
    # while the test runs, a stray SIGINT (the timer firing after a failure) must not abort pytest
    previous = signal.signal(signal.SIGINT, lambda *a: None)
    try:
        rc = main(_args(tiny, out, "--prefetch", "1"))
        elapsed = time.perf_counter() - state["t0"]
    finally:
        release.set()
        if state["timer"] is not None:
            state["timer"].join()
        signal.signal(signal.SIGINT, previous)
    cap = capsys.readouterr()
    assert rc == 130 and "interrupted" in cap.err
    assert "saved" not in cap.out and not (out / "checkpoint.npz").exists(), cap.out
    assert elapsed < 3.0, elapsed  # not the loader thread's 6 s
