"""JPEG decoding (convnet.data.jpeg): the engines agree on the fixture's odd files, what libjpeg-turbo cannot read
goes to Pillow, undecodable data is a clear error, and the choice follows the option / environment variable."""
import io
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from convnet.data import DataError, jpeg
from convnet.data.shards import ShardImages, write_shard

sys.path.insert(0, str(Path(__file__).parent))
from imagefolder_fixture import make_tree  # noqa: E402

BAD = ("n003_truncated.JPEG", "n003_garbage.JPEG")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = make_tree(tmp_path_factory.mktemp("src"))
    return {p.name: p.read_bytes() for p in sorted(root.rglob("*.JPEG"))}


def test_pillow_decodes_every_readable_fixture_file_as_rgb(files):
    for name, buf in files.items():
        if name in BAD:
            continue
        with Image.open(io.BytesIO(buf)) as im:
            want = np.asarray(im.convert("RGB"))
        got = jpeg.decode(buf, "pillow")
        assert got.dtype == np.uint8 and got.shape == want.shape and (got == want).all(), name
        x4 = jpeg.decode_rgbx(buf, "pillow")
        assert x4.shape == (*want.shape[:2], 4) and (x4[..., :3] == want).all(), name
    gray = jpeg.decode(files["n001_gray.JPEG"], "pillow")
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()


def test_simplejpeg_agrees_with_pillow_and_hands_it_what_it_cannot_read(files, monkeypatch):
    pytest.importorskip("simplejpeg")
    reached_pillow = []
    pillow = jpeg._pillow
    monkeypatch.setattr(jpeg, "_pillow", lambda buf, ch: reached_pillow.append(1) or pillow(buf, ch))
    worst = {}
    for name, buf in files.items():
        if name in BAD:
            continue
        reached_pillow.clear()
        a = jpeg.decode(buf, "simplejpeg").astype(np.int16)
        via_pillow = bool(reached_pillow)
        b = pillow(buf, 3).astype(np.int16)
        assert a.shape == b.shape, name
        worst[name] = int(np.abs(a - b).max())
        x4 = jpeg.decode_rgbx(buf, "simplejpeg")
        assert (x4[..., :3] == a).all(), name
        assert via_pillow == (name == "n002_png.JPEG"), name  # only the PNG named .JPEG needs Pillow
    assert max(worst.values()) <= jpeg.TOLERANCE, worst
    assert worst["n002_png.JPEG"] == 0  # decoded by Pillow itself
    assert sum(v == 0 for v in worst.values()) >= len(worst) - 1  # plain JPEGs: identical pixels (CMYK: 1 level)


@pytest.mark.parametrize("engine", jpeg.ENGINES)
def test_undecodable_data_is_an_error_naming_the_image(files, engine, tmp_path):
    if engine not in jpeg.available():
        pytest.skip("simplejpeg is not installed")
    for name in BAD:
        with pytest.raises(OSError):
            jpeg.decode(files[name], engine)
    good = files["n001_0.JPEG"]
    write_shard(tmp_path / "t.shard", [good, files["n003_truncated.JPEG"]], [0, 0], {"names": []})
    imgs = ShardImages([tmp_path / "t.shard"], (30, 40), engine)
    assert imgs.image(0).shape == (30, 40, 3)
    with pytest.raises(DataError, match=r"image 1 of .*cannot decode"):
        imgs.image(1)


def test_choice_by_option_environment_and_what_is_installed(monkeypatch):
    monkeypatch.delenv(jpeg.ENV, raising=False)
    assert jpeg.resolve() == jpeg.available()[0] == ("simplejpeg" if jpeg._simplejpeg_module() else "pillow")
    monkeypatch.setenv(jpeg.ENV, "Pillow")
    assert jpeg.resolve() == "pillow" and jpeg.resolve("auto") == jpeg.available()[0]
    assert jpeg.describe().startswith("pillow ")
    monkeypatch.setenv(jpeg.ENV, "turbo")
    with pytest.raises(DataError, match=f"unknown JPEG decoder 'turbo' \\(from {jpeg.ENV}\\)"):
        jpeg.resolve()
    with pytest.raises(DataError, match="unknown JPEG decoder 'libjpeg' \\(from the decoder option\\)"):
        jpeg.resolve("libjpeg")
    monkeypatch.setattr(jpeg, "_simplejpeg_module", lambda: None)  # as where the extra is not installed
    monkeypatch.delenv(jpeg.ENV)
    assert jpeg.available() == ("pillow",) and jpeg.resolve() == "pillow"
    with pytest.raises(DataError, match=r"pip install 'convnet\[fastjpeg\]'"):
        jpeg.resolve("simplejpeg")
