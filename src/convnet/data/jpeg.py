"""JPEG decoding of prepared shards: one function, two engines, the faster one by default.

* :func:`decode` ``(buf) -> (H, W, 3) uint8`` RGB: what the dataset's indexing and the statistics use;
* :func:`decode_rgbx` ``(buf) -> (H, W, 4) uint8`` (R, G, B, one unspecified byte): the loader's hot path; with
  4-byte pixels its crop and mirror copies move whole pixels as uint32 (a mirrored copy of 3-byte pixels costs
  about 4x more in NumPy), and both engines produce this layout at no extra cost.

Engines (measured on 256x256 quality-95 shards, one core of a 2-vCPU AMD EPYC; docs/results.md):

* ``simplejpeg``: libjpeg-turbo's TurboJPEG API in a wheel (``pip install convnet[fastjpeg]``); about 300 us an
  image, decoded straight from the shard's memory map;
* ``pillow``: Pillow (a dependency; its wheels bundle libjpeg-turbo too); about 400 us an image: the same library
  behind ``Image.open``'s parsing in Python, a decoder fed in chunks, and the export to NumPy.

Both run libjpeg-turbo's accurate integer IDCT with fancy upsampling: identical pixels on the shards prepare
writes (and within :data:`TOLERANCE` on CMYK JPEGs; Pillow built against another libjpeg may differ by a level).
``fastdct`` / ``fastupsample`` gained nothing measurable (the accurate IDCT is SIMD already) and are not used.
DCT-domain scaling (decoding at k/8 of the size) is not used either: it resizes the whole 256x256 image, while the
paper's 224 view is a crop of it at full resolution; no binding here decodes only the crop's region.

Choice: the ``decoder`` argument, else ``$CONVNET_JPEG_DECODER``, else ``auto``: simplejpeg when it imports,
Pillow otherwise. simplejpeg hands what libjpeg-turbo cannot decode (a PNG named .JPEG, an unusual JPEG) to Pillow;
what neither can decode raises Pillow's error.
"""
from __future__ import annotations

import functools
import io
import os

import numpy as np

from .base import DataError

ENV = "CONVNET_JPEG_DECODER"
ENGINES = ("simplejpeg", "pillow")
TOLERANCE = 1  # max |simplejpeg - Pillow| per channel level, measured on the test fixture's JPEGs (CMYK: 1)


@functools.lru_cache(maxsize=None)
def _simplejpeg_module():
    """simplejpeg, or None (asked once: a failing import searches the whole path every time)."""
    try:
        import simplejpeg
    except ImportError:
        return None
    return simplejpeg


def available():
    """The engines that import here, fastest first."""
    return tuple(e for e in ENGINES if e != "simplejpeg" or _simplejpeg_module() is not None)


def resolve(decoder=None):
    """The engine name for ``decoder`` (None: ``$CONVNET_JPEG_DECODER``, else ``auto``); DataError if unknown or
    not installed."""
    name = (decoder or os.environ.get(ENV) or "auto").strip().lower()
    if name == "auto":
        return available()[0]
    if name not in ENGINES:
        raise DataError(f"unknown JPEG decoder '{name}' (from {'the decoder option' if decoder else ENV}); "
                        f"expected auto, {' or '.join(ENGINES)}")
    if name not in available():
        raise DataError("JPEG decoder simplejpeg is not installed: pip install 'convnet[fastjpeg]' (or "
                        "simplejpeg), or use pillow")
    return name


def describe(decoder=None):
    """'simplejpeg 1.9.0 (libjpeg-turbo)' / 'pillow 13.0.0 (libjpeg-turbo 3.2.0)': the engine and its version."""
    name = resolve(decoder)
    if name == "simplejpeg":
        return f"simplejpeg {_simplejpeg_module().__version__} (libjpeg-turbo)"
    import PIL
    from PIL import features
    turbo = features.check_feature("libjpeg_turbo")
    lib = features.version("libjpeg_turbo" if turbo else "jpg")
    return f"pillow {PIL.__version__} ({'libjpeg-turbo' if turbo else 'libjpeg'} {lib})"


def _pillow(buf, channels):
    from PIL import Image
    with Image.open(io.BytesIO(buf)) as im:
        if im.mode != "RGB":
            im = im.convert("RGB")  # L, CMYK (Pillow undoes Adobe's inversion), P, ...
        if channels == 3:
            return np.asarray(im)
        im.load()  # Pillow keeps RGB as 4 bytes a pixel: its RGBX export is a plain copy
        return np.frombuffer(im.tobytes("raw", "RGBX"), np.uint8).reshape(im.size[1], im.size[0], 4)


def _simplejpeg(buf, channels):
    sj = _simplejpeg_module()
    try:
        return sj.decode_jpeg(buf, colorspace="RGB" if channels == 3 else "RGBX")
    except ValueError:  # not a JPEG libjpeg-turbo reads (a PNG, damaged data): Pillow decodes it or says why not
        return _pillow(bytes(buf), channels)


_DECODE = {"simplejpeg": _simplejpeg, "pillow": _pillow}


def decode(buf, decoder=None):
    """JPEG (or any Pillow-readable) bytes -> (H, W, 3) uint8 RGB, with ``decoder`` (module doc)."""
    return _DECODE[resolve(decoder)](buf, 3)


def decode_rgbx(buf, decoder=None):
    """Bytes -> (H, W, 4) uint8: R, G, B and a fourth byte of no meaning (module doc)."""
    return _DECODE[resolve(decoder)](buf, 4)
