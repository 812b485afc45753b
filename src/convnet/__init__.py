"""convnet: AlexNet and cuda-convnet reproduced from scratch.

Hand-written CUDA kernels (``csrc/``), run on a GPU (``cuda``), on a CPU emulation of the CUDA execution model
(``emu``), or replaced by their NumPy references (``numpy``); a layer graph and SGD loop on top
(``python -m convnet.train``). Importing convnet never needs a GPU.
"""
import os

from convnet.devices import Device, DeviceUnavailable, device_report, get_device
from convnet.extensions import load_extension, package_dir

__version__ = "0.1.0"


def install_report() -> str:
    """Where convnet was imported from and which compiled modules it has, in one line."""
    parts = []
    for name in ("_emu", "_cpu", "_cuda"):
        module, _ = load_extension(name)
        parts.append(f"{name} {os.path.basename(module.__file__)}" if module is not None else f"{name} not built")
    return f"convnet {__version__} from {package_dir()} (compiled: {', '.join(parts)})"


def __getattr__(name):
    # Error types live in the extension modules; expose them without importing the extensions eagerly.
    if name == "EmulatorError":
        module, reason = load_extension("_emu")
        if module is None:
            raise AttributeError(f"convnet.EmulatorError needs convnet._emu: {reason}")
        return module.EmulatorError
    raise AttributeError(f"module 'convnet' has no attribute {name!r}")


__all__ = ["Device", "DeviceUnavailable", "device_report", "get_device", "install_report", "__version__"]
