"""The command line's user errors: each is one line on stderr and a non-zero exit status (2 for a
user error, 1 for a diverged run), never a traceback; ``--debug`` shows the traceback. Most cases run the command
in-process (``convnet.train.main(argv)``); a few run ``python -m convnet.train`` as a real subprocess."""
import os
import subprocess
import sys

import numpy as np
import pytest

from convnet import checkpoint as ckpt
from convnet.config import ConfigError
from convnet.train import main
from helpers import subprocess_env
from models import MICRO


@pytest.fixture
def micro(tmp_path):
    p = tmp_path / "micro.cfg"
    p.write_text(MICRO)
    return p


def _argv(model, out, *extra):
    return ["--model", str(model), "--out", str(out), "--no-progress", "--no-plots", "--device", "numpy",
            "--synthetic-train", "64", "--synthetic-test", "16", *extra]


def _fails(capsys, argv, rc, *needles):
    """main(argv) returns ``rc`` with exactly one line on stderr, containing each of ``needles``."""
    got = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert got == rc, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


BAD_FLAGS = [
    (["--batch-size", "0"], "--batch-size: must be >= 1, got 0"),
    (["--epochs", "0"], "--epochs: must be >= 1"),
    (["--seed", "-1"], "--seed: must be >= 0"),
    (["--lr-steps", "a,b"], "--lr-steps: must be comma-separated epoch numbers"),
    (["--lr", "-0.05"], "--lr: must be > 0, got -0.05"),
    (["--lr", "nan"], "--lr: must be a finite number"),
    (["--lr", "inf"], "--lr: must be a finite number"),
    (["--momentum", "1.5"], "--momentum: must be >= 0 and < 1"),
    (["--weight-decay", "-1"], "--weight-decay: must be >= 0"),
    (["--lr-gamma", "0"], "--lr-gamma: must be > 0"),
    (["--crop-pad", "-1"], "--crop-pad: must be >= 0"),
    (["--threads", "-2"], "--threads: must be >= 0"),
    (["--prefetch", "-1"], "--prefetch: must be >= 0"),
    (["--patience", "0"], "--patience: must be >= 1"),
    (["--max-drops", "-1"], "--max-drops: must be >= 0"),
    (["--synthetic-test", "0"], "--synthetic-test: must be >= 1"),
    (["--epochs", "2.5"], "--epochs: expected an integer, got '2.5'"),
    (["--epochs", str(2**31)], "--epochs: must be >= 1 and <= 2147483647"),
    (["--schedule", "bogus"], "invalid choice: 'bogus'"),
    (["--bogus-flag"], "unrecognized arguments: --bogus-flag"),
    (["--lr"], "--lr: expected one argument"),
]


@pytest.mark.parametrize("extra,needle", BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_bad_flag_values_are_one_line_errors(micro, tmp_path, capsys, extra, needle):
    _fails(capsys, _argv(micro, tmp_path / "o", *extra), 2, needle)
    assert not (tmp_path / "o").exists()  # nothing was started


def test_user_errors_of_the_environment(micro, tmp_path, capsys):
    out = tmp_path / "o"
    _fails(capsys, _argv(micro, out, "--device", "bogus"), 2, "--device", "unknown device 'bogus'")
    _fails(capsys, _argv(micro, out, "--device", "cuda:x"), 2, "--device")
    afile = tmp_path / "afile"
    afile.write_text("x")
    _fails(capsys, _argv(micro, afile), 2, f"--out {afile} exists and is not a directory")
    _fails(capsys, _argv(micro, afile / "sub"), 2, "is not a directory")
    _fails(capsys, _argv(tmp_path / "missing.cfg", out), 2, "not found")
    _fails(capsys, _argv(tmp_path, out), 2, "is not a file")  # a directory given as the model file
    latin = tmp_path / "latin.cfg"
    latin.write_bytes(MICRO.replace("[fc]", "[fc]  # caf\xe9").encode("latin-1"))
    _fails(capsys, _argv(latin, out), 2, "is not UTF-8 text", "latin.cfg")
    _fails(capsys, _argv(micro, out, "--dataset", "mnist"), 2, "unknown dataset 'mnist'")
    _fails(capsys, _argv(micro, out, "--dataset", "imagenet"), 2, "python -m convnet.data.prepare imagenet")
    _fails(capsys, _argv(micro, out, "--lighting", "0.1"), 2, "--lighting needs a prepared dataset")
    _fails(capsys, _argv(micro, out, "--synthetic-train", "8"), 2, "smaller than one batch")
    _fails(capsys, ["--resume", str(tmp_path / "none")], 2, "not found")
    _fails(capsys, ["--data", str(tmp_path / "nodata"), "--out", str(out), "--device", "numpy"], 2,
           "Fashion-MNIST not found", "apt-get install dataset-fashion-mnist")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root may write anywhere")
def test_unwritable_out(micro, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        _fails(capsys, _argv(micro, ro / "run"), 2, "not writable")
        _fails(capsys, _argv(micro, ro), 2, "not writable")
    finally:
        ro.chmod(0o700)


def test_unwritable_out_even_for_root(micro, tmp_path, capsys, monkeypatch):
    """A directory that cannot be created (whoever runs the test): one line, not an OSError traceback."""
    from pathlib import Path as P
    real = P.mkdir

    def mkdir(self, *a, **k):
        if self.name == "run":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *a, **k)

    monkeypatch.setattr(P, "mkdir", mkdir)
    _fails(capsys, _argv(micro, tmp_path / "run"), 2, "cannot write to --out", "Permission denied")


def test_an_over_long_out_is_a_user_error(micro, tmp_path, capsys):
    _fails(capsys, _argv(micro, tmp_path / ("x" * 300)), 2, "--out", "File name too long")
    _fails(capsys, _argv(micro, tmp_path / ("x" * 300) / "run"), 2, "--out", "File name too long")


def test_crop_pad_must_leave_image_pixels_in_every_crop(micro, tmp_path, capsys):
    """The 8x8 input: a pad of 8 lets a crop hold only padding (an error); 7 trains."""
    _fails(capsys, _argv(micro, tmp_path / "o", "--crop-pad", "8"), 2,
           "--crop-pad 8 is not smaller than the model's 8x8 input", "at most 7")
    assert main(_argv(micro, tmp_path / "o", "--crop-pad", "7")) == 0


def test_ten_views_that_coincide_are_a_warning(micro, tmp_path, capsys):
    """Images of the input's size: the ten views are the image and its mirror, five times each."""
    assert main(_argv(micro, tmp_path / "o", "--eval-crops", "10")) == 0
    out = capsys.readouterr().out
    assert "warning: --eval-crops 10: the 8x8 images give only 2 different views of the model's 8x8 input" in out
    assert "--eval-crops 2 gives the same result" in out
    assert main(_argv(micro, tmp_path / "o2", "--eval-crops", "2")) == 0
    assert "warning" not in capsys.readouterr().out
    ten, two = (ckpt.load(tmp_path / d)["meta"]["history"][-1] for d in ("o", "o2"))
    assert ten["test_error"] == two["test_error"] and ten["test_loss"] == pytest.approx(two["test_loss"], rel=1e-6)


BAD_MODEL_VALUES = [
    ("scale = 0.0039", "scale = nan", "scale must be a finite number"),
    ("outputs = 4", "outputs = 4\ninitW = nan", "initW must be a finite number"),
    ("outputs = 4", "outputs = 4\nlrW = inf", "lrW must be a finite number"),
    ("outputs = 4", "outputs = 4\nlrW = -1", "lrW must be >= 0"),
    ("inputs = fc", "inputs = fc\ncoeff = nan", "coeff must be a finite number"),
    ("outputs = 4", f"outputs = {2**40}", "outputs must be < 2**31"),
    ("lr = 0.1", "lr = -0.05", "[train] lr: must be > 0, got -0.05"),
    ("lr = 0.1", "lr = nan", "[train] lr: must be a finite number"),
    ("epochs = 1", "epochs = 0", "[train] epochs: must be >= 1"),
    ("lr = 0.1", "lr = 0.1\nschedule = bogus", "[train] schedule: must be one of"),
    ("lr = 0.1", "lr = 0.1\nlr_steps = x", "[train] lr_steps: must be comma-separated"),
    ("lr = 0.1", "lr = 0.1\nmomentum = 2", "[train] momentum: must be >= 0 and < 1"),
    ("outputs = 4", "outputs = 4\ndevice = banana", "[fc] device: unknown device 'banana'"),
]


@pytest.mark.parametrize("old,new,needle", BAD_MODEL_VALUES, ids=[n for _, n, _ in BAD_MODEL_VALUES])
def test_bad_model_file_values_are_one_line_errors(tmp_path, capsys, old, new, needle):
    """Items 3 and 7: numeric model-file keys are finite and in range where they are read."""
    p = tmp_path / "m.cfg"
    assert old in MICRO
    p.write_text(MICRO.replace(old, new, 1))
    _fails(capsys, _argv(p, tmp_path / "o"), 2, "m.cfg", needle)


def test_an_existing_run_is_never_replaced_silently(micro, tmp_path, capsys):
    """A second run into the same --out is refused (saying --resume / --overwrite); --overwrite replaces it."""
    out = tmp_path / "run"
    assert main(_argv(micro, out)) == 0
    first = ckpt.load(out)
    capsys.readouterr()
    _fails(capsys, _argv(micro, out), 2, f"{out} already holds a run", f"--resume {out}", "--overwrite")
    _fails(capsys, _argv(micro, out, "--seed", "3"), 2, "already holds a run")
    assert np.array_equal(ckpt.load(out)["params"]["fc/w"], first["params"]["fc/w"])  # untouched
    # resuming from another run into this one would replace it too
    other = tmp_path / "other"
    assert main(_argv(micro, other, "--seed", "1")) == 0
    _fails(capsys, ["--resume", str(other), "--out", str(out), "--epochs", "2"], 2, "already holds a run")
    # --resume continues it; --overwrite replaces it (the old log does not survive)
    assert main(["--resume", str(out), "--epochs", "2", "--no-progress"]) == 0
    assert [r["epoch"] for r in ckpt.load(out)["meta"]["history"]] == [1, 2]
    assert main(_argv(micro, out, "--overwrite", "--seed", "4")) == 0
    assert len((out / "log.jsonl").read_text().splitlines()) == 1
    assert ckpt.load(out)["meta"]["config"]["seed"] == 4
    # a directory without a run (or with only the plots, a model file) may be used
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("mine")
    assert main(_argv(micro, tmp_path / "empty")) == 0
    assert (tmp_path / "empty" / "notes.txt").read_text() == "mine"


def test_corrupt_checkpoint_is_a_one_line_error(micro, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_argv(micro, out)) == 0
    data = (out / "checkpoint.npz").read_bytes()
    bad = tmp_path / "bad.npz"
    bad.write_bytes(data[: len(data) // 2])
    _fails(capsys, ["--resume", str(bad), "--out", str(tmp_path / "o2")], 2, "cannot read checkpoint", "bad.npz")
    _fails(capsys, ["--eval-only", "--resume", str(bad)], 2, "cannot read checkpoint")


def test_debug_shows_the_traceback(micro, tmp_path):
    with pytest.raises(ConfigError, match="unknown device"):
        main(_argv(micro, tmp_path / "o", "--device", "bogus", "--debug"))


def test_divergence_is_one_line_and_status_1(micro, tmp_path, capsys):
    with np.errstate(all="ignore"):
        _fails(capsys, _argv(micro, tmp_path / "o", "--lr", "1e30", "--epochs", "2"), 1, "training diverged",
               "--lr")


# ------------------------------------------------------------------------------------------------ subprocesses
def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "convnet.train", *args], cwd=cwd, env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)


def test_subprocess_user_errors_are_one_line(micro, tmp_path):
    for args, needle in ((["--batch-size", "0"], "--batch-size: must be >= 1"),
                         (["--model", str(micro), "--device", "bogus", "--out", str(tmp_path / "o")],
                          "unknown device 'bogus'")):
        r = _cli(*args, cwd=tmp_path)
        assert r.returncode == 2, r.stderr
        assert r.stderr.strip().splitlines() == [r.stderr.strip()] and needle in r.stderr, r.stderr
        assert "Traceback" not in r.stderr


def test_subprocess_default_run_refuses_to_replace_runs_fmnist(tmp_path):
    """`python -m convnet.train` twice: the second start (default --out runs/fmnist) is refused before any data is
    loaded, and says how to continue or replace the first run."""
    (tmp_path / "runs" / "fmnist").mkdir(parents=True)
    (tmp_path / "runs" / "fmnist" / "log.jsonl").write_text('{"epoch": 1}\n')
    r = _cli(cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    line = r.stderr.strip()
    assert "\n" not in line and "runs/fmnist already holds a run" in line, line
    assert "--resume runs/fmnist" in line and "--overwrite" in line
    assert (tmp_path / "runs" / "fmnist" / "log.jsonl").read_text() == '{"epoch": 1}\n'


def test_subprocess_help_exits_0(tmp_path):
    r = _cli("--help", cwd=tmp_path)
    assert r.returncode == 0 and "--overwrite" in r.stdout and "--debug" in r.stdout


def test_an_error_line_is_written_in_one_piece(micro, tmp_path, monkeypatch):
    """Each rank of a data-parallel job writes to its own pipe and mpirun merges them: an error line written in
    pieces (the text, then its newline) can come out interleaved with another rank's."""
    writes = []

    class Recorder:
        def write(self, s):
            writes.append(s)
            return len(s)

        def flush(self):
            pass

    monkeypatch.setattr(sys, "stderr", Recorder())
    assert main(["--model", str(micro), "--out", str(tmp_path / "r"), "--lr", "-1"]) == 2
    errors = [w for w in writes if "error" in w]
    assert len(errors) == 1 and errors[0].startswith("error: ") and errors[0].endswith("\n"), writes
