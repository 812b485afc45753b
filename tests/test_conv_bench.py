"""benchmarks/conv_bench.py runs end to end on the emulator (a correctness smoke) and writes its JSON + markdown."""
import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
    path = os.path.join(ROOT, "benchmarks", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_conv_bench_emu_smoke(tmp_path, monkeypatch):
    bench = _load("conv_bench")
    monkeypatch.setattr(bench.common, "RESULTS_DIR", tmp_path)
    rc = bench.main(["--device", "emu", "--layers", "conv2,conv5", "--batch", "4", "--model", "one-tower"])
    assert rc == 0
    (js,) = tmp_path.glob("smoke/*.json")
    data = json.loads(js.read_text())
    assert [r["pass"] for r in data["rows"]] == ["forward", "input-grad", "filter-grad"] * 2
    assert all(r["rel err vs ref"] <= 1e-5 and "16-byte path" in r["plan"] for r in data["rows"])
    md = next(tmp_path.glob("smoke/*.md")).read_text()
    assert "not speed figures" in md


def test_conv_bench_rejects_unknown_layer():
    bench = _load("conv_bench")
    with pytest.raises(SystemExit):
        bench.main(["--device", "emu", "--layers", "conv9"])
