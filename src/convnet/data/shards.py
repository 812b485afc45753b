"""The shard format of prepared datasets (written by :mod:`convnet.data.prepare`, read by :mod:`.imagenet`).

One shard = one file ``<split>-NNNNN.shard``, little-endian, readable with NumPy alone::

    [JPEG 0][JPEG 1]...[JPEG n-1]          the images' bytes, concatenated (each a complete JPEG)
    offsets  uint64[n + 1]                 image i is bytes[offsets[i]:offsets[i+1]]   (at index_start)
    labels   int32[n]                      class indices
    meta     UTF-8 JSON                    {"split", "names": source paths, "skipped": [[path, reason], ...]}
    footer   32 bytes                      b"CVNSHRD1", index_start, meta_start, n   (3 x uint64)

One file per shard, so a shard appears by one atomic rename (never half-written) and is memory-mapped by any
number of reader processes; the index at the end lets a writer stream the JPEGs without knowing their sizes.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import numpy as np

from . import jpeg
from .base import DataError

MAGIC = b"CVNSHRD1"
FOOTER = struct.Struct("<8sQQQ")


def write_shard(path, jpegs, labels, meta):
    """Write a shard to ``path`` atomically (a temporary name in the same folder, fsync, rename); returns the
    sha256 hex digest of the file."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    offsets = np.zeros(len(jpegs) + 1, np.uint64)
    np.cumsum([len(j) for j in jpegs], out=offsets[1:])
    h = hashlib.sha256()
    try:
        with open(tmp, "wb") as f:
            def put(b):
                f.write(b)
                h.update(b)
            for j in jpegs:
                put(j)
            index_start = int(offsets[-1])
            put(offsets.astype("<u8").tobytes())
            put(np.asarray(labels, "<i4").tobytes())
            meta_start = f.tell()
            put(json.dumps(meta, separators=(",", ":")).encode())
            put(FOOTER.pack(MAGIC, index_start, meta_start, len(jpegs)))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return h.hexdigest()


def sha256(path, chunk=1 << 22):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


class Shard:
    """A shard opened for reading: ``len``, ``labels``, ``meta``, ``jpeg(i)`` (bytes, from a memory map)."""

    def __init__(self, path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            if size < FOOTER.size:
                raise DataError(f"{self.path}: not a shard (only {size} bytes)")
            mm = np.memmap(self.path, np.uint8, "r")
            magic, index_start, meta_start, n = FOOTER.unpack(mm[-FOOTER.size:].tobytes())
            if magic != MAGIC or not index_start + 12 * n + 8 == meta_start <= size - FOOTER.size:
                raise DataError(f"{self.path}: not a shard or damaged (bad footer); prepare it again")
        except OSError as e:
            raise DataError(f"{self.path}: cannot read shard: {e}") from None
        self.n = n
        self._mm = mm
        self.offsets = np.frombuffer(mm[index_start:index_start + 8 * (n + 1)].tobytes(), "<u8").astype(np.int64)
        self.labels = np.frombuffer(mm[index_start + 8 * (n + 1):meta_start].tobytes(), "<i4").astype(np.int32)
        self.meta = json.loads(mm[meta_start:size - FOOTER.size].tobytes())

    def __len__(self):
        return self.n

    def jpeg(self, i):
        return self._mm[self.offsets[i]:self.offsets[i + 1]]

    def __getstate__(self):  # worker processes re-open the memory map
        return {"path": self.path}

    def __setstate__(self, st):
        self.__init__(st["path"])


class ShardImages:
    """The images of a list of shards as a read-only array-like ``(N, H, W, 3)`` uint8 that decodes on indexing
    (an int, a slice or an index array); ``labels`` (N,) int32. What the loader and the plots index.
    ``decoder``: the JPEG engine (:func:`.jpeg.resolve`: None is ``$CONVNET_JPEG_DECODER``, else the fastest
    installed), fixed here so that every worker process decodes with the same one."""

    def __init__(self, paths, hw, decoder=None):
        self.decoder = jpeg.resolve(decoder)
        self.shards = [Shard(p) for p in paths]
        counts = np.array([len(s) for s in self.shards], np.int64)
        self.starts = np.concatenate([[0], np.cumsum(counts)])
        self.labels = np.concatenate([s.labels for s in self.shards]) if self.shards else np.zeros(0, np.int32)
        self.hw = tuple(hw)
        self.dtype = np.dtype(np.uint8)
        self.ndim = 4

    @property
    def shape(self):
        return (int(self.starts[-1]), *self.hw, 3)

    def __len__(self):
        return int(self.starts[-1])

    def jpeg(self, i):
        k = int(np.searchsorted(self.starts, i, side="right")) - 1
        return self.shards[k].jpeg(i - self.starts[k])

    def image(self, i):
        """Image ``i`` decoded, (H, W, 3) uint8."""
        return self._decoded(i, jpeg.decode)

    def image_rgbx(self, i):
        """Image ``i`` decoded as (H, W, 4) uint8, the fourth byte meaningless (:func:`.jpeg.decode_rgbx`)."""
        return self._decoded(i, jpeg.decode_rgbx)

    def _decoded(self, i, fn):
        if not 0 <= i < len(self):
            raise IndexError(f"image {i} out of range 0..{len(self) - 1}")
        try:
            x = fn(self.jpeg(i), self.decoder)
        except (OSError, ValueError) as e:  # Pillow's UnidentifiedImageError is an OSError
            raise DataError(f"image {i} of {self.shards[0].path.parent}: cannot decode ({e}); prepare it "
                            f"again") from None
        if x.shape[:2] != self.hw:
            raise DataError(f"image {i} of {self.shards[0].path.parent} is {x.shape[0]}x{x.shape[1]}, the "
                            f"manifest says {self.hw[0]}x{self.hw[1]}")
        return x

    def __getitem__(self, idx):
        if isinstance(idx, tuple):  # images first, then the rest of the index on the decoded array
            head = self[idx[0]]
            return head[(slice(None), *idx[1:])] if head.ndim == 4 else head[idx[1:]]
        if isinstance(idx, (int, np.integer)):
            return self.image(int(idx) + len(self) if idx < 0 else int(idx))
        idx = np.arange(len(self))[idx] if isinstance(idx, slice) else np.asarray(idx)
        out = np.empty((len(idx), *self.hw, 3), np.uint8)
        for j, i in enumerate(idx):
            out[j] = self.image(int(i))
        return out

    def mean(self, *a, **k):
        raise TypeError("ShardImages has no mean(): use the prepared dataset's stored mean image")
