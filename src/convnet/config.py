"""The training configuration: one dataclass whose fields carry their command-line help.

Every setting of ``python -m convnet.train`` is a field of :class:`Config`, declared once with :func:`setting`:
its default, its help text, whether the model file's ``[train]`` section may set it, and its flag. The argparse
parser (:func:`make_parser`) and the allowed ``[train]`` keys (:data:`TRAIN_KEYS`, read by
:mod:`convnet.model_file`) are generated from those declarations.

Flags: ``--<name-with-dashes>``, typed by the field's annotation. A bool field whose default is False gets
``--x/--no-x``; one whose default is True gets ``--no-x`` only. ``flag=None``: no flag; ``hidden=True``: a flag
left out of ``--help``.

Each numeric field also declares its range (``low``/``high``, open or closed); floats must be finite. The same check
(:func:`check_setting`) validates a flag, a ``[train]`` key and a whole :class:`Config` (:meth:`Config.validate`),
so a bad value is a one-line error naming the flag or key, never a silent clamp or a traceback later.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field

from .devices import parse_device_list
from .optim import Schedule
from .reference.precision import PRECISIONS

# The cpu device's convolution algorithms (--cpu-conv; convnet/cpu/winograd.py runs them). Here, not there: importing
# convnet.cpu sets the OpenMP and malloc settings of the process, which a run on another device need not get.
CPU_CONV_ALGOS = ("direct", "winograd", "auto")

_AUTO = object()
EVAL_CROPS = (1, 2, 10)  # the test views --eval-crops allows
INT_MAX = 2**31 - 1  # counts (epochs, batch size, ...) are below 2**31: the kernels index with 32-bit ints


class ConfigError(ValueError):
    """A setting that is not valid (a flag, a [train] key, a Config field, the output directory); the message names
    it and says what is expected."""


class UsageError(ConfigError):
    """A command line that argparse rejects (unknown flag, missing value, bad number)."""


def setting(default, help=None, *, train=False, flag=_AUTO, choices=None, hidden=False, repr=True, low=None,
            high=None, low_open=False, high_open=False):
    """A Config field: ``train=True`` lets the model file's [train] section set it; ``flag=None``: no flag.
    ``low``/``high``: the allowed range of a number (``low_open``/``high_open``: excluding the bound)."""
    return field(default=default, repr=repr,
                 metadata={"help": help, "train": train, "flag": flag, "choices": choices, "hidden": hidden,
                           "low": low, "high": high, "low_open": low_open, "high_open": high_open})


@dataclass
class Config:
    model: str = setting("fmnist", "shipped model name (alexnet, alexnet-2gpu, alexnet-owt, cifar-11pct, cifar-18pct, "
                                   "fmnist) or a model-file path (default fmnist)")
    params: str | None = setting(None, "cuda-convnet's layer-params file (layer-params-X.cfg), merged with --model's "
                                       "layers file (layers-X.cfg) by section name")
    input_shape: str | None = setting(None, "C,H,W: the image shape for a cuda-convnet data layer, which has none "
                                            "(default: the dataset's: cifar10 3,32,32, fashion-mnist 1,28,28)")
    dataset: str | None = setting(None, "fashion-mnist | cifar10 | synthetic | imagenet (a directory made by "
                                           "python -m convnet.data.prepare) (default: the model file's)", train=True)
    data: str | None = setting(None, "dataset directory (Fashion-MNIST IDX files; CIFAR-10 python batches; "
                                        "imagenet: the prepared directory)")
    device: str | None = setting(None, "cpu | numpy | emu | cuda | cuda:N (default: cuda if usable, else cpu, the fast "
                                        "CPU path; numpy is the plain NumPy reference)")
    devices: str | None = setting(None, "the devices of the model's towers (layers with device = 0, 1, ...), e.g. "
                                        "cuda:0,cuda:1 or emu:0,emu:1; the first is the net's device "
                                        "(default: every tower on --device)")
    distributed: bool = setting(False, "data-parallel training: run under mpirun -n N (pip install 'convnet[mpi]'); "
                                       "each rank takes a device (cuda:<rank on its node>, or --device numpy|cpu|emu) "
                                       "and batch-size/N images of every batch, gradients are averaged (NCCL on GPUs, "
                                       "MPI on the host); rank 0 logs and checkpoints. Not saved: a resume says again")
    check_every: int = setting(100, "with --distributed: compare a checksum of the ranks' parameters every this many "
                                    "steps (and at every checkpoint); they must stay identical", low=1)
    epochs: int = setting(10, "number of epochs", train=True, low=1)
    batch_size: int = setting(128, "images per batch (with --distributed: the global batch, split across the ranks)",
                              train=True, low=1)
    lr: float = setting(0.01, "base learning rate", train=True, low=0.0, low_open=True)
    momentum: float = setting(0.9, "SGD momentum", train=True, low=0.0, high=1.0, high_open=True)
    weight_decay: float = setting(0.0005, "SGD weight decay", train=True, low=0.0)
    schedule: str = setting("step", "step | plateau | linear | constant", train=True, choices=Schedule.KINDS)
    lr_steps: str = setting("", "epochs at which 'step' multiplies the lr by --lr-gamma, e.g. 8,11", train=True)
    lr_gamma: float = setting(0.1, "factor of each 'step' (and 'plateau') decay", train=True, low=0.0,
                              low_open=True)
    patience: int = setting(3, "plateau: epochs without improvement before dividing the lr by 10", train=True,
                           low=1)
    max_drops: int = setting(3, "plateau: at most this many decays", train=True, low=0)
    min_lr: float = setting(0.0, "the learning rate never goes below this", train=True, flag=None, low=0.0)
    flip: bool = setting(False, "random horizontal flips", train=True)
    crop_pad: int = setting(0, "random crops after zero-padding by this many pixels", train=True, low=0)
    lighting: float | None = setting(None, "PCA lighting: std of the per-image coefficients (the paper's 0.1); "
                                           "prepared datasets only (default: 0.1 for them, else off)", train=True,
                                     low=0.0)
    multiview: bool = setting(False, "test on the image and its mirror image (average of the two softmax outputs); "
                                     "the same as --eval-crops 2", train=True)
    eval_crops: int = setting(1, "test views per image, softmax averaged: 1 (centre crop), 2 (and its mirror "
                                 "image, as --multiview), 10 (the paper's four corners + centre and their mirror "
                                 "images)", train=True, low=1, high=10)
    test_every: int = setting(1, "evaluate on the test set every this many epochs, and after the last one "
                                 "(cuda-convnet's test frequency; the plateau schedule needs 1)", train=True, low=1)
    out: str | None = setting(None, "output directory (default runs/<model>)")
    seed: int = setting(0, "random seed (data order, crops, flips, dropout, initialisation)", low=0,
                       high=2**63 - 1)
    dtype: str = setting("float32", "parameter and activation type", choices=("float32", "float64"))
    precision: str | None = setting(None, "fp32 | tf32 | bf16: the conv and fc layers' multiplications (tf32: inputs "
                                          "rounded to TF32, FP32 accumulation; bf16: activations stored in bfloat16, "
                                          "inputs rounded to bfloat16, FP32 accumulation and weights) (default: "
                                          "tf32 on a GPU with tensor cores, compute capability 8.0+, else fp32; saved "
                                          "with the run)", train=True, choices=PRECISIONS)
    cpu_conv: str = setting("auto", "the cpu device's 3x3 stride-1 convolutions: auto (Winograd F(2x2, 3x3) for each "
                                    "pass where the measured cost model expects a gain: forward and data gradient "
                                    "from 4 channels and 32 images, filter gradient from 128 channels) | direct "
                                    "(im2col GEMMs) | winograd (wherever it applies) (default auto); other devices "
                                    "ignore it",
                            train=True, choices=CPU_CONV_ALGOS)
    prefetch: int = setting(3, "batches prepared ahead by the loader thread (0 = no thread)", low=0, high=1024)
    workers: int | None = setting(None, "processes decoding prepared (JPEG) datasets (0 = in the loader thread; "
                                        "default: the CPU cores less one, at least 1)", low=0, high=1024)
    threads: int | None = setting(None, "threads of the CPU devices (BLAS, the cpu device's GEMM and loops); default: the "
                                        "cores other work leaves idle at the start (at least 1, at most 8), saved with "
                                        "the run; 0 = the BLAS library's own default",
                                  low=0, high=4096)
    progress: bool = setting(True, "no progress bar")
    plots: bool = setting(True, "no plots")
    synthetic_train: int = setting(1280, "images in the synthetic training set", low=1)
    synthetic_test: int = setting(256, "images in the synthetic test set", low=1)
    # stop (as if interrupted: checkpoint + exit) after this many steps in this run; 0 = off. For tests.
    max_steps: int = setting(0, hidden=True, low=0)
    model_text: str | None = setting(None, flag=None, repr=False)  # the model file's text (stored in checkpoints)
    model_source: str | None = setting(None, flag=None)

    def validate(self) -> "Config":
        """Check every field (type, range, finiteness); ConfigError naming the flag (or the [train] key)."""
        for name in FIELDS:
            try:
                setattr(self, name, check_setting(name, getattr(self, name)))
            except ValueError as e:
                raise ConfigError(f"{setting_name(name)} {e}") from None
        if self.schedule == "plateau" and self.test_every != 1:
            raise ConfigError(f"the plateau schedule watches the test error of every epoch: {setting_name('test_every')} "
                              f"must be 1, got {self.test_every}")
        return self


def _type(f) -> str:
    """'int', 'float', 'str' or 'bool', from the field's annotation (a string: ``str | None`` -> 'str')."""
    return str(f.type).split("|")[0].strip()


_TYPES = {"int": int, "float": float, "str": str}
FIELDS = {f.name: f for f in dataclasses.fields(Config)}
# [train] key -> type ('int', 'float', 'str', 'bool'): what the model file's [train] section may set
TRAIN_KEYS = {name: _type(f) for name, f in FIELDS.items() if f.metadata["train"]}
# the fields that have a command-line flag (what make_config reads from the parsed arguments)
CLI_KEYS = [name for name, f in FIELDS.items() if f.metadata["flag"] is not None]


def _flag(f) -> str:
    m = f.metadata
    return m["flag"] if m["flag"] is not _AUTO else "--" + f.name.replace("_", "-")


def setting_name(name: str) -> str:
    """How messages name a setting: its flag (``--lr``), else its [train] key (``[train] min_lr``)."""
    f = FIELDS[name]
    return _flag(f) if f.metadata["flag"] is not None else f"[train] {name}" if f.metadata["train"] else name


def _range(m, lo, hi) -> str:
    num = (lambda v: str(v)) if isinstance(lo if lo is not None else hi, int) else (lambda v: f"{v:g}")
    parts = []
    if lo is not None:
        parts.append(f"{'>' if m['low_open'] else '>='} {num(lo)}")
    if hi is not None:
        parts.append(f"{'<' if m['high_open'] else '<='} {num(hi)}")
    return " and ".join(parts)


def parse_lr_steps(value) -> list[int]:
    """'8,11' -> [8, 11]: epochs (>= 0) at which the step schedule decays; ValueError naming the bad entry."""
    if isinstance(value, (list, tuple)):
        items = list(value)
    else:
        items = [s for s in str(value).replace(" ", "").split(",") if s]
    steps = []
    for s in items:
        try:
            if isinstance(s, bool) or isinstance(s, float):
                raise ValueError
            v = int(s)
        except (TypeError, ValueError):
            raise ValueError(f"must be comma-separated epoch numbers like 8,11, got {value!r}") from None
        if not 0 <= v <= INT_MAX:
            raise ValueError(f"must be comma-separated epoch numbers >= 0, got {value!r}")
        steps.append(v)
    return steps


def check_setting(name: str, value):
    """``value`` for Config field ``name``, converted (an int for a float field becomes a float) and checked: its type,
    finiteness, range and choices. ValueError with what is expected, not naming the setting (callers prefix the
    flag or the [train] key)."""
    f = FIELDS[name]
    m, t = f.metadata, _type(f)
    if value is None:
        if f.default is None:
            return None
        raise ValueError("must be given")
    if t == "bool":
        if not isinstance(value, bool):
            raise ValueError(f"must be true or false, got {value!r}")
        return value
    if t == "str":
        if not isinstance(value, str):
            raise ValueError(f"must be text, got {value!r}")
        if m["choices"] and value not in m["choices"]:
            raise ValueError(f"must be one of {', '.join(m['choices'])}, got {value!r}")
        if name == "lr_steps":
            parse_lr_steps(value)
        if name == "devices":
            parse_device_list(value)
        return value
    if t == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"must be an integer, got {value!r}")
    else:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"must be a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"must be a finite number, got {value}")
    if name == "eval_crops" and value not in EVAL_CROPS:
        raise ValueError(f"must be one of {', '.join(map(str, EVAL_CROPS))}, got {value}")
    lo, hi = m["low"], m["high"]
    if hi is None and t == "int" and value > INT_MAX:  # the implicit bound of every count
        hi = INT_MAX
    bad_lo = lo is not None and (value <= lo if m["low_open"] else value < lo)
    bad_hi = hi is not None and (value >= hi if m["high_open"] else value > hi)
    if bad_lo or bad_hi:
        raise ValueError(f"must be {_range(m, lo, hi)}, got {value:g}" if t == "float" else
                         f"must be {_range(m, lo, hi)}, got {value}")
    return value


def _flag_type(f):
    """argparse ``type=`` for a field: the text converted and checked (argparse.ArgumentTypeError says why not)."""
    t = _type(f)
    convert, what = {"int": (int, "an integer"), "float": (float, "a number"), "str": (str, "text")}[t]

    def parse(text):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        try:
            return check_setting(f.name, value)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = t
    return parse


def _add_flag(p, f):
    m = f.metadata
    flag = _flag(f)
    help_ = argparse.SUPPRESS if m["hidden"] else m["help"]
    if _type(f) == "bool":
        if f.default:  # on by default: only a flag to turn it off
            p.add_argument(flag.replace("--", "--no-", 1), action="store_false", dest=f.name, default=None,
                           help=help_)
        else:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, dest=f.name, default=None, help=help_)
        return
    kw = {"choices": m["choices"]} if m["choices"] else {"type": _flag_type(f)}
    p.add_argument(flag, dest=f.name, help=help_, **kw)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are a :class:`UsageError` (one line, handled by the command) instead of usage
    text and ``sys.exit(2)``; ``--help`` still prints and exits."""

    def error(self, message):
        raise UsageError(f"{message} (see --help)")


def make_parser(description=None) -> argparse.ArgumentParser:
    """The command line of ``python -m convnet.train``: a flag per Config field, plus the actions."""
    p = _Parser(prog="python -m convnet.train", description=description,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in FIELDS.values():
        if f.metadata["flag"] is not None:
            _add_flag(p, f)
    p.add_argument("--resume", help="checkpoint file or output directory to continue from")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run in --out (its checkpoint and log) instead of refusing to")
    p.add_argument("--eval-only", action="store_true", dest="eval_only",
                   help="evaluate the checkpoint given by --resume (or <out>/checkpoint.npz) on the test set")
    p.add_argument("--summary", action="store_true",
                   help="print where convnet is installed, the device, and the model summary, and exit")
    p.add_argument("--debug", action="store_true", help="on an error, show the Python traceback")
    return p
