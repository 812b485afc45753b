"""Datasets, augmentation and the background loader.

Datasets are held in memory as uint8 images ``(N, H, W, C)`` + int32 labels; batches leave the loader as
float32 ``(C, H, W, N)`` (the layout contract) on the training device.

* ``fashion-mnist``: the four IDX files (gzipped or not) from Zalando's Fashion-MNIST, e.g. Debian's
  ``dataset-fashion-mnist`` package in /usr/share/datasets/fashion-mnist.
* ``cifar10``: the "python version" batch directory (data_batch_1..5, test_batch; pickled dicts with b'data'
  (n, 3072) uint8 planes R,G,B and b'labels').
* ``synthetic``: class-dependent random patterns + noise at any shape (learnable; for smoke tests and speed).

Augmentation, done per batch in a background thread: mean-image subtraction, scaling, random crops (from a larger
image to the data layer's size, and/or from a zero-padded image back to its size) and horizontal flips. Every
random choice is drawn from a generator keyed on (seed, epoch, batch index), so a batch's content does not depend
on threads, prefetch depth or on whether the run was resumed.
"""
from __future__ import annotations

import contextlib
import gzip
import pickle
import queue
import threading
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


class DataError(RuntimeError):
    """Missing or malformed data; the message says what is wrong and how to get the data."""


@dataclass
class Dataset:
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


# ------------------------------------------------------------------------------------------------------------
# IDX (Fashion-MNIST)
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


# ------------------------------------------------------------------------------------------------------------
# CIFAR-10 (python pickle batches)
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


# ------------------------------------------------------------------------------------------------------------
def synthetic(shape=(3, 32, 32), classes=10, n_train=1280, n_test=256, seed=0):
    """Learnable synthetic data: each class has a smooth random prototype; images = prototype + noise."""
    c, h, w = shape
    rng = np.random.default_rng([seed, 12345])
    ph, pw = max(1, h // 4), max(1, w // 4)
    protos = rng.uniform(0, 255, size=(classes, ph, pw, c))
    protos = np.repeat(np.repeat(protos, -(-h // ph), axis=1), -(-w // pw), axis=2)[:, :h, :w, :]

    protos = (protos * 0.6).astype(np.float32)

    def make(n, r):
        y = r.integers(0, classes, size=n).astype(np.int32)
        x = np.empty((n, h, w, c), np.uint8)
        for i in range(0, n, 256):  # chunks: 224x224 images in float would need gigabytes
            j = min(n, i + 256)
            noise = r.random(size=(j - i, h, w, c), dtype=np.float32) * np.float32(255 * 0.4)
            x[i:j] = np.clip(protos[y[i:j]] + noise, 0, 255).astype(np.uint8)
        return x, y

    tx, ty = make(n_train, np.random.default_rng([seed, 1]))
    vx, vy = make(n_test, np.random.default_rng([seed, 2]))
    return Dataset("synthetic", tx, ty, vx, vy, [f"class{i}" for i in range(classes)])


DATASETS = ("fashion-mnist", "cifar10", "synthetic")
_ALIASES = {"fmnist": "fashion-mnist", "fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist",
            "cifar": "cifar10", "cifar-10": "cifar10"}


def load_dataset(name, data_dir=None, *, shape=(1, 28, 28), classes=10, seed=0, synthetic_size=(1280, 256)):
    key = _ALIASES.get(name.lower(), name.lower())
    if key == "fashion-mnist":
        return load_fashion_mnist(data_dir)
    if key == "cifar10":
        return load_cifar10(data_dir)
    if key == "synthetic":
        return synthetic(shape, classes, *synthetic_size, seed=seed)
    raise DataError(f"unknown dataset '{name}' (known: {', '.join(DATASETS)})")


# ------------------------------------------------------------------------------------------------------------
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
        img = self.images[idx]
        n, h, w, c = img.shape
        oh, ow = self.out_hw
        p = self.crop_pad if self.train else 0
        rng = np.random.default_rng([self.seed, epoch, b, 11]) if self.train else None
        if (h, w) != (oh, ow):  # crop a larger image down to the model's size: random in training, else centre
            if self.train:
                oy = rng.integers(0, h - oh + 1, size=n)
                ox = rng.integers(0, w - ow + 1, size=n)
            else:
                oy = np.full(n, (h - oh) // 2)
                ox = np.full(n, (w - ow) // 2)
        else:
            oy = np.zeros(n, np.int64)
            ox = np.zeros(n, np.int64)
        rows = oy[:, None] + np.arange(oh)  # image row of each output row, per image
        cols = ox[:, None] + np.arange(ow)
        if p > 0:  # zero-pad by p (zero = the mean after subtraction) and crop back to the same size
            rows = rows + rng.integers(-p, p + 1, size=n)[:, None]
            cols = cols + rng.integers(-p, p + 1, size=n)[:, None]
        flipped = False
        if self.train and self.flip:
            f = rng.random(n) < 0.5
            cols[f] = cols[f, ::-1]
            flipped = bool(f.any())
        if p == 0 and (h, w) == (oh, ow) and not flipped:
            return img, None, None, self.labels[idx]
        rc, cc = np.clip(rows, 0, h - 1), np.clip(cols, 0, w - 1)
        out = img[np.arange(n)[:, None, None], rc[:, :, None], cc[:, None, :]]
        valid = None
        if p > 0:
            valid = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
            out[~valid] = 0
        return out, (rc, cc), valid, self.labels[idx]

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
