"""What the CPU backends (numpy, emu) share: host arrays, and the BLAS thread pool."""
from __future__ import annotations

import numpy as np

from convnet.devices.backend import Backend


class HostBackend(Backend):
    """Arrays are C-contiguous numpy.ndarray in host memory; every index is a virtual device of the same host."""

    def xp(self):
        return np

    def array_name(self, index: int) -> str:
        return "numpy.ndarray"

    def is_array(self, a, index: int) -> bool:
        return isinstance(a, np.ndarray)

    def asarray(self, a, dtype, index: int):
        if not isinstance(a, np.ndarray) and hasattr(a, "get"):  # a cupy array coming back to the host
            a = a.get()
        return np.ascontiguousarray(a, dtype=dtype)

    def to_numpy(self, a) -> np.ndarray:
        return np.asarray(a)

    def pointer(self, a) -> int:
        return int(a.ctypes.data)

    def copy(self, a, src_index, dst_index, out, stream=None, src_stream=None):
        """A real copy (host devices complete it before returning; the virtual devices share the host's memory)."""
        np.copyto(out, a)
        return out


class blas_threads:
    """Limit the BLAS thread pool (threadpoolctl) while training on a CPU device; 0 leaves the library default."""

    def __init__(self, n, log=print):
        self.n, self.log, self.ctl = int(n or 0), log, None

    def __enter__(self):
        if self.n > 0:
            try:
                from threadpoolctl import threadpool_limits
            except ImportError:
                self.log("note: threadpoolctl is not installed; BLAS threads left at the library default "
                         "(pip install threadpoolctl, or set OPENBLAS_NUM_THREADS)")
                return self
            self.ctl = threadpool_limits(limits=self.n, user_api="blas")
        return self

    def __exit__(self, *exc):
        if self.ctl is not None:
            self.ctl.restore_original_limits()
        return False
