"""The benchmarks run end to end on the emulator (correctness smokes: tiny shapes, every result against the NumPy
reference) and write their JSON + markdown like a GPU run, to an ignored folder."""
import json
import os

import numpy as np
import pytest

from convnet import ops
from convnet.devices import get_device
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
    # ours in TF32 and BF16 against the float64 reference on rounded inputs (BF16: plus y's and dx's rounding to
    # bfloat16, at most 2**-8 relative; below 1e-5 would mean they were not rounded, above 2**-8 + 1e-5 a wrong kernel)
    assert all(r["TF32 rel err vs ref"] <= 1e-5 and r["TF32 ms"] > 0 for r in data["rows"])
    assert all(r["BF16 ms"] > 0 and r["BF16 rel err vs ref"] <= 2.0 ** -8 + 1e-5 for r in data["rows"])
    assert all(r["BF16 rel err vs ref"] > 1e-5 for r in data["rows"] if r["pass"] != "filter-grad")
    assert all(r["BF16 rel err vs ref"] <= 1e-5 for r in data["rows"] if r["pass"] == "filter-grad")  # float32 dw
    # batch 4: the bfloat16 one-element path (cp.async needs N % 8 == 0)
    assert all("bfloat16 1-element register path" in r["BF16 plan"] for r in data["rows"])
    assert "not speed figures" in md and "| TF32 ms |" in md and "| BF16 ms |" in md and "| BF16 TFLOP/s |" in md


def test_conv_bench_profile_mode_runs_each_pass(capsys):
    """--profile (gpu_check's ncu step: one launch per kernel, layer and pass inside the profiler range) runs every
    pass of the chosen layers; on emu without a profiler."""
    bench = load_benchmark("conv_bench")
    assert bench.main(["--device", "emu", "--profile", "--layers", "conv2,conv5"]) == 0
    out = capsys.readouterr().out
    for layer in ("conv2", "conv5"):
        for ps in bench.PASSES:
            assert f"profiled {layer} {ps} (" in out


# the cuda path of each benchmark at smoke sizes (tools/gpu_check.sh runs these with --device cuda)
FAKE_GPU_RUNS = {
    "conv_bench": ["--batch", "4", "--channel-divisor", "8", "--layers", "conv2", "--repeats", "2", "--warmup", "1"],
    "conv_bench --profile": ["--batch", "4", "--channel-divisor", "8", "--layers", "conv1,conv2", "--profile"],
    "memory_bound_bench": ["--batch", "4", "--cases", "relu1,pool1,lrn1,softmax", "--no-write"],
    "ops_bench": ["--batch", "4", "--channel-divisor", "8", "--repeats", "2", "--warmup", "1", "--no-write",
                  "--families", "elementwise,softmax,fc"],
    "train_bench": ["--model", "fmnist", "--batch-size", "8", "--steps", "2", "--warmup", "1", "--repeats", "1",
                    "--no-torch", "--json"],
}


@pytest.mark.parametrize("run", FAKE_GPU_RUNS)
def test_benchmark_cuda_path_on_a_fake_gpu(run, tmp_path, monkeypatch, capsys):
    """Each benchmark's cuda branch (CUDA events, graph capture, device properties, the SGEMM ceiling, cuDNN's
    absence handled) runs end to end on the CPU with tests/fake_cupy.py and the emulator's kernels: a Python error
    there would otherwise first show on a GPU, and stop its benchmark run. The numbers are meaningless (the fake's graphs replay
    nothing); only that it runs, and what it prints, is checked."""
    from fake_cupy import FakeCupy

    name, *flags = run.split()
    fake = FakeCupy(devices=1).install(monkeypatch, usable=True)
    props = fake.cuda.runtime.getDeviceProperties(0)  # a card of the peak table (benchmarks/common.PEAK_TFLOPS)
    monkeypatch.setattr(fake.cuda.runtime, "getDeviceProperties", lambda i: {**props, "name": b"NVIDIA H100 80GB HBM3"})
    bench = _writing_to(tmp_path, monkeypatch, name)
    monkeypatch.setattr(bench.common, "COPY_BYTES", 1 << 20)  # the copy-bandwidth buffer: 1 MB, not 1 GB
    for module in (bench, getattr(bench, "conv_bench", None)):  # ops_bench takes the ceiling from conv_bench's
        if hasattr(module, "SGEMM_N"):
            monkeypatch.setattr(module, "SGEMM_N", 64)  # the ceiling's GEMM at a smoke size, not 8192^3 on numpy
    fake.recording = True
    rc = bench.main(["--device", "cuda", *flags, *FAKE_GPU_RUNS[run]] +
                    ([str(tmp_path / "rows.jsonl")] if name == "train_bench" else []))
    out = capsys.readouterr().out
    assert rc in (0, None), out
    assert any(c[0].startswith("launch") for c in fake.calls)  # our kernels ran, through the cuda backend
    if name == "train_bench":  # ours in each precision of a GPU with tensor cores (the fake is sm_90)
        rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
        assert [r["what"] for r in rows] == ["train step (compute), ours, fp32", "train step (compute), ours, tf32",
                                             "loader (one thread)"]
        assert all(r["images_per_s"] > 0 for r in rows)
        assert any(c[0] == "launch conv_forward_tf32" for c in fake.calls) and any(
            c[0] == "matmul tf32" for c in fake.calls)
    if run == "conv_bench --profile":
        assert [c[0] for c in fake.calls if c[0].startswith("profiler")] == ["profiler start", "profiler stop"] * 6
    elif name == "conv_bench":
        data = json.loads(next(tmp_path.glob("conv-*.json")).read_text())
        assert [r["pass"] for r in data["rows"]] == ["forward", "input-grad", "filter-grad"]
        assert all(r["GFLOP/s"] > 0 and "% FP32 peak" in r for r in data["rows"])
        assert data["peak_tflops"] == {"fp32": 67.0, "tf32": 495.0, "bf16": 990.0}
        for r in data["rows"]:  # ours in TF32 and BF16 beside FP32, their shares of the TF32 and BF16 peaks
            assert r["TF32 ms"] > 0 and r["% TF32 peak"] == pytest.approx(100 * r["TF32 TFLOP/s"] / 495.0)
            assert r["BF16 ms"] > 0 and r["% BF16 peak"] == pytest.approx(100 * r["BF16 TFLOP/s"] / 990.0)
            assert r["BF16 TFLOP/s"] == pytest.approx(r["GFLOP/s"] / 1e3 * r["ms"] / r["BF16 ms"])
            assert set(r["% of peak"]) == {"ours FP32", "ours TF32", "ours BF16"}  # no cuDNN here
            assert r["% FP32 peak"] == pytest.approx(r["GFLOP/s"] / 1e3 / 67.0 * 100)
        assert any(c[0] == "graph launch" for c in fake.calls)  # timed as a CUDA graph
        assert any(c[0] == "launch conv_forward_tf32" for c in fake.calls)  # the TF32 kernel was timed
        for kernel in ("conv_forward_bf16", "conv_backward_data_bf16", "conv_backward_filter_bf16"):  # and the BF16
            assert any(c[0] == f"launch {kernel}" for c in fake.calls)


def test_conv_bench_reads_the_clock_from_the_device_attribute_else_the_properties(monkeypatch):
    """The FP32 peak's clock: cudaDevAttrClockRate (CUDA 13's device properties have no clockRate), else the
    properties' clockRate (a CuPy without the attribute), else no peak at all."""
    from fake_cupy import FakeCupy

    fake = FakeCupy(devices=1).install(monkeypatch, usable=True)
    bench, dev = load_benchmark("conv_bench"), get_device("cuda:0")
    rt = fake.cuda.runtime
    props = rt.getDeviceProperties(0)
    want = props["multiProcessorCount"] * 128 * 2 * 1_000_000 * 1e3 / 1e12  # sm_90: 128 lanes per SM
    monkeypatch.setattr(rt, "getDeviceProperties", lambda i: {k: v for k, v in props.items() if k != "clockRate"})
    assert bench.fp32_peak_tflops(dev) == want
    monkeypatch.setattr(rt, "getDeviceProperties", lambda i: props)
    monkeypatch.delattr(rt, "deviceGetAttribute")
    assert bench.fp32_peak_tflops(dev) == want
    monkeypatch.setattr(rt, "getDeviceProperties", lambda i: {k: v for k, v in props.items() if k != "clockRate"})
    assert bench.fp32_peak_tflops(dev) is None


def test_the_peak_table_matches_cards_by_name():
    bench = load_benchmark("conv_bench")
    peak = bench.common.peak_tflops
    assert [peak("NVIDIA H100 80GB HBM3", p) for p in ("fp32", "tf32", "bf16")] == [67.0, 495.0, 990.0]
    assert [peak("NVIDIA H200", p) for p in ("fp32", "tf32", "bf16")] == [67.0, 495.0, 990.0]
    assert [peak("NVIDIA A100-SXM4-80GB", p) for p in ("fp32", "tf32", "bf16")] == [19.5, 156.0, 312.0]
    assert peak("NVIDIA H100 PCIe", "tf32") is None and peak("NVIDIA GeForce RTX 4090", "fp32") is None


def test_conv_bench_rejects_unknown_layer():
    bench = load_benchmark("conv_bench")
    with pytest.raises(SystemExit):
        bench.main(["--device", "emu", "--layers", "conv9"])


def test_memory_bound_bench_emu_smoke_neurons_and_joins(capsys):
    bench = load_benchmark("memory_bound_bench")
    bench.main(["--device", "emu", "--cases", "tanh1,eltsum2,eltmax2", "--batch", "4", "--no-write"])
    out = capsys.readouterr().out
    assert "neuron backward" in out and "eltsum forward" in out and "eltmax backward" in out


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


def test_train_bench_emu_smoke(tmp_path, monkeypatch, capsys):
    """benchmarks/train_bench.py runs ours on the emulator (a smoke) and skips the PyTorch twin, saying why."""
    bench = _writing_to(tmp_path, monkeypatch, "train_bench")
    rows = tmp_path / "rows.jsonl"
    assert bench.main(["--device", "emu", "--model", "fmnist", "--batch-size", "8", "--steps", "1", "--warmup", "1",
                       "--json", str(rows)]) == 0
    out = capsys.readouterr().out
    assert "PyTorch twin skipped: ours runs on emu" in out and "NOT speed figures" in out
    lines = [json.loads(line) for line in rows.read_text().splitlines()]
    assert [r["what"] for r in lines] == ["train step (compute), ours, fp32", "loader (one thread)"]
    assert lines[0]["images_per_s"] > 0
    data, md = _written(tmp_path)
    assert data["benchmark"] == "train-fmnist" and len(data["rows"]) == 2  # emu: no batch/threads in the name


def test_train_bench_times_ours_in_each_precision_asked(tmp_path, monkeypatch, capsys):
    bench = _writing_to(tmp_path, monkeypatch, "train_bench")
    rows = tmp_path / "rows.jsonl"
    assert bench.main(["--device", "numpy", "--model", "fmnist", "--batch-size", "4", "--steps", "1", "--warmup",
                       "0", "--repeats", "1", "--no-torch", "--precisions", "fp32,tf32,bf16", "--json",
                       str(rows)]) == 0
    assert "skipped" not in capsys.readouterr().out
    lines = [json.loads(line) for line in rows.read_text().splitlines()]
    assert [r["what"] for r in lines[:3]] == ["train step (compute), ours, fp32", "train step (compute), ours, tf32",
                                              "train step (compute), ours, bf16"]


def test_train_bench_isa_limits_both_sides_in_the_timed_rounds(tmp_path, monkeypatch):
    """--isa avx2: every timed round (a child process) runs with both sides limited to AVX2, and the results say so
    in the rows, the settings and the file name."""
    bench = load_benchmark("train_bench")
    monkeypatch.setattr(bench.common, "RESULTS_DIR", tmp_path)
    limits = bench.ISA_LIMITS["avx2"]
    for key in limits:  # restored after the test: main sets them for its children
        monkeypatch.setenv(key, "unset")
    seen = []

    def fake_round(argv, side):
        seen.append((side, {key: os.environ.get(key) for key in limits}))
        return 0.01

    monkeypatch.setattr(bench, "_round_in_subprocess", fake_round)
    assert bench.main(["--device", "numpy", "--model", "fmnist", "--batch-size", "4", "--steps", "1", "--warmup", "0",
                       "--repeats", "2", "--no-torch", "--isa", "avx2"]) == 0
    assert [side for side, _ in seen] == ["ours:fp32", "ours:fp32"]
    assert all(env == limits for _, env in seen)
    (js,) = tmp_path.glob("train-fmnist-b4-t1-avx2-*.json")
    data = json.loads(js.read_text())
    assert data["rows"][0]["device"].endswith("avx2 only")
    assert "limited to avx2" in data["instruction_set"]
    with pytest.raises(SystemExit):
        bench.main(["--device", "numpy", "--isa", "sse2"])


def test_train_bench_towers_smoke_on_emu(tmp_path, monkeypatch, capsys):
    """--towers times alexnet, alexnet-2gpu on one device (two emulated streams) and on two virtual devices, and the
    copy between them (checked to arrive intact); the bytes exchanged per image are the net's plan's."""
    bench = _writing_to(tmp_path, monkeypatch, "train_bench")
    rows = tmp_path / "rows.jsonl"
    assert bench.main(["--towers", "--device", "emu", "--size", "67", "--batch-size", "2", "--steps", "1",
                       "--warmup", "0", "--repeats", "1", "--json", str(rows)]) == 0
    lines = [json.loads(line) for line in rows.read_text().splitlines()]
    assert [(r["what"], r["device"]) for r in lines] == [
        ("train step, one device", "emu"), ("train step, two towers on one device (two streams)", "emu,emu"),
        ("train step, two towers on two devices", "emu:0,emu:1"),
        ("copy 128x3x3x2 float32", "emu -> emu"), ("copy 128x3x3x2 float32", "emu -> emu:1")]
    from convnet.model_file import build_net

    text, source = bench._towers_text("alexnet-2gpu", 67)
    plan = build_net(text, source, devices="emu:0,emu:1", init_params=False)[0].exchange_plan(images=1)
    assert lines[0]["exchanged_bytes_per_image"] == {}
    assert lines[2]["exchanged_bytes_per_image"] == {k.replace("emu:0", "emu"): v for k, v in plan.items()}
    assert all(r["images_per_s"] > 0 for r in lines[:3]) and all(r["GB_per_s"] > 0 for r in lines[3:])
    data, _ = _written(tmp_path)
    assert data["benchmark"] == "train-towers-alexnet-s67-b2" and "NOT speed figures" in capsys.readouterr().out


def test_train_bench_twin_plan_is_read_from_the_model_file():
    """The PyTorch twin of AlexNet comes from the parsed model file: grouped convs, per-tower LRN with alpha in
    torch's mean convention, overlapping max pooling, dropout, the fc stack (checked without torch)."""
    bench = load_benchmark("train_bench")
    from convnet.model_file import load_model

    net, _ = load_model("alexnet", device="numpy", init_params=False)
    plan = {p["name"]: p for p in bench.torch_plan(net)}
    assert list(plan) == [l.name for l in net.order[1:]]
    assert plan["conv1"]["args"] == (3, 96, (11, 11)) and plan["conv1"]["kwargs"]["stride"] == (4, 4)
    assert plan["conv2"]["kwargs"]["groups"] == 2 and plan["conv3"]["kwargs"]["groups"] == 1
    assert plan["conv2"]["relu"] and not plan["fc8"]["relu"]
    lrn = plan["rnorm1"]
    assert lrn["module"] == "LocalResponseNorm" and lrn["groups"] == 2
    assert lrn["kwargs"] == dict(size=5, alpha=pytest.approx(5e-4), beta=0.75, k=2.0)  # sum convention: alpha * size
    assert plan["pool1"]["module"] == "MaxPool2d" and plan["pool1"]["args"] == ((3, 3), (2, 2), (0, 0))
    assert plan["drop6"]["kwargs"] == dict(p=0.5)
    assert plan["fc6"]["args"] == (256 * 6 * 6, 4096) and plan["fc6"]["flatten"]
    assert plan["probs"]["coeff"] == 1.0


def test_train_bench_twin_unknown_layer_type_is_an_error():
    bench = load_benchmark("train_bench")
    net = type("N", (), {})()
    data = type("L", (), {"name": "data"})()
    odd = type("L", (), {"name": "odd", "type": "maxout", "inputs": ["data"], "in_shape": (3, 4, 4)})()
    net.data_layer, net.order = data, [data, odd]
    with pytest.raises(NotImplementedError, match="no PyTorch twin for layer type 'maxout'"):
        bench.torch_plan(net)


@pytest.mark.parametrize("model", ["alexnet", "fmnist", "cifar-18pct"])
def test_train_bench_twin_is_the_same_model(model):
    """Where PyTorch is installed (typically a GPU machine; not a test dependency): every layer of the twin, run by PyTorch on
    the CPU, matches our layer on the numpy device."""
    torch = pytest.importorskip("torch")
    bench = load_benchmark("train_bench")
    from convnet.model_file import load_model

    net, _ = load_model(model, device="numpy")
    plan = bench.torch_plan(net)
    twin = bench.torch_model(torch, net, plan, torch.device("cpu")).eval()
    per_layer = bench.layer_checks(torch, net, twin, plan, torch.device("cpu"))
    assert max(per_layer.values()) < bench.SAME_MODEL_TOL, per_layer


@pytest.mark.parametrize("shape", [dict(C=3, H=27, W=27, N=2, F=16, KH=11, KW=11, stride_h=4, stride_w=4, pad_h=2,
                                        pad_w=2), dict(C=6, H=9, W=7, N=3, F=8, KH=3, KW=3, pad_h=1, pad_w=1, groups=2),
                                   dict(C=4, H=7, W=5, N=3, F=6, KH=3, KW=1)])
def test_conv_bench_pytorch_baseline_is_the_same_convolution(shape, monkeypatch):
    """Where PyTorch is installed: conv_bench's cuDNN-through-PyTorch passes (run here on the CPU), brought back to
    our layouts, equal the NumPy reference's; the GPU run then compares them with ours (``NCHW rel diff``)."""
    torch = pytest.importorskip("torch")
    bench = load_benchmark("conv_bench")
    from convnet.geometry import ConvGeometry
    from convnet.reference import conv as ref

    geo = ConvGeometry(**shape)
    rng = np.random.default_rng(1)
    host = {k: rng.standard_normal(getattr(geo, f"{k}_shape"), dtype=np.float32) for k in ("x", "w", "y")}
    host["dy"] = host.pop("y")
    cpu = torch.device("cpu")
    monkeypatch.setattr(torch, "device", lambda kind, index=None: cpu)
    got = bench.torch_fns(torch, geo, host, 0)["outputs"]()
    last = bench.torch_fns(torch, geo, host, 0, channels_last=True)["outputs"]()  # NHWC memory: the same values
    for g, l in zip(got, last):
        np.testing.assert_allclose(l, g, rtol=1e-5, atol=1e-5 * np.abs(g).max())
    # bfloat16 tensors: inputs off by 2**-9 relative, each product by 2**-8, results stored in bfloat16 (2**-9 more);
    # normwise against the float32 result, sums of random signs keep it near those terms: 2e-2 leaves room
    for g, b in zip(got, bench.torch_fns(torch, geo, host, 0, bf16=True)["outputs"]()):
        assert bench.common.rel_error(b, g) < 2e-2
    kw = dict(stride=geo.stride, padding=geo.padding, groups=geo.groups)
    want = (ref.conv_forward(host["x"], host["w"], **kw), ref.conv_backward_data(host["dy"], host["w"],
                                                                                 (geo.H, geo.W), **kw),
            ref.conv_backward_filter(host["x"], host["dy"], (geo.KH, geo.KW), **kw))
    for g, w in zip(got, want):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * np.abs(w).max())


def test_data_bench_smoke(tmp_path, capsys):
    bench = load_benchmark("data_bench")
    out = tmp_path / "data.json"
    assert bench.main(["--images", "40", "--size", "48", "--crop", "40", "--batch", "8", "--workers", "1",
                       "--decoders", "pillow", "--min-seconds", "0", "--json", str(out), "--no-write"]) == 0
    data = json.loads(out.read_text())
    assert [r["processes"] for r in data["rows"]] == [1, 1, 1, 1] and all(r["images_per_s"] > 0 for r in data["rows"])
    assert [r["first_batch_s"] is None for r in data["rows"]] == [True, True, True, False]
    assert 0 < data["rows"][-1]["first_batch_s"] < 60
    assert "| pillow+numpy baseline | pillow | 1 |" in capsys.readouterr().out


def test_cpu_gemm_bench_smoke(tmp_path, monkeypatch, capsys):
    """benchmarks/cpu_gemm_bench.py times every GEMM of the fmnist step (ours against NumPy's, each checked) and
    writes its table."""
    bench = _writing_to(tmp_path, monkeypatch, "cpu_gemm_bench")
    if not bench.cpu_gemm.available():
        pytest.skip("this CPU has no AVX2+FMA: the cpu device multiplies with NumPy's BLAS")
    assert bench.main(["--batch", "3", "--repeats", "1"]) == 0
    (js,) = tmp_path.glob("cpu_gemm-fmnist-b3-t1-*.json")
    rows = json.loads(js.read_text())["rows"]
    assert [r["gemm"] for r in rows] == [
        "conv1 forward", "conv1 filter grad", "conv2 forward", "conv2 filter grad", "conv2 data grad",
        "conv3 forward", "conv3 filter grad", "conv3 data grad", "fc3 forward", "fc3 data grad", "fc3 weight grad",
        "fc4 forward", "fc4 data grad", "fc4 weight grad"]
    assert all(r["rel diff"] < 1e-5 and r["ours ms"] > 0 for r in rows)
    assert "sum: ours" in capsys.readouterr().out


def test_step_profile_times_every_phase_of_a_cpu_step(tmp_path, monkeypatch, capsys):
    """benchmarks/step_profile.py: a tiny run prints the per-phase table of a cpu-device step -- every GEMM of the
    fmnist net (forward, data and weight gradients) with its GFLOP/s, the compiled loops, the Python remainder --
    and the phases account for the instrumented step (each is a median over steps, so up to rounding)."""
    bench = _writing_to(tmp_path, monkeypatch, "step_profile")
    if get_device("cpu").available()[0] is False:
        pytest.skip("the cpu device is not built")
    assert bench.main(["--batch-size", "4", "--steps", "3", "--warmup", "1", "--ghz", "2.0"]) == 0
    out = capsys.readouterr().out
    assert "| phase | ms | % of step | GFLOP/s | % of peak |" in out and "peak 64 GFLOP/s" in out
    (js,) = tmp_path.glob("step_profile-fmnist-b4-t1-*.json")
    rows = {r["phase"]: r for r in json.loads(js.read_text())["rows"]}
    gemms = [p for p in rows if p.startswith("GEMM ")]
    if bench.cpu_gemm.available():
        # auto at batch 4: conv2's and conv3's filter gradients by Winograd, the rest direct (under 32 images)
        assert sorted(gemms) == sorted(
            f"GEMM {layer} {ps}" + (" (Winograd)" if layer in ("conv2", "conv3") and ps == "weight grad" else "")
            for layer in ("conv1", "conv2", "conv3", "fc3", "fc4")
            for ps in ("forward", "data grad", "weight grad") if (layer, ps) != ("conv1", "data grad"))
        assert all(rows[g]["GFLOP/s"] > 0 and rows[g]["% of peak"] > 0 for g in gemms)
    for phase in ("max pooling", "ReLU", "dropout", "bias (add, sum)", "SGD update", "col2im",
                  "softmax + cross-entropy (NumPy)", bench.OPS_OVERHEAD, bench.REMAINDER):
        assert rows[phase]["ms"] > 0, phase
    parts = sum(r["ms"] for p, r in rows.items() if not p.startswith(("GEMM ", "step ")))
    step = rows["step (instrumented)"]["ms"]
    assert 0.5 * step < parts < 1.5 * step  # medians of parts against the median step: close, not equal
    if bench.cpu_gemm.available():  # --cpu-conv winograd: conv2/conv3's GEMMs are Winograd's, with its transforms
        assert bench.main(["--batch-size", "4", "--steps", "2", "--warmup", "1", "--cpu-conv", "winograd",
                           "--no-write"]) == 0
        out = capsys.readouterr().out
        assert "winograd convolutions" in out and "| GEMM conv2 forward (Winograd) |" in out
        assert "| GEMM conv3 weight grad (Winograd) |" in out and "| Winograd transforms |" in out
