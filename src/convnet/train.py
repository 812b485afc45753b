"""Train a convnet: ``python -m convnet.train [--model fmnist] [--dataset fashion-mnist] ...``.

With no arguments: the ``fmnist`` model on Fashion-MNIST on the best device present (cuda if a GPU works,
else numpy), writing into ``runs/fmnist``. See docs/training.md.

Precedence of settings: built-in defaults < the model file's [train] section < command-line flags. On
``--resume`` the checkpoint's settings replace the first two (flags still override, e.g. ``--epochs``).
"""
from __future__ import annotations

import sys
from pathlib import Path

from . import checkpoint as ckpt
from .config import CLI_KEYS, Config, make_parser
from .data import DataError
from .devices import DeviceUnavailable, blas_threads, get_device, install_report
from .model_file import ModelFileError, build_net, parse_model_text, resolve_model
from .trainer import Trainer, TrainingError

__all__ = ["Config", "Trainer", "TrainingError", "main", "make_config", "parse_args", "run"]


def parse_args(argv=None):
    return make_parser(__doc__).parse_args(argv)


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
        cfg.model_text, cfg.model_source = resolve_model(cfg.model)
        _, train_defaults = parse_model_text(cfg.model_text, cfg.model_source)
        for k, v in train_defaults.items():
            setattr(cfg, k, v)
    for k, v in flags.items():
        setattr(cfg, k, v)
    if cfg.out is None:
        cfg.out = str(Path("runs") / Path(cfg.model).stem)
    return cfg


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
        return summary(cfg, log)
    with blas_threads(cfg.threads, log):
        if args.eval_only:
            return evaluate_only(cfg, resume_state, log)
        return Trainer(cfg, resume_state=resume_state, log=log).run()


def summary(cfg, log):
    """``--summary``: where convnet was imported from, the device training would use, the model's layer table."""
    try:
        device = f"device {get_device(cfg.device)}"
    except (DeviceUnavailable, ValueError) as e:
        device = f"device unavailable: {e}"
    log(f"{install_report()}; {device}")
    net, _ = build_net(cfg.model_text, cfg.model_source or cfg.model, device="numpy", dtype=cfg.dtype,
                       init_params=False)
    log(net.summary())
    return {"status": "summary"}


def evaluate_only(cfg, resume_state, log):
    """``--eval-only``: the checkpoint's test loss and errors (and the plots)."""
    trainer = Trainer(cfg, resume_state=resume_state, log=log)
    loss, e1, e5, kept = trainer.evaluate(keep_probs=16)
    t5 = f", top-5 error {e5:.2%}" if e5 is not None else ""
    log(f"{cfg.model} on {trainer.dataset.name} test set: loss {loss:.4f}, top-1 error {e1:.2%}{t5} "
        f"(accuracy {1 - e1:.2%}), epoch {trainer.epoch}")
    if cfg.plots:
        trainer.out.mkdir(parents=True, exist_ok=True)
        trainer.make_plots(kept, final=True)
    return {"status": "eval", "test_error": e1, "test_top5_error": e5, "test_loss": loss}


def main(argv=None):
    try:
        res = run(argv)
    except (DataError, DeviceUnavailable, ModelFileError, TrainingError, ckpt.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if not isinstance(e, TrainingError) else 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 130 if res.get("status") == "interrupted" else 0


if __name__ == "__main__":
    sys.exit(main())
