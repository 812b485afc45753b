"""The emulator under AddressSanitizer + UBSan, and its fallback paths, through a small C++ driver
(csrc/emu/tests/sanitizer_driver.cpp) built here with g++ directly (a sanitized Python extension would need
libasan preloaded into Python).

- correct kernels (all schedules) and every emulator error case run clean under ASan/UBSan;
- deliberately out-of-bounds kernels (shared row overrun, shared/dynamic-shared/global write past the end) are
  reported by ASan or UBSan;
- the ucontext fallback (used off x86-64) computes the same results;
- a fiber stack overflow dies with the emulator's message instead of corrupting memory;
- under ThreadSanitizer (fibers annotated, switches synchronize) correct kernels run clean with 2 workers and
  two blocks writing the same global element are reported.
"""
from __future__ import annotations

import os
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
SOURCES = ["-x", "c++", str(CSRC / "emu" / "selftest_kernels.cu"), "-x", "none", str(CSRC / "emu" / "cuemu.cpp"),
           str(CSRC / "emu" / "tests" / "sanitizer_driver.cpp")]
# -fstack-clash-protection: large frames probe every page, so an overflow always hits the guard page.
BASE_FLAGS = ["-std=c++20", "-g", "-Wno-unknown-pragmas", "-fstack-clash-protection", f"-I{CSRC}", "-pthread"]
# -O0: half the compile time of -O1, and the checks are the same.
SANITIZE = ["-O0", "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"]
CXX = os.environ.get("CXX", "g++")

pytestmark = pytest.mark.skipif(shutil.which(CXX) is None, reason=f"{CXX} not found")


def _can_link(tmp: pathlib.Path, flag: str) -> bool:
    src = tmp / "probe.cpp"
    src.write_text("int main() { return 0; }\n")
    r = subprocess.run([CXX, flag, str(src), "-o", str(tmp / "probe")], capture_output=True, text=True)
    return r.returncode == 0


@pytest.fixture(scope="module")
def drivers(tmp_path_factory):
    """Builds the drivers in parallel: {'asan'/'tsan': path or None, 'plain': path, 'ucontext': path}."""
    tmp = tmp_path_factory.mktemp("emu_drivers")
    builds = {
        "plain": ["-O0"],
        "ucontext": ["-O0", "-DCUEMU_USE_UCONTEXT"],
    }
    if _can_link(tmp, "-fsanitize=address,undefined"):
        builds["asan"] = SANITIZE
    if _can_link(tmp, "-fsanitize=thread"):
        builds["tsan"] = ["-O1", "-fsanitize=thread"]
    procs = {}
    for name, flags in builds.items():
        out = tmp / f"driver_{name}"
        procs[name] = (out, subprocess.Popen([CXX, *BASE_FLAGS, *flags, *SOURCES, "-o", str(out)],
                                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    result = {"asan": None, "tsan": None}
    for name, (out, proc) in procs.items():
        log, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"building the {name} driver failed:\n{log}"
        result[name] = out
    return result


def run(driver: pathlib.Path, case: str, **env):
    environ = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:abort_on_error=0", UBSAN_OPTIONS="print_stacktrace=1",
                   CONVNET_EMU_THREADS="2")
    environ.update(env)
    return subprocess.run([str(driver), case], capture_output=True, text=True, timeout=120, env=environ)


@pytest.fixture
def asan_driver(drivers):
    if drivers["asan"] is None:
        pytest.skip(f"{CXX} cannot link -fsanitize=address,undefined (libasan/libubsan missing)")
    return drivers["asan"]


@pytest.mark.parametrize("case", ["clean", "clean_errors"])
def test_correct_kernels_and_error_paths_run_clean_under_asan_ubsan(asan_driver, case):
    r = run(asan_driver, case)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip() == "", r.stderr  # not even "ASan is ignoring ..." stack-switch warnings


@pytest.mark.parametrize("case, expected", [
    ("oob_shared_row", "runtime error: index 8 out of bounds for type 'float [8]'"),
    ("oob_shared_past_end", "AddressSanitizer: heap-buffer-overflow"),
    ("oob_global", "AddressSanitizer: heap-buffer-overflow"),
    ("oob_dynamic_shared", "AddressSanitizer: heap-buffer-overflow"),
])
def test_out_of_bounds_kernels_are_reported(asan_driver, case, expected):
    r = run(asan_driver, case)
    assert r.returncode != 0
    assert expected in r.stderr, r.stderr
    assert "sanitizer_driver.cpp" in r.stderr  # the report points into the kernel source


@pytest.mark.parametrize("variant", ["plain", "ucontext"])
@pytest.mark.parametrize("case", ["clean", "clean_errors"])
def test_context_switch_variants(drivers, variant, case):
    r = run(drivers[variant], case)
    assert r.returncode == 0, r.stderr


def test_stack_overflow_dies_with_a_message(drivers):
    r = run(drivers["plain"], "stack_overflow")
    assert r.returncode != 0
    assert "cuemu: stack overflow in emulated CUDA thread (0,0,0) of block (0,0,0)" in r.stderr, r.stderr


@pytest.fixture
def tsan_driver(drivers):
    if drivers["tsan"] is None:
        pytest.skip(f"{CXX} cannot link -fsanitize=thread (libtsan missing)")
    return drivers["tsan"]


@pytest.mark.parametrize("case", ["clean", "clean_errors"])
def test_correct_kernels_run_clean_under_tsan(tsan_driver, case):
    r = run(tsan_driver, case, DRIVER_ONE_SCHEDULE="1")
    if "ThreadSanitizer: unexpected memory mapping" in r.stderr:
        pytest.skip("this kernel's address-space layout is not supported by TSan")
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip() == "", r.stderr


def test_interblock_race_is_reported_by_tsan(tsan_driver):
    r = run(tsan_driver, "race_interblock")
    if "ThreadSanitizer: unexpected memory mapping" in r.stderr:
        pytest.skip("this kernel's address-space layout is not supported by TSan")
    assert r.returncode != 0
    assert "ThreadSanitizer: data race" in r.stderr, r.stderr
    assert "interblock_race_kernel" in r.stderr
