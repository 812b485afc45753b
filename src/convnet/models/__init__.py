"""Model files: a declarative INI format in the spirit of cuda-convnet's ``layers.cfg``.

One section per layer, in topological order (a layer's inputs must be defined above it), plus an optional
``[train]`` section with training defaults that ``python -m convnet.train`` flags override. See docs/training.md.

    [conv1]
    type = conv
    inputs = data
    filters = 32
    size = 5
    padding = 2
    neuron = relu
    initW = 0.01

Keys are case-insensitive; ``#`` and ``;`` start comments. ``load_model(name_or_path)`` accepts a shipped name
(``alexnet``, ``alexnet-owt``, ``cifar-18pct``, ``fmnist``) or a path.
"""
from __future__ import annotations

import configparser
import os
from pathlib import Path

from ..layers import LAYER_TYPES, LayerError

MODEL_DIR = Path(__file__).resolve().parent


class ModelFileError(ValueError):
    """A model file that cannot be parsed or built; the message names the file and the section."""


def shipped_models():
    return sorted(p.stem for p in MODEL_DIR.glob("*.cfg"))


def _learnable_keys():
    return {"initw": "init_w", "initb": "init_b", "lrw": "lr_w", "lrb": "lr_b", "wdw": "wd_w", "wdb": "wd_b",
            "neuron": "neuron"}


# model-file key (lower case) -> (constructor argument, converter); "inputs" and "device" are common to all
_SPEC = {
    "data": {"channels": ("channels", int), "size": ("size", "pair"), "scale": ("scale", float)},
    "conv": {"filters": ("filters", int), "size": ("size", "pair"), "stride": ("stride", "pair"),
             "padding": ("padding", "pair"), "groups": ("groups", int)},
    "fc": {"outputs": ("outputs", int)},
    "relu": {},
    "pool": {"pool": ("pool", str), "size": ("size", "pair"), "stride": ("stride", "pair"),
             "padding": ("padding", "pair")},
    "lrn": {"size": ("size", int), "alpha": ("alpha", float), "beta": ("beta", float), "k": ("k", float),
            "convention": ("convention", str), "groups": ("groups", int)},
    "dropout": {"keep": ("keep", float)},
    "softmax": {"coeff": ("coeff", float)},
}
for _t in ("conv", "fc"):
    _SPEC[_t].update({k: (v, float if v not in ("neuron", "init_w") else str) for k, v in _learnable_keys().items()})
_REQUIRED = {"data": ("channels", "size"), "conv": ("filters", "size"), "fc": ("outputs",)}
_ALIASES = {"filtersize": "size", "numfilters": "filters", "sizex": "size", "pad": "padding", "cmrnorm": "lrn",
            "neurons": "outputs", "epsw": "lrw", "epsb": "lrb"}
_TYPE_ALIASES = {"cmrnorm": "lrn", "rnorm": "lrn", "neuron": "relu", "cost.logreg": "softmax",
                 "softmax_ce": "softmax", "input": "data"}

TRAIN_KEYS = {
    "dataset": str, "epochs": int, "batch_size": int, "lr": float, "momentum": float, "weight_decay": float,
    "schedule": str, "lr_steps": str, "lr_gamma": float, "patience": int, "max_drops": int,
    "flip": "bool", "crop_pad": int, "multiview": "bool", "min_lr": float,
}


def _convert(v, conv, where):
    try:
        if conv == "pair":
            parts = [int(p) for p in v.replace("x", ",").split(",")]
            if len(parts) == 1:
                return parts[0]
            if len(parts) != 2:
                raise ValueError
            return tuple(parts)
        if conv == "bool":
            lv = v.strip().lower()
            if lv in ("1", "true", "yes", "on"):
                return True
            if lv in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if conv is str:
            return v.strip()
        return conv(v)
    except ValueError:
        kind = {"pair": "an integer or a pair 'h,w'", "bool": "true/false", int: "an integer",
                float: "a number"}.get(conv, str(conv))
        raise ModelFileError(f"{where}: expected {kind}, got {v!r}") from None


def parse_model_text(text, source="<model>"):
    """Parse model-file text -> (list of layer specs [(name, type, kwargs)], train dict)."""
    cp = configparser.ConfigParser(inline_comment_prefixes=("#", ";"), interpolation=None,
                                   default_section="__defaults__", strict=True)
    try:
        cp.read_string(text, source=source)
    except configparser.Error as e:
        raise ModelFileError(f"{source}: cannot parse the model file: {e}") from None
    specs, train = [], {}
    if not cp.sections():
        raise ModelFileError(f"{source}: no layers (the file has no [sections])")
    for sec in cp.sections():
        items = {k.lower(): v for k, v in cp.items(sec)}
        if sec.lower() == "train":
            for k, v in items.items():
                if k not in TRAIN_KEYS:
                    raise ModelFileError(f"{source} [train]: unknown key '{k}' (known: {', '.join(TRAIN_KEYS)})")
                train[k] = _convert(v, TRAIN_KEYS[k], f"{source} [train] {k}")
            continue
        where = f"{source} [{sec}]"
        if "type" not in items:
            raise ModelFileError(f"{where}: missing 'type' (one of {', '.join(LAYER_TYPES)})")
        t = items.pop("type").strip().lower()
        t = _TYPE_ALIASES.get(t, t)
        if t not in LAYER_TYPES:
            raise ModelFileError(f"{where}: unknown layer type '{t}' (known: {', '.join(LAYER_TYPES)})")
        spec = _SPEC[t]
        kwargs = {}
        inputs = items.pop("inputs", "")
        if t != "data":
            kwargs["inputs"] = [s.strip() for s in inputs.split(",") if s.strip()]
            if not kwargs["inputs"]:
                raise ModelFileError(f"{where}: missing 'inputs' (the layer(s) feeding this {t} layer)")
        elif inputs.strip():
            raise ModelFileError(f"{where}: a data layer takes no inputs")
        dev = items.pop("device", None)
        gpu = items.pop("gpu", None)  # cuda-convnet2's gpu=N
        if gpu is not None:
            if dev is not None:
                raise ModelFileError(f"{where}: give either device= or gpu=, not both")
            if not gpu.strip().isdigit():
                raise ModelFileError(f"{where} gpu: expected a GPU index, got {gpu!r}")
            dev = f"cuda:{int(gpu)}"
        if dev is not None:
            kwargs["device"] = dev.strip()
        for k, v in items.items():
            k = _ALIASES.get(k, k)
            if k not in spec:
                raise ModelFileError(f"{where}: unknown key '{k}' for a {t} layer "
                                     f"(known: inputs, device, {', '.join(spec)})")
            arg, conv = spec[k]
            kwargs[arg] = _convert(v, conv, f"{where} {k}")
        for req in _REQUIRED.get(t, ()):
            if _SPEC[t][req][0] not in kwargs:
                raise ModelFileError(f"{where}: missing required key '{req}' for a {t} layer")
        specs.append((sec, t, kwargs))
    return specs, train


def build_layers(specs, source="<model>"):
    layers = []
    for name, t, kwargs in specs:
        kwargs = dict(kwargs)
        inputs = kwargs.pop("inputs", ())
        try:
            if t == "data":
                layers.append(LAYER_TYPES[t](name, **kwargs))
            else:
                layers.append(LAYER_TYPES[t](name, inputs, **kwargs))
        except LayerError as e:
            raise ModelFileError(f"{source} [{name}]: {e}") from None
        except TypeError as e:
            raise ModelFileError(f"{source} [{name}]: {e}") from None
    return layers


def resolve_model(name_or_path):
    """Return (text, source) for a shipped model name or a file path."""
    p = Path(name_or_path)
    if p.suffix == ".cfg" or os.sep in str(name_or_path) or p.exists():
        if not p.is_file():
            raise ModelFileError(f"model file '{name_or_path}' not found")
        return p.read_text(), str(p)
    q = MODEL_DIR / f"{name_or_path}.cfg"
    if not q.is_file():
        raise ModelFileError(f"unknown model '{name_or_path}': give a model-file path or one of "
                             f"{', '.join(shipped_models())}")
    return q.read_text(), q.name


def build_net(text, source="<model>", *, device=None, dtype="float32", seed=0, init_params=True):
    from ..graph import Net
    specs, train = parse_model_text(text, source)
    layers = build_layers(specs, source)
    try:
        net = Net(layers, device=device, dtype=dtype, seed=seed, name=Path(source).stem, source=text,
                  init_params=init_params)
    except LayerError as e:
        raise ModelFileError(f"{source}: {e}") from None
    return net, train


def load_model(name_or_path, *, device=None, dtype="float32", seed=0, init_params=True):
    """Build a Net from a shipped model name or a model-file path. Returns (net, train_defaults).
    ``init_params=False`` builds shapes only (for summaries of big models)."""
    text, source = resolve_model(name_or_path)
    return build_net(text, source, device=device, dtype=dtype, seed=seed, init_params=init_params)
