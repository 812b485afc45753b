"""Convert a checkpoint between a net's one-device grouped form and its two-tower form (``alexnet`` <->
``alexnet-2gpu``).

    python -m convnet.convert_towers runs/alexnet/checkpoint.npz two.npz --to alexnet-2gpu
    python -m convnet.convert_towers two.npz one.npz --to alexnet        # and back (a model name or a .cfg path)

The mapping comes from the two model files alone (:func:`parameter_map`): a learnable layer ``L`` of the form with
fewer parameters is the layers ``La``, ``Lb``, ... of the other (one per tower, in letter order), or the layer ``L``
itself where both have it (``fc8``). Each parameter is split, or joined, along the one axis on which the parts'
shapes add up to the whole: a conv weight's filters (its last axis), an fc weight's units (its first), a bias. This
is the paper's layout, in which tower a holds the first half of every layer's filters and units, and it assumes what
both shipped model files do: a tower layer reading both towers joins them in tower order, so its inputs are in the
one-device layer's order. Parameters and momentum buffers are converted; the position, the schedule, the history and
the mean image are kept, the model-file text becomes the target's, so ``--resume OUT`` continues the run in the new
form (the dropout masks are the same in both forms: ``maskOf`` in docs/training.md).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import checkpoint as ckpt
from .model_file import ModelFileError, build_net, resolve_model

TOWER_LETTERS = "abcdefgh"  # the suffixes of a layer's tower parts, in tower order


class ConversionError(ValueError):
    """Two model files whose parameters do not correspond, or a checkpoint that does not fit its side."""


@dataclass(frozen=True)
class Part:
    """One parameter of the grouped form (``key``, 'layer/name') and the tower parameters it is made of (``parts``),
    joined along ``axis`` with extents ``sizes`` (``axis`` None: one part, the same array)."""

    key: str
    parts: tuple
    axis: int | None = None
    sizes: tuple = ()


def _shapes(net):
    """{'layer/param': shape} of a net (shapes only is enough)."""
    return {f"{l.name}/{p}": tuple(s) for l in net.order if l.learnable for p, s in sorted(l.param_shapes().items())}


def _join_axis(key, whole, shapes, where):
    """The one axis along which ``shapes`` (the parts) add up to ``whole``, every other axis equal."""
    axes = [a for a in range(len(whole))
            if all(len(s) == len(whole) and s[:a] + s[a + 1:] == whole[:a] + whole[a + 1:] for s in shapes)
            and sum(s[a] for s in shapes) == whole[a]]
    if len(axes) != 1:
        raise ConversionError(f"parameter '{key}' {whole} of {where[0]} is not its parts in {where[1]}, "
                              f"{' and '.join(map(str, shapes))}, joined along one axis")
    return axes[0]


def parameter_map(grouped, towers) -> list[Part]:
    """How the parameters of ``towers`` (a net; shapes only is enough) make up those of ``grouped``: one :class:`Part`
    per grouped parameter. ConversionError unless every parameter of both is used exactly once."""
    whole, split = _shapes(grouped), _shapes(towers)
    mapping, used = [], set()
    for key, shape in whole.items():
        layer, name = key.split("/")
        names = (key,) if key in split else tuple(
            f"{layer}{t}/{name}" for t in TOWER_LETTERS if f"{layer}{t}/{name}" in split)
        if not names:
            raise ConversionError(f"parameter '{key}' of {grouped.name} has no counterpart in {towers.name}: neither "
                                  f"'{key}' nor '{layer}a/{name}', '{layer}b/{name}', ...")
        if len(names) == 1:
            if split[names[0]] != shape:
                raise ConversionError(f"parameter '{key}' has shape {shape} in {grouped.name} but "
                                      f"{split[names[0]]} in {towers.name}")
            mapping.append(Part(key, names))
        else:
            axis = _join_axis(key, shape, [split[n] for n in names], (grouped.name, towers.name))
            mapping.append(Part(key, names, axis, tuple(split[n][axis] for n in names)))
        used.update(names)
    left = [k for k in split if k not in used]
    if left:
        raise ConversionError(f"parameters of {towers.name} with no counterpart in {grouped.name}: "
                              f"{', '.join(left[:4])}{' ...' if len(left) > 4 else ''}")
    return mapping


def split_state(state, mapping):
    """Grouped-form arrays ('layer/param' -> array) as the towers' (contiguous)."""
    out = {}
    for m in mapping:
        a = np.asarray(state[m.key])
        if m.axis is None:
            out[m.parts[0]] = a
            continue
        for p, piece in zip(m.parts, np.split(a, np.cumsum(m.sizes)[:-1], axis=m.axis)):
            out[p] = np.ascontiguousarray(piece)
    return out


def join_state(state, mapping):
    """Tower arrays ('layer/param' -> array) joined into the grouped form's (the inverse of :func:`split_state`)."""
    return {m.key: np.asarray(state[m.parts[0]]) if m.axis is None else
            np.concatenate([np.asarray(state[p]) for p in m.parts], axis=m.axis) for m in mapping}


def convert_state(state, source, target):
    """``state`` ('layer/param' -> array) of the net ``source`` as the net ``target``'s, whichever form each is
    (the one with fewer parameters is the grouped one; two nets with the same parameters map one to one)."""
    if len(_shapes(source)) <= len(_shapes(target)):
        return split_state(state, parameter_map(source, target))
    return join_state(state, parameter_map(target, source))


def _shapes_net(text, source):
    net, _ = build_net(text, source, device="numpy", init_params=False)
    return net


def convert_checkpoint(src, dst, to, *, overwrite=False):
    """Write the checkpoint ``src`` converted to the model ``to`` (a shipped name or a model-file path) as ``dst``;
    returns its path. CheckpointError / ModelFileError / ConversionError say what does not fit."""
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise ConversionError(f"'{dst}' exists: give another output file, or --overwrite to replace it")
    state = ckpt.load(src)
    meta = dict(state["meta"])
    config = dict(meta.get("config") or {})
    text = config.get("model_text")
    if not isinstance(text, str):
        raise ckpt.CheckpointError(f"checkpoint '{state['path']}' has no model-file text: its form is unknown")
    source = _shapes_net(text, config.get("model_source") or config.get("model") or "<checkpoint>")
    target_text, target_source = resolve_model(to)
    target = _shapes_net(target_text, target_source)
    try:
        params = convert_state(state["params"], source, target)
        velocity = convert_state(state["velocity"], source, target) if state["velocity"] else {}
    except KeyError as e:
        raise ckpt.CheckpointError(f"checkpoint '{state['path']}' does not fit its own model: no {e}") from None
    towers = max((l.tower for l in target.order if l.tower is not None), default=0) + 1
    config.update(model=str(to), model_text=target_text, model_source=target_source)
    if towers == 1:  # the run's tower devices name towers the target does not have
        config["devices"] = None
    meta["config"] = config
    return ckpt.save(dst, params=params, velocity=velocity, mean=state["mean"], meta=meta)


def main(argv=None, prog="python -m convnet.convert_towers"):
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="checkpoint file (or a run's directory)")
    p.add_argument("dst", help="the converted checkpoint file to write")
    p.add_argument("--to", required=True,
                   help="the target model: a shipped name (alexnet, alexnet-2gpu) or a .cfg path")
    p.add_argument("--overwrite", action="store_true", help="replace dst if it exists")
    args = p.parse_args(argv)
    try:
        path = convert_checkpoint(args.src, args.dst, args.to, overwrite=args.overwrite)
    except (ckpt.CheckpointError, ModelFileError, ConversionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({args.to})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
