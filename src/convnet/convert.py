"""Convert weights between forms: torchvision's AlexNet both ways, and a net's one-device and two-tower forms.

    python -m convnet.convert from-torchvision alexnet.pth runs/tv        # an alexnet-owt run directory
    python -m convnet.convert to-torchvision runs/tv alexnet.pth          # + alexnet.json: the normalisation
    python -m convnet.convert towers runs/alexnet two.npz --to alexnet-2gpu

torchvision: :mod:`convnet.torchvision_weights` (needs PyTorch: ``pip install 'convnet[torch]'``); towers:
:mod:`convnet.convert_towers`. Errors are one line on stderr, exit status 2.
"""
from __future__ import annotations

import argparse
import sys

from . import checkpoint as ckpt
from . import convert_towers
from . import torchvision_weights as tvw
from .data import DataError
from .model_file import ModelFileError


def _triple(default):
    """argparse type: 'r,g,b', or 'imagenet' for ``default`` (torchvision's values)."""
    def parse(text):
        return default if text.strip().lower() == "imagenet" else _numbers(text)
    parse.__name__ = "r,g,b"
    return parse


def _numbers(text):
    try:
        v = tuple(float(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected three numbers 'r,g,b', got {text!r}") from None
    if len(v) != 3:
        raise argparse.ArgumentTypeError(f"expected three numbers 'r,g,b', got {text!r}")
    return v


def _from_torchvision(args, log):
    mean, std = args.mean or tvw.IMAGENET_MEAN, args.std or tvw.IMAGENET_STD
    if args.normalization:
        if args.mean or args.std:
            raise tvw.TorchvisionError("give --normalization or --mean/--std, not both")
        mean, std = tvw.read_normalization(args.normalization)
    path = tvw.import_run(args.state, args.out, mean=mean, std=std, data=args.data, overwrite=args.overwrite,
                          log=log)
    log(f"wrote {path}: {tvw.TEMPLATE} with the weights of {args.state} (normalisation mean "
        f"{', '.join(f'{v:g}' for v in mean)}, std {', '.join(f'{v:g}' for v in std)} folded in); evaluate it with "
        f"python -m convnet.train --eval-only --resume {args.out} --dataset imagenet --data DIR")


def _to_torchvision(args, log):
    path, info = tvw.export_run(args.run, args.out, std=args.std, overwrite=args.overwrite)
    fmt = ", ".join
    log(f"wrote {path} and {path.with_suffix('.json')}: use it with torchvision's AlexNet on "
        f"{info['input_size'][0]}x{info['input_size'][1]} crops normalised with mean "
        f"({fmt(f'{v:.6g}' for v in info['mean'])}), std ({fmt(f'{v:.6g}' for v in info['std'])})")
    if info.get("per_pixel_mean"):
        log(f"note: the run subtracts a per-pixel mean image, which torchvision cannot express (it normalises per "
            f"channel): the file holds the mean image's per-channel average, which changes the network's input by "
            f"up to {info['mean_error_max']:.4g} (rms {info['mean_error_rms']:.4g}) in its units (pixels times the "
            f"data layer's scale)")


def make_parser():
    p = argparse.ArgumentParser(prog="python -m convnet.convert", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("from-torchvision", help="torchvision AlexNet state dict -> alexnet-owt run directory")
    f.add_argument("state", help="a torch.save'd state dict of torchvision.models.alexnet (e.g. its .pth)")
    f.add_argument("out", help="the run directory to write (checkpoint.npz, model.cfg, summary.txt, log.jsonl)")
    f.add_argument("--mean", type=_triple(tvw.IMAGENET_MEAN),
                   help="the normalisation's mean, 'r,g,b' in 0-1 units (default torchvision's 0.485,0.456,0.406)")
    f.add_argument("--std", type=_triple(tvw.IMAGENET_STD),
                   help="the normalisation's std, 'r,g,b' (default torchvision's 0.229,0.224,0.225)")
    f.add_argument("--normalization", help="mean and std from the .json that to-torchvision wrote")
    f.add_argument("--data", help="a prepared ImageNet directory: the run's dataset (class names, --eval-only)")
    f.add_argument("--overwrite", action="store_true", help="replace a run in OUT")
    t = sub.add_parser("to-torchvision", help="alexnet-owt run -> torchvision AlexNet state dict (+ .json)")
    t.add_argument("run", help="a run directory or checkpoint of alexnet-owt's layers")
    t.add_argument("out", help="the .pth to write; its normalisation goes to the same name with .json")
    t.add_argument("--std", type=_triple(tvw.IMAGENET_STD),
                   help="express the run's scale as this per-channel std 'r,g,b' (conv1's weights rescaled), or "
                        "'imagenet' for torchvision's; default 1/(255 scale) on every channel (weights as they are)")
    t.add_argument("--overwrite", action="store_true", help="replace OUT and its .json")
    w = sub.add_parser("towers", help="a checkpoint between a net's one-device and two-tower forms",
                       add_help=False)
    w.add_argument("rest", nargs=argparse.REMAINDER)
    return p


def main(argv=None, log=print):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["towers"]:
        return convert_towers.main(argv[1:], prog="python -m convnet.convert towers")
    args = make_parser().parse_args(argv)
    try:
        if args.command == "from-torchvision":
            _from_torchvision(args, log)
        else:
            _to_torchvision(args, log)
    except (tvw.TorchvisionError, ckpt.CheckpointError, ModelFileError, DataError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
