"""The ``cuda:i`` devices: the kernels compiled by nvcc (``convnet._cuda``) on GPU i; arrays are CuPy arrays."""
from __future__ import annotations

import contextlib
import functools
import os

from convnet.devices.backend import Backend, DeviceUnavailable, load_extension

# CONVNET_CUPY_POOL=0: CuPy allocates every array with its own cudaMalloc (no device or pinned memory pool). Under
# compute-sanitizer memcheck an out-of-bounds access into a pooled sub-allocation lands in memory the pool owns and
# goes unseen; with the pool off it is reported (tools/gpu_check.sh sets it for the sanitizer runs).
POOL_ENV = "CONVNET_CUPY_POOL"
_allocator_configured = False


def cupy_pool_enabled(environ=os.environ) -> bool:
    """Whether CuPy's memory pools stay on: ``CONVNET_CUPY_POOL`` unset/empty/1 (default) or 0 (off)."""
    value = environ.get(POOL_ENV, "").strip().lower()
    if value in ("", "1", "on", "true", "yes"):
        return True
    if value in ("0", "off", "false", "no"):
        return False
    raise ValueError(f"{POOL_ENV} must be 0 (no memory pool) or 1 (CuPy's pools, the default), got {value!r}")


def configure_allocator(cp, environ=os.environ) -> bool:
    """Apply ``CONVNET_CUPY_POOL`` to the CuPy module ``cp``; returns whether the pools stay on."""
    enabled = cupy_pool_enabled(environ)
    if not enabled:
        cp.cuda.set_allocator(None)
        cp.cuda.set_pinned_memory_allocator(None)
    return enabled


def _import_cupy():
    """``import cupy``, applying ``CONVNET_CUPY_POOL`` once per process, before this package allocates anything."""
    global _allocator_configured
    import cupy

    if not _allocator_configured:
        configure_allocator(cupy)
        _allocator_configured = True
    return cupy


def cupy():
    try:
        return _import_cupy()
    except ImportError as exc:
        raise DeviceUnavailable(f"CuPy is not installed ({exc}); `pip install .[cuda]`") from None


class CudaBackend(Backend):
    kind = "cuda"
    synchronous = False
    always_indexed = True
    extension = "_cuda"

    # -- availability (probed once per process) -----------------------------------------------------------------
    @functools.lru_cache(maxsize=None)
    def count(self) -> tuple[int, str]:
        module, reason = load_extension(self.extension)
        if module is None:
            return 0, reason
        n, message = module.device_count()
        if n == 0:
            return 0, f"no usable GPU: the CUDA runtime says {message or 'there are 0 devices'}"
        try:
            _import_cupy()
        except ImportError as exc:
            return 0, f"{n} GPU(s) present but CuPy is not installed ({exc}); `pip install .[cuda]`"
        return n, ""

    @functools.lru_cache(maxsize=None)
    def availability(self, index):
        n, reason = self.count()
        if n == 0:
            return False, reason
        if index >= n:
            return False, f"only {n} GPU(s) present"
        module, _ = load_extension(self.extension)
        try:
            name, major, minor, sms = module.device_name(index)
        except RuntimeError as exc:
            return False, str(exc)
        if major < 8:
            return False, f"{name} is sm_{major}{minor}; convnet._cuda is built for sm_80 and newer"
        return True, f"{name} (sm_{major}{minor}, {sms} SMs)"

    def report(self):
        n, reason = self.count()
        if n == 0:
            return [{"device": "cuda", "usable": False, "detail": reason}]
        entries = []
        for i in range(n):
            ok, detail = self.availability(i)
            entries.append({"device": f"cuda:{i}", "usable": ok, "detail": detail})
        return entries

    # -- arrays -------------------------------------------------------------------------------------------------
    def xp(self):
        return cupy()

    def is_array(self, a, index):
        cp = cupy()
        return isinstance(a, cp.ndarray) and a.device.id == index

    def array_name(self, index):
        return f"cupy.ndarray on GPU {index}"

    def describe_array(self, a):
        name = super().describe_array(a)
        return f"{name} on GPU {a.device.id}" if name == "cupy.ndarray" else name

    def asarray(self, a, dtype, index):
        cp = cupy()
        with cp.cuda.Device(index):
            return cp.ascontiguousarray(cp.asarray(a, dtype=dtype))

    def to_numpy(self, a):
        return a.get()

    def pointer(self, a):
        return int(a.data.ptr)

    # -- execution ----------------------------------------------------------------------------------------------
    def activate(self, index):
        return cupy().cuda.Device(index)

    @contextlib.contextmanager
    def on_stream(self, index, stream):
        with cupy().cuda.Device(index):
            if stream is None:
                yield
            else:
                with stream:
                    yield

    def stream_handle(self, index, stream):
        if stream is None:
            with cupy().cuda.Device(index):
                stream = cupy().cuda.get_current_stream()
        return int(stream.ptr)

    def synchronize(self, index):
        cupy().cuda.Device(index).synchronize()


BACKEND = CudaBackend()
