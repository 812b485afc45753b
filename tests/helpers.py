"""Test helpers shared by every op's tests: devices, schedules, random data and comparisons.

Every kernel test runs on ``emu`` (always; CI has no GPU) and on ``cuda`` when a GPU is usable, against the
NumPy reference on the host.
"""
from __future__ import annotations

import contextlib

import numpy as np
import pytest

from convnet import emu
from convnet.devices import Device, device_report, get_device


def _cuda_param():
    for entry in device_report():
        if entry["device"] == "cuda:0" and entry["usable"]:
            return pytest.param(Device("cuda", 0), id="cuda")
    reason = next((e["detail"] for e in device_report() if e["device"].startswith("cuda")), "no GPU")
    return pytest.param(Device("cuda", 0), id="cuda", marks=pytest.mark.skip(reason=reason))


def _emu_param():
    get_device("emu")  # the emulator must be built: a missing _emu is a failure, not a skip
    return pytest.param(Device("emu"), id="emu")


KERNEL_DEVICES = [_emu_param(), _cuda_param()]
SCHEDULES = emu.SCHEDULES


@contextlib.contextmanager
def schedule(device: Device, order: str, seed: int = 0):
    """Emulator schedule order on emu; a no-op on the GPU (whose schedule is the hardware's)."""
    if device.kind == "emu":
        with emu.schedule(order, seed):
            yield
    else:
        yield


def rand(rng: np.random.Generator, shape, dtype=np.float32, low=-1.0, high=1.0) -> np.ndarray:
    """Random data in [low, high): never zeros, never a constant."""
    return rng.uniform(low, high, size=shape).astype(dtype)


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
    got, want = to_host(got), to_host(want)
    assert got.shape == want.shape and got.dtype == want.dtype, f"{name}: {got.shape}/{got.dtype} vs {want.shape}/{want.dtype}"
    if not np.array_equal(got, want, equal_nan=True):
        diff = np.argwhere(~((got == want) | (np.isnan(got) & np.isnan(want)) if got.dtype.kind == "f" else got == want))
        raise AssertionError(f"{name}: not bit-identical; {len(diff)} elements differ, first at {tuple(diff[0])}")
