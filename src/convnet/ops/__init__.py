"""The op API: ``op(device, *arrays, **params, out=None, stream=None)``, the same on numpy, emu and cuda.

See docs/architecture.md for layouts and the list of ops. Each family lives in its own module
(``convnet/ops/<family>.py``) beside its kernel (``csrc/kernels/<family>.cu``) and its NumPy reference
(``convnet/reference/<family>.py``).
"""
from convnet.ops import conv, elementwise, fc, lrn, pool, sgd, softmax, tensor, transfer
from convnet.ops.conv import *  # noqa: F401,F403
from convnet.ops.elementwise import *  # noqa: F401,F403
from convnet.ops.fc import *  # noqa: F401,F403
from convnet.ops.lrn import *  # noqa: F401,F403
from convnet.ops.pool import *  # noqa: F401,F403
from convnet.ops.sgd import *  # noqa: F401,F403
from convnet.ops.softmax import *  # noqa: F401,F403
from convnet.ops.tensor import *  # noqa: F401,F403
from convnet.ops.transfer import *  # noqa: F401,F403

FAMILIES = (elementwise, conv, pool, lrn, softmax, fc, tensor, transfer, sgd)
__all__ = [name for family in FAMILIES for name in family.__all__]
