"""The ``cuda:i`` devices: the kernels compiled by nvcc (``convnet._cuda``) on GPU i; arrays are CuPy arrays."""
from __future__ import annotations

import contextlib
import functools

from convnet.devices.backend import Backend, DeviceUnavailable, load_extension


def cupy():
    try:
        import cupy
    except ImportError as exc:
        raise DeviceUnavailable(f"CuPy is not installed ({exc}); `pip install .[cuda]`") from None
    return cupy


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
            import cupy  # noqa: F401
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
