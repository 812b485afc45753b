"""The model summary: a table of layers (type, output shape per image, parameters, forward FLOPs) and the totals."""
from __future__ import annotations

HEADER = ("layer", "type", "output (per image)", "params", "FLOPs/image")


def summary_rows(net):
    """[(layer, type, output shape, params, FLOPs)] as strings, the header first and the totals last."""
    rows = [HEADER]
    total_params = total_flops = 0
    for layer in net.order:
        p, f = layer.param_count(), layer.flops()
        total_params += p
        total_flops += f
        rows.append((layer.name, layer.describe(), "x".join(str(s) for s in layer.out_shape), f"{p:,}", f"{f:,}"))
    rows.append(("total", "", "", f"{total_params:,}", f"{total_flops:,}"))
    return rows, total_params, total_flops


def format_summary(net) -> str:
    """The summary table of ``net`` (a :class:`convnet.graph.Net`) as text."""
    rows, total_params, total_flops = summary_rows(net)
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    lines = []
    for j, r in enumerate(rows):
        lines.append("  ".join(c.ljust(widths[i]) if i < 3 else c.rjust(widths[i]) for i, c in enumerate(r)))
        if j == 0 or j == len(rows) - 2:
            lines.append("-" * len(lines[-1]))
    lines.append(f"{total_params:,} parameters, {total_flops / 1e9:.3f} GFLOP per image forward "
                 f"(a multiply-add counts 2), device {net.device}")
    return "\n".join(lines)
