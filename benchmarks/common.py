"""Timing and result-writing helpers shared by every benchmark in benchmarks/.

* ``time_ms(fn, device)``: CUDA events around each call after warm-up on cuda (median of repeats);
  wall clock on emu/numpy, where the figure is only a smoke test.
* ``cudnn()``: PyTorch with cuDNN on the same GPU, for side-by-side baselines (TF32 off unless asked).
* ``write_results(name, device, rows, columns)``: JSON + markdown in benchmarks/results/, with the device name,
  date and library versions, so every committed number says where it was measured.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def time_ms(fn, device, *, warmup: int = 3, repeats: int = 20) -> float:
    """Median milliseconds of ``fn()`` on ``device``."""
    for _ in range(warmup):
        fn()
    times = []
    if device.kind == "cuda":
        import cupy as cp

        with device.activate():
            start, stop = cp.cuda.Event(), cp.cuda.Event()
            for _ in range(repeats):
                start.record()
                fn()
                stop.record()
                stop.synchronize()
                times.append(cp.cuda.get_elapsed_time(start, stop))
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def cudnn(allow_tf32: bool = False):
    """torch with cuDNN configured for an FP32 (or TF32) baseline, or None when unavailable."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    torch.backends.cudnn.enabled = True
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    return torch


def torch_view(a):
    """Zero-copy torch tensor of a CuPy array (DLPack)."""
    import torch

    return torch.from_dlpack(a)


def device_info(device) -> dict:
    info = {"device": str(device), "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "host": platform.node(), "python": platform.python_version(), "numpy": np.__version__}
    if device.kind == "cuda":
        import cupy as cp

        with device.activate():
            props = cp.cuda.runtime.getDeviceProperties(device.index)
        info.update(name=props["name"].decode(), sms=props["multiProcessorCount"],
                    cc=f"{props['major']}.{props['minor']}", cupy=cp.__version__,
                    cuda_runtime=cp.cuda.runtime.runtimeGetVersion(), driver=cp.cuda.runtime.driverGetVersion())
        torch = cudnn()
        if torch is not None:
            info.update(torch=torch.__version__, cudnn=torch.backends.cudnn.version())
    else:
        info.update(name=f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)",
                    note="not a GPU: times are a correctness smoke of the emulator/reference, not speed figures")
    return info


def measure_copy_bandwidth(device, nbytes: int = 1 << 30) -> float | None:
    """Device-to-device copy bandwidth in GB/s (bytes read + written), the ceiling for memory-bound kernels."""
    if device.kind != "cuda":
        return None
    import cupy as cp

    with device.activate():
        src = cp.ones(nbytes // 4, dtype=cp.float32)
        dst = cp.empty_like(src)
        ms = time_ms(lambda: dst.__setitem__(Ellipsis, src), device, warmup=3, repeats=10)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:,.0f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_results(name: str, device, rows: list[dict], columns: list[str], extra: dict | None = None) -> Path:
    """Write benchmarks/results/<name>-<device>-<date>.{json,md}; returns the markdown path."""
    info = device_info(device)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    slug = "".join(ch if ch.isalnum() else "-" for ch in info.get("name", str(device))).strip("-").lower()
    stem = RESULTS_DIR / f"{name}-{slug}-{_dt.date.today().isoformat()}"
    payload = {"benchmark": name, "info": info, "rows": rows, **(extra or {})}
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=2, default=str))
    header = f"# {name} on {info.get('name')} ({info['date']})\n\n"
    if "note" in info:
        header += f"**{info['note']}**\n\n"
    md = header + markdown_table(rows, columns) + "\n"
    stem.with_suffix(".md").write_text(md)
    return stem.with_suffix(".md")
