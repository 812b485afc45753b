"""Training throughput (images/s) of a model: ours and the same model in PyTorch, in one run, on the same GPU -- or,
on the CPU devices (cpu, numpy), on the same CPU with the same number of threads.

    python benchmarks/train_bench.py                              # best device, alexnet (synthetic 3x224x224), 128
    python benchmarks/train_bench.py --device cuda:1 --model alexnet-owt
    python benchmarks/train_bench.py --device cpu --model fmnist --batch-size 64 --threads 1   # the CPU path
    python benchmarks/train_bench.py --device emu --model fmnist --batch-size 8 --steps 1 --warmup 1   # smoke

Rows (printed as JSON lines, appended to --json if given, and written to benchmarks/results/ like every benchmark):

* ours: forward + backward + SGD step (momentum 0.9, weight decay 5e-4) on one fixed batch, ``steps`` steps after
  ``warmup`` steps.
* PyTorch: THE SAME MODEL, built from the same parsed model file (``torch_plan(net)`` reads our Net's layers, so
  the two cannot drift; a layer type it does not know is an error): convs with their groups, ReLU neurons,
  overlapping max pooling (``MaxPool2d``; average pooling as ``count_include_pad=False``), LRN as
  ``torch.nn.LocalResponseNorm`` applied per channel group with alpha converted to torch's mean convention
  (torch divides alpha by the window size: alpha_torch = a * size, a = ``geometry.lrn_scale``), dropout with
  p = 1 - keep, fc layers, cross-entropy averaged over the batch times the cost layer's ``coeff``. FP32 with TF32
  off (cuDNN and matmul), ``cudnn.benchmark = True``, NCHW, the same batch (our images transposed), our initial
  parameters copied in, ``torch.optim.SGD`` with the same momentum and weight decay (weights only, as our
  ``wdB = 0``), on the same GPU (``--device cuda:N`` makes it torch's current device) -- or, for ours on a CPU
  device, PyTorch on the CPU with ``--threads`` intra-op threads, ours with as many BLAS threads. Before timing, both models
  are compared in inference mode (no dropout): each layer alone on a random input, then the whole net on the batch
  (``same-model check``: the worst normwise relative difference; above 1e-4 the run fails), so a wrong
  translation shows there, not as a speed.
* loader: host preprocessing + transfer of one batch, one thread.

``--towers`` times the paper's two-tower split instead (no PyTorch twin): images/s of ``alexnet`` on the device,
of ``alexnet-2gpu`` with both towers on that device (two streams: on a GPU they compute concurrently; on the CPU
devices the cost of the split itself, the copies and joins) and on two devices (two GPUs when present; on the CPU
two virtual devices of the kind, ``numpy:0,numpy:1``), the bytes copied per image between the placements, and the
copy op's time and bandwidth for the largest tensor exchanged (a pool2, 128x13x13 per image at 224)::

    python benchmarks/train_bench.py --towers --device cuda --batch-size 128
    python benchmarks/train_bench.py --towers --device cpu --size 99 --batch-size 16 --steps 3 --threads 2

Timing -- the same for both sides: ``warmup`` untimed steps (cuDNN's benchmark mode autotunes there), a device
synchronisation, ``steps`` back-to-back training steps, a synchronisation; wall clock between the two
synchronisations. Neither side runs as a CUDA graph (our step allocates and makes host-side decisions), so each
pays its own host overhead, as in real training. ``--repeats`` rounds alternate the sides (PyTorch, ours,
PyTorch, ...) so that a machine's drift hits both; each row gives the median round. On the CPU each round runs in a
fresh process (``--side``), so that no thread pool of one side spins beside the other, and PyTorch is timed in its
default NCHW layout and in channels_last (its fastest CPU layout). On emu ours runs as a smoke and the
PyTorch row is skipped with the reason printed.

``--isa avx2`` (CPU devices) limits both sides to AVX2 on a machine that has AVX-512: ours multiplies with its AVX2
GEMM and Winograd kernels (``CONVNET_CPU_GEMM=avx2``), PyTorch dispatches to its AVX2 kernels
(``ATEN_CPU_CAPABILITY=avx2``, ``ONEDNN_MAX_CPU_ISA=AVX2``). It estimates the ratio on an AVX2-only CPU; that CPU's
own caches and clocks are not in it, so its own run is the real figure::

    python benchmarks/train_bench.py --device cpu --model fmnist --batch-size 64 --threads 2 --isa avx2
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

try:  # before convnet.cpu sets OMP_WAIT_POLICY for its OpenMP runtime: PyTorch's own runtime keeps its defaults
    importlib.import_module("torch")
except ImportError:
    pass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (makes `import convnet` work from a source checkout)

from convnet.cpu import loop_threads  # noqa: E402
from convnet.data import Loader, synthetic  # noqa: E402
from convnet.devices import blas_threads, get_device  # noqa: E402
from convnet.geometry import lrn_scale  # noqa: E402
from convnet.graph import MISSING, resolve_precision  # noqa: E402
from convnet.model_file import build_net, load_model, resolve_model  # noqa: E402
from convnet.optim import SGD  # noqa: E402

LR, MOMENTUM, WEIGHT_DECAY = 1e-4, 0.9, 5e-4
SAME_MODEL_TOL = 1e-4  # FP32 both sides, TF32 off: ~1e-6 when the twin is right; a wrong LRN alpha gives ~1e-2


# ---------------------------------------------------------------------------------------------------- the twin
def torch_plan(net) -> list[dict]:
    """Our Net's layers as PyTorch modules to build, in order: one dict per layer with ``name``, ``module`` (a
    torch.nn class name), its ``args``/``kwargs``, ``inputs``, ``join`` (``"channels"`` or ``"features"`` for
    several inputs), ``relu`` (a ReLU neuron after it), ``groups`` (LRN per channel group), ``flatten`` (fc input)
    and for the cost layer ``coeff``. Pure Python (no torch), so it is checked without a GPU."""
    plan = []
    for l in net.order:
        if l is net.data_layer:
            continue
        p = {"name": l.name, "type": l.type, "inputs": list(l.inputs), "relu": getattr(l, "neuron", None) == "relu",
             "join": None if len(l.inputs) == 1 else ("channels" if len(l.in_shape) == 3 else "features"),
             "groups": 1, "flatten": False, "args": (), "kwargs": {}}
        if l.type == "conv":
            p.update(module="Conv2d", args=(l.in_shape[0], l.filters, l.size),
                     kwargs=dict(stride=l.stride, padding=l.padding, groups=l.groups, bias=True))
        elif l.type == "fc":
            p.update(module="Linear", args=(int(np.prod(l.in_shape)), l.outputs), flatten=True)
        elif l.type == "relu":
            p.update(module="ReLU")
        elif l.type == "pool":
            if l.pool == "max":
                p.update(module="MaxPool2d", args=(l.size, l.stride, l.padding))
            else:
                p.update(module="AvgPool2d", args=(l.size, l.stride, l.padding),
                         kwargs=dict(count_include_pad=False))
        elif l.type == "lrn":
            # ours: x / (k + a * sum x^2)^beta, a = alpha (sum) or alpha/size (mean); torch: alpha/size * sum
            p.update(module="LocalResponseNorm", groups=l.groups,
                     kwargs=dict(size=l.size, alpha=lrn_scale(l.alpha, l.size, l.convention) * l.size, beta=l.beta,
                                 k=l.k))
        elif l.type in ("rnorm", "cnorm"):
            p.update(module="SameMapNorm", kwargs=dict(size=l.size, alpha=l.scale, beta=l.pow, k=l.min_div,
                                                       contrast=l.type == "cnorm"))
        elif l.type == "dropout":
            p.update(module="Dropout", kwargs=dict(p=1.0 - l.keep))
        elif l.type == "softmax":
            p.update(module="Identity", coeff=l.coeff)  # logits; the loss is F.cross_entropy(logits) * coeff
        else:
            raise NotImplementedError(f"layer '{l.name}': no PyTorch twin for layer type '{l.type}' "
                                      f"(add it to benchmarks/train_bench.py torch_plan)")
        plan.append(p)
    return plan


def torch_model(torch, net, plan, device):
    """The PyTorch module of ``plan`` on ``device``, with our Net's current parameters copied in."""
    nn = torch.nn

    class GroupedLRN(nn.Module):
        def __init__(self, groups, **kw):
            super().__init__()
            self.groups, self.lrn = groups, nn.LocalResponseNorm(**kw)

        def forward(self, x):
            if self.groups == 1:
                return self.lrn(x)
            return torch.cat([self.lrn(part) for part in x.chunk(self.groups, dim=1)], dim=1)

    class SameMapNorm(nn.Module):
        """cuda-convnet's rnorm (cnorm: contrast=True): window sums as zero-padded size x size average pools."""

        def __init__(self, size, alpha, beta, k, contrast):
            super().__init__()
            self.size, self.alpha, self.beta, self.k, self.contrast = size, alpha, beta, k, contrast

        def window_sum(self, t):  # rows/cols [i - size//2, i - size//2 + size), clipped: zeros outside
            b, a = self.size // 2, self.size - 1 - self.size // 2
            return nn.functional.avg_pool2d(nn.functional.pad(t, (b, a, b, a)), self.size, stride=1) * self.size ** 2

        def forward(self, x):
            s = x
            if self.contrast:
                s = x - self.window_sum(x) / self.window_sum(torch.ones_like(x[:1, :1]))
            return x * (self.k + self.alpha / self.size ** 2 * self.window_sum(s * s)) ** -self.beta

    class Twin(nn.Module):
        def __init__(self):
            super().__init__()
            self.plan = plan
            self.mods = nn.ModuleDict()
            for p in plan:
                if p["module"] == "LocalResponseNorm":
                    self.mods[p["name"]] = GroupedLRN(p["groups"], **p["kwargs"])
                elif p["module"] == "SameMapNorm":
                    self.mods[p["name"]] = SameMapNorm(**p["kwargs"])
                else:
                    self.mods[p["name"]] = getattr(nn, p["module"])(*p["args"], **p["kwargs"])

        def forward(self, x):
            acts = {net.data_layer.name: x}
            for p in self.plan:
                xs = [acts[i] for i in p["inputs"]]
                if p["join"] == "channels":
                    h = torch.cat(xs, dim=1)
                elif p["join"] == "features":
                    h = torch.cat([a.flatten(1) for a in xs], dim=1)
                else:
                    h = xs[0]
                if p["flatten"]:
                    h = h.flatten(1)  # (N, C, H, W) -> (N, C*H*W): the feature order of our (C*H*W, N)
                h = self.mods[p["name"]](h)
                acts[p["name"]] = torch.relu(h) if p["relu"] else h
            return acts[self.plan[-1]["name"]]

    model = Twin().to(device)
    state = net.state_dict()  # host copies, 'layer/param'
    with torch.no_grad():
        for p in plan:
            if p["module"] not in ("Conv2d", "Linear"):
                continue
            w, b = state[f"{p['name']}/w"], state[f"{p['name']}/b"]
            if p["module"] == "Conv2d":
                w = w.transpose(3, 0, 1, 2)  # ours (Cg, KH, KW, F) -> torch (F, Cg, KH, KW)
            mod = model.mods[p["name"]]
            mod.weight.copy_(torch.from_numpy(np.ascontiguousarray(w)))
            mod.bias.copy_(torch.from_numpy(np.ascontiguousarray(b)))
    return model


def layer_checks(torch, net, model, plan, tdevice, n=2, scale=10.0, seed=0) -> dict:
    """{layer: normwise relative difference} of each layer of our Net against its PyTorch twin on the same random
    input (inference mode; ``scale`` makes LRN's sum term matter): catches a wrong translation of one layer (LRN's
    alpha convention or groups, pooling, a conv's groups) that the end-to-end probabilities of an untrained net
    barely show. The cost layer is compared as softmax probabilities."""
    rng = np.random.default_rng(seed)
    out = {}
    for p in plan:
        layer = net.layers[p["name"]]
        x = (rng.standard_normal((*layer.in_shape, n)) * scale).astype(np.float32)
        dev = layer.device
        with dev.activate():
            ours = dev.to_numpy(layer.forward(dev.asarray(x), {"train": False}))
        xt = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 0))).to(tdevice)  # batch first
        with torch.no_grad():
            h = xt.flatten(1) if p["flatten"] else xt
            h = model.mods[p["name"]](h)
            h = torch.relu(h) if p["relu"] else h
            if p["type"] == "softmax":
                h = torch.softmax(h, dim=1)
        theirs = np.moveaxis(h.cpu().numpy(), 0, -1)
        out[p["name"]] = (float(np.max(np.abs(ours - theirs)) / max(float(np.max(np.abs(ours))), 1e-30))
                          if ours.shape == theirs.shape else float("inf"))
    return out


def torch_optimizer(torch, model):
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    return torch.optim.SGD([{"params": weights, "weight_decay": WEIGHT_DECAY},
                            {"params": biases, "weight_decay": 0.0}], lr=LR, momentum=MOMENTUM)


# ---------------------------------------------------------------------------------------------------- timing
def timed_steps(step, sync, warmup, steps) -> float:
    """Seconds for ``steps`` back-to-back calls of ``step`` between two synchronisations, after ``warmup``."""
    for i in range(warmup):
        step(i)
    sync()
    t = time.perf_counter()
    for i in range(steps):
        step(warmup + i)
    sync()
    return time.perf_counter() - t


def torch_side(torch, net, x, y, args, dev, layout="nchw", mode="fp32"):
    """The PyTorch twin on the same batch, checked to be the same model: (step function, sync, same-model check,
    per-layer check, settings) for the timing rounds. ``layout``: ``nchw`` (PyTorch's default) or, on the CPU,
    ``channels_last`` (its fastest CPU layout: oneDNN's blocked convolutions). ``mode`` (on a GPU): ``fp32`` (TF32
    off), ``tf32`` (cuDNN's and cuBLAS's TF32 allowed) or ``bf16`` (``torch.autocast`` to bfloat16, FP32 weights):
    set at every step, as the rounds alternate. The same-model check runs in FP32 whatever the mode."""
    import contextlib

    import torch.nn.functional as F

    on_gpu = dev.kind == "cuda"
    device = torch.device("cuda", dev.index) if on_gpu else torch.device("cpu")
    plan = torch_plan(net)
    model = torch_model(torch, net, plan, device)
    coeff = plan[-1].get("coeff", 1.0)
    xt = torch.from_dlpack(x).permute(3, 0, 1, 2).contiguous()  # (C, H, W, N) -> (N, C, H, W)
    yt = torch.from_dlpack(y).long()
    if layout == "channels_last":
        xt = xt.contiguous(memory_format=torch.channels_last)
        model = model.to(memory_format=torch.channels_last)
    # same-model check, inference mode (no dropout), the same parameters: each layer alone on a random input, then
    # the whole net on the batch (the wiring: joins, flattening)
    model.eval()
    per_layer = layer_checks(torch, net, model, plan, device)
    with torch.no_grad():
        p_torch = torch.softmax(model(xt), dim=1).T.contiguous().cpu().numpy()
    p_ours = dev.to_numpy(net.forward(x, train=False))
    end_to_end = float(np.max(np.abs(p_ours - p_torch)) / max(float(np.max(np.abs(p_ours))), 1e-30))
    worst = max(per_layer, key=per_layer.get)
    print(f"same-model check: worst layer {worst} {per_layer[worst]:.3g}; whole net {end_to_end:.3g} "
          f"(normwise relative differences, ours vs PyTorch)")
    check = max(end_to_end, per_layer[worst])
    model.train()
    opt = torch_optimizer(torch, model)

    tf32 = mode == "tf32"
    autocast = ((lambda: torch.autocast(device_type="cuda", dtype=torch.bfloat16)) if mode == "bf16"
                else contextlib.nullcontext)

    def step(i):
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = tf32
        opt.zero_grad(set_to_none=True)
        with autocast():
            loss = F.cross_entropy(model(xt), yt) * coeff
        loss.backward()
        opt.step()

    if on_gpu:
        what = {"fp32": "FP32, TF32 off", "tf32": "FP32 with TF32 (cuDNN and matmul)",
                "bf16": "BF16 autocast (FP32 weights)"}[mode]
        settings = (f"{what}, cudnn.benchmark, NCHW, torch {torch.__version__}, "
                    f"cuDNN {torch.backends.cudnn.version()}")
    else:
        settings = (f"FP32, CPU, {torch.get_num_threads()} thread(s), {layout}, torch {torch.__version__} "
                    f"(oneDNN {'on' if torch.backends.mkldnn.is_available() else 'off'})")
    return step, (torch.cuda.synchronize if on_gpu else (lambda: None)), check, per_layer, settings


def step_row(what, device, args, net, seconds: list[float]) -> dict:
    """A timing row from the rounds' seconds (the median round)."""
    dt = statistics.median(seconds)
    return {"what": what, "model": args.model, "device": device, "batch": args.batch_size,
            "images_per_s": args.steps * args.batch_size / dt, "ms_per_step": dt / args.steps * 1e3,
            "gflop_per_s": 3 * net.flops() * args.batch_size * args.steps / dt / 1e9,
            "ms_per_step_rounds": [round(t / args.steps * 1e3, 3) for t in seconds]}


def _setup(a, precision="fp32"):
    """The device, our net (in ``precision``) and optimizer, and one fixed batch."""
    dev = get_device(a.device)
    net, _ = load_model(a.model, device=dev, precision=precision)
    opt = SGD(net, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    shape = net.data_layer.out_shape
    ds = synthetic(shape, net.num_classes, n_train=a.batch_size * 4, n_test=16)
    ld = Loader(ds.train_x, ds.train_y, a.batch_size, train=True, out_hw=shape[1:], mean=ds.mean_image(),
                flip=True, device=dev, prefetch=0)
    x, y = ld.make_batch(0, 0)
    return dev, net, opt, ld, x, y


def _our_step(net, opt, x, y):
    def step(i):
        net.forward(x, y, train=True, step=i)
        net.backward()
        opt.step()
    return step


def run_side(a) -> int:
    """``--side``: one timing round of one side in this (fresh) process; prints ``SECONDS <s>``. On the CPU each
    round runs in its own process, so neither side's thread pool (OpenBLAS's, PyTorch's OpenMP) is left spinning
    while the other side runs (measured: our 2-thread step 4x slower beside PyTorch's idle pool)."""
    side, _, option = a.side.partition(":")
    dev, net, opt, _, x, y = _setup(a, option if side == "ours" else "fp32")
    with blas_threads(a.threads), loop_threads(a.threads):
        if side == "ours":
            seconds = timed_steps(_our_step(net, opt, x, y), dev.synchronize, a.warmup, a.steps)
        else:
            torch = common.torch_cpu(a.threads)
            step, sync, *_ = torch_side(torch, net, x, y, a, dev, layout=option)
            seconds = timed_steps(step, sync, a.warmup, a.steps)
    print(f"SECONDS {seconds!r}")
    return 0


# ---------------------------------------------------------------------------------------------------- two towers
def _towers_text(name, size):
    """A shipped model's text, with its input size replaced by ``size`` (None: as shipped)."""
    text, source = resolve_model(name)
    if size is not None:
        sizes = [line for line in text.splitlines() if line.replace(" ", "").startswith("size=")]
        first = sizes[0]  # the data layer's: the first layer of the file
        text = text.replace(first, f"size = {size}", 1)
    return text, source


def _sync_all(net):
    for d in dict.fromkeys(net.devices):
        d.synchronize()


def _towers_setup(a, model, devices):
    """(net, optimizer, batch on the data layer's device) for ``model`` on ``devices`` (one device or a list)."""
    text, source = _towers_text(model, a.size)
    kw = {"devices": devices} if "," in devices else {"device": devices}
    net, _ = build_net(text, source, seed=0, **kw)
    opt = SGD(net, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    rng = np.random.default_rng(0)
    shape = net.data_layer.out_shape
    x = net.device.asarray(rng.standard_normal((*shape, a.batch_size), dtype=np.float32))
    y = net.device.asarray(rng.integers(0, net.num_classes, a.batch_size).astype(np.int32), np.int32)
    return net, opt, x, y


def _copy_row(a, src, dst, shape, same_device_streams):
    """Time ``ops.copy`` of one float32 tensor of ``shape`` from ``src`` to ``dst`` (on two streams of one device
    when ``same_device_streams``): median of ``steps`` timed copies after a warm-up, each synchronised."""
    from convnet import ops

    host = np.random.default_rng(1).standard_normal(shape, dtype=np.float32)
    a_src = src.asarray(host)
    s_src, s_dst = src.new_stream(), dst.new_stream()
    times = []
    for i in range(a.warmup + max(3, a.steps)):
        src.synchronize()
        dst.synchronize()
        t = time.perf_counter()
        out = ops.copy(dst, a_src, src, stream=s_dst, src_stream=s_src if same_device_streams or src != dst else None)
        dst.synchronize()
        if i >= a.warmup:
            times.append(time.perf_counter() - t)
    assert np.array_equal(dst.to_numpy(out), host)
    dt = statistics.median(times)
    return {"what": f"copy {'x'.join(map(str, shape))} float32", "device": f"{src} -> {dst}",
            "batch": a.batch_size, "ms": dt * 1e3, "GB_per_s": host.nbytes / dt / 1e9}


def towers_rows(a, dev) -> list[dict]:
    """The ``--towers`` rows (module docstring)."""
    kind = dev.kind
    if kind == "cuda":
        from convnet.devices.backend_cuda import gpu_count

        n_gpus = gpu_count()[0]
        pair = f"cuda:{dev.index},cuda:{(dev.index + 1) % n_gpus}" if n_gpus > 1 else None
    else:
        pair = f"{kind}:0,{kind}:1"  # virtual devices of the host
    configs = [(a.model, str(dev), "one device"),
               (a.towers_model, f"{dev},{dev}", "two towers on one device (two streams)")]
    if pair is not None:
        configs.append((a.towers_model, pair, "two towers on two devices"))
    else:
        print(f"one GPU here: alexnet-2gpu on two GPUs is not measured")
    rows, base = [], None
    for model, devices, what in configs:
        net, opt, x, y = _towers_setup(a, model, devices)
        with blas_threads(a.threads if kind != "cuda" else 0), loop_threads(a.threads if kind != "cuda" else 1):
            seconds = [timed_steps(_our_step(net, opt, x, y), lambda: _sync_all(net), a.warmup, a.steps)
                       for _ in range(max(1, a.repeats))]
        row = step_row(f"train step, {what}", devices, a, net, seconds)
        row["model"] = model
        row["exchanged_bytes_per_image"] = net.exchange.per_image()
        base = base or row["images_per_s"]
        row["images_per_s vs one device"] = row["images_per_s"] / base
        rows.append(row)
        print(json.dumps(row))
        shapes = net.layers
    pool2 = next((l for l in shapes.values() if l.name == "pool2a"), None)
    if pool2 is not None:
        shape = (*pool2.out_shape, a.batch_size)
        rows.append(_copy_row(a, dev, dev, shape, True))
        if pair is not None:
            d0, d1 = (get_device(d) for d in pair.split(","))
            rows.append(_copy_row(a, d0, d1, shape, False))
        for r in rows[-2 if pair is not None else -1:]:
            print(json.dumps(r))
    return rows


# --isa: the environment that limits both sides to an instruction set (convnet.cpu.gemm's CONVNET_CPU_GEMM; PyTorch's
# ATen dispatch and oneDNN's, read when torch loads). Our element-wise loops (pooling, dropout, the update) pick their
# SIMD clone from the CPU itself and keep the widest: memory-bound loops, where the width matters little.
ISA_LIMITS = {"avx2": {"CONVNET_CPU_GEMM": "avx2", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}}


def _round_in_subprocess(argv, side) -> float:
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--side", side]
    done = subprocess.run(cmd, capture_output=True, text=True)
    lines = [l for l in done.stdout.splitlines() if l.startswith("SECONDS ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"the {side} round failed (exit {done.returncode}): {done.stderr.strip()[-500:]}")
    return float(lines[-1].split()[1])


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="cuda, cuda:N, cpu, numpy or emu (default: best available)")
    p.add_argument("--model", default="alexnet", help="a shipped model name or a model-file path")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3, help="timing rounds per side, alternating (median reported)")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU devices: BLAS threads for ours and intra-op threads for PyTorch (default 1)")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch twin")
    p.add_argument("--precisions", default=None,
                   help="ours in each of these precisions, e.g. fp32,tf32 (default: fp32,tf32 on a GPU with tensor "
                        "cores, else the device's default); a precision the device cannot run is reported and skipped")
    p.add_argument("--json", help="append the rows as JSON lines to this file")
    p.add_argument("--no-write", action="store_true", help="do not write benchmarks/results/")
    p.add_argument("--towers", action="store_true",
                   help="time the two-tower split: --model (default alexnet) on the device, --towers-model on it "
                        "with two streams and on two devices, and the copies (see the module docstring)")
    p.add_argument("--towers-model", default="alexnet-2gpu", help="--towers: the two-tower form of --model")
    p.add_argument("--size", type=int, default=None, help="--towers: the input size (default: the model's, 224)")
    p.add_argument("--isa", choices=sorted(ISA_LIMITS), default=None,
                   help="CPU devices: both sides limited to this instruction set (ours: its GEMM and Winograd "
                        "kernels; PyTorch: ATen's and oneDNN's kernels) -- an AVX-512 machine's estimate of an AVX2 "
                        "one (see the module docstring)")
    p.add_argument("--side", help=argparse.SUPPRESS)  # internal: one CPU timing round in a child process
    a = p.parse_args(argv)
    if a.side:
        return run_side(a)
    if a.isa:  # the timed rounds run in child processes, which inherit these
        os.environ.update(ISA_LIMITS[a.isa])
    if a.towers:
        return run_towers(a)
    dev, net, opt, ld, x, y = _setup(a)
    on_host = dev.kind != "cuda"
    precisions = [p.strip() for p in a.precisions.split(",")] if a.precisions else \
        (["fp32", "tf32"] if dev.default_precision == "tf32" else [dev.default_precision])
    for precision in [p for p in precisions if p in MISSING]:
        print(f"ours in {precision} skipped: {MISSING[precision]}")
    precisions = [resolve_precision(p, [dev]) for p in precisions if p not in MISSING]
    cpu_path = dev.kind in ("cpu", "numpy")  # a real CPU measurement (emu is a smoke)
    if dev.kind == "emu":
        print(f"NOTE: {dev} is the CUDA emulator: a smoke run, the images/s below are NOT speed figures.")

    torch = None
    if not a.no_torch:
        if dev.kind == "emu":
            common.TORCH_UNAVAILABLE["reason"] = f"ours runs on {dev}: a smoke, not a speed figure"
        else:
            torch = common.torch_cpu(a.threads) if on_host else common.cudnn(dev, allow_tf32=False)
        if torch is None:
            print(f"PyTorch twin skipped: {common.TORCH_UNAVAILABLE['reason']}")
    # the twins: on the CPU FP32 in two layouts; on a GPU NCHW in FP32, TF32 and BF16 autocast
    variants = ([(layout, layout, "fp32") for layout in ("nchw", "channels_last")] if on_host else
                [(f"nchw {mode}", "nchw", mode) for mode in ("fp32", "tf32", "bf16")])
    twins = {}  # name -> (step, sync, check, per_layer, settings)
    if torch is not None:  # first, from the same initial parameters as ours (before our steps move them)
        for name, layout, mode in variants:
            try:
                twins[name] = torch_side(torch, net, x, y, a, dev, layout=layout, mode=mode)
            except Exception as exc:  # noqa: BLE001 - report, keep our numbers
                print(f"PyTorch twin ({name}) failed: {type(exc).__name__}: {exc}")
        if not on_host:
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False

    initial = net.state_dict()  # every precision of ours starts from the same parameters
    seconds = {**{f"ours {p}": [] for p in precisions}, **{name: [] for name in twins}}
    with blas_threads(a.threads if on_host else 0), loop_threads(a.threads if on_host else 1):
        for _ in range(max(1, a.repeats)):
            for name, twin in twins.items():
                seconds[name].append(_round_in_subprocess(argv, f"torch:{name}") if cpu_path
                                     else timed_steps(twin[0], twin[1], a.warmup, a.steps))
            for precision in precisions:
                if cpu_path:
                    seconds[f"ours {precision}"].append(_round_in_subprocess(argv, f"ours:{precision}"))
                    continue
                net.load_state_dict(initial)
                net.precision = precision  # the graph reads it at every forward
                seconds[f"ours {precision}"].append(
                    timed_steps(_our_step(net, opt, x, y), dev.synchronize, a.warmup, a.steps))
    where = str(dev) + (f", {a.threads} thread(s)" if on_host else "") + (f", {a.isa} only" if a.isa else "")
    res = [step_row(f"train step (compute), ours, {p}", where, a, net, seconds[f"ours {p}"]) for p in precisions]
    ours = len(res)
    check = None
    for name, (_, _, twin_check, per_layer, settings) in twins.items():
        row = step_row(f"train step (compute), PyTorch twin, {name}",
                       f"torch {'cpu' if on_host else f'cuda:{dev.index}'}", a, net, seconds[name])
        row.update(same_model_rel_diff=twin_check, same_model_per_layer=per_layer, settings=settings)
        res.append(row)
        for r in res[:ours]:
            r[f"ours/torch {name} images_per_s"] = r["images_per_s"] / row["images_per_s"]
        check = twin_check if check is None else max(check, twin_check)
    if torch is not None and not twins:
        res.append({"what": "train step (compute), PyTorch twin", "model": a.model, "error": "failed (see log)"})
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
    if check is not None:
        verdict = "OK" if check < SAME_MODEL_TOL else "MISMATCH: the PyTorch twin is not the same model"
        print(f"same-model check (each layer and the whole net, ours vs PyTorch): {check:.3g}  {verdict}")
    if not a.no_write:
        columns = ["what", "model", "device", "batch", "images_per_s", "ms_per_step", "gflop_per_s",
                   *[f"ours/torch {name} images_per_s" for name in twins], "same_model_rel_diff"]
        extra = {"steps": a.steps, "warmup": a.warmup, "repeats": a.repeats, "threads": a.threads if on_host else None,
                 "instruction_set": (f"both sides limited to {a.isa}: {ISA_LIMITS[a.isa]}" if a.isa else
                                     "each side's default: the widest this CPU runs") if on_host else None,
                 "lr": LR, "momentum": MOMENTUM, "weight_decay": WEIGHT_DECAY,
                 "timing": ("per round: warm-up steps, sync, N back-to-back steps, sync; wall clock; rounds alternate "
                            "PyTorch and ours" + (", each round in its own process" if cpu_path else "") +
                            "; the median round; the same for both sides"),
                 "precisions": {"ours": precisions, "note": "ours: conv and fc multiplications in that precision "
                                "(tf32: TF32-rounded inputs, FP32 accumulation; bf16: bfloat16 activations and inputs, "
                                "FP32 accumulation and weights); "
                                "PyTorch on a GPU: FP32 (TF32 off), TF32 (cuDNN and matmul), BF16 autocast"},
                 "torch_plan": torch_plan(net)}
        path = common.write_results(f"train-{net.name}" + (f"-b{a.batch_size}-t{a.threads}" if cpu_path else "") +
                                    (f"-{a.isa}" if a.isa else ""),
                                    dev, res, columns, extra)
        print(f"wrote {path}")
    return 1 if check is not None and not check < SAME_MODEL_TOL else 0


def run_towers(a) -> int:
    dev = get_device(a.device)
    if dev.kind == "emu":
        print(f"NOTE: {dev} is the CUDA emulator: a smoke run, the images/s below are NOT speed figures.")
    rows = towers_rows(a, dev)
    if a.json:
        with open(a.json, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    if not a.no_write:
        columns = ["what", "model", "device", "batch", "images_per_s", "images_per_s vs one device", "ms_per_step",
                   "exchanged_bytes_per_image", "ms", "GB_per_s"]
        extra = {"steps": a.steps, "warmup": a.warmup, "repeats": a.repeats, "size": a.size,
                 "threads": a.threads if dev.kind != "cuda" else None,
                 "timing": "per round: warm-up steps, sync of every device, N back-to-back steps, sync; wall clock; "
                           "the median round. Copies: each synchronised, the median"}
        size = f"-s{a.size}" if a.size else ""
        path = common.write_results(f"train-towers-{a.model}{size}-b{a.batch_size}", dev, rows, columns, extra)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
