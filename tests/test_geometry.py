"""convnet.geometry: the one place for shape rules, and its agreement with the C++ launchers' re-check."""
import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from convnet.devices import Device
from convnet.geometry import ConvGeometry, LrnGeometry, PoolGeometry, output_size


def test_alexnet_shapes():
    conv1 = ConvGeometry.of((3, 227, 227, 128), (3, 11, 11, 96), stride=4)
    assert conv1.y_shape == (96, 55, 55, 128) and conv1.w_shape == (3, 11, 11, 96)
    conv2 = ConvGeometry.of((96, 27, 27, 128), (48, 5, 5, 256), padding=2, groups=2)
    assert (conv2.Cg, conv2.Fg, conv2.OH) == (48, 128, 27)
    assert conv2.flops() == 2 * 256 * 27 * 27 * 128 * 48 * 25
    sizes = [55]
    for _ in range(3):
        sizes.append(PoolGeometry.of((96, sizes[-1], sizes[-1], 1)).OH)
    assert sizes == [55, 27, 13, 6]
    assert output_size(224, 11, 4, 2) == 55


def test_values_are_frozen_and_derived():
    g = ConvGeometry(4, 9, 7, 2, 6, 3, 2, 2, 1, 1, 0, 2)
    assert (g.OH, g.OW) == (5, 6)
    with pytest.raises(dataclasses.FrozenInstanceError):
        g.OH = 3
    assert dataclasses.replace(g, H=11).OH == 6  # derived fields are recomputed, never passed in


@pytest.mark.parametrize("make, exc, match", [
    (lambda: ConvGeometry.of((4, 8, 8, 2), (2, 3, 3, 6), groups=3), ValueError, "groups=3 must divide"),
    (lambda: ConvGeometry.of((4, 8, 8, 2), (3, 3, 3, 6), groups=2), ValueError, r"w must have shape \(2, KH, KW, F\)"),
    (lambda: ConvGeometry.of((4, 2, 8, 2), (4, 3, 3, 6)), ValueError, "larger than the padded input"),
    (lambda: ConvGeometry.of((4, 8, 8, 2), (4, 3, 3, 6), stride=0), ValueError, "stride must be >= 1"),
    (lambda: ConvGeometry.of((4, 8, 8, 2), (4, 3, 3, 6), stride=1.5), TypeError, "stride must be an int"),
    (lambda: ConvGeometry.of((4, 8, 8, 0), (4, 3, 3, 6)), ValueError, "no empty dimension"),
    (lambda: ConvGeometry.of((3, 2**15, 2**15, 4), (3, 3, 3, 8)), ValueError, "2\\*\\*31"),
    (lambda: ConvGeometry.of_backward_data((6, 8, 8, 2), (4, 3, 3, 5), (8, 8)), ValueError, "5 filters but dy has 6"),
    (lambda: ConvGeometry.of_backward_data((6, 8, 8, 2), (4, 3, 3, 6), (8, 8)), ValueError, "spatial size"),
    (lambda: ConvGeometry.of_backward_filter((4, 8, 8, 2), (6, 6, 6, 3), 3), ValueError, "3 images but x has 2"),
    (lambda: PoolGeometry.of((4, 8, 8, 2), window=3, stride=2, padding=2), ValueError, "must be <= window // 2"),
    (lambda: PoolGeometry.of((4, 2, 8, 2), window=5, stride=1, padding=1), ValueError, "larger than the padded"),
    (lambda: PoolGeometry.of((4, 8, 8), window=3, stride=2), ValueError, "non-empty shape"),
    (lambda: LrnGeometry.of((6, 2, 2, 1), groups=4), ValueError, "groups=4 must divide"),
    (lambda: LrnGeometry.of((6, 2, 2, 1), convention="avg"), ValueError, "convention"),
    (lambda: LrnGeometry.of((6, 2, 2, 1), k=0.0), ValueError, "k must be > 0"),
])
def test_bad_geometry_names_the_problem(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_lrn_coefficient_and_groups():
    g = LrnGeometry.of((8, 3, 3, 4), size=5, alpha=5e-4, convention="mean", groups=2)
    assert g.a == pytest.approx(1e-4) and LrnGeometry.of((8, 3, 3, 4), alpha=1e-4).a == 1e-4
    assert g.group() == dataclasses.replace(g, C=4, groups=1)


@st.composite
def conv_geometries(draw):
    groups = draw(st.sampled_from([1, 2, 3]))
    kh, kw = draw(st.integers(1, 7)), draw(st.integers(1, 7))
    ph, pw = draw(st.integers(0, 4)), draw(st.integers(0, 4))
    return (draw(st.integers(1, 4)) * groups, draw(st.integers(1, 20)), draw(st.integers(1, 20)),
            draw(st.integers(1, 9)), draw(st.integers(1, 4)) * groups, kh, kw, draw(st.integers(1, 5)),
            draw(st.integers(1, 5)), ph, pw, groups)


@settings(max_examples=200, deadline=None)
@given(conv_geometries())
def test_python_and_cpp_agree_on_conv_geometry(fields):
    """Every geometry Python accepts, the C++ launchers accept with the same output size (a disagreement raises);
    every one Python rejects, C++ rejects too (fed the raw fields by name)."""
    from types import SimpleNamespace
    k = Device("emu").kernels
    try:
        g = ConvGeometry(*fields)
    except ValueError:
        c, h, w, n, f, kh, kw, sh, sw, ph, pw, groups = fields
        raw = SimpleNamespace(C=c, H=h, W=w, N=n, F=f, KH=kh, KW=kw, stride_h=sh, stride_w=sw, pad_h=ph, pad_w=pw,
                              groups=groups, OH=1, OW=1)
        with pytest.raises(ValueError):
            k.conv_backward_filter_workspace(raw)
        return
    assert k.conv_backward_filter_workspace(g) >= 0


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 20), st.integers(1, 20), st.integers(1, 6), st.integers(1, 6), st.integers(1, 4),
       st.integers(1, 4), st.integers(0, 3), st.integers(0, 3))
def test_python_and_cpp_agree_on_pool_geometry(h, w, wh, ww, sh, sw, ph, pw):
    import numpy as np
    from types import SimpleNamespace
    k = Device("emu").kernels
    buf = np.zeros(4 * h * w * 2, np.float32)
    try:
        g = PoolGeometry(2, h, w, 2, wh, ww, sh, sw, ph, pw)
    except ValueError:
        raw = SimpleNamespace(C=2, H=h, W=w, N=2, window_h=wh, window_w=ww, stride_h=sh, stride_w=sw, pad_h=ph,
                              pad_w=pw, OH=1, OW=1)
        with pytest.raises(ValueError):
            k.pool_forward(buf.ctypes.data, buf.ctypes.data, raw, 0, 0)
        return
    out = np.zeros(2 * g.OH * g.OW * 2, np.float32)
    k.pool_forward(buf.ctypes.data, out.ctypes.data, g, 0, 0)  # accepted: same output size on both sides


def test_built_geometries_are_remembered_only_for_plain_arguments():
    """A step's repeated calls get the value built before; a bool, float, NumPy int or list is validated afresh
    (True == 1 and 2.0 == 2 must not find the int's geometry), and a refused call is refused every time."""
    a = ConvGeometry.of((3, 9, 9, 4), (3, 3, 3, 8), stride=1, padding=1)
    assert ConvGeometry.of((3, 9, 9, 4), (3, 3, 3, 8), stride=1, padding=1) is a
    with pytest.raises(TypeError, match="stride must be an int or a pair of ints"):
        ConvGeometry.of((3, 9, 9, 4), (3, 3, 3, 8), stride=True, padding=1)
    with pytest.raises(TypeError, match="stride must be an int or a pair of ints"):
        ConvGeometry.of((3, 9, 9, 4), (3, 3, 3, 8), stride=1.0, padding=1)
    assert ConvGeometry.of((3, 9, 9, 4), [3, 3, 3, 8], stride=np.int64(1), padding=1) == a  # valid, not remembered
    for _ in range(2):
        with pytest.raises(ValueError, match="stride must be >= 1"):
            ConvGeometry.of((3, 9, 9, 4), (3, 3, 3, 8), stride=0, padding=1)
    p = PoolGeometry.of((3, 9, 9, 4), window=3, stride=2)
    assert PoolGeometry.of((3, 9, 9, 4), window=3, stride=2) is p
    with pytest.raises(TypeError):
        PoolGeometry.of((3, 9, 9, 4), window=3.0, stride=2)
