"""Training throughput (images/s) of a model on a device: forward + backward + SGD step on a fixed batch
(compute only), and the loader alone (host preprocessing + transfer), each after warm-up.

    python benchmarks/train_bench.py --device cuda --model alexnet      # synthetic 3x224x224, batch 128
    python benchmarks/train_bench.py --device cuda --model fmnist
    python benchmarks/train_bench.py --device numpy --model fmnist --steps 5

Prints one JSON line per measurement (also appended to --json if given).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402,F401  (makes `import convnet` work from a source checkout)

from convnet.data import Loader, synthetic  # noqa: E402
from convnet.devices import get_device  # noqa: E402
from convnet.model_file import load_model  # noqa: E402
from convnet.optim import SGD  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--device", default=None)
    p.add_argument("--model", default="alexnet")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json")
    a = p.parse_args(argv)
    dev = get_device(a.device)
    net, _ = load_model(a.model, device=dev)
    opt = SGD(net, lr=1e-4)
    shape = net.data_layer.out_shape
    ds = synthetic(shape, net.num_classes, n_train=a.batch_size * 4, n_test=16)
    ld = Loader(ds.train_x, ds.train_y, a.batch_size, train=True, out_hw=shape[1:], mean=ds.mean_image(),
                flip=True, device=dev, prefetch=0)
    x, y = ld.make_batch(0, 0)
    for i in range(a.warmup):
        net.forward(x, y, train=True, step=i)
        net.backward()
        opt.step()
    dev.synchronize()
    t = time.perf_counter()
    for i in range(a.steps):
        net.forward(x, y, train=True, step=i)
        net.backward()
        opt.step()
    dev.synchronize()
    dt = time.perf_counter() - t
    res = [{"what": "train step (compute)", "model": a.model, "device": str(dev), "batch": a.batch_size,
            "images_per_s": a.steps * a.batch_size / dt, "ms_per_step": dt / a.steps * 1e3,
            "gflop_per_s": 3 * net.flops() * a.batch_size * a.steps / dt / 1e9}]
    t = time.perf_counter()
    for b in range(4):
        ld.make_batch(1, b)
    dev.synchronize()
    dt = time.perf_counter() - t
    res.append({"what": "loader (one thread)", "model": a.model, "device": str(dev), "batch": a.batch_size,
                "images_per_s": 4 * a.batch_size / dt})
    for r in res:
        line = json.dumps(r)
        print(line)
        if a.json:
            with open(a.json, "a") as f:
                f.write(line + "\n")


if __name__ == "__main__":
    main()
