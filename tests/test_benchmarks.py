"""The benchmarks run end to end on the emulator (correctness smokes: tiny shapes, every result against the NumPy
reference) and write their JSON + markdown like a GPU run, to an ignored folder."""
import json

import numpy as np
import pytest

from convnet import ops
from helpers import load_benchmark


def _writing_to(folder, monkeypatch, name):
    """benchmarks/<name>.py, writing its results to ``folder`` (smoke runs: ``folder/smoke``)."""
    bench = load_benchmark(name)
    monkeypatch.setattr(bench.common, "RESULTS_DIR", folder)
    return bench


def _written(results_dir):
    (js,) = results_dir.glob("smoke/*.json")
    (md,) = results_dir.glob("smoke/*.md")
    return json.loads(js.read_text()), md.read_text()


def test_conv_bench_emu_smoke(tmp_path, monkeypatch):
    bench = _writing_to(tmp_path, monkeypatch, "conv_bench")
    rc = bench.main(["--device", "emu", "--layers", "conv2,conv5", "--batch", "4", "--model", "one-tower"])
    assert rc == 0
    data, md = _written(tmp_path)
    assert [r["pass"] for r in data["rows"]] == ["forward", "input-grad", "filter-grad"] * 2
    assert all(r["rel err vs ref"] <= 1e-5 and "16-byte path" in r["plan"] for r in data["rows"])
    assert "not speed figures" in md


def test_conv_bench_rejects_unknown_layer():
    bench = load_benchmark("conv_bench")
    with pytest.raises(SystemExit):
        bench.main(["--device", "emu", "--layers", "conv9"])


def test_memory_bound_bench_emu_smoke(capsys):
    """benchmarks/memory_bound_bench.py runs end to end on the emulator (and says it is not a speed figure)."""
    bench = load_benchmark("memory_bound_bench")
    bench.main(["--device", "emu", "--cases", "pool5,lrn2", "--batch", "4", "--no-write"])
    out = capsys.readouterr().out
    assert "NOT speed figures" in out and "pool backward" in out and "lrn backward" in out


def test_ops_bench_emu_checks_every_op(tmp_path, monkeypatch, capsys):
    """Every family, every op of convnet.ops (but the shape helpers and the mask view) at tiny AlexNet shapes,
    each result checked against the NumPy reference."""
    bench = _writing_to(tmp_path, monkeypatch, "ops_bench")
    assert bench.main(["--device", "emu"]) == 0
    data, md = _written(tmp_path)
    rows = data["rows"]
    assert {r["family"] for r in rows} == set(bench.FAMILIES)
    assert {r["op"] for r in rows} == set(ops.__all__) - bench.NOT_TIMED
    assert all(r["check"] == "ok" and r["ms"] > 0 for r in rows)
    assert all(("GFLOP/s" in r) != ("GB/s" in r) for r in rows)  # compute-bound or memory-bound, never both
    assert {r["layer"] for r in rows if r["op"] == "conv_forward"} == {f"conv{i}" for i in range(1, 6)}
    assert all(r["rel err vs ref"] == 0 for r in rows if r["family"] in ("elementwise", "pool"))
    assert "not speed figures" in md and "all match" in capsys.readouterr().out


def test_ops_bench_names_a_wrong_op(monkeypatch, capsys):
    """A kernel result that differs from the reference fails the run, and the message names the op."""
    bench = load_benchmark("ops_bench")
    real = bench.ops.relu_backward

    def off_by_one(device, *args, **kwargs):
        dx = real(device, *args, **kwargs)
        if device != "numpy":  # the emulated kernel, not the reference
            dx.reshape(-1)[0] += np.float32(1.0)
        return dx

    monkeypatch.setattr(bench.ops, "relu_backward", off_by_one)
    assert bench.main(["--device", "emu", "--families", "elementwise", "--no-write"]) == 1
    err = capsys.readouterr().err
    assert "SMOKE FAILED: elementwise relu_backward (relu1): dx is not identical" in err
    assert "relu_forward" not in err


def test_ops_bench_rejects_unknown_family():
    bench = load_benchmark("ops_bench")
    with pytest.raises(SystemExit):
        bench.main(["--device", "emu", "--families", "conv,norm"])
