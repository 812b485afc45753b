"""Devices are values: ``numpy``, ``cpu``, ``emu``, ``cuda:0``, ``cuda:1``; each kind is a backend found by name.

* ``numpy``  -- the NumPy reference implementations (``convnet.reference``): the test oracle. Arrays are
  ``numpy.ndarray``; float32 and float64.
* ``cpu``    -- the fast CPU path (``convnet.cpu``: BLAS GEMMs around compiled host loops, ``convnet._cpu``), checked
  against the reference like the kernels: the training device without a GPU. float32.
* ``emu``    -- the project's CUDA kernels compiled for the CPU emulation of the CUDA execution model
  (``convnet._emu``). Arrays are ``numpy.ndarray`` (float32). Slow and exact: how CI proves the kernels.
* ``cuda:i`` -- the same kernels compiled by nvcc (``convnet._cuda``), on GPU ``i``. Arrays are ``cupy.ndarray``.

A backend is one module ``convnet/devices/backend_<kind>.py`` defining ``BACKEND``, an instance of
:class:`convnet.devices.backend.Backend` (the interface: array module, allocation, pointers, streams, activation,
kernels module, availability). Adding a device kind is adding one such file and its name to ``KINDS``.

Importing this module never touches a GPU; ``device_report()`` says which devices are usable here and why not.
Indices on numpy/emu (``emu:1``) name *virtual* devices, so multi-device code (the two-tower split) can be tested
without two GPUs; each accepts only its own arrays (``devices/_host.py``), so a missing copy between them fails.
"""
from __future__ import annotations

import functools
import importlib
import os
from dataclasses import dataclass

import numpy as np

from convnet.devices._host import blas_threads, default_threads
from convnet.devices.backend import Backend, DeviceUnavailable, load_extension

# The device kinds, in the order reports list them; kind K is implemented by convnet/devices/backend_K.py.
KINDS = ("numpy", "cpu", "emu", "cuda")


@functools.lru_cache(maxsize=None)
def backend(kind: str) -> Backend:
    """The backend of a device kind (imported on first use)."""
    if kind not in KINDS:
        raise ValueError(f"unknown device kind {kind!r}; expected one of {', '.join(KINDS)}")
    return importlib.import_module(f"convnet.devices.backend_{kind}").BACKEND


@dataclass(frozen=True)
class Device:
    """A device value: a kind (``numpy``, ``emu``, ``cuda``) and an index. Every operation delegates to the kind's
    backend; ops and layers never test the kind."""

    kind: str
    index: int = 0

    def __post_init__(self):
        backend(self.kind)  # validates the kind
        if not isinstance(self.index, (int, np.integer)) or self.index < 0:
            raise ValueError(f"device index must be a non-negative integer, got {self.index!r}")

    def __str__(self) -> str:
        return f"{self.kind}:{self.index}" if self.backend.always_indexed or self.index else self.kind

    def __repr__(self) -> str:
        return f"Device('{self}')"

    @property
    def backend(self) -> Backend:
        return backend(self.kind)

    # -- what the device is ---------------------------------------------------------------------------------------
    @property
    def runs_reference(self) -> bool:
        """True when ops run the NumPy reference (``convnet.reference``) instead of compiled kernels."""
        return self.backend.runs_reference

    def host(self, reference_module):
        """The functions a host device's ops run for the NumPy reference module ``reference_module``
        (``convnet.reference.conv``, ...): the module itself on numpy, the fast CPU versions on cpu."""
        return self.backend.host_module(reference_module)

    @property
    def synchronous(self) -> bool:
        """True when an op's results are complete when it returns (host devices); False on a GPU, where reading a
        result on the host waits for the device, so loops should synchronise rarely."""
        return self.backend.synchronous

    @property
    def dtypes(self) -> tuple:
        """The float dtypes ops accept here: float32 for the kernels; the reference also does float64."""
        return self.backend.dtypes

    # -- arrays -----------------------------------------------------------------------------------------------------
    @property
    def xp(self):
        """The array module: numpy, or cupy for cuda."""
        return self.backend.xp()

    def is_array(self, a) -> bool:
        """Whether ``a`` is an array of this device (on a GPU: of this GPU)."""
        return self.backend.is_array(a, self.index)

    @property
    def array_name(self) -> str:
        """What this device's arrays are, for error messages: 'numpy.ndarray', 'cupy.ndarray on GPU 1'."""
        return self.backend.array_name(self.index)

    def describe_array(self, a) -> str:
        """Where an array lives, for error messages: 'numpy.ndarray', 'cupy.ndarray on GPU 1', 'list', ..."""
        return self.backend.describe_array(a)

    def asarray(self, a, dtype=None):
        """Copy host or device data onto this device (no copy when it is already there with that dtype)."""
        return self.backend.asarray(a, dtype, self.index)

    def to_numpy(self, a) -> np.ndarray:
        return self.backend.to_numpy(a)

    def empty(self, shape, dtype=np.float32, stream=None):
        """An uninitialised array; on a GPU allocated on ``stream`` (None: the current stream)."""
        with self.on_stream(stream):
            return self.backend.adopt(self.backend.empty(shape, dtype, self.index), self.index)

    def zeros(self, shape, dtype=np.float32, stream=None):
        with self.on_stream(stream):
            return self.backend.adopt(self.xp.zeros(shape, dtype=dtype), self.index)

    def matmul(self, a, b, out=None):
        """``a @ b`` of two of this device's matrices into ``out`` (None: a new array), on the current stream: BLAS
        on numpy and emu, cuBLAS on cuda, the fast CPU path's GEMM on cpu."""
        return self.backend.matmul(a, b, out)

    def adopt(self, a):
        """``a``, an array just computed with ``xp`` from this device's arrays (``a + b``, a concatenation), as an
        array of this device: a virtual host device (``emu:1``) tags its memory, a TypeError if it is another
        device's; elsewhere ``a`` as it is (CuPy allocates on the current device)."""
        return self.backend.adopt(a, self.index)

    def synchronize(self) -> None:
        self.backend.synchronize(self.index)

    def runs_at_issue(self, stream=None) -> bool:
        """Whether an op issued now on ``stream`` (None: the current one) runs at once on the host, so its inputs'
        values may be read there for a check (False on a GPU and on an emulated stream, where queued work may still be
        writing them)."""
        return self.backend.runs_at_issue(self.index, stream)

    def free_memory(self) -> tuple:
        """(where this device's arrays live: "host memory", "GPU 1"; the bytes free there now, or None if unknown)."""
        return self.backend.free_memory(self.index)

    def activate(self):
        """Context manager making this device current (CuPy allocations and kernel launches go to it)."""
        return self.backend.activate(self.index)

    def on_stream(self, stream=None):
        """Context manager: this device current and, on a GPU, ``stream`` (a CuPy stream; None: leave the current
        one) current, so that allocations from the memory pool and array-module calls are ordered on it."""
        return self.backend.on_stream(self.index, stream)

    # -- kernels ----------------------------------------------------------------------------------------------------
    @property
    def kernels(self):
        """The extension module holding the compiled kernels (``convnet._emu`` or ``convnet._cuda``)."""
        return self.backend.kernels(self)

    def pointer(self, a) -> int:
        """Address of an array's first element, as the pointer-based bindings take it."""
        return self.backend.pointer(a)

    def stream_handle(self, stream=None) -> int:
        """cudaStream_t of a CuPy stream (None: CuPy's current stream on this device); 0 off the GPU."""
        return self.backend.stream_handle(self.index, stream)

    # -- streams and events (the layer graph's placements run concurrently, ordered by events) ---------------------
    def new_stream(self):
        """A new stream of this device: a CuPy stream on cuda, an emulated one on emu (work on it runs on a worker
        thread, asynchronously), None on numpy and cpu (work runs on the host when it is issued)."""
        return self.backend.new_stream(self.index)

    def submit(self, fn, stream=None) -> None:
        """Run ``fn()`` (array-module work that writes arrays already allocated) ordered on ``stream`` (None: the
        current stream)."""
        self.backend.submit(self.index, stream, fn)

    def record_event(self, stream=None):
        """An event completing when the work issued so far on ``stream`` has (None where nothing is pending)."""
        return self.backend.record_event(self.index, stream)

    def wait_event(self, event, stream=None) -> None:
        """Work issued from now on on ``stream`` waits for ``event`` (on the device: the host goes on)."""
        self.backend.wait_event(self.index, stream, event)

    def fork(self, stream) -> None:
        """``stream`` waits for the work issued so far on the current stream (where the host's loop works)."""
        self.backend.fork(self.index, stream)

    def join(self, stream) -> None:
        """The current stream waits for the work issued so far on ``stream`` (on emu: the host waits)."""
        self.backend.join(self.index, stream)


def parse_device(spec: "str | Device") -> Device:
    """``"numpy"``, ``"emu:1"``, ``"cuda:1"`` (or a Device) as a Device value, without asking whether it is usable here
    (for shape-only nets and summaries); ValueError / TypeError for a malformed name."""
    if isinstance(spec, Device):
        return spec
    if isinstance(spec, str):
        kind, _, index = spec.strip().lower().partition(":")
        if kind not in KINDS:
            raise ValueError(f"unknown device {spec!r}; expected numpy, cpu, emu, cuda or cuda:N")
        try:
            return Device(kind, int(index) if index else 0)
        except ValueError as exc:
            raise ValueError(f"bad device {spec!r}: {exc}") from None
    raise TypeError(f"device must be a string like 'cuda:0' or a Device, got {type(spec).__name__}")


def parse_device_list(spec) -> tuple:
    """``"cuda:0,cuda:1"`` (or a sequence of names / Devices) -> a tuple of Devices, not checked for usability: the
    devices of a model's towers (``--devices``). ValueError for an empty list or a malformed name."""
    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    if not items or any(isinstance(s, str) and not s for s in items):
        raise ValueError(f"must be comma-separated device names like cuda:0,cuda:1 or emu:0,emu:1, got {spec!r}")
    return tuple(parse_device(s) for s in items)


def get_device(spec: "str | Device | None" = None) -> Device:
    """Parse ``"numpy"``, ``"emu"``, ``"cuda"``, ``"cuda:1"`` (or pass a Device through).

    None picks the best usable device: ``cuda:0`` if a GPU works, else ``cpu``. Asking for a device that is not
    usable raises :class:`DeviceUnavailable` with the reason. A convnet without its compiled modules (an unbuilt
    source tree on ``sys.path``) is never used silently: choosing the best device then raises and says how to fix it.
    """
    if spec is None:
        _require_built_package()
        cuda, cpu = Device("cuda", 0), Device("cpu")
        if cuda.backend.availability(0)[0]:
            return cuda
        ok, reason = cpu.backend.availability(0)
        if not ok:
            raise DeviceUnavailable(f"no GPU, and the cpu device is not usable: {reason} (--device numpy runs the "
                                    f"NumPy reference)")
        return cpu
    dev = parse_device(spec)
    ok, reason = dev.backend.availability(dev.index)
    if not ok:
        raise DeviceUnavailable(f"device {dev} is not usable: {reason}")
    return dev


def device_report() -> list[dict]:
    """One entry per device kind (and per GPU): {'device', 'usable', 'detail'}."""
    return [entry for kind in KINDS for entry in backend(kind).report()]


def package_dir() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def install_report() -> str:
    """Where convnet was imported from and which compiled modules it has, in one line."""
    import convnet

    parts = []
    for name in ("_emu", "_cpu", "_cuda"):
        module, reason = load_extension(name)
        parts.append(f"{name} {os.path.basename(module.__file__)}" if module is not None else f"{name} not built")
    return f"convnet {convnet.__version__} from {package_dir()} (compiled: {', '.join(parts)})"


def _require_built_package() -> None:
    module, reason = load_extension("_emu")  # always built by `pip install .`; missing = an unbuilt source tree
    if module is None:
        raise DeviceUnavailable(
            f"convnet was imported from {package_dir()}, which has no compiled kernels ({reason}). This is an "
            f"unbuilt source tree: install the package (`pip install .`, then run from anywhere but its src/ folder) "
            f"or build in place for development (`pip install -e .` or `tools/dev_build.sh` with PYTHONPATH=src), "
            f"or name a device explicitly (--device numpy).")


__all__ = ["Backend", "Device", "DeviceUnavailable", "KINDS", "backend", "blas_threads", "default_threads",
           "device_report", "get_device", "install_report", "parse_device", "parse_device_list"]
