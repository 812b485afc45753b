"""The package a user runs is the built one: the checkout's root never shadows the installed package (src layout),
and a source tree without compiled modules is never used silently."""
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import convnet
from convnet.devices import get_device

ROOT = Path(__file__).resolve().parents[1]
SUMMARY_LINE = re.compile(r"convnet (\S+) from (\S+) \(compiled: ([^)]*)\); device ([^\s,]+)")


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


def _dynamic_symbols(path: Path) -> list[str]:
    """The names a shared object exports: its defined dynamic symbols (``nm -D --defined-only``), undecorated."""
    r = subprocess.run(["nm", "-D", "--defined-only", str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"nm failed on {path}: {r.stderr}"
    return [line.split()[-1] for line in r.stdout.splitlines() if line.strip()]


@pytest.mark.parametrize("module", ["_emu", "_cuda"])
def test_modules_export_only_pyinit(module):
    """convnet._emu and convnet._cuda compile the same sources: were their C++ symbols (convnet::conv_forward, the
    emulator's cudaMemcpy, ...) exported, one module's calls could bind to the other's functions (RTLD_GLOBAL loads,
    symbol interposition). Built with hidden visibility and a version script (CMakeLists.txt,
    csrc/bindings/exports.ver), each exports its Python entry point and nothing else. _cuda is checked where it was
    built (CI builds it with nvcc), without importing it (no GPU or driver needed)."""
    spec = importlib.util.find_spec(f"convnet.{module}")
    if spec is None or not spec.origin:
        if module == "_emu":
            pytest.fail("convnet._emu is not built")
        pytest.skip("convnet._cuda is not built (no nvcc): only _emu's symbols are checked")
    if shutil.which("nm") is None:
        pytest.skip("nm (binutils, installed with g++) is not on PATH: cannot read the dynamic symbol table")
    names = _dynamic_symbols(Path(spec.origin))
    assert f"PyInit_{module}" in names, f"{spec.origin} exports no PyInit_{module}: {names[:20]}"
    extra = sorted(n for n in names if n != f"PyInit_{module}")
    demangled = subprocess.run(["c++filt"], input="\n".join(extra), capture_output=True, text=True).stdout.split("\n") \
        if extra and shutil.which("c++filt") else extra
    convnet_syms = [d for d in demangled if "convnet" in d or "cuemu" in d]
    assert not convnet_syms, f"{module} exports convnet/emulator symbols: {convnet_syms[:20]}"
    assert not extra, f"{module} exports {len(extra)} symbols besides PyInit_{module}: {demangled[:20]}"
