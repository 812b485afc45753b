"""Devices are values: ``numpy``, ``cpu``, ``emu``, ``cuda:0``, ``cuda:1``; one object per device, which is also its
implementation.

* ``numpy``  -- the NumPy reference implementations (``convnet.reference``): the test oracle. Arrays are
  ``numpy.ndarray``; float32 and float64.
* ``cpu``    -- the fast CPU path (``convnet.cpu``: its own GEMM around compiled host loops, ``convnet._cpu``), checked
  against the reference like the kernels: the training device without a GPU. float32.
* ``emu``    -- the project's CUDA kernels compiled for the CPU emulation of the CUDA execution model
  (``convnet._emu``). Arrays are ``numpy.ndarray`` (float32). Slow and exact: how CI proves the kernels.
* ``cuda:i`` -- the same kernels compiled by nvcc (``convnet._cuda``), on GPU ``i``. Arrays are ``cupy.ndarray``.

Each kind is a subclass of :class:`convnet.devices.device.Device` in ``convnet/devices/backend_<kind>.py`` (exported
as ``DEVICE``); ``Device("cuda", 1)`` is that subclass's one object for GPU 1. Adding a device kind is adding one such
file and its name to ``KINDS``.

Importing this module never touches a GPU; ``device_report()`` says which devices are usable here and why not.
Indices on numpy/emu (``emu:1``) name *virtual* devices, so multi-device code (the two-tower split) can be tested
without two GPUs; each accepts only its own arrays (``devices/_host.py``), so a missing copy between them fails.
"""
from __future__ import annotations

from convnet.devices._host import blas_threads, default_threads
from convnet.devices.device import KINDS, Device, DeviceUnavailable, device_class
from convnet.extensions import load_extension, package_dir


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
        if cuda.available()[0]:
            return cuda
        ok, reason = cpu.available()
        if not ok:
            raise DeviceUnavailable(f"no GPU, and the cpu device is not usable: {reason} (--device numpy runs the "
                                    f"NumPy reference)")
        return cpu
    dev = parse_device(spec)
    ok, reason = dev.available()
    if not ok:
        raise DeviceUnavailable(f"device {dev} is not usable: {reason}")
    return dev


def device_report() -> list[dict]:
    """One entry per device kind (and per GPU): {'device', 'usable', 'detail'}."""
    return [entry for kind in KINDS for entry in device_class(kind).report()]


def _require_built_package() -> None:
    module, reason = load_extension("_emu")  # always built by `pip install .`; missing = an unbuilt source tree
    if module is None:
        raise DeviceUnavailable(
            f"convnet was imported from {package_dir()}, which has no compiled kernels ({reason}). This is an "
            f"unbuilt source tree: install the package (`pip install .`, then run from anywhere but its src/ folder) "
            f"or build in place for development (`pip install -e .` or `tools/dev_build.sh` with PYTHONPATH=src), "
            f"or name a device explicitly (--device numpy).")


__all__ = ["Device", "DeviceUnavailable", "KINDS", "blas_threads", "default_threads", "device_class", "device_report",
           "get_device", "parse_device", "parse_device_list"]
