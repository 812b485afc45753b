"""The training loop, in named pieces.

:class:`Trainer` owns the net, the data, the optimizer and the schedule, and the position (epoch, batch, step)
that a checkpoint saves. ``run()`` repeats, until the last epoch:

* :meth:`Trainer.train_epoch` -- SGD steps from the current position to the end of the epoch; returns None, or the
  reason it stopped early (``"interrupted"``: Ctrl-C; ``"max_steps"``). The loss and error sums stay on the
  device (:class:`_DeviceSums`) and are folded into the epoch's totals every ``sync_every`` steps (a host sync
  every step would stall a GPU); the progress bar (:class:`Progress`) is updated at each fold.
* :meth:`Trainer.end_epoch` -- evaluate, record, tell the schedule, advance, checkpoint, then log.jsonl, plot.
* :meth:`Trainer.stopped` -- the early stop: checkpoint at the current position, say how to continue.

Reliability rules (each a test): a run never silently replaces another one in its output directory (``--resume`` or
``overwrite=True``); a NaN or infinite training loss, parameter or test loss stops the run with the divergence
message, and a state with non-finite values is never checkpointed; ``log.jsonl`` is rewritten from the checkpoint's
history when a run starts, so the log and the checkpoint always agree (a kill between the two writes duplicates
nothing); stale checkpoint temporaries are deleted at start; a resume that would reinterpret the saved position
(another batch size in the middle of an epoch) is refused; a second Ctrl-C aborts at once.

Data-parallel (``world``: a :class:`convnet.distributed.World`, ``--distributed``): every rank runs this loop on its
device and shard of each batch (the loaders' ``shard``; ``net.forward(..., batch=)`` tells the dropout layers where
the shard lies in the global batch, so they draw its part of the single-process masks); the backward's hook hands
each layer's gradients to a :class:`convnet.distributed.GradReducer`, which averages them over the ranks; the loss
and error sums, the test results and the stop decision are summed or agreed over the ranks; the ranks' parameters
are compared every ``check_every`` steps and at every checkpoint. Rank 0 alone logs, writes the output directory and
plots.

The command line (``python -m convnet.train``) is :mod:`convnet.train`; the settings are :class:`convnet.config.Config`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from . import checkpoint as ckpt
from . import ops
from .config import Config, ConfigError, parse_lr_steps
from .data import DataError, Loader, PreparedDataset, PreparedLoader, augment, load_dataset
from .data.workers import default_workers
from .devices import KINDS, device_class, get_device
from .dirlock import unusable_dir
from .distributed import GradReducer, backward_and_step, data_facts, param_checksums, rank_device
from .layers import ModelWarning
from .memory import check_fits
from .model_file import build_net
from .optim import SGD, Schedule

RUN_FILES = ("checkpoint.npz", "log.jsonl")  # what makes a directory hold a run (never replaced silently)
# settings that define which images a batch index holds: changing one in the middle of an epoch would skip or repeat
# data, so a mid-epoch resume refuses it (at an epoch boundary the position is 0 and any value is fine)
POSITION_SETTINGS = ("batch_size", "seed", "dataset", "synthetic_train")


class TrainingError(RuntimeError):
    """Training cannot go on (diverged, incompatible checkpoint, ...)."""


def existing_run(out) -> list[str]:
    """The run files (checkpoint, log) present in directory ``out``."""
    out = Path(out)
    return [name for name in RUN_FILES if (out / name).exists()]


def check_out_dir(out, *, resume_path=None, overwrite=False) -> None:
    """ConfigError unless a run may write into ``out``: a directory (or a path that can be created) we can write,
    holding no other run -- unless it is the run being resumed (``resume_path``, a checkpoint in it) or
    ``overwrite``. Changes nothing on disk."""
    out = Path(out)
    problem = unusable_dir(out, f"--out {out}")
    if problem:
        raise ConfigError(problem)
    if not out.exists():
        return
    if resume_path is not None and Path(resume_path).resolve().parent == out.resolve():
        return  # continuing the run that is there
    found = existing_run(out)
    if found and not overwrite:
        raise ConfigError(f"{out} already holds a run ({', '.join(found)}): continue it with --resume {out}, replace "
                          f"it with --overwrite, or choose another --out")


def _empty_totals():
    """The running totals of the current epoch (saved in checkpoints as ``partial``)."""
    return {"loss": 0.0, "err": 0, "n": 0, "time": 0.0}


class Progress:
    """A tqdm progress bar over the batches of an epoch, or nothing (``enabled=False``). A context manager."""

    def __init__(self, enabled, *, total, initial, desc):
        self.bar = None
        if enabled:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, desc=desc, unit="batch", leave=True, dynamic_ncols=True,
                            file=sys.stderr)

    def update(self, n, **postfix):
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix(**postfix)

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


class _DeviceSums:
    """The summed loss and error count of the steps since the last fold, kept on ``device`` (the softmax layer's,
    where the loss and the probabilities are). Each method makes it current: CuPy runs an array-module call on the
    current GPU, whichever GPU its arrays are on."""

    def __init__(self, device, batch):
        self.device = device
        with device.activate():
            self.loss = device.xp.zeros((), np.float64)
            self.err = device.xp.zeros((), np.int64)
        self.batch = batch  # the position of the last fold
        self.time = time.perf_counter()

    def add(self, loss, probs, labels):
        with self.device.activate():
            self.loss += loss
            self.err += (self.device.xp.argmax(probs, axis=0) != labels).sum()

    def reset(self, batch, now):
        with self.device.activate():
            self.loss[...] = 0
            self.err[...] = 0
        self.batch, self.time = batch, now


def _log_softmax(xp, logits):
    """log(softmax(logits)) over classes (axis 0), without underflow: finite wherever the logits are."""
    z = logits - logits.max(axis=0, keepdims=True)
    return z - xp.log(xp.exp(z).sum(axis=0, keepdims=True))


class Trainer:
    """``Trainer(cfg, resume_state=None, log=print, overwrite=False)``; ``run()`` trains. ``resume_state``: a
    :func:`convnet.checkpoint.load` result to continue from. ``overwrite``: replace a run already in ``cfg.out``
    (else that is a ConfigError). ``world``: the ranks of a data-parallel run (:class:`convnet.distributed.World`;
    None: one process)."""

    def __init__(self, cfg: Config, *, resume_state=None, log=print, overwrite=False, world=None):
        if cfg.out is None:
            cfg.out = str(Path("runs") / Path(cfg.model).stem)
        self.cfg = cfg.validate()
        self.world = world
        self.rank, self.ranks = (world.rank, world.size) if world is not None else (0, 1)
        self.log = log if self.rank == 0 else (lambda *a, **k: None)  # rank 0 alone logs
        self.overwrite = overwrite
        if cfg.batch_size % self.ranks:
            raise ConfigError(f"--batch-size {cfg.batch_size} does not split into {self.ranks} equal shards: with "
                              f"--distributed it is the global batch, divided across the ranks; give a multiple of "
                              f"{self.ranks}")
        self.resume_path = resume_state["path"] if resume_state is not None else None
        self.device, towers = self._devices()
        self._check_net(towers)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ModelWarning)  # logged by _check_net
            self.net, _ = build_net(cfg.model_text, cfg.model_source or cfg.model, device=self.device,
                                    devices=towers, dtype=cfg.dtype, seed=cfg.seed)
        self.exchanged = {}  # bytes per image copied between devices in the last training step ("src->dst": n)
        self.dataset = self._load_dataset()
        self.mean = self.dataset.mean_image() if resume_state is None or resume_state["mean"] is None \
            else resume_state["mean"]
        if world is not None:  # before the loaders: ranks reading other data would train on other batches
            world.check_agree(data_facts(self.dataset, self.mean), "data")
        self.train_loader, self.test_loader = self._loaders()
        self.schedule = Schedule(cfg.schedule, cfg.lr, steps=parse_lr_steps(cfg.lr_steps), gamma=cfg.lr_gamma,
                                 patience=cfg.patience, max_drops=cfg.max_drops, total_epochs=cfg.epochs)
        self.opt = SGD(self.net, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        self.reducer = GradReducer(self.net, world) if world is not None else None
        self.epoch, self.batch, self.step = 0, 0, 0
        self.history = []
        self.partial = _empty_totals()
        self.saved_at = None  # (epoch, batch) of the checkpoint in self.out written or resumed from, if any
        if resume_state is not None:
            self._restore(resume_state)
        self.out = Path(cfg.out)
        if self.resume_path is not None and Path(self.resume_path).resolve().parent == self.out.resolve():
            self.saved_at = (self.epoch, self.batch)
        self.steps_this_run = 0
        self._interrupted = False
        self.check_ranks("at the start (the initial or resumed parameters)")

    # --- setup -----------------------------------------------------------------------------------------------
    def _devices(self):
        """(the net's device, the towers' devices or None): ``--devices`` maps the model's towers (``device = i``
        layers) onto devices; its first is the net's device (the data, and layers without a device)."""
        cfg = self.cfg
        device = towers = None
        if self.world is not None:
            if cfg.devices is not None:
                raise ConfigError(f"--devices {cfg.devices}: a model's towers on several devices do not combine with "
                                  f"--distributed (each rank runs the whole net on its one device)")
            return rank_device(cfg.device, self.world, get_device), None
        try:  # ValueError: a malformed name (DeviceUnavailable: a real device that is not usable here)
            if cfg.device is not None or cfg.devices is None:
                device = get_device(cfg.device)
        except ValueError as e:
            raise ConfigError(f"--device: {e}") from None
        if cfg.devices is None:
            return device, None
        try:
            towers = tuple(get_device(d) for d in cfg.devices.split(","))
        except ValueError as e:
            raise ConfigError(f"--devices: {e}") from None
        if device is not None and device != towers[0]:
            raise ConfigError(f"--device {device} is not the first of --devices {cfg.devices}: the first of the "
                              f"towers' devices is the net's device (leave --device out)")
        return towers[0], towers

    def _check_net(self, towers):
        """ConfigError before anything is allocated: a --dtype that one of the net's devices cannot compute in, or a
        net that does not fit in their free memory (checked on a shapes-only build of the net, whose model
        warnings are logged)."""
        cfg = self.cfg
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ModelWarning)
            shapes, _ = build_net(cfg.model_text, cfg.model_source or cfg.model, device=self.device, devices=towers,
                                  dtype=cfg.dtype, init_params=False)
        for w in caught:
            if issubclass(w.category, ModelWarning):
                self.log(f"warning: {w.message}")
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        dtype = np.dtype(cfg.dtype)
        bad = sorted({l.device for l in shapes.order if dtype not in l.device.dtypes}, key=str)
        if bad:
            able = [kind for kind in KINDS if dtype in device_class(kind).dtypes]
            raise ConfigError(f"--dtype {cfg.dtype} is not supported on {', '.join(map(str, bad))} (it computes in "
                              f"{' and '.join(map(str, bad[0].dtypes))}); devices that compute in {cfg.dtype}: "
                              f"{', '.join(able)}. Use --dtype float32 or --device {able[0]}")
        check_fits(shapes, cfg.batch_size // self.ranks)

    def _load_dataset(self):
        cfg, d = self.cfg, self.net.data_layer
        dataset = load_dataset(cfg.dataset or "synthetic", cfg.data, shape=d.out_shape, classes=self.net.num_classes,
                               seed=cfg.seed, synthetic_size=(cfg.synthetic_train, cfg.synthetic_test))
        c, h, w = dataset.shape
        if c != d.channels:
            raise DataError(f"dataset {dataset.name} has {c}-channel images, the model's data layer expects "
                            f"{d.channels}")
        if len(dataset.classes) != self.net.num_classes:
            raise DataError(f"dataset {dataset.name} has {len(dataset.classes)} classes, the model "
                            f"outputs {self.net.num_classes}")
        for split, x, y in (("training", dataset.train_x, dataset.train_y), ("test", dataset.test_x, dataset.test_y)):
            if len(x) == 0:
                raise DataError(f"the {split} set of {dataset.name} is empty: nothing to "
                                f"{'train on' if split == 'training' else 'evaluate on'}")
            if len(y) != len(x):
                raise DataError(f"the {split} set of {dataset.name} has {len(x)} images but {len(y)} labels")
            if y.min() < 0 or y.max() >= self.net.num_classes:
                raise DataError(f"the {split} set of {dataset.name} has labels outside 0..{self.net.num_classes - 1}")
        return dataset

    def _loaders(self):
        cfg, d, ds = self.cfg, self.net.data_layer, self.dataset
        common = dict(out_hw=d.size, mean=self.mean, scale=d.scale, seed=cfg.seed, device=self.device,
                      dtype=self.net.dtype, prefetch=cfg.prefetch, shard=(self.rank, self.ranks))
        views = 10 if cfg.eval_crops == 10 else 1  # 2 views (--multiview): mirrored on the device in evaluate()
        self._check_views(views)
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

    def _check_views(self, views):
        """--crop-pad at least the model's input side is an error (a crop could be all padding); ten test views
        that coincide (images no larger than the input) are a warning."""
        (h, w), (oh, ow) = self.dataset.shape[1:], self.net.data_layer.size
        if self.cfg.crop_pad >= min(oh, ow):
            raise ConfigError(f"--crop-pad {self.cfg.crop_pad} is not smaller than the model's {oh}x{ow} input: a "
                              f"random crop could hold only padding, no pixel of the image (at most {min(oh, ow) - 1})")
        distinct = len(set(augment.ten_crop_views((h, w), (oh, ow)))) if views == 10 else 10
        if distinct < 10:
            self.log(f"warning: --eval-crops 10: the {h}x{w} images give only {distinct} different views of the "
                     f"model's {oh}x{ow} input (crops at the corners coincide), each averaged as often as it repeats"
                     + ("; --eval-crops 2 gives the same result 5 times faster" if distinct == 2 else ""))

    # --- state -----------------------------------------------------------------------------------------------
    def _restore(self, st):
        ckpt.check_training_state(st)
        m, path = st["meta"], st["path"]
        saved = m["config"]
        if m["batch"] != 0:  # mid-epoch: the position is a batch index under the saved settings
            for k in POSITION_SETTINGS:
                if k in saved and saved[k] != getattr(self.cfg, k):
                    flag = "--" + k.replace("_", "-")
                    raise ConfigError(
                        f"{flag} {getattr(self.cfg, k)} differs from the checkpoint's {saved[k]}, and {path} stopped "
                        f"in the middle of epoch {m['epoch'] + 1} (batch {m['batch']}): the saved position would skip "
                        f"or repeat images. Resume with {flag} {saved[k]}; it may change at an epoch boundary")
        if m["batch"] > len(self.train_loader):
            raise ConfigError(f"{path} stopped at batch {m['batch']} of epoch {m['epoch'] + 1}, but an epoch now has "
                              f"{len(self.train_loader)} batches: the training data changed")
        try:
            self.net.load_state_dict(st["params"])
            self.opt.load_state_dict({**m["optimizer"], "velocity": st["velocity"]})
            self.schedule.load_state_dict(m["schedule"])
            self.partial = {k: type(v)(m["partial"][k]) for k, v in _empty_totals().items()}
        except (KeyError, ValueError, TypeError) as e:
            raise ckpt.CheckpointError(f"checkpoint '{path}' does not fit the model or is incomplete: "
                                       f"{' '.join(str(e).split())}") from None
        self.epoch, self.batch, self.step = m["epoch"], m["batch"], m["step"]
        self.history = m["history"]

    def save(self):
        cfgd = dataclasses.asdict(self.cfg)
        cfgd["max_steps"] = 0
        self.check_ranks(f"at the checkpoint of epoch {self.epoch + 1}, batch {self.batch}")
        meta = {"epoch": self.epoch, "batch": self.batch, "step": self.step, "history": self.history,
                "partial": self.partial, "schedule": self.schedule.state_dict(),
                "optimizer": {k: v for k, v in self.opt.state_dict().items() if k != "velocity"},
                "rng": {"kind": "counter", "seed": self.cfg.seed,
                        "note": "data order, crops, flips and dropout masks are functions of "
                                "(seed, epoch, batch, step): the position above is the whole RNG state"},
                "config": cfgd, "num_params": self.net.num_params(), "time": time.time(), "ranks": self.ranks}
        params, velocity = self.net.state_dict(), self.opt.state_dict()["velocity"]
        bad = ckpt.non_finite({**{f"parameter {k}": v for k, v in params.items()},
                               **{f"momentum of {k}": v for k, v in velocity.items()}})
        if bad:  # never checkpoint a diverged state: the checkpoint on disk stays the last good one
            self.diverged(bad[0], "non-finite")
        if self.rank:  # rank 0 alone writes (the ranks' parameters were just checked identical)
            self.saved_at = (self.epoch, self.batch)
            return self.out / "checkpoint.npz"
        path = ckpt.save(self.out / "checkpoint.npz", params=params, velocity=velocity, mean=self.mean, meta=meta)
        self.saved_at = (self.epoch, self.batch)
        return path

    def diverged(self, what, value):
        """Stop: TrainingError saying what became non-finite, where, what to do, and which checkpoint is good."""
        path = self.out / "checkpoint.npz"
        if self.saved_at is not None and path.is_file():
            e, b = self.saved_at
            good = (f"The last good checkpoint is {path} (epoch {e + 1}, batch {b})" if b else
                    f"The last good checkpoint is {path} (after epoch {e})" if e else
                    f"The last good checkpoint is {path} (the start)")
        else:
            good = "No checkpoint of this run was written"
        raise TrainingError(
            f"the {what} became {value} at epoch {self.epoch + 1}, step {self.step}: training diverged. "
            f"Lower the learning rate (--lr, now {self.opt.lr:g}) or check the data / initialisation. {good}; "
            f"the diverged state was not saved.")

    def check_ranks(self, where):
        """Data-parallel: DistributedError unless every rank holds bit-identical parameters (a checksum per
        parameter, compared over MPI). Nothing without ``world``."""
        if self.world is not None and self.ranks > 1:
            self.world.check_same(*param_checksums(self.net), where)

    def check_finite_params(self):
        """Divergence when a parameter holds a NaN or an infinity (after an update that overflowed). One device
        reduction per parameter, read back together."""
        flags = []
        for k, l, p in self.net.param_items():
            with l.device.activate():  # the reduction runs on the parameter's GPU
                flags.append((k, l.device.xp.isfinite(l.params[p]).all()))
        for k, ok in flags:
            if not bool(ok):
                self.diverged(f"parameter {k}", "non-finite")

    # --- evaluation ------------------------------------------------------------------------------------------
    def evaluate(self, keep_probs=0):
        """Test-set (loss, top-1 error, top-5 error or None, kept (probs, labels) of the first images)."""
        out = self.net.cost_layer.device  # the test sums are made where the probabilities are
        xp = out.xp
        k5 = self.net.num_classes > 5
        n = wrong1 = wrong5 = 0
        loss = 0.0
        kept = []
        views, acc, log_acc, k = self.test_loader.views, None, None, 0  # views > 1: each batch that many times
        mirror = views == 1 and (self.cfg.multiview or self.cfg.eval_crops == 2)
        # closed here: a Ctrl-C in close() propagates
        with contextlib.closing(self.test_loader.epoch(0)) as batches, out.activate():
            for x, y in batches:
                # ranked: the logits, or for several views the log of their summed probabilities (probabilities
                # that underflowed to 0 would tie, and a label ranked last would count as inside the top 5)
                p = self.net.forward(x)
                y = self._labels_on(out, y)
                scores = self.net.logits
                if mirror:
                    with self.device.activate():
                        mirrored = self.device.adopt(xp.ascontiguousarray(x[:, :, ::-1, :]))
                    p = out.adopt((p + self.net.forward(mirrored)) * p.dtype.type(0.5))
                    scores = out.adopt(xp.logaddexp(_log_softmax(xp, scores), _log_softmax(xp, self.net.logits)))
                if views > 1:  # the softmax outputs of the views, summed in view order, then averaged
                    acc = p.copy() if k == 0 else acc + p
                    log_acc = (_log_softmax(xp, scores) if k == 0 else
                               out.adopt(xp.logaddexp(log_acc, _log_softmax(xp, scores))))
                    k += 1
                    if k < views:
                        continue
                    p, acc, k = out.adopt(acc * p.dtype.type(1 / views)), None, 0
                    scores, log_acc = log_acc, None
                errs = ops.topk_errors(out, scores, y, ks=(1, 5) if k5 else (1,))
                wrong1 += errs[0]
                wrong5 += errs[1] if k5 else 0
                m = y.shape[0]
                loss += float(-xp.log(xp.maximum(p[y, xp.arange(m)], 1e-30)).sum())
                n += m
                if sum(len(a[1]) for a in kept) < keep_probs:
                    kept.append((out.to_numpy(p), out.to_numpy(y)))
        if self.world is not None and self.ranks > 1:  # each rank evaluated its share of the batches
            loss, wrong1, wrong5, n = self.world.sum(np.array([loss, wrong1, wrong5, n], np.float64), "the test sums")
            wrong1, wrong5, n = int(wrong1), int(wrong5), int(n)
        if n == 0:
            raise DataError(f"the test set of {self.dataset.name} is empty: nothing to evaluate on")
        if not math.isfinite(loss):
            self.diverged("test loss", loss)
        return loss / n, wrong1 / n, (wrong5 / n if k5 else None), kept

    def _labels_on(self, dev, y):
        """The labels ``y`` of a batch (on the net's device, as the loaders give them) on ``dev``."""
        if dev == self.device:
            return y
        with dev.activate():
            return ops.copy(dev, y, self.device)

    # --- training --------------------------------------------------------------------------------------------
    def _on_sigint(self, signum, frame):
        if self._interrupted:  # second Ctrl-C: give up immediately
            raise KeyboardInterrupt
        self._interrupted = True

    def run(self):
        """Train to ``cfg.epochs``; returns {"status": "done" | "interrupted" | "max_steps", "history": [...]}."""
        if self.rank == 0:
            self._prepare_out()
        old = None
        try:
            old = signal.signal(signal.SIGINT, self._on_sigint)
        except ValueError:  # not the main thread
            pass
        try:
            # a non-finite loss is detected and reported; the run's GPU is current in this thread throughout (else
            # GPU 0 is, and gets a context and work of its own)
            with np.errstate(over="ignore", invalid="ignore"), self.device.activate():
                return self._epochs()
        finally:
            self.close()
            if old is not None:
                signal.signal(signal.SIGINT, old)

    def close(self):
        """Stop the loaders' worker processes (prepared datasets) and free their shared memory."""
        for loader in (self.train_loader, self.test_loader):
            close = getattr(loader, "close", None)
            if close is not None:
                close()

    def _prepare_out(self):
        """The output directory: checked (no other run is replaced without ``overwrite``), created, stale checkpoint
        temporaries removed, the model file and summary written, log.jsonl rewritten from the history."""
        cfg, out = self.cfg, self.out
        check_out_dir(out, resume_path=self.resume_path, overwrite=self.overwrite)
        try:
            out.mkdir(parents=True, exist_ok=True)
            resuming_here = self.resume_path is not None and Path(self.resume_path).resolve().parent == out.resolve()
            if not resuming_here:  # --overwrite (or an empty directory): nothing of an old run survives
                for name in RUN_FILES:
                    (out / name).unlink(missing_ok=True)
            (out / "log.jsonl.tmp").unlink(missing_ok=True)  # an interrupted _write_log's
            stale = ckpt.remove_stale_temporaries(out)
            if stale:
                self.log(f"removed {len(stale)} stale temporary file(s) of an interrupted checkpoint write in {out}")
            (out / "model.cfg").write_text(cfg.model_text)
            (out / "summary.txt").write_text(self.net.summary() + "\n")
            self._write_log()
        except OSError as e:
            raise ConfigError(f"cannot write to --out {out}: {e.strerror or e}") from None

    def _write_log(self):
        """log.jsonl = one line per epoch of the history (the checkpoint's), replaced atomically: a kill between an
        epoch's checkpoint and its log line loses or duplicates nothing."""
        path = self.out / "log.jsonl"
        if not self.history:  # no epoch finished: no log (and nothing that looks like a run to the next start)
            path.unlink(missing_ok=True)
            return
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w") as f:
            f.writelines(json.dumps(rec) + "\n" for rec in self.history)
        os.replace(tmp, path)

    def _epochs(self):
        cfg = self.cfg
        last = self.history[-1] if self.history else {}
        clock = (time.perf_counter() - last.get("elapsed_s", 0.0), time.process_time() - last.get("cpu_s", 0.0))
        self.steps_this_run = 0
        threads = f" ({cfg.threads} threads)" if self.device.synchronous and cfg.threads else ""  # host devices
        self.log(f"training {Path(cfg.model).stem} on {self.dataset.name} ({len(self.dataset.train_x)} train / "
                 f"{len(self.dataset.test_x)} test images), device {self.device}{threads}, "
                 f"{self.net.num_params():,} parameters, {cfg.epochs} epochs of {len(self.train_loader)} batches of "
                 f"{cfg.batch_size}; output in {self.out}")
        plan = self.net.exchange_plan()
        if self.reducer is not None:
            r = self.reducer
            how = "NCCL" if type(r.transport).__name__ == "NcclTransport" else "MPI"
            self.log(f"data-parallel over {self.ranks} rank(s), rank 0 on {self.device}: "
                     f"{cfg.batch_size // self.ranks} images per rank and step; "
                     f"gradients averaged by {how} in {len(r.buckets)} bucket(s) of up to {r.buckets[0].nbytes:,} B")
        if plan:
            towers = ", ".join(f"{i}={d}" for i, d in enumerate(self.net.devices))
            self.log(f"towers {towers}; copied between devices per image and training step: "
                     + ", ".join(f"{k} {v:,} B" for k, v in plan.items()))
        if self.epoch >= cfg.epochs:
            self.log(f"already trained for {self.epoch} epochs (--epochs {cfg.epochs}); pass a larger --epochs to "
                     f"continue")
        while self.epoch < cfg.epochs:
            stop = self.train_epoch()
            if stop:
                return self.stopped(stop)
            self.end_epoch(clock)
        return {"status": "done", "history": self.history}

    def lr_now(self, start_of_epoch=False):
        """The schedule's learning rate at the current position (or at the start of the epoch), >= min_lr."""
        frac = 0.0 if start_of_epoch else self.batch / len(self.train_loader)
        return max(self.schedule.lr_at(self.epoch, frac), self.cfg.min_lr)

    def stop_reason(self):
        """Why training must stop after this step ("interrupted", "max_steps"), or None."""
        interrupted = self._interrupted
        if self.world is not None and self.ranks > 1:  # the ranks stop together (a Ctrl-C may reach one first)
            interrupted = self.world.any(interrupted, "the stop decision")
        if interrupted:
            return "interrupted"
        if self.cfg.max_steps and self.steps_this_run >= self.cfg.max_steps:
            return "max_steps"
        return None

    def train_epoch(self):
        """SGD steps from the current position to the end of the epoch. Returns None, or why it stopped early."""
        cfg, net = self.cfg, self.net
        nb = len(self.train_loader)
        sync_every = 1 if self.device.synchronous else 20  # a fold reads the sums back: a sync on a GPU
        per_step = self.schedule.kind == "linear"
        first, _ = self.train_loader.shard_part()
        shard = (self.train_loader.batch_size, first)  # where this rank's images lie in each (global) batch
        lr = self.opt.lr = self.lr_now()
        sums = _DeviceSums(net.cost_layer.device, self.batch)
        stop = None
        with Progress(cfg.progress and self.rank == 0, total=nb, initial=self.batch,
                      desc=f"epoch {self.epoch + 1}/{cfg.epochs}") as bar, \
                contextlib.closing(self.train_loader.epoch(self.epoch, self.batch)) as batches:
            # closing(): the loader's generator is closed here, in the normal flow, so a second Ctrl-C while it
            # joins its thread propagates (a generator closed by the garbage collector would swallow it)
            for x, y in batches:
                if per_step:
                    lr = self.opt.lr = self.lr_now()
                probs = net.forward(x, y, train=True, step=self.step, batch=shard)
                backward_and_step(net, self.opt, self.reducer)
                sums.add(net.loss, probs, self._labels_on(sums.device, y))
                self.batch += 1
                self.step += 1
                self.steps_this_run += 1
                if self.step % cfg.check_every == 0:
                    self.check_ranks(f"after step {self.step}")
                if self.batch % sync_every == 0 or self.batch == nb:
                    done, dt = self._fold(sums)
                    p = self.partial
                    bar.update(done, loss=f"{p['loss'] / p['n']:.4f}", err=f"{p['err'] / p['n']:.4f}", lr=f"{lr:.4g}",
                               ips=f"{done * cfg.batch_size / dt:.0f}")
                stop = self.stop_reason()
                if stop:
                    break
            if self.batch != sums.batch:  # stopped between two folds
                self._fold(sums)
        return stop

    def _fold(self, sums):
        """Read the device sums back into the epoch's totals; returns (batches folded, seconds since the last fold).
        A non-finite loss or parameter (after the last update) stops training here."""
        nbatches, since = self.batch - sums.batch, sums.time
        dt = time.perf_counter() - since
        bad_labels = self.net.cost_layer.take_bad_labels()
        if bad_labels:
            raise DataError(f"{bad_labels} training label(s) in the last {nbatches} batches are outside "
                            f"[0, {self.net.num_classes}) (the model's classes): check the dataset's labels")
        loss, err = float(sums.loss), int(sums.err)
        if self.world is not None and self.ranks > 1:  # the global batches' sums
            loss, err = self.world.sum(np.array([loss, err], np.float64), "the loss sums")
            err = int(err)
        if not math.isfinite(loss):
            self.diverged("loss", loss)
        self.check_finite_params()
        p = self.partial
        p["loss"] += loss
        p["err"] += err
        p["n"] += nbatches * self.cfg.batch_size
        p["time"] += dt
        self.exchanged = self.net.exchange.per_image()  # counted on the host: no device work
        now = time.perf_counter()
        sums.reset(self.batch, now)
        return nbatches, now - since

    def stopped(self, stop):
        """An early stop: checkpoint at the current position and say how to continue."""
        path = self.save()
        msg = "interrupted (Ctrl-C)" if stop == "interrupted" else f"stopped after {self.steps_this_run} steps"
        self.log(f"{msg}: saved {path} at epoch {self.epoch + 1}, batch {self.batch}/{len(self.train_loader)}; "
                 f"continue with --resume {self.out}")
        return {"status": stop, "history": self.history}

    def tests_now(self) -> bool:
        """Whether the epoch ending now is evaluated: every ``test_every`` epochs, and always the last one."""
        done = self.epoch + 1
        return done % self.cfg.test_every == 0 or done >= self.cfg.epochs

    def end_epoch(self, clock):
        """Evaluate (on test epochs), record (history, log.jsonl, the log line), tell the schedule, go to the next
        epoch, checkpoint, plot. ``clock``: the (wall, CPU) times at which the run (including resumed parts) started."""
        tested = self.tests_now()
        te_loss, te1, te5, kept = self.evaluate(keep_probs=16) if tested else (None, None, None, [])
        rec = self._record(te_loss, te1, te5, clock)
        self.history.append(rec)
        self._log_epoch(rec)
        if tested:
            self.schedule.observe(te1)
        self.epoch += 1
        self.batch = 0
        self.partial = _empty_totals()
        self.save()
        if self.rank:
            return
        with open(self.out / "log.jsonl", "a") as f:  # after the checkpoint that holds this record (see _write_log)
            f.write(json.dumps(rec) + "\n")
        if self.cfg.plots and tested:
            self.make_plots(kept, final=self.epoch >= self.cfg.epochs)

    def _record(self, te_loss, te1, te5, clock):
        """The epoch's entry of the history (and of log.jsonl)."""
        p = self.partial
        return {"epoch": self.epoch + 1, "step": self.step, "lr": self.lr_now(start_of_epoch=True),
                "train_loss": p["loss"] / p["n"], "train_error": p["err"] / p["n"], "test_loss": te_loss,
                "test_error": te1, "test_top5_error": te5, "train_time_s": p["time"],
                "elapsed_s": time.perf_counter() - clock[0], "cpu_s": time.process_time() - clock[1],
                "images_per_s": p["n"] / p["time"] if p["time"] > 0 else None, "device": str(self.device),
                **({"ranks": self.ranks} if self.world is not None else {}),
                **({"exchanged_bytes_per_image": dict(self.exchanged)} if self.exchanged else {})}

    def _log_epoch(self, rec):
        te1, te5 = rec["test_error"], rec["test_top5_error"]
        t5 = f", top-5 {te5:.2%}" if te5 is not None else ""
        test = (f"test loss {rec['test_loss']:.4f} error {te1:.2%}{t5} (accuracy {1 - te1:.2%})" if te1 is not None
                else f"not tested (every {self.cfg.test_every} epochs)")
        self.log(f"epoch {rec['epoch']}: train loss {rec['train_loss']:.4f} error {rec['train_error']:.2%}; {test}; "
                 f"{rec['images_per_s']:.0f} images/s, lr {rec['lr']:g}, {rec['elapsed_s']:.0f} s")

    # --- plots -----------------------------------------------------------------------------------------------
    def make_plots(self, kept, final=True):
        """errors.png; at the end also filters.png and predictions.png. A failing plot is logged, never raised."""
        from . import plots
        first = next((l for l in self.net.order if l.type == "conv"), None)
        try:
            filters = None if first is None or not final else (self.device.to_numpy(first.params["w"]),
                                                                f"{first.name} filters")
            plots.training_plots(self.out, self.history, final=final, filters=filters, kept=kept,
                                 images=self.dataset.test_x, classes=self.dataset.classes)
        except Exception as e:  # noqa: BLE001 - plots never stop a training run
            self.log(f"warning: plotting failed: {type(e).__name__}: {e}")
