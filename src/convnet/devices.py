"""Devices are values: ``numpy``, ``emu``, ``cuda:0``, ``cuda:1``.

* ``numpy`` -- the NumPy reference implementations (``convnet.reference``): the test oracle and the CPU
  training fallback. Arrays are ``numpy.ndarray``; float32 and float64.
* ``emu``   -- the project's CUDA kernels compiled for the CPU emulation of the CUDA execution model
  (``convnet._emu``). Arrays are ``numpy.ndarray`` (float32). Slow and exact: how CI proves the kernels.
* ``cuda:i`` -- the same kernels compiled by nvcc (``convnet._cuda``), on GPU ``i``. Arrays are ``cupy.ndarray``.

Importing this module never touches a GPU; ``device_report()`` says which devices are usable here and why not.
Indices on numpy/emu (``emu:1``) name *virtual* devices, so multi-device code (the two-tower split) can be
tested without two GPUs.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
from dataclasses import dataclass

import numpy as np

KINDS = ("numpy", "emu", "cuda")


class DeviceUnavailable(RuntimeError):
    """The requested device cannot be used on this machine; the message says why."""


@dataclass(frozen=True)
class Device:
    kind: str
    index: int = 0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown device kind {self.kind!r}; expected one of {', '.join(KINDS)}")
        if not isinstance(self.index, (int, np.integer)) or self.index < 0:
            raise ValueError(f"device index must be a non-negative integer, got {self.index!r}")

    def __str__(self) -> str:
        return f"{self.kind}:{self.index}" if self.kind == "cuda" or self.index else self.kind

    def __repr__(self) -> str:
        return f"Device('{self}')"

    # -- arrays -------------------------------------------------------------------------------------------
    @property
    def xp(self):
        """The array module: numpy, or cupy for cuda."""
        return _cupy() if self.kind == "cuda" else np

    @property
    def array_type(self):
        return self.xp.ndarray

    def is_array(self, a) -> bool:
        if self.kind != "cuda":
            return isinstance(a, np.ndarray)
        cp = _cupy()
        return isinstance(a, cp.ndarray) and a.device.id == self.index

    def asarray(self, a, dtype=None):
        """Copy host or device data onto this device (no copy when it is already there with that dtype)."""
        if self.kind == "cuda":
            cp = _cupy()
            with self.activate():
                return cp.ascontiguousarray(cp.asarray(a, dtype=dtype))
        if not isinstance(a, np.ndarray) and hasattr(a, "get"):  # a cupy array coming back to the host
            a = a.get()
        return np.ascontiguousarray(a, dtype=dtype)

    def to_numpy(self, a) -> np.ndarray:
        return a.get() if self.kind == "cuda" else np.asarray(a)

    def empty(self, shape, dtype=np.float32):
        with self.activate():
            return self.xp.empty(shape, dtype=dtype)

    def zeros(self, shape, dtype=np.float32):
        with self.activate():
            return self.xp.zeros(shape, dtype=dtype)

    def synchronize(self) -> None:
        if self.kind == "cuda":
            with self.activate():
                _cupy().cuda.Device(self.index).synchronize()

    def activate(self):
        """Context manager making this device current (CuPy allocations and kernel launches go to it)."""
        if self.kind == "cuda":
            return _cupy().cuda.Device(self.index)
        return contextlib.nullcontext()

    # -- kernels ------------------------------------------------------------------------------------------
    @property
    def kernels(self):
        """The extension module holding the compiled kernels (``convnet._emu`` or ``convnet._cuda``)."""
        if self.kind == "numpy":
            raise TypeError("the numpy device runs the NumPy reference, not compiled kernels")
        module, reason = _load_extension("_emu" if self.kind == "emu" else "_cuda")
        if module is None:
            raise DeviceUnavailable(f"device {self} is not usable: {reason}")
        return module

    def pointer(self, a) -> int:
        """Address of an array's first element, as the pointer-based bindings take it."""
        if self.kind == "cuda":
            return int(a.data.ptr)
        return int(a.ctypes.data)

    def stream_handle(self, stream=None) -> int:
        """cudaStream_t of a CuPy stream (None: CuPy's current stream on this device); 0 off the GPU."""
        if self.kind != "cuda":
            return 0
        if stream is None:
            with self.activate():
                stream = _cupy().cuda.get_current_stream()
        return int(stream.ptr)


def get_device(spec: "str | Device | None" = None) -> Device:
    """Parse ``"numpy"``, ``"emu"``, ``"cuda"``, ``"cuda:1"`` (or pass a Device through).

    None picks the best usable device: ``cuda:0`` if a GPU works, else ``numpy``. Asking for a device that is
    not usable raises :class:`DeviceUnavailable` with the reason.
    """
    if spec is None:
        ok, _ = _cuda_status(0)
        return Device("cuda", 0) if ok else Device("numpy")
    if isinstance(spec, Device):
        dev = spec
    elif isinstance(spec, str):
        kind, _, index = spec.strip().lower().partition(":")
        if kind not in KINDS:
            raise ValueError(f"unknown device {spec!r}; expected numpy, emu, cuda or cuda:N")
        try:
            dev = Device(kind, int(index) if index else 0)
        except ValueError as exc:
            raise ValueError(f"bad device {spec!r}: {exc}") from None
    else:
        raise TypeError(f"device must be a string like 'cuda:0' or a Device, got {type(spec).__name__}")
    if dev.kind == "cuda":
        ok, reason = _cuda_status(dev.index)
        if not ok:
            raise DeviceUnavailable(f"device {dev} is not usable: {reason}")
    elif dev.kind == "emu":
        module, reason = _load_extension("_emu")
        if module is None:
            raise DeviceUnavailable(f"device emu is not usable: {reason}")
    return dev


def device_report() -> list[dict]:
    """One entry per device kind (and per GPU): {'device', 'usable', 'detail'}."""
    report = [{"device": "numpy", "usable": True, "detail": f"NumPy {np.__version__} reference"}]
    emu, reason = _load_extension("_emu")
    report.append({"device": "emu", "usable": emu is not None,
                   "detail": "CUDA kernels on the CPU emulator" if emu is not None else reason})
    count, reason = _cuda_count()
    if count == 0:
        report.append({"device": "cuda", "usable": False, "detail": reason})
    for i in range(count):
        ok, detail = _cuda_status(i)
        report.append({"device": f"cuda:{i}", "usable": ok, "detail": detail})
    return report


# -- probing (cached: done once per process) ------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _load_extension(name: str):
    try:
        return importlib.import_module(f"convnet.{name}"), ""
    except ImportError as exc:
        hint = ("convnet was built without nvcc (CONVNET_CUDA=AUTO found none)" if name == "_cuda"
                else "the extension was not built; run `pip install .` (or tools/dev_build.sh)")
        return None, f"convnet.{name} cannot be imported ({exc}); {hint}"


def _cupy():
    try:
        import cupy
    except ImportError as exc:
        raise DeviceUnavailable(f"CuPy is not installed ({exc}); `pip install .[cuda]`") from None
    return cupy


@functools.lru_cache(maxsize=None)
def _cuda_count():
    module, reason = _load_extension("_cuda")
    if module is None:
        return 0, reason
    count, message = module.device_count()
    if count == 0:
        return 0, f"no usable GPU: the CUDA runtime says {message or 'there are 0 devices'}"
    try:
        import cupy  # noqa: F401
    except ImportError as exc:
        return 0, f"{count} GPU(s) present but CuPy is not installed ({exc}); `pip install .[cuda]`"
    return count, ""


@functools.lru_cache(maxsize=None)
def _cuda_status(index: int):
    count, reason = _cuda_count()
    if count == 0:
        return False, reason
    if index >= count:
        return False, f"only {count} GPU(s) present"
    module, _ = _load_extension("_cuda")
    try:
        name, major, minor, sms = module.device_name(index)
    except RuntimeError as exc:
        return False, str(exc)
    if major < 8:
        return False, f"{name} is sm_{major}{minor}; convnet._cuda is built for sm_80 and newer"
    return True, f"{name} (sm_{major}{minor}, {sms} SMs)"
