"""Fixed-seed loss trace of the fmnist net, to prove a refactoring changes no result bit.

    python tools/loss_trace.py numpy 300 before.txt      # before the change
    python tools/loss_trace.py numpy 300 after.txt       # after it, same machine and BLAS build
    diff before.txt after.txt                            # must print nothing
    python tools/loss_trace.py cpu 300 t2.txt --threads 2  # the fast CPU path on 2 threads (BLAS and its loops)

One line per training step (the summed loss as float32 hex, and its value), then the test-batch probabilities and
every parameter as SHA-1 digests. Seed 3, batch 64, crops and flips on, one thread (``--threads``). Results are bit-identical
only for the same NumPy/BLAS build (another build rounds differently); on emu about 0.6 s per step.
"""
from __future__ import annotations

import argparse
import hashlib
import time

import numpy as np
from convnet import get_device
from convnet.cpu import loop_threads, winograd
from convnet.devices import blas_threads
from convnet.data import Loader, load_dataset
from convnet.model_file import load_model
from convnet.optim import SGD

SEED, BATCH = 3, 64


def _digest(a) -> str:
    return hashlib.sha1(np.ascontiguousarray(a).tobytes()).hexdigest()


def trace(device: str, steps: int) -> list[str]:
    dev = get_device(device)
    net, _ = load_model("fmnist", device=dev, seed=SEED)
    d = net.data_layer
    ds = load_dataset("fashion-mnist", None, shape=d.out_shape, classes=net.num_classes, seed=SEED,
                      synthetic_size=(0, 0))
    mean = ds.mean_image()
    common = dict(out_hw=d.size, mean=mean, scale=d.scale, seed=SEED, device=dev, dtype=net.dtype, prefetch=0)
    train = Loader(ds.train_x, ds.train_y, BATCH, train=True, crop_pad=2, flip=True, **common)
    opt = SGD(net, lr=0.05, momentum=0.9, weight_decay=0.0005)
    lines = []
    for step, (x, y) in enumerate(train.epoch(0)):
        if step == steps:
            break
        net.forward(x, y, train=True, step=step)
        net.backward()
        opt.step()
        loss = float(dev.to_numpy(net.loss))
        lines.append(f"{np.float32(loss).tobytes().hex()} {loss!r}")
    x, _ = next(iter(Loader(ds.test_x, ds.test_y, BATCH, train=False, **common).epoch(0)))
    lines.append(f"probs {_digest(dev.to_numpy(net.forward(x)))}")
    lines += [f"{name} {_digest(value)}" for name, value in sorted(net.state_dict().items())]
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("device", help="numpy | cpu | emu | cuda")
    p.add_argument("steps", type=int, help="training steps (300 is a good check)")
    p.add_argument("out", help="output text file")
    p.add_argument("--threads", type=int, default=1, help="BLAS threads and the cpu device's loop threads")
    p.add_argument("--cpu-conv", default="auto", choices=winograd.ALGOS,
                   help="the cpu device's convolution algorithm (python -m convnet.train --cpu-conv)")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    with blas_threads(args.threads), loop_threads(args.threads), winograd.algorithm(args.cpu_conv):
        lines = trace(args.device, args.steps)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"{args.device}: {args.steps} steps in {time.perf_counter() - t0:.1f} s -> {args.out}")


if __name__ == "__main__":
    main()
