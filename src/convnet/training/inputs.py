"""What a run is built from, each checked before training starts: its devices, the net against them (dtype,
memory), the dataset against the model, and the loaders."""
from __future__ import annotations

import warnings

import numpy as np

from ..config import ConfigError
from ..data import DataError, Loader, PreparedDataset, PreparedLoader, augment, load_dataset
from ..data.workers import default_workers
from ..devices import KINDS, device_class, get_device
from ..distributed import rank_device
from ..graph import resolve_precision
from ..layers import ModelWarning
from ..memory import check_fits
from ..model_file import build_net
from ..placement import resolve_devices


def run_devices(cfg, world):
    """(the net's device, the towers' devices or None): ``--devices`` maps the model's towers (``device = i``
    layers) onto devices, its first is the net's device (the data, and layers without a device); a data-parallel
    rank (``world``) runs the whole net on its one device."""
    if world is not None:
        if cfg.devices is not None:
            raise ConfigError(f"--devices {cfg.devices}: a model's towers on several devices do not combine with "
                              f"--distributed (each rank runs the whole net on its one device)")
        return rank_device(cfg.device, world, get_device), None
    try:  # ValueError: a malformed name (DeviceUnavailable: a real device that is not usable here)
        return resolve_devices(cfg.device, cfg.devices, names=("--device", "--devices"))
    except ValueError as e:
        raise ConfigError(str(e)) from None


def check_net(cfg, device, towers, images_per_step, log):
    """ConfigError before anything is allocated: a --dtype that one of the net's devices cannot compute in, a
    --precision one of them cannot run (``cfg.precision`` None becomes the devices' default: the run's settings
    record the precision used), or a net that does not fit in their free memory for ``images_per_step`` (checked on
    a shapes-only build of the net, whose model warnings are logged)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ModelWarning)
        shapes, _ = build_net(cfg.model_text, cfg.model_source or cfg.model, device=device, devices=towers,
                              dtype=cfg.dtype, init_params=False)
    for w in caught:
        if issubclass(w.category, ModelWarning):
            log(f"warning: {w.message}")
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    dtype = np.dtype(cfg.dtype)
    bad = sorted({l.device for l in shapes.order if dtype not in l.device.dtypes}, key=str)
    if bad:
        able = [kind for kind in KINDS if dtype in device_class(kind).dtypes]
        raise ConfigError(f"--dtype {cfg.dtype} is not supported on {', '.join(map(str, bad))} (it computes in "
                          f"{' and '.join(map(str, bad[0].dtypes))}); devices that compute in {cfg.dtype}: "
                          f"{', '.join(able)}. Use --dtype float32 or --device {able[0]}")
    try:
        cfg.precision = resolve_precision(cfg.precision, sorted({l.device for l in shapes.order}, key=str))
    except ValueError as e:
        raise ConfigError(f"--{e}") from None
    check_fits(shapes, images_per_step)


def checked_dataset(cfg, net):
    """The run's dataset, checked against the model: image channels, classes, non-empty splits, labels in range."""
    d = net.data_layer
    dataset = load_dataset(cfg.dataset or "synthetic", cfg.data, shape=d.out_shape, classes=net.num_classes,
                           seed=cfg.seed, synthetic_size=(cfg.synthetic_train, cfg.synthetic_test))
    c, h, w = dataset.shape
    if c != d.channels:
        raise DataError(f"dataset {dataset.name} has {c}-channel images, the model's data layer expects "
                        f"{d.channels}")
    if len(dataset.classes) != net.num_classes:
        raise DataError(f"dataset {dataset.name} has {len(dataset.classes)} classes, the model "
                        f"outputs {net.num_classes}")
    for split, x, y in (("training", dataset.train_x, dataset.train_y), ("test", dataset.test_x, dataset.test_y)):
        if len(x) == 0:
            raise DataError(f"the {split} set of {dataset.name} is empty: nothing to "
                            f"{'train on' if split == 'training' else 'evaluate on'}")
        if len(y) != len(x):
            raise DataError(f"the {split} set of {dataset.name} has {len(x)} images but {len(y)} labels")
        if y.min() < 0 or y.max() >= net.num_classes:
            raise DataError(f"the {split} set of {dataset.name} has labels outside 0..{net.num_classes - 1}")
    return dataset


def make_loaders(cfg, net, ds, mean, device, shard, log):
    """(training loader, test loader) of dataset ``ds`` for ``net`` on ``device``; ``shard``: (rank, ranks), the
    part of every batch this process loads."""
    d = net.data_layer
    common = dict(out_hw=d.size, mean=mean, scale=d.scale, seed=cfg.seed, device=device, dtype=net.dtype,
                  prefetch=cfg.prefetch, shard=shard)
    views = 10 if cfg.eval_crops == 10 else 1  # 2 views (--multiview): mirrored on the device by the evaluation
    _check_views(cfg, ds, d.size, views, log)
    if isinstance(ds, PreparedDataset):  # JPEG shards: the paper's per-image crops, flips and PCA lighting
        if cfg.crop_pad:
            raise DataError(f"--crop-pad does not apply to the prepared dataset {ds.name} (random crops of the "
                            f"stored {ds.shape[1]}x{ds.shape[2]} images to the model's input)")
        lighting = 0.1 if cfg.lighting is None else cfg.lighting
        nw = default_workers() if cfg.workers is None else cfg.workers
        train = PreparedLoader(ds.train_x, ds.train_y, cfg.batch_size, train=True, flip=cfg.flip,
                               lighting=lighting, eig=(ds.eigvals, ds.eigvecs), workers=nw, **common)
        test = PreparedLoader(ds.test_x, ds.test_y, cfg.batch_size, train=False, views=views, workers=nw,
                              **common)
    else:
        if cfg.lighting:
            raise DataError(f"--lighting needs a prepared dataset's RGB eigenvectors; {ds.name} has none")
        train = Loader(ds.train_x, ds.train_y, cfg.batch_size, train=True, crop_pad=cfg.crop_pad,
                       flip=cfg.flip, **common)
        test = Loader(ds.test_x, ds.test_y, cfg.batch_size, train=False, views=views, **common)
    if len(train) == 0:
        raise DataError(f"the training set ({len(ds.train_x)} images) is smaller than one batch "
                        f"({cfg.batch_size})")
    return train, test


def _check_views(cfg, ds, input_hw, views, log):
    """--crop-pad at least the model's input side is an error (a crop could be all padding); ten test views
    that coincide (images no larger than the input) are a warning."""
    (h, w), (oh, ow) = ds.shape[1:], input_hw
    if cfg.crop_pad >= min(oh, ow):
        raise ConfigError(f"--crop-pad {cfg.crop_pad} is not smaller than the model's {oh}x{ow} input: a "
                          f"random crop could hold only padding, no pixel of the image (at most {min(oh, ow) - 1})")
    distinct = len(set(augment.ten_crop_views((h, w), (oh, ow)))) if views == 10 else 10
    if distinct < 10:
        log(f"warning: --eval-crops 10: the {h}x{w} images give only {distinct} different views of the "
            f"model's {oh}x{ow} input (crops at the corners coincide), each averaged as often as it repeats"
            + ("; --eval-crops 2 gives the same result 5 times faster" if distinct == 2 else ""))
