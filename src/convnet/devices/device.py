"""A device: one object per (kind, index) that both names the device and implements it. Each kind is a subclass in
``backend_<kind>.py``; what a device provides is documented here, on the base class."""
from __future__ import annotations

import contextlib
import importlib
import threading

import numpy as np

from convnet.extensions import load_extension

# The device kinds, in the order reports list them; kind K is the Device subclass in convnet/devices/backend_K.py.
KINDS = ("numpy", "cpu", "emu", "cuda")


class DeviceUnavailable(RuntimeError):
    """The requested device cannot be used on this machine; the message says why."""


class Device:
    """A device value: a kind (``numpy``, ``cpu``, ``emu``, ``cuda``) and an index. ``Device("cuda", 1)`` is always the
    same object, an instance of its kind's subclass, so it compares and hashes by (kind, index), prints as
    ``cuda:1`` and pickles as its name. Ops and layers call its methods and never test the kind.

    A subclass overrides what its kind does differently; the defaults are those of a synchronous device without
    streams. Methods never touch a GPU at construction: ``available()`` says whether the device can be used."""

    kind: str = ""
    runs_reference = False      # ops run host functions with the reference's signatures (see host_function)
    gemm_epilogue = False       # its host GEMM adds a bias and applies a ReLU as it stores (conv/fc forward)
    synchronous = True          # results are complete when an op returns
    always_indexed = False      # print as 'kind:i' even for index 0 (cuda:0)
    dtypes = (np.dtype(np.float32),)  # the float dtypes ops accept: float32 for the kernels
    extension = ""              # the compiled module holding this kind's kernels ('_emu', '_cuda'), if any

    _made: dict = {}            # (kind, index) -> its one Device
    _making = threading.Lock()

    def __new__(cls, kind: str, index: int = 0):
        if not isinstance(index, (int, np.integer)) or index < 0:
            raise ValueError(f"device index must be a non-negative integer, got {index!r}")
        key = (kind, int(index))
        device = Device._made.get(key)
        if device is None:
            kind_class = device_class(kind)
            with Device._making:
                device = Device._made.get(key)
                if device is None:
                    device = object.__new__(kind_class)
                    object.__setattr__(device, "index", int(index))
                    device._setup()
                    Device._made[key] = device
        return device

    def _setup(self) -> None:
        """Per-device state, made once when the device's object is."""

    def __setattr__(self, name, value):
        raise AttributeError(f"a Device is a value: {name!r} cannot be set")

    def __reduce__(self):
        return Device, (self.kind, self.index)

    def __str__(self) -> str:
        return f"{self.kind}:{self.index}" if self.always_indexed or self.index else self.kind

    def __repr__(self) -> str:
        return f"Device('{self}')"

    # -- availability -----------------------------------------------------------------------------------------------
    def available(self) -> tuple[bool, str]:
        """(usable here, why not / what it is)."""
        raise NotImplementedError

    @classmethod
    def report(cls) -> list[dict]:
        """device_report() entries for this kind: {'device', 'usable', 'detail'}."""
        raise NotImplementedError

    # -- what the device is -----------------------------------------------------------------------------------------
    def host_function(self, reference_function):
        """The function a host device's ops run (``runs_reference``) for a NumPy reference function
        (``convnet.reference.conv.conv_forward``, ...): that function itself, or the cpu device's faster one."""
        return reference_function

    # -- precision --------------------------------------------------------------------------------------------------
    # The precisions of the conv and fc multiplications (convnet.reference.precision.PRECISIONS) this device runs, and
    # the one a run uses when none is asked for. A host device runs tf32 by rounding (the emulator's tensor-core
    # kernels, the reference on rounded inputs), so tests check it everywhere; its default stays fp32 (no speed to
    # gain). bf16 likewise (bfloat16 storage through ml_dtypes, the rounded reference or the emulated kernels).
    tensor_cores = False        # TF32/BF16 tensor-core units (a GPU of compute capability 8.0 or newer)
    precisions = ("fp32", "tf32", "bf16")

    @property
    def default_precision(self) -> str:
        """tf32 on a GPU with tensor cores, fp32 elsewhere."""
        return "tf32" if self.tensor_cores else "fp32"

    # -- arrays -----------------------------------------------------------------------------------------------------
    @property
    def xp(self):
        """The array module: numpy, or cupy for cuda."""
        raise NotImplementedError

    def is_array(self, a) -> bool:
        """Whether ``a`` is an array of this device (on a GPU: of this GPU)."""
        raise NotImplementedError

    @property
    def array_name(self) -> str:
        """What this device's arrays are, for error messages: 'numpy.ndarray', 'cupy.ndarray on GPU 1'."""
        raise NotImplementedError

    def describe_array(self, a) -> str:
        """Where an array lives, for error messages: 'numpy.ndarray', 'cupy.ndarray on GPU 1', 'list', ..."""
        t = type(a)
        return f"{t.__module__.split('.')[0]}.{t.__name__}"

    def asarray(self, a, dtype=None):
        """Copy host or device data onto this device (no copy when it is already there with that dtype)."""
        raise NotImplementedError

    def to_numpy(self, a) -> np.ndarray:
        raise NotImplementedError

    def _allocate(self, shape, dtype):
        """Uninitialised memory of this device (the caller made it current, on the right stream)."""
        return self.xp.empty(shape, dtype=dtype)

    def empty(self, shape, dtype=np.float32, stream=None):
        """An uninitialised array; on a GPU allocated on ``stream`` (None: the current stream)."""
        with self.on_stream(stream):
            return self.adopt(self._allocate(shape, dtype))

    def zeros(self, shape, dtype=np.float32, stream=None):
        with self.on_stream(stream):
            return self.adopt(self.xp.zeros(shape, dtype=dtype))

    def matmul(self, a, b, out=None, precision="fp32"):
        """``a @ b`` of two of this device's matrices into ``out`` (None: a new array), on the current stream: BLAS
        on numpy and emu, cuBLAS on cuda, the fast CPU path's GEMM on cpu. ``precision="tf32"``: the caller rounded
        ``a`` and ``b`` to TF32 (their products are exact in FP32), so a device with TF32 units may use them (cuBLAS's
        TF32 compute type on cuda); the host's FP32 GEMM computes the same products."""
        return self.xp.matmul(a, b, out=out)

    def adopt(self, a):
        """``a``, an array just computed with ``xp`` from this device's arrays (``a + b``, a concatenation), as an
        array of this device: a virtual host device (``emu:1``) tags its memory, a TypeError if it is another
        device's; elsewhere ``a`` as it is (CuPy allocates on the current device)."""
        return a

    def pointer(self, a) -> int:
        """Address of an array's first element, as the pointer-based bindings take it."""
        raise NotImplementedError

    # -- execution --------------------------------------------------------------------------------------------------
    def activate(self):
        """Context manager making this device current (CuPy allocations and kernel launches go to it)."""
        return contextlib.nullcontext()

    def on_stream(self, stream=None):
        """Context manager: this device current and ``stream`` (None: leave the current one) current, so that
        allocations from the memory pool and array-module calls are ordered on it."""
        return contextlib.nullcontext()

    def stream_handle(self, stream=None) -> int:
        """cudaStream_t of a CuPy stream (None: CuPy's current stream on this device); 0 off the GPU."""
        return 0

    def synchronize(self) -> None:
        pass

    def runs_at_issue(self, stream=None) -> bool:
        """Whether an op issued now on ``stream`` (None: the current one) runs at once on the host, so its inputs'
        values may be read there for a check (False on a GPU and on an emulated stream, where queued work may still be
        writing them)."""
        return self.synchronous

    def free_memory(self) -> tuple[str, int | None]:
        """(where this device's arrays live: "host memory", "GPU 1"; the bytes free there now, or None if unknown):
        devices naming the same memory share it (``convnet.memory``)."""
        return f"{self.kind}:{self.index} memory", None

    # -- streams and events: how the layer graph runs its placements concurrently ----------------------------------
    # A stream is the kind's object (a CuPy stream, an emulated HostStream) or None: the current stream (on a host
    # device without streams, the host itself, where work is done when it is issued).
    def new_stream(self):
        """A new stream of this device: a CuPy stream on cuda, an emulated one on emu (work on it runs on a worker
        thread, asynchronously), None on numpy and cpu (work runs on the host when it is issued)."""
        return None

    def submit(self, fn, stream=None) -> None:
        """Run ``fn()`` (array-module work that writes arrays already allocated) ordered on ``stream`` (None: the
        current stream). On a GPU the array module queues the work on the current stream; an emulated stream runs it
        on its worker."""
        with self.on_stream(stream):
            fn()

    def record_event(self, stream=None):
        """An event completing when the work issued so far on ``stream`` has (None where nothing is pending)."""
        return None

    def wait_event(self, event, stream=None) -> None:
        """Work issued from now on on ``stream`` waits for ``event`` (on the device: the host goes on)."""

    def fork(self, stream) -> None:
        """``stream`` waits for the work issued so far on the current stream (what the host's loop issued there, and
        its wait for the batch)."""
        self.wait_event(self.record_event(None), stream)

    def join(self, stream) -> None:
        """The current stream (the host's loop: metrics, the loss) waits for the work issued so far on ``stream``."""
        self.wait_event(self.record_event(stream), None)

    def copy(self, a, src: "Device", out, stream=None, src_stream=None):
        """Copy ``a`` (an array of ``src``, a device of this kind, written on ``src_stream``) into ``out`` (this
        device's array, same shape and dtype), ordered on ``stream``, the consumer's (None: the current ones). The
        implementation of :func:`convnet.ops.copy` between two devices of one kind."""
        raise NotImplementedError

    # -- kernels ----------------------------------------------------------------------------------------------------
    @property
    def kernels(self):
        """The extension module holding the compiled kernels (``convnet._emu`` or ``convnet._cuda``)."""
        if not self.extension:
            raise TypeError(f"the {self.kind} device runs the NumPy reference, not compiled kernels")
        module, reason = load_extension(self.extension)
        if module is None:
            raise DeviceUnavailable(f"device {self} is not usable: {reason}")
        return module


def device_class(kind: str) -> type:
    """The Device subclass of a kind (its module imported on first use)."""
    if kind not in KINDS:
        raise ValueError(f"unknown device kind {kind!r}; expected one of {', '.join(KINDS)}")
    return importlib.import_module(f"convnet.devices.backend_{kind}").DEVICE
