"""CIFAR-10: the "python version" batch directory (data_batch_1..5, test_batch; pickled dicts with b'data'
(n, 3072) uint8 planes R,G,B and b'labels')."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from .base import DataError, Dataset, register

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _read_cifar_batch(path):
    try:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="bytes")
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a data error
        raise DataError(f"{path}: not a CIFAR-10 python batch ({type(e).__name__}: {e})") from None
    if not isinstance(d, dict):
        raise DataError(f"{path}: not a CIFAR-10 python batch (not a dict)")
    d = {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}
    if "data" not in d or "labels" not in d:
        raise DataError(f"{path}: CIFAR-10 batch without 'data'/'labels' (keys: {sorted(d)})")
    x, y = np.asarray(d["data"]), np.asarray(d["labels"])
    if x.dtype != np.uint8:  # another type would be cast silently into garbage pixels
        raise DataError(f"{path}: CIFAR-10 'data' must be uint8 pixels, got {x.dtype}")
    if y.dtype.kind not in "iu":
        raise DataError(f"{path}: CIFAR-10 'labels' must be integers, got {y.dtype}")
    y = y.astype(np.int32)
    if x.ndim != 2 or x.shape[1] != 3072 or len(x) != len(y):
        raise DataError(f"{path}: expected data (n, 3072) and n labels, got {x.shape} and {y.shape}")
    return x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), y


def load_cifar10(data_dir):
    if data_dir is None:
        raise DataError("CIFAR-10 needs --data DIR: the 'python version' batch directory (data_batch_1..5, "
                        "test_batch). Get it from https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz and "
                        "unpack it (tar xzf); DIR is the cifar-10-batches-py directory.")
    d = Path(data_dir)
    if (d / "cifar-10-batches-py").is_dir():
        d = d / "cifar-10-batches-py"
    train = sorted(d.glob("data_batch_*"), key=lambda p: p.name)
    test = d / "test_batch"
    if not train or not test.is_file():
        raise DataError(f"CIFAR-10 batches not found in {d} (need data_batch_1..5 and test_batch). Get them from "
                        f"https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz and unpack (tar xzf).")
    parts = [_read_cifar_batch(p) for p in train]
    tx = np.concatenate([p[0] for p in parts])
    ty = np.concatenate([p[1] for p in parts])
    vx, vy = _read_cifar_batch(test)
    for y, where in ((ty, "training"), (vy, "test")):
        if y.size and (y.min() < 0 or y.max() >= 10):
            raise DataError(f"CIFAR-10 {where} labels out of range 0..9 in {d}")
    classes = list(CIFAR10_CLASSES)
    meta = d / "batches.meta"
    if meta.is_file():
        try:
            with open(meta, "rb") as f:
                m = pickle.load(f, encoding="bytes")
            names = m.get(b"label_names") or m.get("label_names")
            if names:
                classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
        except Exception:  # noqa: BLE001 - the names are cosmetic
            pass
    return Dataset("cifar10", np.ascontiguousarray(tx), ty, np.ascontiguousarray(vx), vy, classes)


def write_cifar_batch(path, images_nhwc, labels, batch_label="batch"):
    """Write a CIFAR-10 python batch (used by tests and to export data)."""
    x = np.asarray(images_nhwc, np.uint8).transpose(0, 3, 1, 2).reshape(len(images_nhwc), -1)
    with open(path, "wb") as f:
        pickle.dump({b"batch_label": batch_label.encode(), b"labels": [int(v) for v in labels], b"data": x,
                     b"filenames": [f"{i}.png".encode() for i in range(len(labels))]}, f)


@register("cifar10", "cifar", "cifar-10")
def _read(data_dir, **_):
    return load_cifar10(data_dir)
