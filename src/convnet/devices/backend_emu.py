"""The ``emu`` device: the CUDA kernels compiled by g++ against the CPU emulation of CUDA (``convnet._emu``)."""
from __future__ import annotations

import weakref

from convnet.devices._host import HostDevice
from convnet.extensions import load_extension


class EmuDevice(HostDevice):
    kind = "emu"
    extension = "_emu"
    streams = weakref.WeakSet()

    def available(self):
        module, reason = load_extension(self.extension)
        return module is not None, reason

    @classmethod
    def report(cls):
        ok, reason = cls(cls.kind).available()
        return [{"device": "emu", "usable": ok, "detail": "CUDA kernels on the CPU emulator" if ok else reason}]


DEVICE = EmuDevice
