"""The ``cpu`` device, the fast CPU path and the default device without a GPU: ops run the NumPy reference
(``convnet.reference``) except where a training step spends its time, where ``FAST_FUNCTIONS`` names the faster
version (``convnet.cpu``: its own GEMM around compiled host loops, ``convnet._cpu``). Checked against the reference
like the compiled kernels (every op test's device list, tests/test_cpu.py). float32, like the kernels (float64 is the
numpy device's, which stays the plain reference). The ops with a bfloat16 storage variant (pooling, LRN, ReLU,
dropout, softmax) accept bfloat16 arrays here too: the compiled loops are float32 only, so those calls run the
reference (float32 math on the upcast values, one rounding: ``convnet.reference.storage``), correct but slower.
"""
from __future__ import annotations

import functools

import numpy as np

import convnet.cpu  # noqa: F401 (sets the OpenMP wait policy before convnet._cpu loads libgomp)
from convnet.cpu import conv as fast_conv
from convnet.cpu import elementwise as fast_elementwise
from convnet.cpu import gemm as cpu_gemm
from convnet.cpu import pool as fast_pool
from convnet.cpu import sgd as fast_sgd
from convnet.devices.backend_numpy import NumpyDevice
from convnet.extensions import load_extension
from convnet.reference import conv, elementwise, pool, sgd
from convnet.reference.storage import is_bf16, is_bf16_storage


def _float32_loops(fast, reference):
    """``fast`` (float32 compiled loops) for a reference with a bfloat16 storage variant: a call with a bfloat16 array
    runs the reference instead."""
    @functools.wraps(fast)
    def run(*args, **kwargs):
        for a in (*args, *kwargs.values()):  # a loop, not any() over a generator: this runs on every such op call
            if is_bf16(a):
                return reference(*args, **kwargs)
        return fast(*args, **kwargs)
    return run


# Reference function -> the cpu device's version (same signature and results; it may add keyword-only options with
# defaults, which only the cpu device's ops pass: conv_forward's relu); other ops run the reference itself.
FAST_FUNCTIONS = {
    conv.conv_forward: fast_conv.conv_forward,
    conv.conv_backward_data: fast_conv.conv_backward_data,
    conv.conv_backward_filter: fast_conv.conv_backward_filter,
    conv.conv_backward_bias: fast_conv.conv_backward_bias,
    elementwise.relu_forward: fast_elementwise.relu_forward,
    elementwise.relu_backward: fast_elementwise.relu_backward,
    elementwise.dropout_forward: fast_elementwise.dropout_forward,
    elementwise.dropout_backward: fast_elementwise.dropout_backward,
    pool.pool_forward: fast_pool.pool_forward,
    pool.pool_backward: fast_pool.pool_backward,
    sgd.sgd_update: fast_sgd.sgd_update,
    sgd.sgd_update_many: fast_sgd.sgd_update_many,
}
FAST_FUNCTIONS = {reference: _float32_loops(fast, reference) if is_bf16_storage(reference) else fast
                  for reference, fast in FAST_FUNCTIONS.items()}


class CpuDevice(NumpyDevice):
    kind = "cpu"
    dtypes = (np.dtype(np.float32),)
    gemm_epilogue = True  # convnet.cpu.gemm: bias and ReLU in the GEMM's store, the unfused passes' bits

    def available(self):
        module, reason = load_extension("_cpu")
        return module is not None, reason

    @classmethod
    def report(cls):
        ok, reason = cls(cls.kind).available()
        return [{"device": "cpu", "usable": ok,
                 "detail": "fast CPU path (convnet.cpu: compiled GEMM and loops)" if ok else reason}]

    def host_function(self, reference_function):
        return FAST_FUNCTIONS.get(reference_function, reference_function)

    def matmul(self, a, b, out=None, precision="fp32", bias=None):
        """Device.matmul; bias: ``+ bias[:, None]`` in the GEMM's store (fc_forward's bias, no pass over out)."""
        return cpu_gemm.matmul(a, b, out=out, bias=bias)


DEVICE = CpuDevice
