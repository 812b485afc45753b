"""convnet: AlexNet and cuda-convnet reproduced from scratch.

Hand-written CUDA kernels (``csrc/``), run on a GPU (``cuda``), on a CPU emulation of the CUDA execution model
(``emu``), or replaced by their NumPy references (``numpy``); a layer graph and SGD loop on top
(``python -m convnet.train``). Importing convnet never needs a GPU.
"""
from convnet.devices import Device, DeviceUnavailable, device_report, get_device

__version__ = "0.1.0"


def __getattr__(name):
    # Error types live in the extension modules; expose them without importing the extensions eagerly.
    if name == "EmulatorError":
        from convnet.devices.backend import load_extension

        module, reason = load_extension("_emu")
        if module is None:
            raise AttributeError(f"convnet.EmulatorError needs convnet._emu: {reason}")
        return module.EmulatorError
    raise AttributeError(f"module 'convnet' has no attribute {name!r}")


__all__ = ["Device", "DeviceUnavailable", "device_report", "get_device", "__version__"]
