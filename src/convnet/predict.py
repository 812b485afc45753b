"""Classify pictures with a trained run: the top classes of each image, with their names and probabilities.

    python -m convnet.predict runs/alexnet photo.jpg other.png [--eval-crops 10] [--top 5]

Each image is decoded (any format Pillow reads; grey for a one-channel model) and prepared as the run's dataset
was: a prepared (ImageNet-style) directory's images had their shorter side resized to the directory's size and the
centre square kept; an in-memory dataset's (Fashion-MNIST, CIFAR-10) are the size of the run's mean image; a run
imported from torchvision (a per-channel mean) resizes to 256 for a 224 input (torchvision's evaluation transform).
Then the test views the evaluation uses (the centre crop, or with ``--eval-crops 10`` the four corners, the centre
and their mirror images, the softmax outputs averaged), minus the mean as the evaluation subtracts it, times the data
layer's scale.

Class names: the synset words of the run's prepared directory (its manifest; ``--data DIR`` when it moved),
Fashion-MNIST's or CIFAR-10's names, else class indices. An image that cannot be read is a one-line error naming
it (exit status 2).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from . import checkpoint as ckpt
from .data import DataError, augment
from .data.cifar10 import CIFAR10_CLASSES
from .data.fashion_mnist import FASHION_CLASSES
from .data.prepare import load_rgb, resize_centre
from .devices import DeviceUnavailable, get_device
from .model_file import ModelFileError, build_net
from .torchvision_weights import RESIZE

PREPARED = ("imagenet", "imagefolder", "prepared")  # dataset names of prepared directories (PreparedLoader)
NAMED = {"fashion-mnist": FASHION_CLASSES, "fmnist": FASHION_CLASSES, "fashion_mnist": FASHION_CLASSES,
         "fashionmnist": FASHION_CLASSES, "cifar10": CIFAR10_CLASSES, "cifar": CIFAR10_CLASSES,
         "cifar-10": CIFAR10_CLASSES}
CHUNK = 16  # images per forward pass (times the views)


class PredictError(ValueError):
    """An image, run or setting that cannot be used; the message names it."""


class Predictor:
    """A run's net, mean, scale and image preparation. ``Predictor(run, device=None, data=None)``; ``data``: the
    prepared directory when it is not where the run's config says."""

    def __init__(self, run, *, device=None, data=None):
        state = ckpt.load(run)
        self.path = state["path"]
        meta = state["meta"]
        cfg = meta.get("config") or {}
        text = cfg.get("model_text")
        if not isinstance(text, str):
            raise PredictError(f"checkpoint '{self.path}' has no model-file text")
        try:
            self.device = get_device(device)
        except DeviceUnavailable:
            raise
        except ValueError as e:  # a malformed name
            raise PredictError(f"--device {device}: {e}") from None
        self.net, _ = build_net(text, cfg.get("model_source") or "model.cfg", device=self.device)
        try:
            self.net.load_state_dict(state["params"])
        except (KeyError, ValueError) as e:
            raise ckpt.CheckpointError(f"checkpoint '{self.path}' does not fit its model: {e}") from None
        d = self.net.data_layer
        self.channels, self.out_hw, self.scale = d.channels, tuple(d.size), np.float32(d.scale)
        if self.channels not in (1, 3):
            raise PredictError(f"the run's data layer reads {self.channels} channels; pictures have 1 (grey) or 3")
        dataset = str(cfg.get("dataset") or "").lower()
        self.prepared = dataset in PREPARED
        manifest = self._manifest(data or cfg.get("data")) if self.prepared else None
        self.mean = None if state["mean"] is None else np.asarray(state["mean"], np.float32)
        self.image_hw = self._image_size(manifest)
        self.classes = self._class_names(dataset, manifest)

    @staticmethod
    def _manifest(d):
        if not d:
            return None
        p = Path(d) / "manifest.json"
        try:
            return json.loads(p.read_text())
        except (OSError, ValueError):
            return None

    def _image_size(self, manifest):
        """(H, W) of the images as the dataset stored them: the prepared size, the mean image's, or for a
        per-channel mean torchvision's (256 for a 224 input)."""
        if manifest is not None and "size" in manifest:
            return (int(manifest["size"]),) * 2
        if self.mean is not None and self.mean.ndim == 3:
            return tuple(self.mean.shape[:2])
        if self.mean is not None and self.mean.ndim == 1:  # per channel: a run imported from torchvision
            return tuple(int(round(s * RESIZE)) for s in self.out_hw)
        return self.out_hw

    def _class_names(self, dataset, manifest):
        n = self.net.num_classes
        if manifest is not None and len(manifest.get("classes", ())) == n:
            return [f"{c['wnid']} {c['name']}".strip() if c.get("name") else c["wnid"] for c in manifest["classes"]]
        names = NAMED.get(dataset)
        if names is not None and len(names) == n:
            return list(names)
        return None

    def name(self, k):
        return self.classes[k] if self.classes is not None else f"class {k}"

    # --- images ------------------------------------------------------------------------------------------------
    def load(self, path):
        """The image at ``path`` as the dataset stored it: (H, W, C) uint8."""
        try:
            im = load_rgb(path)
        except Exception as e:  # noqa: BLE001 - Pillow raises many kinds for a bad file: all mean unreadable
            why = getattr(e, "strerror", None) or " ".join(str(e).split()) or type(e).__name__
            raise PredictError(f"cannot read image '{path}': {why}") from None
        if self.channels == 1:
            im = im.convert("L")
        h, w = self.image_hw
        if h == w:
            im = resize_centre(im, h)
        else:  # the centre box of the stored aspect ratio, resized
            from PIL import Image
            iw, ih = im.size
            s = min(iw / w, ih / h)
            box = ((iw - s * w) / 2, (ih - s * h) / 2, (iw + s * w) / 2, (ih + s * h) / 2)
            im = im.resize((w, h), Image.BICUBIC, box=box)
        a = np.asarray(im, np.uint8)
        return a[:, :, None] if a.ndim == 2 else a

    def views(self, img, crops):
        """The network's inputs (C, oh, ow, V) float32 of one stored image: its ``crops`` (1 or 10) views minus the
        mean as the evaluation subtracts it (a prepared set's: the mean's centre crop; an in-memory set's: the
        mean's same view), times the scale."""
        hw, (oh, ow) = img.shape[:2], self.out_hw
        if hw[0] < oh or hw[1] < ow:
            raise PredictError(f"the images are {hw[0]}x{hw[1]}, smaller than the model's {oh}x{ow} input")
        views = [(augment.centre_offset(hw, self.out_hw), False)] if crops == 1 else \
            augment.ten_crop_views(hw, self.out_hw)
        m = self.mean
        if m is not None and m.ndim == 3 and self.prepared and m.shape[:2] != self.out_hw:
            m = augment.centre_crop(m, self.out_hw)  # whatever the view (cuda-convnet2's rule, PreparedLoader)
        out = []
        for (oy, ox), f in views:
            x = augment.crop(img, oy, ox, self.out_hw)
            x = (x[:, ::-1] if f else x).astype(np.float32)
            if m is not None:
                if m.ndim != 3:  # per channel
                    x -= m.reshape(-1)
                elif self.prepared:
                    x -= m
                else:  # the mean's same view (Loader)
                    mv = augment.crop(m, oy, ox, self.out_hw)
                    x -= mv[:, ::-1] if f else mv
            if self.scale != 1.0:
                x *= self.scale
            out.append(x)
        return np.ascontiguousarray(np.stack(out).transpose(3, 1, 2, 0), np.float32)

    def probabilities(self, paths, crops=1):
        """(images, classes) float32: the views' averaged softmax outputs of each image."""
        if crops not in (1, 10):
            raise PredictError(f"--eval-crops {crops}: 1 or 10")
        imgs = [self.load(p) for p in paths]  # every file is read before any work: a bad one fails fast
        out = []
        for i in range(0, len(imgs), CHUNK):
            part = imgs[i:i + CHUNK]
            x = np.concatenate([self.views(im, crops) for im in part], axis=3)  # image-major: views of one adjacent
            dev = self.device
            p = dev.to_numpy(self.net.forward(dev.asarray(x, self.net.dtype))).astype(np.float32)
            p = p.reshape(p.shape[0], len(part), crops)
            acc = p[:, :, 0].copy()
            for k in range(1, crops):  # summed in view order, then averaged (as the evaluation does)
                acc = acc + p[:, :, k]
            out.append((acc * np.float32(1 / crops)) if crops > 1 else acc)
        return np.concatenate(out, axis=1).T

    def top(self, paths, k=5, crops=1):
        """[[(class index, name, probability)] * min(k, classes)] per image, most probable first."""
        probs = self.probabilities(paths, crops)
        k = min(k, probs.shape[1])
        res = []
        for p in probs:
            idx = np.argsort(-p, kind="stable")[:k]
            res.append([(int(i), self.name(int(i)), float(p[i])) for i in idx])
        return res


def predict(run, images, *, eval_crops=1, top=5, device=None, data=None):
    """The ``top`` classes of each image (:meth:`Predictor.top`)."""
    return Predictor(run, device=device, data=data).top(list(images), top, eval_crops)


def main(argv=None, log=print):
    p = argparse.ArgumentParser(prog="python -m convnet.predict", description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a run directory (or its checkpoint.npz)")
    p.add_argument("images", nargs="+", help="image files (JPEG, PNG, ...)")
    p.add_argument("--eval-crops", type=int, choices=(1, 10), default=1, dest="eval_crops",
                   help="1: the centre crop; 10: four corners + centre and their mirror images, averaged")
    p.add_argument("--top", type=int, default=5, help="how many classes to show (default 5)")
    p.add_argument("--device", help="cpu | numpy | emu | cuda | cuda:N (default: cuda if usable, else cpu)")
    p.add_argument("--data", help="the run's prepared directory, for its class names (default: the run's --data)")
    args = p.parse_args(argv)
    if args.top < 1:
        p.error("--top must be at least 1")
    try:
        pred = Predictor(args.run, device=args.device, data=args.data)
        results = pred.top(args.images, args.top, args.eval_crops)
    except (PredictError, ckpt.CheckpointError, ModelFileError, DataError, DeviceUnavailable) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    if pred.classes is None and pred.prepared:
        print("note: no class names: the run's prepared directory is not readable here (give --data DIR)",
              file=sys.stderr)
    for path, rows in zip(args.images, results):
        log(path)
        for i, name, prob in rows:
            log(f"  {prob:8.2%}  {name}" + (f"  ({i})" if pred.classes is not None else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
