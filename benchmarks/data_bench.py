"""Images/s of the train-time data path on prepared JPEG shards, per JPEG decoder, beside a plain Pillow + NumPy
baseline.

    python benchmarks/data_bench.py [--data PREPARED_DIR] [--images 2000] [--workers 1,2] [--batch 128]
                                    [--decoders simplejpeg,pillow] [--no-write]

Rows (all on the same images, in one run):

* ``pillow+numpy baseline``: per image ``Image.open(BytesIO(jpeg)).convert("RGB")``, ``np.asarray``, a random
  crop, a flip, float32 minus the mean, plus a lighting offset; the batch stacked and transposed to
  ``(C, H, W, N)``: what a straightforward loader does;
* ``decode only`` per decoder (:mod:`convnet.data.jpeg`; every installed one, or ``--decoders``): the loader's
  decode call (:func:`convnet.data.jpeg.decode_rgbx`) on every image's bytes, one core: the floor of the full path;
* ``loader, in-thread`` per decoder: :class:`convnet.data.PreparedLoader` with ``workers=0`` and no prefetch: the
  full path (read the memory-mapped shard, decode, crop, flip, lighting, mean, batch in layout) on one core;
* ``loader, N workers`` per decoder: the same with N persistent decoding processes (batches written into shared
  memory, copied out by the consumer), timed after a first epoch has started them; ``first_batch_s``: that first
  epoch's wait for its first batch (the workers' start, once per loader, and their first batch).

Without ``--data`` it makes a synthetic prepared set first: ``--images`` smooth random 256x256 images, JPEG
quality 95 like ``convnet.data.prepare``, in shards of 500, in a temporary folder. Results go to
benchmarks/results/data-<cpu>-<date>.{json,md} (benchmarks/common.py's format) unless ``--no-write``.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (imports convnet: installed, else this checkout's src/)
from convnet.data import augment, jpeg, load_dataset  # noqa: E402
from convnet.data.loader import PreparedLoader  # noqa: E402
from convnet.data.shards import ShardImages, write_shard  # noqa: E402


def synthetic_shards(dst, n, size=256, per_shard=500, seed=0):
    """``n`` smooth random RGB images (upsampled noise + gradients: JPEG sizes like photographs) in shards."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    paths = []
    yy, xx = np.mgrid[0:size, 0:size] / size
    for s in range(0, n, per_shard):
        jpegs = []
        for i in range(s, min(n, s + per_shard)):
            small = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            img = np.asarray(Image.fromarray(small).resize((size, size), Image.BICUBIC), np.float32)
            img += 60 * np.sin(2 * np.pi * (rng.random() * 4 * yy + rng.random() * 4 * xx))[..., None]
            img += rng.normal(0, 8, img.shape)
            buf = io.BytesIO()
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=95)
            jpegs.append(buf.getvalue())
        p = dst / f"train-{s // per_shard:05d}.shard"
        write_shard(p, jpegs, np.zeros(len(jpegs), np.int32), {"split": "train", "names": [], "skipped": []})
        paths.append(p)
    return ShardImages(paths, (size, size))


def baseline(images, idx, crop, mean, eig, seed=0):
    """The plain Pillow + NumPy loader of one batch (module doc)."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    h, w = images.hw
    out = []
    for i in idx:
        with Image.open(io.BytesIO(images.jpeg(int(i)))) as im:
            x = np.asarray(im.convert("RGB"))
        oy, ox = rng.integers(0, h - crop + 1), rng.integers(0, w - crop + 1)
        x = x[oy:oy + crop, ox:ox + crop]
        if rng.random() < 0.5:
            x = x[:, ::-1]
        x = x.astype(np.float32) - mean
        x += eig[1] @ (rng.normal(0, 0.1, 3) * np.sqrt(eig[0]))
        out.append(x)
    return np.ascontiguousarray(np.stack(out).transpose(3, 1, 2, 0), np.float32)


def rate(fn, n_images, min_s):
    """images/s of ``fn()`` (which handles ``n_images``), repeated until ``min_s`` seconds passed."""
    t0, done = time.perf_counter(), 0
    while True:
        fn()
        done += n_images
        dt = time.perf_counter() - t0
        if dt >= min_s:
            return done / dt


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", help="a prepared directory (default: make a synthetic one)")
    ap.add_argument("--images", type=int, default=2000, help="synthetic images (default 2000)")
    ap.add_argument("--size", type=int, default=256, help="synthetic image size (default 256)")
    ap.add_argument("--crop", type=int, default=224, help="crop size (default 224)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--workers", default=None, help="worker counts, e.g. 1,2 (default 1..cores)")
    ap.add_argument("--decoders", default=None, help="JPEG decoders, e.g. pillow (default: every installed one)")
    ap.add_argument("--min-seconds", type=float, default=3.0, help="time per row (at least one pass)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--no-write", action="store_true", help="do not write benchmarks/results/")
    a = ap.parse_args(argv)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    workers = [int(w) for w in a.workers.split(",")] if a.workers else list(range(1, cores + 1))
    decoders = [jpeg.resolve(d) for d in a.decoders.split(",")] if a.decoders else list(jpeg.available())
    rows = []

    def row(path, decoder, processes, r, first_batch_s=None):
        rows.append({"path": path, "decoder": decoder, "processes": processes, "images_per_s": r,
                     "per_process": r / processes, "first_batch_s": first_batch_s})
        print(f"{path} [{decoder}], {processes} process{'es' if processes > 1 else ''}: {r:,.0f} images/s"
              + ("" if first_batch_s is None else f" (first batch after {first_batch_s:.2f} s)"), flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        if a.data:
            ds = load_dataset("imagenet", a.data)
            images, mean, eig = ds.train_x, ds.mean_image(), (ds.eigvals, ds.eigvecs)
        else:
            t = time.perf_counter()
            images = synthetic_shards(tmp, a.images, a.size)
            print(f"made {a.images} synthetic {a.size}x{a.size} JPEGs in {time.perf_counter() - t:.1f} s", flush=True)
            mean = np.full((a.size, a.size, 3), 120, np.float32)
            eig = augment.pca(np.cov(np.stack([images.image(i) for i in range(0, len(images), 50)])
                                     .reshape(-1, 3).astype(np.float64), rowvar=False))
        n = len(images)
        bs = min(a.batch, n)
        crop = (a.crop, a.crop)
        mean_c = augment.centre_crop(mean, crop)
        jpeg_mb = sum(int(s.offsets[-1]) for s in images.shards) / 1e6
        order = np.arange(n)
        r = rate(lambda: [baseline(images, order[i:i + bs], a.crop, mean_c, eig)
                          for i in range(0, n - bs + 1, bs)], (n // bs) * bs, a.min_seconds)
        row("pillow+numpy baseline", "pillow", 1, r)
        per_epoch = (n // bs) * bs
        for dec in decoders:
            imgs = ShardImages([s.path for s in images.shards], images.hw, dec)
            bufs = [imgs.jpeg(i) for i in range(n)]
            row("decode only", dec, 1, rate(lambda: [jpeg.decode_rgbx(b, dec) for b in bufs], n, a.min_seconds))
            for w in [0] + workers:
                with PreparedLoader(imgs, imgs.labels, bs, train=True, out_hw=crop, mean=mean, eig=eig, lighting=0.1,
                                    flip=True, seed=0, prefetch=0 if w == 0 else 4, workers=w) as ld:
                    first = None
                    if w:
                        t = time.perf_counter()
                        it = ld.epoch(0)  # starts the workers (kept for the timed epochs)
                        next(it)
                        first = time.perf_counter() - t
                        for _ in it:
                            pass
                    r = rate(lambda: [None for _ in ld.epoch(1)], per_epoch, a.min_seconds)
                row("loader, in-thread" if w == 0 else f"loader, {w} worker{'s' if w > 1 else ''}", dec, max(1, w), r,
                    first)
    machine = common.cpu_name()
    import PIL
    print(f"\n{n} images {images.hw[0]}x{images.hw[1]} ({jpeg_mb / n * 1000:.0f} kB JPEG each), crop {a.crop}, "
          f"batch {bs}; {machine}; Python {platform.python_version()}; "
          f"{'; '.join(jpeg.describe(d) for d in decoders)}\n")
    columns = ["path", "decoder", "processes", "images_per_s", "per_process", "first_batch_s"]
    print(common.markdown_table(rows, columns))
    extra = {"images": n, "size": list(images.hw), "crop": a.crop, "batch": bs, "jpeg_kb": jpeg_mb / n * 1000,
             "decoders": {d: jpeg.describe(d) for d in decoders}, "pillow": PIL.__version__,
             "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}
    if a.json:
        Path(a.json).write_text(json.dumps({"machine": machine, **extra, "rows": rows}, indent=1))
    if not a.no_write:
        from convnet.devices import get_device
        print(f"wrote {common.write_results('data', get_device('numpy'), rows, columns, extra)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
