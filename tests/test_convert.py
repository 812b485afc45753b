"""python -m convnet.convert: the one command of the conversions (torchvision's, tests/test_torchvision.py; the
towers', tests/test_two_towers.py), and what it says without PyTorch."""
import sys

from convnet.convert import main as convert_main
from convnet.convert_towers import main as towers_main


def test_towers_is_the_convert_towers_command(tmp_path, capsys):
    args = [str(tmp_path / "none.npz"), str(tmp_path / "out.npz"), "--to", "alexnet-2gpu"]
    assert convert_main(["towers", *args]) == towers_main(args) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and err[0] == err[1] == f"error: checkpoint '{tmp_path / 'none.npz'}' not found"


def test_the_torchvision_conversions_without_pytorch_say_how_to_get_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch raises ImportError
    (tmp_path / "a.pth").write_bytes(b"x")
    assert convert_main(["from-torchvision", str(tmp_path / "a.pth"), str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err == ("error: reading and writing torchvision weights needs PyTorch: pip install "
                                       "'convnet[torch]'\n")
    assert not (tmp_path / "run").exists()
    assert convert_main(["to-torchvision", str(tmp_path / "run"), str(tmp_path / "o.pth")]) == 2
    assert "needs PyTorch" in capsys.readouterr().err
