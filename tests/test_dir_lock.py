"""One writer per directory: a training run holds an OS lock on its --out for its whole life, and `prepare` on its
DST; a second process is refused at once (one line naming the holder's PID, exit status 2), and a holder killed
with SIGKILL leaves no lock behind. The two processes of each test really run at the same time."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from convnet import checkpoint as ckpt
from convnet.dirlock import LOCK_NAME, DirectoryLocked, DirLock

sys.path.insert(0, str(Path(__file__).parent))
from helpers import subprocess_env  # noqa: E402
from imagefolder_fixture import make_tree  # noqa: E402
from models import MICRO  # noqa: E402

pytestmark = pytest.mark.skipif(os.name != "posix", reason="POSIX file locks")


def _train_argv(model, out, *extra):
    return [sys.executable, "-m", "convnet.train", "--model", str(model), "--out", str(out), "--no-progress",
            "--no-plots", "--device", "numpy", "--threads", "1", "--synthetic-train", "64", "--synthetic-test", "16",
            *extra]


def _wait_for_holder(proc, lock_file, timeout=60):
    """Wait until ``proc`` has written its PID into ``lock_file`` (it holds the lock)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            if lock_file.read_text().strip() == str(proc.pid):
                return
        except FileNotFoundError:
            pass
        time.sleep(0.02)
    raise AssertionError(f"{lock_file} never named process {proc.pid}")


def _refused(cmd, holder, cwd):
    r = subprocess.run(cmd, cwd=cwd, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert f"in use by process {holder.pid}" in lines[0], lines[0]
    assert holder.poll() is None  # the holder was running the whole time
    return lines[0]


def _kill(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)


@pytest.mark.parametrize("flags", [[], ["--overwrite"], ["--resume", "RUN"]], ids=["new", "overwrite", "resume"])
def test_a_second_run_into_a_running_out_is_refused(tmp_path, flags):
    """A run into an --out where another run is training (a new run, --overwrite or --resume of the same run) is
    refused while the first one runs, and leaves its files alone; after the first is killed (kill -9, the lock file
    left behind) a run starts there normally."""
    model = tmp_path / "micro.cfg"
    model.write_text(MICRO)
    out = tmp_path / "run"
    if "--resume" in flags:  # a run to continue: both processes resume it
        assert subprocess.run(_train_argv(model, out, "--epochs", "1"), env=subprocess_env(), cwd=tmp_path,
                              capture_output=True, timeout=120).returncode == 0
        flags = ["--resume", str(out)]
        first = [sys.executable, "-m", "convnet.train", "--resume", str(out), "--epochs", "100000", "--no-progress",
                 "--no-plots"]
    else:
        first = _train_argv(model, out, "--epochs", "100000")
    holder = subprocess.Popen(first, cwd=tmp_path, env=subprocess_env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
    try:
        _wait_for_holder(holder, out / LOCK_NAME)
        second = (_train_argv(model, out, "--epochs", "2", "--max-steps", "2", *flags) if "--resume" not in flags
                  else [sys.executable, "-m", "convnet.train", *flags, "--epochs", "100000", "--max-steps", "2",
                        "--no-progress", "--no-plots"])
        line = _refused(second, holder, tmp_path)
        assert f"--out {out}" in line
    finally:
        _kill(holder)
    assert (out / LOCK_NAME).read_text().strip() == str(holder.pid)  # kill -9: the file stays, the lock does not
    r = subprocess.run(_train_argv(model, out, "--epochs", "1", "--overwrite"), cwd=tmp_path, env=subprocess_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert ckpt.load(out)["meta"]["epoch"] == 1 and not (out / LOCK_NAME).exists()


def test_lock_is_released_on_exit_and_refuses_a_second_holder(tmp_path):
    d = tmp_path / "d"
    with DirLock(d) as lock:
        assert lock.locked and (d / LOCK_NAME).read_text() == f"{os.getpid()}\n"
        code = (f"from convnet.dirlock import DirLock, DirectoryLocked\ntry:\n DirLock({str(d)!r}).acquire()\n"
                f"except DirectoryLocked as e:\n print(e.pid)")
        r = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True,
                           timeout=60)
        assert r.stdout.strip() == str(os.getpid()), r.stderr
        with pytest.raises(DirectoryLocked, match=f"in use by process {os.getpid()}"):
            DirLock(d).acquire()  # another open file of this process: refused too
        (d / "kept").write_text("x")
    assert not (d / LOCK_NAME).exists() and (d / "kept").exists()
    with DirLock(tmp_path / "e"):  # created and left empty: removed again
        pass
    assert not (tmp_path / "e").exists()


_FORKS_AND_DIES = """
import os, sys, time
from convnet.dirlock import DirLock
DirLock(sys.argv[1]).acquire()
pid = os.fork()
if pid == 0:
    null = os.open(os.devnull, os.O_RDWR)
    for k in (0, 1, 2):  # let the caller's pipes close
        os.dup2(null, k)
    time.sleep(120)
    os._exit(0)
print(pid, flush=True)
os._exit(0)  # ends holding the lock, as under kill -9: nothing released, the lock file left
"""


def test_a_forked_child_does_not_keep_the_lock(tmp_path):
    """A process forked while the lock is held (a data worker) closes its copy: when the holder dies, the lock ends
    even though the child still runs."""
    d = tmp_path / "d"
    r = subprocess.run([sys.executable, "-c", _FORKS_AND_DIES, str(d)], env=subprocess_env(), capture_output=True,
                       text=True, timeout=60)
    child = int(r.stdout)
    try:
        os.kill(child, 0)  # still running
        assert (d / LOCK_NAME).is_file()
        with DirLock(d) as lock:
            assert lock.locked
    finally:
        os.kill(child, signal.SIGKILL)


# --- prepare ---------------------------------------------------------------------------------------------------
# a real `prepare` process that stops, holding DST's lock, until the file GO exists
_SLOW_PREPARE = """
import sys, time
from pathlib import Path
import convnet.data.prepare as p
scan, go = p.scan_source, Path(sys.argv[1])
def slow_scan(*a, **k):
    while not go.exists():
        time.sleep(0.02)
    return scan(*a, **k)
p.scan_source = slow_scan
sys.exit(p.main(sys.argv[2:]))
"""


def test_concurrent_prepare_into_one_destination_is_refused(tmp_path):
    src = make_tree(tmp_path / "src")
    dst = tmp_path / "dst"
    args = ["imagenet", str(src), str(dst), "--size", "16", "--jobs", "1", "--no-progress"]
    go = tmp_path / "go"
    holder = subprocess.Popen([sys.executable, "-c", _SLOW_PREPARE, str(go), *args], cwd=tmp_path,
                              env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_holder(holder, dst / LOCK_NAME)
        line = _refused([sys.executable, "-m", "convnet.data.prepare", *args], holder, tmp_path)
        assert str(dst) in line
        go.touch()
        out, err = holder.communicate(timeout=120)
        assert holder.returncode == 0, err
    finally:
        _kill(holder)
    assert (dst / "manifest.json").is_file() and not (dst / LOCK_NAME).exists()
    # a holder killed with SIGKILL leaves the file, not the lock: the next run goes on
    go.unlink()
    (dst / "manifest.json").unlink()
    holder = subprocess.Popen([sys.executable, "-c", _SLOW_PREPARE, str(go), *args], cwd=tmp_path,
                              env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_holder(holder, dst / LOCK_NAME)
    finally:
        _kill(holder)
    r = subprocess.run([sys.executable, "-m", "convnet.data.prepare", *args], cwd=tmp_path, env=subprocess_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and (dst / "manifest.json").is_file(), r.stderr
