"""The package a user runs is the built one: the checkout's root never shadows the installed package (src layout),
and a source tree without compiled modules is never used silently."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import convnet
from convnet.devices import get_device

ROOT = Path(__file__).resolve().parents[1]
SUMMARY_LINE = re.compile(r"convnet (\S+) from (\S+) \(compiled: ([^)]*)\); device (\S+)")


def _run(args, cwd, env=None):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env=env if env is not None else os.environ.copy())


def test_main_job_from_the_repository_root_uses_the_package_under_test():
    """`python -m convnet.train` run where a new user runs it (the checkout's root, after `pip install .`) imports the
    package these tests import (in CI: the installed one, with its compiled modules), and chooses the best device."""
    r = _run(["-m", "convnet.train", "--summary"], cwd=ROOT)
    assert r.returncode == 0, r.stderr
    m = SUMMARY_LINE.search(r.stdout)
    assert m, f"--summary does not say where convnet came from:\n{r.stdout}"
    version, where, compiled, device = m.groups()
    assert version == convnet.__version__
    assert Path(where).resolve() == Path(convnet.__file__).resolve().parent, "the subprocess imported another convnet"
    assert "_emu not built" not in compiled, compiled
    assert device == str(get_device(None))


def test_root_holds_no_importable_package():
    assert not (ROOT / "convnet").exists(), "a convnet/ folder at the root would shadow the installed package"


def test_unbuilt_source_tree_is_never_used_silently(tmp_path):
    """A copy of the sources without the compiled modules, put first on sys.path: the default device cannot be chosen
    silently (the main job stops with the reason and the fix); --summary and device_report() say what is missing."""
    pkg = Path(convnet.__file__).resolve().parent
    shutil.copytree(pkg, tmp_path / "convnet", ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__"))
    env = os.environ.copy()
    env["PYTHONPATH"] = str(tmp_path)
    r = _run(["-m", "convnet.train", "--summary"], cwd=tmp_path, env=env)
    assert "_emu not built" in r.stdout + r.stderr, r.stdout + r.stderr
    r = _run(["-m", "convnet.train", "--epochs", "1", "--dataset", "synthetic", "--out", str(tmp_path / "run")],
             cwd=tmp_path, env=env)
    assert r.returncode != 0
    assert "unbuilt source tree" in r.stderr and "pip install" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    r = _run(["-c", "import convnet; print(convnet.device_report())"], cwd=tmp_path, env=env)
    assert r.returncode == 0 and "'emu', 'usable': False" in r.stdout and "was not built" in r.stdout, r.stdout
