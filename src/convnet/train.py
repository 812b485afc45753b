"""Train a convnet: ``python -m convnet.train [--model fmnist] [--dataset fashion-mnist] ...``.

With no arguments: the ``fmnist`` model on Fashion-MNIST on the best device present (cuda if a GPU works,
else numpy), writing into ``runs/fmnist``. See docs/training.md.

Precedence of settings: built-in defaults < the model file's [train] section < command-line flags. On
``--resume`` the checkpoint's settings replace the first two (flags still override, e.g. ``--epochs``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import checkpoint as ckpt
from . import ops
from .data import DataError, Loader, load_dataset
from .devices import get_device
from .models import ModelFileError, build_net, resolve_model
from .optim import SGD, Schedule


class TrainingError(RuntimeError):
    """Training cannot go on (diverged, incompatible checkpoint, ...)."""


@dataclass
class Config:
    model: str = "fmnist"
    dataset: str | None = None  # default: the model file's [train] dataset
    data: str | None = None
    device: str | None = None
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0005
    schedule: str = "step"
    lr_steps: str = ""
    lr_gamma: float = 0.1
    patience: int = 3
    max_drops: int = 3
    min_lr: float = 0.0
    flip: bool = False
    crop_pad: int = 0
    multiview: bool = False
    out: str | None = None
    seed: int = 0
    dtype: str = "float32"
    prefetch: int = 3
    threads: int = 1  # BLAS threads on the CPU devices (0 = leave the BLAS default)
    progress: bool = True
    plots: bool = True
    synthetic_train: int = 1280
    synthetic_test: int = 256
    max_steps: int = 0  # stop (as if interrupted: checkpoint + exit) after this many steps in this run; 0 = off
    model_text: str | None = field(default=None, repr=False)
    model_source: str | None = None


CLI_KEYS = [f.name for f in dataclasses.fields(Config) if f.name not in ("model_text", "model_source")]


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m convnet.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--model", help="shipped model name (alexnet, alexnet-owt, cifar-18pct, fmnist) or a model-file path "
                      "(default fmnist)")
    a("--dataset", help="fashion-mnist | cifar10 | synthetic (default: the model file's)")
    a("--data", help="dataset directory (Fashion-MNIST IDX files; CIFAR-10 python batches)")
    a("--device", help="numpy | emu | cuda | cuda:N (default: cuda if usable, else numpy)")
    a("--epochs", type=int)
    a("--batch-size", type=int, dest="batch_size")
    a("--lr", type=float, help="base learning rate")
    a("--momentum", type=float)
    a("--weight-decay", type=float, dest="weight_decay")
    a("--schedule", choices=Schedule.KINDS, help="step | plateau | linear | constant")
    a("--lr-steps", dest="lr_steps", help="epochs at which 'step' multiplies the lr by --lr-gamma, e.g. 8,11")
    a("--lr-gamma", type=float, dest="lr_gamma")
    a("--patience", type=int, help="plateau: epochs without improvement before dividing the lr by 10")
    a("--max-drops", type=int, dest="max_drops")
    a("--flip", action=argparse.BooleanOptionalAction, default=None, help="random horizontal flips")
    a("--crop-pad", type=int, dest="crop_pad", help="random crops after zero-padding by this many pixels")
    a("--multiview", action=argparse.BooleanOptionalAction, default=None,
      help="test on the image and its mirror image (average of the two softmax outputs)")
    a("--out", help="output directory (default runs/<model>)")
    a("--resume", help="checkpoint file or output directory to continue from")
    a("--seed", type=int)
    a("--eval-only", action="store_true", dest="eval_only",
      help="evaluate the checkpoint given by --resume (or <out>/checkpoint.npz) on the test set")
    a("--dtype", choices=("float32", "float64"))
    a("--prefetch", type=int, help="batches prepared ahead by the loader thread (0 = no thread)")
    a("--threads", type=int, help="BLAS threads for numpy/emu (default 1: robust on a shared machine, and the "
                                  "loader thread gets the other core; 0 = the BLAS library's default)")
    a("--no-progress", action="store_false", dest="progress", default=None)
    a("--no-plots", action="store_false", dest="plots", default=None)
    a("--synthetic-train", type=int, dest="synthetic_train", help="images in the synthetic training set")
    a("--synthetic-test", type=int, dest="synthetic_test")
    a("--max-steps", type=int, dest="max_steps", help=argparse.SUPPRESS)
    a("--summary", action="store_true", help="print the model summary and exit")
    return p.parse_args(argv)


def make_config(args, saved=None):
    """defaults < model [train] section (or the saved config) < explicit flags."""
    cfg = Config()
    flags = {k: getattr(args, k) for k in CLI_KEYS if getattr(args, k, None) is not None}
    if saved is not None:
        for k, v in saved.items():
            if hasattr(cfg, k):
                setattr(cfg, k, v)
        if "model" in flags and flags["model"] != cfg.model:
            raise TrainingError(f"--model {flags['model']} differs from the checkpoint's model {cfg.model}")
    else:
        cfg.model = flags.get("model", cfg.model)
        text, source = resolve_model(cfg.model)
        cfg.model_text, cfg.model_source = text, source
        _, train_defaults = _parse_only(text, source)
        for k, v in train_defaults.items():
            setattr(cfg, k, v)
    for k, v in flags.items():
        setattr(cfg, k, v)
    if cfg.out is None:
        cfg.out = str(Path("runs") / Path(cfg.model).stem)
    return cfg


def _parse_only(text, source):
    from .models import parse_model_text
    return parse_model_text(text, source)


# ------------------------------------------------------------------------------------------------------------
class Trainer:
    def __init__(self, cfg: Config, *, resume_state=None, log=print):
        self.cfg = cfg
        self.log = log
        self.device = get_device(cfg.device)
        self.net, _ = build_net(cfg.model_text, cfg.model_source or cfg.model, device=self.device,
                                dtype=cfg.dtype, seed=cfg.seed)
        d = self.net.data_layer
        ds_name = cfg.dataset or "synthetic"
        self.dataset = load_dataset(ds_name, cfg.data, shape=d.out_shape, classes=self.net.num_classes,
                                    seed=cfg.seed, synthetic_size=(cfg.synthetic_train, cfg.synthetic_test))
        c, h, w = self.dataset.shape
        if c != d.channels:
            raise DataError(f"dataset {self.dataset.name} has {c}-channel images, the model's data layer expects "
                            f"{d.channels}")
        if len(self.dataset.classes) != self.net.num_classes:
            raise DataError(f"dataset {self.dataset.name} has {len(self.dataset.classes)} classes, the model "
                            f"outputs {self.net.num_classes}")
        self.mean = self.dataset.mean_image() if resume_state is None or resume_state["mean"] is None \
            else resume_state["mean"]
        common = dict(out_hw=d.size, mean=self.mean, scale=d.scale, seed=cfg.seed, device=self.device,
                      dtype=self.net.dtype, prefetch=cfg.prefetch)
        self.train_loader = Loader(self.dataset.train_x, self.dataset.train_y, cfg.batch_size, train=True,
                                   crop_pad=cfg.crop_pad, flip=cfg.flip, **common)
        self.test_loader = Loader(self.dataset.test_x, self.dataset.test_y, cfg.batch_size, train=False,
                                  **common)
        if len(self.train_loader) == 0:
            raise DataError(f"the training set ({len(self.dataset.train_x)} images) is smaller than one batch "
                            f"({cfg.batch_size})")
        steps = [int(s) for s in str(cfg.lr_steps).replace(" ", "").split(",") if s]
        self.schedule = Schedule(cfg.schedule, cfg.lr, steps=steps, gamma=cfg.lr_gamma, patience=cfg.patience,
                                 max_drops=cfg.max_drops, total_epochs=cfg.epochs)
        self.opt = SGD(self.net, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        self.epoch, self.batch, self.step = 0, 0, 0
        self.history = []
        self.partial = {"loss": 0.0, "err": 0, "n": 0, "time": 0.0}
        if resume_state is not None:
            self._restore(resume_state)
        self.out = Path(cfg.out)
        self._interrupted = False
        self._bar = None

    # --- state -----------------------------------------------------------------------------------------------
    def _restore(self, st):
        self.net.load_state_dict(st["params"])
        m = st["meta"]
        self.opt.load_state_dict({**m["optimizer"], "velocity": st["velocity"]})
        self.schedule.load_state_dict(m["schedule"])
        self.epoch, self.batch, self.step = m["epoch"], m["batch"], m["step"]
        self.history = m["history"]
        self.partial = m["partial"]

    def save(self):
        cfgd = dataclasses.asdict(self.cfg)
        cfgd["max_steps"] = 0
        meta = {"epoch": self.epoch, "batch": self.batch, "step": self.step, "history": self.history,
                "partial": self.partial, "schedule": self.schedule.state_dict(),
                "optimizer": {k: v for k, v in self.opt.state_dict().items() if k != "velocity"},
                "rng": {"kind": "counter", "seed": self.cfg.seed,
                        "note": "data order, crops, flips and dropout masks are functions of "
                                "(seed, epoch, batch, step): the position above is the whole RNG state"},
                "config": cfgd, "num_params": self.net.num_params(), "time": time.time()}
        return ckpt.save(self.out / "checkpoint.npz", params=self.net.state_dict(),
                         velocity=self.opt.state_dict()["velocity"], mean=self.mean, meta=meta)

    # --- evaluation ------------------------------------------------------------------------------------------
    def evaluate(self, keep_probs=0):
        """Test-set (loss, top-1 error, top-5 error or None, kept (probs, labels) of the first images)."""
        xp = self.device.xp
        k5 = self.net.num_classes > 5
        n = wrong1 = wrong5 = 0
        loss = 0.0
        kept = []
        for x, y in self.test_loader.epoch(0):
            p = self.net.forward(x)
            if self.cfg.multiview:
                p = (p + self.net.forward(xp.ascontiguousarray(x[:, :, ::-1, :]))) * p.dtype.type(0.5)
            errs = ops.topk_errors(self.device, p, y, ks=(1, 5) if k5 else (1,))
            wrong1 += errs[0]
            wrong5 += errs[1] if k5 else 0
            m = y.shape[0]
            loss += float(-xp.log(xp.maximum(p[y, xp.arange(m)], 1e-30)).sum())
            n += m
            if sum(len(a[1]) for a in kept) < keep_probs:
                kept.append((self.device.to_numpy(p), self.device.to_numpy(y)))
        return loss / n, wrong1 / n, (wrong5 / n if k5 else None), kept

    # --- training --------------------------------------------------------------------------------------------
    def _on_sigint(self, signum, frame):
        if self._interrupted:  # second Ctrl-C: give up immediately
            raise KeyboardInterrupt
        self._interrupted = True

    def run(self):
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "model.cfg").write_text(cfg.model_text)
        (self.out / "summary.txt").write_text(self.net.summary() + "\n")
        logf = open(self.out / "log.jsonl", "a")
        old = None
        try:
            old = signal.signal(signal.SIGINT, self._on_sigint)
        except ValueError:  # not the main thread
            pass
        try:
            with np.errstate(over="ignore", invalid="ignore"):  # a non-finite loss is detected and reported
                return self._loop(logf)
        finally:
            if self._bar is not None:
                self._bar.close()
            logf.close()
            if old is not None:
                signal.signal(signal.SIGINT, old)

    def _loop(self, logf):
        cfg, net, dev = self.cfg, self.net, self.device
        last = self.history[-1] if self.history else {}
        wall0 = time.perf_counter() - last.get("elapsed_s", 0.0)
        cpu0 = time.process_time() - last.get("cpu_s", 0.0)
        xp = dev.xp
        nb = len(self.train_loader)
        bs = cfg.batch_size
        steps_this_run = 0
        self.log(f"training {Path(cfg.model).stem} on {self.dataset.name} ({len(self.dataset.train_x)} train / "
                 f"{len(self.dataset.test_x)} test images), device {dev}, {net.num_params():,} parameters, "
                 f"{cfg.epochs} epochs of {nb} batches of {bs}; output in {self.out}")
        sync_every = 1 if dev.kind in ("numpy", "emu") else 20
        if self.epoch >= cfg.epochs:
            self.log(f"already trained for {self.epoch} epochs (--epochs {cfg.epochs}); pass a larger --epochs to "
                     f"continue")
        while self.epoch < cfg.epochs:
            lr = max(self.schedule.lr_at(self.epoch, self.batch / nb), cfg.min_lr)
            lr_start = max(self.schedule.lr_at(self.epoch), cfg.min_lr)  # logged: the rate at the epoch's start
            self.opt.lr = lr
            bar = None
            if cfg.progress:
                from tqdm import tqdm
                bar = tqdm(total=nb, initial=self.batch, desc=f"epoch {self.epoch + 1}/{cfg.epochs}",
                           unit="batch", leave=True, dynamic_ncols=True, file=sys.stderr)
                self._bar = bar
            loss_acc = xp.zeros((), np.float64)
            err_acc = xp.zeros((), np.int64)
            t0 = time.perf_counter()
            t_last, b_last = t0, self.batch
            stop = None
            per_step = self.schedule.kind == "linear"
            for x, y in self.train_loader.epoch(self.epoch, self.batch):
                if per_step:
                    lr = max(self.schedule.lr_at(self.epoch, self.batch / nb), cfg.min_lr)
                    self.opt.lr = lr
                probs = net.forward(x, y, train=True, step=self.step)
                net.backward()
                self.opt.step()
                loss_acc += net.loss
                err_acc += (xp.argmax(probs, axis=0) != y).sum()
                self.batch += 1
                self.step += 1
                steps_this_run += 1
                if self.batch % sync_every == 0 or self.batch == nb:
                    self._fold(loss_acc, err_acc, self.batch - b_last, bs, time.perf_counter() - t_last)
                    loss_acc[...] = 0
                    err_acc[...] = 0
                    now = time.perf_counter()
                    if bar is not None:
                        p = self.partial
                        bar.update(self.batch - b_last)
                        bar.set_postfix(loss=f"{p['loss'] / p['n']:.4f}", err=f"{p['err'] / p['n']:.4f}",
                                        lr=f"{lr:.4g}", ips=f"{(self.batch - b_last) * bs / (now - t_last):.0f}")
                    t_last, b_last = now, self.batch
                if self._interrupted:
                    stop = "interrupted"
                elif cfg.max_steps and steps_this_run >= cfg.max_steps:
                    stop = "max_steps"
                if stop:
                    break
            if self.batch % sync_every and self.batch != b_last:
                self._fold(loss_acc, err_acc, self.batch - b_last, bs, time.perf_counter() - t_last)
            if bar is not None:
                bar.close()
                self._bar = None
            if stop:
                path = self.save()
                msg = "interrupted (Ctrl-C)" if stop == "interrupted" else f"stopped after {steps_this_run} steps"
                self.log(f"{msg}: saved {path} at epoch {self.epoch + 1}, batch {self.batch}/{nb}; "
                         f"continue with --resume {self.out}")
                return {"status": stop, "history": self.history}
            # end of epoch
            p = self.partial
            te_loss, te1, te5, kept = self.evaluate(keep_probs=16)
            rec = {"epoch": self.epoch + 1, "step": self.step, "lr": lr_start, "train_loss": p["loss"] / p["n"],
                   "train_error": p["err"] / p["n"], "test_loss": te_loss, "test_error": te1,
                   "test_top5_error": te5, "train_time_s": p["time"],
                   "elapsed_s": time.perf_counter() - wall0, "cpu_s": time.process_time() - cpu0,
                   "images_per_s": p["n"] / p["time"] if p["time"] > 0 else None, "device": str(dev)}
            self.history.append(rec)
            logf.write(json.dumps(rec) + "\n")
            logf.flush()
            t5 = f", top-5 {te5:.2%}" if te5 is not None else ""
            self.log(f"epoch {self.epoch + 1}: train loss {rec['train_loss']:.4f} error {rec['train_error']:.2%}; "
                     f"test loss {te_loss:.4f} error {te1:.2%}{t5} (accuracy {1 - te1:.2%}); "
                     f"{rec['images_per_s']:.0f} images/s, lr {lr_start:g}, {rec['elapsed_s']:.0f} s")
            self.schedule.observe(te1)
            self.epoch += 1
            self.batch = 0
            self.partial = {"loss": 0.0, "err": 0, "n": 0, "time": 0.0}
            self.save()
            if cfg.plots:
                self.make_plots(kept, final=self.epoch >= cfg.epochs)
        return {"status": "done", "history": self.history}

    def _fold(self, loss_acc, err_acc, nbatches, bs, dt):
        loss = float(loss_acc)
        if not math.isfinite(loss):
            raise TrainingError(
                f"the loss became {loss} at epoch {self.epoch + 1}, step {self.step}: training diverged. "
                f"Lower the learning rate (--lr, now {self.opt.lr:g}) or check the data / initialisation. "
                f"The last good checkpoint is {self.out / 'checkpoint.npz'} (if any).")
        p = self.partial
        p["loss"] += loss
        p["err"] += int(err_acc)
        p["n"] += nbatches * bs
        p["time"] += dt

    def make_plots(self, kept, final=True):
        from . import plots
        try:
            plots.error_curves(self.history, self.out / "errors.png")
            if final:
                first = next((l for l in self.net.order if l.type == "conv"), None)
                if first is not None:
                    plots.filter_grid(self.device.to_numpy(first.params["w"]), self.out / "filters.png",
                                      title=f"{first.name} filters")
                if kept:
                    probs = np.concatenate([k[0] for k in kept], axis=1)
                    labels = np.concatenate([k[1] for k in kept])
                    n = min(16, len(labels))
                    plots.predictions(self.dataset.test_x[:n], labels[:n], probs[:, :n], self.dataset.classes,
                                      self.out / "predictions.png")
        except Exception as e:  # noqa: BLE001 - plots never stop a training run
            self.log(f"warning: plotting failed: {type(e).__name__}: {e}")


# ------------------------------------------------------------------------------------------------------------
def run(argv=None, log=print):
    args = parse_args(argv)
    resume_state = None
    resume = args.resume
    if args.eval_only and resume is None:
        resume = args.out or str(Path("runs") / Path(args.model or "fmnist").stem)
    if resume is not None:
        resume_state = ckpt.load(resume)
        saved = resume_state["meta"]["config"]
        if args.out is None:
            args.out = str(Path(resume_state["path"]).parent)
        cfg = make_config(args, saved=saved)
    else:
        cfg = make_config(args)
    if args.summary:
        net, _ = build_net(cfg.model_text, cfg.model_source or cfg.model, device="numpy", dtype=cfg.dtype,
                           init_params=False)
        log(net.summary())
        return {"status": "summary"}
    with blas_threads(cfg.threads, log):
        return _run(args, cfg, resume_state, log)


class blas_threads:
    """Limit the BLAS thread pool (threadpoolctl) while training on a CPU device."""

    def __init__(self, n, log=print):
        self.n, self.log, self.ctl = int(n or 0), log, None

    def __enter__(self):
        if self.n > 0:
            try:
                from threadpoolctl import threadpool_limits
            except ImportError:
                self.log("note: threadpoolctl is not installed; BLAS threads left at the library default "
                         "(pip install threadpoolctl, or set OPENBLAS_NUM_THREADS)")
                return self
            self.ctl = threadpool_limits(limits=self.n, user_api="blas")
        return self

    def __exit__(self, *exc):
        if self.ctl is not None:
            self.ctl.restore_original_limits()
        return False


def _run(args, cfg, resume_state, log):
    trainer = Trainer(cfg, resume_state=resume_state, log=log)
    if args.eval_only:
        loss, e1, e5, kept = trainer.evaluate(keep_probs=16)
        t5 = f", top-5 error {e5:.2%}" if e5 is not None else ""
        log(f"{cfg.model} on {trainer.dataset.name} test set: loss {loss:.4f}, top-1 error {e1:.2%}{t5} "
            f"(accuracy {1 - e1:.2%}), epoch {trainer.epoch}")
        if cfg.plots:
            trainer.out.mkdir(parents=True, exist_ok=True)
            trainer.make_plots(kept, final=True)
        return {"status": "eval", "test_error": e1, "test_top5_error": e5, "test_loss": loss}
    return trainer.run()


def main(argv=None):
    try:
        res = run(argv)
    except (DataError, ModelFileError, TrainingError, ckpt.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if not isinstance(e, TrainingError) else 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 130 if res.get("status") == "interrupted" else 0


if __name__ == "__main__":
    sys.exit(main())
