"""The background loader: batches ``(x (C, H, W, N) float32, labels (N,) int32)`` on the training device.

On a GPU (an asynchronous device) a loader does its device work -- the uint8 upload, the float conversion, the mean,
the lighting, the scale -- on a non-blocking stream of its own, ordered by events only: each batch carries an event
recorded after its work (:class:`Batch` ``ready``), which the consumer's current stream waits for when it takes the
batch; and each time the consumer asks for a batch it records an event on its stream, which the loader's stream
waits for before its next batch (CuPy's pool gives the loader's stream the memory of batches the consumer dropped,
which work queued on the consumer's streams may still be reading).

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



_FEEDING = threading.local()  # .active: this thread is a loader's background thread (it hands batches over a queue)


class Batch(tuple):
    """A batch ``(x, labels)``; ``ready``: on a GPU the event recorded on the loader's stream after the work that made
    it (work on another stream waits for it before reading the batch), None elsewhere."""

    ready = None


def _array_tools(dev):
    """(array module, upload function, adopt: a batch computed with the array module as the device's) of a loader's
    device; None is host NumPy."""
    if dev is None:
        return np, (lambda a, dt=None: np.ascontiguousarray(a, dtype=dt)), (lambda a: a)
    return dev.xp, dev.asarray, dev.adopt


def _on_device(dev, fn):
    """``fn`` run with ``dev`` current throughout (a new thread starts on GPU 0, whatever GPU its creator is on)."""
    def run():
        with (dev.activate() if dev is not None else contextlib.nullcontext()):
            fn()
    return run


class Loader:
    """Produces preprocessed batches ``(x (C,H,W,N) float32 on device, labels (N,) int32 on device)``.

    ``train=True``: shuffled every epoch, random crops / flips as configured, incomplete last batch dropped.
    ``train=False``: in order, centre crops, no flips, every image once; ``views=10``: every batch ten times in a
    row, as the paper's ten test views (:func:`.augment.ten_crop_views`: four corners + centre, then mirrored),
    the consumer averages the ten outputs.
    Batches are prepared ``prefetch`` ahead in a background thread.

    ``shard=(rank, ranks)`` (data-parallel training, :mod:`convnet.distributed`): training batches stay the global
    batches of ``batch_size`` images (the same order and random keys), and this loader yields rank ``rank``'s equal
    part of each, images ``[rank*k, (rank+1)*k)``, ``k = batch_size / ranks``, with the crops and flips those images
    draw in the whole batch: the union of the ranks' shards is exactly the single-process batch. Evaluation batches
    are dealt whole, round-robin: rank r gets batches r, r + ranks, ...
    """

    def __init__(self, images, labels, batch_size, *, train, out_hw, mean, scale=1.0, crop_pad=0, flip=False,
                 seed=0, device=None, dtype=np.float32, prefetch=3, views=1, shard=(0, 1)):
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
        self.rank, self.ranks = (int(v) for v in shard)
        if not 0 <= self.rank < self.ranks:
            raise ValueError(f"shard must be (rank, ranks) with 0 <= rank < ranks, got {shard}")
        if train and self.batch_size % self.ranks:
            raise ValueError(f"the batch of {self.batch_size} images does not split into {self.ranks} equal shards")

    def batch_numbers(self, start=0):
        """The batches of an epoch this loader yields, from ``start``: all of them, or this rank's share of the
        evaluation batches (round-robin)."""
        nb = len(self)
        if self.train or self.ranks == 1:
            return range(start, nb)
        return range(start + (self.rank - start) % self.ranks, nb, self.ranks)

    def shard_part(self):
        """(first image of this rank's shard within a training batch, images in it)."""
        if not self.train or self.ranks == 1:
            return 0, self.batch_size
        k = self.batch_size // self.ranks
        return self.rank * k, k

    def batch_indices(self, order, b):
        """The dataset indices of this loader's images of batch ``b`` (its shard of it, when sharded)."""
        idx = order[b * self.batch_size:(b + 1) * self.batch_size]
        first, k = self.shard_part()
        return idx[first:first + k] if k != self.batch_size else idx

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
        ``view``: one of :meth:`view_list` (evaluation). On a GPU made on the loader's stream; the caller's current
        stream waits for it (module doc)."""
        feeding = getattr(_FEEDING, "active", False)  # the loader's thread: the consumer takes it off the queue
        if not feeding:
            self._release()
        batch = self._on_loader_stream(lambda: self._build(epoch, b, order, view))
        if not feeding:
            self._receive(batch)
        return batch

    def _build(self, epoch, b, order=None, view=None):
        return self._finish(*self._host_part(epoch, b, order, view))

    def _on_loader_stream(self, build):
        """``build()`` -- a batch's device work -- as a :class:`Batch`: on an asynchronous device on the loader's own
        stream, after that stream waits for the consumer's last request (:meth:`_release`), with its ``ready`` event."""
        dev = self.device
        if dev is None or dev.synchronous:
            return Batch(build())
        if getattr(self, "_stream", None) is None:
            self._stream = dev.new_stream()
        with dev.on_stream(self._stream):
            dev.wait_event(getattr(self, "_released", None), self._stream)
            batch = Batch(build())
            batch.ready = dev.record_event(self._stream)
        return batch

    def _release(self):
        """The consumer asks for a batch: an event on its current stream, after every use of the batches it had
        (the loader's stream waits for it before reusing their memory)."""
        dev = self.device
        if dev is not None and not dev.synchronous:
            self._released = dev.record_event(None)

    def _receive(self, batch):
        """The consumer takes ``batch``: its current stream waits for the batch's event."""
        if batch.ready is not None:
            self.device.wait_event(batch.ready)

    def _host_part(self, epoch, b, order=None, view=None):
        """Geometry on the host, in uint8: crops and flips of the images, and the index arrays that apply the
        same crops/flips to the mean image (x - mean commutes with zero padding, cropping and flipping), so
        only uint8 data crosses to the device and the float work happens there."""
        order = self.order(epoch) if order is None else order
        idx = self.batch_indices(order, b)
        if view is not None:  # one of the ten test views; the mean image goes through the same crop and flip
            (oy, ox), f = view
            oh, ow = self.out_hw
            img = self.images[idx][:, oy:oy + oh, ox:ox + ow]
            rows = np.tile(oy + np.arange(oh), (len(idx), 1))
            cols = np.tile(ox + np.arange(ow)[::-1 if f else 1], (len(idx), 1))
            return (augment.hflip(img) if f else img), (rows, cols), None, self.labels[idx]
        rng = np.random.default_rng([self.seed, epoch, b, 11]) if self.train else None
        first, k = self.shard_part()
        out, geom, valid = augment.crop_flip_batch(self.images[idx], self.out_hw, rng, pad=self.crop_pad,
                                                   flip=self.flip,
                                                   part=None if k == self.batch_size else (first, self.batch_size))
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
            elif mean.ndim == 1:  # per channel (a run imported from torchvision): no pixel to index
                x -= mean if valid is None else put(valid)[..., None] * mean
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
        numbers = self.batch_numbers(start)
        views = self.view_list()
        if self.prefetch <= 0:
            for b in numbers:
                for v in views:
                    yield self.make_batch(epoch, b, order) if v is None else self.make_batch(epoch, b, order, v)
            return
        q = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def work():
            _FEEDING.active = True
            try:
                for b, v in ((b, v) for b in numbers for v in views):
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

        t = threading.Thread(target=_on_device(self.device, work), name="convnet-loader", daemon=True)
        t.start()
        try:
            while True:
                self._release()
                kind, item = q.get()
                if kind == "end":
                    break
                if kind == "err":
                    raise item
                self._receive(item)
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
    mean (cuda-convnet2), times ``scale``. ``eig``: (eigvals, eigvecs) of the training set's RGB covariance.

    The host path (module :mod:`.workers`, or a host device in-thread) is two passes per image and one per batch:
    decode to 4-byte pixels (:func:`.jpeg.decode_rgbx`), copy the crop (mirrored: as uint32 pixels) into a reused
    staging batch, then ``(x - mean + lighting) * scale`` from the staging straight into the ``(C, H, W, N)``
    output, a few rows at a time so that only the first pass leaves the cache. The staging's images are spaced
    an odd number of cache lines apart: at a multiple of 4 kB the transposing reads of 128 images fall into a
    few L1 sets and run at half speed. On a GPU device the uint8 crops are uploaded and the float work runs there.

    Worker processes start with the first epoch and serve every later one (no process start per epoch); they
    hold a copy of the loader as it was then. :meth:`close` (or ``with``) stops them; so do garbage collection of
    the loader and the end of the program."""

    STAGING_ALIGN = 64  # bytes: a cache line
    CHUNK_BYTES = 1 << 20  # float32 output rows per pass of the layout step: about one core's L2

    def __init__(self, images, labels, batch_size, *, train, out_hw, mean, eig=None, lighting=0.0, scale=1.0,
                 flip=False, seed=0, device=None, dtype=np.float32, prefetch=3, views=1, workers=0, shard=(0, 1)):
        super().__init__(images, labels, batch_size, train=train, out_hw=out_hw, mean=mean, scale=scale,
                         crop_pad=0, flip=flip, seed=seed, device=device, dtype=dtype, prefetch=prefetch,
                         views=views, shard=shard)
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
        self._pool = None

    def epoch(self, epoch, start=0):
        """Iterate over batches ``start..`` of ``epoch``: decoded in ``workers`` processes (:mod:`.workers`, started
        by the first epoch and kept), or in the loader thread (``workers`` = 0); the same batches either way."""
        if self.workers > 0:
            from . import workers
            if self._pool is None or not self._pool.alive:
                self._pool = workers.Pool(self)
            return self._pool.batches(self, epoch, start)
        return super().epoch(epoch, start)

    def close(self):
        """Stop the worker processes and free their shared memory (a later epoch starts new ones)."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def worker_state(self):
        """This loader as a worker process needs it (pickled): on the host, without caches or workers."""
        st = dict(self.__dict__)
        st.update(device=None, workers=0, _pool=None, uint8_batches=self.uploads_uint8())
        for k in ("_mean_dev", "_mean_chwn", "_decoded", "_staging", "_stream", "_released"):
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

    def batch_size_of(self, b):
        """The number of images in batch ``b`` (the last evaluation batch may be short)."""
        return min(self.batch_size, len(self.images) - b * self.batch_size)

    def uploads_uint8(self):
        """Whether batches cross to the device as uint8 crops, converted there (a GPU: a quarter of float32's bytes
        over PCIe), rather than finished on the host."""
        return self.device is not None and self.device.xp is not np

    def _build(self, epoch, b, order=None, view=None):
        dev = self.device
        if self.uploads_uint8():  # a GPU: uint8 crops go up, the float work runs there
            return self._finish(*self._host_part(epoch, b, order, view))
        x, y = self.host_batch(epoch, b, order, view)
        if dev is None:
            return x, y
        with dev.activate():
            return dev.adopt(x), dev.asarray(np.asarray(y, np.int32))

    def host_batch(self, epoch, b, order=None, view=None, out=None):
        """Batch ``b`` of ``epoch`` (``view``: one of :meth:`view_list`) on the host: (x (C, H, W, N) in ``out``,
        or a new array of the loader's dtype, labels (N,) int32)."""
        idx, crops, light = self._crops(epoch, b, order, view)
        if out is None:
            out = np.empty((3, *self.out_hw, len(idx)), self.dtype)
        self._layout(crops, light, out)
        return out, self.labels[idx]

    def _host_part(self, epoch, b, order=None, view=None):
        idx, crops, light = self._crops(epoch, b, order, view)
        light = np.zeros((len(idx), 3), np.float32) if light is None else light
        return crops[..., :3], light, None, self.labels[idx]

    def crops_chwn(self, epoch, b, order=None, view=None, out=None):
        """Batch ``b``'s crops as a GPU loader uploads them: (x (3, H, W, N) uint8 in ``out`` or a new array,
        labels (N,), lighting offsets (N, 3) float32 or None); :meth:`convert` finishes them on the device."""
        idx, crops, light = self._crops(epoch, b, order, view)
        if out is None:
            out = np.empty((3, *self.out_hw, len(idx)), np.uint8)
        out[...] = crops[..., :3].transpose(3, 1, 2, 0)
        return out, self.labels[idx], light

    def _staging_batch(self, n):
        """A reused (n, oh, ow, 4) uint8 batch, images an odd number of cache lines apart (class doc)."""
        oh, ow = self.out_hw
        size = oh * ow * 4
        lines = -(-size // self.STAGING_ALIGN)
        stride = (lines + (lines + 1) % 2) * self.STAGING_ALIGN
        buf = getattr(self, "_staging", None)
        if buf is None or buf.shape[0] < n:
            buf = self._staging = np.empty((max(n, self.batch_size), stride), np.uint8)
        return buf[:n, :size].reshape(n, oh, ow, 4)

    def _crops(self, epoch, b, order, view):
        """(image indices, their crops (n, oh, ow, 4) uint8 in the staging batch, flipped where drawn, lighting
        offsets (n, 3) float32 or None) of batch ``b``: training draws per image (:meth:`view_params`); a test
        ``view`` crops the batch decoded once for its ten views."""
        order = self.order(epoch) if order is None else order
        idx = self.batch_indices(order, b)
        oh, ow = self.out_hw
        crops = self._staging_batch(len(idx))
        dst = crops.view(np.uint32)[..., 0]  # whole pixels: a mirrored copy is a uint32 copy
        if view is not None:
            (oy, ox), f = view
            cached = getattr(self, "_decoded", None)
            if cached is None or cached[0] != (epoch, b):
                full = np.empty((len(idx), *self.images.shape[1:3]), np.uint32)
                for j, i in enumerate(idx):
                    full[j] = self.images.image_rgbx(int(i)).view(np.uint32)[..., 0]
                cached = self._decoded = ((epoch, b), full)
            src = cached[1][:, oy:oy + oh, ox:ox + ow]
            dst[...] = src[:, :, ::-1] if f else src
            return idx, crops, None
        light = np.zeros((len(idx), 3), np.float32) if self.train and self.lighting > 0 else None
        for j, i in enumerate(idx):
            (oy, ox), f, lo = self.view_params(epoch, int(i))
            src = augment.crop(self.images.image_rgbx(int(i)).view(np.uint32)[..., 0], oy, ox, self.out_hw)
            dst[j] = src[:, ::-1] if f else src
            if light is not None:
                light[j] = lo
        return idx, crops, light

    def _layout(self, crops, light, out):
        """``out`` (3, oh, ow, n) = ``(crops - mean + light) * scale`` in float32 (the same operations in the same
        order as :meth:`_finish`), transposed from the staging's (n, oh, ow, 4), ``rows`` rows a pass."""
        _, oh, ow, n = out.shape
        mean = self._mean_chwn_on(None)
        lt = None if light is None else np.ascontiguousarray(light.T)[:, None, None, :]
        rows = max(1, self.CHUNK_BYTES // (12 * ow * n))
        tmp = None if out.dtype == np.float32 else np.empty((3, rows, ow, n), np.float32)
        for r0 in range(0, oh, rows):
            r1 = min(oh, r0 + rows)
            o = out[:, r0:r1] if tmp is None else tmp[:, :r1 - r0]
            np.subtract(crops[:, r0:r1, :, :3].transpose(3, 1, 2, 0), mean[:, r0:r1] if mean.shape[1] > 1 else mean,
                        out=o)
            if lt is not None:
                o += lt
            if self.scale != 1.0:
                o *= self.scale
            if tmp is not None:
                out[:, r0:r1] = o

    def _finish(self, img, light, valid, labels):
        """Device part of (n, oh, ow, 3) uint8 crops: see :meth:`convert`."""
        # transposed to CHWN while uint8 (a quarter of the bytes of float32), then the float work in place in that
        # layout: the same operations per element, in the same order, as on NHWC
        return self.convert(np.ascontiguousarray(np.asarray(img).transpose(3, 1, 2, 0)), light, labels)

    def convert(self, chwn, light, labels):
        """Device part: ``chwn`` (3, H, W, N) uint8 (host memory, or already on the device) to float, minus the
        mean's centre crop, plus each image's lighting offset, times the scale: the host path's operations
        (:meth:`_layout`) in its order, each rounded to float32, so the same bits."""
        dev = self.device
        xp, put, adopt = _array_tools(dev)
        with (dev.activate() if dev is not None else contextlib.nullcontext()):
            x = put(chwn).astype(np.float32)
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
