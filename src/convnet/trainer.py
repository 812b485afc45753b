"""A training run: :class:`Trainer` owns the net, the data, the optimizer and the schedule, and the position
(epoch, batch, step) that a checkpoint saves. ``run()`` repeats, until the last epoch:

* :func:`convnet.training.loop.train_epoch` -- SGD steps from the current position to the end of the epoch;
  returns None, or the reason it stopped early (``"interrupted"``: Ctrl-C; ``"max_steps"``). The loss and error sums
  stay on the device and are folded into the epoch's totals every ``sync_every`` steps (a host sync every step would
  stall a GPU); the progress bar is updated at each fold.
* :meth:`Trainer.end_epoch` -- evaluate, record, tell the schedule, advance, checkpoint, then log.jsonl, plot.
* :meth:`Trainer.stopped` -- the early stop: checkpoint at the current position, say how to continue.

Its parts are in :mod:`convnet.training`: the run directory (``rundir``), the devices, dataset and loaders
(``inputs``), the epoch loop (``loop``), the evaluation (``evaluation``), the log lines, records and plots
(``report``), the reductions over data-parallel ranks (``ranks``).

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

import dataclasses
import math
import signal
import time
import warnings
from pathlib import Path

import numpy as np

from . import checkpoint as ckpt
from .config import Config, ConfigError, parse_lr_steps
from .data import DataError
from .distributed import GradReducer, data_facts
from .layers import ModelWarning
from .model_file import build_net
from .optim import SGD, Schedule
from .training import evaluation, inputs, loop, report, rundir
from .training.ranks import Ranks


class TrainingError(RuntimeError):
    """Training cannot go on (diverged, incompatible checkpoint, ...)."""


def _empty_totals():
    """The running totals of the current epoch (saved in checkpoints as ``partial``)."""
    return {"loss": 0.0, "err": 0, "n": 0, "time": 0.0}


class Trainer:
    """``Trainer(cfg, resume_state=None, log=print, overwrite=False)``; ``run()`` trains. ``resume_state``: a
    :func:`convnet.checkpoint.load` result to continue from. ``overwrite``: replace a run already in ``cfg.out``
    (else that is a ConfigError). ``world``: the ranks of a data-parallel run (:class:`convnet.distributed.World`;
    None: one process)."""

    def __init__(self, cfg: Config, *, resume_state=None, log=print, overwrite=False, world=None):
        if cfg.out is None:
            cfg.out = str(Path("runs") / Path(cfg.model).stem)
        self.cfg = cfg.validate()
        self.ranks = Ranks(world)
        self.log = log if self.ranks.rank == 0 else (lambda *a, **k: None)  # rank 0 alone logs
        self.overwrite = overwrite
        if cfg.batch_size % self.ranks.size:
            raise ConfigError(f"--batch-size {cfg.batch_size} does not split into {self.ranks.size} equal shards: "
                              f"with --distributed it is the global batch, divided across the ranks; give a multiple "
                              f"of {self.ranks.size}")
        self.resume_path = resume_state["path"] if resume_state is not None else None
        self.device, towers = inputs.run_devices(cfg, world)
        inputs.check_net(cfg, self.device, towers, cfg.batch_size // self.ranks.size, self.log)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ModelWarning)  # logged by check_net
            self.net, _ = build_net(cfg.model_text, cfg.model_source or cfg.model, device=self.device,
                                    devices=towers, dtype=cfg.dtype, seed=cfg.seed, precision=cfg.precision)
        self.exchanged = {}  # bytes per image copied between devices in the last training step ("src->dst": n)
        self.dataset = inputs.checked_dataset(cfg, self.net)
        self.mean = self.dataset.mean_image() if resume_state is None or resume_state["mean"] is None \
            else resume_state["mean"]
        # before the loaders: ranks reading other data would train on other batches
        self.ranks.agree(data_facts(self.dataset, self.mean), "data")
        self.train_loader, self.test_loader = inputs.make_loaders(cfg, self.net, self.dataset, self.mean, self.device,
                                                                  (self.ranks.rank, self.ranks.size), self.log)
        self.schedule = Schedule(cfg.schedule, cfg.lr, steps=parse_lr_steps(cfg.lr_steps), gamma=cfg.lr_gamma,
                                 patience=cfg.patience, max_drops=cfg.max_drops, total_epochs=cfg.epochs)
        self.opt = SGD(self.net, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        self.reducer = GradReducer(self.net, world) if world is not None else None
        self.epoch, self.batch, self.step = 0, 0, 0
        self.history = []
        self.partial = _empty_totals()
        self.saved_at = None  # (epoch, batch) of the checkpoint in self.out written or resumed from, if any
        # a checkpoint's parameters are FP32 whatever the precision it was trained in (older ones: fp32), so a resume
        # may change the precision; the start of the run says so
        self.resumed_precision = None
        if resume_state is not None:
            self._restore(resume_state)
        self.out = Path(cfg.out)
        if rundir.resumes_in(self.out, self.resume_path):
            self.saved_at = (self.epoch, self.batch)
        self.steps_this_run = 0
        self.interrupted = False  # by a Ctrl-C: the loop stops after the step
        self.ranks.check_params(self.net, "at the start (the initial or resumed parameters)")

    # --- the run ---------------------------------------------------------------------------------------------
    def _on_sigint(self, signum, frame):
        if self.interrupted:  # second Ctrl-C: give up immediately
            raise KeyboardInterrupt
        self.interrupted = True

    def run(self):
        """Train to ``cfg.epochs``; returns {"status": "done" | "interrupted" | "max_steps", "history": [...]}."""
        if self.ranks.rank == 0:
            rundir.prepare(self.out, resume_path=self.resume_path, overwrite=self.overwrite,
                           model_text=self.cfg.model_text, summary=self.net.summary(), history=self.history,
                           log=self.log)
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

    def _epochs(self):
        last = self.history[-1] if self.history else {}
        clock = (time.perf_counter() - last.get("elapsed_s", 0.0), time.process_time() - last.get("cpu_s", 0.0))
        self.steps_this_run = 0
        self.eta = report.Eta(clock[0])
        for line in report.run_lines(self):
            self.log(line)
        while self.epoch < self.cfg.epochs:
            stop = loop.train_epoch(self)
            if stop:
                return self.stopped(stop)
            self.end_epoch(clock)
        return {"status": "done", "history": self.history}

    def lr_now(self, start_of_epoch=False):
        """The schedule's learning rate at the current position (or at the start of the epoch), >= min_lr."""
        frac = 0.0 if start_of_epoch else self.batch / len(self.train_loader)
        return max(self.schedule.lr_at(self.epoch, frac), self.cfg.min_lr)

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
        rec = report.epoch_record(self, (te_loss, te1, te5), clock)
        self.history.append(rec)
        self.log(report.epoch_line(rec, self.cfg.test_every))
        if tested:
            self.schedule.observe(te1)
        self.epoch += 1
        self.batch = 0
        self.partial = _empty_totals()
        self.save()
        if self.ranks.rank:
            return
        rundir.append_log(self.out, rec)  # after the checkpoint that holds this record (see rundir.write_log)
        if self.cfg.plots and tested:
            self.make_plots(kept, final=self.epoch >= self.cfg.epochs)

    def evaluate(self, keep_probs=0):
        """Test-set (loss, top-1 error, top-5 error or None, kept (probs, labels) of the first images)."""
        loss, wrong1, wrong5, n, kept = evaluation.evaluate(
            self.net, self.test_loader, self.device, self.ranks, keep_probs=keep_probs,
            mirror=self.cfg.multiview or self.cfg.eval_crops == 2)
        if n == 0:
            raise DataError(f"the test set of {self.dataset.name} is empty: nothing to evaluate on")
        if not math.isfinite(loss):
            self.diverged("test loss", loss)
        return loss / n, wrong1 / n, (wrong5 / n if wrong5 is not None else None), kept

    def make_plots(self, kept, final=True):
        """errors.png; at the end also filters.png and predictions.png (:func:`convnet.training.report.plots`)."""
        report.plots(self.out, self.net, self.dataset, self.history, kept, self.log, final=final)

    # --- state -----------------------------------------------------------------------------------------------
    def _restore(self, st):
        ckpt.check_training_state(st)
        m, path = st["meta"], st["path"]
        ckpt.check_position(m, path, self.cfg, len(self.train_loader))
        try:
            self.net.load_state_dict(st["params"])
            self.opt.load_state_dict({**m["optimizer"], "velocity": st["velocity"]})
            self.schedule.load_state_dict(m["schedule"])
            self.partial = {k: type(v)(m["partial"][k]) for k, v in _empty_totals().items()}
        except (KeyError, ValueError, TypeError) as e:
            raise ckpt.CheckpointError(f"checkpoint '{path}' does not fit the model or is incomplete: "
                                       f"{' '.join(str(e).split())}") from None
        self.epoch, self.batch, self.step = m["epoch"], m["batch"], m["step"]
        self.resumed_precision = m["config"].get("precision") or "fp32"
        self.history = m["history"]

    def save(self):
        cfgd = dataclasses.asdict(self.cfg)
        cfgd["max_steps"] = 0
        self.ranks.check_params(self.net, f"at the checkpoint of epoch {self.epoch + 1}, batch {self.batch}")
        meta = {"epoch": self.epoch, "batch": self.batch, "step": self.step, "history": self.history,
                "partial": self.partial, "schedule": self.schedule.state_dict(),
                "optimizer": {k: v for k, v in self.opt.state_dict().items() if k != "velocity"},
                "rng": {"kind": "counter", "seed": self.cfg.seed,
                        "note": "data order, crops, flips and dropout masks are functions of "
                                "(seed, epoch, batch, step): the position above is the whole RNG state"},
                "config": cfgd, "num_params": self.net.num_params(), "time": time.time(), "ranks": self.ranks.size}
        params, velocity = self.net.state_dict(), self.opt.state_dict()["velocity"]
        bad = ckpt.non_finite({**{f"parameter {k}": v for k, v in params.items()},
                               **{f"momentum of {k}": v for k, v in velocity.items()}})
        if bad:  # never checkpoint a diverged state: the checkpoint on disk stays the last good one
            self.diverged(bad[0], "non-finite")
        if self.ranks.rank:  # rank 0 alone writes (the ranks' parameters were just checked identical)
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
