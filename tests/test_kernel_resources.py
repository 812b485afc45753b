"""tools/kernel_resources.py: the compiler's resource report read right, and occupancy as the CUDA calculator gives
it (registers per warp in units of 256, shared memory in units of 128 bytes plus 1 KB per block)."""
import importlib.util
import shutil
import sys

import pytest

from helpers import ROOT

spec = importlib.util.spec_from_file_location("kernel_resources", ROOT / "tools" / "kernel_resources.py")
kr = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = kr
spec.loader.exec_module(kr)

REPORT = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_ZN7convnet39_GLOBAL__N__e456cbec_7_conv_cu_6673633110conv_igemmINS0_7WgradOpELi128ELi96ELi8ELi8ELi12ELi4EEEvNS0_10ConvParamsE' for 'sm_90'
ptxas info    : Function properties for _ZN7convnet39_GLOBAL__N__e456cbec_7_conv_cu_6673633110conv_igemmINS0_7WgradOpELi128ELi96ELi8ELi8ELi12ELi4EEEvNS0_10ConvParamsE
    8 bytes stack frame, 16 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 203 registers, used 1 barriers, 14848 bytes smem, 400 bytes cmem[0]
ptxas info    : Compiling entry function '_ZN7convnet43_GLOBAL__N__cb61a440_10_softmax_cu_426f2d3e10sum_kernelEPKfPfi' for 'sm_90'
ptxas info    : Function properties for _ZN7convnet43_GLOBAL__N__cb61a440_10_softmax_cu_426f2d3e10sum_kernelEPKfPfi
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 31 registers, used 1 barriers, 2048 bytes smem, 372 bytes cmem[0]
"""


def test_report_is_parsed_and_demangled():
    kernels = kr.parse(REPORT, "x.cu")
    kr.demangle(kernels)
    igemm, total = kernels
    assert (igemm.registers, igemm.smem, igemm.stack, igemm.spill_stores, igemm.spill_loads) == (203, 14848, 8, 16, 12)
    assert igemm.base == "conv_igemm" and igemm.threads == (128 // 8) * (96 // 12)
    assert (total.base, total.registers, total.smem, total.threads) == ("sum_kernel", 31, 2048, 256)


@pytest.mark.parametrize("name, registers, smem, arch, want", [
    ("sum_kernel", 32, 0, "90", (8, 1.0, "warps")),             # 256 threads, 8 warps a block: 8 blocks fill 64
    ("sum_kernel", 34, 0, "90", (6, 0.75, "registers")),        # 34 -> 5 x 256 per warp: 51 warps' worth, 6 blocks
    ("conv_dgrad_direct", 76, 43008, "90", (3, 0.375, "registers")),
    ("conv_dgrad_direct", 32, 43008, "86", (2, 16 / 48, "shared memory")),  # 100 KB / (42 KB + 1 KB)
    ("zero_ints_kernel", 8, 0, "90", (32, 0.5, "blocks")),      # one warp a block: the 32-block limit
])
def test_occupancy_matches_the_calculator(name, registers, smem, arch, want):
    k = kr.Kernel("x.cu", name, registers, smem, 0, 0, 0)
    blocks, frac, limit = kr.occupancy(k, arch)
    assert (blocks, limit) == (want[0], want[2]) and frac == pytest.approx(want[1])


def test_unknown_block_size_is_said():
    assert kr.occupancy(kr.Kernel("x.cu", "new_kernel(float*)", 32, 0, 0, 0, 0), "90") is None


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc")
def test_report_from_nvcc(monkeypatch, capsys):
    """End to end on the smallest kernel file (about a second of nvcc): every kernel found, its block size known."""
    monkeypatch.setattr(kr, "KERNEL_SOURCES", [ROOT / "csrc" / "kernels" / "softmax.cu"])
    assert kr.main(["--arch", "90"]) == 0
    out = capsys.readouterr().out
    for kernel in ("softmax_xent_kernel<float>", "softmax_xent_kernel<__nv_bfloat16>", "topk_kernel", "sum_kernel",
                   "zero_ints_kernel"):
        assert f"`{kernel}`" in out
    assert "block size unknown" not in out and "5 kernel instances; 0 spill" in out
