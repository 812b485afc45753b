"""Data-parallel scaling: images/s and scaling efficiency of training steps on 1..N ranks, and the time spent in the
gradient reductions and how much of it the backward hides.

    python benchmarks/scaling_bench.py --device numpy --ranks 1,2             # CPU: numpy, 1 and 2 ranks (mpirun)
    python benchmarks/scaling_bench.py --device cuda --ranks 1 --baseline     # one GPU: one rank (no NCCL) vs none
    python benchmarks/scaling_bench.py --device cuda --ranks 1,2,4,8          # a machine with 8 GPUs

Weak scaling, as data-parallel training runs: every rank takes ``--batch`` images per step (the global batch grows
with the ranks), on a fixed random batch already on its device (the loader is not timed). A step is the trainer's:
forward, backward with the reducer's hook (:class:`convnet.distributed.GradReducer`: buckets reduced as their layers'
backward completes), then each bucket's SGD update as soon as its reduction is done (``backward_and_step``).
``--warmup`` steps, then ``--steps`` timed between two synchronisations (on a GPU: ``device.synchronize()``; the host devices are synchronous).

Reported per rank count (rank 0's numbers; the ranks run in lock step):
* images/s = ranks x batch x steps / time; efficiency = images/s / (ranks x images/s of 1 rank);
* reduce ms/step: on the host transport the wall time during which a bucket's reduction was in flight
  (reduce-scatter + all-gather, MPI); exposed ms/step: the time the host waited for reductions after the backward,
  i.e. the part of the reductions the backward did not hide; overlap = 1 - exposed / reduce. On cuda the host does
  not see the reductions (they run on the NCCL stream): ``--baseline`` adds a run without any reducer, and the
  reducer's cost is the step-time difference.

Each rank count runs as ``mpirun -n R python benchmarks/scaling_bench.py --worker ...``; the worker prints one JSON
line; ``--out FILE`` writes the table (markdown) and the JSON. Multi-GPU / multi-node: run the same command with
``--ranks`` up to the GPUs of the node; for several nodes give mpirun's host options with ``--mpirun-args``
(e.g. ``--mpirun-args "-f hosts -ppn 8"`` for MPICH's hydra, ``"--hostfile hosts --map-by ppr:8:node"`` for Open MPI).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path


def worker(args):
    import numpy as np
    from convnet.devices import blas_threads, get_device
    from convnet.distributed import GradReducer, World, backward_and_step, rank_device
    from convnet.model_file import load_model
    from convnet.optim import SGD

    world = World()
    dev = rank_device(args.device, world, get_device)
    net, _ = load_model(args.model, device=dev, seed=0)
    rng = np.random.default_rng(world.rank)
    d = net.data_layer
    with dev.activate():
        x = dev.asarray(rng.standard_normal((*d.out_shape, args.batch)).astype(np.float32))
        y = dev.asarray(rng.integers(0, net.num_classes, args.batch).astype(np.int32), np.int32)
    opt = SGD(net, lr=1e-4, momentum=0.9, weight_decay=5e-4)
    reducer = None if args.no_reduce else GradReducer(net, world, bucket_mb=args.bucket_mb)

    def step(i):
        net.forward(x, y, train=True, step=i)
        backward_and_step(net, opt, reducer)

    with blas_threads(args.threads):
        for i in range(args.warmup):
            step(i)
        dev.synchronize()
        world.barrier("the start of the timed steps")
        if reducer is not None:
            reducer.reset_stats()
        t0 = time.perf_counter()
        for i in range(args.steps):
            step(args.warmup + i)
        dev.synchronize()
        dt = time.perf_counter() - t0
    world.barrier("the end")
    if world.rank == 0:
        st = reducer.stats if reducer is not None else {}
        print(json.dumps({
            "ranks": world.size, "device": str(dev), "model": args.model, "batch_per_rank": args.batch,
            "threads_per_rank": args.threads, "steps": args.steps, "seconds": dt,
            "images_per_s": world.size * args.batch * args.steps / dt, "step_ms": 1e3 * dt / args.steps,
            "reducer": None if reducer is None else type(reducer.transport).__name__,
            "buckets": None if reducer is None else len(reducer.buckets),
            "grad_bytes": None if reducer is None else sum(b.nbytes for b in reducer.buckets),
            "reduce_ms": 1e3 * st.get("reduce_s", 0.0) / args.steps if st else None,
            "exposed_ms": 1e3 * st.get("finish_s", 0.0) / args.steps if st else None}), flush=True)


def launch(args):
    here = Path(__file__).resolve()
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    mpirun = shutil.which("mpirun", path=path) or shutil.which("mpiexec", path=path)
    if mpirun is None:
        sys.exit("no mpirun: pip install 'convnet[mpi]'")
    runs = []
    plan = [(int(r), False) for r in args.ranks.split(",")]
    if args.baseline:
        plan.insert(0, (1, True))
    for ranks, no_reduce in plan:
        cmd = [mpirun, *shlex.split(args.mpirun_args), "-n", str(ranks), sys.executable, str(here), "--worker",
               "--device", args.device, "--model", args.model, "--batch", str(args.batch), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--threads", str(args.threads), "--bucket-mb", str(args.bucket_mb)]
        if no_reduce:
            cmd.append("--no-reduce")
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), OPENBLAS_NUM_THREADS=str(args.threads))
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
        if p.returncode != 0:
            sys.exit(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
        rec = json.loads([line for line in p.stdout.splitlines() if line.startswith("{")][-1])
        runs.append(rec)
        print(json.dumps(rec), flush=True)
    one = next((r for r in runs if r["ranks"] == 1 and r["reducer"]), runs[0])
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    lines = [f"# Data-parallel scaling, {args.model} on {args.device}, {args.batch} images per rank",
             "", f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
             f"load average after the runs {load[0]:.2f} (1 min)" if load else "", "",
             "| ranks | reducer | images/s | efficiency | step ms | reduce ms/step | exposed ms/step | overlap |",
             "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        eff = r["images_per_s"] / (r["ranks"] * one["images_per_s"])
        red, exp = r["reduce_ms"], r["exposed_ms"]
        ov = f"{max(0.0, 1 - exp / red):.0%}" if red and r["ranks"] > 1 else "-"
        lines.append(f"| {r['ranks']} | {r['reducer'] or 'none'} | {r['images_per_s']:,.0f} | {eff:.0%} | "
                     f"{r['step_ms']:.1f} | {'-' if red is None else f'{red:.2f}'} | "
                     f"{'-' if exp is None else f'{exp:.2f}'} | {ov} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n\n```json\n" + json.dumps(runs, indent=1) + "\n```\n")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="numpy", help="numpy | cpu | emu | cuda (each rank: cuda:<local rank>)")
    p.add_argument("--model", default="fmnist")
    p.add_argument("--ranks", default="1,2", help="rank counts to run, e.g. 1,2")
    p.add_argument("--batch", type=int, default=64, help="images per rank and step")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="BLAS threads per rank")
    p.add_argument("--bucket-mb", type=float, default=25.0, dest="bucket_mb")
    p.add_argument("--baseline", action="store_true", help="also one rank without any reducer")
    p.add_argument("--mpirun-args", default="", dest="mpirun_args", help="extra mpirun options (hosts)")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--out", help="write the table and the JSON records here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--no-reduce", action="store_true", dest="no_reduce", help=argparse.SUPPRESS)
    args = p.parse_args()
    worker(args) if args.worker else launch(args)


if __name__ == "__main__":
    main()
