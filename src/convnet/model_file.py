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
(``alexnet``, ``alexnet-2gpu``, ``alexnet-owt``, ``cifar-11pct``, ``cifar-18pct``, ``fmnist``: the ``.cfg`` files in
``convnet/models/``) or a path; with ``params=`` (cuda-convnet's layer-params file) and ``input_shape=`` it reads
cuda-convnet's and cuda-convnet2's own pairs with their meaning (:mod:`convnet.cuda_convnet`: a text whose data layer
has ``dataIdx`` is in that form).

Nothing here lists a layer's keys: they are the layer classes' declarations (``Layer.keys``, see
:class:`convnet.layers.Key`), and the ``[train]`` keys are the :class:`convnet.config.Config` fields marked
``train=True``. Every layer also takes ``inputs`` (not the data layer) and ``device`` (or cuda-convnet2's ``gpu``):
an index ``i`` places the layer in tower ``i``, which runs on the i-th of the run's devices (``--devices
cuda:0,cuda:1``; by default every tower on the one device), a name (``cuda:1``, ``emu:1``) on that device.
"""
from __future__ import annotations

import configparser
import os
from pathlib import Path

from . import cuda_convnet
from .config import TRAIN_KEYS, check_setting
from .devices import parse_device
from .graph import Net
from .layers import LAYER_TYPES, LayerError

MODEL_DIR = Path(__file__).resolve().parent / "models"
COMMON_KEYS = ("inputs", "device", "gpu")  # keys of every layer type, besides its declared ones

# type name or alias (lower case) -> layer class
TYPES = {name.lower(): cls for cls in LAYER_TYPES.values() for name in (cls.type, *cls.type_aliases)}


class ModelFileError(ValueError):
    """A model file that cannot be parsed or built; the message names the file and the section."""


def shipped_models():
    return sorted(p.stem for p in MODEL_DIR.glob("*.cfg"))


def _read_pair(v):
    parts = [int(p) for p in v.replace("x", ",").split(",")]
    if len(parts) == 1:
        return parts[0]
    if len(parts) != 2:
        raise ValueError
    return tuple(parts)


def _read_bool(v):
    v = v.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise ValueError


# a key's type -> (how its text is read, what the error says was expected). The layer checks the value itself.
_READERS = {
    "int": (int, "an integer"),
    "float": (float, "a number"),
    "pair": (_read_pair, "an integer or a pair 'h,w'"),
    "bool": (_read_bool, "true/false"),
    "str": (str.strip, "text"),
    "name": (str.strip, "a name"),
    "init": (str.strip, "text"),
    "neuron": (str.strip, "text"),
    "floats": (lambda v: [float(p) for p in v.split(",")], "numbers separated by commas"),
    "rate": (str.strip, "text"),
}


def _read(text, type_, where):
    read, expected = _READERS[type_]
    try:
        return read(text)
    except ValueError:
        raise ModelFileError(f"{where}: expected {expected}, got {text!r}") from None


def _parse_train(items, source):
    train = {}
    for k, v in items.items():
        if k not in TRAIN_KEYS:
            raise ModelFileError(f"{source} [train]: unknown key '{k}' (known: {', '.join(TRAIN_KEYS)})")
        value = _read(v, TRAIN_KEYS[k], f"{source} [train] {k}")
        try:
            train[k] = check_setting(k, value)
        except ValueError as e:
            raise ModelFileError(f"{source} [train] {k}: {e}") from None
    return train


def _parse_layer(sec, items, where):
    """One layer section -> (type, kwargs): kwargs named by the layers' Python arguments."""
    if "type" not in items:
        raise ModelFileError(f"{where}: missing 'type' (one of {', '.join(LAYER_TYPES)})")
    t = items.pop("type").strip().lower()
    cls = TYPES.get(t)
    if cls is None and t in cuda_convnet.NOT_IMPLEMENTED:
        raise ModelFileError(f"{where} type: {t} ({cuda_convnet.NOT_IMPLEMENTED[t]}) is not implemented")
    if cls is None and t in cuda_convnet.KEYS:
        raise ModelFileError(f"{where} type: '{t}' is cuda-convnet's, read with its meaning in cuda-convnet's form "
                             f"(a data layer with dataIdx, and --params); here the types are {', '.join(LAYER_TYPES)}")
    if cls is None:
        raise ModelFileError(f"{where}: unknown layer type '{t}' (known: {', '.join(LAYER_TYPES)})")
    t = cls.type
    kwargs = {}
    inputs = items.pop("inputs", "")
    if cls.takes_inputs:
        kwargs["inputs"] = [s.strip() for s in inputs.split(",") if s.strip()]
        if not kwargs["inputs"]:
            raise ModelFileError(f"{where}: missing 'inputs' (the layer(s) feeding this {t} layer)")
    elif inputs.strip():
        raise ModelFileError(f"{where}: a {t} layer takes no inputs")
    dev = items.pop("device", None)
    gpu = items.pop("gpu", None)  # cuda-convnet2's gpu=N: the same as device=N
    if gpu is not None:
        if dev is not None:
            raise ModelFileError(f"{where}: give either device= or gpu=, not both")
        if not gpu.strip().isdigit():
            raise ModelFileError(f"{where} gpu: expected a GPU index, got {gpu!r}")
        dev = gpu
    if dev is not None:  # an index: a tower, mapped onto the run's devices (--devices); a name: that device
        dev = dev.strip()
        if not dev.isdigit():
            try:  # the name's form only: whether the device is usable is the run's question
                parse_device(dev)
            except ValueError as e:
                raise ModelFileError(f"{where} device: {e} (or a tower index 0, 1, ...)") from None
        kwargs["device"] = int(dev) if dev.isdigit() else dev
    keys = {spelling: key for key in cls.keys for spelling in key.spellings()}
    for k, v in items.items():
        key = keys.get(k)
        if key is None:
            known = [*COMMON_KEYS[0 if cls.takes_inputs else 1:], *(key.name for key in cls.keys)]
            raise ModelFileError(f"{where}: unknown key '{k}' for a {t} layer (known: {', '.join(known)})")
        kwargs[key.arg] = _read(v, key.type, f"{where} {key.name}")
    for key in cls.keys:
        if key.required and key.arg not in kwargs:
            raise ModelFileError(f"{where}: missing required key '{key.name}' for a {t} layer")
    return t, kwargs


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
    sections = {sec: {k.lower(): v for k, v in cp.items(sec)} for sec in cp.sections()}
    if cuda_convnet.is_cuda_convnet(sections):
        train_items = sections.pop("train", None)
        try:
            translated = cuda_convnet.translate(sections, source)
        except cuda_convnet.CudaConvnetError as e:
            raise ModelFileError(str(e)) from None
        sections = {sec: {k.lower(): v for k, v in items.items()} for sec, items in translated}
        if train_items is not None:
            sections["train"] = train_items
    for sec, items in sections.items():
        if sec.lower() == "train":
            train.update(_parse_train(items, source))
        else:
            specs.append((sec, *_parse_layer(sec, items, f"{source} [{sec}]")))
    return specs, train


def build_layers(specs, source="<model>"):
    layers = []
    for name, t, kwargs in specs:
        kwargs = dict(kwargs)
        cls = LAYER_TYPES[t]
        args = (name, kwargs.pop("inputs", ())) if cls.takes_inputs else (name,)
        try:
            layers.append(cls(*args, **kwargs))
        except (LayerError, TypeError) as e:
            raise ModelFileError(f"{source} [{name}]: {e}") from None
    return layers


def resolve_model(name_or_path, params=None, input_shape=None):
    """Return (text, source) for a shipped model name or a file path. ``params``: cuda-convnet's layer-params file,
    merged into the model file by section name; ``input_shape`` (C, H, W): the image shape of a cuda-convnet data
    layer (which has none). Either makes one text of the files (:func:`convnet.cuda_convnet.merge`)."""
    text, source = _resolve_one(name_or_path)
    if params is None and (input_shape is None or "dataidx" not in text.lower()):
        return text, source  # a file of this project's form as it is
    ptext = None if params is None else read_model_file(params, "layer-params")
    try:
        return cuda_convnet.merge(text, source, ptext, None if params is None else str(params), input_shape)
    except cuda_convnet.CudaConvnetError as e:
        raise ModelFileError(str(e)) from None


def _resolve_one(name_or_path):
    p = Path(name_or_path)
    if p.suffix == ".cfg" or os.sep in str(name_or_path) or p.exists():
        if not p.is_file():
            raise ModelFileError(f"model file '{name_or_path}' not found" if not p.exists() else
                                 f"model file '{name_or_path}' is not a file")
        return read_model_file(p), str(p)
    q = MODEL_DIR / f"{name_or_path}.cfg"
    if not q.is_file():
        raise ModelFileError(f"unknown model '{name_or_path}': give a model-file path or one of "
                             f"{', '.join(shipped_models())}")
    return read_model_file(q), q.name


def read_model_file(path, what="model") -> str:
    """A model file's text (UTF-8); ModelFileError naming the file when it cannot be read or is not UTF-8 text."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ModelFileError(f"cannot read {what} file '{path}': {e.strerror or e}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ModelFileError(f"{what} file '{path}' is not UTF-8 text (byte 0x{data[e.start]:02x} at offset "
                             f"{e.start})") from None


def build_net(text, source="<model>", *, device=None, devices=None, dtype="float32", seed=0, init_params=True,
              precision="fp32"):
    specs, train = parse_model_text(text, source)
    layers = build_layers(specs, source)
    try:
        net = Net(layers, device=device, devices=devices, dtype=dtype, seed=seed, name=Path(source).stem,
                  source=text, init_params=init_params, precision=precision)
    except LayerError as e:
        raise ModelFileError(f"{source}: {e}") from None
    return net, train


def load_model(name_or_path, *, params=None, input_shape=None, device=None, devices=None, dtype="float32", seed=0,
               init_params=True, precision="fp32"):
    """Build a Net from a shipped model name or a model-file path. Returns (net, train_defaults).
    ``params``, ``input_shape``: cuda-convnet's layer-params file and the image shape (C, H, W) for its data layer
    (:func:`resolve_model`). ``devices``: the devices of the model's towers (``device = 0|1`` layers).
    ``init_params=False`` builds shapes only (for summaries of big models)."""
    text, source = resolve_model(name_or_path, params, input_shape)
    return build_net(text, source, device=device, devices=devices, dtype=dtype, seed=seed, init_params=init_params,
                     precision=precision)
