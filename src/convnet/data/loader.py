"""The background loader: batches ``(x (C, H, W, N) float32, labels (N,) int32)`` on the training device.

:class:`Loader` serves in-memory uint8 datasets (augmentation per batch: :func:`.augment.crop_flip_batch`);
:class:`PreparedLoader` serves prepared JPEG shards (decoded in the loader thread; the paper's per-image
augmentation: :func:`.augment.train_params`). Batches are made ``prefetch`` ahead in one background thread; every
random choice is keyed on (seed, epoch, batch index) or (seed, epoch, image index), so a batch's content does not
depend on threads, prefetch depth or on whether the run was resumed.
"""
from __future__ import annotations

import contextlib
import queue
import threading

import numpy as np

from . import augment
from .base import DataError


class Loader:
    """Produces preprocessed batches ``(x (C,H,W,N) float32 on device, labels (N,) int32 on device)``.

    ``train=True``: shuffled every epoch, random crops / flips as configured, incomplete last batch dropped.
    ``train=False``: in order, centre crops, no flips, every image once.
    Batches are prepared ``prefetch`` ahead in a background thread.
    """

    def __init__(self, images, labels, batch_size, *, train, out_hw, mean, scale=1.0, crop_pad=0, flip=False,
                 seed=0, device=None, dtype=np.float32, prefetch=3):
        self.images, self.labels = images, labels
        self.batch_size = int(batch_size)
        if self.batch_size <= 0:
            raise ValueError("batch size must be positive")
        self.train = train
        self.out_hw = tuple(out_hw)
        n, h, w, c = images.shape
        if h < self.out_hw[0] or w < self.out_hw[1]:
            raise DataError(f"images are {h}x{w}, smaller than the model's input {self.out_hw[0]}x{self.out_hw[1]}")
        self.mean = np.asarray(mean, np.float32)
        self.scale = np.float32(scale)
        self.crop_pad = int(crop_pad)
        self.flip = bool(flip)
        self.seed = int(seed)
        self.device = device
        self.dtype = np.dtype(dtype)
        self.prefetch = int(prefetch)

    def __len__(self):
        n = len(self.images)
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    def order(self, epoch):
        if not self.train:
            return np.arange(len(self.images))
        return np.random.default_rng([self.seed, epoch, 7]).permutation(len(self.images))

    def make_batch(self, epoch, b, order=None):
        """Batch ``b`` of ``epoch``: (x (C,H,W,N) float32, y (N,) int32) on the loader's device (host if None)."""
        return self._finish(*self._host_part(epoch, b, order))

    def _host_part(self, epoch, b, order=None):
        """Geometry on the host, in uint8: crops and flips of the images, and the index arrays that apply the
        same crops/flips to the mean image (x - mean commutes with zero padding, cropping and flipping), so
        only uint8 data crosses to the device and the float work happens there."""
        order = self.order(epoch) if order is None else order
        idx = order[b * self.batch_size:(b + 1) * self.batch_size]
        rng = np.random.default_rng([self.seed, epoch, b, 11]) if self.train else None
        out, geom, valid = augment.crop_flip_batch(self.images[idx], self.out_hw, rng, pad=self.crop_pad,
                                                   flip=self.flip)
        return out, geom, valid, self.labels[idx]

    def _finish(self, img, geom, valid, labels):
        """Device part: to float, subtract the identically transformed mean, scale, transpose to CHWN."""
        dev = self.device
        if dev is None:
            xp, put = np, (lambda a, dt=None: np.ascontiguousarray(a, dtype=dt))
        else:
            xp, put = dev.xp, dev.asarray
        with (dev.activate() if dev is not None else contextlib.nullcontext()):
            mean = self._mean_on(dev)
            x = put(img).astype(np.float32)
            if geom is None:
                x -= mean
            else:
                rc, cc = put(geom[0]), put(geom[1])
                m = mean[rc[:, :, None], cc[:, None, :]]
                if valid is not None:
                    m *= put(valid)[..., None]
                x -= m
            if self.scale != 1.0:
                x *= self.scale
            xb = xp.ascontiguousarray(x.transpose(3, 1, 2, 0), dtype=self.dtype)
            return xb, put(np.asarray(labels, np.int32))

    def _mean_on(self, dev):
        key = str(dev)
        cached = getattr(self, "_mean_dev", None)
        if cached is None or cached[0] != key:
            self._mean_dev = (key, self.mean if dev is None else dev.asarray(self.mean, np.float32))
        return self._mean_dev[1]

    def epoch(self, epoch, start=0):
        """Iterate over batches ``start..`` of ``epoch`` (a generator; batches made in a background thread)."""
        order = self.order(epoch)
        nb = len(self)
        if self.prefetch <= 0:
            for b in range(start, nb):
                yield self.make_batch(epoch, b, order)
            return
        q = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def work():
            try:
                for b in range(start, nb):
                    item = ("ok", self.make_batch(epoch, b, order))
                    while not stop.is_set():
                        try:
                            q.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
                q.put(("end", None))
            except BaseException as e:  # noqa: BLE001 - handed to the consumer
                q.put(("err", e))

        t = threading.Thread(target=work, name="convnet-loader", daemon=True)
        t.start()
        try:
            while True:
                kind, item = q.get()
                if kind == "end":
                    break
                if kind == "err":
                    raise item
                yield item
        finally:
            stop.set()
            t.join(timeout=5)


class PreparedLoader(Loader):
    """Batches from a prepared dataset (:class:`.shards.ShardImages`, decoded here, in the loader thread).

    Training, per image (generator :func:`.augment.image_rng` (seed, epoch, image index)): a random ``out_hw``
    crop, a flip with probability 1/2 if ``flip``, PCA lighting with coefficients ~ N(0, ``lighting``) if
    ``lighting`` > 0. Evaluation: the centre crop. Always: minus the centre ``out_hw`` crop of the full-image
    mean (cuda-convnet2), times ``scale``. ``eig``: (eigvals, eigvecs) of the training set's RGB covariance."""

    def __init__(self, images, labels, batch_size, *, train, out_hw, mean, eig=None, lighting=0.0, scale=1.0,
                 flip=False, seed=0, device=None, dtype=np.float32, prefetch=3):
        super().__init__(images, labels, batch_size, train=train, out_hw=out_hw, mean=mean, scale=scale,
                         crop_pad=0, flip=flip, seed=seed, device=device, dtype=dtype, prefetch=prefetch)
        h, w = images.shape[1:3]
        if self.mean.shape[:2] == (h, w):  # the full-image mean: its centre crop, whatever the crop position
            self.mean = np.ascontiguousarray(augment.centre_crop(self.mean, self.out_hw))
        self.lighting = float(lighting)
        if self.lighting > 0 and eig is None:
            raise DataError("PCA lighting needs the training set's RGB eigenvectors (a prepared dataset's stats)")
        self.eig = None if eig is None else (np.asarray(eig[0], np.float64), np.asarray(eig[1], np.float64))

    def view_params(self, epoch, index):
        """Image ``index``'s (crop offset, flipped, lighting offset (3,) float32 or None) in ``epoch``."""
        hw = self.images.shape[1:3]
        if not self.train:
            return augment.centre_offset(hw, self.out_hw), False, None
        rng = augment.image_rng(self.seed, epoch, index)
        off, f, alphas = augment.train_params(rng, hw, self.out_hw, flip=self.flip, lighting_std=self.lighting)
        return off, f, (None if alphas is None else augment.lighting_offset(alphas, *self.eig))

    def _host_part(self, epoch, b, order=None):
        order = self.order(epoch) if order is None else order
        idx = order[b * self.batch_size:(b + 1) * self.batch_size]
        oh, ow = self.out_hw
        out = np.empty((len(idx), oh, ow, 3), np.uint8)
        light = np.zeros((len(idx), 3), np.float32)
        for j, i in enumerate(idx):
            (oy, ox), f, lo = self.view_params(epoch, int(i))
            x = augment.crop(self.images.image(int(i)), oy, ox, self.out_hw)
            out[j] = augment.hflip(x) if f else x
            if lo is not None:
                light[j] = lo
        return out, light, None, self.labels[idx]

    def _finish(self, img, light, valid, labels):
        """Device part: to float, minus the mean's centre crop, plus each image's lighting offset, scale, CHWN."""
        dev = self.device
        if dev is None:
            xp, put = np, (lambda a, dt=None: np.ascontiguousarray(a, dtype=dt))
        else:
            xp, put = dev.xp, dev.asarray
        with (dev.activate() if dev is not None else contextlib.nullcontext()):
            x = put(img).astype(np.float32)
            x -= self._mean_on(dev)
            if self.train and self.lighting > 0:
                x += put(light)[:, None, None, :]
            if self.scale != 1.0:
                x *= self.scale
            xb = xp.ascontiguousarray(x.transpose(3, 1, 2, 0), dtype=self.dtype)
            return xb, put(np.asarray(labels, np.int32))
