"""Controls of the CPU emulation of the CUDA execution model (the ``emu`` device).

Fibers of a block (its CUDA threads) run in some order between barriers: ``forward`` (thread 0 first),
``reverse`` or ``random`` (a seeded permutation per barrier interval). A correct kernel gives bit-identical
results under all three; a missing ``__syncthreads`` shows up as a difference. Tests use::

    with convnet.emu.schedule("reverse"):
        y = ops.relu_forward(emu, x)
"""
from __future__ import annotations

import contextlib

from convnet.devices import get_device

SCHEDULES = ("forward", "reverse", "random")


def _module():
    return get_device("emu").kernels


@contextlib.contextmanager
def schedule(order: str, seed: int = 0):
    """Run emulated kernels with fibers resumed in ``order`` ('forward', 'reverse' or 'random')."""
    if order not in SCHEDULES:
        raise ValueError(f"unknown schedule {order!r}; expected one of {', '.join(SCHEDULES)}")
    module = _module()
    previous = module.get_schedule()
    module.set_schedule(order, int(seed))
    try:
        yield
    finally:
        module.set_schedule(*previous)


def set_num_workers(n: int) -> None:
    """Number of OS threads running blocks in parallel (default: all cores, or $CONVNET_EMU_THREADS)."""
    if int(n) < 1:
        raise ValueError(f"number of emulator workers must be at least 1, got {n}")
    _module().set_num_workers(int(n))


def num_workers() -> int:
    return _module().num_workers()


def set_watchdog(seconds: float) -> None:
    """Fail a launch that makes no progress for this long (a thread spinning on another), naming the thread."""
    _module().set_watchdog(float(seconds))


def last_launch_stats() -> dict:
    """Counters of the most recent emulated launch (blocks, fiber resumes, barriers, ...)."""
    return dict(_module().last_launch_stats())
