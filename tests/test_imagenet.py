"""ImageNet / ImageFolder: prepare once (shards, manifest, mean, PCA), the paper's augmentation as pure functions,
the prepared reader and loader, and a few training steps from a prepared tiny tree."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from convnet.data import DataError, PreparedLoader, augment, jpeg, load_dataset, load_prepared
from convnet.data.prepare import main as prepare_main, prepare, resize_centre
from convnet.data.jpeg import decode
from convnet.data.shards import Shard, ShardImages

sys.path.insert(0, str(Path(__file__).parent))
from helpers import subprocess_env  # noqa: E402
from imagefolder_fixture import make_tree  # noqa: E402
from models import TINY_RGB  # noqa: E402

SIZE = 32


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_tree(tmp_path_factory.mktemp("src"))


@pytest.fixture(scope="module")
def prepared(tree, tmp_path_factory):
    dst = tmp_path_factory.mktemp("prep") / "out"
    logs = []
    m = prepare("imagenet", tree, dst, size=SIZE, shard_size=4, jobs=2, progress=False, log=logs.append)
    return dst, m, logs


# --- prepare -------------------------------------------------------------------------------------------------
def test_manifest_counts_skips_and_checksums(prepared):
    dst, m, logs = prepared
    tr, va = m["splits"]["train"], m["splits"]["val"]
    assert tr["per_class"] == {"n001": 7, "n002": 6, "n003": 5}  # 5 + grayscale + CMYK; 5 + PNG; 7 - 2 bad
    assert tr["images"] == 18 and va["images"] == 6 and va["per_class"] == {"n001": 2, "n002": 2, "n003": 2}
    assert tr["skipped_count"] == 2 and va["skipped_count"] == 0
    assert sorted(p for p, _ in tr["skipped"]) == ["train/n003/n003_garbage.JPEG", "train/n003/n003_truncated.JPEG"]
    assert any("truncated" in why for _, why in tr["skipped"])
    assert sum(f"skipped train/n003/n003_{k}.JPEG" in l for l in logs for k in ("garbage", "truncated")) == 2
    assert [c["name"] for c in m["classes"]] == ["red thing", "green thing", "blue thing, bluish"]
    assert len(tr["shards"]) == 5 and len(va["shards"]) == 2  # 20 listed files / 4 (bad ones skipped inside)
    for s in tr["shards"] + va["shards"]:
        data = (dst / s["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == s["sha256"] and len(data) == s["bytes"]
    assert not list(dst.glob("*.tmp-*"))


def test_flat_val_labels_through_the_synset_list(prepared):
    dst, m, _ = prepared
    ds = load_dataset("imagenet", dst)
    assert ds.test_y.tolist() == [0, 1, 2, 0, 1, 2]  # ground truth 2,3,1,... through synsets.txt (n003, n001, n002)
    assert ds.classes == ["red thing", "green thing", "blue thing"]
    x = ds.test_x[:6]
    assert x.shape == (6, SIZE, SIZE, 3) and x.dtype == np.uint8
    dominant = x.reshape(6, -1, 3).mean(1).argmax(1)  # the generated images are red, green, blue by class
    assert dominant.tolist() == ds.test_y.tolist()


def _devkit_meta(path, synsets, extra_inner=True):
    """A devkit-style meta.mat: the leaf synsets (num_children 0) with ILSVRC2012_IDs 1..K in ``synsets``' order, plus
    an inner WordNet node (id K+1, with children) that is not a class."""
    scipy_io = pytest.importorskip("scipy.io")
    rows = [(i + 1, wnid, name, 0) for i, (wnid, name) in enumerate(synsets)]
    if extra_inner:
        rows.append((len(rows) + 1, "n999", "a thing", 3))
    dt = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")]
    scipy_io.savemat(str(path), {"synsets": np.array(rows, dtype=dt)})


def test_devkit_meta_mat_orders_the_integer_ground_truth(tree, tmp_path):
    """The ILSVRC2012 devkit layout: flat val + ILSVRC2012_validation_ground_truth.txt + devkit/data/meta.mat (no
    synsets.txt): meta.mat's leaf synsets in ILSVRC2012_ID order give the labels and the class names."""
    from imagefolder_fixture import SYNSETS

    from convnet.data.imagenet import read_devkit_meta, scan_source

    src = tmp_path / "src"
    shutil.copytree(tree, src)
    (src / "synsets.txt").unlink()
    (src / "devkit" / "data").mkdir(parents=True)
    shutil.move(str(src / "ILSVRC2012_validation_ground_truth.txt"), src / "devkit" / "data")
    _devkit_meta(src / "devkit" / "data" / "meta.mat", SYNSETS)
    assert read_devkit_meta(src / "devkit" / "data" / "meta.mat") == SYNSETS  # the inner node is not a class
    tree_ = scan_source(src)
    val = sorted(tree_.items["val"])
    assert [label for _, label in val] == [0, 1, 2, 0, 1, 2]
    assert tree_.names == ["red thing", "green thing", "blue thing, bluish"]
    bad = tmp_path / "bad.mat"
    scipy_io = pytest.importorskip("scipy.io")
    scipy_io.savemat(str(bad), {"other": np.zeros(3)})
    with pytest.raises(DataError, match="not an ILSVRC devkit meta.mat"):
        read_devkit_meta(bad)


def test_bad_inputs_converted(prepared):
    dst, _, _ = prepared
    names = {}
    for p in sorted(dst.glob("train-*.shard")):
        sh = Shard(p)
        for i, n in enumerate(sh.meta["names"]):
            names[n] = decode(sh.jpeg(i))
    g = names["train/n001/n001_gray.JPEG"].astype(int)
    assert g.shape == (SIZE, SIZE, 3) and np.abs(g[..., 0] - g[..., 1]).max() <= 3  # grey stays grey (JPEG noise)
    cmyk = names["train/n001/n001_cmyk.JPEG"].reshape(-1, 3).mean(0)
    assert cmyk[0] > 150 and cmyk[1] < 90 and cmyk[2] < 90  # the red it was made from
    png = names["train/n002/n002_png.JPEG"].reshape(-1, 3).mean(0)
    assert png[1] > 150 and png[0] < 90  # a PNG named .JPEG, read as a PNG


def test_resize_is_shorter_side_then_centre_crop():
    # 64 wide x 32 high: columns 0-15 red, 16-47 green, 48-63 blue -> the centre square is all green
    a = np.zeros((32, 64, 3), np.uint8)
    a[:, :16, 0] = 255
    a[:, 16:48, 1] = 255
    a[:, 48:, 2] = 255
    out = np.asarray(resize_centre(Image.fromarray(a), 16))
    assert out.shape == (16, 16, 3) and (out == [0, 255, 0]).all()
    # area averaging when shrinking: 2x2 blocks of a 0/255 checkerboard average to 127.5
    c = (np.indices((32, 32)).sum(0) % 2 * 255).astype(np.uint8)
    assert np.abs(np.asarray(resize_centre(Image.fromarray(c).convert("RGB"), 16)).astype(int) - 128).max() <= 1
    # same size: an integer crop, no resampling
    b = np.random.default_rng(0).integers(0, 256, (20, 27, 3), dtype=np.uint8)
    assert (np.asarray(resize_centre(Image.fromarray(b), 20)) == b[:, 3:23]).all()


def test_mean_and_eigenvectors_match_numpy(prepared):
    dst, m, _ = prepared
    x = ShardImages(sorted(dst.glob("train-*.shard")), (SIZE, SIZE))[:].astype(np.float64)
    st = np.load(dst / "stats.npz")
    np.testing.assert_allclose(st["mean"], x.mean(0), rtol=0, atol=1e-4)
    cov = np.cov(x.reshape(-1, 3), rowvar=False, bias=True)
    val, vec = np.linalg.eigh(cov)
    np.testing.assert_allclose(st["eigvals"], val[::-1], rtol=1e-9)
    for k in range(3):  # eigenvectors up to sign
        assert abs(abs(st["eigvecs"][:, k] @ vec[:, 2 - k]) - 1) < 1e-9
    assert int(st["images"]) == m["stats"]["images"] == 18


def test_resume_rewrites_only_missing_shards_identically(prepared, tmp_path):
    src_dst, m, _ = prepared
    dst = tmp_path / "copy"
    shutil.copytree(src_dst, dst)
    before = {p.name: p.read_bytes() for p in dst.glob("*.shard")}
    (dst / "train-00002.shard").unlink()  # a shard never finished ...
    (dst / "train-00002.shard.tmp-4242").write_bytes(b"half a shard")  # ... and the temp file of the killed run
    (dst / "manifest.json").unlink()
    logs = []
    m2 = prepare("imagenet", m["source"], dst, size=SIZE, shard_size=4, jobs=1, progress=False, log=logs.append)
    assert "1 shards to write (6 already done)" in logs[0]
    assert {p.name: p.read_bytes() for p in dst.glob("*.shard")} == before
    assert not list(dst.glob("*.tmp-*")) and m2["splits"] == m["splits"]
    logs.clear()
    prepare("imagenet", m["source"], dst, size=SIZE, shard_size=4, jobs=1, progress=False, log=logs.append)
    assert "already prepared" in logs[0]
    with pytest.raises(DataError, match="other quality"):
        prepare("imagenet", m["source"], dst, size=SIZE, quality=80, shard_size=4, progress=False, log=logs.append)


def test_source_errors(tree, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(tree, src)
    (src / "train" / "n004").mkdir()
    with pytest.raises(DataError, match=r"n004: empty class"):
        prepare("imagenet", src, tmp_path / "a", progress=False)
    (src / "train" / "n004").rmdir()
    (src / "ILSVRC2012_validation_ground_truth.txt").unlink()
    assert prepare_main(["imagenet", str(src), str(tmp_path / "b"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no ground-truth file" in err and err.count("\n") == 1
    with pytest.raises(DataError, match="not a prepared dataset"):
        load_dataset("imagenet", tmp_path)


# --- augmentation (pure functions) ---------------------------------------------------------------------------
def test_crop_flip_and_ten_crops_geometry():
    img = np.arange(6 * 7 * 3).reshape(6, 7, 3)
    assert (augment.crop(img, 1, 2, (4, 3)) == img[1:5, 2:5]).all()
    assert augment.centre_offset((6, 7), (4, 3)) == (1, 2)
    assert (augment.hflip(img)[:, 0] == img[:, 6]).all()
    v = augment.ten_crops(img, (4, 3))
    assert v.shape == (10, 4, 3, 3)
    expect = [img[0:4, 0:3], img[0:4, 4:7], img[2:6, 0:3], img[2:6, 4:7], img[1:5, 2:5]]
    for k, e in enumerate(expect):
        assert (v[k] == e).all() and (v[k + 5] == e[:, ::-1]).all()
    with pytest.raises(ValueError):
        augment.crop(img, 3, 0, (4, 3))


def test_train_view_composes_crop_flip_mean_lighting():
    rng0 = np.random.default_rng(5)
    img = rng0.integers(0, 256, (10, 12, 3), dtype=np.uint8)
    mean = rng0.random((8, 8, 3)).astype(np.float32) * 255
    val, vec = augment.pca(rng0.random((500, 3)) * 255)
    for index in range(8):
        (oy, ox), f, a = augment.train_params(augment.image_rng(1, 2, index), (10, 12), (8, 8))
        x = img[oy:oy + 8, ox:ox + 8]
        x = x[:, ::-1] if f else x
        want = x.astype(np.float32) - mean + (vec @ (a * np.sqrt(val))).astype(np.float32)
        got = augment.train_view(img, augment.image_rng(1, 2, index), (8, 8), mean=mean, eigvals=val, eigvecs=vec)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


def test_pca_lighting_statistics():
    val = np.array([15000.0, 1400.0, 300.0])
    vec = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))[0]
    rng = np.random.default_rng(1)
    off = np.stack([augment.lighting_offset(augment.lighting_alphas(rng), val, vec) for _ in range(20000)])
    want = 0.1 ** 2 * vec @ np.diag(val) @ vec.T  # a ~ N(0, 0.1): cov = 0.01 * V diag(lambda) V^T
    assert np.abs(off.mean(0)).max() < 4 * np.sqrt(want.diagonal().max() / 20000)
    np.testing.assert_allclose(np.cov(off, rowvar=False), want, rtol=0, atol=0.05 * np.abs(want).max())


# --- the prepared reader and loader --------------------------------------------------------------------------
def _loader(ds, bs, prefetch, train=True):
    return PreparedLoader(ds.train_x if train else ds.test_x, ds.train_y if train else ds.test_y, bs, train=train,
                          out_hw=(24, 24), mean=ds.mean_image(), eig=(ds.eigvals, ds.eigvecs),
                          lighting=0.1 if train else 0.0, flip=True, scale=1 / 255, seed=7, prefetch=prefetch)


def test_batches_deterministic_and_per_image(prepared):
    ds = load_dataset("imagenet", prepared[0])
    a = list(_loader(ds, 4, 0).epoch(1))
    b = list(_loader(ds, 4, 3).epoch(1))
    assert len(a) == 4 and all((x1 == x2).all() and (y1 == y2).all() for (x1, y1), (x2, y2) in zip(a, b))
    assert a[0][0].shape == (3, 24, 24, 4) and a[0][0].dtype == np.float32
    # an image's view depends on (seed, epoch, image), not on the batch it lands in
    ld2 = _loader(ds, 2, 0)
    order = ld2.order(1)
    by_image = {int(order[2 * k + j]): x[..., j] for k, (x, _) in enumerate(ld2.epoch(1)) for j in range(2)}
    for k, (x, _) in enumerate(a):
        for j in range(4):
            assert (by_image[int(order[4 * k + j])] == x[..., j]).all()
    assert not (list(_loader(ds, 4, 0).epoch(2))[0][0] == a[0][0]).all()


def test_eval_batch_is_centre_crop_minus_centre_of_mean(prepared):
    ds = load_dataset("imagenet", prepared[0])
    x, y = next(iter(_loader(ds, 6, 0, train=False).epoch(0)))
    want = (ds.test_x[:6, 4:28, 4:28].astype(np.float32) - ds.mean_image()[4:28, 4:28]) * np.float32(1 / 255)
    np.testing.assert_allclose(x, want.transpose(3, 1, 2, 0), rtol=0, atol=1e-6)
    assert (y == ds.test_y).all()


@pytest.mark.parametrize("device", ["numpy", "emu"])
def test_train_end_to_end_on_prepared_data(prepared, tmp_path, device):
    cfg = tmp_path / "tiny-rgb.cfg"
    cfg.write_text(TINY_RGB)
    out = tmp_path / "run"
    env = subprocess_env()
    r = subprocess.run([sys.executable, "-m", "convnet.train", "--model", str(cfg), "--data", str(prepared[0]),
                        "--device", device, "--epochs", "2", "--out", str(out), "--no-progress", "--no-plots"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    log = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    epochs = [e for e in log if "test_error" in e]
    assert len(epochs) == 2 and all(np.isfinite(e["train_loss"]) for e in epochs)
    assert "imagenet (18 train / 6 test images)" in r.stdout
    assert f"JPEG decoder: {jpeg.describe()}" in r.stderr  # the engine the run decodes with, said once


# --- 10-crop evaluation ---------------------------------------------------------------------------------------
def test_ten_crop_views_through_the_loaders(prepared):
    ds = load_dataset("imagenet", prepared[0])
    ld = PreparedLoader(ds.test_x, ds.test_y, 4, train=False, out_hw=(24, 24), mean=ds.mean_image(), scale=1 / 255,
                        seed=7, prefetch=2, views=10)
    items = list(ld.epoch(0))
    assert len(items) == 10 * len(ld) == 20
    mean_c = ds.mean_image()[4:28, 4:28]  # the centre of the full mean, for every view (as in training)
    offsets = [(0, 0), (0, 8), (8, 0), (8, 8), (4, 4)]
    for k, (x, y) in enumerate(items):
        b, v = divmod(k, 10)
        oy, ox = offsets[v % 5]
        imgs = ds.test_x[4 * b:4 * b + 4]
        want = imgs[:, oy:oy + 24, ox:ox + 24]
        if v >= 5:
            want = want[:, :, ::-1]
        np.testing.assert_array_equal(want, np.stack([augment.ten_crops(i, (24, 24))[v] for i in imgs]))
        want = (want.astype(np.float32) - mean_c) * np.float32(1 / 255)
        np.testing.assert_allclose(x, want.transpose(3, 1, 2, 0), rtol=0, atol=1e-6)
        assert (y == ds.test_y[4 * b:4 * b + 4]).all()
    # the in-memory loader: the mean image goes through the same crop and flip as the image
    from convnet.data import Loader
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (5, 9, 11, 3), dtype=np.uint8)
    mean = rng.random((9, 11, 3), dtype=np.float32) * 255
    ld = Loader(imgs, np.arange(5, dtype=np.int32), 5, train=False, out_hw=(6, 7), mean=mean, prefetch=0, views=10)
    got = [x for x, _ in ld.epoch(0)]
    for v, x in enumerate(got):
        want = np.stack([augment.ten_crops(i.astype(np.float32) - mean, (6, 7))[v] for i in imgs])
        np.testing.assert_allclose(x, want.transpose(3, 1, 2, 0), rtol=0, atol=1e-4)
    with pytest.raises(ValueError):
        Loader(imgs, np.arange(5, dtype=np.int32), 5, train=True, out_hw=(6, 7), mean=mean, views=10)


def _tiny_cfg(tmp_path):
    cfg = tmp_path / "tiny-rgb.cfg"
    cfg.write_text(TINY_RGB)
    return cfg


def test_ten_crop_evaluation_averages_the_softmax_of_the_views(prepared, tmp_path):
    from convnet.trainer import Trainer
    from convnet.train import make_config, parse_args
    base = ["--model", str(_tiny_cfg(tmp_path)), "--data", str(prepared[0]), "--device", "numpy", "--no-progress",
            "--no-plots", "--out", str(tmp_path / "r"), "--batch-size", "4", "--prefetch", "0"]
    tr = Trainer(make_config(parse_args(base + ["--eval-crops", "10"])))
    loss, e1, e5, kept = tr.evaluate(keep_probs=100)
    assert e5 is None  # 3 classes: no top-5
    ld, net = tr.test_loader, tr.net
    n = wrong = 0
    nll = 0.0
    probs = []
    for b in range(len(ld)):
        ps = [net.forward(ld.make_batch(0, b, None, v)[0]).copy() for v in ld.view_list()]
        p = np.mean(np.stack(ps), axis=0)
        y = ld.make_batch(0, b)[1]
        wrong += int((p.argmax(0) != y).sum())
        nll += float(-np.log(p[y, np.arange(len(y))]).sum())
        n += len(y)
        probs.append(p)
    np.testing.assert_allclose(np.concatenate([k[0] for k in kept], axis=1), np.concatenate(probs, axis=1),
                               rtol=1e-5, atol=1e-7)
    assert e1 == wrong / n and abs(loss - nll / n) < 1e-5
    # --eval-crops 2 is --multiview: the centre crop and its mirror, averaged
    t2 = Trainer(make_config(parse_args(base + ["--eval-crops", "2"])))
    tm = Trainer(make_config(parse_args(base + ["--multiview"])))
    assert t2.evaluate()[:3] == tm.evaluate()[:3]
    with pytest.raises(Exception, match="eval-crops"):
        make_config(parse_args(base + ["--eval-crops", "5"]))


def test_eval_only_with_ten_crops(prepared, tmp_path):
    out = tmp_path / "run"
    env = subprocess_env()
    common = ["--data", str(prepared[0]), "--device", "numpy", "--out", str(out), "--no-progress", "--no-plots"]
    r = subprocess.run([sys.executable, "-m", "convnet.train", "--model", str(_tiny_cfg(tmp_path)), "--epochs", "1",
                        "--eval-crops", "10", *common], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-m", "convnet.train", "--eval-only", "--eval-crops", "10", *common],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "test set: loss" in r.stdout and "top-1 error" in r.stdout


# --- decoding in worker processes ----------------------------------------------------------------------------
def _wloader(ds, workers, train=True, views=1, cls=PreparedLoader, bs=4):
    return cls(ds.train_x if train else ds.test_x, ds.train_y if train else ds.test_y, bs, train=train,
               out_hw=(24, 24), mean=ds.mean_image(), eig=(ds.eigvals, ds.eigvecs), lighting=0.1 if train else 0.0,
               flip=True, scale=1 / 255, seed=7, prefetch=2, workers=workers, views=views)


def _shm(pid):
    return sorted(p.name for p in Path("/dev/shm").glob(f"convnet-{pid}-*")) if Path("/dev/shm").is_dir() else []


def _gone(pid):
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] in ("Z", "X")
    except (FileNotFoundError, IndexError):
        return True


DECODED = {}  # decoder -> the batches of test_worker_batches_identical_for_any_worker_count


@pytest.mark.parametrize("decoder", jpeg.ENGINES)
def test_worker_batches_identical_for_any_worker_count(prepared, decoder):
    import multiprocessing
    if decoder not in jpeg.available():
        pytest.skip("simplejpeg is not installed")
    ds = load_prepared(prepared[0], decoder=decoder)
    assert ds.train_x.decoder == ds.test_x.decoder == decoder
    ref = None
    for w in (0, 1, 2):
        got = list(_wloader(ds, w).epoch(1)) + list(_wloader(ds, w, train=False, views=10).epoch(0))
        got += list(_wloader(ds, w, bs=5).epoch(2, start=1))  # a resumed epoch
        assert len(got) == 4 + 20 + 2
        if ref is None:
            ref = got
        for (x1, y1), (x2, y2) in zip(ref, got):
            assert x1.dtype == x2.dtype == np.float32 and x1.shape == x2.shape and x1.flags.c_contiguous
            assert x1.tobytes() == x2.tobytes() and (y1 == y2).all()
    assert not multiprocessing.active_children() and not _shm(os.getpid())
    DECODED[decoder] = ref
    if len(DECODED) == 2:  # the two engines: the same views, pixels within the decoders' tolerance (scale 1/255)
        for (x1, y1), (x2, y2) in zip(*DECODED.values()):
            assert np.abs(x1 - x2).max() <= jpeg.TOLERANCE / 255 + 1e-6 and (y1 == y2).all()


def test_host_layout_equals_the_device_path(prepared):
    """The fused host path (staging -> (x - mean + light) * scale, row chunks) and the GPU path (uint8 CHWN up, the
    float work there: here run on NumPy) give the same bits, in float32 and float64."""
    ds = load_dataset("imagenet", prepared[0])
    for dtype in (np.float32, np.float64):
        for train, views in ((True, 1), (False, 1), (False, 10)):
            ld = PreparedLoader(ds.train_x, ds.train_y, 4, train=train, out_hw=(24, 24), mean=ds.mean_image(),
                                eig=(ds.eigvals, ds.eigvecs), lighting=0.1 if train else 0.0, flip=True,
                                scale=1 / 255, seed=3, prefetch=0, dtype=dtype, views=views)
            ld.CHUNK_BYTES = 5000  # several row chunks, the last one short
            for v in ld.view_list():
                x, y = ld.make_batch(2, 1, None, v)
                x2, y2 = ld._finish(*ld._host_part(2, 1, None, v))
                assert x.dtype == x2.dtype == dtype and x.tobytes() == x2.tobytes() and (y == y2).all()


def test_workers_persist_across_epochs_and_close(prepared):
    import multiprocessing
    ds = load_dataset("imagenet", prepared[0])
    want = [list(_wloader(ds, 0).epoch(e)) for e in (1, 2, 3)]
    with _wloader(ds, 2) as ld:
        assert list(ld.epoch(1))[2][0].tobytes() == want[0][2][0].tobytes()
        pids = sorted(p.pid for p in multiprocessing.active_children())
        assert len(pids) == 2 and pids == sorted(ld._pool.pids) and _shm(os.getpid())
        it = ld.epoch(2)
        next(it)
        it.close()  # left early: jobs still in flight; their slots come back during the next epoch
        got = list(ld.epoch(3))
        assert sorted(p.pid for p in multiprocessing.active_children()) == pids  # the same processes
        assert [x.tobytes() for x, _ in got] == [x.tobytes() for x, _ in want[2]]
    assert not multiprocessing.active_children() and all(_gone(p) for p in pids) and not _shm(os.getpid())
    assert [x.tobytes() for x, _ in ld.epoch(2)] == [x.tobytes() for x, _ in want[1]]  # a new pool after close
    ld.close()
    assert not multiprocessing.active_children()


class _Failing(PreparedLoader):
    def host_batch(self, epoch, b, order=None, view=None, out=None):
        if b == 2:
            raise ValueError("broken image")
        return super().host_batch(epoch, b, order, view, out)


def test_workers_shut_down_on_errors_and_early_close(prepared):
    import multiprocessing
    ds = load_dataset("imagenet", prepared[0])
    it = _wloader(ds, 2, cls=_Failing).epoch(0)
    next(it)
    pids = [p.pid for p in multiprocessing.active_children()]
    assert len(pids) == 2 and _shm(os.getpid())
    with pytest.raises(DataError, match="broken image"):
        list(it)
    assert not multiprocessing.active_children() and all(_gone(p) for p in pids) and not _shm(os.getpid())
    ld = _wloader(ds, 2)
    it = ld.epoch(0)
    next(it)
    it.close()  # the consumer stops in the middle of the epoch: the workers wait for the next one
    assert len(multiprocessing.active_children()) == 2
    del it, ld  # a loader that is garbage-collected stops its workers
    assert not multiprocessing.active_children() and not _shm(os.getpid())


CTRL_C = """
import multiprocessing, os, sys, time
from convnet.data import load_dataset, PreparedLoader
if __name__ == "__main__":
    ds = load_dataset("imagenet", sys.argv[1])
    ld = PreparedLoader(ds.train_x, ds.train_y, 2, train=True, out_hw=(24, 24), mean=ds.mean_image(),
                        eig=(ds.eigvals, ds.eigvecs), lighting=0.1, flip=True, workers=2, prefetch=1)
    for k, batch in enumerate(ld.epoch(0)):
        if k == 0:
            print(os.getpid(), *[p.pid for p in multiprocessing.active_children()], flush=True)
            time.sleep(60)  # Ctrl-C arrives here
"""


def test_workers_shut_down_on_ctrl_c(prepared, tmp_path):
    import signal
    script = tmp_path / "ctrl_c.py"
    script.write_text(CTRL_C)
    env = subprocess_env()
    p = subprocess.Popen([sys.executable, str(script), str(prepared[0])], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    pids = [int(t) for t in p.stdout.readline().split()]
    assert len(pids) == 3, p.stderr.read()
    assert _shm(pids[0])
    os.killpg(p.pid, signal.SIGINT)  # as a terminal does: the whole process group
    _, err = p.communicate(timeout=30)
    assert p.returncode != 0 and "KeyboardInterrupt" in err and "leaked" not in err
    assert all(_gone(q) for q in pids[1:]) and not _shm(pids[0])


def test_data_processes_never_fork_a_threaded_process(prepared, tree, tmp_path, monkeypatch):
    """A fork copies only the calling thread: a lock another thread holds at that instant (a queue's feeder, tqdm's
    monitor, the loader thread, an import) stays held in the child, which can hang on it forever. With a thread
    running here, neither the loader's workers nor prepare's pool may fork this process; the batches stay the
    in-thread loader's bits."""
    import threading
    forks = []
    real_fork = os.fork

    def fork():
        forks.append(threading.active_count())
        return real_fork()

    monkeypatch.setattr(os, "fork", fork)
    stop = threading.Event()
    threading.Thread(target=stop.wait, name="busy", daemon=True).start()
    try:
        ds = load_dataset("imagenet", prepared[0])
        with _wloader(ds, 2) as ld:
            got = [(x.tobytes(), y.tobytes()) for x, y in ld.epoch(1)]
        m = prepare("imagenet", tree, tmp_path / "out", size=SIZE, shard_size=4, jobs=2, progress=False,
                    log=lambda s: None)
    finally:
        stop.set()
    assert not forks, f"forked this process with {forks} threads running"
    assert got == [(x.tobytes(), y.tobytes()) for x, y in _wloader(ds, 0).epoch(1)]
    assert m["splits"] == prepared[1]["splits"] and m["stats"] == prepared[1]["stats"]  # the same shards, bit for bit


KILLED = """
import multiprocessing, os, signal, sys
from convnet.data import load_dataset, PreparedLoader
if __name__ == "__main__":
    ds = load_dataset("imagenet", sys.argv[1])
    ld = PreparedLoader(ds.train_x, ds.train_y, 2, train=True, out_hw=(24, 24), mean=ds.mean_image(), workers=2,
                        prefetch=1)
    next(iter(ld.epoch(0)))
    print(*[p.pid for p in multiprocessing.active_children()], flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_workers_exit_when_their_process_is_killed(prepared, tmp_path):
    """Workers whose process dies without closing them (kill -9) notice within a poll and stop."""
    import time
    script = tmp_path / "killed.py"
    script.write_text(KILLED)
    p = subprocess.run([sys.executable, str(script), str(prepared[0])], env=subprocess_env(), capture_output=True,
                       text=True, timeout=120)
    pids = [int(t) for t in p.stdout.split()]
    assert p.returncode == -9 and len(pids) == 2, p.stderr
    deadline = time.monotonic() + 10
    while not all(_gone(q) for q in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(_gone(q) for q in pids)


def test_a_script_without_a_main_guard_gets_a_clear_worker_error(prepared, tmp_path):
    """Spawned workers import the main script again: one without ``if __name__ == "__main__":`` makes them fail
    while starting; the loader's error says so instead of a bare exit code."""
    script = tmp_path / "unguarded.py"
    script.write_text(f"from convnet.data import load_dataset, PreparedLoader\n"
                      f"ds = load_dataset('imagenet', {str(prepared[0])!r})\n"
                      f"ld = PreparedLoader(ds.train_x, ds.train_y, 2, train=True, out_hw=(24, 24), "
                      f"mean=ds.mean_image(), workers=1, prefetch=1)\n"
                      f"print(sum(1 for _ in ld.epoch(0)))\n")
    p = subprocess.run([sys.executable, str(script)], env=subprocess_env(), capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 1
    assert "DataError: data worker convnet-data-0 died (exit code 1); it failed to start" in p.stderr
    assert 'main code under `if __name__ == "__main__":`' in p.stderr.splitlines()[-1]


@pytest.fixture(scope="module")
def prepared_large(tree, tmp_path_factory):
    """The fixture tree prepared at 112x112: large enough for the full alexnet at a reduced 99x99 input."""
    dst = tmp_path_factory.mktemp("prep112") / "out"
    prepare("imagenet", tree, dst, size=112, shard_size=8, jobs=1, progress=False, log=lambda s: None)
    return dst


@pytest.mark.parametrize("device", ["numpy", "cpu"])
def test_full_alexnet_end_to_end_on_prepared_data(prepared_large, tmp_path, device):
    """`python -m convnet.train --model alexnet --dataset imagenet`: the shipped model (every layer: grouped convs,
    LRN, overlapping pooling, dropout, the 4096-wide fc stack) at a 99x99 input and a 3-way fc8 (the tiny set's
    classes), with the paper's random crops, flips, PCA lighting and 10-crop evaluation, a few steps."""
    from convnet.model_file import resolve_model

    text, _ = resolve_model("alexnet")
    assert text.count("size = 224") == 1 and text.count("outputs = 1000") == 1
    cfg = tmp_path / "alexnet-99.cfg"
    cfg.write_text(text.replace("size = 224", "size = 99").replace("outputs = 1000", "outputs = 3"))
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "convnet.train", "--model", str(cfg), "--dataset", "imagenet",
                        "--data", str(prepared_large), "--device", device, "--epochs", "1", "--batch-size", "4",
                        "--eval-crops", "10", "--workers", "0", "--out", str(out), "--no-progress", "--no-plots"],
                       env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    (epoch,) = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    assert epoch["step"] == 18 // 4 and np.isfinite(epoch["train_loss"]) and 0 <= epoch["test_error"] <= 1
    assert "alexnet-99 on imagenet (18 train / 6 test images)" in r.stdout


@pytest.mark.parametrize("workers", ["0", "1"])
def test_training_on_prepared_data_on_a_fake_gpu_gives_emus_bits(prepared, tmp_path, monkeypatch, workers):
    """The cuda path of the prepared-data pipeline on the CPU (tests/fake_cupy.py, the emulator's kernels): with
    worker processes the batches reach the GPU through pinned buffers and copies on the consumer's stream
    (data/workers.py), without them through the loader thread; either way the same bits as on emu."""
    from convnet.train import run
    from fake_cupy import FakeCupy

    cfg = tmp_path / "tiny-rgb.cfg"
    cfg.write_text(TINY_RGB)
    args = ["--model", str(cfg), "--data", str(prepared[0]), "--epochs", "2", "--workers", workers, "--no-progress",
            "--no-plots", "--precision", "fp32"]  # emu's (a GPU with tensor cores defaults to tf32)

    def trained(device):
        out = tmp_path / device.replace(":", "_")
        res = run([*args, "--device", device, "--out", str(out)], log=lambda s: None)
        with np.load(out / "checkpoint.npz") as z:
            arrays = {k: z[k] for k in z.files if k != "meta"}
        return [(h["train_loss"], h["test_loss"], h["test_error"]) for h in res["history"]], arrays

    want = trained("emu")
    fake = FakeCupy(devices=1).install(monkeypatch, usable=True)
    fake.recording = True
    got = trained("cuda")
    assert got[0] == want[0] and got[1].keys() == want[1].keys()
    for k in want[1]:
        np.testing.assert_array_equal(got[1][k], want[1][k], err_msg=k)
    sets = [c for c in fake.calls if c[0] == "set"]
    assert bool(sets) == (workers == "1")  # the pinned-buffer upload is the workers' path


# --- prepare's and the prepared data's user errors ------------------------------------------------------------
def _prepare_fails(capsys, argv, *needles):
    """prepare's main returns 2 with one line on stderr holding each of ``needles``."""
    assert prepare_main([*argv, "--size", "16", "--jobs", "1", "--no-progress"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_prepare_refuses_a_destination_that_is_a_file_or_inside_the_source(tree, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(tree, src)
    before = sorted(p for p in src.rglob("*"))
    afile = tmp_path / "afile"
    afile.write_text("x")
    _prepare_fails(capsys, ["imagenet", str(src), str(afile)], f"DST {afile} exists and is not a directory")
    _prepare_fails(capsys, ["imagenet", str(src), str(afile / "sub")], f"{afile} is not a directory")
    _prepare_fails(capsys, ["imagenet", str(src), str(tmp_path / ("x" * 300))], "File name too long")
    for inside in (src, src / "train" / "n001", src / "prepared"):
        _prepare_fails(capsys, ["imagenet", str(src), str(inside)], f"DST {inside} is inside the source tree")
    assert sorted(p for p in src.rglob("*")) == before and afile.read_text() == "x"  # nothing written


def test_prepare_into_a_destination_that_cannot_be_created(tree, tmp_path, capsys, monkeypatch):
    real = Path.mkdir

    def mkdir(self, *a, **k):
        if self.name == "dst":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    _prepare_fails(capsys, ["imagenet", str(tree), str(tmp_path / "dst")], f"cannot write to DST {tmp_path / 'dst'}",
                   "Permission denied")


def test_val_labels_and_synsets_unused_or_not_label_files_are_errors(tree, tmp_path, capsys):
    jpg = next((tree / "train" / "n001").glob("*.JPEG"))
    _prepare_fails(capsys, ["imagenet", str(tree), str(tmp_path / "a"), "--val-labels", str(jpg)],
                   f"{jpg}: not a ground-truth file")
    _prepare_fails(capsys, ["imagenet", str(tree), str(tmp_path / "b"), "--synsets", str(jpg)],
                   f"--synsets {jpg}: none of its", "is a class folder")
    folders = tmp_path / "folders"  # val/ in class folders: the folder names are the labels
    shutil.copytree(tree / "train", folders / "train")
    shutil.copytree(tree / "train", folders / "val")
    labels = tree / "ILSVRC2012_validation_ground_truth.txt"
    _prepare_fails(capsys, ["imagenet", str(folders), str(tmp_path / "c"), "--val-labels", str(labels)],
                   f"--val-labels {labels} is not used", "class folders")
    assert not any((tmp_path / d).exists() for d in "abc")
    synsets = tree / "synsets.txt"  # a synset list naming the classes is used (the classes' names)
    m = prepare("imagenet", folders, tmp_path / "d", size=16, jobs=1, synsets=synsets, progress=False, log=lambda s: 0)
    assert [c["name"] for c in m["classes"]] == ["red thing", "green thing", "blue thing, bluish"]


def test_a_class_whose_images_are_all_unreadable_is_an_error(tree, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tree, src)
    for p in (src / "train" / "n002").iterdir():
        p.write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"1 training class\(es\) have no readable image \(n002\): every file of "
                                        r"train/n002 was skipped \(first: train/n002/n002_0.JPEG: "):
        prepare("imagenet", src, tmp_path / "dst", size=16, jobs=1, progress=False, log=lambda s: 0)
    assert not (tmp_path / "dst" / "manifest.json").exists()  # not a dataset that training would take


def test_nan_in_the_prepared_mean_is_refused_on_loading_and_prepare_repairs_it(prepared, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(prepared[0], dst)
    good = dict(np.load(dst / "stats.npz"))
    bad = dict(good, mean=good["mean"].copy())
    bad["mean"][3, 4, 1] = np.nan
    np.savez(dst / "stats.npz", **bad)
    with pytest.raises(DataError, match="stats.npz: the mean image hold NaN or infinite values"):
        load_dataset("imagenet", dst)
    logs = []
    prepare("imagenet", prepared[1]["source"], dst, size=SIZE, shard_size=4, jobs=1, progress=False,
            log=logs.append)
    assert "0 shards to write" in logs[0]  # the shards kept, the stats computed again
    np.testing.assert_array_equal(load_dataset("imagenet", dst).mean, good["mean"])


def test_an_undecodable_image_under_workers_is_a_one_line_error(prepared, tmp_path, capsys):
    from convnet.train import main
    dst = tmp_path / "copy"
    shutil.copytree(prepared[0], dst)
    shard = dst / "train-00000.shard"
    data = bytearray(shard.read_bytes())
    first = int(Shard(shard).offsets[1])
    data[first + 2:first + 200] = bytes(198)  # image 1's JPEG header
    shard.write_bytes(bytes(data))
    cfg = _tiny_cfg(tmp_path)
    argv = ["--model", str(cfg), "--data", str(dst), "--device", "numpy", "--epochs", "1", "--workers", "1",
            "--no-progress", "--no-plots", "--out", str(tmp_path / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: data worker: image 1 of ") and "cannot decode" in err, err
    assert "\n" not in err and "Traceback" not in err and "File " not in err, err
    with pytest.raises(DataError, match="data worker: image 1 of ") as e:  # --debug: the worker's traceback too
        main([*argv, "--overwrite", "--debug"])
    assert "Traceback" in str(e.value.__cause__) and "host_batch" in str(e.value.__cause__)
