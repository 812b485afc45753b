"""Datasets (IDX, CIFAR-10 pickle batches, synthetic), augmentation and the background loader."""
import gzip
import struct

import numpy as np
import pytest

from convnet.data import (DataError, Loader, load_cifar10, load_dataset, load_fashion_mnist, read_idx, synthetic,
                          write_cifar_batch)


def write_idx(path, a, gz=True):
    a = np.asarray(a, np.uint8)
    raw = struct.pack(">BBBB", 0, 0, 0x08, a.ndim) + struct.pack(f">{a.ndim}I", *a.shape) + a.tobytes()
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(raw)
    else:
        with open(path, "wb") as f:
            f.write(raw)


def make_fashion_dir(d, n_train=64, n_test=32, gz=True, seed=0):
    rng = np.random.default_rng(seed)
    sfx = ".gz" if gz else ""
    tx = rng.integers(0, 256, (n_train, 28, 28))
    vx = rng.integers(0, 256, (n_test, 28, 28))
    ty = rng.integers(0, 10, n_train)
    vy = rng.integers(0, 10, n_test)
    write_idx(d / f"train-images-idx3-ubyte{sfx}", tx, gz)
    write_idx(d / f"train-labels-idx1-ubyte{sfx}", ty, gz)
    write_idx(d / f"t10k-images-idx3-ubyte{sfx}", vx, gz)
    write_idx(d / f"t10k-labels-idx1-ubyte{sfx}", vy, gz)
    return tx, ty, vx, vy


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_idx_roundtrip(tmp_path, gz):
    tx, ty, vx, vy = make_fashion_dir(tmp_path, gz=gz)
    ds = load_fashion_mnist(tmp_path)
    assert ds.train_x.shape == (64, 28, 28, 1) and ds.train_x.dtype == np.uint8
    assert np.array_equal(ds.train_x[..., 0], tx) and np.array_equal(ds.test_y, vy)
    assert ds.train_y.dtype == np.int32 and len(ds.classes) == 10
    assert ds.shape == (1, 28, 28)


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path):
    with pytest.raises(DataError, match=r"apt-get install dataset-fashion-mnist.*--data DIR") as e:
        load_fashion_mnist(tmp_path / "nowhere")
    assert "train-images-idx3-ubyte" in str(e.value)


def test_bad_idx_files(tmp_path):
    make_fashion_dir(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with open(tmp_path / "t10k-labels-idx1-ubyte", "wb") as f:
        f.write(b"\x12\x34garbage")
    with pytest.raises(DataError, match="not an IDX file"):
        load_fashion_mnist(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.arange(5), gz=False)
    with pytest.raises(DataError, match="counts differ"):
        load_fashion_mnist(tmp_path)
    p = tmp_path / "trunc"
    with open(p, "wb") as f:
        f.write(struct.pack(">BBBBI", 0, 0, 8, 1, 100) + b"\x00" * 10)
    with pytest.raises(DataError, match="truncated"):
        read_idx(p)


def test_real_fashion_mnist_if_installed():
    try:
        ds = load_fashion_mnist()
    except DataError:
        pytest.skip("dataset-fashion-mnist not installed")
    assert ds.train_x.shape == (60000, 28, 28, 1) and ds.test_x.shape == (10000, 28, 28, 1)
    assert np.bincount(ds.test_y).tolist() == [1000] * 10


def test_cifar10_batches_written_by_the_test(tmp_path):
    rng = np.random.default_rng(0)
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    xs, ys = [], []
    for i in (1, 2):
        x = rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)
        y = rng.integers(0, 10, 20)
        write_cifar_batch(d / f"data_batch_{i}", x, y)
        xs.append(x)
        ys.append(y)
    vx = rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    vy = rng.integers(0, 10, 10)
    write_cifar_batch(d / "test_batch", vx, vy)
    ds = load_cifar10(tmp_path)  # the parent directory works too
    assert np.array_equal(ds.train_x, np.concatenate(xs)) and np.array_equal(ds.train_y, np.concatenate(ys))
    assert np.array_equal(ds.test_x, vx) and ds.shape == (3, 32, 32)
    # the on-disk format is planar R, G, B rows
    import pickle
    with open(d / "test_batch", "rb") as f:
        raw = pickle.load(f, encoding="bytes")[b"data"]
    assert np.array_equal(raw[3, :1024].reshape(32, 32), vx[3, :, :, 0])
    assert np.array_equal(raw[3, 2048:].reshape(32, 32), vx[3, :, :, 2])


def test_cifar10_errors(tmp_path):
    with pytest.raises(DataError, match="needs --data"):
        load_dataset("cifar10", None)
    with pytest.raises(DataError, match="cifar-10-python.tar.gz"):
        load_cifar10(tmp_path)
    (tmp_path / "data_batch_1").write_bytes(b"not a pickle")
    (tmp_path / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="not a CIFAR-10 python batch"):
        load_cifar10(tmp_path)
    with pytest.raises(DataError, match="unknown dataset 'mnist'"):
        load_dataset("mnist")


def _loader(ds, **kw):
    args = dict(train=True, out_hw=(28, 28), mean=ds.mean_image(), scale=1 / 255, crop_pad=2, flip=True, seed=3)
    args.update(kw)
    return Loader(ds.train_x, ds.train_y, 16, **args)


def test_loader_batches_are_deterministic_and_thread_independent():
    ds = synthetic((1, 28, 28), 10, n_train=100, n_test=20)
    a = list(_loader(ds, prefetch=3).epoch(2))
    b = list(_loader(ds, prefetch=0).epoch(2))
    assert len(a) == 6  # 100 // 16, incomplete last batch dropped
    for (xa, ya), (xb, yb) in zip(a, b):
        assert xa.shape == (1, 28, 28, 16) and xa.dtype == np.float32 and xa.flags.c_contiguous
        assert np.array_equal(xa, xb) and np.array_equal(ya, yb)
    # resuming mid-epoch gives the same remaining batches
    c = list(_loader(ds).epoch(2, start=4))
    assert all(np.array_equal(x, y[0]) for (x, _), y in zip(c, a[4:]))
    # another epoch is shuffled differently
    d = list(_loader(ds).epoch(3))
    assert not np.array_equal(a[0][1], d[0][1])


def test_augmentation_crops_flips_mean():
    ds = synthetic((1, 8, 8), 2, n_train=32, n_test=8)
    mean = ds.mean_image()
    plain = Loader(ds.train_x, ds.train_y, 32, train=True, out_hw=(8, 8), mean=mean, seed=0, prefetch=0)
    x, y = next(plain.epoch(0))
    order = plain.order(0)
    want = (ds.train_x[order].astype(np.float32) - mean).transpose(3, 1, 2, 0)
    assert np.array_equal(x, want)
    flip = Loader(ds.train_x, ds.train_y, 32, train=True, out_hw=(8, 8), mean=mean, seed=0, flip=True,
                  prefetch=0)
    xf, _ = next(flip.epoch(0))
    flipped = [np.array_equal(xf[..., i], want[:, :, ::-1, i]) for i in range(32)]
    same = [np.array_equal(xf[..., i], want[..., i]) for i in range(32)]
    assert all(f or s for f, s in zip(flipped, same)) and 5 < sum(flipped) < 27
    # crops from a larger image: train random, test centre
    big = synthetic((3, 12, 12), 2, n_train=16, n_test=4)
    tr = Loader(big.train_x, big.train_y, 16, train=True, out_hw=(8, 8), mean=big.mean_image(), seed=0,
                prefetch=0)
    xc, _ = next(tr.epoch(0))
    assert xc.shape == (3, 8, 8, 16)
    te = Loader(big.test_x, big.test_y, 16, train=False, out_hw=(8, 8), mean=big.mean_image(), prefetch=0)
    xt, yt = next(te.epoch(0))
    assert xt.shape == (3, 8, 8, 4) and len(te) == 1
    assert np.array_equal(xt, (big.test_x[:, 2:10, 2:10].astype(np.float32) - big.mean_image()[2:10, 2:10])
                          .transpose(3, 1, 2, 0))
    with pytest.raises(DataError, match="smaller than the model's input"):
        Loader(big.train_x, big.train_y, 4, train=True, out_hw=(16, 16), mean=0)


def test_loader_propagates_worker_errors():
    ds = synthetic((1, 8, 8), 2, n_train=32, n_test=8)
    ld = Loader(ds.train_x, ds.train_y, 8, train=True, out_hw=(8, 8), mean=np.zeros((9, 9, 1)), prefetch=2)
    with pytest.raises(ValueError):
        list(ld.epoch(0))


def test_pad_crop_flip_is_a_window_of_the_padded_mean_subtracted_image():
    ds = synthetic((2, 6, 6), 3, n_train=24, n_test=4)
    mean = ds.mean_image()
    ld = Loader(ds.train_x, ds.train_y, 24, train=True, out_hw=(6, 6), mean=mean, crop_pad=2, flip=True, seed=1,
                prefetch=0, scale=0.5)
    x, y = next(ld.epoch(0))
    order = ld.order(0)
    ref = np.pad(ds.train_x[order].astype(np.float32) - mean, ((0, 0), (2, 2), (2, 2), (0, 0))) * np.float32(0.5)
    shifts, flips = set(), 0
    for i in range(24):
        got = x[..., i].transpose(1, 2, 0)
        hits = [(dy, dx, f) for dy in range(5) for dx in range(5) for f in (False, True)
                if np.array_equal(got, (ref[i, dy:dy + 6, dx:dx + 6, :][:, ::-1] if f else
                                        ref[i, dy:dy + 6, dx:dx + 6, :]))]
        assert hits, f"image {i} is not a (flipped) window of the padded image"
        shifts.add(hits[0][:2])
        flips += hits[0][2]
    assert len(shifts) > 5 and 3 < flips < 21


def test_a_per_channel_mean_is_the_same_as_that_mean_at_every_pixel():
    """A run imported from torchvision has one mean per channel: the loader's crops, padding, flips and test views
    subtract it as they subtract an image holding it at every pixel (padding stays zero)."""
    ds = synthetic((3, 10, 10), 3, n_train=24, n_test=6)
    per_channel = np.array([120.5, 99.25, 130.0], np.float32)
    image = np.broadcast_to(per_channel, (10, 10, 3)).copy()
    for kw in (dict(train=True, crop_pad=2, flip=True, seed=4), dict(train=False), dict(train=False, views=10)):
        a, b = (list(Loader(ds.train_x, ds.train_y, 8, out_hw=(8, 8), mean=m, scale=0.25, prefetch=0, **kw).epoch(0))
                for m in (per_channel, image))
        assert len(a) == len(b) > 0
        for (xa, ya), (xb, yb) in zip(a, b):
            assert np.array_equal(xa, xb) and np.array_equal(ya, yb)


# -------------------------------------------------------------------------------------------- corrupt data files
def _idx_bytes(a, code=0x08, dims=None):
    a = np.asarray(a)
    dims = a.shape if dims is None else dims
    return struct.pack(">BBBB", 0, 0, code, len(dims)) + struct.pack(f">{len(dims)}I", *dims) + a.tobytes()


def test_corrupt_and_mistyped_idx_files_are_one_line_data_errors(tmp_path):
    """Corrupt gz streams, truncated headers and bodies, trailing bytes and the wrong element type (int16
    pixels, float labels) are DataErrors naming the file (they were zlib / NumPy buffer errors, or silently
    accepted)."""
    make_fashion_dir(tmp_path)
    good = (tmp_path / "train-images-idx3-ubyte.gz").read_bytes()
    p = tmp_path / "x.gz"
    cases = []
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0xFF  # inside the deflate stream
    cases.append((bytes(flipped), r"cannot read IDX file|truncated|trailing"))
    cases.append((good[: len(good) // 2], r"cannot read IDX file.*(EOFError|end-of-stream)"))
    bad_crc = bytearray(good)
    bad_crc[-8] ^= 0x01  # the gzip trailer's CRC-32
    cases.append((bytes(bad_crc), r"cannot read IDX file.*CRC"))
    for data, match in cases:
        p.write_bytes(data)
        with pytest.raises(DataError, match=rf"x\.gz: .*({match})") as e:
            read_idx(p, np.uint8)
        assert "\n" not in str(e.value)
    raw = tmp_path / "raw"
    img = np.zeros((2, 3, 3), np.uint8)
    for data, match in (
            (struct.pack(">BBBB", 0, 0, 8, 3) + b"\0\0\0\2\0\0", "truncated IDX header"),  # was a NumPy buffer error
            (_idx_bytes(img) + b"\0", "trailing bytes"),
            (_idx_bytes(img, dims=(2, 3, 2**31)), "truncated IDX data"),  # a corrupted size: no huge allocation
            (_idx_bytes(img.astype(">i2"), 0x0B), "IDX elements are int16, expected uint8"),
            (_idx_bytes(np.zeros(2, ">f4"), 0x0D), "IDX elements are float32, expected uint8")):
        raw.write_bytes(data)
        with pytest.raises(DataError, match=match):
            read_idx(raw, np.uint8)
    # the loader applies the type rule: int16 pixels / float labels in a Fashion-MNIST directory are refused
    (tmp_path / "train-images-idx3-ubyte.gz").unlink()
    (tmp_path / "train-images-idx3-ubyte").write_bytes(_idx_bytes(np.zeros((64, 28, 28), ">i2"), 0x0B))
    with pytest.raises(DataError, match="train-images-idx3-ubyte: IDX elements are int16, expected uint8"):
        load_fashion_mnist(tmp_path)
    make_fashion_dir(tmp_path)
    (tmp_path / "train-images-idx3-ubyte").unlink()
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(np.zeros(32, ">f4"), 0x0D))
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte: IDX elements are float32"):
        load_fashion_mnist(tmp_path)


def test_cifar_batch_with_the_wrong_element_type_is_refused(tmp_path):
    """Float pixels or float labels in a CIFAR batch are refused, never cast silently."""
    import pickle
    d = tmp_path / "c"
    d.mkdir()
    for data, labels, match in ((np.zeros((2, 3072), np.float32), [0, 1], "'data' must be uint8 pixels, got float32"),
                                (np.zeros((2, 3072), np.uint8), [0.5, 1.0], "'labels' must be integers")):
        with open(d / "data_batch_1", "wb") as f:
            pickle.dump({b"data": data, b"labels": labels}, f)
        write_cifar_batch(d / "test_batch", np.zeros((2, 32, 32, 3), np.uint8), [0, 1])
        with pytest.raises(DataError, match=match):
            load_cifar10(d)
