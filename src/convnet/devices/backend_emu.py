"""The ``emu`` device: the CUDA kernels compiled by g++ against the CPU emulation of CUDA (``convnet._emu``)."""
from __future__ import annotations

from convnet.devices._host import HostBackend
from convnet.devices.backend import load_extension


class EmuBackend(HostBackend):
    kind = "emu"
    extension = "_emu"
    emulates_streams = True

    def availability(self, index):
        module, reason = load_extension(self.extension)
        return module is not None, reason

    def report(self):
        ok, reason = self.availability(0)
        return [{"device": "emu", "usable": ok, "detail": "CUDA kernels on the CPU emulator" if ok else reason}]


BACKEND = EmuBackend()
