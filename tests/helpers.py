"""Test helpers shared by every op's tests: devices, schedules, random data, comparisons, finite differences,
bad-input tables and benchmark loading. A test file keeps only what is specific to its op.

Every kernel test runs on ``emu`` (always; CI has no GPU), on ``cuda`` when a GPU is usable, and on ``cpu`` (the fast
CPU path, ``convnet.cpu``), against the NumPy reference on the host. ``conftest.py`` turns the device lists into the ``kernel_device``, ``any_device`` and
``cuda_device`` fixtures, and marks every test that gets a cuda device ``cuda`` (tools/gpu_check.sh counts them).
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import pytest

import convnet
from convnet import emu
from convnet.devices import Device, device_report, get_device

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------- devices
def _cuda_param():
    for entry in device_report():
        if entry["device"] == "cuda:0" and entry["usable"]:
            return pytest.param(Device("cuda", 0), id="cuda")
    reason = next((e["detail"] for e in device_report() if e["device"].startswith("cuda")), "no GPU")
    return pytest.param(Device("cuda", 0), id="cuda", marks=pytest.mark.skip(reason=reason))


def _emu_param():
    get_device("emu")  # the emulator must be built: a missing _emu is a failure, not a skip
    return pytest.param(Device("emu"), id="emu")


def _cpu_param():
    get_device("cpu")  # convnet._cpu must be built: a missing module is a failure, not a skip
    return pytest.param(Device("cpu"), id="cpu")


NUMPY = Device("numpy")
EMU = Device("emu")
CPU = Device("cpu")
CUDA_DEVICES = [_cuda_param()]                                     # GPU-only tests (skipped here, with the reason)
COMPILED_DEVICES = [_emu_param(), *CUDA_DEVICES]                    # the compiled kernels (tests of their internals)
KERNEL_DEVICES = [*COMPILED_DEVICES, _cpu_param()]                  # every implementation checked against numpy
ALL_DEVICES = [pytest.param(NUMPY, id="numpy")] + KERNEL_DEVICES    # and the NumPy reference device


# ---------------------------------------------------------------------------------------------------- schedules
SCHEDULES = emu.SCHEDULES


@contextlib.contextmanager
def schedule(device: Device, order: str, seed: int = 0):
    """Emulator schedule order on emu; a no-op on the GPU (whose schedule is the hardware's)."""
    if device.kind == "emu":
        with emu.schedule(order, seed):
            yield
    else:
        yield


def assert_schedules_identical(run, names, *, seed: int):
    """``run()`` returns a tuple of results (arrays or numbers); under every emulator schedule order each must be
    bit-identical to its value under the first order (a missing barrier or a racy reduction shows up here)."""
    results = {}
    for order in SCHEDULES:
        with emu.schedule(order, seed):
            results[order] = tuple(run())
    first = SCHEDULES[0]
    for order in SCHEDULES[1:]:
        assert len(results[order]) == len(names)
        for name, got, want in zip(names, results[order], results[first]):
            assert_identical(f"{name} ({order} vs {first})", got, want)


# ---------------------------------------------------------------------------------------------------- data
def rand(rng: np.random.Generator, shape, dtype=np.float32, low=-1.0, high=1.0) -> np.ndarray:
    """Random data in [low, high): never zeros, never a constant."""
    return rng.uniform(low, high, size=shape).astype(dtype)


def misaligned(a: np.ndarray) -> np.ndarray:
    """A C-contiguous host copy of ``a`` whose data pointer is 4 bytes past a 16-byte boundary (forces the kernels'
    scalar path)."""
    buf = np.empty(a.size + 8, a.dtype)
    off = (-(buf.ctypes.data // 4) % 4 + 1) % 4 or 1
    out = buf[off:off + a.size].reshape(a.shape)
    out[...] = a
    assert out.ctypes.data % 16 != 0 and out.flags.c_contiguous
    return out


def offset_view(device: Device, a: np.ndarray, rng: np.random.Generator):
    """``a`` on ``device`` as a view starting one element into a (random-filled) buffer: contiguous but not
    16-byte aligned, on any device (the scalar path)."""
    buf = device.asarray(rand(rng, a.size + 1))
    view = buf[1:].reshape(a.shape)
    view[...] = device.asarray(a)
    return view


# ---------------------------------------------------------------------------------------------------- comparisons
def to_host(a) -> np.ndarray:
    return a.get() if hasattr(a, "get") else np.asarray(a)


def assert_close(name: str, got, want, *, rtol: float, atol: float = 0.0):
    """Compare against the reference; on failure report the worst element and the error statistics."""
    got, want = to_host(got), np.asarray(want)
    assert got.shape == want.shape, f"{name}: shape {got.shape} != reference {want.shape}"
    assert np.isfinite(got).all(), f"{name}: non-finite values in the result"
    err = np.abs(got.astype(np.float64) - want.astype(np.float64))
    bound = atol + rtol * np.abs(want.astype(np.float64))
    if not (err <= bound).all():
        i = np.unravel_index(np.argmax(err - bound), err.shape)
        raise AssertionError(f"{name}: {int((err > bound).sum())}/{err.size} elements off; worst at {i}: "
                             f"got {got[i]!r}, want {want[i]!r} (|err| {err[i]:.3g} > {bound[i]:.3g}); "
                             f"max |err| {err.max():.3g}")


def assert_identical(name: str, got, want):
    """Same shape, dtype and bits (NaN where the other has NaN)."""
    got, want = to_host(got), to_host(want)
    assert got.shape == want.shape and got.dtype == want.dtype, \
        f"{name}: {got.shape}/{got.dtype} vs {want.shape}/{want.dtype}"
    if not np.array_equal(got, want, equal_nan=True):
        same = (got == want) | (np.isnan(got) & np.isnan(want)) if got.dtype.kind in "fc" else got == want
        diff = np.argwhere(~same)
        raise AssertionError(f"{name}: not bit-identical; {len(diff)} elements differ, first at {tuple(int(i) for i in diff[0])}")


# ---------------------------------------------------------------------------------------------------- gradients
def sample_indices(rng: np.random.Generator, size: int, n: int) -> np.ndarray:
    """``min(n, size)`` distinct flat indices of an array of ``size`` elements."""
    return rng.choice(size, size=min(n, size), replace=False)


def numeric_grad(f, x, eps=1e-6, idx=None) -> np.ndarray:
    """Central differences (float64) of the scalar ``f`` at ``x`` for the flat indices ``idx`` (all when None), in
    the order of ``idx``. ``f`` receives a float64 copy of ``x`` with one element moved by +-eps."""
    x = np.array(x, dtype=np.float64)
    flat = x.reshape(-1)
    idx = range(flat.size) if idx is None else idx
    g = []
    for i in idx:
        old = flat[i]
        flat[i] = old + eps
        fp = f(x)
        flat[i] = old - eps
        fm = f(x)
        flat[i] = old
        g.append((fp - fm) / (2 * eps))
    return np.array(g)


def check_grad(f, x, analytic, *, eps=1e-6, n=60, rtol=1e-5, atol=1e-7, seed=0):
    """The analytic gradient of the scalar ``f`` at ``x`` agrees with central differences at ``n`` sampled
    elements: ``|analytic - numeric| <= atol + rtol * |numeric|`` for each."""
    rng = np.random.default_rng(seed)
    idx = sample_indices(rng, np.asarray(x).size, n)
    num = numeric_grad(f, x, eps, idx)
    a = np.asarray(analytic).reshape(-1)
    for i, v in zip(idx, num):
        assert abs(a[i] - v) <= atol + rtol * abs(v), f"flat index {i}: analytic {a[i]!r} vs numeric {v!r}"


# ---------------------------------------------------------------------------------------------------- bad inputs
def assert_raises_each(*cases):
    """Each case ``(exception, match, call)``: ``call()`` raises ``exception`` with a message matching the regular
    expression ``match``. A failure names the case."""
    for exception, match, call in cases:
        try:
            with pytest.raises(exception, match=match):
                call()
        except (Exception, pytest.fail.Exception) as exc:
            raise AssertionError(f"bad-input case ({exception.__name__}, {match!r}): {exc!r}") from exc


# ---------------------------------------------------------------------------------------------------- benchmarks
def load_benchmark(name: str):
    """Import ``benchmarks/<name>.py`` as a module (the benchmarks are scripts, not a package)."""
    path = ROOT / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # before running it, as an import would (dataclasses look themselves up there)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------------- subprocesses
def subprocess_env(*first_on_path, **extra) -> dict:
    """The environment for a subprocess that must import the convnet under test (installed in CI, ``src/`` in a
    development build) and never a checkout's unbuilt sources: that package's parent folder goes first on the path."""
    under_test = str(Path(convnet.__file__).resolve().parents[1])
    path = os.pathsep.join([*map(str, first_on_path), under_test, os.environ.get("PYTHONPATH", "")])
    return dict(os.environ, PYTHONPATH=path, **extra)
