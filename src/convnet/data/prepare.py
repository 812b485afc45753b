"""Prepare an ImageNet / ImageFolder tree once: ``python -m convnet.data.prepare imagenet SRC DST``.

Every image: decoded by Pillow from its content (a PNG named .JPEG is read as PNG), converted to RGB (grayscale,
CMYK, palette, alpha), its centred square of side min(w, h) resized to ``size`` x ``size`` (= shorter side to
``size`` then centre crop, in continuous coordinates) with Pillow's BOX filter when shrinking (exact area
averaging, OpenCV's INTER_AREA as cuda-convnet2; cheaper than LANCZOS and without its ringing) and BICUBIC when
enlarging (cuda-convnet2: CUBIC), then re-encoded as JPEG quality ``quality`` (95, Pillow's default 4:2:0
chroma, as cuda-convnet2's OpenCV) into shards (:mod:`.shards`). A file that cannot be decoded (truncated,
unreadable) is reported by path and skipped, counted in the manifest.

Then, over the training shards (the images as training decodes them, by Pillow whatever engine training uses:
:mod:`.jpeg`'s two agree within a level): the per-pixel mean image and the RGB covariance's eigenvalues/eigenvectors
(all pixels of all training images), into ``stats.npz``; a checksum (sha256)
per shard; and last ``manifest.json`` (written last: its presence means the preparation is complete).

Parallel over ``--jobs`` processes (default: all cores), one shard per task, with a progress bar. Resumable: the
plan (file list + settings) is fixed in ``plan.json``; a rerun skips shards already present (each is written to a
temporary name and renamed, so a present shard is complete) and removes stale temporary files.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from ..dirlock import hold
from .base import DataError, process_context
from .imagenet import MANIFEST, STATS, scan_source
from .jpeg import decode
from .shards import Shard, sha256, write_shard

FORMAT = "convnet-shards/1"


def _atomic_write(path, data: bytes):
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_rgb(path):
    """The image at ``path`` as an RGB Pillow image (format from the content)."""
    from PIL import Image
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # EXIF / ICC warnings on odd files are not our business
        im = Image.open(path)
        im.load()  # decodes now: a truncated file raises OSError here
        if im.mode in ("P", "LA", "PA") or (im.mode == "RGBA"):
            im = im.convert("RGBA").convert("RGB")
        elif im.mode in ("I;16", "I;16B", "I;16L", "I"):
            im = Image.fromarray((np.asarray(im, np.float64) / 257).clip(0, 255).astype(np.uint8)).convert("RGB")
        elif im.mode != "RGB":
            im = im.convert("RGB")  # L, 1, CMYK (Pillow undoes Adobe's inverted CMYK), YCbCr
    return im


def resize_centre(im, size):
    """Shorter side to ``size`` and centre ``size`` x ``size`` crop, in one resample of the centred square."""
    from PIL import Image
    w, h = im.size
    s = min(w, h)
    if s == size:  # no resampling: an integer crop
        x0, y0 = (w - s) // 2, (h - s) // 2
        return im.crop((x0, y0, x0 + s, y0 + s))
    box = ((w - s) / 2, (h - s) / 2, (w + s) / 2, (h + s) / 2)
    return im.resize((size, size), Image.BOX if s > size else Image.BICUBIC, box=box)


def encode(im, quality):
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _make_shard(task):
    """Worker: prepare one shard; returns (file, images, skipped)."""
    root, dst, file, split, items, size, quality = task
    jpegs, labels, names, skipped = [], [], [], []
    for rel, label in items:
        try:
            jpegs.append(encode(resize_centre(load_rgb(Path(root) / rel), size), quality))
        except Exception as e:  # noqa: BLE001 - any undecodable file is reported and skipped
            skipped.append([rel, f"{type(e).__name__}: {' '.join(str(e).split())}"])
            continue
        labels.append(label)
        names.append(rel)
    write_shard(Path(dst) / file, jpegs, labels, {"split": split, "names": names, "skipped": skipped})
    return file, len(items)


def _shard_stats(path):
    """Worker: (sum image float64 (H, W, 3), pixel sum (3,), sum of outer products (3, 3), images) of a shard."""
    sh = Shard(path)
    acc = s1 = s2 = None
    for i in range(len(sh)):
        x = decode(sh.jpeg(i), "pillow")  # the stats do not depend on whether simplejpeg is installed
        if acc is None:
            acc = np.zeros(x.shape, np.float64)
            s1, s2 = np.zeros(3, np.float64), np.zeros((3, 3), np.float64)
        acc += x
        p = x.reshape(-1, 3).astype(np.float64)
        s1 += p.sum(0)
        s2 += p.T @ p
    return acc, s1, s2, len(sh)


def _checksum(path):
    return Path(path).name, sha256(path), Path(path).stat().st_size


def _pool_map(fn, tasks, jobs, bar=None, weight=None):
    if jobs <= 1 or len(tasks) <= 1:
        for t in tasks:
            r = fn(t)
            if bar is not None:
                bar.update(weight(t) if weight else 1)
            yield r
        return
    with process_context().Pool(min(jobs, len(tasks))) as pool:
        for t, r in zip(tasks, pool.imap(fn, tasks)):
            if bar is not None:
                bar.update(weight(t) if weight else 1)
            yield r


def prepare(kind, src, dst, *, size=256, quality=95, shard_size=1024, jobs=None, val_labels=None, synsets=None,
            progress=True, log=print):
    """Prepare ``src`` into ``dst`` (see the module doc); returns the manifest (a dict). ``dst`` is locked for the
    whole preparation (:mod:`convnet.dirlock`): a second one into it is refused, naming this process."""
    jobs = jobs or len(os.sched_getaffinity(0))
    dst = Path(dst)
    _check_destination(src, dst)
    with hold(dst, DataError, f"DST {dst}"):
        tree = scan_source(src, val_labels=val_labels, synsets=synsets)
        return _prepare(kind, src, dst, tree, size=size, quality=quality, shard_size=shard_size, jobs=jobs,
                        progress=progress, log=log)


def _check_destination(src, dst):
    """DataError for a DST inside the source tree (its shards would sit among the images, or in a class folder)."""
    try:
        s, d = Path(src).resolve(), dst.resolve()
    except OSError:  # a name the file system refuses: hold() names the problem
        return
    if s.is_dir() and (d == s or s in d.parents):
        raise DataError(f"DST {dst} is inside the source tree {src}: choose a destination outside SRC")


def _check_classes(dst, train_files, classes):
    """DataError for a training class none of whose images could be read (an empty class, which training cannot
    learn), naming it and why its first file was skipped."""
    counts = np.zeros(len(classes), np.int64)
    skipped = []
    for f in train_files:
        sh = Shard(dst / f)
        counts += np.bincount(sh.labels, minlength=len(classes))
        skipped += sh.meta["skipped"]
    empty = [c for c, k in zip(classes, counts) if k == 0]
    if empty:
        first = next((f" (first: {r}: {w})" for r, w in skipped if r.startswith(f"train/{empty[0]}/")), "")
        raise DataError(f"{len(empty)} training class(es) have no readable image ({', '.join(empty[:5])}"
                        f"{', ...' if len(empty) > 5 else ''}): every file of train/{empty[0]} was skipped{first}; "
                        f"replace the files or remove the class folder, and prepare again into an empty DST")


def _prepare(kind, src, dst, tree, *, size, quality, shard_size, jobs, progress, log):
    from tqdm import tqdm
    settings = {"format": FORMAT, "size": size, "quality": quality, "shard_size": shard_size,
                "resize": "centred square of side min(w, h) -> size x size; Pillow BOX when shrinking, BICUBIC "
                          "when enlarging", "encoder": "Pillow JPEG"}
    listing = hashlib.sha256(json.dumps([tree.classes, tree.items]).encode()).hexdigest()
    plan = {**settings, "source": str(Path(src).resolve()), "files_sha256": listing}
    plan_path = dst / "plan.json"
    if plan_path.is_file():
        old = json.loads(plan_path.read_text())
        diff = [k for k in plan if k != "source" and old.get(k) != plan[k]]
        if diff:
            raise DataError(f"{dst} holds a preparation with other {', '.join(diff)} (other settings or source "
                            f"files): use another DST, or delete {dst} first")
    else:
        _atomic_write(plan_path, json.dumps(plan, indent=1).encode())
    for p in dst.glob("*.tmp-*"):  # interrupted writes of an earlier run
        p.unlink()
    tasks, files = [], {}
    for split, items in tree.items.items():
        files[split] = []
        for k in range(0, len(items), shard_size):
            f = f"{split}-{k // shard_size:05d}.shard"
            files[split].append(f)
            if not (dst / f).is_file():
                tasks.append((str(tree.root), str(dst), f, split, items[k:k + shard_size], size, quality))
    manifest_path = dst / MANIFEST
    if not tasks and manifest_path.is_file():
        m = json.loads(manifest_path.read_text())
        if all((dst / s["file"]).is_file() and (dst / s["file"]).stat().st_size == s["bytes"]
               for sp in m["splits"].values() for s in sp["shards"]) and \
                (dst / STATS).is_file() and sha256(dst / STATS) == m["stats"]["sha256"]:  # else the stats again
            log(f"{dst}: already prepared ({m['splits']['train']['images']} train / {m['splits']['val']['images']} "
                f"val images)")
            return m
    manifest_path.unlink(missing_ok=True)  # no longer describes the shards
    done = sum(len(v) for v in files.values()) - len(tasks)
    t0 = time.time()
    n_img = sum(len(t[4]) for t in tasks)
    log(f"preparing {sum(len(v) for v in tree.items.values())} images of {len(tree.classes)} classes from {src} "
        f"into {dst}: {len(tasks)} shards to write" + (f" ({done} already done)" if done else "") + f", {jobs} jobs")
    with tqdm(total=n_img, unit="img", disable=not progress, desc="shards", dynamic_ncols=True) as bar:
        for _ in _pool_map(_make_shard, tasks, jobs, bar, weight=lambda t: len(t[4])):
            pass
    _check_classes(dst, files["train"], tree.classes)
    all_files = [f for v in files.values() for f in v]
    with tqdm(total=len(files["train"]), unit="shard", disable=not progress, desc="mean/PCA") as bar:
        acc = s1 = s2 = None
        n = 0
        for a, b, c, k in _pool_map(_shard_stats, [str(dst / f) for f in files["train"]], jobs, bar):
            if a is None:
                continue
            acc = a if acc is None else acc + a
            s1 = b if s1 is None else s1 + b
            s2 = c if s2 is None else s2 + c
            n += k
    if n == 0:
        raise DataError(f"no training image of {src} could be read")
    sums = list(_pool_map(_checksum, [str(dst / f) for f in all_files], jobs))
    npix = n * acc.shape[0] * acc.shape[1]
    mu = s1 / npix
    cov = s2 / npix - np.outer(mu, mu)
    val, vec = np.linalg.eigh(cov)
    order = np.argsort(val)[::-1]
    eigvals, eigvecs = val[order], vec[:, order]
    eigvecs *= np.where(eigvecs.sum(0) < 0, -1.0, 1.0)  # a sign convention: components sum positive
    buf = io.BytesIO()
    np.savez(buf, mean=(acc / n).astype(np.float32), eigvals=eigvals, eigvecs=eigvecs, cov=cov, images=n)
    _atomic_write(dst / STATS, buf.getvalue())
    checks = {f: (h, b) for f, h, b in sums}
    splits = {}
    for split, fl in files.items():
        per_class = np.zeros(len(tree.classes), np.int64)
        skipped, shards = [], []
        for f in fl:
            sh = Shard(dst / f)
            per_class += np.bincount(sh.labels, minlength=len(tree.classes))
            skipped += sh.meta["skipped"]
            shards.append({"file": f, "images": len(sh), "bytes": checks[f][1], "sha256": checks[f][0]})
        splits[split] = {"images": int(per_class.sum()), "per_class": dict(zip(tree.classes, per_class.tolist())),
                         "skipped_count": len(skipped), "skipped": skipped, "shards": shards}
    m = {**settings, "dataset": kind, "source": str(Path(src).resolve()),
         "classes": [{"wnid": c, "name": nm} for c, nm in zip(tree.classes, tree.names)], "splits": splits,
         "stats": {"file": STATS, "images": n, "sha256": sha256(dst / STATS), "channel_mean": mu.tolist(),
                   "eigvals": eigvals.tolist(), "eigvecs": eigvecs.tolist()}}
    _atomic_write(manifest_path, json.dumps(m, indent=1).encode())
    for split, s in splits.items():
        for rel, why in s["skipped"]:
            log(f"skipped {rel}: {why}")
    log(f"done in {time.time() - t0:.0f} s: {splits['train']['images']} train / {splits['val']['images']} val images "
        f"in {len(all_files)} shards ({sum(c[1] for c in checks.values()) / 2**20:.1f} MiB), "
        f"{splits['train']['skipped_count'] + splits['val']['skipped_count']} files skipped; {manifest_path}")
    return m


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m convnet.data.prepare", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", choices=("imagenet", "imagefolder"), help="imagenet (ILSVRC) or any ImageFolder tree")
    ap.add_argument("src", help="source tree: SRC/train/<class>/*, SRC/val/ (class folders, or flat + ground truth)")
    ap.add_argument("dst", help="output directory (shards, stats.npz, manifest.json)")
    ap.add_argument("--size", type=int, default=256, help="stored image side (default 256, the paper's)")
    ap.add_argument("--quality", type=int, default=95, help="JPEG quality of the shards (default 95)")
    ap.add_argument("--shard-size", type=int, default=1024, help="images per shard (default 1024, ~100 MB)")
    ap.add_argument("--jobs", type=int, default=None, help="worker processes (default: all cores)")
    ap.add_argument("--val-labels", help="ground truth of a flat val folder (default: found in SRC)")
    ap.add_argument("--synsets", help="'<wnid> <name>' lines: class names, and the order of integer ground truth")
    ap.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    a = ap.parse_args(argv)
    for name, v, lo, hi in (("--size", a.size, 8, 4096), ("--quality", a.quality, 1, 100),
                            ("--shard-size", a.shard_size, 1, 1 << 20), ("--jobs", a.jobs or 1, 1, 4096)):
        if not lo <= v <= hi:
            ap.error(f"{name} must be in {lo}..{hi}, got {v}")
    try:
        prepare(a.kind, a.src, a.dst, size=a.size, quality=a.quality, shard_size=a.shard_size, jobs=a.jobs,
                val_labels=a.val_labels, synsets=a.synsets, progress=a.progress)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, an I/O error
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume (finished shards are kept)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
