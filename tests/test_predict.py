"""python -m convnet.predict: a run's top classes for picture files, prepared as the run's dataset was, against the
evaluation's own path (a prepared ImageNet-style set) and an independent computation (Fashion-MNIST-shaped)."""
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from convnet import checkpoint as ckpt
from convnet.data import FASHION_CLASSES, PreparedLoader, load_prepared
from convnet.data.prepare import prepare
from convnet.model_file import build_net, resolve_model
from convnet.predict import Predictor, main as predict_main
from convnet.training.evaluation import evaluate
from convnet.training.ranks import Ranks

sys.path.insert(0, str(Path(__file__).parent))
from imagefolder_fixture import make_tree  # noqa: E402
from models import TINY_RGB  # noqa: E402


def write_run(path, text, *, mean, dataset, data=None, seed=0, boost=1.0):
    """A run directory holding a checkpoint of ``text`` with random parameters (the fc weights times ``boost``, so
    that the probabilities are far from uniform)."""
    net, _ = build_net(text, "model.cfg", device="numpy", seed=seed)
    params = {k: (v * boost if k.endswith("/w") and k.startswith("fc") else v) for k, v in net.state_dict().items()}
    meta = {"config": {"model_text": text, "dataset": dataset, "data": None if data is None else str(data)}}
    ckpt.save(Path(path) / "checkpoint.npz", params=params, velocity={}, mean=mean, meta=meta)
    net.load_state_dict(params)
    return net


def reference_probs(net, x):
    """``net`` on (N, H, W, C) float32 inputs, (N, classes)."""
    return net.forward(np.ascontiguousarray(x.transpose(3, 1, 2, 0))).T


# --- Fashion-MNIST-shaped ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fmnist_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("fm")
    rng = np.random.default_rng(0)
    mean = rng.uniform(0, 255, (28, 28, 1)).astype(np.float32)
    net = write_run(d / "run", resolve_model("fmnist")[0], mean=mean, dataset="fashion-mnist", boost=2.0)
    images = rng.integers(0, 256, (4, 28, 28)).astype(np.uint8)
    paths = []
    for i, a in enumerate(images):
        paths.append(d / f"item{i}.png")
        Image.fromarray(a, "L").save(paths[-1])
    return d, net, mean, images, paths


def test_fashion_mnist_pictures_get_the_nets_probabilities(fmnist_run):
    d, net, mean, images, paths = fmnist_run
    scale = np.float32(net.data_layer.scale)
    x = (images[..., None].astype(np.float32) - mean) * scale
    want = reference_probs(net, x)
    assert want.max() > 0.5  # not near-uniform: a wrong mean, scale or layout would show
    pred = Predictor(d / "run", device="cpu")
    np.testing.assert_allclose(pred.probabilities(paths), want, rtol=1e-5, atol=1e-6)
    # ten views of a 28x28 image in a 28x28 input: five times the image, five times its mirror image (minus the
    # mirrored mean: an in-memory dataset's views take the mean's same view)
    xm = (images[:, :, ::-1, None].astype(np.float32) - mean[:, ::-1]) * scale
    want10 = (reference_probs(net, x) + reference_probs(net, xm)) / 2
    np.testing.assert_allclose(pred.probabilities(paths, crops=10), want10, rtol=1e-5, atol=1e-6)
    top = pred.top(paths, 5)
    for row, p in zip(top, want):
        order = np.argsort(-p)[:5]
        assert [r[0] for r in row] == list(order)
        assert [r[1] for r in row] == [FASHION_CLASSES[i] for i in order]
        np.testing.assert_allclose([r[2] for r in row], p[order], rtol=1e-5)


def test_a_colour_picture_of_another_size_is_made_grey_and_fitted(fmnist_run, tmp_path):
    d, net, mean, _, _ = fmnist_run
    rng = np.random.default_rng(5)
    rgb = rng.integers(0, 256, (84, 56, 3)).astype(np.uint8)  # 56 wide: the centre 56x56, then a third of it
    Image.fromarray(rgb).save(tmp_path / "wide.png")
    grey = Image.fromarray(rgb).convert("L").crop((0, 14, 56, 70)).resize((28, 28), Image.BOX)
    x = (np.asarray(grey, np.float32)[None, :, :, None] - mean) * np.float32(net.data_layer.scale)
    np.testing.assert_allclose(Predictor(d / "run", device="cpu").probabilities([tmp_path / "wide.png"]),
                               reference_probs(net, x), rtol=1e-5, atol=1e-6)


def test_the_command_prints_the_top_classes_with_names(fmnist_run, capsys):
    d, net, mean, images, paths = fmnist_run
    assert predict_main([str(d / "run"), str(paths[0]), str(paths[1]), "--top", "3", "--device", "cpu"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 8 and out[0] == str(paths[0]) and out[4] == str(paths[1])
    top = Predictor(d / "run", device="cpu").top(paths[:2], 3)
    for line, (i, name, p) in zip(out[1:4] + out[5:8], top[0] + top[1]):
        assert line == f"  {p:8.2%}  {name}  ({i})"


def test_an_unreadable_picture_is_a_one_line_error_naming_it(fmnist_run, tmp_path, capsys):
    d, _, _, _, paths = fmnist_run
    (tmp_path / "notes.jpg").write_text("not a picture")
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 40), np.uint8)).save(tmp_path / "cut.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "cut.png").read_bytes()[:800])
    for bad in ("notes.jpg", "cut.png", "missing.png"):
        assert predict_main([str(d / "run"), str(paths[0]), str(tmp_path / bad)]) == 2
        cap = capsys.readouterr()
        assert cap.out == ""  # every file is read before anything is printed
        assert cap.err.startswith(f"error: cannot read image '{tmp_path / bad}': ") and cap.err.count("\n") == 1
    assert predict_main([str(tmp_path / "norun"), str(paths[0])]) == 2
    assert capsys.readouterr().err == f"error: checkpoint '{tmp_path / 'norun'}' not found\n"
    assert predict_main([str(d / "run"), str(paths[0]), "--device", "gpu7"]) == 2
    assert capsys.readouterr().err.startswith("error: --device gpu7: unknown device 'gpu7'")


def test_a_run_without_class_names_shows_indices(tmp_path, capsys):
    text = TINY_RGB
    rng = np.random.default_rng(2)
    write_run(tmp_path / "run", text, mean=np.zeros((24, 24, 3), np.float32), dataset="synthetic")
    Image.fromarray(rng.integers(0, 256, (24, 24, 3)).astype(np.uint8)).save(tmp_path / "a.png")
    assert predict_main([str(tmp_path / "run"), str(tmp_path / "a.png"), "--device", "numpy"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and sorted(l.split()[-1] for l in lines[1:]) == ["0", "1", "2"]
    assert all("class " in l for l in lines[1:])


# --- a prepared ImageNet-style directory ---------------------------------------------------------------------------
SIZE = 32


@pytest.fixture(scope="module")
def prepared_run(tmp_path_factory):
    src = make_tree(tmp_path_factory.mktemp("src"))
    dst = tmp_path_factory.mktemp("prep") / "out"
    prepare("imagenet", src, dst, size=SIZE, shard_size=4, jobs=1, progress=False, log=lambda *a: None)
    ds = load_prepared(dst)
    run = tmp_path_factory.mktemp("runs") / "tiny"
    net = write_run(run, TINY_RGB, mean=ds.mean_image(), dataset="imagenet", data=dst, boost=40.0)
    # the val images as the prepared directory holds them, as lossless pictures: prepare leaves a SIZE x SIZE
    # picture as it is, so predict sees exactly the evaluation's pixels
    paths = []
    for i in range(len(ds.test_y)):
        paths.append(dst.parent / f"val{i}.png")
        Image.fromarray(np.asarray(ds.test_x[i])).save(paths[-1])
    return run, net, ds, paths, src


@pytest.mark.parametrize("crops", [1, 10])
def test_prepared_pictures_get_the_evaluations_probabilities(prepared_run, crops):
    run, net, ds, paths, _ = prepared_run
    loader = PreparedLoader(ds.test_x, ds.test_y, 4, train=False, out_hw=net.data_layer.size, mean=ds.mean_image(),
                            scale=net.data_layer.scale, device=net.device, views=crops)
    *_, kept = evaluate(net, loader, net.device, Ranks(None), mirror=False, keep_probs=len(paths))
    want = np.concatenate([p for p, _ in kept], axis=1).T
    assert want.max() > 0.5
    got = Predictor(run, device="numpy").probabilities(paths, crops)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_prepared_class_names_are_the_synset_words(prepared_run, tmp_path, capsys):
    run, net, ds, paths, src = prepared_run
    manifest_names = {"n001": "n001 red thing", "n002": "n002 green thing", "n003": "n003 blue thing, bluish"}
    pred = Predictor(run, device="numpy")
    assert pred.classes == [manifest_names[w] for w in ("n001", "n002", "n003")]
    # a source picture of another shape (60x30): shorter side to the prepared size, centre square, as prepare does
    pic = sorted((src / "val").glob("*.JPEG"))[1]
    assert predict_main([str(run), str(pic), "--device", "numpy", "--eval-crops", "10"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == str(pic) and len(lines) == 4
    rows = [re.fullmatch(r" +[0-9.]+%  (.+)  \((\d)\)", l).groups() for l in lines[1:]]
    assert {name for name, _ in rows} == set(manifest_names.values())
    assert all(name == pred.classes[int(i)] for name, i in rows)
    # the prepared directory moved: the names come from --data, or are indices without it
    moved = tmp_path / "moved"
    import shutil
    shutil.copytree(Path(ckpt.load(run)["meta"]["config"]["data"]), moved)
    st = ckpt.load(run)
    st["meta"]["config"]["data"] = str(tmp_path / "gone")
    ckpt.save(tmp_path / "r2" / "checkpoint.npz", params=st["params"], velocity={}, mean=st["mean"],
              meta=st["meta"])
    assert Predictor(tmp_path / "r2", device="numpy").classes is None
    assert predict_main([str(tmp_path / "r2"), str(paths[0]), "--device", "numpy"]) == 0
    cap = capsys.readouterr()
    assert "(give --data DIR)" in cap.err and "class 0" in cap.out
    assert Predictor(tmp_path / "r2", device="numpy", data=moved).classes == pred.classes
