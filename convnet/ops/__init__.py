"""The op API: ``op(device, *arrays, **params, out=None, stream=None)``, the same on numpy, emu and cuda.

See docs/architecture.md for layouts and the list of ops. Each family lives in its own module
(``convnet/ops/<family>.py``) beside its kernel (``csrc/kernels/<family>.cu``) and its NumPy reference
(``convnet/reference/<family>.py``).
"""
from __future__ import annotations

import importlib

FAMILIES = ("elementwise", "conv", "pool", "lrn", "softmax", "fc")

__all__: list[str] = []
for _family in FAMILIES:
    try:
        _module = importlib.import_module(f"convnet.ops.{_family}")
    except ModuleNotFoundError as _exc:  # a family not written yet
        if _exc.name != f"convnet.ops.{_family}":
            raise
        continue
    for _name in _module.__all__:
        globals()[_name] = getattr(_module, _name)
    __all__ += list(_module.__all__)
