"""Train a convnet: ``python -m convnet.train [--model fmnist] [--dataset fashion-mnist] ...``.

With no arguments: the ``fmnist`` model on Fashion-MNIST on the best device present (cuda if a GPU works,
else cpu, the fast CPU path), writing into ``runs/fmnist``. See docs/training.md.

Precedence of settings: built-in defaults < the model file's [train] section < command-line flags. On
``--resume`` the checkpoint's settings replace the first two (flags still override, e.g. ``--epochs``).

An existing run in ``--out`` is never replaced: continue it with ``--resume`` or replace it with ``--overwrite``.
Every user error (a bad flag or value, a bad model file, checkpoint or data, an unusable device or output directory)
is one line on stderr and exit status 2; a diverged run exits with 1, Ctrl-C with 130. ``--debug`` shows the
traceback instead.

``--distributed`` (data-parallel, :mod:`convnet.distributed`): run under ``mpirun -n N``; every rank parses the same
command line (compared at the start with the other ranks', as are the resolved settings, model text and data: a
difference is an error on every rank), rank 0 reads a ``--resume`` checkpoint and sends it to the others, and an error
on any rank, also before MPI started, is printed there and ends the whole job (``MPI_Abort``), so no rank waits
forever for one that stopped.
"""
from __future__ import annotations

import contextlib
import sys
import time
import traceback
from pathlib import Path

from . import checkpoint as ckpt
from .config import CLI_KEYS, Config, ConfigError, make_parser, setting_name
from .data import DataError
from .cpu import loop_threads, winograd
from . import install_report
from .devices import DeviceUnavailable, blas_threads, default_threads
from .model_file import ModelFileError, build_net, parse_model_text, resolve_model
from .distributed import DistributedError, digest, job_to_abort
from .graph import resolve_precision
from .placement import resolve_devices
from .trainer import Trainer, TrainingError
from .training import rundir

__all__ = ["Config", "ConfigError", "Trainer", "TrainingError", "main", "make_config", "parse_args", "run"]

# the errors a user can cause: one line and exit status 2 (TrainingError, a diverged run: 1)
USER_ERRORS = (ConfigError, DataError, DeviceUnavailable, ModelFileError, ckpt.CheckpointError)


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
            raise ConfigError(f"--model {flags['model']} differs from the checkpoint's model {cfg.model}")
        for k in ("params", "input_shape"):  # the checkpoint's model text was made with them
            if k in flags and flags[k] != getattr(cfg, k):
                raise ConfigError(f"{setting_name(k)} {flags[k]} differs from the checkpoint's ({getattr(cfg, k)})")
        cfg.distributed = False  # how the run is launched is not a saved setting: a resume says it again
        if flags.keys() & {"device", "devices"}:  # a new placement replaces the saved one as a whole: --device cpu
            cfg.device = cfg.devices = None     # puts every tower of a two-device run on cpu
    else:
        cfg.model = flags.get("model", cfg.model)
        cfg.model_text, cfg.model_source = resolve_model(cfg.model, flags.get("params"),
                                                         _input_shape(flags.get("input_shape"), flags.get("dataset")))
        _, train_defaults = parse_model_text(cfg.model_text, cfg.model_source)
        for k, v in train_defaults.items():
            setattr(cfg, k, v)
    for k, v in flags.items():
        setattr(cfg, k, v)
    if cfg.out is None:
        cfg.out = str(Path("runs") / Path(cfg.model).stem)
    return cfg.validate()


# the image shape of the datasets whose images have one size (a cuda-convnet data layer takes it from the data)
DATASET_SHAPES = {"cifar10": (3, 32, 32), "fashion-mnist": (1, 28, 28)}


def _input_shape(text, dataset):
    """--input-shape C,H,W, else the dataset's fixed shape, else None."""
    if text is None:
        from .data.base import _ALIASES
        return DATASET_SHAPES.get(_ALIASES.get((dataset or "").lower(), (dataset or "").lower()))
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise ConfigError(f"--input-shape must be C,H,W (three positive integers), got {text!r}")
    return shape


def run(argv=None, log=print):
    args = parse_args(argv)
    world = None
    if args.distributed and not args.summary:
        from .distributed import World
        world = World()
        # first, before any other collective (a --resume on one rank only would wait in its broadcast forever)
        world.check_agree({_arg_name(k): v for k, v in vars(args).items() if k != "debug"}, "command lines")
    resume_state = None
    resume = args.resume
    if args.eval_only and resume is None:
        resume = args.out or str(Path("runs") / Path(args.model or "fmnist").stem)
    if resume is not None:
        if world is None or world.rank == 0:
            resume_state = ckpt.load(resume)
            ckpt.check_training_state(resume_state)
        if world is not None and world.size > 1:  # rank 0's file (other nodes need not see it)
            resume_state = world.bcast(resume_state)
        saved = resume_state["meta"]["config"]
        if args.out is None:
            args.out = str(Path(resume_state["path"]).parent)
        cfg = make_config(args, saved=saved)
    else:
        cfg = make_config(args)
    if world is not None:  # the model file's text and [train] section, as each rank read them
        settings = {setting_name(k): v for k, v in vars(cfg).items() if k not in ("model_text", "model_source")}
        world.check_agree({**settings, "the model file's text": digest(cfg.model_text or "")}, "settings")
    if args.summary:
        return summary(cfg, log)
    lock = contextlib.nullcontext()
    if world is not None and world.rank != 0:
        log = _quiet  # rank 0 alone reports
    elif not args.eval_only:  # entered before any data is loaded
        lock = rundir.locked(cfg.out, resume_state["path"] if resume_state else None, args.overwrite)
    if cfg.threads is None:  # resolved once and saved with the run: a resume keeps the thread count (and rounding)
        cfg.threads = default_threads()
        if world is not None:  # the ranks on a node share its cores; rank 0's count for all
            cfg.threads = world.bcast(max(1, cfg.threads // world.local_size))
    with lock, blas_threads(cfg.threads, log), loop_threads(cfg.threads), winograd.algorithm(cfg.cpu_conv):
        if args.eval_only:
            return evaluate_only(cfg, resume_state, log, world)
        return Trainer(cfg, resume_state=resume_state, log=log, overwrite=args.overwrite, world=world).run()


def _quiet(*args, **kwargs):
    pass


def _arg_name(dest):
    """The flag of an argument of the command line (``batch_size`` -> ``--batch-size``)."""
    return setting_name(dest) if dest in CLI_KEYS else "--" + dest.replace("_", "-")


def _asks_distributed(argv) -> bool:
    """Whether a command line asks for a data-parallel run, also one that does not parse (a bad value elsewhere)."""
    flags = [a for a in argv if a in ("--distributed", "--no-distributed", "--summary")]
    return "--summary" not in flags and bool(flags) and flags[-1] == "--distributed"


def summary(cfg, log):
    """``--summary``: where convnet was imported from, the device training would use, the model's layer table (with
    each layer's device and the bytes exchanged per image between devices, for a net on several)."""
    try:
        device, towers = resolve_devices(cfg.device, cfg.devices, names=("--device", "--devices"))
        try:
            precision = f"precision {resolve_precision(cfg.precision, towers or [device])}"
        except ValueError as e:
            precision = f"--{e}"
        device = f"devices {', '.join(map(str, towers))}" if towers else f"device {device}"
        device = f"{device}, {precision}"
    except (DeviceUnavailable, ValueError) as e:
        device = f"device unavailable: {e}"
    log(f"{install_report()}; {device}")
    # shapes only: the towers' devices (--devices) label the placements and need not be usable here
    net, _ = build_net(cfg.model_text, cfg.model_source or cfg.model, device=None if cfg.devices else "numpy",
                       devices=cfg.devices, dtype=cfg.dtype, init_params=False)
    log(net.summary())
    return {"status": "summary"}


def evaluate_only(cfg, resume_state, log, world=None):
    """``--eval-only``: the checkpoint's test loss and errors (and the plots)."""
    trainer = Trainer(cfg, resume_state=resume_state, log=log, world=world)
    try:
        loss, e1, e5, kept = trainer.evaluate(keep_probs=16)
    finally:
        trainer.close()
    t5 = f", top-5 error {e5:.2%}" if e5 is not None else ""
    log(f"{cfg.model} on {trainer.dataset.name} test set: loss {loss:.4f}, top-1 error {e1:.2%}{t5} "
        f"(accuracy {1 - e1:.2%}), epoch {trainer.epoch}")
    if cfg.plots and trainer.ranks.rank == 0:
        try:
            trainer.out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"cannot write the plots to --out {trainer.out}: {e.strerror or e}") from None
        trainer.make_plots(kept, final=True)
    return {"status": "eval", "test_error": e1, "test_top5_error": e5, "test_loss": loss}


def _error(e) -> str:
    from .distributed import active_world
    world = active_world()
    who = f" (rank {world.rank} of {world.size})" if world is not None and world.size > 1 else ""
    return f"error{who}: " + " ".join(str(e).split())  # one line, whatever the message holds


def _say(line: str) -> None:
    """One line on stderr in one write: the ranks' lines reach mpirun's output whole, not interleaved."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def main(argv=None):
    """The command: returns the exit status (0 done, 1 diverged or an environment error, 2 a user error, 130
    Ctrl-C). Errors are one line on stderr; ``--debug`` re-raises them (the traceback)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    try:
        status = _main(argv, debug)
    except BaseException as e:  # --debug, or a bug: its traceback, and then the whole job ends
        comm = job_to_abort(_asks_distributed(argv))
        if comm is not None:
            sys.stderr.write(traceback.format_exc())  # in one write: the launcher forwards it whole
            _abort(comm, 2 if isinstance(e, USER_ERRORS) else 1)
        raise
    if status not in (0, 130):
        comm = job_to_abort(_asks_distributed(argv))
        if comm is not None:  # the other ranks would wait for this one forever
            _abort(comm, status)
    return status


ABORT_GRACE_S = 0.5  # how long the launcher gets to forward this rank's last output before the job is killed


def _abort(comm, status):
    sys.stderr.flush()
    sys.stdout.flush()
    time.sleep(ABORT_GRACE_S)  # Abort kills the launcher's forwarding too: a traceback was seen cut after 3 lines
    comm.Abort(status)


def _main(argv, debug):
    try:
        res = run(argv)
    except KeyboardInterrupt:  # a second Ctrl-C (the first one stops cleanly and saves)
        _say("interrupted")
        return 130
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0
    except USER_ERRORS as e:
        if debug:
            raise
        _say(_error(e))
        return 2
    except (TrainingError, DistributedError, OSError, MemoryError) as e:  # diverged; disk full, I/O error; out of memory
        if debug:
            raise
        _say(_error(e) if not isinstance(e, MemoryError) else "error: out of memory" + (f" ({e})" if str(e) else ""))
        return 1
    return 130 if res.get("status") == "interrupted" else 0


if __name__ == "__main__":
    sys.exit(main())
