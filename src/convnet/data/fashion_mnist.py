"""Fashion-MNIST: the four IDX files (gzipped or not) from Zalando's Fashion-MNIST, e.g. Debian's
``dataset-fashion-mnist`` package in /usr/share/datasets/fashion-mnist."""
from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from .base import DataError, Dataset, register

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]


def _open_maybe_gz(path):
    with open(path, "rb") as f:
        magic = f.read(2)
    return gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")


IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_CHUNK = 1 << 24


def read_idx(path, dtype=None):
    """Read an IDX file (optionally gzipped) into a NumPy array. ``dtype``: the element type the file must have
    (Fashion-MNIST: uint8 pixels and labels). DataError naming the file for anything wrong: a bad magic, a
    truncated header or body, trailing bytes, a corrupted gzip stream, another element type."""
    try:
        with _open_maybe_gz(path) as f:
            head = f.read(4)
            if len(head) != 4 or head[0] != 0 or head[1] != 0 or head[2] not in IDX_TYPES:
                raise DataError(f"{path}: not an IDX file (bad magic {head.hex()})")
            ndim = head[3]
            header = f.read(4 * ndim)
            if len(header) != 4 * ndim:
                raise DataError(f"{path}: truncated IDX header ({len(header)} of {4 * ndim} bytes of dimensions)")
            dims = tuple(int(d) for d in np.frombuffer(header, dtype=">u4"))
            dt = np.dtype(IDX_TYPES[head[2]])
            if dtype is not None and dt != np.dtype(dtype):
                raise DataError(f"{path}: IDX elements are {dt.newbyteorder('=')}, expected {np.dtype(dtype)}")
            size = dt.itemsize
            for d in dims:
                size *= d
            raw = bytearray()
            while len(raw) < size:  # in chunks: a corrupted header cannot make us allocate terabytes up front
                chunk = f.read(min(_CHUNK, size - len(raw)))
                if not chunk:
                    break
                raw += chunk
            if len(raw) != size:
                raise DataError(f"{path}: truncated IDX data ({len(raw)} of {size} bytes for shape {dims})")
            if f.read(1):
                raise DataError(f"{path}: trailing bytes after the IDX data (shape {dims}): corrupted header?")
    except DataError:
        raise
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}: cannot read IDX file: {type(e).__name__}: {' '.join(str(e).split())}") from None
    return np.frombuffer(raw, dtype=dt).reshape(dims).astype(dt.newbyteorder("="))


def _find(d, stem):
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        p = Path(d) / name
        if p.is_file():
            return p
    return None


def load_fashion_mnist(data_dir=None):
    d = Path(data_dir or FASHION_MNIST_DIR)
    stems = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte"]
    paths = [_find(d, s) for s in stems]
    missing = [s for s, p in zip(stems, paths) if p is None]
    if missing:
        raise DataError(
            f"Fashion-MNIST not found in {d} (missing {', '.join(m + '[.gz]' for m in missing)}). "
            f"Get it with `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu; installs to "
            f"{FASHION_MNIST_DIR}), or download the four *-ubyte.gz files from "
            f"https://github.com/zalandoresearch/fashion-mnist (data/fashion) and pass --data DIR.")
    tx, ty, vx, vy = (read_idx(p, np.uint8) for p in paths)
    for p, a, nd in zip(paths, (tx, ty, vx, vy), (3, 1, 3, 1)):
        if a.ndim != nd:
            raise DataError(f"{p}: expected a {nd}-D IDX array, got shape {a.shape}")
    if len(tx) != len(ty) or len(vx) != len(vy):
        raise DataError(f"Fashion-MNIST in {d}: image and label counts differ "
                        f"({len(tx)} vs {len(ty)}, {len(vx)} vs {len(vy)})")
    for p, y in ((paths[1], ty), (paths[3], vy)):
        if y.size and y.max() >= 10:
            raise DataError(f"{p}: label {int(y.max())} out of range 0..9")
    return Dataset("fashion-mnist", tx[..., None], ty.astype(np.int32), vx[..., None], vy.astype(np.int32),
                   list(FASHION_CLASSES))


@register("fashion-mnist", "fmnist", "fashion_mnist", "fashionmnist")
def _read(data_dir, **_):
    return load_fashion_mnist(data_dir)
