"""Tests of the CPU emulation of the CUDA execution model (csrc/emu), through the self-test kernels in
csrc/emu/selftest_kernels.cu exposed as convnet._emu.selftest.

Correct kernels must give exact (bit-identical) results under every schedule and worker count; broken kernels
must raise convnet.EmulatorError naming the problem and the source line.
"""
from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import convnet
from convnet import emu as emu_ctl

import convnet._emu as _emu  # noqa: E402  (a missing emulator module is a failure, not a skip)
st = _emu.selftest
EmulatorError = _emu.EmulatorError

SOURCE = pathlib.Path(__file__).resolve().parents[2] / "csrc" / "emu" / "selftest_kernels.cu"
SCHEDULES = [("forward", 0), ("reverse", 0), ("random", 1), ("random", 12345)]


def case_line(marker: str) -> int:
    """Line of the `// CASE <marker>` comment in the self-test source (what error messages must name)."""
    for number, line in enumerate(SOURCE.read_text().splitlines(), start=1):
        if line.rstrip().endswith(f"// CASE {marker}"):
            return number
    raise AssertionError(f"marker {marker!r} not found in {SOURCE}")


def site(marker: str) -> str:
    return re.escape(f"selftest_kernels.cu:{case_line(marker)}")


@pytest.fixture(autouse=True)
def _restore_emulator_settings():
    schedule, workers = _emu.get_schedule(), _emu.num_workers()
    yield
    _emu.set_schedule(*schedule)
    _emu.set_num_workers(workers)


def each_setting():
    """(schedule, seed, workers) combinations for exactness checks."""
    for name, seed in SCHEDULES:
        for workers in (1, 2):
            yield name, seed, workers


def run_all_settings(fn):
    results = []
    for name, seed, workers in each_setting():
        _emu.set_schedule(name, seed)
        _emu.set_num_workers(workers)
        results.append(((name, seed, workers), fn()))
    return results


# ---- controls ---------------------------------------------------------------------------------------------
def test_schedule_controls_round_trip():
    _emu.set_schedule("reverse", 7)
    assert _emu.get_schedule() == ("reverse", 7)
    _emu.set_schedule("random", 2**63 + 5)
    assert _emu.get_schedule() == ("random", 2**63 + 5)
    with pytest.raises(ValueError, match="unknown schedule"):
        _emu.set_schedule("sideways", 0)
    _emu.set_schedule("forward", 0)
    with emu_ctl.schedule("random", seed=3):
        assert _emu.get_schedule() == ("random", 3)
    assert _emu.get_schedule() == ("forward", 0)


def test_negative_and_huge_seeds_are_taken_modulo_2_64():
    _emu.set_schedule("random", -1)
    assert _emu.get_schedule() == ("random", 2**64 - 1)
    _emu.set_schedule("random", 2**64 + 3)
    assert _emu.get_schedule() == ("random", 3)


def test_watchdog_names_a_spinning_thread(capfd):
    _emu.set_watchdog(0.5)
    try:
        st.spin(1.3)
    finally:
        _emu.set_watchdog(120)
    err = capfd.readouterr().err
    assert "cuemu watchdog: no progress for" in err
    assert "in block (0,0,0), thread (0,0,0) running" in err


@pytest.mark.parametrize("value, expected", [("reverse", "('reverse', 0)"), ("random:77", "('random', 77)"),
                                             ("sideways", "('forward', 0)")])
def test_initial_schedule_from_environment(value, expected):
    code = "import convnet._emu as e; print(e.get_schedule())"
    env = dict(os.environ, CONVNET_EMU_SCHEDULE=value, PYTHONPATH=os.pathsep.join(sys.path))
    # Run where the convnet under test lives: `python -c` puts the working directory first on sys.path.
    here = os.path.dirname(os.path.dirname(os.path.abspath(convnet.__file__)))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60, cwd=here)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == expected
    if value == "sideways":
        assert "ignoring CONVNET_EMU_SCHEDULE=sideways" in r.stderr


def test_worker_controls():
    _emu.set_num_workers(3)
    assert _emu.num_workers() == 3
    _emu.set_num_workers(1)
    assert _emu.num_workers() == 1
    _emu.set_num_workers(0)  # default: $CONVNET_EMU_THREADS or all cores
    assert _emu.num_workers() >= 1


def test_error_class_is_runtime_error_and_exported():
    assert issubclass(EmulatorError, RuntimeError)
    assert convnet.EmulatorError is EmulatorError


# ---- correct kernels: exact under every schedule ----------------------------------------------------------
def test_tiled_transpose_exact_under_all_schedules():
    x = np.arange(40 * 70, dtype=np.float32).reshape(40, 70)
    for setting, out in run_all_settings(lambda: st.transpose(x, barrier=True)):
        assert out.shape == (70, 40)
        np.testing.assert_array_equal(out, x.T, err_msg=str(setting))


def test_missing_barrier_changes_results_between_schedules():
    x = np.arange(64 * 64, dtype=np.float32).reshape(64, 64) + 1
    with emu_ctl.schedule("forward"):
        fwd = st.transpose(x, barrier=False)
    with emu_ctl.schedule("reverse"):
        rev = st.transpose(x, barrier=False)
    assert not np.array_equal(fwd, x.T)
    assert not np.array_equal(rev, x.T)
    assert not np.array_equal(fwd, rev, equal_nan=True)
    # The wrong values are the 0xFF poison of never-written shared memory (NaN), not stale data.
    assert np.isnan(fwd).any() and np.isnan(rev).any()
    # A random schedule is reproducible from its seed, whatever the number of workers.
    _emu.set_schedule("random", 99)
    _emu.set_num_workers(1)
    r1 = st.transpose(x, barrier=False)
    _emu.set_num_workers(2)
    r2 = st.transpose(x, barrier=False)
    np.testing.assert_array_equal(r1, r2)
    _emu.set_schedule("random", 100)
    assert not np.array_equal(r1, st.transpose(x, barrier=False), equal_nan=True)


def test_block_reduction_with_barriers_and_atomic_add():
    rng = np.random.default_rng(0)
    x = rng.integers(-50, 50, size=10_000).astype(np.float32)  # integer sums are exact in float32
    for setting, total in run_all_settings(lambda: st.reduce_sum(x)):
        assert total == float(x.sum(dtype=np.float64)), setting


def test_histogram_shared_and_global_atomics():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 37, size=20_000).astype(np.int32)
    expected = np.bincount(x, minlength=37)
    for setting, bins in run_all_settings(lambda: st.histogram(x, 37)):
        np.testing.assert_array_equal(bins, expected, err_msg=str(setting))


def expected_warp_ops(x: np.ndarray) -> np.ndarray:
    n = x.size
    w = x.reshape(-1, 32).astype(np.int64)
    lanes = np.arange(32)
    out = np.zeros((st.WARP_OPS_ROWS, n // 32, 32), dtype=np.int64)
    out[0] = w.sum(axis=1, keepdims=True)
    out[1] = np.cumsum(w, axis=1)
    out[2] = w.max(axis=1, keepdims=True)
    ballot = ((w > 0) * (1 << lanes)).sum(axis=1, keepdims=True)
    out[3] = ballot.astype(np.uint32).astype(np.int32)
    out[4] = (w > 100).any(axis=1, keepdims=True)
    out[5] = (w > -100).all(axis=1, keepdims=True)
    out[6] = np.repeat(w.reshape(-1, 4, 8).sum(axis=2), 8, axis=1)
    out[7] = w[:, (lanes + 1) % 32]
    out[8] = w.sum(axis=1, keepdims=True)
    key = w & 3
    out[9] = (((key[:, :, None] == key[:, None, :]) * (1 << lanes)[None, None, :]).sum(axis=2)).astype(np.uint32).astype(np.int32)
    seg, pos = lanes // 8, lanes % 8
    down = np.where(pos + 3 < 8, lanes + 3, lanes)
    up = np.where(pos >= 3, lanes - 3, lanes)
    out[10] = w[:, down]
    out[11] = w[:, up]
    out[12] = w[:, lanes ^ 1]
    out[13] = w[:, 31:32]
    out[14] = w.sum(axis=1, keepdims=True)
    out[15] = w[:, (lanes // 16) * 16 + 3]
    out[16] = w.max(axis=1, keepdims=True)
    out[17] = w.min(axis=1, keepdims=True)
    out[18] = np.int32(-1) ^ (1 << 4)  # full mask, predicate 1
    all_same = (w == w[:, :1]).all(axis=1, keepdims=True)
    out[19] = np.where(all_same, -1 + 2, 0)
    out[20] = np.bitwise_or.reduce(w.astype(np.uint32) & 0xF0, axis=1, keepdims=True)
    del seg
    return out.reshape(st.WARP_OPS_ROWS, n).astype(np.int32)


def test_warp_collectives_match_numpy():
    rng = np.random.default_rng(2)
    x = rng.integers(-60, 60, size=256).astype(np.int32)
    x[:32] = np.abs(x[:32]) + 1  # warp 0: all positive (ballot all ones, all_sync true)
    x[32] = 150  # warp 1: any_sync true
    x[64:96] = 7  # warp 2: uniform (match_all predicate true)
    expected = expected_warp_ops(x)
    names = ["shfl_down sum", "shfl_up scan", "shfl_xor max", "ballot", "any", "all", "xor width 8",
             "shfl rotate", "reduce_add", "match_any", "shfl_down width 8", "shfl_up width 8", "xor double",
             "shfl long long", "syncwarp shared tree", "shfl width 16", "reduce_max", "reduce_min",
             "match_all uniform", "match_all varying", "reduce_or"]
    for setting, out in run_all_settings(lambda: st.warp_ops(x)):
        for row, name in enumerate(names):
            np.testing.assert_array_equal(out[row], expected[row], err_msg=f"{name} under {setting}")


@pytest.mark.parametrize("grid, block", [((2, 3, 2), (4, 3, 5)), ((3, 1, 1), (40, 1, 1)), ((1, 2, 1), (7, 7, 1))])
def test_builtin_variables_and_warp_formation(grid, block):
    out = st.thread_ids(grid, block)
    gx, gy, gz = grid
    bx, by, bz = block
    per_block = bx * by * bz
    rows = []
    for z, y, x in np.ndindex(gz, gy, gx):
        for k, j, i in np.ndindex(bz, by, bx):
            t = i + bx * (j + by * k)
            warp_size = min(32, per_block - (t & ~31))
            active = (1 << warp_size) - 1
            rows.append([i, j, k, x, y, z, bx, by, bz, gx, gy, gz, t & ~31, np.int32(np.uint32(active))])
    np.testing.assert_array_equal(out, np.array(rows, dtype=np.int64).astype(np.int32))


def test_unwritten_shared_memory_is_poisoned():
    out = st.uninit_shared(64)
    assert out.dtype == np.uint32
    assert (out == 0xFFFFFFFF).all()  # static and dynamic shared memory: 0xFF bytes (NaN as float)


def test_dynamic_shared_memory():
    x = np.arange(100, dtype=np.float32)
    for setting, out in run_all_settings(lambda: st.dynamic_reverse(x)):
        np.testing.assert_array_equal(out, x[::-1], err_msg=str(setting))


def test_dynamic_shared_above_48k_after_cudaFuncSetAttribute():
    x = np.arange(16384, dtype=np.float32)  # 64 KB
    np.testing.assert_array_equal(st.dynamic_reverse(x, large=True), x[::-1])


def test_template_instantiations_get_distinct_shared_arrays():
    out = st.template_shared()
    lanes = (np.arange(32) + 1) % 32
    np.testing.assert_array_equal(out[:32], 1000 + lanes)
    np.testing.assert_array_equal(out[32:], 2000 + lanes)


def test_syncthreads_count_and_or():
    x = np.zeros(96, dtype=np.int32)
    x[[3, 50, 95]] = 1
    np.testing.assert_array_equal(st.syncthreads_reduce(x), [3, 0, 1])
    np.testing.assert_array_equal(st.syncthreads_reduce(np.ones(64, np.int32)), [64, 1, 1])
    np.testing.assert_array_equal(st.syncthreads_reduce(np.zeros(32, np.int32)), [0, 0, 0])


def test_atomics_of_every_type():
    blocks = 16
    t = blocks * 128
    expected = [t, t / 2, 2 * t, t, t * 2.0**33, -t, t - 1, 1000 - (t - 1), 3 * (t - 1), 7, t,
                t * (t + 1) / 2, t, t, 0xFFFFFFFF, 0xFFFF0000]
    for setting, out in run_all_settings(lambda: st.atomics(blocks)):
        np.testing.assert_array_equal(out, np.array(expected, dtype=np.float64), err_msg=str(setting))


def test_tiled_sgemm_ragged_and_schedule_independent():
    rng = np.random.default_rng(3)
    a = rng.standard_normal((40, 50)).astype(np.float32)
    b = rng.standard_normal((50, 33)).astype(np.float32)
    results = run_all_settings(lambda: st.sgemm(a, b))
    np.testing.assert_allclose(results[0][1], a.astype(np.float64) @ b, rtol=1e-5, atol=1e-5)
    for setting, c in results[1:]:
        np.testing.assert_array_equal(c, results[0][1], err_msg=str(setting))


def test_launch_counters_sgemm():
    a = np.ones((256, 256), np.float32)
    _emu.set_schedule("forward", 0)
    c = st.sgemm(a, a)
    assert (c == 256).all()
    stats = _emu.last_launch_stats()
    assert stats["blocks_run"] == 64
    assert stats["threads_run"] == 64 * 1024
    assert stats["barrier_rounds"] == 64 * 16  # 8 tile steps x 2 barriers per block
    # every thread is resumed once to start and once after each of its 16 barriers
    assert stats["switches"] == 64 * 1024 * 17


def test_barrier_free_kernel_needs_no_switch_per_thread():
    x = np.arange(1 << 16, dtype=np.float32)
    np.testing.assert_array_equal(st.scale(x, 2.0), 2 * x)
    stats = _emu.last_launch_stats()
    assert stats["threads_run"] == 1 << 16
    assert stats["switches"] == (1 << 16) // 256  # threads that never block run back to back on one stack


def test_concurrent_launches_from_python_threads():
    x = np.arange(33 * 65, dtype=np.float32).reshape(33, 65)
    errors = []

    def worker():
        try:
            for _ in range(5):
                np.testing.assert_array_equal(st.transpose(x), x.T)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_can_launch():
    _emu.set_num_workers(2)
    x = np.arange(64 * 64, dtype=np.float32).reshape(64, 64)
    np.testing.assert_array_equal(st.transpose(x), x.T)  # parent: helper threads exist now
    pid = os.fork()
    if pid == 0:  # child: the parent's helper threads are gone; launches must still complete
        code = 1
        try:
            code = 0 if np.array_equal(st.transpose(x), x.T) and _emu.num_workers() == 2 else 2
        finally:
            os._exit(code)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
            return
        time.sleep(0.05)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    pytest.fail("a launch in a forked child hung")


# ---- broken kernels: precise errors -----------------------------------------------------------------------
# name -> regexes that must all be found in the message. Which thread reports first depends on the schedule,
# so order-dependent parts are alternatives.
ERROR_CASES = {
    "divergent_barrier": lambda: [
        r"thread \(16,0,0\) of block \(0,0,0\) exited while 16 threads wait at __syncthreads at .*"
        + site("divergent_barrier")],
    "two_barriers": lambda: [
        r"block \(0,0,0\): divergent __syncthreads: 32 threads at .*" + site("two_barriers A")
        + r", 32 threads at .*" + site("two_barriers B")],
    "early_return": lambda: [
        r"thread \(5,0,0\) of block \(0,0,0\) exited while 63 threads wait at __syncthreads at .*"
        + site("early_return")],
    "assert": lambda: [
        r"block \(0,0,0\), thread \((4\d|5\d|6[0-3]),0,0\): assertion `int\(threadIdx.x\) < limit` failed at .*"
        + site("assert") + r" in .*assert_kernel"],
    "glibc_assert": lambda: [
        r"block \(0,0,0\), thread \((4\d|5\d|6[0-3]),0,0\): assertion `int\(threadIdx.x\) < limit` failed at .*"
        + site("glibc_assert") + r" in .*glibc_assert_kernel"],
    "throw": lambda: [r"block \(1,0,0\), thread \(3,0,0\): boom from a kernel"],
    "shfl_op_mismatch": lambda: [
        r"mismatched warp collectives in warp 0: lane \d+ at __\w+_sync .* with mask 0xffffffff, lane \d+ at",
        r"__shfl_sync .*" + site("shfl_op_mismatch A"), r"__ballot_sync .*" + site("shfl_op_mismatch B")],
    "shfl_mask_mismatch": lambda: [
        r"mismatched warp collectives in warp 0: lane \d+ at __shfl_xor_sync .*" + site("shfl_mask_mismatch"),
        r"with mask 0xffffffff", r"with mask 0xaaaaaaaa"],
    "partial_warp": lambda: [
        r"__shfl_xor_sync at .*" + site("partial_warp")
        + r": mask 0xffffffff names lanes 16-31, which do not exist \(warp 1 of this block has 16 threads\)"],
    "lane_not_in_mask": lambda: [
        r"thread \(\d+,0,0\): __ballot_sync at .*" + site("lane_not_in_mask")
        + r": mask 0x00000001 does not include the calling lane [1-9]"],
    "warp_deadlock": lambda: [
        r"block \(0,0,0\): warp collective deadlock in warp 0: lanes 0-15 wait at __shfl_down_sync .*"
        + site("warp_deadlock") + r" with mask 0xffffffff; missing lanes 16-31 exited"],
    "warp_vs_barrier": lambda: [
        r"lanes 0-15 wait at __shfl_down_sync .*" + site("warp_vs_barrier A")
        + r".*missing lanes 16-31 at __syncthreads .*" + site("warp_vs_barrier B")],
    "shfl_bad_source": lambda: [
        r"__shfl_down_sync at .*" + site("shfl_bad_source") + r": lane 8 reads lane 16, which is not in mask"],
    "static_shared_too_big": lambda: [
        r"static shared memory exceeds 48 KB per block: SHARED big \(52000 bytes\) at .*"
        + site("static_shared_too_big")],
    "nested_launch": lambda: [r"kernel launch from inside a kernel"],
    "many_blocks_assert": lambda: [r"block \(0,0,0\), thread \(\d+,0,0\): assertion `blockIdx.x != 0` failed"],
    "block_too_big": lambda: [r"invalid launch configuration: block \(1025,1,1\)"],
    "block_z_too_big": lambda: [r"invalid launch configuration: block \(1,1,65\)"],
    "grid_y_too_big": lambda: [r"invalid launch configuration: grid \(1,65536,1\)"],
    "zero_grid": lambda: [r"invalid launch configuration: grid \(0,1,1\) has a zero dimension"],
    "zero_block": lambda: [r"invalid launch configuration: block \(32,0,1\) has a zero dimension"],
    "dyn_shared_too_big": lambda: [
        r"49156 bytes of dynamic shared memory exceed this kernel's limit of 49152; raise it with "
        r"cudaFuncSetAttribute"],
    "dyn_shared_over_max": lambda: [r"233472 bytes of dynamic shared memory \(at most 232448 per block\)"],
}


def test_every_error_case_is_covered():
    assert sorted(st.case_names()) == sorted(ERROR_CASES)


@pytest.mark.parametrize("name", sorted(ERROR_CASES))
@pytest.mark.parametrize("order", ["forward", "reverse", "random"])
def test_error_cases_raise_precise_errors(name, order):
    _emu.set_schedule(order, 5)
    with pytest.raises(EmulatorError) as info:
        st.run_case(name)
    message = str(info.value)
    for pattern in ERROR_CASES[name]():
        assert re.search(pattern, message), f"{pattern!r} not found in {message!r}"
    # The error was thrown, not left behind for a later CUDA_CHECK(cudaGetLastError()) of another launcher.
    assert st.last_error() == 0
    # The emulator is usable again right after an error (abandoned fibers are reset).
    x = np.arange(35 * 40, dtype=np.float32).reshape(35, 40)
    np.testing.assert_array_equal(st.transpose(x), x.T)


def test_error_stops_other_blocks_promptly():
    _emu.set_num_workers(2)
    t0 = time.perf_counter()
    with pytest.raises(EmulatorError, match="blockIdx.x != 0"):
        st.run_case("many_blocks_assert")  # 20000 blocks; block 0 fails
    assert _emu.last_launch_stats()["blocks_run"] < 200
    assert time.perf_counter() - t0 < 1.0


def test_unknown_case_is_value_error():
    with pytest.raises(ValueError, match="unknown self-test case"):
        st.run_case("no_such_case")
