"""Datasets, augmentation and the background loader.

Datasets are held as uint8 images ``(N, H, W, C)`` (in memory, or decoded from prepared JPEG shards on indexing)
+ int32 labels; batches leave the loader as float32 ``(C, H, W, N)`` (the layout contract) on the training device.

* ``fashion-mnist`` (:mod:`.fashion_mnist`), ``cifar10`` (:mod:`.cifar10`), ``synthetic`` (:mod:`.synthetic`);
* ``imagenet`` (:mod:`.imagenet`): a directory prepared once by ``python -m convnet.data.prepare imagenet SRC DST``
  (:mod:`.prepare`, shard format :mod:`.shards`, JPEG decoders :mod:`.jpeg`) from ImageNet or any ImageFolder tree.

Readers register themselves by name (:func:`.base.register`); :func:`load_dataset` looks them up. Augmentation is
pure functions (:mod:`.augment`); the loader and its prefetching thread are :mod:`.loader`. Every random choice
is drawn from a generator keyed on (seed, epoch, batch index) - or (seed, epoch, image index) for prepared data -
so a batch's content does not depend on threads, prefetch depth or on whether the run was resumed.
"""
from __future__ import annotations

from . import augment, fashion_mnist, cifar10, synthetic as _synthetic, imagenet  # noqa: F401 - registration order
from . import jpeg
from .base import DataError, Dataset, dataset_names, load_dataset, register
from .cifar10 import CIFAR10_CLASSES, load_cifar10, write_cifar_batch
from .fashion_mnist import FASHION_CLASSES, FASHION_MNIST_DIR, IDX_TYPES, load_fashion_mnist, read_idx
from .imagenet import PreparedDataset, load_prepared
from .loader import Loader, PreparedLoader
from .synthetic import synthetic

DATASETS = dataset_names()

__all__ = ["CIFAR10_CLASSES", "DATASETS", "DataError", "Dataset", "FASHION_CLASSES", "FASHION_MNIST_DIR",
           "IDX_TYPES", "Loader", "PreparedDataset", "PreparedLoader", "augment", "dataset_names", "jpeg",
           "load_cifar10", "load_dataset", "load_fashion_mnist", "load_prepared", "read_idx", "register", "synthetic",
           "write_cifar_batch"]
