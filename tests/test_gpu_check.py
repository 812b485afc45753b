"""tools/gpu_check.sh cannot pass without a GPU, the cuda-test accounting behind its --require-cuda gate, and the
CONVNET_CUPY_POOL switch the sanitizer runs use. All CPU-side and fast (no build)."""
import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

import conftest
from helpers import subprocess_env
from convnet.devices import backend_cuda

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "gpu_check.sh"


def _gpu_usable():
    from convnet.devices import device_report

    return any(e["usable"] for e in device_report() if e["device"].startswith("cuda"))


def _run_script(tmp_path, *args, pythonpath=(), timeout=60, **env_vars):
    env = subprocess_env(*pythonpath, LOGS=str(tmp_path / "logs"), OUT=str(tmp_path / "out"), PYTHON=sys.executable,
                         **env_vars)
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


# ---------------------------------------------------------------------------------------------- the script
@pytest.mark.skipif(_gpu_usable(), reason="a GPU is usable here: the script's no-GPU failure cannot be shown")
def test_preflight_fails_loudly_without_a_gpu(tmp_path):
    r = _run_script(tmp_path, "preflight")
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    last = out.strip().splitlines()[-1]
    assert last.startswith("gpu_check: FAIL: no usable GPU"), out
    assert "| preflight" in out and "FAIL" in out  # the summary table says which stage
    assert (tmp_path / "out" / "summary.md").is_file() and (tmp_path / "out" / "gpu_check.tgz").is_file()
    assert len(list((tmp_path / "out").iterdir())) <= 8


def _fake_cupy(tmp_path, cc="90"):
    """A stand-in CuPy whose runtime reports one GPU of compute capability ``cc`` (CuPy's string: '90', '100'): gets
    the script past preflight on a machine without one."""
    pkg = tmp_path / "fake" / "cupy"
    (pkg / "cuda").mkdir(parents=True)
    (pkg / "__init__.py").write_text("__version__ = 'fake'\nfrom . import cuda\n")
    (pkg / "cuda" / "__init__.py").write_text(
        "class runtime:\n"
        "    getDeviceCount = staticmethod(lambda: 1)\n"
        "    driverGetVersion = staticmethod(lambda: 13000)\n"
        "    runtimeGetVersion = staticmethod(lambda: 13000)\n"
        "class Device:\n"
        "    def __init__(self, i=0):\n"
        f"        self.compute_capability = {cc!r}\n")
    return tmp_path / "fake"


@pytest.mark.skipif(_gpu_usable(), reason="a GPU is usable here")
def test_a_gpu_that_convnet_cannot_use_stops_the_run_before_the_tests(tmp_path):
    """Past preflight (a CuPy that claims a GPU), the next gate is get_device("cuda") in the package: without a
    usable convnet._cuda the run stops there, before any test or benchmark, and says why."""
    r = _run_script(tmp_path, "test", pythonpath=[_fake_cupy(tmp_path)])
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    assert "| preflight" in out and "sm_90" in out
    assert out.strip().splitlines()[-1].startswith("gpu_check: FAIL: no usable GPU: get_device('cuda') failed"), out
    assert "cuda tests" not in out


def test_preflight_reads_three_digit_compute_capabilities(tmp_path):
    """CuPy spells sm_100 '100': the preflight must read major 10, minor 0 (not fail unpacking three digits)."""
    r = _run_script(tmp_path, "preflight", pythonpath=[_fake_cupy(tmp_path, cc="100")])
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "| preflight" in out and "sm_100" in out and "ALL OK" in out


def test_out_holds_the_steps_done_when_the_run_is_killed(tmp_path):
    """The device tool kills a command at its time limit: $OUT must already hold the summary of the steps done so
    far (marked INCOMPLETE), not nothing. Here a stand-in convnet kills the script's process group as the device
    check imports it, right after preflight."""
    fake = _fake_cupy(tmp_path)
    (fake / "convnet").mkdir()
    (fake / "convnet" / "__init__.py").write_text("import os, signal\nos.killpg(os.getpgid(0), signal.SIGKILL)\n")
    env = subprocess_env(fake, LOGS=str(tmp_path / "logs"), OUT=str(tmp_path / "out"), PYTHON=sys.executable)
    p = subprocess.Popen(["bash", str(SCRIPT), "test"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, 9)
    assert p.returncode == -9, out
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| preflight" in summary and "sm_90" in summary and "INCOMPLETE" in summary, summary
    assert (tmp_path / "out" / "gpu_check.tgz").is_file()


def test_step_limits_are_cut_to_the_hard_limit():
    """quick mode's steps and parallel jobs get at most what is left of QUICK_HARD_LIMIT (the device tool's 600 s
    per command), checked on the script's own helper."""
    helper = SCRIPT.read_text().split("capped() {", 1)[1].split("\n}\n", 1)[0]
    r = subprocess.run(["bash", "-c", "capped() {" + helper + "\n}\nSTART=$SECONDS; HARD_LIMIT=100; capped 900; "
                        "capped 30; HARD_LIMIT=; capped 900"], capture_output=True, text=True, timeout=30)
    assert r.stdout.split() == ["100", "30", "900"], r.stdout + r.stderr
    text = SCRIPT.read_text()
    assert text.count('limit=$(capped "$3")') == 2  # step and start_job


@pytest.mark.skipif(_gpu_usable(), reason="a GPU is usable here")
def test_extra_stage_needs_a_gpu(tmp_path):
    """`extra` (the NCCL run, one epoch, fmnist and one-tower benchmarks) is a stage of its own that, like every stage
    that runs on the GPU, stops at preflight when there is none."""
    r = _run_script(tmp_path, "extra")
    out = r.stdout + r.stderr
    assert r.returncode != 0 and out.strip().splitlines()[-1].startswith("gpu_check: FAIL: no usable GPU"), out


def test_extra_stage_finds_mpi_and_data_in_the_carry(tmp_path):
    """The extra stage's helpers, on their own: without carried wheels the image's MPI is kept (nothing installed);
    Fashion-MNIST is found through FMNIST_DIR first, else in .gpu_carry."""
    body = SCRIPT.read_text().split("\nCARRY=$ROOT/.gpu_carry", 1)[1].split("\nexport -f", 1)[0]
    data = tmp_path / "fm"
    data.mkdir()
    (data / "train-images-idx3-ubyte.gz").write_bytes(b"")
    script = (f"PY={sys.executable}; CARRY={tmp_path}/none\n{body}\ncarried_mpi; echo rc=$?; "
              f"FMNIST_DIR={data} fmnist_dir; FMNIST_DIR= CARRY={tmp_path} fmnist_dir || echo none")
    r = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30)
    lines = r.stdout.split("\n")
    assert lines[0].startswith("no carried wheels") and lines[1] == "rc=0", r.stdout + r.stderr
    assert lines[2] == str(data), r.stdout
    # with FMNIST_DIR empty, the Debian folder (if this machine has it) wins over the carry; else the carry is used
    debian = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").is_file()
    assert lines[3] == ("/usr/share/datasets/fashion-mnist" if debian else "none"), r.stdout


QUICK_STEPS = ["preflight", "build (nvcc 90-real)", "device", "cuda tests, CUDA_LAUNCH_BLOCKING=1",
               "CONVNET_CUPY_POOL=0 takes effect", "cuda tests, asynchronous", "compute-sanitizer memcheck",
               "compute-sanitizer racecheck", "compute-sanitizer synccheck", "compute-sanitizer initcheck",
               "conv_bench (batch 128)", "memory_bound_bench", "ops_bench (elementwise,softmax,fc)",
               "train_bench (alexnet, batch 128)", "train_bench --towers (batch 128)", "scaling_bench (NCCL, 1 rank)",
               "train fmnist, 1 epoch", "train_bench (fmnist, batch 64)", "train_bench (fmnist, batch 128)",
               "conv_bench (one-tower)", "ncu: conv kernels, batch 128"]


def _summary_rows(tmp_path):
    rows = [line.split("|") for line in (tmp_path / "out" / "summary.md").read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| step")]
    return [(r[1].strip(), r[2].strip()) for r in rows]


@pytest.mark.skipif(shutil.which("nvcc") is None and not Path("/usr/local/cuda/bin/nvcc").exists(), reason="no nvcc")
@pytest.mark.parametrize("budget", ["100000", "0"])
def test_quick_mode_dry_run_walks_every_stage(tmp_path, budget):
    """GPU_CHECK_DRY_RUN=1 (no command runs; a stand-in CuPy passes preflight): quick mode takes every step in
    order, the benchmarks and the extra stage within its budget (all of them, or none with a budget of 0 s), writes
    the summary and at most 8 files to $OUT, and exits 0. A shell error in any stage (set -u, a typo in a stage only
    a GPU reaches) fails here instead of on the GPU."""
    data = tmp_path / "fm"
    data.mkdir()
    (data / "train-images-idx3-ubyte.gz").write_bytes(b"")
    r = _run_script(tmp_path, "quick", pythonpath=[_fake_cupy(tmp_path)], GPU_CHECK_DRY_RUN="1",
                    QUICK_BUDGET=budget, FMNIST_DIR=str(data))
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    rows = _summary_rows(tmp_path)
    assert [name for name, _ in rows] == QUICK_STEPS, rows
    first_bench = QUICK_STEPS.index("conv_bench (batch 128)")
    assert all(status == "ok" for _, status in rows[:first_bench]), rows
    assert {status for _, status in rows[first_bench:]} == ({"ok"} if budget != "0" else {"skipped"}), rows
    assert "ALL OK" in (tmp_path / "out" / "summary.md").read_text()
    assert len(list((tmp_path / "out").iterdir())) <= 8
    logs = tmp_path / "logs"
    assert "DRY RUN: ncu_conv" in (logs / "ncu_conv.log").read_text() if budget != "0" else True
    assert "--no-build-isolation" in (logs / "build.log").read_text()


def test_unknown_stage_is_rejected(tmp_path):
    r = _run_script(tmp_path, "tests")
    assert r.returncode == 2 and "unknown stage 'tests'" in r.stderr


def test_script_documents_each_stage_estimate():
    header = SCRIPT.read_text().split("set -uo pipefail")[0]
    for stage in ("preflight", "build", "test pass 1", "sanitize", "bench", "total", "extra"):
        assert stage in header
    assert "90-real" in header and "--threads 0" in header


# ---------------------------------------------------------------------------------------------- --require-cuda
def _pytest(tmp_path, *args):
    report = tmp_path / "report.json"
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args, "--require-cuda",
                        "--cuda-report", str(report)], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env=subprocess_env())
    return r, json.loads(report.read_text())


def test_require_cuda_gate(tmp_path):
    """Without a GPU every cuda test is skipped for a reason outside the allow-list: --require-cuda fails the run
    (pytest alone would exit 0) and names the reason; with a GPU the same selection runs and passes."""
    r, report = _pytest(tmp_path, "tests/test_softmax.py", "-m", "cuda", "-k", "topk or huge_logits")
    assert report["selected"] == 3
    if _gpu_usable():
        assert r.returncode == 0 and report["ran"] == 3, r.stdout
    else:
        assert r.returncode == 1, r.stdout
        assert report["ran"] == 0 and report["skipped"] == 3 and report["disallowed_skips"]
        assert "--require-cuda FAILED: none of the 3 selected cuda tests ran" in r.stdout


def test_cuda_marker_is_set_from_the_device_parameter(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pytest", "--co", "-q", "-p", "no:cacheprovider", "tests/test_pool.py",
                        "-m", "cuda"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env=subprocess_env())
    ids = [line for line in r.stdout.splitlines() if "::" in line]
    assert ids and all("[cuda" in i or "-cuda" in i for i in ids), r.stdout


def _report(nodeid, when, outcome, reason=""):
    longrepr = ("x.py", 1, f"Skipped: {reason}") if outcome == "skipped" else None
    return types.SimpleNamespace(nodeid=nodeid, when=when, skipped=outcome == "skipped",
                                 failed=outcome == "failed", passed=outcome == "passed", longrepr=longrepr)


def test_accounting_allow_list():
    acc = conftest.CudaAccounting()
    acc.selected = {"a", "b", "c"}
    acc.logreport(_report("a", "setup", "passed"))
    acc.logreport(_report("a", "call", "passed"))
    acc.logreport(_report("b", "setup", "skipped", "only 1 GPU(s) present"))  # allowed: needs a second GPU
    acc.logreport(_report("c", "call", "failed"))
    acc.logreport(_report("zzz", "call", "passed"))  # not a cuda test: not counted
    c = acc.counts()
    assert (c["ran"], c["passed"], c["failed"], c["skipped"]) == (2, 1, 1, 1)
    assert acc.verdict() == []  # failures fail the run through pytest itself; the gate is about not running
    acc.logreport(_report("b", "setup", "skipped", "no usable GPU: the CUDA runtime says 0 devices"))
    assert acc.verdict() == ["1 cuda test(s) skipped: no usable GPU: the CUDA runtime says 0 devices"]
    empty = conftest.CudaAccounting()
    assert empty.verdict() == ["no cuda test was selected (is the test selection right?)"]


# ---------------------------------------------------------------------------------------------- CONVNET_CUPY_POOL
@pytest.mark.parametrize("value, enabled", [(None, True), ("", True), ("1", True), ("0", False), ("off", False)])
def test_cupy_pool_flag_is_read(value, enabled):
    env = {} if value is None else {"CONVNET_CUPY_POOL": value}
    assert backend_cuda.cupy_pool_enabled(env) is enabled


def test_cupy_pool_flag_rejects_nonsense():
    with pytest.raises(ValueError, match="CONVNET_CUPY_POOL must be 0"):
        backend_cuda.cupy_pool_enabled({"CONVNET_CUPY_POOL": "maybe"})


def _recording_cupy():
    calls = []
    cuda = types.SimpleNamespace(set_allocator=lambda a: calls.append(("device", a)),
                                 set_pinned_memory_allocator=lambda a: calls.append(("pinned", a)))
    return types.SimpleNamespace(cuda=cuda), calls


def test_pool_off_sets_plain_allocators():
    cp, calls = _recording_cupy()
    assert backend_cuda.configure_allocator(cp, {"CONVNET_CUPY_POOL": "0"}) is False
    assert calls == [("device", None), ("pinned", None)]  # None = no pool: a cudaMalloc per array
    cp, calls = _recording_cupy()
    assert backend_cuda.configure_allocator(cp, {}) is True and calls == []


def test_pool_flag_applied_at_first_cupy_use(monkeypatch):
    """The backend's first `import cupy` applies the flag, once per process."""
    cp, calls = _recording_cupy()
    monkeypatch.setitem(sys.modules, "cupy", cp)
    monkeypatch.setattr(backend_cuda, "_allocator_configured", False)
    monkeypatch.setenv("CONVNET_CUPY_POOL", "0")
    assert backend_cuda.cupy() is cp
    assert backend_cuda.cupy() is cp
    assert calls == [("device", None), ("pinned", None)]
