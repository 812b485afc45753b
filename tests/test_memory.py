"""A net too large for its devices' free memory is refused before anything is allocated, with the sizes and the
memory available; the need is counted from the shapes (convnet.memory)."""
import os

import pytest

from convnet import memory
from convnet.devices import Device, _host
from convnet.graph import Net
from convnet.model_file import build_net
from convnet.train import main

from models import TINY
from test_train import _args

MIB = 1 << 20


def _model(tmp_path, text=TINY, name="m.cfg"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_training_bytes_are_weights_gradients_momentum_and_every_output():
    """TINY by hand: conv1 4 filters 3x3 on 1 channel (8x8 -> 4x8x8), pool to 4x4x4, fc2 64 -> 16, dropout, fc3 16 -> 4,
    softmax; float32 and a batch of 16."""
    net, _ = build_net(TINY, "tiny", device="numpy", init_params=False)
    params = (4 * 9 + 4) + (64 * 16 + 16) + (16 * 4 + 4)
    outputs = 1 * 8 * 8 + 4 * 8 * 8 + 4 * 4 * 4 + 16 + 16 + 4 + 4  # data conv1 pool1 fc2 drop2 fc3 probs
    assert memory.training_bytes(net, 16) == {Device("numpy"): [3 * params * 4, outputs * 16 * 4]}
    net64, _ = build_net(TINY, "tiny", device="numpy", dtype="float64", init_params=False)
    assert memory.training_bytes(net64, 16) == {Device("numpy"): [3 * params * 8, outputs * 16 * 8]}


def test_available_ram_is_the_hosts():
    free = _host.available_ram()
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert 0 < free <= total
    assert Device("cpu").free_memory()[0] == Device("emu", 1).free_memory()[0] == "host memory"


@pytest.mark.parametrize("device", ["cpu", "emu", "numpy"])
def test_net_larger_than_free_ram_is_refused_before_allocating(tmp_path, monkeypatch, capsys, device):
    """With 100 MiB free, an fc layer of 10^6 outputs (64 x 10^6 weights: 732 MiB with gradients and momentum) is
    refused in one line naming the sizes and the memory available, before any parameter exists; the same limit
    lets TINY train."""
    monkeypatch.setattr(_host, "available_ram", lambda: 100 * MIB)
    allocated = []
    real = Net._init_params
    monkeypatch.setattr(Net, "_init_params", lambda net, rng: allocated.append(net) or real(net, rng))
    big = _model(tmp_path, TINY.replace("outputs = 16", "outputs = 1000000"), "big.cfg")
    rc = main(_args(big, tmp_path / "big", "--device", device, "--no-plots", "--epochs", "1"))
    err = capsys.readouterr().err
    params = 3 * (40 + 64 * 10**6 + 10**6 + 4 * 10**6 + 4) * 4
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert f"the net does not fit in host memory ({device})" in err, err
    assert f"{params / MIB:.1f} MiB of parameters" in err and "100.0 MiB are available" in err, err
    assert "for a batch of 16" in err, err
    assert not allocated and not (tmp_path / "big").exists()
    rc = main(_args(_model(tmp_path), tmp_path / "tiny", "--device", device, "--no-plots", "--epochs", "1"))
    assert rc == 0 and allocated


def test_activations_count_too(tmp_path, monkeypatch, capsys):
    """Parameters that fit, activations that do not (a batch of 4096 images of 64 x 64 through 64 filters): refused,
    and the message says to lower --batch-size."""
    monkeypatch.setattr(_host, "available_ram", lambda: 512 * MIB)
    text = TINY.replace("size = 8\n", "size = 64\n", 1).replace("filters = 4", "filters = 64")
    rc = main(_args(_model(tmp_path, text), tmp_path / "r", "--device", "numpy", "--batch-size", "4096",
                    "--synthetic-train", "4096"))
    err = capsys.readouterr().err
    acts = (64 * 64 + 64 * 64 * 64 + 64 * 32 * 32 + 16 + 16 + 4 + 4) * 4096 * 4
    assert rc == 2 and f"{acts / (1 << 30):.1f} GiB of activations for a batch of 4096" in err, err
    assert "lower --batch-size" in err


def test_net_larger_than_a_fake_gpus_free_memory_is_refused(tmp_path, monkeypatch, capsys):
    """On cuda the limit is the GPU's free memory (cudaMemGetInfo on that GPU), here a fake GPU 1 with 64 MiB free
    while GPU 0 has 1 GiB."""
    from fake_cupy import FakeCupy
    fake = FakeCupy(devices=2).install(monkeypatch, usable=True)
    asked = []

    def mem_get_info():
        asked.append(fake.current)
        return (64 * MIB if fake.current == 1 else 1 << 30), 1 << 30
    monkeypatch.setattr(fake.cuda.runtime, "memGetInfo", staticmethod(mem_get_info))
    big = _model(tmp_path, TINY.replace("outputs = 16", "outputs = 100000"))
    rc = main(_args(big, tmp_path / "r", "--device", "cuda:1", "--no-plots", "--epochs", "1"))
    err = capsys.readouterr().err
    assert rc == 2 and "the net does not fit in GPU 1 (cuda:1)" in err and "64.0 MiB are available" in err, err
    assert asked == [1]
    capsys.readouterr()
    assert main(_args(big, tmp_path / "r0", "--device", "cuda:0", "--no-plots", "--epochs", "1")) == 0
