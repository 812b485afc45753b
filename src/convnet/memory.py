"""What a net needs in memory, from its shapes alone, against what its devices have free: a run refuses a net that
cannot fit before it allocates anything (an fc layer of 10^9 outputs would otherwise be allocated until the
allocator fails, minutes later, with a traceback or the kernel's OOM killer).

The need is a lower bound of one training step: every parameter three times (weights, gradients, SGD momentum) and
every layer's output for the batch (all alive at the end of the forward pass). Devices that share memory (the host
kinds numpy, cpu, emu and their virtual indices) are summed against one pool (``Device.free_memory``).
"""
from __future__ import annotations

import math

from .config import ConfigError

__all__ = ["training_bytes", "check_fits"]

GIB = 1 << 30  # bytes


def training_bytes(net, images: int) -> dict:
    """{device: [parameter bytes, activation bytes]} of one training step of ``images`` images on ``net`` (a Net,
    shapes only suffice); parameter bytes count weights, gradients and momentum."""
    item = net.dtype.itemsize
    need = {}
    for l in net.order:
        n = need.setdefault(l.device, [0, 0])
        n[0] += 3 * l.param_count() * item
        n[1] += math.prod(l.out_shape) * images * item
    return need


def check_fits(net, images: int) -> None:
    """ConfigError (one line: the sizes and the memory available) when one training step of ``images`` images cannot
    fit in the free memory of the net's devices. A device that cannot say what it has free is not checked."""
    pools = {}
    for dev, (params, acts) in training_bytes(net, images).items():
        where, free = dev.free_memory()
        pool = pools.setdefault(where, [0, 0, free, []])
        pool[0] += params
        pool[1] += acts
        pool[3].append(str(dev))
    for where, (params, acts, free, devs) in pools.items():
        if free is not None and params + acts > free:
            raise ConfigError(
                f"the net does not fit in {where} ({', '.join(devs)}): a training step needs at least "
                f"{_size(params + acts)}, {_size(params)} of parameters (weights, gradients and momentum) and "
                f"{_size(acts)} of activations for a batch of {images}, but {_size(free)} are available: make the "
                f"model's layers smaller or lower --batch-size")


def _size(n: int) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / (1 << 20):.1f} MiB"
