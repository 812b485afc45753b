"""The data contract shared by every dataset: :class:`DataError`, :class:`Dataset` and the registry of readers.

A reader is a function ``load(data_dir, *, shape, classes, seed, synthetic_size) -> Dataset`` registered under a
name (and aliases) with :func:`register`; :func:`load_dataset` looks the name up. One module per dataset
(``fashion_mnist``, ``cifar10``, ``synthetic``, ``imagenet``) registers itself when ``convnet.data`` is imported.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


class DataError(RuntimeError):
    """Missing or malformed data; the message says what is wrong and how to get the data."""


def process_context():
    """The multiprocessing context of every process started for data (the loaders' workers, prepare's pool): spawn,
    a fresh interpreter (fork + exec), never a fork of this process. A fork copies only the calling thread: a lock
    that another thread (the loader thread, tqdm's monitor, a queue's feeder, a BLAS pool) holds at that instant
    stays held in the child, which can hang on it. Not forkserver: recent Pythons import the main module into it
    first, whose imports (NumPy's BLAS pool) can make it a threaded process too."""
    import multiprocessing as mp
    return mp.get_context("spawn")


@dataclass
class Dataset:
    """Images ``(N, H, W, C)`` uint8 (an array, or an array-like that decodes on indexing) + int32 labels."""
    name: str
    train_x: np.ndarray  # (N, H, W, C) uint8
    train_y: np.ndarray  # (N,) int32
    test_x: np.ndarray
    test_y: np.ndarray
    classes: list = field(default_factory=list)

    @property
    def shape(self):
        """(C, H, W) of the stored images."""
        n, h, w, c = self.train_x.shape
        return (c, h, w)

    def mean_image(self):
        """Per-pixel mean over the training set, (H, W, C) float32 (the paper's mean subtraction)."""
        return self.train_x.mean(axis=0, dtype=np.float64).astype(np.float32)


_READERS: dict = {}  # canonical name -> reader
_ALIASES: dict = {}  # alias -> canonical name


def register(name, *aliases):
    """Decorator: register ``fn`` as the reader of dataset ``name`` (also reachable by ``aliases``)."""
    def deco(fn):
        _READERS[name] = fn
        for a in aliases:
            _ALIASES[a] = name
        return fn
    return deco


def dataset_names():
    """The registered dataset names, in registration order."""
    return tuple(_READERS)


def load_dataset(name, data_dir=None, *, shape=(1, 28, 28), classes=10, seed=0, synthetic_size=(1280, 256)):
    """The dataset ``name`` (or an alias) read from ``data_dir``; DataError for an unknown name or bad data."""
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in _READERS:
        raise DataError(f"unknown dataset '{name}' (known: {', '.join(_READERS)})")
    return _READERS[key](data_dir, shape=shape, classes=classes, seed=seed, synthetic_size=synthetic_size)
