"""The ``numpy`` device: ops run the NumPy references (``convnet.reference``) in float32 or float64."""
from __future__ import annotations

import numpy as np

from convnet.devices._host import HostDevice


class NumpyDevice(HostDevice):
    kind = "numpy"
    runs_reference = True
    dtypes = (np.dtype(np.float32), np.dtype(np.float64))

    def available(self):
        return True, ""

    @classmethod
    def report(cls):
        return [{"device": "numpy", "usable": True, "detail": f"NumPy {np.__version__} reference"}]


DEVICE = NumpyDevice
