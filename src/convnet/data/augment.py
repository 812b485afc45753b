"""Augmentation as pure functions: no loader, no state; every random choice comes from an explicit generator.

Images are ``(H, W, C)`` (one) or ``(N, H, W, C)`` (a batch), uint8 or float. Two families:

* per batch (the in-memory datasets, unchanged since the first loader): :func:`crop_flip_batch` draws the crops,
  zero-pad shifts and flips of a whole batch from one generator keyed on (seed, epoch, batch index);
* per image (prepared datasets, the paper's ImageNet recipe): :func:`image_rng` keys a generator on
  (seed, epoch, image index), so an image's view depends on neither the batch it lands in nor the number of
  workers; :func:`train_view` draws, in this order, the crop offset, the flip and the lighting coefficients.

The paper's recipe (cuda-convnet2's ``make-data`` / ``convdata.py``): a random ``out_hw`` crop of the 256x256
image and a horizontal flip with probability 1/2; mean subtraction with the **centre** ``out_hw`` crop of the
full-image mean whatever the crop position (:func:`centre_crop` of the mean); PCA lighting: per image draw
``a ~ N(0, std)`` (std 0.1) per eigenvector and add ``eigvecs @ (a * sqrt(eigvals))`` to every pixel, in 0-255
units, as cuda-convnet2 (the paper writes ``a_i * lambda_i``; on a 0-1 pixel scale, as fb.resnet.torch, that is
about half as strong - see docs/training.md); test time: :func:`ten_crops`.
"""
from __future__ import annotations

import numpy as np

LIGHTING_STD = 0.1  # the paper's sigma of the PCA lighting coefficients


# --- keys ----------------------------------------------------------------------------------------------------
def image_rng(seed, epoch, index):
    """The generator of image ``index``'s random choices in ``epoch`` (a pure function of the three)."""
    return np.random.default_rng([int(seed), int(epoch), int(index), 13])


# --- geometry ------------------------------------------------------------------------------------------------
def crop(img, oy, ox, out_hw):
    """The ``out_hw`` window of ``img`` (H, W, C) at row ``oy``, column ``ox`` (a view)."""
    oh, ow = out_hw
    h, w = img.shape[:2]
    if not (0 <= oy <= h - oh and 0 <= ox <= w - ow):
        raise ValueError(f"crop {oh}x{ow} at ({oy}, {ox}) outside a {h}x{w} image")
    return img[oy:oy + oh, ox:ox + ow]


def centre_offset(hw, out_hw):
    """(row, column) of the centre ``out_hw`` window in an ``hw`` image (rounded down, as cuda-convnet2)."""
    return (hw[0] - out_hw[0]) // 2, (hw[1] - out_hw[1]) // 2


def centre_crop(img, out_hw):
    return crop(img, *centre_offset(img.shape[:2], out_hw), out_hw)


def random_offset(rng, hw, out_hw):
    """A uniformly random (row, column) of an ``out_hw`` window in an ``hw`` image (two draws: row, column)."""
    return int(rng.integers(0, hw[0] - out_hw[0] + 1)), int(rng.integers(0, hw[1] - out_hw[1] + 1))


def hflip(img):
    """Mirror image (left-right) of (H, W, C), or of a batch (N, H, W, C) per image (a view)."""
    return img[..., :, ::-1, :]


def random_flip(rng):
    """True with probability 1/2 (one draw)."""
    return bool(rng.random() < 0.5)


def ten_crop_views(hw, out_hw):
    """The paper's 10 test views of an ``hw`` image as [((row, column), mirrored)]: the four corners (top-left,
    top-right, bottom-left, bottom-right), the centre, then the same five mirrored (what :func:`ten_crops` and the
    loaders' 10-crop evaluation use)."""
    (h, w), (oh, ow) = hw, out_hw
    five = [(0, 0), (0, w - ow), (h - oh, 0), (h - oh, w - ow), centre_offset(hw, out_hw)]
    return [(o, False) for o in five] + [(o, True) for o in five]


def ten_crops(img, out_hw):
    """The paper's test views, (10, oh, ow, C): the four corners (top-left, top-right, bottom-left,
    bottom-right), the centre, then the mirror images of the five in the same order."""
    views = [crop(img, y, x, out_hw) for (y, x), _ in ten_crop_views(img.shape[:2], out_hw)[:5]]
    views = np.stack(views)
    return np.concatenate([views, hflip(views)])


# --- colour --------------------------------------------------------------------------------------------------
def pca(pixels_or_cov):
    """(eigvals descending, eigvecs as columns) of the RGB covariance (a 3x3 matrix, or pixels (..., 3))."""
    a = np.asarray(pixels_or_cov, np.float64)
    cov = a if a.shape == (3, 3) else np.cov(a.reshape(-1, 3), rowvar=False, bias=True)
    val, vec = np.linalg.eigh(cov)
    order = np.argsort(val)[::-1]
    return val[order], vec[:, order]


def lighting_alphas(rng, std=LIGHTING_STD, k=3):
    """The per-image coefficients a ~ N(0, std), one per eigenvector (k draws)."""
    return rng.normal(0.0, std, size=k)


def lighting_offset(alphas, eigvals, eigvecs):
    """The RGB offset added to every pixel: ``eigvecs @ (alphas * sqrt(eigvals))`` (cuda-convnet2's scaling;
    eigvals in squared pixel units), float32 (3,)."""
    mag = np.sqrt(np.maximum(np.asarray(eigvals, np.float64), 0.0))
    return (np.asarray(eigvecs, np.float64) @ (np.asarray(alphas, np.float64) * mag)).astype(np.float32)


def subtract_mean(img, mean):
    """``img - mean`` in float32 (mean broadcast: an image of the same size, or per channel)."""
    return np.asarray(img, np.float32) - np.asarray(mean, np.float32)


# --- composed ------------------------------------------------------------------------------------------------
def train_params(rng, hw, out_hw, *, flip=True, lighting_std=LIGHTING_STD):
    """The random choices of one training view, drawn in a fixed order: (oy, ox), flipped, alphas (3,) or None."""
    oy, ox = random_offset(rng, hw, out_hw)
    f = random_flip(rng) if flip else False
    alphas = lighting_alphas(rng, lighting_std) if lighting_std > 0 else None
    return (oy, ox), f, alphas


def train_view(img, rng, out_hw, *, mean=None, eigvals=None, eigvecs=None, flip=True, lighting_std=LIGHTING_STD):
    """One training view of ``img`` (H, W, 3) uint8 as float32 (oh, ow, 3): random crop, flip, minus ``mean``
    (an (oh, ow, 3) image - the centre crop of the full mean - or per channel), plus the PCA lighting offset."""
    (oy, ox), f, alphas = train_params(rng, img.shape[:2], out_hw, flip=flip,
                                       lighting_std=lighting_std if eigvals is not None else 0.0)
    x = crop(img, oy, ox, out_hw)
    if f:
        x = hflip(x)
    x = np.asarray(x, np.float32)
    if mean is not None:
        x = x - np.asarray(mean, np.float32)
    if alphas is not None:
        x = x + lighting_offset(alphas, eigvals, eigvecs)
    return x


def crop_flip_batch(img, out_hw, rng=None, *, pad=0, flip=False, part=None):
    """Crops and flips of a batch ``img`` (N, H, W, C) to ``out_hw``, all drawn from one generator ``rng``
    (None: evaluation - centre crops, no padding, no flips). Draw order: row offsets (n), column offsets (n) if
    the image is larger than ``out_hw``; then the zero-pad shifts in [-pad, pad] (rows, columns) if ``pad``; then
    n flips if ``flip``. ``part=(first, total)``: ``img`` is images ``first..first+N-1`` of a batch of ``total``
    (a data-parallel rank's shard): the draws are the whole batch's (n = ``total``), and these images get theirs.
    Returns ``(out, geom, valid)``: ``out`` the cropped batch (``img`` itself when nothing changes, then ``geom`` is
    None), ``geom`` the (rows (N, oh), cols (N, ow)) image indices of every output pixel
    (to apply the same transform to the mean image), ``valid`` the (N, oh, ow) mask of pixels inside the image
    (None without padding; outside pixels are 0)."""
    n, h, w, c = img.shape
    first, n_draw = (0, n) if part is None else (int(part[0]), int(part[1]))
    if not 0 <= first <= n_draw - n:
        raise ValueError(f"part {part}: images {first}..{first + n - 1} are not in a batch of {n_draw}")
    sel = slice(first, first + n)
    oh, ow = out_hw
    train = rng is not None
    p = pad if train else 0
    if (h, w) != (oh, ow):  # crop a larger image down to the model's size: random in training, else centre
        if train:
            oy = rng.integers(0, h - oh + 1, size=n_draw)[sel]
            ox = rng.integers(0, w - ow + 1, size=n_draw)[sel]
        else:
            oy = np.full(n, (h - oh) // 2)
            ox = np.full(n, (w - ow) // 2)
    else:
        oy = np.zeros(n, np.int64)
        ox = np.zeros(n, np.int64)
    rows = oy[:, None] + np.arange(oh)  # image row of each output row, per image
    cols = ox[:, None] + np.arange(ow)
    if p > 0:  # zero-pad by p (zero = the mean after subtraction) and crop back to the same size
        rows = rows + rng.integers(-p, p + 1, size=n_draw)[sel, None]
        cols = cols + rng.integers(-p, p + 1, size=n_draw)[sel, None]
    flipped = False
    if train and flip:
        f = rng.random(n_draw)[sel] < 0.5
        cols[f] = cols[f, ::-1]
        flipped = bool(f.any())
    if p == 0 and (h, w) == (oh, ow) and not flipped:
        return img, None, None
    rc, cc = np.clip(rows, 0, h - 1), np.clip(cols, 0, w - 1)
    out = img[np.arange(n)[:, None, None], rc[:, :, None], cc[:, None, :]]
    valid = None
    if p > 0:
        valid = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
        out[~valid] = 0
    return out, (rc, cc), valid
