"""Controls of the CPU emulation of the CUDA execution model (the ``emu`` device).

Fibers of a block (its CUDA threads) run in some order between barriers: ``forward`` (thread 0 first),
``reverse`` or ``random`` (a seeded permutation per barrier interval). A correct kernel gives bit-identical
results under all three; a missing ``__syncthreads`` shows up as a difference. Tests use::

    with convnet.emu.schedule("reverse"):
        y = ops.relu_forward(emu, x)
"""
from __future__ import annotations

import contextlib
import math
import numbers

from convnet.devices import get_device

SCHEDULES = ("forward", "reverse", "random")


def _module():
    return get_device("emu").kernels


@contextlib.contextmanager
def schedule(order: str, seed: int = 0):
    """Run emulated kernels with fibers resumed in ``order`` ('forward', 'reverse' or 'random')."""
    if order not in SCHEDULES:
        raise ValueError(f"unknown schedule {order!r}; expected one of {', '.join(SCHEDULES)}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"schedule seed must be an int, got {seed!r}")
    module = _module()
    previous = module.get_schedule()
    module.set_schedule(order, int(seed))
    try:
        yield
    finally:
        module.set_schedule(*previous)


MAX_WORKERS = 4096


def set_num_workers(n: int) -> None:
    """Number of OS threads running blocks in parallel (default: all cores, or $CONVNET_EMU_THREADS)."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise TypeError(f"number of emulator workers must be an int, got {n!r}")
    if not 1 <= n <= MAX_WORKERS:
        raise ValueError(f"number of emulator workers must be between 1 and {MAX_WORKERS}, got {n}")
    _module().set_num_workers(int(n))


def num_workers() -> int:
    return _module().num_workers()


def set_watchdog(seconds: float) -> None:
    """Fail a launch that makes no progress for this long (a thread spinning on another), naming the thread.
    ``seconds``: a finite number >= 0 (0 = off)."""
    if isinstance(seconds, bool) or not isinstance(seconds, numbers.Real) or not math.isfinite(seconds):
        raise ValueError(f"watchdog time must be a finite number of seconds (0 = off), got {seconds!r}")
    if seconds < 0:
        raise ValueError(f"watchdog time must be >= 0 seconds (0 = off), got {seconds!r}")
    _module().set_watchdog(float(seconds))


def last_launch_stats() -> dict:
    """Counters of the most recent emulated launch (blocks, fiber resumes, barriers, ...)."""
    return dict(_module().last_launch_stats())
