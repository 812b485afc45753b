"""tools/gpu_check.sh, run here without a GPU (on the fake CuPy where it must get past the GPU query), the cuda-test
accounting behind its --require-cuda gate, and the CONVNET_CUPY_POOL switch its sanitizer runs use."""
import json
import os
import signal
import subprocess
import sys
import types
from pathlib import Path

import pytest

import conftest
from helpers import ROOT, subprocess_env
from convnet.devices import backend_cuda, device_report

GPU_USABLE = any(e["usable"] for e in device_report() if e["device"].startswith("cuda"))
QUICK = ["preflight", "build", "device", "cuda_tests", "sanitize_memcheck", "sanitize_racecheck", "sanitize_synccheck",
         "sanitize_initcheck", "cuda_tests_async", "conv_bench", "memory_bound_bench", "ops_bench", "train_alexnet",
         "train_towers", "nccl_one_rank", "fmnist_epoch", "ncu_conv"]
FULL = [*QUICK[:9], "all_tests", *QUICK[9:], "train_fmnist_64", "train_fmnist_128", "conv_bench_one_tower"]


def _gpu_check(tmp_path, *args, fake_gpu=None, pip=None, **env):
    """Run the script; ``fake_gpu``: the compute capability of the fake CuPy's GPU 0 (None: no CuPy); ``pip``: a
    shell command the script's ``python -m pip`` runs instead (the build)."""
    path, python = [], sys.executable
    if fake_gpu:
        (tmp_path / "shim" / "cupy").mkdir(parents=True)
        (tmp_path / "shim" / "cupy" / "__init__.py").write_text(
            f"import sys\nsys.path.insert(0, {str(ROOT / 'tests')!r})\nfrom fake_cupy import FakeCupy\n"
            f"sys.modules['cupy'] = FakeCupy(devices=1, compute_capability={fake_gpu!r})\n")
        path.append(tmp_path / "shim")
    if pip:
        python = tmp_path / "python"
        python.write_text(f'#!/bin/bash\ncase " $* " in *" pip "*) {pip} ;; esac\nexec {sys.executable} "$@"\n')
        python.chmod(0o755)
    p = subprocess.Popen(["bash", str(ROOT / "tools" / "gpu_check.sh"), *args], cwd=ROOT, start_new_session=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env=subprocess_env(*path, LOGS=str(tmp_path / "logs"), OUT=str(tmp_path / "out"),
                                            PYTHON=str(python), CUDACXX="/bin/true", **env))
    try:
        out = p.communicate(timeout=120)[0]
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    summary = (tmp_path / "out" / "summary.md").read_text() if (tmp_path / "out" / "summary.md").exists() else ""
    rows = [line.split("|")[1:3] for line in summary.splitlines() if line.startswith("| ") and "| step" not in line]
    return p.returncode, out, summary, {name.strip(): status.strip() for name, status in rows}


@pytest.mark.parametrize("mode, budget, cc", [("quick", "", "90"), ("full", "", "100"), ("quick", "100", "80")])
def test_dry_run_takes_every_step_of_the_mode_within_the_budget(tmp_path, mode, budget, cc):
    """DRY_RUN=1 runs the GPU query (on the fake; CuPy writes sm_100 '100') and prints every other step's command:
    each step of the mode in order, those whose estimate exceeds BUDGET skipped (the sanitizers' 150 s with 100 s),
    then ALL OK in $OUT."""
    rc, out, summary, rows = _gpu_check(tmp_path, mode, fake_gpu=cc, DRY_RUN="1", BUDGET=budget)
    assert rc == 0 and list(rows) == (QUICK if mode == "quick" else FULL), out
    assert {name for name, status in rows.items() if status != "ok"} == \
        ({n for n in rows if n.startswith("sanitize")} if budget else set()), rows
    assert "ALL OK" in summary and rows["preflight"] == "ok" and f"GPU 0 sm_{cc}," in summary
    assert "DRY RUN:" in (tmp_path / "logs" / "build.log").read_text()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["gpu_check.tgz", "summary.md"]


@pytest.mark.skipif(GPU_USABLE, reason="a GPU is usable here")
def test_without_a_gpu_the_run_fails_at_once_saying_why(tmp_path):
    rc, out, summary, rows = _gpu_check(tmp_path)  # no CuPy here, or one that finds no GPU
    assert rc == 1 and out.strip().splitlines()[-1].startswith("gpu_check: FAIL: no usable GPU"), out
    assert rows == {"preflight": "FAIL"} and "FAILED" in summary


@pytest.mark.skipif(GPU_USABLE, reason="a GPU is usable here")
def test_a_gpu_convnet_cannot_use_stops_the_run_before_the_tests(tmp_path):
    """Past the query (the fake's GPU) and the build (skipped here), get_device("cuda") in the installed package is
    the gate: without a usable convnet._cuda the run stops there, saying why."""
    rc, out, _, rows = _gpu_check(tmp_path, fake_gpu="90", pip="exit 0")
    assert rc == 1 and list(rows) == ["preflight", "build", "device"] and rows["device"] == "FAIL", out
    assert out.strip().splitlines()[-1].startswith("gpu_check: FAIL: no usable GPU: get_device('cuda') failed"), out


def test_a_run_killed_mid_step_leaves_what_it_had_done_in_out(tmp_path):
    kill = f"{sys.executable} -c 'import os; os.killpg(os.getsid(0), 9)'; kill -9 0"  # the script's group, then the step's
    rc, out, summary, rows = _gpu_check(tmp_path, fake_gpu="90", pip=kill)  # killed during the build
    assert rc == -9 and rows == {"preflight": "ok"} and "INCOMPLETE" in summary, out
    assert (tmp_path / "out" / "gpu_check.tgz").is_file()


def test_an_unknown_mode_is_refused(tmp_path):
    rc, out, _, _ = _gpu_check(tmp_path, "tests")
    assert rc == 2 and "usage: bash tools/gpu_check.sh [quick|full]" in out


# ---------------------------------------------------------------------------------------------- --require-cuda
def test_require_cuda_fails_a_run_in_which_no_cuda_test_ran(tmp_path):
    report = tmp_path / "report.json"
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_softmax.py", "-m",
                        "cuda", "-k", "topk or huge_logits", "--require-cuda", "--cuda-report", str(report)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120, env=subprocess_env())
    counts = json.loads(report.read_text())
    assert counts["selected"] == 3
    if GPU_USABLE:
        assert r.returncode == 0 and counts["ran"] == 3, r.stdout
    else:  # pytest alone would exit 0
        assert r.returncode == 1 and counts["ran"] == 0 and counts["disallowed_skips"], r.stdout
        assert "--require-cuda FAILED: none of the 3 selected cuda tests ran" in r.stdout


def test_cuda_marker_is_set_from_the_device_parameter():
    r = subprocess.run([sys.executable, "-m", "pytest", "--co", "-q", "-p", "no:cacheprovider", "tests/test_pool.py",
                        "-m", "cuda"], cwd=ROOT, capture_output=True, text=True, timeout=120, env=subprocess_env())
    ids = [line for line in r.stdout.splitlines() if "::" in line]
    assert ids and all("[cuda" in i or "-cuda" in i for i in ids), r.stdout


def _report(nodeid, when, outcome, reason=""):
    return types.SimpleNamespace(nodeid=nodeid, when=when, skipped=outcome == "skipped", failed=outcome == "failed",
                                 passed=outcome == "passed",
                                 longrepr=("x.py", 1, f"Skipped: {reason}") if outcome == "skipped" else None)


def test_accounting_allows_only_the_listed_skip_reasons():
    acc = conftest.CudaAccounting()
    acc.selected = {"a", "b", "c"}
    for report in [_report("a", "setup", "passed"), _report("a", "call", "passed"), _report("c", "call", "failed"),
                   _report("b", "setup", "skipped", "only 1 GPU(s) present"), _report("zzz", "call", "passed")]:
        acc.logreport(report)
    c = acc.counts()
    assert (c["ran"], c["passed"], c["failed"], c["skipped"]) == (2, 1, 1, 1)
    assert acc.verdict() == []  # failures fail the run through pytest itself; the gate is about not running
    acc.logreport(_report("b", "setup", "skipped", "no usable GPU: the CUDA runtime says 0 devices"))
    assert acc.verdict() == ["1 cuda test(s) skipped: no usable GPU: the CUDA runtime says 0 devices"]
    assert conftest.CudaAccounting().verdict() == ["no cuda test was selected (is the test selection right?)"]


# ---------------------------------------------------------------------------------------------- CONVNET_CUPY_POOL
@pytest.mark.parametrize("value, enabled", [(None, True), ("", True), ("1", True), ("0", False), ("off", False)])
def test_cupy_pool_flag_is_read(value, enabled):
    assert backend_cuda.cupy_pool_enabled({} if value is None else {"CONVNET_CUPY_POOL": value}) is enabled
    with pytest.raises(ValueError, match="CONVNET_CUPY_POOL must be 0"):
        backend_cuda.cupy_pool_enabled({"CONVNET_CUPY_POOL": "maybe"})


def test_pool_off_sets_plain_allocators_at_the_first_cupy_import(monkeypatch):
    calls = []
    cp = types.SimpleNamespace(cuda=types.SimpleNamespace(set_allocator=lambda a: calls.append(("device", a)),
                                                          set_pinned_memory_allocator=lambda a: calls.append(("pinned", a))))
    monkeypatch.setitem(sys.modules, "cupy", cp)
    monkeypatch.setattr(backend_cuda, "_allocator_configured", False)
    monkeypatch.setenv("CONVNET_CUPY_POOL", "0")
    assert backend_cuda.cupy() is cp and backend_cuda.cupy() is cp
    assert calls == [("device", None), ("pinned", None)]  # once per process; None: a cudaMalloc per array


def test_pool_off_allocates_outside_cupys_pool(cuda_device):
    """On a real GPU: with CONVNET_CUPY_POOL=0 an array leaves CuPy's pool empty (memcheck then sees its bounds)."""
    code = ("from convnet.devices import get_device; d = get_device('cuda'); a = d.empty((1024,), 'float32'); "
            "assert d.xp.get_default_memory_pool().used_bytes() == 0")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, env=subprocess_env(CONVNET_CUPY_POOL="0"))
