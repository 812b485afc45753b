"""The model summary: a table of layers (type, output shape per image, parameters, forward FLOPs) and the totals.

A net placed on several devices or towers also gets a device column and the bytes one training step copies between
them per image (:meth:`convnet.graph.Net.exchange_plan`).

A line gives the bytes of the layer outputs (activations) per image in each precision: fp32 and tf32 store every
value in the net's dtype (float32: 4 bytes); bf16 stores 2 bytes per value of a layer whose ``bf16_output`` is True
(all but the data layer's images and the softmax's probabilities, which stay float32)."""
from __future__ import annotations

import numpy as np

from .reference.precision import PRECISIONS

HEADER = ("layer", "type", "output (per image)", "params", "FLOPs/image")
NUMERIC = (3, 4)  # right-aligned columns


def _placed(net) -> bool:
    """Whether the net's layers are on more than one placement (device or tower)."""
    return len({net.placements.label(l) for l in net.order}) > 1


def summary_rows(net):
    """[(layer, type, output shape, params, FLOPs[, device])] as strings, the header first and the totals last."""
    placed = _placed(net)
    rows = [HEADER + (("device",) if placed else ())]
    total_params = total_flops = 0
    for layer in net.order:
        p, f = layer.param_count(), layer.flops()
        total_params += p
        total_flops += f
        row = (layer.name, layer.describe(), "x".join(str(s) for s in layer.out_shape), f"{p:,}", f"{f:,}")
        rows.append(row + ((net.placements.label(layer),) if placed else ()))
    rows.append(("total", "", "", f"{total_params:,}", f"{total_flops:,}") + (("",) if placed else ()))
    return rows, total_params, total_flops


def activation_bytes(net, precision: str) -> int:
    """Bytes of all layer outputs for one image when the net runs in ``precision`` (see the module's docstring)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    float_bytes = np.dtype(net.dtype).itemsize
    return sum(int(np.prod(l.out_shape)) * (2 if precision == "bf16" and l.bf16_output else float_bytes)
               for l in net.order)


def activations_line(net) -> str:
    return ("activations per image (layer outputs): "
            + ", ".join(f"{p} {activation_bytes(net, p):,} B" for p in PRECISIONS)
            + " (bf16: bfloat16 but for the images and probabilities)")


def format_summary(net) -> str:
    """The summary table of ``net`` (a :class:`convnet.graph.Net`) as text."""
    rows, total_params, total_flops = summary_rows(net)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for j, r in enumerate(rows):
        lines.append("  ".join(c.rjust(widths[i]) if i in NUMERIC else c.ljust(widths[i])
                               for i, c in enumerate(r)).rstrip())
        if j == 0 or j == len(rows) - 2:
            lines.append("-" * len(lines[-1]))
    if not _placed(net):
        lines.append(f"{total_params:,} parameters, {total_flops / 1e9:.3f} GFLOP per image forward "
                     f"(a multiply-add counts 2), device {net.device}")
        lines.append(activations_line(net))
        return "\n".join(lines)
    towers = ", ".join(f"{i}={d}" for i, d in enumerate(net.devices))
    lines.append(f"{total_params:,} parameters, {total_flops / 1e9:.3f} GFLOP per image forward "
                 f"(a multiply-add counts 2), towers {towers}")
    lines.append(activations_line(net))
    plan = net.exchange_plan()
    if plan:
        lines.append("copied between devices per image, one training step (forward + backward): "
                     + ", ".join(f"{k} {v:,} B" for k, v in plan.items()) + f" ({sum(plan.values()):,} B in all)")
    return "\n".join(lines)
