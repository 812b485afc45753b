"""The background loader: batches ``(x (C, H, W, N) float32, labels (N,) int32)`` on the training device.

:class:`Loader` serves in-memory uint8 datasets (augmentation per batch: :func:`.augment.crop_flip_batch`);
:class:`PreparedLoader` serves prepared JPEG shards (decoded in worker processes, :mod:`.workers`, or in the
loader thread; the paper's per-image augmentation: :func:`.augment.train_params`). Batches are made ``prefetch`` ahead in one background thread; every
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



def _array_tools(dev):
    """(array module, upload function, adopt: a batch computed with the array module as the device's) of a loader's
    device; None is host NumPy."""
    if dev is None:
        return np, (lambda a, dt=None: np.ascontiguousarray(a, dtype=dt)), (lambda a: a)
    return dev.xp, dev.asarray, dev.adopt

class Loader:
    """Produces preprocessed batches ``(x (C,H,W,N) float32 on device, labels (N,) int32 on device)``.

    ``train=True``: shuffled every epoch, random crops / flips as configured, incomplete last batch dropped.
    ``train=False``: in order, centre crops, no flips, every image once; ``views=10``: every batch ten times in a
    row, as the paper's ten test views (:func:`.augment.ten_crop_views`: four corners + centre, then mirrored),
    the consumer averages the ten outputs.
    Batches are prepared ``prefetch`` ahead in a background thread.
    """

    def __init__(self, images, labels, batch_size, *, train, out_hw, mean, scale=1.0, crop_pad=0, flip=False,
                 seed=0, device=None, dtype=np.float32, prefetch=3, views=1):
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
        self.views = int(views)
        if self.views not in (1, 10) or (train and self.views != 1):
            raise ValueError(f"views must be 1, or 10 for evaluation, got {views}")

    def view_list(self):
        """The test views of every batch, in the order ``epoch`` yields them: [None] (the centre crop), or the ten
        ((row, column), mirrored) of :func:`.augment.ten_crop_views`."""
        if self.views == 1:
            return [None]
        return augment.ten_crop_views(self.images.shape[1:3], self.out_hw)

    def __len__(self):
        n = len(self.images)
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    def order(self, epoch):
        if not self.train:
            return np.arange(len(self.images))
        return np.random.default_rng([self.seed, epoch, 7]).permutation(len(self.images))

    def make_batch(self, epoch, b, order=None, view=None):
        """Batch ``b`` of ``epoch``: (x (C,H,W,N) float32, y (N,) int32) on the loader's device (host if None);
        ``view``: one of :meth:`view_list` (evaluation)."""
        return self._finish(*self._host_part(epoch, b, order, view))

    def _host_part(self, epoch, b, order=None, view=None):
        """Geometry on the host, in uint8: crops and flips of the images, and the index arrays that apply the
        same crops/flips to the mean image (x - mean commutes with zero padding, cropping and flipping), so
        only uint8 data crosses to the device and the float work happens there."""
        order = self.order(epoch) if order is None else order
        idx = order[b * self.batch_size:(b + 1) * self.batch_size]
        if view is not None:  # one of the ten test views; the mean image goes through the same crop and flip
            (oy, ox), f = view
            oh, ow = self.out_hw
            img = self.images[idx][:, oy:oy + oh, ox:ox + ow]
            rows = np.tile(oy + np.arange(oh), (len(idx), 1))
            cols = np.tile(ox + np.arange(ow)[::-1 if f else 1], (len(idx), 1))
            return (augment.hflip(img) if f else img), (rows, cols), None, self.labels[idx]
        rng = np.random.default_rng([self.seed, epoch, b, 11]) if self.train else None
        out, geom, valid = augment.crop_flip_batch(self.images[idx], self.out_hw, rng, pad=self.crop_pad,
                                                   flip=self.flip)
        return out, geom, valid, self.labels[idx]

    def _finish(self, img, geom, valid, labels):
        """Device part: to float, subtract the identically transformed mean, scale, transpose to CHWN."""
        dev = self.device
        xp, put, adopt = _array_tools(dev)
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
            xb = adopt(xp.ascontiguousarray(x.transpose(3, 1, 2, 0), dtype=self.dtype))
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
        views = self.view_list()
        if self.prefetch <= 0:
            for b in range(start, nb):
                for v in views:
                    yield self.make_batch(epoch, b, order) if v is None else self.make_batch(epoch, b, order, v)
            return
        q = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def work():
            try:
                for b, v in ((b, v) for b in range(start, nb) for v in views):
                    item = ("ok", self.make_batch(epoch, b, order) if v is None else
                            self.make_batch(epoch, b, order, v))
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
    """Batches from a prepared dataset (:class:`.shards.ShardImages`), decoded in ``workers`` processes
    (:mod:`.workers`; batches assembled in shared memory) or, with ``workers`` = 0, here in the loader thread.

    Training, per image (generator :func:`.augment.image_rng` (seed, epoch, image index)): a random ``out_hw``
    crop, a flip with probability 1/2 if ``flip``, PCA lighting with coefficients ~ N(0, ``lighting``) if
    ``lighting`` > 0. Evaluation: the centre crop. Always: minus the centre ``out_hw`` crop of the full-image
    mean (cuda-convnet2), times ``scale``. ``eig``: (eigvals, eigvecs) of the training set's RGB covariance."""

    def __init__(self, images, labels, batch_size, *, train, out_hw, mean, eig=None, lighting=0.0, scale=1.0,
                 flip=False, seed=0, device=None, dtype=np.float32, prefetch=3, views=1, workers=0):
        super().__init__(images, labels, batch_size, train=train, out_hw=out_hw, mean=mean, scale=scale,
                         crop_pad=0, flip=flip, seed=seed, device=device, dtype=dtype, prefetch=prefetch,
                         views=views)
        h, w = images.shape[1:3]
        if self.mean.shape[:2] == (h, w):  # the full-image mean: its centre crop, whatever the crop position
            self.mean = np.ascontiguousarray(augment.centre_crop(self.mean, self.out_hw))
        self.lighting = float(lighting)
        if self.lighting > 0 and eig is None:
            raise DataError("PCA lighting needs the training set's RGB eigenvectors (a prepared dataset's stats)")
        self.eig = None if eig is None else (np.asarray(eig[0], np.float64), np.asarray(eig[1], np.float64))
        self.workers = int(workers)
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")

    def epoch(self, epoch, start=0):
        """Iterate over batches ``start..`` of ``epoch``: decoded in ``workers`` processes (:mod:`.workers`), or
        in the loader thread (``workers`` = 0); the same batches either way."""
        if self.workers > 0:
            from . import workers
            return workers.epoch(self, epoch, start)
        return super().epoch(epoch, start)

    def worker_state(self):
        """This loader as a worker process needs it (pickled): on the host, without caches."""
        st = dict(self.__dict__)
        st.update(device=None, workers=0)
        for k in ("_mean_dev", "_mean_chwn", "_decoded"):
            st.pop(k, None)
        clone = object.__new__(type(self))
        clone.__dict__.update(st)
        return clone

    def view_params(self, epoch, index):
        """Image ``index``'s (crop offset, flipped, lighting offset (3,) float32 or None) in ``epoch``."""
        hw = self.images.shape[1:3]
        if not self.train:
            return augment.centre_offset(hw, self.out_hw), False, None
        rng = augment.image_rng(self.seed, epoch, index)
        off, f, alphas = augment.train_params(rng, hw, self.out_hw, flip=self.flip, lighting_std=self.lighting)
        return off, f, (None if alphas is None else augment.lighting_offset(alphas, *self.eig))

    def _host_part(self, epoch, b, order=None, view=None):
        order = self.order(epoch) if order is None else order
        idx = order[b * self.batch_size:(b + 1) * self.batch_size]
        oh, ow = self.out_hw
        if view is not None:  # a test view (no lighting; minus the mean's centre crop, as every view); the batch
            (oy, ox), f = view  # is decoded once for its ten views
            cached = getattr(self, "_decoded", None)
            if cached is None or cached[0] != (epoch, b):
                cached = self._decoded = ((epoch, b), self.images[idx])
            x = cached[1][:, oy:oy + oh, ox:ox + ow]
            return (augment.hflip(x) if f else x), np.zeros((len(idx), 3), np.float32), None, self.labels[idx]
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
        xp, put, adopt = _array_tools(dev)
        with (dev.activate() if dev is not None else contextlib.nullcontext()):
            # transposed to CHWN while uint8 (a quarter of the bytes of float32), then the float work in place in
            # that layout: the same operations per element, in the same order, as on NHWC
            x = put(np.ascontiguousarray(np.asarray(img).transpose(3, 1, 2, 0))).astype(np.float32)
            x -= self._mean_chwn_on(dev)
            if self.train and self.lighting > 0:
                x += put(np.ascontiguousarray(np.asarray(light, np.float32).T))[:, None, None, :]
            if self.scale != 1.0:
                x *= self.scale
            xb = adopt(xp.ascontiguousarray(x, dtype=self.dtype))
            return xb, put(np.asarray(labels, np.int32))

    def _mean_chwn_on(self, dev):
        """The mean as (3, H, W, 1) (an image) or (3, 1, 1, 1) (per channel), on ``dev``."""
        key = str(dev)
        cached = getattr(self, "_mean_chwn", None)
        if cached is None or cached[0] != key:
            m = np.asarray(self.mean, np.float32)
            m = np.ascontiguousarray(m.transpose(2, 0, 1)[..., None]) if m.ndim == 3 else m.reshape(-1, 1, 1, 1)
            self._mean_chwn = (key, m if dev is None else dev.asarray(m, np.float32))
        return self._mean_chwn[1]
