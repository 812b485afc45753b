"""Checkpoints: atomic writes, contents, bit-exact resume on numpy (epoch boundary, mid-epoch, Ctrl-C)."""
import os
import signal

import numpy as np
import pytest

from convnet import checkpoint as ckpt
from convnet.optim import SGD
from convnet.train import main, run
from test_train import TINY


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
