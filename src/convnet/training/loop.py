"""The epoch loop: SGD steps from a trainer's position to the end of the epoch (:func:`train_epoch`), the loss and
error sums kept on the device between folds, and the early stops (Ctrl-C, ``max_steps``), decided by all ranks
together."""
from __future__ import annotations

import contextlib
import math
import time

import numpy as np

from ..data import DataError
from ..distributed import backward_and_step
from .evaluation import labels_on
from .report import Progress


class DeviceSums:
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


def stop_reason(t):
    """Why trainer ``t`` must stop after this step ("interrupted", "max_steps"), or None."""
    if t.ranks.any(t.interrupted, "the stop decision"):  # the ranks stop together (a Ctrl-C may reach one first)
        return "interrupted"
    if t.cfg.max_steps and t.steps_this_run >= t.cfg.max_steps:
        return "max_steps"
    return None


def train_epoch(t):
    """SGD steps of trainer ``t`` (a :class:`convnet.trainer.Trainer`) from its position to the end of the epoch,
    advancing the position and the epoch's totals. Returns None, or why it stopped early."""
    cfg, net = t.cfg, t.net
    nb = len(t.train_loader)
    sync_every = 1 if t.device.synchronous else 20  # a fold reads the sums back: a sync on a GPU
    per_step = t.schedule.kind == "linear"
    first, _ = t.train_loader.shard_part()
    shard = (t.train_loader.batch_size, first)  # where this rank's images lie in each (global) batch
    lr = t.opt.lr = t.lr_now()
    sums = DeviceSums(net.cost_layer.device, t.batch)
    stop = None
    with Progress(cfg.progress and t.ranks.rank == 0, total=nb, initial=t.batch,
                  desc=f"epoch {t.epoch + 1}/{cfg.epochs}") as bar, \
            contextlib.closing(t.train_loader.epoch(t.epoch, t.batch)) as batches:
        # closing(): the loader's generator is closed here, in the normal flow, so a second Ctrl-C while it
        # joins its thread propagates (a generator closed by the garbage collector would swallow it)
        for x, y in batches:
            if per_step:
                lr = t.opt.lr = t.lr_now()
            t.opt.progress = (t.epoch + t.batch / nb) / cfg.epochs  # cuda-convnet2's per-layer schedules
            probs = net.forward(x, y, train=True, step=t.step, batch=shard)
            backward_and_step(net, t.opt, t.reducer)
            sums.add(net.loss, probs, labels_on(sums.device, y, t.device))
            t.batch += 1
            t.step += 1
            t.steps_this_run += 1
            if t.step % cfg.check_every == 0:
                t.ranks.check_params(net, f"after step {t.step}")
            if t.batch % sync_every == 0 or t.batch == nb:
                done, dt = _fold(t, sums)
                p = t.partial
                bar.update(done, loss=f"{p['loss'] / p['n']:.4f}", err=f"{p['err'] / p['n']:.4f}", lr=f"{lr:.4g}",
                           ips=f"{done * cfg.batch_size / dt:.0f}")
                eta = t.eta.line(t)
                if eta:
                    bar.write(t.log, eta)
            stop = stop_reason(t)
            if stop:
                break
        if t.batch != sums.batch:  # stopped between two folds
            _fold(t, sums)
    return stop


def _fold(t, sums):
    """Read the device sums back into the epoch's totals; returns (batches folded, seconds since the last fold).
    A non-finite loss or parameter (after the last update) stops training here."""
    nbatches, since = t.batch - sums.batch, sums.time
    dt = time.perf_counter() - since
    bad_labels = t.net.cost_layer.take_bad_labels()
    if bad_labels:
        raise DataError(f"{bad_labels} training label(s) in the last {nbatches} batches are outside "
                        f"[0, {t.net.num_classes}) (the model's classes): check the dataset's labels")
    loss, err = t.ranks.sum("the loss sums", float(sums.loss), int(sums.err))  # the global batches' sums
    err = int(err)
    if not math.isfinite(loss):
        t.diverged("loss", loss)
    t.check_finite_params()
    p = t.partial
    p["loss"] += loss
    p["err"] += err
    p["n"] += nbatches * t.cfg.batch_size
    p["time"] += dt
    t.exchanged = t.net.exchange.per_image()  # counted on the host: no device work
    now = time.perf_counter()
    sums.reset(t.batch, now)
    return nbatches, now - since
