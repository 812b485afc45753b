"""Training smoke runs (numpy, emu), divergence detection, CLI errors, eval-only, plots and logs."""
import json

import numpy as np
import pytest

from convnet.data import DataError
from convnet.devices import DeviceUnavailable, get_device
from convnet.model_file import ModelFileError
from convnet import ops
from convnet.train import TrainingError, main, run
from models import TINY


@pytest.fixture
def tiny(tmp_path):
    p = tmp_path / "tiny.cfg"
    p.write_text(TINY)
    return p


def _args(model, out, *extra):
    return ["--model", str(model), "--out", str(out), "--no-progress", "--synthetic-train", "128",
            "--synthetic-test", "64", *extra]


def test_numpy_smoke_loss_goes_down(tiny, tmp_path):
    logs = []
    res = run(_args(tiny, tmp_path / "run", "--device", "numpy"), log=logs.append)
    h = res["history"]
    assert res["status"] == "done" and len(h) == 3
    assert h[-1]["train_loss"] < 0.7 * h[0]["train_loss"], [r["train_loss"] for r in h]
    assert h[0]["train_loss"] < 1.45  # started near log(4) = 1.386 and is already learning
    assert h[-1]["test_error"] < 0.25
    assert h[-1]["test_top5_error"] is None  # 4 classes: no top-5
    lines = [json.loads(s) for s in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3]
    assert {"train_loss", "train_error", "test_error", "images_per_s", "lr"} <= set(lines[0])
    for png in ("errors.png", "filters.png", "predictions.png"):
        assert (tmp_path / "run" / png).stat().st_size > 1000, png
    assert any("epoch 3" in s for s in logs)


def test_emu_smoke_loss_goes_down(tmp_path):
    try:
        get_device("emu")
    except DeviceUnavailable as e:
        pytest.fail(f"emu must be built for the smoke test: {e}")
    p = tmp_path / "micro.cfg"
    p.write_text(TINY)
    res = run(["--model", str(p), "--out", str(tmp_path / "emu"), "--no-progress", "--no-plots", "--device", "emu",
               "--synthetic-train", "128", "--synthetic-test", "32"], log=lambda s: None)
    h = res["history"]
    assert h[0]["device"] == "emu" and len(h) == 3
    assert h[-1]["train_loss"] < 0.7 * h[0]["train_loss"], [r["train_loss"] for r in h]
    assert h[-1]["test_error"] < 0.25


def test_emu_and_numpy_agree_on_one_step(tiny):
    """The same net, weights and batch on emu and numpy give the same loss and gradients (float32 tolerance)."""
    from convnet.model_file import build_net
    try:
        emu = get_device("emu")
    except DeviceUnavailable as e:
        pytest.fail(str(e))
    a, _ = build_net(tiny.read_text(), "tiny", device="numpy", seed=1)
    b, _ = build_net(tiny.read_text(), "tiny", device=emu, seed=1)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 8, 8, 8)).astype(np.float32)
    y = rng.integers(0, 4, 8).astype(np.int32)
    pa = a.forward(x, y, train=True, step=3)
    a.backward()
    pb = b.forward(x, y, train=True, step=3)
    b.backward()
    np.testing.assert_allclose(pb, pa, rtol=1e-4, atol=1e-6)
    for (k, la, p), (_, lb, _) in zip(a.param_items(), b.param_items()):
        np.testing.assert_allclose(lb.grads[p], la.grads[p], rtol=1e-3, atol=1e-5, err_msg=k)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_divergence_stops_with_a_clear_message(tiny, tmp_path, capsys):
    with pytest.raises(TrainingError, match=r"the loss became (nan|inf).*Lower the learning rate"):
        run(_args(tiny, tmp_path / "nan", "--device", "numpy", "--lr", "1e6", "--no-plots"), log=lambda s: None)
    rc = main(_args(tiny, tmp_path / "nan2", "--device", "numpy", "--lr", "1e6", "--no-plots"))
    assert rc == 1
    assert "training diverged" in capsys.readouterr().err


def test_missing_data_and_bad_model_messages(tmp_path, capsys):
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        run(["--data", str(tmp_path / "none"), "--out", str(tmp_path / "o"), "--no-progress", "--device", "numpy"],
            log=lambda s: None)
    assert main(["--dataset", "cifar10", "--model", "cifar-18pct", "--out", str(tmp_path / "c"),
                 "--device", "numpy"]) == 2
    assert "cifar-10-python.tar.gz" in capsys.readouterr().err
    bad = tmp_path / "bad.cfg"
    bad.write_text(TINY.replace("type = pool", "type = poool"))
    with pytest.raises(ModelFileError, match=r"bad.cfg \[pool1\]: unknown layer type 'poool'"):
        run(["--model", str(bad), "--out", str(tmp_path / "b"), "--device", "numpy"], log=lambda s: None)
    assert main(["--model", str(bad), "--out", str(tmp_path / "b")]) == 2
    # a model whose input does not match the data
    with pytest.raises(DataError, match="1-channel images, the model's data layer expects 3"):
        run(["--model", "cifar-18pct", "--dataset", "fashion-mnist", "--data", str(tmp_path / "fm"),
             "--out", str(tmp_path / "x"), "--device", "numpy"], log=lambda s: None) if _fm(tmp_path) else None


def _fm(tmp_path):
    from test_data import make_fashion_dir
    (tmp_path / "fm").mkdir()
    make_fashion_dir(tmp_path / "fm")
    return True


def test_fashion_mnist_training_from_idx_files_and_eval_only(tmp_path):
    """The default model on (tiny, random) Fashion-MNIST files through --data, then --eval-only."""
    _fm(tmp_path)
    out = tmp_path / "fm-run"
    res = run(["--data", str(tmp_path / "fm"), "--out", str(out), "--epochs", "1", "--batch-size", "32",
               "--no-progress", "--device", "numpy", "--no-plots"], log=lambda s: None)
    assert res["history"][0]["test_top5_error"] is not None  # 10 classes: top-5 reported
    logs = []
    ev = run(["--eval-only", "--resume", str(out), "--no-plots", "--device", "numpy"], log=logs.append)
    assert ev["status"] == "eval" and ev["test_error"] == pytest.approx(res["history"][0]["test_error"])
    assert "top-5 error" in logs[-1]


def test_summary_flag(capsys):
    logs = []
    run(["--model", "alexnet", "--summary"], log=logs.append)
    assert logs[0].startswith("convnet ") and "; device " in logs[0]  # where it was imported from, the device
    assert "60,965,224" in logs[1]


@pytest.mark.parametrize("model", ["fmnist", "cifar-18pct"])
def test_shipped_model_step_on_emu_matches_numpy(model):
    """One training step of a shipped model (its real shapes) on the emulated kernels vs the numpy device."""
    from convnet.model_file import load_model
    emu = get_device("emu")
    a, _ = load_model(model, device="numpy", seed=2)
    b, _ = load_model(model, device=emu, seed=2)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((*a.data_layer.out_shape, 4)).astype(np.float32)
    y = rng.integers(0, 10, 4).astype(np.int32)
    pa = a.forward(x, y, train=True, step=1)
    a.backward()
    pb = b.forward(x, y, train=True, step=1)
    b.backward()
    np.testing.assert_allclose(pb, pa, rtol=1e-3, atol=1e-6)
    for (k, la, p), (_, lb, _) in zip(a.param_items(), b.param_items()):
        g = la.grads[p]
        np.testing.assert_allclose(lb.grads[p], g, rtol=2e-3, atol=2e-4 * float(np.abs(g).max()) + 1e-8,
                                   err_msg=k)


def test_module_entry_point():
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-m", "convnet.train", "--model", "alexnet", "--summary"], cwd=root,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "60,965,224 parameters" in r.stdout
    r = subprocess.run([sys.executable, "-m", "convnet.train", "--model", "nonexistent"], cwd=root,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "unknown model 'nonexistent'" in r.stderr


def test_flags_and_train_keys_come_from_the_config_fields(tiny):
    """Config declares every setting once: flags, [train] keys and the precedence defaults < [train] < flags."""
    import dataclasses

    from convnet.config import TRAIN_KEYS, Config, make_parser
    from convnet.train import make_config, parse_args
    fields = {f.name for f in dataclasses.fields(Config)}
    dests = {a.dest for a in make_parser()._actions}
    assert set(TRAIN_KEYS) <= fields and {"epochs", "lr", "flip", "min_lr"} <= set(TRAIN_KEYS)
    assert fields - {"model_text", "model_source", "min_lr"} <= dests  # min_lr: a [train] key without a flag
    cfg = make_config(parse_args(["--model", str(tiny), "--lr", "0.2", "--no-flip", "--no-progress"]))
    assert (cfg.lr, cfg.batch_size, cfg.momentum, cfg.flip, cfg.progress) == (0.2, 16, 0.9, False, False)
    assert cfg.dataset == "synthetic" and cfg.epochs == 3 and "[conv1]" in cfg.model_text
    assert parse_args([]).flip is None and parse_args(["--flip"]).flip is True


def test_the_cpu_convolution_algorithm_is_a_train_key_and_a_flag_saved_with_the_run(tiny, tmp_path, monkeypatch):
    """[train] cpu_conv (--cpu-conv overrides it) chooses the cpu device's convolution algorithm for the run: every
    convolution of the run sees it, the checkpoint keeps it (a resume continues with it), and it is the process's
    default (auto) again afterwards."""
    from convnet import checkpoint as ckpt
    from convnet.cpu import winograd
    if not get_device("cpu").available()[0]:
        pytest.skip("the cpu device is not built")
    seen, chosen = [], winograd.chosen
    monkeypatch.setattr(winograd, "chosen", lambda *a: seen.append(winograd.algo()) or chosen(*a))
    model = tmp_path / "tiny-winograd.cfg"
    model.write_text(tiny.read_text() + "cpu_conv = winograd\n")
    res = run(_args(model, tmp_path / "run", "--device", "cpu", "--epochs", "1", "--no-plots"), log=lambda s: None)
    assert res["status"] == "done" and seen and set(seen) == {"winograd"}
    assert ckpt.load(str(tmp_path / "run"))["meta"]["config"]["cpu_conv"] == "winograd"
    assert winograd.algo() == "auto"
    seen.clear()
    run(_args(model, tmp_path / "run2", "--device", "cpu", "--epochs", "1", "--no-plots", "--cpu-conv", "auto"),
        log=lambda s: None)
    assert set(seen) == {"auto"}


def test_the_run_says_its_estimated_time_once(tiny, tmp_path, monkeypatch):
    """After the first ETA_WARMUP + ETA_STEPS steps of a run, one log line gives the estimated total time, the time
    to go and the finish time; a run too short for the estimate says nothing. (Thresholds lowered for the test.)"""
    from convnet.training import report
    monkeypatch.setattr(report, "ETA_WARMUP", 2)
    monkeypatch.setattr(report, "ETA_STEPS", 10)
    logs = []
    res = run(_args(tiny, tmp_path / "run", "--device", "numpy", "--epochs", "3", "--no-plots"), log=logs.append)
    assert res["status"] == "done"
    eta = [s for s in logs if s.startswith("estimated time: ")]
    assert len(eta) == 1, logs
    assert " in all, " in eta[0] and " to go, finishing about " in eta[0]
    assert "ms per step of 16 images over steps 3-12 of this run; test passes not counted)" in eta[0]
    epochs = [i for i, s in enumerate(logs) if s.startswith("epoch ")]
    assert epochs[0] < logs.index(eta[0]) < epochs[1]  # 8 steps an epoch: said in the second epoch, at step 12
    monkeypatch.setattr(report, "ETA_STEPS", 100)
    logs.clear()
    run(_args(tiny, tmp_path / "short", "--device", "numpy", "--epochs", "1", "--no-plots"), log=logs.append)
    assert not any(s.startswith("estimated time") for s in logs)


def test_the_estimate_is_the_remaining_steps_at_the_measured_time_per_step():
    """Eta.line on a fake trainer and clock: 100 ms per step, 1000 steps to go -> 100 s to go; the total adds the
    time the run has taken (60 s: it started 30 s before the mark, which is 30 s before the estimate)."""
    import datetime
    import types

    from convnet.training import report
    cfg = types.SimpleNamespace(epochs=10, batch_size=64)
    t = types.SimpleNamespace(cfg=cfg, train_loader=range(200), epoch=5, batch=0, steps_this_run=0)
    eta = report.Eta(started=-30.0)
    t.steps_this_run = report.ETA_WARMUP
    assert eta.line(t, now=0.0) is None  # the mark
    t.steps_this_run += report.ETA_STEPS - 1
    assert eta.line(t, now=1.0) is None
    t.steps_this_run += 1
    # 5 epochs of 200 steps to go (epoch 5, batch 0)
    wall = datetime.datetime(2026, 1, 2, 3, 4, tzinfo=datetime.timezone.utc)
    line = eta.line(t, now=report.ETA_STEPS * 0.1, wall=wall)
    assert line.startswith("estimated time: 2.7 min in all, 1.7 min to go, finishing about 03:05 UTC (100.0 ms per "
                           "step of 64 images over steps 21-320 of this run"), line
    assert eta.line(t, now=100.0) is None  # said once
    assert [report.duration(s) for s in (45, 600, 9000)] == ["45 s", "10.0 min", "2.5 h"]


# ------------------------------------------------------------------------------------ divergence, dtypes, bad data
def _poison_at(monkeypatch, step, value):
    """From SGD step ``step`` on (1-based), every parameter is set to ``value`` after the update: a divergence
    that the training loss of the steps before cannot see."""
    from convnet.optim import SGD
    real, calls = SGD.step, {"n": 0}

    def poisoned(self):
        real(self)
        calls["n"] += 1
        if calls["n"] >= step:
            for _, layer, p in self.net.param_items():
                layer.params[p][...] = value

    monkeypatch.setattr(SGD, "step", poisoned)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_nan_parameters_after_the_last_step_stop_the_run_and_are_never_checkpointed(tiny, tmp_path, monkeypatch,
                                                                                   capsys):
    """The last update of epoch 2 makes the weights NaN. The run stops with the divergence message (it used
    to report 100% accuracy and checkpoint the NaN weights); the checkpoint of epoch 1 stays, the last good one."""
    from convnet import checkpoint as ckpt
    out = tmp_path / "run"
    _poison_at(monkeypatch, 2 * 128 // 16, np.nan)  # the last step of epoch 2
    rc = main(_args(tiny, out, "--device", "numpy", "--no-plots", "--epochs", "3"))
    err = capsys.readouterr().err
    assert rc == 1 and "training diverged" in err and "the parameter conv1/b became non-finite at epoch 2, step 16" in err, err
    assert f"last good checkpoint is {out / 'checkpoint.npz'} (after epoch 1)" in err, err
    st = ckpt.load(out)  # finite, epoch 1: the diverged state was not written
    assert st["meta"]["epoch"] == 1 and all(np.isfinite(v).all() for v in st["params"].values())
    assert [json.loads(s)["epoch"] for s in (out / "log.jsonl").read_text().splitlines()] == [1]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_non_finite_test_loss_stops_the_run(tiny, tmp_path, monkeypatch, capsys):
    """Finite but huge weights after the last step of epoch 1: the test loss is not finite -> divergence,
    no checkpoint (it used to save and report the NaN test loss with 100% accuracy)."""
    out = tmp_path / "run"
    _poison_at(monkeypatch, 128 // 16, 1e30)
    rc = main(_args(tiny, out, "--device", "numpy", "--no-plots", "--epochs", "1"))
    err = capsys.readouterr().err
    assert rc == 1 and "the test loss became" in err and "No checkpoint of this run was written" in err, err
    assert not (out / "checkpoint.npz").exists()


def test_nan_scores_are_top_k_errors_in_evaluation(tiny, tmp_path, monkeypatch):
    """Evaluation counts an image whose scores are NaN as wrong (top-k used to count all-NaN as right)."""
    from convnet.trainer import Trainer
    from convnet.train import make_config, parse_args
    cfg = make_config(parse_args(_args(tiny, tmp_path / "e", "--device", "numpy")))
    t = Trainer(cfg, log=lambda s: None)
    real = t.net.forward
    monkeypatch.setattr(t.net, "forward", lambda x, *a, **k: real(x, *a, **k) * np.float32(np.nan))
    with pytest.raises(TrainingError, match="the test loss became nan"):
        t.evaluate()
    errs = ops.topk_errors("numpy", np.full((10, 3), np.nan, np.float32), np.zeros(3, np.int32), ks=(1, 5))
    assert errs == (3, 3)


@pytest.mark.parametrize("views", ["one", "multiview", "ten-crops"])
def test_evaluation_ranks_logits_when_the_softmax_saturates(tmp_path, views):
    """10 classes and logits hundreds apart: the softmax of a wrong prediction gives its label a probability of 0,
    tied with the other losers. Top-1 and top-5 errors (one view, the mirrored pair, ten crops) are the ones of
    the logits, the views' summed probabilities ranked in log space (they used to rank the underflowed
    probabilities: top-5 error near 0 with top-1 error near 90%). The reference ranks in the net's float32, where
    two views' winners tie as the trainer sees them (their summed probabilities differ by 1e-170)."""
    from convnet.trainer import Trainer
    from convnet.train import make_config, parse_args
    model = tmp_path / "saturated.cfg"
    model.write_text(TINY.replace("outputs = 4\ninitW = 0.01", "outputs = 10\ninitW = 100"))
    extra = {"one": (), "multiview": ("--multiview",), "ten-crops": ("--eval-crops", "10")}[views]
    cfg = make_config(parse_args(_args(model, tmp_path / "e", "--device", "numpy", *extra)))
    t = Trainer(cfg, log=lambda s: None)
    _, e1, e5, _ = t.evaluate()
    ranks, group = [], []
    for x, y in t.test_loader.epoch(0):
        inputs = [x, np.ascontiguousarray(x[:, :, ::-1, :])] if views == "multiview" else [x]
        for v in inputs:
            t.net.forward(v)
            z = t.net.logits - t.net.logits.max(0)
            group.append(z - np.log(np.exp(z).sum(0)))  # log-softmax
        if len(group) < t.test_loader.views:
            continue
        s = np.logaddexp.reduce(np.stack(group), axis=0)  # log of the views' summed probabilities
        group = []
        ranks += [int((np.delete(s[:, n], y[n]) >= s[y[n], n]).sum()) for n in range(len(y))]
    ranks = np.array(ranks)
    assert len(ranks) == 64
    assert (e1, e5) == ((ranks >= 1).mean(), (ranks >= 5).mean())
    assert e5 > 0.2, (e1, e5)  # many labels ranked below fifth


@pytest.mark.parametrize("device", ["cpu", "emu"])
def test_float64_on_a_float32_device_is_a_one_line_error_at_start(tiny, tmp_path, capsys, device):
    """--dtype float64 where the kernels compute in float32 (cpu, emu): exit 2 before training, naming the devices
    that can (it used to die in the first op with a TypeError traceback); the same when resuming a float32
    checkpoint with --dtype float64."""
    rc = main(_args(tiny, tmp_path / "a", "--device", device, "--dtype", "float64", "--no-plots"))
    err = capsys.readouterr().err
    assert rc == 2 and err == (f"error: --dtype float64 is not supported on {device} (it computes in float32); "
                               f"devices that compute in float64: numpy. Use --dtype float32 or --device numpy\n")
    assert not (tmp_path / "a").exists()
    assert main(_args(tiny, tmp_path / "b", "--device", device, "--no-plots", "--epochs", "1")) == 0
    capsys.readouterr()
    assert main(["--resume", str(tmp_path / "b"), "--dtype", "float64", "--epochs", "2", "--no-progress"]) == 2
    assert "--dtype float64 is not supported on" in capsys.readouterr().err


def test_float64_resume_of_a_float32_checkpoint_on_numpy(tiny, tmp_path):
    """numpy computes in float64: a float32 run resumed with --dtype float64 continues in float64 (parameters and
    momentum cast once at the start)."""
    from convnet import checkpoint as ckpt
    run(_args(tiny, tmp_path / "a", "--device", "numpy", "--no-plots", "--epochs", "1"), log=lambda s: None)
    first = ckpt.load(tmp_path / "a")["params"]
    res = run(["--resume", str(tmp_path / "a"), "--dtype", "float64", "--epochs", "2", "--no-progress"],
              log=lambda s: None)
    st = ckpt.load(tmp_path / "a")
    assert st["meta"]["config"]["dtype"] == "float64" and st["meta"]["epoch"] == 2
    assert {v.dtype for v in st["params"].values()} == {np.dtype(np.float64)}
    assert {v.dtype for v in st["velocity"].values()} == {np.dtype(np.float64)}
    assert all(not np.array_equal(st["params"][k].astype(np.float32), first[k]) for k in first)  # it trained
    assert [h["epoch"] for h in res["history"]] == [1, 2] and np.isfinite(res["history"][-1]["train_loss"])


def test_empty_test_split_is_refused_before_training(tmp_path, capsys):
    """A dataset without test images stops before the first step (it used to train an epoch and then die
    with ZeroDivisionError)."""
    from test_data import make_fashion_dir
    (tmp_path / "fm").mkdir()
    make_fashion_dir(tmp_path / "fm", n_test=0)
    out = tmp_path / "run"
    rc = main(["--data", str(tmp_path / "fm"), "--out", str(out), "--epochs", "1", "--batch-size", "32",
               "--no-progress", "--device", "numpy", "--no-plots"])
    err = capsys.readouterr().err
    assert rc == 2 and "the test set of fashion-mnist is empty" in err, err
    assert not (out / "checkpoint.npz").exists() and not (out / "log.jsonl").exists()


def test_out_of_range_labels_counted_on_the_device_stop_training(tiny, tmp_path, monkeypatch):
    """On a GPU labels are not range-checked on the host (a sync per step); the softmax kernel counts bad ones into a
    device counter that the loop reads where it synchronises anyway, and stops with a clear error. Simulated on emu
    by letting labels past the host checks (the dataset's and the op's) and corrupting one batch's labels."""
    import convnet.data as data_mod
    import convnet.ops.softmax as softmax_mod
    from convnet.layers import SoftmaxCost

    check = softmax_mod._check_inputs
    monkeypatch.setattr(softmax_mod, "_check_inputs",  # as on cuda: shapes and dtypes checked, values not
                        lambda dev, name, logits, labels, stream: check(dev, name, logits, np.zeros_like(labels),
                                                                        stream))
    batches = data_mod.Loader.epoch

    def corrupt(self, *args, **kwargs):
        for i, (x, y) in enumerate(batches(self, *args, **kwargs)):
            if self.train and i == 2:
                y = y.copy()
                y[[1, 5]] = [7, -1]
            yield x, y

    monkeypatch.setattr(data_mod.Loader, "epoch", corrupt)
    seen = []
    take = SoftmaxCost.take_bad_labels
    monkeypatch.setattr(SoftmaxCost, "take_bad_labels", lambda self: seen.append(take(self)) or seen[-1])
    with pytest.raises(DataError, match=r"2 training label\(s\) in the last 1 batches are outside \[0, 4\)"):
        run(_args(tiny, tmp_path / "run", "--device", "emu"))
    assert seen[:2] == [0, 0] and seen[2] == 2  # read at every fold (every step on emu), reset after reading


def test_test_every_n_epochs_and_always_the_last(tiny, tmp_path, capsys):
    """--test-every 2 over 3 epochs: epochs 2 and 3 (the last) are evaluated, epoch 1 is not; the log says so, the
    plots draw the tested epochs only, and the plateau schedule (which needs every epoch's test error) refuses it."""
    logs = []
    res = run(_args(tiny, tmp_path / "run", "--device", "cpu", "--test-every", "2"), log=logs.append)
    h = res["history"]
    assert [r["test_error"] is not None for r in h] == [False, True, True]
    assert h[-1]["test_error"] < 0.25 and h[0]["test_loss"] is None
    assert any(s.startswith("epoch 1:") and "not tested (every 2 epochs)" in s for s in logs), logs
    assert (tmp_path / "run" / "errors.png").stat().st_size > 1000
    assert main(_args(tiny, tmp_path / "p", "--schedule", "plateau", "--test-every", "2")) == 2
    assert "--test-every must be 1" in capsys.readouterr().err


def _trained(res, out):
    """A run's per-epoch numbers and its checkpoint's arrays (not its metadata: times, paths, device names)."""
    hist = [(h["train_loss"], h["train_error"], h["test_loss"], h["test_error"]) for h in res["history"]]
    with np.load(out / "checkpoint.npz") as z:
        return hist, {k: z[k] for k in z.files if k != "meta"}


@pytest.mark.parametrize("model, devices, precision", [("TINY", ("emu", "cuda"), "fp32"),
                                                       ("TINY", ("emu", "cuda"), "tf32"),
                                                       ("TWO_TOWERS", ("emu:0,emu:1", "cuda:0,cuda:1"), "tf32"),
                                                       ("TWO_TOWERS", ("emu:0,emu:1", "cuda:0,cuda:1"), "bf16")],
                         ids=["one", "one-tf32", "towers-tf32", "towers-bf16"])
def test_training_on_a_fake_gpu_gives_emus_bits(tmp_path, monkeypatch, model, devices, precision):
    """The cuda device's whole training path on the CPU -- loader, uploads, trainer, evaluation, checkpoint, and with
    two towers the streams, events and peer copies: CuPy replaced by tests/fake_cupy.py (numpy memory, CuPy's
    rules: no host array mixed into device arithmetic, no implicit conversion to NumPy) and convnet._cuda by the
    emulator. The cuda branches then run the same kernels and array operations in the same order as emu, so the
    same bits: a cuda-only branch that computes something else, or that CuPy would reject, fails here. In tf32 the
    fake GPU's cuBLAS truncates its TF32 inputs (tests/fake_cupy.py): the same bits say the inputs were rounded. In
    bf16 the conversions to and from bfloat16 storage and the fc layers' rounding run as array operations of the fake
    GPU on both towers' streams."""
    from fake_cupy import FakeCupy
    from test_two_towers import TWO_TOWERS

    text = {"TINY": TINY, "TWO_TOWERS": TWO_TOWERS}[model]
    cfg = tmp_path / "model.cfg"
    cfg.write_text(text)
    args = ["--model", str(cfg), "--no-progress", "--no-plots", "--synthetic-train", "64", "--synthetic-test", "32",
            "--epochs", "2", "--precision", precision]
    emu, cuda = devices
    want = _trained(run([*args, "--out", str(tmp_path / "emu"), "--devices", emu], log=lambda s: None),
                    tmp_path / "emu")
    fake = FakeCupy(devices=2).install(monkeypatch, usable=True)
    fake.recording = True
    res = run([*args, "--out", str(tmp_path / "cuda"), "--devices", cuda], log=lambda s: None)
    assert res["history"][-1]["device"] == "cuda:0"
    got = _trained(res, tmp_path / "cuda")
    assert got[0] == want[0]
    assert got[1].keys() == want[1].keys()
    for k in want[1]:
        np.testing.assert_array_equal(got[1][k], want[1][k], err_msg=k)
    launches = {c[1] for c in fake.calls if c[0].startswith("launch")}
    assert launches == ({0, 1} if "," in cuda else {0}), launches  # the kernels ran through the cuda backend
