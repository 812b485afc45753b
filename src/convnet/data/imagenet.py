"""ImageNet and any ImageFolder tree: the source layouts (read by :mod:`.prepare`) and the prepared reader.

Source layouts (``SRC``):

* ``SRC/train/<class>/*.JPEG`` (also .jpg, .png, ...; the format is read from the content, not the name):
  classes are the sorted folder names (ImageNet: WordNet ids);
* ``SRC/val/<class>/*`` (or ``validation/``) in class folders, or flat ``SRC/val/*`` with a ground-truth file
  (``--val-labels``, else found in SRC): ``LOC_val_solution.csv`` (Kaggle: ImageId,PredictionString whose first
  word is the wnid); lines ``<file> <label>`` (label a class folder name, or a 0-based index in sorted class
  order, as Caffe's val.txt); or one label per line for the files in sorted order (the devkit's
  ``ILSVRC2012_validation_ground_truth.txt``): a class name, or a 1-based position in the synset list - for the
  devkit that list must be in its ILSVRC2012_ID order (meta.mat);
* a synset list (``--synsets``, else ``LOC_synset_mapping.txt`` / ``synsets.txt`` / ``synset_words.txt`` / the
  devkit's ``meta.mat`` in SRC, SRC/val or the devkit's data folder): ``<wnid> <human-readable name>`` per line, or
  meta.mat's leaf synsets in ILSVRC2012_ID order (read with SciPy); it names the classes (kept in the manifest, shown
  in plots) and orders the devkit's integer labels.

A prepared directory (``python -m convnet.data.prepare imagenet SRC DST``) is read by :func:`load_prepared`
(registered as ``imagenet``; aliases ``imagefolder``, ``prepared``).
"""
from __future__ import annotations

import csv
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import jpeg
from .base import DataError, Dataset, register
from .shards import ShardImages

IMAGE_EXTS = {".jpeg", ".jpg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff"}
SYNSET_FILES = ("LOC_synset_mapping.txt", "synsets.txt", "synset_words.txt", "meta.mat")
VAL_LABEL_FILES = ("LOC_val_solution.csv", "ILSVRC2012_validation_ground_truth.txt", "val.txt", "val_labels.txt")
MANIFEST = "manifest.json"
STATS = "stats.npz"


# --- source trees --------------------------------------------------------------------------------------------
def _images_in(d):
    return sorted(p.name for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


def read_devkit_meta(path):
    """[(wnid, words)] of the ILSVRC2012 devkit's ``meta.mat``: its leaf synsets (the 1000 classes) in ILSVRC2012_ID
    order, the order of the integer labels in ``ILSVRC2012_validation_ground_truth.txt``. Needs SciPy."""
    try:
        from scipy.io import loadmat
    except ImportError:
        raise DataError(f"{path}: reading the devkit's meta.mat needs SciPy (pip install scipy), or give --synsets "
                        f"FILE with '<wnid> <name>' lines in ILSVRC2012_ID order") from None
    try:
        entries = np.atleast_1d(loadmat(str(path), squeeze_me=True, struct_as_record=False)["synsets"])
        leaves = sorted((int(e.ILSVRC2012_ID), str(e.WNID), str(e.words)) for e in entries
                        if int(e.num_children) == 0)
    except (KeyError, AttributeError, ValueError, TypeError, OSError) as exc:
        raise DataError(f"{path}: not an ILSVRC devkit meta.mat (a 'synsets' struct array with ILSVRC2012_ID, WNID, "
                        f"words, num_children): {exc}") from None
    if [i for i, _, _ in leaves] != list(range(1, len(leaves) + 1)):
        raise DataError(f"{path}: the leaf synsets' ILSVRC2012_IDs are not 1..{len(leaves)}")
    return [(wnid, words) for _, wnid, words in leaves]


def read_synsets(path):
    """[(wnid, name)] in file order from ``<wnid> <name...>`` lines, or from the devkit's ``meta.mat``."""
    if Path(path).suffix.lower() == ".mat":
        return read_devkit_meta(path)
    out = []
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.strip().split(maxsplit=1)
        if parts:
            out.append((parts[0], parts[1] if len(parts) > 1 else parts[0]))
    if not out:
        raise DataError(f"{path}: empty synset list")
    return out


def _find_file(src, names, given):
    if given is not None:
        p = Path(given)
        if not p.is_file():
            raise DataError(f"{p}: no such file")
        return p
    for d in (src, src / "val", src / "devkit" / "data", src / "ILSVRC2012_devkit_t12" / "data"):
        for n in names:
            if (d / n).is_file():
                return d / n
    return None


def _val_labels(path, files, classes, synsets):
    """{file: class index} for a flat val folder from a ground-truth file (formats in the module doc)."""
    cidx = {c: i for i, c in enumerate(classes)}

    def cls(tok, where, one_based_synset):
        if tok in cidx:
            return cidx[tok]
        if tok.lstrip("-").isdigit():
            k = int(tok)
            if one_based_synset:
                if synsets is None:
                    raise DataError(f"{path}: integer labels need the synset list in the ground truth's order "
                                    f"(--synsets FILE)")
                if not 1 <= k <= len(synsets):
                    raise DataError(f"{where}: label {k} outside 1..{len(synsets)} of the synset list")
                tok = synsets[k - 1][0]
                if tok not in cidx:
                    raise DataError(f"{where}: synset {tok} is not a training class")
                return cidx[tok]
            if not 0 <= k < len(classes):
                raise DataError(f"{where}: label {k} outside 0..{len(classes) - 1}")
            return k
        raise DataError(f"{where}: unknown class '{tok}'")

    labels = {}
    if path.suffix.lower() == ".csv":
        with open(path, newline="") as f:
            for n, row in enumerate(csv.reader(f), 1):
                if n == 1 and row and row[0] == "ImageId":
                    continue
                if len(row) >= 2 and row[1].split():
                    labels[row[0]] = cls(row[1].split()[0], f"{path}:{n}", False)
        stems = {Path(f).stem: f for f in files}
        labels = {stems[k]: v for k, v in labels.items() if k in stems}
    else:
        lines = [(n, l.split()) for n, l in enumerate(path.read_text().splitlines(), 1) if l.strip()]
        if lines and len(lines[0][1]) >= 2:  # "<file> <label>"
            names = set(files)
            labels = {Path(t[0]).name: cls(t[1], f"{path}:{n}", False) for n, t in lines if Path(t[0]).name in names}
        else:  # one label per line, files in sorted order
            if len(lines) != len(files):
                raise DataError(f"{path}: {len(lines)} labels for {len(files)} images in the flat val folder")
            labels = {f: cls(t[0], f"{path}:{n}", True) for f, (n, t) in zip(files, lines)}
    missing = [f for f in files if f not in labels]
    if missing:
        raise DataError(f"{path}: no label for {len(missing)} of {len(files)} val images (first: {missing[0]})")
    return labels


@dataclass
class SourceTree:
    classes: list  # folder names (wnids), the class order
    names: list  # human-readable names (the synset list's, else the folder names)
    items: dict  # split -> [(path relative to root, label)]
    root: Path


def scan_source(src, *, val_labels=None, synsets=None):
    """The images and labels of an ImageFolder/ImageNet tree; DataError for a missing split, an empty class, a
    flat val folder without its ground truth, or labels that do not fit."""
    src = Path(src)
    if not src.is_dir():
        raise DataError(f"{src}: no such directory")
    train = src / "train"
    if not train.is_dir():
        raise DataError(f"{src}: no train/ folder (expected SRC/train/<class>/*.JPEG and SRC/val/)")
    classes = sorted(p.name for p in train.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{train}: no class folders (expected train/<class>/*.JPEG)")
    items = {"train": []}
    for i, c in enumerate(classes):
        files = _images_in(train / c)
        if not files:
            raise DataError(f"{train / c}: empty class (no image files)")
        items["train"] += [(f"train/{c}/{f}", i) for f in files]
    syn_path = _find_file(src, SYNSET_FILES, synsets)
    syn = read_synsets(syn_path) if syn_path is not None else None
    named = dict(syn or [])
    if synsets is not None and not named.keys() & set(classes):  # given, but it would name nothing
        raise DataError(f"--synsets {synsets}: none of its {len(named)} entries is a class folder of {train} "
                        f"(expected '<wnid> <name>' lines, e.g. '{classes[0]} <name>')")
    names = [named.get(c, c) for c in classes]
    val = next((src / n for n in ("val", "validation") if (src / n).is_dir()), None)
    if val is None:
        raise DataError(f"{src}: no val/ folder (class folders, or flat with a ground-truth file)")
    sub = sorted(p.name for p in val.iterdir() if p.is_dir())
    if sub:
        if val_labels is not None:
            raise DataError(f"--val-labels {val_labels} is not used: {val} has class folders, whose names are the "
                            f"labels; leave --val-labels out")
        unknown = [c for c in sub if c not in classes]
        if unknown:
            raise DataError(f"{val}: class folder '{unknown[0]}' is not a training class")
        cidx = {c: i for i, c in enumerate(classes)}
        items["val"] = [(f"{val.name}/{c}/{f}", cidx[c]) for c in sub for f in _images_in(val / c)]
    else:
        files = _images_in(val)
        lab_path = _find_file(src, VAL_LABEL_FILES, val_labels)
        if lab_path is None:
            raise DataError(f"{val} is flat ({len(files)} images) and no ground-truth file was found: pass "
                            f"--val-labels FILE (LOC_val_solution.csv, ILSVRC2012_validation_ground_truth.txt "
                            f"with --synsets, or '<file> <label>' lines)")
        try:
            labels = _val_labels(lab_path, files, classes, syn)
        except UnicodeDecodeError:
            raise DataError(f"{lab_path}: not a ground-truth file (not text; expected LOC_val_solution.csv, "
                            f"'<file> <label>' lines or one label per line)") from None
        items["val"] = [(f"{val.name}/{f}", labels[f]) for f in files]
    if not items["val"]:
        raise DataError(f"{val}: no validation images")
    return SourceTree(classes, names, items, src)


# --- prepared data -------------------------------------------------------------------------------------------
@dataclass
class PreparedDataset(Dataset):
    """A prepared directory: images decoded on indexing; the stored mean image and RGB eigen-decomposition."""
    mean: np.ndarray = None  # (H, W, 3) float32
    eigvals: np.ndarray = None  # (3,) descending, squared 0-255 units
    eigvecs: np.ndarray = None  # (3, 3), columns
    manifest: dict = None

    def mean_image(self):
        return self.mean


def read_manifest(d):
    p = Path(d) / MANIFEST
    if not p.is_file():
        raise DataError(f"{d}: not a prepared dataset (no {MANIFEST}); run `python -m convnet.data.prepare "
                        f"imagenet SRC {d}` (again, if it was interrupted)")
    try:
        return json.loads(p.read_text())
    except ValueError as e:
        raise DataError(f"{p}: not valid JSON ({e})") from None


_REPORTED = set()


def _report_decoder(name):
    """One stderr line per process and engine: which JPEG decoder the run uses, and how to get the faster one."""
    if name in _REPORTED:
        return
    _REPORTED.add(name)
    hint = "" if name == "simplejpeg" else "; pip install 'convnet[fastjpeg]' decodes 15-30% faster"
    print(f"JPEG decoder: {jpeg.describe(name)} (${jpeg.ENV} = auto | simplejpeg | pillow){hint}", file=sys.stderr)


def load_prepared(data_dir, decoder=None):
    """The prepared directory ``data_dir``; ``decoder``: the JPEG engine (:func:`.jpeg.resolve`)."""
    if data_dir is None:
        raise DataError("imagenet needs --data DIR: a directory made by `python -m convnet.data.prepare imagenet "
                        "SRC DIR` from an ImageNet/ImageFolder tree SRC (train/<class>/*.JPEG, val/)")
    d = Path(data_dir)
    m = read_manifest(d)
    hw = (m["size"], m["size"])
    parts = {}
    for split in ("train", "val"):
        shards = m["splits"][split]["shards"]
        for s in shards:
            p = d / s["file"]
            if not p.is_file() or p.stat().st_size != s["bytes"]:
                raise DataError(f"{p}: missing or of another size than the manifest says; run prepare again")
        imgs = ShardImages([d / s["file"] for s in shards], hw, decoder)
        parts[split] = (imgs, imgs.labels)
    try:
        with np.load(d / STATS) as st:
            mean, eigvals, eigvecs = st["mean"], st["eigvals"], st["eigvecs"]
    except (OSError, KeyError, ValueError) as e:
        raise DataError(f"{d / STATS}: cannot read the mean image / PCA stats ({e}); run prepare again") from None
    bad = [k for k, a in (("mean image", mean), ("eigenvalues", eigvals), ("eigenvectors", eigvecs))
           if not np.isfinite(a).all()]
    if bad:  # every input would become NaN (found otherwise only when a checkpoint refuses the state)
        raise DataError(f"{d / STATS}: the {' and '.join(bad)} hold NaN or infinite values; run `python -m "
                        f"convnet.data.prepare` again with the same SRC and {d} (it recomputes the stats)")
    _report_decoder(parts["train"][0].decoder)
    names = [c["name"].split(",")[0].strip() or c["wnid"] for c in m["classes"]]
    return PreparedDataset(m.get("dataset", "imagenet"), parts["train"][0], parts["train"][1], parts["val"][0],
                           parts["val"][1], names, mean=mean.astype(np.float32), eigvals=eigvals, eigvecs=eigvecs,
                           manifest=m)


@register("imagenet", "imagefolder", "prepared")
def _read(data_dir, **_):
    return load_prepared(data_dir)
