"""NumPy reference for ReLU and inverted dropout (with the Philox4x32-10 counter-based RNG).

float32, float64 and bfloat16 (``convnet.reference.storage``: float32 math on the upcast values, one rounding)."""
from __future__ import annotations

import math
import numbers

import numpy as np

from convnet.reference.storage import bf16_storage

_M0, _M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_W0, _W1 = np.uint32(0x9E3779B9), np.uint32(0xBB67AE85)
_LOW32 = np.uint64(0xFFFFFFFF)


def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on uint32 arrays (counter c0..c3, key k0, k1) -> four uint32 arrays."""
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint32) for c in (c0, c1, c2, c3))
    k0, k1 = np.uint32(k0), np.uint32(k1)
    with np.errstate(over="ignore"):
        for _ in range(10):
            p0 = _M0 * c0.astype(np.uint64)
            p1 = _M1 * c2.astype(np.uint64)
            hi0, lo0 = (p0 >> np.uint64(32)).astype(np.uint32), (p0 & _LOW32).astype(np.uint32)
            hi1, lo1 = (p1 >> np.uint64(32)).astype(np.uint32), (p1 & _LOW32).astype(np.uint32)
            c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
            k0, k1 = k0 + _W0, k1 + _W1
    return c0, c1, c2, c3


def keep_threshold(keep: float) -> int:
    """An element is kept iff its 32-bit random word is < round(keep * 2**32)."""
    return int(round(float(keep) * 2.0**32))


def dropout_scale(keep: float, dtype=np.float32):
    """The factor kept elements are multiplied by: 1/keep rounded once to the working precision."""
    return np.dtype(dtype).type(1.0 / float(keep))


def _words(groups, seed: int, offset: int):
    """The four 32-bit words of Philox group(s) ``groups`` (uint64) of the stream keyed on (seed, offset)."""
    return philox4x32_10(groups & _LOW32, groups >> np.uint64(32), offset & 0xFFFFFFFF, offset >> 32,
                         seed & 0xFFFFFFFF, seed >> 32)


def dropout_mask(shape, keep: float, seed: int, offset: int = 0, start: int = 0, batch=None) -> np.ndarray:
    """Boolean keep-mask of an array of ``shape`` (an int n: 1-D), element i being element start + i of the stream
    keyed on (seed, offset): stream element j uses word j % 4 of philox((j // 4, offset), seed). ``start`` lets a
    slice of a larger tensor (a tower's units of the one-device layer) draw exactly that slice of the larger tensor's
    mask.

    ``batch=(global_n, first)``: the array (..., N), images fastest, is images [first, first + N) of a batch of
    global_n images (a data-parallel rank's shard). Its row r (the leading axes flattened) is then stream elements
    start + r * global_n + first + [0, N): exactly what those images draw in the whole batch's mask."""
    shape = (int(shape),) if isinstance(shape, numbers.Integral) else tuple(int(s) for s in shape)
    n, start = math.prod(shape), int(start)
    if batch is None:
        groups = np.arange(start // 4, (start + n + 3) // 4, dtype=np.uint64)
        bits = np.stack(_words(groups, seed, offset), axis=1).reshape(-1)[start % 4:start % 4 + n]
    else:
        global_n, first = (int(v) for v in batch)
        cols = shape[-1]
        rows = n // cols if cols else 0
        s = np.uint64(start) + np.arange(rows, dtype=np.uint64) * np.uint64(global_n) + np.uint64(first)
        # Row r's words from stream element 4 * (s[r] // 4) on: enough groups for a run of cols from any word of
        # the first group; the row's own run begins s[r] % 4 words in.
        per_row = (cols + 3) // 4 + 1
        groups = (s >> np.uint64(2))[:, None] + np.arange(per_row, dtype=np.uint64)
        words = np.stack(_words(groups, seed, offset), axis=-1).reshape(rows, 4 * per_row)
        bits = np.take_along_axis(words, (s & np.uint64(3)).astype(np.intp)[:, None] + np.arange(cols), axis=1)
    if keep >= 1:
        return np.ones(shape, dtype=bool)
    return (bits.astype(np.uint64) < np.uint64(keep_threshold(keep))).reshape(shape)


@bf16_storage
def relu_forward(x):
    return np.where(x > 0, x, np.zeros((), x.dtype))  # NaN -> 0 and -0 -> +0, exactly as the kernel


@bf16_storage
def relu_backward(y, dy):
    return np.where(y > 0, dy, np.zeros((), dy.dtype))


@bf16_storage
def dropout_forward(x, keep: float, seed: int, offset: int = 0, start: int = 0, batch=None):
    mask = dropout_mask(x.shape, keep, seed, offset, start, batch)
    return np.where(mask, x * dropout_scale(keep, x.dtype), np.zeros((), x.dtype))


@bf16_storage  # (as the forward it calls: one rounding)
def dropout_backward(dy, keep: float, seed: int, offset: int = 0, start: int = 0, batch=None):
    return dropout_forward(dy, keep, seed, offset, start, batch)  # the same mask and scale: d(x m / keep)/dx = m / keep
