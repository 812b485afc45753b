"""Registers, shared memory, spills and theoretical occupancy of every kernel instance the cuda build compiles, from
the compiler alone (``nvcc --resource-usage``; no GPU). It is the first thing to read when a kernel is slower than
expected, and it needs no GPU: whether a tile spills, how many blocks fit on an SM and which resource stops
the next one.

    python tools/kernel_resources.py                 # sm_90 (H100/H200), a markdown table on stdout
    python tools/kernel_resources.py --arch 80 --out benchmarks/results/kernel-resources-sm80.md

Flags are the cuda build's (CMakeLists.txt: Release -O3, -lineinfo, --expt-relaxed-constexpr, C++17,
CONVNET_EMU=0). Occupancy follows the CUDA occupancy calculator: registers are allocated per warp in units of 256,
shared memory per block in units of 128 bytes plus 1 KB the system reserves; the limits per SM are the arch's
(LIMITS). Threads per block come from the launchers (THREADS; conv_igemm's from its template arguments), since the
compiler's report does not carry them.
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KERNEL_SOURCES = sorted((ROOT / "csrc" / "kernels").glob("*.cu"))
FLAGS = ["-std=c++17", "-O3", "-DNDEBUG", "-lineinfo", "--expt-relaxed-constexpr", "-DCONVNET_EMU=0",
         f"-I{ROOT / 'csrc'}", "--resource-usage"]

# per SM: warps, blocks, registers, shared memory (bytes) -- CUDA C Programming Guide, compute capabilities table
LIMITS = {"80": (64, 32, 65536, 164 * 1024), "86": (48, 16, 65536, 100 * 1024), "89": (48, 24, 65536, 100 * 1024),
          "90": (64, 32, 65536, 228 * 1024), "100": (64, 32, 65536, 228 * 1024), "120": (48, 32, 65536, 100 * 1024)}
REG_UNIT, SMEM_UNIT, SMEM_RESERVED = 256, 128, 1024
# the compiler and c++filt run without an inherited LD_PRELOAD (the sanitized test run preloads ASan into Python,
# and nvcc crashes under it)
TOOL_ENV = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}

# threads per block of each kernel, as its launcher sets them (csrc/kernels/*.cu); conv_igemm: (BM/TM) * (BN/TN),
# conv_fwd_tf32, conv_bwd_tf32, conv_fwd_bf16 and conv_bwd_bf16: 32 * WM * WN
THREADS = {"conv_dgrad_direct": 256, "conv_wgrad_reduce": 256, "conv_wgrad_tf32_reduce": 256,
           "conv_wgrad_bf16_reduce": 256, "conv_bias_grad": 256,
           "conv_bias_reduce": 256,
           "relu_forward_kernel": 256, "relu_backward_kernel": 256, "dropout_kernel": 256, "dropout_mask_kernel": 256,
           "pool_fwd_kernel": 256, "pool_fwd_max_strip_kernel": 256, "pool_bwd_kernel": 256,
           "lrn_fwd_kernel": 128, "lrn_fwd_generic": 128, "lrn_bwd_kernel": 128, "lrn_bwd_generic": 128,
           "lrn_bwd_recompute_kernel": 128, "lrn_bwd_recompute_generic": 128,
           "rnorm_fwd_kernel": 256, "rnorm_bwd_kernel": 256, "cnorm_mean_diff_kernel": 256,
           "cnorm_bwd_mean_kernel": 256,
           "local_fwd_kernel": 32 * 4, "local_bwd_data_kernel": 256, "local_bwd_filter_kernel": 16 * 16,
           "softmax_xent_kernel": 32 * 16, "topk_kernel": 32 * 16, "sum_kernel": 256, "zero_ints_kernel": 32}


@dataclass
class Kernel:
    source: str
    name: str  # demangled
    registers: int
    smem: int
    stack: int
    spill_stores: int
    spill_loads: int

    @property
    def signature(self) -> str:
        """The demangled name without its parameter list (the last top-level parentheses) and return type."""
        name, depth = self.name.rstrip(), 0
        if name.endswith(")"):
            for i in range(len(name) - 1, -1, -1):
                depth += {")": 1, "(": -1}.get(name[i], 0)
                if depth == 0:
                    name = name[:i]
                    break
        return name.removeprefix("void ").strip()

    @property
    def base(self) -> str:
        """The kernel's name without namespaces, template arguments or parameters."""
        return re.split(r"[<(]", self.signature, maxsplit=1)[0].split("::")[-1].strip()

    @property
    def threads(self) -> int | None:
        if self.base == "conv_igemm":
            m = re.search(r"conv_igemm<[^,]+, (\d+), (\d+), (\d+), (\d+), (\d+), (\d+)[,>]", self.name)  # [, kRelu]
            if m:
                bm, bn, _bk, tm, tn, _v = map(int, m.groups())
                return (bm // tm) * (bn // tn)
        if self.base in ("conv_fwd_tf32", "conv_bwd_tf32", "conv_fwd_bf16", "conv_bwd_bf16"):
            # <[Op, ]BM, BN, BK, WM, WN, ...>: a warp per WM x WN
            m = re.search(r"conv_[fb]wd_[tb]f\d\d<(?:[^\d,<>][^,<>]*, )?\d+, \d+, \d+, (\d+), (\d+),", self.name)
            if m:
                return 32 * int(m.group(1)) * int(m.group(2))
        return THREADS.get(self.base)


def parse(text: str, source: str = "") -> list[Kernel]:
    """The kernels in ptxas's ``--resource-usage`` report (mangled names; see :func:`demangle`)."""
    kernels, name, props = [], None, {}
    for line in text.splitlines():
        if m := re.search(r"Compiling entry function '([^']+)'", line):
            name, props = m.group(1), {}
        elif name and (m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                                      line)):
            props.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        elif name and (m := re.search(r"Used (\d+) registers", line)):
            smem = re.search(r"(\d+) bytes smem", line)
            kernels.append(Kernel(source, name, int(m.group(1)), int(smem.group(1)) if smem else 0,
                                  props.get("stack", 0), props.get("spill_stores", 0), props.get("spill_loads", 0)))
            name = None
    return kernels


def demangle(kernels: list[Kernel]) -> None:
    if not kernels or shutil.which("c++filt") is None:
        return
    out = subprocess.run(["c++filt"], input="\n".join(k.name for k in kernels), capture_output=True, text=True,
                         check=True, env=TOOL_ENV).stdout.splitlines()
    for k, name in zip(kernels, out):
        k.name = name.replace("(anonymous namespace)::", "").replace("convnet::", "")


def occupancy(k: Kernel, arch: str) -> tuple[int, float, str] | None:
    """(blocks per SM, fraction of the SM's warps, the limiting resource), or None when the block size is unknown."""
    threads = k.threads
    if threads is None:
        return None
    max_warps, max_blocks, regs_per_sm, smem_per_sm = LIMITS[arch]
    warps = math.ceil(threads / 32)
    regs_per_warp = math.ceil(max(k.registers, 1) * 32 / REG_UNIT) * REG_UNIT
    smem = math.ceil(k.smem / SMEM_UNIT) * SMEM_UNIT + SMEM_RESERVED
    limits = {"warps": max_warps // warps, "blocks": max_blocks,
              "registers": (regs_per_sm // regs_per_warp) // warps, "shared memory": smem_per_sm // smem}
    blocks = min(limits.values())
    return blocks, blocks * warps / max_warps, min(limits, key=lambda key: (limits[key], key != "warps"))


def compile_report(source: Path, arch: str, nvcc: str) -> str:
    r = subprocess.run([nvcc, *FLAGS, f"-arch=sm_{arch}", "-c", str(source), "-o", "/dev/null"],
                       capture_output=True, text=True, env=TOOL_ENV)
    if r.returncode != 0:
        raise RuntimeError(f"nvcc failed on {source.name}:\n{r.stderr[-3000:]}")
    return r.stdout + r.stderr


def table(kernels: list[Kernel], arch: str) -> str:
    rows = ["| source | kernel | threads | registers | static smem B | spill st/ld B | stack B | blocks/SM | "
            "occupancy | limited by |", "|---|---|---|---|---|---|---|---|---|---|"]
    for k in kernels:
        occ = occupancy(k, arch)
        blocks, frac, limit = occ if occ else ("?", None, "block size unknown")
        rows.append(f"| {k.source} | `{k.signature}` | {k.threads or '?'} | {k.registers} | {k.smem} | "
                    f"{k.spill_stores}/{k.spill_loads} | {k.stack} | {blocks} | "
                    f"{'?' if frac is None else f'{frac:.0%}'} | {limit} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="90", choices=sorted(LIMITS), help="compute capability (default 90)")
    ap.add_argument("--out", help="also write the markdown here")
    args = ap.parse_args(argv)
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    with ThreadPoolExecutor() as pool:
        reports = list(pool.map(lambda s: compile_report(s, args.arch, nvcc), KERNEL_SOURCES))
    kernels = [k for s, text in zip(KERNEL_SOURCES, reports) for k in parse(text, s.name)]
    demangle(kernels)
    kernels.sort(key=lambda k: (k.source, k.base, k.name))
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True,
                             env=TOOL_ENV).stdout.strip().splitlines()[-1]
    spills = [k for k in kernels if k.spill_stores or k.spill_loads]
    text = "\n".join([
        f"# Kernel resources on sm_{args.arch}, from the compiler ({version}; {datetime.date.today()})", "",
        f"`python tools/kernel_resources.py --arch {args.arch}`: no GPU involved. {len(kernels)} kernel instances; "
        f"{len(spills)} spill. Occupancy is theoretical (resident warps / {LIMITS[args.arch][0]}); "
        "what a kernel achieves needs a profiler on the GPU.", "", table(kernels, args.arch), ""])
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
