"""The interface every device backend implements (one module ``backend_<kind>.py`` each), and the loading of the
compiled extension modules they share."""
from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util

import numpy as np


class DeviceUnavailable(RuntimeError):
    """The requested device cannot be used on this machine; the message says why."""


@functools.lru_cache(maxsize=None)
def load_extension(name: str):
    """(module, "") or (None, why it cannot be imported) for ``convnet._emu`` / ``convnet._cuda``."""
    try:
        return importlib.import_module(f"convnet.{name}"), ""
    except ImportError as exc:
        if importlib.util.find_spec(f"convnet.{name}") is not None:  # built, but broken
            return None, f"convnet.{name} is built but cannot be imported: {exc}"
        hint = ("convnet was built without nvcc (CONVNET_CUDA=AUTO found none)" if name == "_cuda"
                else "the extension was not built; run `pip install .` (or tools/dev_build.sh)")
        return None, f"convnet.{name} cannot be imported ({exc}); {hint}"


class Backend:
    """A device kind. Methods take the device index where it matters; ``convnet.devices.Device`` delegates here."""

    kind: str = ""
    runs_reference = False      # ops run host functions with the reference's signatures (see host_module)
    synchronous = True          # results are complete when an op returns
    always_indexed = False      # print as 'kind:i' even for index 0 (cuda:0)
    dtypes = (np.dtype(np.float32),)
    extension = ""              # the compiled module holding this kind's kernels ('_emu', '_cuda'), if any

    # -- availability -----------------------------------------------------------------------------------------
    def availability(self, index: int) -> tuple[bool, str]:
        """(usable, reason when not)."""
        raise NotImplementedError

    def report(self) -> list[dict]:
        """device_report() entries for this kind."""
        raise NotImplementedError

    # -- arrays -----------------------------------------------------------------------------------------------
    def xp(self):
        raise NotImplementedError

    def is_array(self, a, index: int) -> bool:
        raise NotImplementedError

    def array_name(self, index: int) -> str:
        raise NotImplementedError

    def describe_array(self, a) -> str:
        t = type(a)
        return f"{t.__module__.split('.')[0]}.{t.__name__}"

    def asarray(self, a, dtype, index: int):
        raise NotImplementedError

    def empty(self, shape, dtype, index: int):
        """Uninitialised memory of device ``index`` (the caller made it current, on the right stream)."""
        return self.xp().empty(shape, dtype=dtype)

    def matmul(self, a, b, out=None):
        """``a @ b`` of two matrices of this kind into ``out`` (None: a new array): the fully-connected layers' GEMM."""
        return self.xp().matmul(a, b, out=out)

    def adopt(self, a, index: int):
        """``a`` (new memory of this kind) as an array of device ``index`` (see ``Device.adopt``)."""
        return a

    def to_numpy(self, a) -> np.ndarray:
        raise NotImplementedError

    def pointer(self, a) -> int:
        raise NotImplementedError

    # -- execution --------------------------------------------------------------------------------------------
    def activate(self, index: int):
        return contextlib.nullcontext()

    def on_stream(self, index: int, stream):
        return contextlib.nullcontext()

    def stream_handle(self, index: int, stream) -> int:
        return 0

    def synchronize(self, index: int) -> None:
        pass

    def runs_at_issue(self, index: int, stream) -> bool:
        """Whether work issued now on ``stream`` (None: the current one) runs at once on the host, so that the host
        may read its inputs' values without a synchronisation (on a stream, queued work may still be writing them)."""
        return self.synchronous

    def free_memory(self, index: int) -> tuple[str, int | None]:
        """(the memory device ``index``'s arrays come from, bytes free there now or None when unknown): devices
        naming the same memory share it (``convnet.memory``)."""
        return f"{self.kind}:{index} memory", None

    # -- streams and events: how the layer graph runs its placements concurrently --------------------------------
    # A stream is the backend's object (a CuPy stream, an emulated HostStream) or None: the current stream (on a host
    # device without streams, the host itself, where work is done when it is issued). The defaults below are those
    # of a synchronous device, where issue order is execution order and there is nothing to wait for.
    def new_stream(self, index: int):
        """A new stream of device ``index`` for one placement of the layer graph (None: this kind has none)."""
        return None

    def submit(self, index: int, stream, fn) -> None:
        """Run ``fn()`` -- array-module work writing arrays that already exist -- ordered on ``stream`` (None: the
        current stream). On a GPU the array module queues the work on the current stream; an emulated stream runs it
        on its worker."""
        with self.on_stream(index, stream):
            fn()

    def record_event(self, index: int, stream):
        """An event that completes when the work issued so far on ``stream`` has (None: nothing to wait for)."""
        return None

    def wait_event(self, index: int, stream, event) -> None:
        """Make the work issued from now on on ``stream`` wait for ``event`` (without blocking the host)."""

    def fork(self, index: int, stream) -> None:
        """``stream`` waits for the work issued so far on the current stream (what the host's loop issued there, and
        its wait for the batch)."""
        self.wait_event(index, stream, self.record_event(index, None))

    def join(self, index: int, stream) -> None:
        """The current stream (the host's loop: metrics, the loss) waits for the work issued so far on ``stream``."""
        self.wait_event(index, None, self.record_event(index, stream))

    def copy(self, a, src_index: int, dst_index: int, out, stream=None, src_stream=None):
        """Copy ``a`` (an array of device ``src_index`` of this kind, written on ``src_stream``) into ``out`` (an
        array of device ``dst_index``, same shape and dtype), ordered on ``stream``, the consumer's (None: the current
        ones). The implementation of :func:`convnet.ops.copy` between two devices of one kind."""
        raise NotImplementedError

    def host_module(self, reference_module):
        """The module whose functions an op runs on a host device (``runs_reference``): the NumPy reference module
        itself, or a faster module with the same functions (the ``cpu`` device)."""
        return reference_module

    def kernels(self, device):
        if not self.extension:
            raise TypeError(f"the {self.kind} device runs the NumPy reference, not compiled kernels")
        module, reason = load_extension(self.extension)
        if module is None:
            raise DeviceUnavailable(f"device {device} is not usable: {reason}")
        return module
