"""The cpu device's GEMM (``convnet._cpu``, csrc/cpu/gemm.cpp): ``c = a @ b`` in float32 with AVX-512 or AVX2+FMA
micro-kernels, and the convolutions' two GEMMs with the im2col operand packed straight from the CHWN image (no
im2col matrix in memory). Every element of ``c`` is one chain of fused multiply-adds over k in order, whatever the
SIMD width, tile sizes or thread count: the cpu device's results are bit-identical on every x86-64 CPU with FMA and
do not depend on which NumPy/OpenBLAS build is installed. Where the CPU has neither (another architecture), the cpu
device uses NumPy's BLAS instead (``available()`` is False).

``CONVNET_CPU_GEMM`` (read once per process) picks another width than the widest: ``avx2`` or ``avx512``, or
``numpy`` for NumPy's BLAS over im2col matrices -- to measure what an AVX2-only CPU gets, or to compare.

Checked against NumPy in float64 on random data by tests/test_cpu_gemm.py (every SIMD width this CPU runs, strided
and transposed operands, awkward sizes, thread counts, bad input).
"""
from __future__ import annotations

import functools
import os

import numpy as np

from convnet.cpu import lib


@functools.lru_cache(maxsize=None)
def isas() -> tuple[str, ...]:
    """The SIMD widths this build has and this CPU runs, widest (the one used) first; () where none."""
    return tuple(lib().gemm_isas())


ENV = "CONVNET_CPU_GEMM"


@functools.lru_cache(maxsize=None)
def isa() -> str | None:
    """The width the cpu device multiplies with: the widest of ``isas()``, or ``CONVNET_CPU_GEMM``'s choice; None:
    NumPy's BLAS (no width here, or ``CONVNET_CPU_GEMM=numpy``)."""
    choice = os.environ.get(ENV, "").strip().lower()
    have = isas()
    if choice in ("", "auto"):
        return have[0] if have else None
    if choice == "numpy":
        return None
    if choice not in have:
        raise ValueError(f"{ENV}={choice!r}: this CPU and build run {', '.join(have) or 'no width of this GEMM'} "
                         f"(or 'numpy' for NumPy's BLAS)")
    return choice


def available() -> bool:
    return isa() is not None


def matmul(a, b, out=None, bias=None):
    """``a @ b`` (``+ bias[:, None]``: added in the GEMM's store, the same bits as adding it after) for float32
    matrices (any strides) into ``out`` (a new array if None); NumPy's where ours is not available or the operands
    are not 2-D float32 (the ops only pass those)."""
    if not available() or a.ndim != 2 or b.ndim != 2 or a.dtype != np.float32 or b.dtype != np.float32:
        out = np.matmul(a, b, out=out)
        if bias is not None:
            out += bias[:, None]
        return out
    if out is None:
        out = np.empty((a.shape[0], b.shape[1]), dtype=np.float32)
    lib().gemm(a, b, out, bias=bias, isa=isa())
    return out
