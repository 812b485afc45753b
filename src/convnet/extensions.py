"""The compiled modules (``convnet._emu``, ``convnet._cpu``, ``convnet._cuda``), loaded on first use: a module not
built (or built but broken) is a reason, never an ImportError at import time."""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os


@functools.lru_cache(maxsize=None)
def load_extension(name: str):
    """(module, "") or (None, why it cannot be imported) for ``convnet._emu`` / ``convnet._cpu`` / ``convnet._cuda``."""
    try:
        return importlib.import_module(f"convnet.{name}"), ""
    except ImportError as exc:
        if importlib.util.find_spec(f"convnet.{name}") is not None:  # built, but broken
            return None, f"convnet.{name} is built but cannot be imported: {exc}"
        hint = ("convnet was built without nvcc (CONVNET_CUDA=AUTO found none)" if name == "_cuda"
                else "the extension was not built; run `pip install .` (or tools/dev_build.sh)")
        return None, f"convnet.{name} cannot be imported ({exc}); {hint}"


def package_dir() -> str:
    """The folder convnet was imported from."""
    return os.path.dirname(os.path.abspath(__file__))
