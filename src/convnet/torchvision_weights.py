"""torchvision's AlexNet weights, both ways: a torchvision state dict (``torchvision.models.alexnet``) as an
``alexnet-owt`` run directory, and such a run as a torchvision state dict (the commands: :mod:`convnet.convert`).

The layers correspond one to one: ``features.{0,3,6,8,10}`` <-> ``conv1..conv5``, ``classifier.{1,4,6}`` <->
``fc6..fc8``. Conv weights are transposed between torch's ``(F, C, KH, KW)`` and ours ``(C, KH, KW, F)``; fc weights
are the same arrays (torch flattens ``(C, H, W)`` per image as we do). torchvision's ``AdaptiveAvgPool2d((6, 6))``
after the features is the identity where conv5's pooled output is 6x6 (a 224x224 input), and only there.

Preprocessing. torchvision feeds ``(x / 255 - m_c) / s_c`` per channel ``c``; we feed ``(x - mean) * scale``
(``mean`` a per-pixel image or per channel, ``scale`` one number). On import the mean becomes ``255 m_c`` per
channel, ``scale = 1 / (255 s_0)``, and the ratios ``s_0 / s_c`` are folded into conv1's weights: the same function,
exactly (conv1's zero padding is zero in both). On export, a per-channel mean is written as is; a per-pixel mean
cannot be expressed (torchvision subtracts one value per channel), so the nearest form is written, the per-channel
average of the mean image's centre crop, with the error it makes. The normalisation to use with the exported
weights is written beside them (``OUT.json``: ``mean``, ``std`` in torchvision's 0-1 units); by default ``std`` is
``1 / (255 scale)`` for every channel, which leaves conv1's weights as they are, so that importing the file with its
normalisation gives back the run's parameters bit for bit.
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np

from . import checkpoint as ckpt
from .config import Config, ConfigError, parse_lr_steps
from .model_file import ModelFileError, build_net, parse_model_text, resolve_model
from .optim import Schedule

TEMPLATE = "alexnet-owt"  # the model whose layers torchvision's AlexNet is
CONVS = {"features.0": "conv1", "features.3": "conv2", "features.6": "conv3", "features.8": "conv4",
         "features.10": "conv5"}
FCS = {"classifier.1": "fc6", "classifier.4": "fc7", "classifier.6": "fc8"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # torchvision's normalisation of its ImageNet models
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE = 256 / 224  # torchvision's evaluation transform: shorter side to 256, the centre 224x224 crop
POOLED = (6, 6)  # what torchvision's adaptive pooling makes of conv5's pooled output


class TorchvisionError(ValueError):
    """A state dict, run or normalisation that does not correspond; the message names the file and the key."""


def _torch():
    try:
        import torch
    except ImportError:
        raise TorchvisionError("reading and writing torchvision weights needs PyTorch: pip install "
                               "'convnet[torch]'") from None
    return torch


# --- names and layouts -----------------------------------------------------------------------------------------
def _pairs():
    """[(torch prefix, our layer, is_conv)] in network order."""
    return [(k, v, True) for k, v in CONVS.items()] + [(k, v, False) for k, v in FCS.items()]


def state_to_params(state, where="<state>"):
    """torchvision's AlexNet state (name -> array) as our parameters ('conv1/w' -> (C, KH, KW, F), ...), float32.
    TorchvisionError naming the key for a missing, unexpected, non-finite or misshapen entry."""
    expected = {f"{t}.{p}" for t, _, _ in _pairs() for p in ("weight", "bias")}
    extra = sorted(set(state) - expected)
    if extra:
        raise TorchvisionError(f"{where}: key '{extra[0]}' is not a parameter of torchvision's AlexNet (expected "
                               f"features.{{0,3,6,8,10}} and classifier.{{1,4,6}}, weight and bias)")
    params = {}
    for t, ours, conv in _pairs():
        for p in ("weight", "bias"):
            key = f"{t}.{p}"
            if key not in state:
                raise TorchvisionError(f"{where}: no key '{key}' (torchvision's AlexNet has {ours} there)")
            a = np.asarray(state[key])
            ndim = (4 if conv else 2) if p == "weight" else 1
            if a.ndim != ndim:
                raise TorchvisionError(f"{where}: key '{key}' has shape {a.shape}, expected {ndim} axes")
            if a.dtype.kind != "f" or not np.isfinite(a).all():
                raise TorchvisionError(f"{where}: key '{key}' holds non-finite or non-float values ({a.dtype})")
            if p == "weight" and conv:
                a = a.transpose(1, 2, 3, 0)
            params[f"{ours}/{'w' if p == 'weight' else 'b'}"] = np.ascontiguousarray(a, np.float32)
    return params


def params_to_state(params):
    """Our parameters as torchvision's AlexNet state (name -> float32 array): the inverse of :func:`state_to_params`."""
    state = {}
    for t, ours, conv in _pairs():
        w = np.asarray(params[f"{ours}/w"], np.float32)
        state[f"{t}.weight"] = np.ascontiguousarray(w.transpose(3, 0, 1, 2) if conv else w)
        state[f"{t}.bias"] = np.ascontiguousarray(params[f"{ours}/b"], np.float32)
    return state


def _triple(v, what):
    a = np.asarray(v, np.float64).reshape(-1)
    if a.shape != (3,) or not np.isfinite(a).all():
        raise TorchvisionError(f"{what}: expected three finite numbers (R, G, B), got {v!r}")
    return a


def model_text(classes=1000, scale=1.0):
    """alexnet-owt's model-file text with ``classes`` outputs and the data layer's ``scale``."""
    text, _ = resolve_model(TEMPLATE)
    text = _set_key(text, "data", "scale", repr(float(scale)))
    return _set_key(text, "fc8", "outputs", str(int(classes)))


def _set_key(text, section, key, value):
    """``text`` with ``key = value`` in ``[section]`` (replaced, or added after the header)."""
    lines = text.splitlines(keepends=True)
    start = next(i for i, l in enumerate(lines) if l.strip().lower() == f"[{section}]")
    end = next((i for i in range(start + 1, len(lines)) if lines[i].lstrip().startswith("[")), len(lines))
    pat = re.compile(rf"\s*{re.escape(key)}\s*=", re.IGNORECASE)
    for i in range(start + 1, end):
        if pat.match(lines[i]):
            lines[i] = f"{key} = {value}\n"
            return "".join(lines)
    lines.insert(start + 1, f"{key} = {value}\n")
    return "".join(lines)


# --- import ----------------------------------------------------------------------------------------------------
def read_state(path):
    """A torch-saved state dict (``torch.save(model.state_dict(), path)``) as name -> float32 NumPy array."""
    torch = _torch()
    path = Path(path)
    if not path.is_file():
        raise TorchvisionError(f"'{path}' not found" if not path.exists() else f"'{path}' is not a file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickle, zip and torch errors: all mean a file that is not a state dict
        raise TorchvisionError(f"cannot read '{path}' as a torch state dict: {' '.join(str(e).split())[:200]}") \
            from None
    if not isinstance(state, dict):
        raise TorchvisionError(f"'{path}' holds a {type(state).__name__}, not a state dict (name -> tensor)")
    out = {}
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            raise TorchvisionError(f"'{path}': key '{k}' is a {type(v).__name__}, not a tensor")
        out[str(k)] = v.detach().cpu().to(torch.float32).numpy()
    return out


def from_torchvision(state, *, mean=IMAGENET_MEAN, std=IMAGENET_STD, where="<state>"):
    """(params, mean (3,) float32, model-file text) of our alexnet-owt computing what torchvision's AlexNet with
    ``state`` computes on images normalised with ``mean`` and ``std`` (0-1 units, per RGB channel)."""
    m, s = _triple(mean, "mean"), _triple(std, "std")
    if (s <= 0).any():
        raise TorchvisionError(f"std: every channel's must be > 0, got {tuple(s)}")
    params = state_to_params(state, where)
    text = model_text(params["fc8/b"].shape[0], 1.0 / (255.0 * s[0]))
    net, _ = build_net(text, f"{TEMPLATE}.cfg", device="numpy", init_params=False)
    _check_shapes(net, state, where)
    ratio = s[0] / s  # exactly 1 where the stds are equal: such weights are kept bit for bit
    if (ratio != 1.0).any():
        params["conv1/w"] = (params["conv1/w"].astype(np.float64) * ratio[:, None, None, None]).astype(np.float32)
    return params, (255.0 * m).astype(np.float32), text


def _check_shapes(net, state, where):
    """TorchvisionError naming the first key of ``state`` whose shape is not the one ``net`` needs."""
    names = {v: k for k, v in {**CONVS, **FCS}.items()}
    for l, p, want in [(l, p, tuple(s)) for l in net.order if l.learnable for p, s in l.param_shapes().items()]:
        if l.type == "conv" and p == "w":
            want = (want[3], *want[:3])
        key = f"{names[l.name]}.{'weight' if p == 'w' else 'bias'}"
        if tuple(np.shape(state[key])) != want:
            raise TorchvisionError(f"{where}: key '{key}' has shape {tuple(np.shape(state[key]))}, torchvision's "
                                   f"AlexNet (with {net.num_classes} classes) has {want}")


def training_meta(text, *, out, data=None):
    """The metadata of a fresh run of ``text`` at its start (what ``--resume`` and ``--eval-only`` need)."""
    cfg = Config(model=TEMPLATE, out=str(out))
    cfg.model_text, cfg.model_source = text, f"{TEMPLATE}.cfg"
    for k, v in parse_model_text(text, cfg.model_source)[1].items():
        setattr(cfg, k, v)
    if data is not None:
        cfg.dataset, cfg.data = "imagenet", str(data)
    cfg.validate()
    schedule = Schedule(cfg.schedule, cfg.lr, steps=parse_lr_steps(cfg.lr_steps), gamma=cfg.lr_gamma,
                        patience=cfg.patience, max_drops=cfg.max_drops, total_epochs=cfg.epochs)
    return {"epoch": 0, "batch": 0, "step": 0, "history": [], "partial": {"loss": 0.0, "err": 0, "n": 0, "time": 0.0},
            "schedule": schedule.state_dict(),
            "optimizer": {"lr": cfg.lr, "momentum": cfg.momentum, "weight_decay": cfg.weight_decay},
            "config": dataclasses.asdict(cfg)}


def import_run(pth, out, *, mean=IMAGENET_MEAN, std=IMAGENET_STD, data=None, overwrite=False, log=print):
    """Write the run directory ``out`` (checkpoint.npz, model.cfg, summary.txt, log.jsonl) of torchvision's AlexNet
    weights ``pth``: weights only, momentum zero, at the start of epoch 1. Returns the checkpoint's path."""
    from .data.imagenet import read_manifest
    from .training import rundir
    params, mean_c, text = from_torchvision(read_state(pth), mean=mean, std=std, where=str(pth))
    if data is not None:
        classes = len(read_manifest(data).get("classes", ()))
        if classes != params["fc8/b"].shape[0]:
            raise TorchvisionError(f"--data {data} has {classes} classes, the weights of {pth} "
                                   f"{params['fc8/b'].shape[0]}")
    net, _ = build_net(text, f"{TEMPLATE}.cfg", device="numpy", init_params=False)
    meta = training_meta(text, out=out, data=data)
    meta["num_params"] = net.num_params()
    meta["source"] = {"torchvision": str(pth), "mean": [float(v) for v in mean], "std": [float(v) for v in std]}
    try:
        with rundir.locked(out, None, overwrite):
            rundir.prepare(out, resume_path=None, overwrite=overwrite, model_text=text, summary=net.summary(),
                           history=[], log=log)
            return ckpt.save(Path(out) / "checkpoint.npz", params=params,
                             velocity={k: np.zeros_like(v) for k, v in params.items()}, mean=mean_c, meta=meta)
    except ConfigError as e:
        raise TorchvisionError(str(e)) from None


# --- export ----------------------------------------------------------------------------------------------------
def check_structure(net, where):
    """TorchvisionError unless ``net`` is alexnet-owt's layers (any number of classes) with a 6x6 pool5."""
    ref, _ = build_net(model_text(net.num_classes), f"{TEMPLATE}.cfg", device="numpy", init_params=False)
    ours = [(l.name, l.describe()) for l in net.order if l.type != "data"]
    theirs = [(l.name, l.describe()) for l in ref.order if l.type != "data"]
    if ours != theirs:
        diff = next(((a, b) for a, b in zip(ours, theirs) if a != b), None)
        what = (f"layer '{diff[0][0]}' is '{diff[0][1]}' where torchvision's AlexNet has '{diff[1][0]}': "
                f"'{diff[1][1]}'" if diff else f"{len(ours)} layers, not {len(theirs)}")
        raise TorchvisionError(f"{where}: not torchvision's AlexNet ({TEMPLATE}'s layers): {what}")
    d = net.data_layer
    if d.channels != 3:
        raise TorchvisionError(f"{where}: the data layer has {d.channels} channels; AlexNet reads 3 (RGB)")
    pooled = tuple(net.layers["pool5"].out_shape[1:])
    if pooled != POOLED:
        raise TorchvisionError(
            f"{where}: the run's {d.size[0]}x{d.size[1]} input gives a {pooled[0]}x{pooled[1]} pool5, which "
            f"torchvision's AlexNet would average to 6x6 (AdaptiveAvgPool2d): the two agree only at a 224x224 input")


def to_torchvision(params, mean, scale, input_hw, *, std=None):
    """(torchvision state (name -> float32 array), normalisation dict) for our alexnet-owt ``params`` with the
    preprocessing ``(x - mean) * scale``. ``std``: the per-channel std (0-1 units) to express it with; None:
    ``1 / (255 scale)`` for every channel (conv1's weights unchanged). The dict holds ``mean``, ``std``, and for a
    per-pixel ``mean`` the error of its per-channel form (``mean_error_max``, ``mean_error_rms``: in the network's
    input units, pixels times ``scale``)."""
    params = dict(params)
    mean = np.asarray(mean, np.float64)
    info = {}
    if mean.ndim == 3:  # per pixel: what the evaluation subtracts is the centre crop of the input's size
        h, w = mean.shape[:2]
        oh, ow = input_hw
        oy, ox = max(0, (h - oh) // 2), max(0, (w - ow) // 2)
        crop = mean[oy:oy + oh, ox:ox + ow]
        mean_c = crop.reshape(-1, mean.shape[2]).mean(axis=0)
        err = (crop - mean_c) * float(np.float32(scale))
        info.update(per_pixel_mean=True, mean_error_max=float(np.abs(err).max()),
                    mean_error_rms=float(np.sqrt((err ** 2).mean())))
    else:
        mean_c = mean.reshape(-1)
        if mean_c.size == 1:
            mean_c = np.repeat(mean_c, 3)
    if mean_c.shape != (3,):
        raise TorchvisionError(f"the run's mean has shape {mean.shape}: not an RGB image or 3 channel values")
    if std is None:
        s = np.full(3, 1.0 / (255.0 * float(scale)))
    else:
        s = _triple(std, "std")
        if (s <= 0).any():
            raise TorchvisionError(f"std: every channel's must be > 0, got {tuple(s)}")
        factor = s * 255.0 * float(scale)
        params["conv1/w"] = (np.asarray(params["conv1/w"], np.float64)
                             * factor[:, None, None, None]).astype(np.float32)
    info.update(mean=[float(v) for v in mean_c / 255.0], std=[float(v) for v in s],
                input_size=[int(input_hw[0]), int(input_hw[1])])
    return params_to_state(params), info


def export_run(run, out, *, std=None, overwrite=False):
    """Write the run (a directory or checkpoint) as torchvision's AlexNet state dict ``out`` (``torch.save``) and its
    normalisation as ``out`` with the suffix ``.json``. Returns (path, normalisation dict)."""
    torch = _torch()
    out = Path(out)
    side = out.with_suffix(".json")
    if not overwrite:
        for p in (out, side):
            if p.exists():
                raise TorchvisionError(f"'{p}' exists: give another output file, or --overwrite to replace it")
    state = ckpt.load(run)
    text = (state["meta"].get("config") or {}).get("model_text")
    if not isinstance(text, str):
        raise TorchvisionError(f"checkpoint '{state['path']}' has no model-file text: its layers are unknown")
    try:
        net, _ = build_net(text, "model.cfg", device="numpy", init_params=False)
    except ModelFileError as e:
        raise TorchvisionError(f"checkpoint '{state['path']}': {e}") from None
    check_structure(net, f"checkpoint '{state['path']}'")
    if state["mean"] is None:
        raise TorchvisionError(f"checkpoint '{state['path']}' has no mean image")
    for l in net.order:
        for p, shape in (l.param_shapes().items() if l.learnable else ()):
            a = state["params"].get(f"{l.name}/{p}")
            if a is None or a.shape != tuple(shape):
                raise TorchvisionError(f"checkpoint '{state['path']}': parameter '{l.name}/{p}' "
                                       f"{'missing' if a is None else f'has shape {a.shape}'}, its model says "
                                       f"{tuple(shape)}")
    d = net.data_layer
    tv, info = to_torchvision(state["params"], state["mean"], d.scale, d.size, std=std)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: torch.from_numpy(v) for k, v in tv.items()}, out)
    side.write_text(json.dumps(info, indent=1) + "\n")
    return out, info


def read_normalization(path):
    """(mean, std) from a normalisation file written by :func:`export_run`."""
    try:
        info = json.loads(Path(path).read_text())
        return _triple(info["mean"], f"{path} mean"), _triple(info["std"], f"{path} std")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise TorchvisionError(f"cannot read the normalisation file '{path}': {type(e).__name__}: {e}") from None
