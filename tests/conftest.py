import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # `import helpers` from any test folder

from helpers import ALL_DEVICES, KERNEL_DEVICES  # noqa: E402


@pytest.fixture(params=KERNEL_DEVICES)
def kernel_device(request):
    """Each device that runs the compiled kernels: emu always, cuda:0 when a GPU works (else skipped)."""
    return request.param


@pytest.fixture(params=ALL_DEVICES)
def any_device(request):
    """numpy (the reference) and each kernel device."""
    return request.param
