"""The training configuration: one dataclass whose fields carry their command-line help.

Every setting of ``python -m convnet.train`` is a field of :class:`Config`, declared once with :func:`setting`:
its default, its help text, whether the model file's ``[train]`` section may set it, and its flag. The argparse
parser (:func:`make_parser`) and the allowed ``[train]`` keys (:data:`TRAIN_KEYS`, read by
:mod:`convnet.model_file`) are generated from those declarations.

Flags: ``--<name-with-dashes>``, typed by the field's annotation. A bool field whose default is False gets
``--x/--no-x``; one whose default is True gets ``--no-x`` only. ``flag=None``: no flag; ``hidden=True``: a flag
left out of ``--help``.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field

from .optim import Schedule

_AUTO = object()


def setting(default, help=None, *, train=False, flag=_AUTO, choices=None, hidden=False, repr=True):
    """A Config field: ``train=True`` lets the model file's [train] section set it; ``flag=None``: no flag."""
    return field(default=default, repr=repr,
                 metadata={"help": help, "train": train, "flag": flag, "choices": choices, "hidden": hidden})


@dataclass
class Config:
    model: str = setting("fmnist", "shipped model name (alexnet, alexnet-owt, cifar-18pct, fmnist) or a model-file "
                                   "path (default fmnist)")
    dataset: str | None = setting(None, "fashion-mnist | cifar10 | synthetic (default: the model file's)", train=True)
    data: str | None = setting(None, "dataset directory (Fashion-MNIST IDX files; CIFAR-10 python batches)")
    device: str | None = setting(None, "numpy | emu | cuda | cuda:N (default: cuda if usable, else numpy)")
    epochs: int = setting(10, "number of epochs", train=True)
    batch_size: int = setting(128, "images per batch", train=True)
    lr: float = setting(0.01, "base learning rate", train=True)
    momentum: float = setting(0.9, "SGD momentum", train=True)
    weight_decay: float = setting(0.0005, "SGD weight decay", train=True)
    schedule: str = setting("step", "step | plateau | linear | constant", train=True, choices=Schedule.KINDS)
    lr_steps: str = setting("", "epochs at which 'step' multiplies the lr by --lr-gamma, e.g. 8,11", train=True)
    lr_gamma: float = setting(0.1, "factor of each 'step' (and 'plateau') decay", train=True)
    patience: int = setting(3, "plateau: epochs without improvement before dividing the lr by 10", train=True)
    max_drops: int = setting(3, "plateau: at most this many decays", train=True)
    min_lr: float = setting(0.0, "the learning rate never goes below this", train=True, flag=None)
    flip: bool = setting(False, "random horizontal flips", train=True)
    crop_pad: int = setting(0, "random crops after zero-padding by this many pixels", train=True)
    multiview: bool = setting(False, "test on the image and its mirror image (average of the two softmax outputs)",
                              train=True)
    out: str | None = setting(None, "output directory (default runs/<model>)")
    seed: int = setting(0, "random seed (data order, crops, flips, dropout, initialisation)")
    dtype: str = setting("float32", "parameter and activation type", choices=("float32", "float64"))
    prefetch: int = setting(3, "batches prepared ahead by the loader thread (0 = no thread)")
    threads: int = setting(1, "BLAS threads for numpy/emu (default 1: robust on a shared machine, and the loader "
                              "thread gets the other core; 0 = the BLAS library's default)")
    progress: bool = setting(True, "no progress bar")
    plots: bool = setting(True, "no plots")
    synthetic_train: int = setting(1280, "images in the synthetic training set")
    synthetic_test: int = setting(256, "images in the synthetic test set")
    # stop (as if interrupted: checkpoint + exit) after this many steps in this run; 0 = off. For tests.
    max_steps: int = setting(0, hidden=True)
    model_text: str | None = setting(None, flag=None, repr=False)  # the model file's text (stored in checkpoints)
    model_source: str | None = setting(None, flag=None)


def _type(f) -> str:
    """'int', 'float', 'str' or 'bool', from the field's annotation (a string: ``str | None`` -> 'str')."""
    return str(f.type).split("|")[0].strip()


_TYPES = {"int": int, "float": float, "str": str}
FIELDS = {f.name: f for f in dataclasses.fields(Config)}
# [train] key -> type ('int', 'float', 'str', 'bool'): what the model file's [train] section may set
TRAIN_KEYS = {name: _type(f) for name, f in FIELDS.items() if f.metadata["train"]}
# the fields that have a command-line flag (what make_config reads from the parsed arguments)
CLI_KEYS = [name for name, f in FIELDS.items() if f.metadata["flag"] is not None]


def _add_flag(p, f):
    m = f.metadata
    flag = m["flag"] if m["flag"] is not _AUTO else "--" + f.name.replace("_", "-")
    help_ = argparse.SUPPRESS if m["hidden"] else m["help"]
    if _type(f) == "bool":
        if f.default:  # on by default: only a flag to turn it off
            p.add_argument(flag.replace("--", "--no-", 1), action="store_false", dest=f.name, default=None,
                           help=help_)
        else:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, dest=f.name, default=None, help=help_)
        return
    kw = {"choices": m["choices"]} if m["choices"] else {"type": _TYPES[_type(f)]}
    p.add_argument(flag, dest=f.name, help=help_, **kw)


def make_parser(description=None) -> argparse.ArgumentParser:
    """The command line of ``python -m convnet.train``: a flag per Config field, plus the actions."""
    p = argparse.ArgumentParser(prog="python -m convnet.train", description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in FIELDS.values():
        if f.metadata["flag"] is not None:
            _add_flag(p, f)
    p.add_argument("--resume", help="checkpoint file or output directory to continue from")
    p.add_argument("--eval-only", action="store_true", dest="eval_only",
                   help="evaluate the checkpoint given by --resume (or <out>/checkpoint.npz) on the test set")
    p.add_argument("--summary", action="store_true",
                   help="print where convnet is installed, the device, and the model summary, and exit")
    return p
