"""torchvision's AlexNet weights both ways (python -m convnet.convert from-torchvision / to-torchvision), checked
against PyTorch itself on a torch.nn.Sequential with torchvision's layer indices (torchvision is not needed)."""
import json
import os
import re
import shutil
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

# CI installs PyTorch for this file and sets CONVNET_REQUIRE_TORCH=1: there a missing torch fails instead of skipping
torch = __import__("torch") if os.environ.get("CONVNET_REQUIRE_TORCH") == "1" else pytest.importorskip("torch")
from torch import nn  # noqa: E402
from PIL import Image  # noqa: E402

from convnet import checkpoint as ckpt  # noqa: E402
from convnet import torchvision_weights as tvw  # noqa: E402
from convnet.convert import main as convert_main  # noqa: E402
from convnet.data.prepare import prepare  # noqa: E402
from convnet.model_file import build_net  # noqa: E402
from convnet.predict import Predictor  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from imagefolder_fixture import make_tree  # noqa: E402


CLASSES = 10  # fc8's outputs: fewer than ImageNet's, which the conversion must carry


def alexnet_like(classes=CLASSES, seed=0):
    """torchvision.models.alexnet's layers and parameter names, He-initialised so that every layer's outputs are
    of order one (torch's default initialisation shrinks them to near-uniform probabilities)."""
    torch.manual_seed(seed)
    features = nn.Sequential(
        nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(), nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2))
    classifier = nn.Sequential(nn.Dropout(), nn.Linear(9216, 4096), nn.ReLU(), nn.Dropout(), nn.Linear(4096, 4096),
                               nn.ReLU(), nn.Linear(4096, classes))
    m = nn.Sequential(OrderedDict(features=features, avgpool=nn.AdaptiveAvgPool2d((6, 6)), flatten=nn.Flatten(),
                                  classifier=classifier))
    for mod in m.modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(mod.weight)
            nn.init.normal_(mod.bias, 0.0, 0.1)
    return m.eval()


def torch_probs(model, images, mean=tvw.IMAGENET_MEAN, std=tvw.IMAGENET_STD):
    """torchvision's preprocessing of (N, H, W, 3) uint8 crops, then the model's softmax, float64 -> float32."""
    x = (images / 255.0 - np.asarray(mean)) / np.asarray(std)
    with torch.no_grad():
        logits = model(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2), np.float32)))
    return torch.softmax(logits, 1).numpy(), logits.numpy()


def our_net(run, device="cpu"):
    st = ckpt.load(run)
    net, _ = build_net(st["meta"]["config"]["model_text"], "model.cfg", device=device)
    net.load_state_dict(st["params"])
    return net, st


def our_probs(net, mean, images):
    x = (images.astype(np.float32) - mean) * np.float32(net.data_layer.scale)
    p = net.forward(np.ascontiguousarray(x.transpose(3, 1, 2, 0)))
    return p.T, net.logits.T


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    d = tmp_path_factory.mktemp("tv")
    model = alexnet_like()
    torch.save(model.state_dict(), d / "alexnet.pth")
    assert convert_main(["from-torchvision", str(d / "alexnet.pth"), str(d / "run")], log=lambda *a: None) == 0
    return model, d


def test_imported_weights_compute_what_torch_computes(imported):
    model, d = imported
    images = np.random.default_rng(1).integers(0, 256, (5, 224, 224, 3)).astype(np.uint8)
    net, st = our_net(d / "run")
    assert st["mean"].shape == (3,) and net.num_classes == CLASSES
    p, logits = our_probs(net, st["mean"], images)
    tp, tl = torch_probs(model, images)
    assert tp.max() > 0.3  # not a flat output: a wrong layer or transpose would show
    np.testing.assert_allclose(p, tp, rtol=0, atol=1e-5)
    np.testing.assert_allclose(logits, tl, rtol=0, atol=1e-5 * max(1.0, np.abs(tl).max()))


def test_imported_run_is_a_fresh_training_state(imported):
    _, d = imported
    st = ckpt.load(d / "run")
    ckpt.check_training_state(st)  # what --resume and --eval-only check
    assert st["meta"]["epoch"] == st["meta"]["step"] == 0 and st["meta"]["history"] == []
    assert all((v == 0).all() for v in st["velocity"].values())
    assert set(st["params"]) == set(st["velocity"])
    assert (d / "run" / "model.cfg").read_text() == st["meta"]["config"]["model_text"]


def test_predict_on_an_imported_run_gives_torchs_probabilities(imported, tmp_path):
    """256x256 pictures (torchvision's Resize(256) leaves them as they are): the centre 224 crop, and the ten
    crops (four corners, centre, their mirror images) averaged, as torchvision's TenCrop evaluation does."""
    model, d = imported
    imgs = np.random.default_rng(2).integers(0, 256, (3, 256, 256, 3)).astype(np.uint8)
    paths = []
    for i, a in enumerate(imgs):
        paths.append(tmp_path / f"p{i}.png")
        Image.fromarray(a).save(paths[-1])
    pred = Predictor(d / "run", device="cpu")
    np.testing.assert_allclose(pred.probabilities(paths), torch_probs(model, imgs[:, 16:240, 16:240])[0], atol=1e-5)
    corners = [(0, 0), (0, 32), (32, 0), (32, 32), (16, 16)]
    views = [imgs[:, y:y + 224, x:x + 224] for y, x in corners]
    views += [v[:, :, ::-1] for v in views]
    want = np.mean([torch_probs(model, v)[0] for v in views], axis=0)
    np.testing.assert_allclose(pred.probabilities(paths, crops=10), want, atol=1e-5)
    top = pred.top(paths, 3)
    assert [r[0][0] for r in top] == list(np.argmax(torch_probs(model, imgs[:, 16:240, 16:240])[0], axis=1))
    assert top[0][0][1] == f"class {top[0][0][0]}"  # no dataset: indices


def test_export_then_import_gives_back_the_run_exactly(imported, tmp_path):
    _, d = imported
    logs = []
    assert convert_main(["to-torchvision", str(d / "run"), str(tmp_path / "back.pth")], log=logs.append) == 0
    info = json.loads((tmp_path / "back.json").read_text())
    assert "per-pixel" not in " ".join(logs)
    assert convert_main(["from-torchvision", str(tmp_path / "back.pth"), str(tmp_path / "again"), "--normalization",
                         str(tmp_path / "back.json")], log=logs.append) == 0
    a, b = ckpt.load(d / "run"), ckpt.load(tmp_path / "again")
    assert set(a["params"]) == set(b["params"])
    for k in a["params"]:
        np.testing.assert_array_equal(a["params"][k], b["params"][k], err_msg=k)
    np.testing.assert_array_equal(a["mean"], b["mean"])
    sa, sb = (build_net(s["meta"]["config"]["model_text"], device="numpy", init_params=False)[0].data_layer.scale
              for s in (a, b))
    assert np.float32(sa) == np.float32(sb)
    np.testing.assert_allclose(info["mean"], tvw.IMAGENET_MEAN, rtol=1e-6)
    np.testing.assert_allclose(info["std"], [tvw.IMAGENET_STD[0]] * 3, rtol=1e-6)


def test_export_with_torchvisions_std_gives_back_the_torch_weights(imported, tmp_path):
    model, d = imported
    assert convert_main(["to-torchvision", str(d / "run"), str(tmp_path / "tv.pth"), "--std", "imagenet"],
                        log=lambda *a: None) == 0
    state = torch.load(tmp_path / "tv.pth", weights_only=True)
    orig = model.state_dict()
    assert set(state) == set(orig)
    for k, v in orig.items():
        if k == "features.0.weight":  # folded in and out: float32 rounding twice
            np.testing.assert_allclose(state[k].numpy(), v.numpy(), rtol=2.5e-7, atol=0)
        else:
            np.testing.assert_array_equal(state[k].numpy(), v.numpy(), err_msg=k)
    info = json.loads((tmp_path / "tv.json").read_text())
    np.testing.assert_allclose(info["mean"], tvw.IMAGENET_MEAN, rtol=1e-6)
    assert info["std"] == list(tvw.IMAGENET_STD)


def test_a_per_pixel_mean_is_exported_per_channel_with_its_error(imported, tmp_path):
    """A run trained here subtracts a per-pixel mean (256x256 prepared images, centre 224 crop evaluated):
    torchvision gets its centre crop's per-channel average, and the message gives the input error it makes."""
    model, d = imported
    st = ckpt.load(d / "run")
    rng = np.random.default_rng(3)
    mean = (120 + 20 * rng.standard_normal((256, 256, 3))).astype(np.float32)
    ckpt.save(tmp_path / "pp" / "checkpoint.npz", params=st["params"], velocity=st["velocity"], mean=mean,
              meta=st["meta"])
    logs = []
    assert convert_main(["to-torchvision", str(tmp_path / "pp"), str(tmp_path / "pp.pth")], log=logs.append) == 0
    info = json.loads((tmp_path / "pp.json").read_text())
    crop = mean[16:240, 16:240].astype(np.float64)
    per_channel = crop.mean(axis=(0, 1))
    scale = np.float32(build_net(st["meta"]["config"]["model_text"], init_params=False)[0].data_layer.scale)
    err = (crop - per_channel) * float(scale)
    np.testing.assert_allclose(info["mean"], per_channel / 255, rtol=1e-12)
    assert info["per_pixel_mean"] and info["mean_error_max"] == pytest.approx(np.abs(err).max(), rel=1e-9)
    assert info["mean_error_rms"] == pytest.approx(np.sqrt((err ** 2).mean()), rel=1e-9)
    assert any("per-pixel mean" in l and f"{info['mean_error_max']:.4g}" in l for l in logs)
    # the exported weights with their normalisation compute our net with the per-channel mean
    exported = alexnet_like()
    exported.load_state_dict(torch.load(tmp_path / "pp.pth", weights_only=True))
    images = rng.integers(0, 256, (2, 224, 224, 3)).astype(np.uint8)
    net, _ = our_net(d / "run")
    want, _ = our_probs(net, per_channel.astype(np.float32), images)
    np.testing.assert_allclose(torch_probs(exported, images, info["mean"], info["std"])[0], want, atol=1e-5)


def _checkpoint_of(text, path, params=None):
    """A checkpoint of model ``text`` (structure checks read nothing else)."""
    return ckpt.save(path / "checkpoint.npz", params=params or {}, velocity={}, mean=np.zeros(3, np.float32),
                     meta={"config": {"model_text": text}})


def test_export_refuses_what_torchvision_cannot_run(tmp_path, capsys):
    text = tvw.model_text(CLASSES).replace("size = 224", "size = 256")
    _checkpoint_of(text, tmp_path / "big")
    assert convert_main(["to-torchvision", str(tmp_path / "big"), str(tmp_path / "o.pth")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "256x256 input gives a 7x7 pool5" in err and "only at a 224x224" in err
    from convnet.model_file import resolve_model
    _checkpoint_of(resolve_model("fmnist")[0], tmp_path / "small")
    assert convert_main(["to-torchvision", str(tmp_path / "small"), str(tmp_path / "o.pth")]) == 2
    err = capsys.readouterr().err
    assert "not torchvision's AlexNet" in err and err.count("\n") == 1
    assert not (tmp_path / "o.pth").exists()


def test_bad_state_dicts_are_one_line_errors_naming_file_and_key(imported, tmp_path, capsys):
    model, d = imported
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    cases = [
        ({k: v for k, v in state.items() if k != "classifier.4.bias"}, "no key 'classifier.4.bias'"),
        ({**state, "features.1.weight": state["features.0.bias"]}, "key 'features.1.weight' is not a parameter"),
        ({**state, "classifier.1.weight": state["classifier.1.weight"][:, :100]},
         "key 'classifier.1.weight' has shape (4096, 100), torchvision's AlexNet (with 10 classes) has (4096, 9216)"),
        ({**state, "features.3.weight": state["features.3.weight"].transpose(1, 2, 3, 0)},
         "key 'features.3.weight' has shape (64, 5, 5, 192)"),
        ({**state, "features.0.bias": np.full(64, np.nan, np.float32)}, "key 'features.0.bias' holds non-finite"),
    ]
    for bad, msg in cases:
        with pytest.raises(tvw.TorchvisionError, match="^here: " + re.escape(msg)):
            tvw.from_torchvision(bad, where="here")
    (tmp_path / "junk.pth").write_bytes(b"not a torch file" * 10)
    torch.save({"features.0.weight": torch.zeros(2)}, tmp_path / "small.pth")
    torch.save([1, 2], tmp_path / "list.pth")
    for name, msg in (("junk.pth", "cannot read"), ("small.pth", "key 'features.0.weight' has shape (2,), expected 4"),
                      ("list.pth", "holds a list, not a state dict"), ("none.pth", "not found")):
        assert convert_main(["from-torchvision", str(tmp_path / name), str(tmp_path / "o")]) == 2, name
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and msg in err and name in err, err
    assert not (tmp_path / "o").exists()


def test_an_existing_run_or_file_is_not_replaced_silently(imported, tmp_path, capsys):
    _, d = imported
    assert convert_main(["from-torchvision", str(d / "alexnet.pth"), str(d / "run")]) == 2
    assert "already holds a run" in capsys.readouterr().err
    (tmp_path / "x.pth").write_bytes(b"keep")
    assert convert_main(["to-torchvision", str(d / "run"), str(tmp_path / "x.pth")]) == 2
    assert "exists" in capsys.readouterr().err and (tmp_path / "x.pth").read_bytes() == b"keep"


def test_the_imported_run_resumes_and_evaluates(imported, tmp_path):
    """--resume trains from the imported weights (its per-channel mean through the in-memory loader's random crops
    and padding) and --eval-only evaluates them."""
    from convnet.train import run
    _, d = imported
    shutil.copytree(d / "run", tmp_path / "run")
    common = ["--dataset", "synthetic", "--synthetic-train", "4", "--synthetic-test", "2", "--batch-size", "2",
              "--device", "cpu", "--no-plots"]
    res = run(["--resume", str(tmp_path / "run"), "--max-steps", "1", "--crop-pad", "2", *common], log=lambda *a: None)
    assert res["status"] == "max_steps"
    assert ckpt.load(tmp_path / "run")["meta"]["step"] == 1
    res = run(["--eval-only", "--resume", str(tmp_path / "run"), "--eval-crops", "10", *common], log=lambda *a: None)
    assert res["status"] == "eval" and np.isfinite(res["test_loss"])


def test_a_prepared_directory_gives_the_imported_run_its_dataset_and_names(imported, tmp_path, capsys):
    model, d = imported
    prepare("imagenet", make_tree(tmp_path / "src"), tmp_path / "prep", size=32, shard_size=8, jobs=1,
            progress=False, log=lambda *a: None)
    # the tiny set has 3 classes, the weights 10: refused before anything is written
    assert convert_main(["from-torchvision", str(d / "alexnet.pth"), str(tmp_path / "o"), "--data",
                         str(tmp_path / "prep")]) == 2
    assert "has 3 classes, the weights of" in capsys.readouterr().err and not (tmp_path / "o").exists()
    torch.save(alexnet_like(classes=3, seed=1).state_dict(), tmp_path / "three.pth")
    assert convert_main(["from-torchvision", str(tmp_path / "three.pth"), str(tmp_path / "run"), "--data",
                         str(tmp_path / "prep")], log=lambda *a: None) == 0
    config = ckpt.load(tmp_path / "run")["meta"]["config"]
    assert config["dataset"] == "imagenet" and config["data"] == str(tmp_path / "prep")
    pred = Predictor(tmp_path / "run", device="cpu")
    assert pred.classes == ["n001 red thing", "n002 green thing", "n003 blue thing, bluish"]
    assert pred.image_hw == (32, 32)  # the prepared size: too small for a 224 input, which predict says
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(ValueError, match="the images are 32x32, smaller than the model's 224x224 input"):
        pred.probabilities([tmp_path / "a.png"])
