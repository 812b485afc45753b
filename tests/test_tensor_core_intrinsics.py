"""The tensor-core and cp.async intrinsics of cuda_compat.h, through the probe kernels of
csrc/kernels/tensor_core_probes.cu, on emu (and cuda when a GPU is present).

The fragment tables below are written out by hand from the PTX ISA ("Matrix Fragments for mma.m16n8k8", .tf32;
"Matrix Fragments for mma.m16n8k16 with floating point type", .bf16; "ldmatrix"), independently of the emulator's
(csrc/emu/cuemu.cpp) and the kernels' (csrc/kernels/mma_fragments.cuh). On emu the mma results are exact:
float64 sums of the exact products, k ascending, rounded once, which the NumPy oracle repeats; a GPU may differ
within the FP32 accumulation bound.
"""
from __future__ import annotations

import pathlib
import re

import ml_dtypes
import numpy as np
import pytest

from helpers import COMPILED_DEVICES, EMU, SCHEDULES, schedule
from precision_cases import assert_same_bits_or_both_nan, special_floats, tf32_by_arithmetic

from convnet.reference.precision import round_inputs, round_tf32

import convnet._emu as _emu  # noqa: E402  (a missing emulator module is a failure, not a skip)

PROBES_SOURCE = pathlib.Path(__file__).resolve().parents[1] / "csrc" / "kernels" / "tensor_core_probes.cu"
LANES = np.arange(32)


# ---- the ISA's tables, by hand --------------------------------------------------------------------------------
def lane_roles(lane):
    return lane // 4, lane % 4  # groupID, threadID_in_group


def tf32_a(lane, i):  # m16n8k8 .tf32 A (16x8), register i
    g, t = lane_roles(lane)
    return (g if i in (0, 2) else g + 8), (t if i in (0, 1) else t + 4)


def tf32_b(lane, i):  # m16n8k8 .tf32 B (8x8)
    g, t = lane_roles(lane)
    return (t if i == 0 else t + 4), g


def bf16_a(lane, e):  # m16n8k16 .bf16 A (16x16), element e (register e // 2, low half first)
    g, t = lane_roles(lane)
    row = g if (0 <= e < 2 or 4 <= e < 6) else g + 8
    return row, t * 2 + (e & 1) + (8 if e >= 4 else 0)


def bf16_b(lane, e):  # m16n8k16 .bf16 B (16x8)
    g, t = lane_roles(lane)
    return t * 2 + (e & 1) + (8 if e >= 2 else 0), g


def accumulator(lane, i):  # C and D of both shapes (16x8)
    g, t = lane_roles(lane)
    return (g if i < 2 else g + 8), t * 2 + (i & 1)


SHAPES = {"tf32": (8, tf32_a, tf32_b), "bf16": (16, bf16_a, bf16_b)}


def bf16_bits(x):
    return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).view(np.uint16).astype(np.uint32)


def registers(kind, a, b, c):
    """Each lane's registers for A (16 x k), B (k x 8), C (16 x 8), by the tables above."""
    k, a_of, b_of = SHAPES[kind]
    ra = np.zeros((32, 4), np.uint32)
    rb = np.zeros((32, 2), np.uint32)
    for lane in range(32):
        if kind == "tf32":
            ra[lane] = [a[tf32_a(lane, i)].view(np.uint32) for i in range(4)]
            rb[lane] = [b[tf32_b(lane, i)].view(np.uint32) for i in range(2)]
        else:
            ra[lane] = [bf16_bits(a[bf16_a(lane, 2 * r)]) | bf16_bits(a[bf16_a(lane, 2 * r + 1)]) << 16
                        for r in range(4)]
            rb[lane] = [bf16_bits(b[bf16_b(lane, 2 * r)]) | bf16_bits(b[bf16_b(lane, 2 * r + 1)]) << 16
                        for r in range(2)]
    rc = np.array([[c[accumulator(lane, i)] for i in range(4)] for lane in range(32)], np.float32)
    return ra, rb, rc


def matrix_of_d(rd):
    d = np.full((16, 8), np.nan, np.float32)
    for lane in range(32):
        for i in range(4):
            d[accumulator(lane, i)] = rd[lane, i]
    return d


def mma_oracle(a, b, c, k_step):
    """D = A B + C as the emulator computes it: per mma, float64 sum of C and the products, k ascending, rounded to
    float32 (A and B hold values exact in the mma's type)."""
    acc = c.astype(np.float32)
    for k0 in range(0, a.shape[1], k_step):
        wide = acc.astype(np.float64)
        for k in range(k0, k0 + k_step):
            wide = wide + a[:, k:k + 1].astype(np.float64) * b[k:k + 1, :].astype(np.float64)
        acc = wide.astype(np.float32)
    return acc


def assert_mma_equal(device, got, a, b, c, k_step):
    want = mma_oracle(a, b, c, k_step)
    if device == EMU:
        np.testing.assert_array_equal(got, want)
    else:  # the GPU's summation order and width are its own: the FP32 accumulation bound
        bound = (a.shape[1] + 2) * 2.0**-23 * (np.abs(c) + np.abs(a).astype(np.float64) @ np.abs(b))
        assert np.all(np.abs(got.astype(np.float64) - want) <= bound)


# ---- running the probes ---------------------------------------------------------------------------------------
def probes(device):
    return device.kernels.tensor_core_probes


def launch(device, name, *args):
    """Calls probe `name` with device arrays as pointers on the device's current stream, then waits for it."""
    with device.activate():
        converted = [device.pointer(a) if device.is_array(a) else a for a in args]
        getattr(probes(device), name)(*converted, device.stream_handle(None))
        device.synchronize()


def run_mma_registers(device, kind, ra, rb, rc):
    on = [device.asarray(x, x.dtype) for x in (ra, rb, rc)]
    rd = device.zeros((32, 4), np.float32)
    launch(device, "mma_registers", kind == "bf16", *on, rd)
    return device.to_numpy(rd)


def mma_through_tables(device, kind, a, b, c):
    return matrix_of_d(run_mma_registers(device, kind, *registers(kind, a, b, c)))


# ---- mma: fragment ownership --------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["tf32", "bf16"])
@pytest.mark.parametrize("device", COMPILED_DEVICES)
def test_mma_gathers_a_by_the_isa_fragment_table(device, kind):
    # A = iota, B selects column n (+ shift) of A: D[m, n] = A[m, n + shift], so every register of every lane shows
    # where the instruction took it from and where it put the result.
    k, _, _ = SHAPES[kind]
    a = (np.arange(16 * k, dtype=np.float32).reshape(16, k) + 1)
    for shift in range(0, k, 8):
        b = np.zeros((k, 8), np.float32)
        b[np.arange(8) + shift, np.arange(8)] = 1
        got = mma_through_tables(device, kind, a, b, np.zeros((16, 8), np.float32))
        np.testing.assert_array_equal(got, a[:, shift:shift + 8])


@pytest.mark.parametrize("kind", ["tf32", "bf16"])
@pytest.mark.parametrize("device", COMPILED_DEVICES)
def test_mma_gathers_b_by_the_isa_fragment_table(device, kind):
    k, _, _ = SHAPES[kind]
    b = np.arange(k * 8, dtype=np.float32).reshape(k, 8) + 1
    for shift in range(0, k, 16):
        a = np.zeros((16, k), np.float32)
        rows = np.arange(16)
        a[rows, (rows % k) + shift] = 1  # D[m, n] = B[m % k, n]
        got = mma_through_tables(device, kind, a, b, np.zeros((16, 8), np.float32))
        np.testing.assert_array_equal(got, b[rows % k])


@pytest.mark.parametrize("kind", ["tf32", "bf16"])
@pytest.mark.parametrize("device", COMPILED_DEVICES)
def test_mma_accumulates_into_c_by_the_isa_fragment_table(device, kind):
    k, _, _ = SHAPES[kind]
    c = np.arange(128, dtype=np.float32).reshape(16, 8) - 40.5
    got = mma_through_tables(device, kind, np.zeros((16, k), np.float32), np.zeros((k, 8), np.float32), c)
    np.testing.assert_array_equal(got, c)


def test_mma_lane_registers_for_iota_a_worked_by_hand():
    # Lane 5 (groupID 1, threadID_in_group 1) of m16n8k8 .tf32 holds a0 = A[1, 1], a1 = A[9, 1], a2 = A[1, 5],
    # a3 = A[9, 5]; with B = I its d0..d3 are D[1, 2], D[1, 3], D[9, 2], D[9, 3] = A at those places.
    a = np.arange(128, dtype=np.float32).reshape(16, 8)
    ra, _, _ = registers("tf32", a, np.eye(8, dtype=np.float32), np.zeros((16, 8), np.float32))
    assert ra[5].view(np.float32).tolist() == [9.0, 73.0, 13.0, 77.0]
    rd = run_mma_registers(EMU, "tf32", *registers("tf32", a, np.eye(8, dtype=np.float32), np.zeros((16, 8), np.float32)))
    assert rd[5].tolist() == [10.0, 11.0, 74.0, 75.0]
    # m16n8k16 .bf16, lane 6 (groupID 1, threadID_in_group 2): a0, a1 = A[1, 4], A[1, 5]; a2, a3 = A[9, 4], A[9, 5];
    # a4, a5 = A[1, 12], A[1, 13]; a6, a7 = A[9, 12], A[9, 13].
    a16 = np.arange(256, dtype=np.float32).reshape(16, 16)
    ra16, _, _ = registers("bf16", a16, np.zeros((16, 8), np.float32), np.zeros((16, 8), np.float32))
    halves = [(int(r) & 0xFFFF, int(r) >> 16) for r in ra16[6]]
    as_float = [tuple(float(np.uint32(h << 16).view(np.float32)) for h in pair) for pair in halves]
    assert as_float == [(20.0, 21.0), (148.0, 149.0), (28.0, 29.0), (156.0, 157.0)]


@pytest.mark.parametrize("kind", ["tf32", "bf16"])
@pytest.mark.parametrize("device", COMPILED_DEVICES)
def test_mma_matches_numpy_on_random_rounded_matrices(device, kind):
    rng = np.random.default_rng(7)
    k, _, _ = SHAPES[kind]
    a, b = round_inputs(kind, rng.standard_normal((16, k)), rng.standard_normal((k, 8)))
    c = rng.standard_normal((16, 8)).astype(np.float32)
    assert_mma_equal(device, mma_through_tables(device, kind, a, b, c), a, b, c, k)


@pytest.mark.parametrize("device", COMPILED_DEVICES)
def test_tf32_mma_ignores_the_low_13_bits_of_its_operands(device):
    rng = np.random.default_rng(3)
    a = rng.standard_normal((16, 8)).astype(np.float32)
    b = rng.standard_normal((8, 8)).astype(np.float32)
    truncated = [(x.view(np.uint32) & np.uint32(0xFFFFE000)).view(np.float32) for x in (a, b)]
    c = np.zeros((16, 8), np.float32)
    assert_mma_equal(device, mma_through_tables(device, "tf32", a, b, c), *truncated, c, 8)


# ---- mma through the kernels' fragment helpers ----------------------------------------------------------------
def run_mma_gemm(device, kind, a, b, c, swap_a_registers=False):
    on = [device.asarray(x, np.float32) for x in (a, b, c)]
    d = device.zeros(c.shape, np.float32)
    launch(device, "mma_gemm", kind == "bf16", *on, d, a.shape[0], b.shape[1], a.shape[1], swap_a_registers)
    return device.to_numpy(d)


@pytest.mark.parametrize("kind", ["tf32", "bf16"])
@pytest.mark.parametrize("device", COMPILED_DEVICES)
def test_mma_gemm_rounds_its_inputs_and_matches_numpy(device, kind):
    rng = np.random.default_rng(11)
    m, n, k = 32, 16, 48
    a = rng.standard_normal((m, k)).astype(np.float32)
    b = rng.standard_normal((k, n)).astype(np.float32)
    c = rng.standard_normal((m, n)).astype(np.float32)
    got = run_mma_gemm(device, kind, a, b, c)
    ra, rb = round_inputs(kind, a, b)
    assert_mma_equal(device, got, ra, rb, c, SHAPES[kind][0])
    # against FP32 the error is the inputs' rounding: about 2^-11 (tf32) or 2^-8 (bf16) of |a| |b|
    unit = 2.0**-11 if kind == "tf32" else 2.0**-8
    np.testing.assert_array_less(np.abs(got - (a.astype(np.float64) @ b + c)),
                                 2 * unit * (np.abs(a) @ np.abs(b)) + 1e-5)


@pytest.mark.parametrize("kind", ["tf32", "bf16"])
def test_a_wrong_fragment_mapping_fails(kind):
    # Planted bug: the kernel puts A's registers 1 and 2 in each other's place.
    rng = np.random.default_rng(5)
    a = rng.standard_normal((16, 16)).astype(np.float32)
    b = rng.standard_normal((16, 8)).astype(np.float32)
    c = np.zeros((16, 8), np.float32)
    good = run_mma_gemm(EMU, kind, a, b, c)
    bad = run_mma_gemm(EMU, kind, a, b, c, swap_a_registers=True)
    ra, rb = round_inputs(kind, a, b)
    np.testing.assert_array_equal(good, mma_oracle(ra, rb, c, SHAPES[kind][0]))
    assert np.abs(bad - good).max() > 0.1


# ---- ldmatrix -------------------------------------------------------------------------------------------------
def ldmatrix_expected(matrix, row_offsets, count, trans):
    """Lane l's register i, by the ISA: lanes 8i..8i+7 give the rows of matrix i; lane l receives the 16-bit
    elements (l // 4, 2 (l % 4)) and (l // 4, 2 (l % 4) + 1), low half first; .trans: (2 (l % 4), l // 4) and
    (2 (l % 4) + 1, l // 4)."""
    out = np.zeros((32, 4), np.uint32)
    for lane in range(32):
        g, t = lane_roles(lane)
        for i in range(count):
            def element(row, col):
                return int(matrix[row_offsets[8 * i + row] + col])
            lo, hi = (element(2 * t, g), element(2 * t + 1, g)) if trans else (element(g, 2 * t), element(g, 2 * t + 1))
            out[lane, i] = lo | hi << 16
    return out


def run_ldmatrix(device, matrix, row_offsets, count, trans):
    m = device.asarray(matrix, np.uint16)
    offsets = device.asarray(np.asarray(row_offsets, np.int32), np.int32)
    out = device.zeros((32, 4), np.uint32)
    launch(device, "ldmatrix", m, matrix.size, offsets, count, trans, out)
    return device.to_numpy(out)


@pytest.mark.parametrize("trans", [False, True], ids=["plain", "trans"])
@pytest.mark.parametrize("count", [1, 2, 4])
@pytest.mark.parametrize("device", COMPILED_DEVICES)
def test_ldmatrix_fragments_follow_the_isa(device, count, trans):
    # Rows 24 elements apart (padded), each matrix's rows in a scrambled order: every lane's own address counts.
    rng = np.random.default_rng(count + 10 * trans)
    matrix = rng.permutation(np.arange(1, 4 * 8 * 24 + 1)).astype(np.uint16)
    order = [3, 0, 7, 5, 1, 6, 2, 4]
    offsets = [24 * (8 * (lane // 8) + order[lane % 8]) for lane in range(32)]
    offsets = [o if lane < 8 * count else 0 for lane, o in enumerate(offsets)]  # unused lanes: any row
    got = run_ldmatrix(device, matrix, offsets, count, trans)
    want = ldmatrix_expected(matrix, offsets, count, trans)
    np.testing.assert_array_equal(got[:, :count], want[:, :count])


@pytest.mark.parametrize("device", COMPILED_DEVICES)
def test_ldmatrix_x4_loads_the_tf32_a_fragment_of_a_row_major_tile(device):
    # A 16x8 float32 tile, row-major: an 8x8 b16 matrix is 8 rows of 4 floats, so lane l gets float (l // 4, l % 4) of
    # each: matrices (rows 0-7 | 8-15) x (columns 0-3 | 4-7) in the order of a0..a3.
    a = round_tf32(np.random.default_rng(2).standard_normal((16, 8)))
    halves = a.view(np.uint16).reshape(-1)
    offsets = [2 * (8 * ((lane % 8) + 8 * ((lane // 8) % 2)) + 4 * (lane // 16)) for lane in range(32)]
    got = run_ldmatrix(device, halves, offsets, 4, False)
    want = np.array([[a[tf32_a(lane, i)].view(np.uint32) for i in range(4)] for lane in range(32)])
    np.testing.assert_array_equal(got, want)


# ---- conversions ----------------------------------------------------------------------------------------------
def convert(device, kind, x):
    n = x.size
    out = device.zeros(n // 2 if kind == 2 else n, np.uint16 if kind == 1 else np.uint32)
    launch(device, "convert", kind, device.asarray(x, np.float32), out, n)
    return device.to_numpy(out)


@pytest.mark.parametrize("device", COMPILED_DEVICES)
def test_tf32_conversion_rounds_ties_away_from_zero(device):
    x = special_floats()
    got = convert(device, 0, x)
    assert_same_bits_or_both_nan(got, round_tf32(x).view(np.uint32), np.float32)
    assert not np.any(got & np.uint32(0x1FFF))  # the low 13 bits are zero, NaN included
    with np.errstate(invalid="ignore"):
        assert_same_bits_or_both_nan(got, tf32_by_arithmetic(x).view(np.uint32), np.float32)
    tie = np.array([0x3F801000, 0xBF801000, 0x3F803000], np.uint32).view(np.float32)
    assert convert(device, 0, tie).tolist() == [0x3F802000, 0xBF802000, 0x3F804000]


@pytest.mark.parametrize("device", COMPILED_DEVICES)
def test_bf16_conversion_matches_ml_dtypes(device):
    x = special_floats()
    with np.errstate(invalid="ignore"):  # NumPy warns on casting NaN
        want = x.astype(ml_dtypes.bfloat16).view(np.uint16)
    assert_same_bits_or_both_nan(convert(device, 1, x), want, ml_dtypes.bfloat16)
    packed = convert(device, 2, x)
    assert_same_bits_or_both_nan((packed & np.uint32(0xFFFF)).astype(np.uint16), want[0::2], ml_dtypes.bfloat16)
    assert_same_bits_or_both_nan((packed >> np.uint32(16)).astype(np.uint16), want[1::2], ml_dtypes.bfloat16)
    ties = np.array([0x3F808000, 0x3F818000], np.uint32).view(np.float32)  # to even: down, then up
    assert convert(device, 1, ties).tolist() == [0x3F80, 0x3F82]


# ---- cp.async ---------------------------------------------------------------------------------------------------
def run_pipeline(device, x, variant):
    tiles = x.size // probes(device).PIPELINE_TILE
    y = device.zeros(x.size, np.float32)
    launch(device, "pipeline_copy", device.asarray(x, np.float32), y, tiles, variant)
    return device.to_numpy(y)


def pipeline_input():
    return np.random.default_rng(4).standard_normal(5 * _emu.tensor_core_probes.PIPELINE_TILE).astype(np.float32)


@pytest.mark.parametrize("device", COMPILED_DEVICES)
def test_double_buffered_cp_async_pipeline_copies_every_tile(device):
    x = pipeline_input()
    want = x.reshape(5, -1)[:, ::-1].reshape(-1)
    for order, seed in [("forward", 0), ("reverse", 0), ("random", 1), ("random", 9)]:
        with schedule(device, order, seed):  # the emulator's orders; one run on a GPU
            np.testing.assert_array_equal(run_pipeline(device, x, 0), want)


@pytest.mark.parametrize("variant, bug", [(1, "no cp.async.wait_group"), (2, "no __syncthreads after the wait"),
                                          (3, "no __syncthreads before a stage is refilled")])
@pytest.mark.parametrize("order", SCHEDULES)
def test_planted_pipeline_bug_reads_poison(variant, bug, order):
    y = None
    with schedule(EMU, order, 3):
        y = run_pipeline(EMU, pipeline_input(), variant)
    assert np.isnan(y).any(), f"{bug}: the emulator should have shown poison under the {order} schedule"


def test_cp_async_data_is_visible_only_after_its_group_is_waited_for():
    x = np.arange(32 * 16, dtype=np.float32).reshape(32, 16) + 1
    out = np.zeros((4, 32, 16), np.float32)
    _emu.tensor_core_probes.cp_async_groups(x.ctypes.data, out.ctypes.data)
    nan = np.nan
    for t in (0, 17, 31):
        v = x[t]
        group0 = list(v[0:4])
        group1 = [v[4], v[5], v[8], nan]  # 8 + 4 bytes; the last float never written
        group2 = [v[12], 0.0, 0.0, 0.0]   # src-size 4: the rest zero-filled
        poison = [nan] * 4
        np.testing.assert_array_equal(out[0, t], group0 + poison + poison + poison)   # wait_group 2
        np.testing.assert_array_equal(out[1, t], group0 + group1 + poison + poison)   # wait_group 1
        np.testing.assert_array_equal(out[2, t], group0 + group1 + group2 + poison)   # wait_group 0: uncommitted copy
        np.testing.assert_array_equal(out[3, t], group0 + group1 + group2 + group0)   # committed, waited


# ---- misuse the emulator reports ----------------------------------------------------------------------------------
def case_line(name):
    for number, line in enumerate(PROBES_SOURCE.read_text().splitlines(), start=1):
        if line.rstrip().endswith(f"// CASE {name}"):
            return number
    raise AssertionError(f"no line marked {name!r} in {PROBES_SOURCE}")


ERRORS = {
    "ldmatrix_misaligned": "not 16-byte aligned",
    "ldmatrix_global": "not in this block's shared memory",
    "ldmatrix_mixed": r"ldmatrix with different qualifiers in one warp .*\.x2 at .*\.x4 at|\.x4 at .*\.x2 at",
    "mma_partial_warp": "do not exist",
    "mma_divergent": "warp collective deadlock",
    "cp_async_misaligned": "must be aligned to 16 bytes",
    "cp_async_global_destination": "not in this block's shared memory",
    "cp_async_src_size": "src-size 20 is outside",
}


def test_every_error_case_is_checked():
    assert sorted(_emu.tensor_core_probes.error_case_names()) == sorted(ERRORS)


@pytest.mark.parametrize("name", sorted(ERRORS))
def test_emulator_reports_misused_intrinsics_at_their_line(name):
    with pytest.raises(_emu.EmulatorError, match=ERRORS[name]) as err:
        _emu.tensor_core_probes.run_error_case(name)
    assert f"tensor_core_probes.cu:{case_line(name)}" in str(err.value)
