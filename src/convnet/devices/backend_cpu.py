"""The ``cpu`` device, the fast CPU path and the default device without a GPU: ops run ``convnet.cpu.<family>``, the
same functions as the NumPy reference (``convnet.reference.<family>``) rewritten for speed where a training step
spends its time -- its own GEMM (convnet/cpu/gemm.py) around compiled host loops (``convnet._cpu``: col2im, max
pooling, ReLU, dropout) -- and
the reference itself elsewhere. Checked against the reference like the compiled kernels (every op test's device list,
tests/test_cpu.py). float32, like the kernels (float64 is the numpy device's). The ``numpy`` device stays the plain
reference.
"""
from __future__ import annotations

import functools
import importlib

import numpy as np

import convnet.cpu  # noqa: F401 (sets the OpenMP wait policy before convnet._cpu loads libgomp)
from convnet.cpu import gemm as cpu_gemm
from convnet.devices.backend import load_extension
from convnet.devices.backend_numpy import NumpyBackend


class CpuBackend(NumpyBackend):
    kind = "cpu"
    dtypes = (np.dtype(np.float32),)

    def availability(self, index):
        module, reason = load_extension("_cpu")
        return module is not None, reason

    def report(self):
        ok, reason = self.availability(0)
        return [{"device": "cpu", "usable": ok,
                 "detail": "fast CPU path (convnet.cpu: compiled GEMM and loops)" if ok else reason}]

    def matmul(self, a, b, out=None):
        return cpu_gemm.matmul(a, b, out=out)

    @functools.lru_cache(maxsize=None)  # every op call asks: look the module up once per family
    def host_module(self, reference_module):
        family = reference_module.__name__.rsplit(".", 1)[1]
        try:
            return importlib.import_module(f"convnet.cpu.{family}")
        except ModuleNotFoundError as exc:
            if exc.name != f"convnet.cpu.{family}":
                raise
            return reference_module


BACKEND = CpuBackend()
