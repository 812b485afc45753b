"""A tiny generated ImageNet-style tree for the prepare/reader tests (used by tests/test_imagenet.py)."""
import io
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ["n001", "n002", "n003"]
COLOURS = [(200, 40, 40), (40, 200, 40), (40, 40, 200)]
# the synset list in a devkit-like order that is not the sorted one: integer ground truth indexes it (1-based)
SYNSETS = [("n003", "blue thing, bluish"), ("n001", "red thing"), ("n002", "green thing")]


def _img(rng, w, h, colour):
    base = np.array(colour, np.float64)
    x = base + rng.normal(0, 25, size=(h, w, 3))
    return Image.fromarray(np.clip(x, 0, 255).astype(np.uint8))


def _jpeg(im, **kw):
    b = io.BytesIO()
    im.save(b, "JPEG", quality=90, **kw)
    return b.getvalue()


def make_tree(root, seed=0):
    """train/<wnid>/*.JPEG (varied sizes and aspect ratios, a grayscale, a CMYK, a PNG named .JPEG, a truncated
    and an unreadable file), val/ flat with an ILSVRC-style ground-truth file and a synset list."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    sizes = [(40, 30), (30, 50), (64, 64), (37, 33), (90, 20)]
    for c, (wnid, col) in enumerate(zip(CLASSES, COLOURS)):
        d = root / "train" / wnid
        d.mkdir(parents=True)
        for k, (w, h) in enumerate(sizes):
            (d / f"{wnid}_{k}.JPEG").write_bytes(_jpeg(_img(rng, w, h, col)))
    t = root / "train"
    (t / "n001" / "n001_gray.JPEG").write_bytes(_jpeg(_img(rng, 48, 36, (128, 128, 128)).convert("L")))
    (t / "n001" / "n001_cmyk.JPEG").write_bytes(_jpeg(_img(rng, 36, 48, COLOURS[0]).convert("CMYK")))
    png = io.BytesIO()
    _img(rng, 50, 40, COLOURS[1]).save(png, "PNG")
    (t / "n002" / "n002_png.JPEG").write_bytes(png.getvalue())
    whole = _jpeg(_img(rng, 64, 48, COLOURS[2]))
    (t / "n003" / "n003_truncated.JPEG").write_bytes(whole[:len(whole) // 2])
    (t / "n003" / "n003_garbage.JPEG").write_bytes(b"this is not an image" * 10)
    (t / "n003" / "notes.txt").write_text("not an image file: ignored")
    v = root / "val"
    v.mkdir()
    truth = []
    for k in range(6):
        c = k % 3
        (v / f"ILSVRC2012_val_{k + 1:08d}.JPEG").write_bytes(_jpeg(_img(rng, 30 + 7 * k, 60 - 5 * k, COLOURS[c])))
        truth.append(1 + [s[0] for s in SYNSETS].index(CLASSES[c]))
    (root / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{t}\n" for t in truth))
    (root / "synsets.txt").write_text("".join(f"{w} {n}\n" for w, n in SYNSETS))
    return root
