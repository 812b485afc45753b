"""The fast CPU path (the ``cpu`` device, float32): faster versions of the NumPy reference functions
(``convnet.reference.<family>``) that a training step spends time in, in ``convnet.cpu.<family>``, with the same
signatures and the same results. The GEMMs are this path's own (``convnet.cpu.gemm``: AVX-512 or AVX2 micro-kernels,
the convolutions' im2col operand packed straight from the image; NumPy's BLAS where the CPU has neither); the loops
between them -- im2col/col2im, max pooling, ReLU, dropout, the bias add and sum, the SGD update -- are compiled host
code, ``convnet._cpu`` (csrc/cpu/host_kernels.cpp: one pass over memory each, OpenMP across channels, the GIL
released). In NumPy those loops cost as much as the GEMMs. The convolutions' bias and ReLU and the fc layers' bias
take no pass of their own: the GEMM applies them in the store of each output tile (the same bits).

Which reference function each one replaces is one table, ``FAST_FUNCTIONS`` in ``devices/backend_cpu.py``; every other
op runs the reference. The tests run every op on ``cpu`` against the reference on random data, like the compiled
kernels (tests/helpers.py ``KERNEL_DEVICES``), plus tests/test_cpu.py for what is specific to this path. The NumPy
reference stays the simple, obviously correct oracle.
"""
from __future__ import annotations

import ctypes
import os
import sys

import numpy as np

from convnet.extensions import load_extension

# The loops' OpenMP threads wait for the next parallel region by spinning briefly, then sleep. Not spinning long:
# a spinning thread on a machine with as many busy threads as cores (BLAS, the loader, another job) stalls everyone
# (a step measured 5x slower). Not sleeping at once either: a step runs ~40 parallel regions a few tens of
# microseconds of Python apart, and a sleeping thread must be woken for each and met at its end -- on a loaded
# machine the region then waits for the scheduler to run that thread (the fmnist step at 2 threads, load average
# 7-10 on 2 cores, alternating rounds: 200-670 ms with no spin, 67-145 ms with GOMP_SPINCOUNT 2,000-10,000).
# Read by libgomp when convnet._cpu loads it; a user's own setting of either variable wins.
SPIN_COUNT = 5000  # libgomp's spin iterations (each a `pause`) before a waiting thread sleeps: tens of microseconds
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    os.environ["GOMP_SPINCOUNT"] = str(SPIN_COUNT)

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def _keep_freed_memory():
    """Make glibc's malloc keep freed memory for the next step instead of handing it back to the kernel. A training
    step allocates and frees the same few-MB activations every time; by default glibc maps the larger ones afresh or
    trims them off the heap, so each step page-faults them in again, zero-filled by the kernel (measured on fmnist,
    batch 64: ~1300 faults and ~2.5 ms of system time per step, against ~1 fault with these settings). Arrays up to
    64 MB now come from the heap, and up to 256 MB of free heap is kept. Linux/glibc only; a user's own malloc
    settings (MALLOC_*_ variables, GLIBC_TUNABLES) win."""
    if not sys.platform.startswith("linux") or "GLIBC_TUNABLES" in os.environ or any(
            k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # another C library (musl): its own policy stays
        return
    mallopt(_M_MMAP_THRESHOLD, 64 << 20)
    mallopt(_M_TRIM_THRESHOLD, 256 << 20)


_keep_freed_memory()


def lib():
    """``convnet._cpu`` (the backend refuses the cpu device where it is not built, so this is a broken install)."""
    module, reason = load_extension("_cpu")
    if module is None:
        raise RuntimeError(reason)
    return module


def contiguous(*arrays):
    """C-contiguous float32 arrays, as the loops take them (the ops pass such arrays already: no copy then). Another
    dtype is a TypeError, never a silent conversion: this path is float32 (float64 is the numpy device's)."""
    out = []
    for a in arrays:
        a = np.asarray(a)
        if a.dtype != np.float32:
            raise TypeError(f"the fast CPU path computes in float32, got {a.dtype} (use the numpy device for float64)")
        out.append(np.ascontiguousarray(a))
    return out


class loop_threads:
    """Context manager: the compiled loops run on ``n`` threads (0 = one per core) inside, as BLAS does inside
    ``devices.blas_threads(n)``; the trainer and benchmarks enter both with their ``--threads``. A no-op where
    ``convnet._cpu`` is not built (the cpu device then refuses to start and says why)."""

    def __init__(self, n: int):
        self.n, self.module, self.saved = int(n or 0), load_extension("_cpu")[0], None

    def __enter__(self):
        if self.module is not None:
            self.saved = self.module.get_threads()
            self.module.set_threads(self.n if self.n > 0 else (os.cpu_count() or 1))
        return self

    def __exit__(self, *exc):
        if self.module is not None:
            self.module.set_threads(self.saved)
        return False
