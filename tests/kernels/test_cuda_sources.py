"""Every CUDA source of kernels/cuda, as the launcher assembles it (preamble + common.cuh +
source) for each dtype and inner-product mode, compiled by nvcc for sm_90 (and the tensor-core
modes for sm_80): it must compile, and the kernels the released nets run must not spill
registers. Skipped, saying so, where nvcc is not installed (the CPU emulation tests run the same
sources either way). ptxas -v's registers per kernel are printed (pytest -s)."""
import re
import shutil
import subprocess

import pytest
import torch

import segaware_caffe.kernels.masked_conv as mc
from segaware_caffe.kernels import _cuda

NVCC = shutil.which("nvcc")
pytestmark = pytest.mark.skipif(NVCC is None, reason="needs nvcc (the CUDA toolkit) to compile "
                                                       "the kernel sources; none on PATH")

ROW_PLANE = ["im2dist.cu", "im2parity.cu", "dist_loss.cu", "norm_conv.cu", "meanfield.cu",
             "masked_conv_bands.cu"]


def compile_report(code, arch, tmp_path):
    """{kernel: (registers, spill bytes)} from ptxas -v."""
    source = tmp_path / "kernel.cu"
    source.write_text(code)
    result = subprocess.run([NVCC, f"-arch={arch}", "-cubin", "-std=c++14", "-Xptxas", "-v",
                             str(source), "-o", str(tmp_path / "kernel.cubin")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    report, current = {}, None
    for line in result.stderr.splitlines():
        match = re.search(r"Compiling entry function '(\w+)'", line)
        if match:
            current = match.group(1)
            report[current] = [0, 0]
        match = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if match and current:
            report[current][1] = int(match.group(1)) + int(match.group(2))
        match = re.search(r"Used (\d+) registers", line)
        if match and current:
            report[current][0] = int(match.group(1))
    return report


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ROW_PLANE)
def test_row_plane_sources_compile_without_spills(tmp_path, name, dtype):
    report = compile_report(_cuda.preamble(dtype) + _cuda.source(name), "sm_90", tmp_path)
    assert report
    for kernel, (registers, spilled) in report.items():
        assert spilled == 0, f"{kernel}: {spilled} bytes spilled ({registers} registers)"


@pytest.mark.parametrize("mode", ["tf32", "3xtf32", "bf16", "f16", "simt"])
def test_igemm_compiles_for_sm_90(tmp_path, mode):
    dtype = {"bf16": torch.bfloat16, "f16": torch.float16}.get(mode, torch.float32)
    report = compile_report(mc._igemm_code(dtype, mode), "sm_90", tmp_path)
    assert {"igemm_forward", "igemm_forward_aligned", "igemm_backward_input",
            "igemm_backward_input_aligned", "igemm_backward_mask",
            "igemm_backward_weight"} <= set(report)
    print({kernel: tuple(values) for kernel, values in sorted(report.items())})
    if mode != "simt":   # the FMA fallback (GPUs before sm_80) may spill a little
        for kernel, (registers, spilled) in report.items():
            assert spilled == 0, f"{mode} {kernel}: {spilled} bytes spilled"


def test_igemm_compiles_for_sm_80(tmp_path):
    """The mma.sync and conversion instructions exist from sm_80 (A100) on."""
    for mode, dtype in (("tf32", torch.float32), ("bf16", torch.bfloat16)):
        assert compile_report(mc._igemm_code(dtype, mode), "sm_80", tmp_path)


def ptx_divisions(code, tmp_path):
    """{kernel: number of 64-bit integer div / rem instructions} in the PTX of `code`."""
    source = tmp_path / "kernel.cu"
    source.write_text(code)
    subprocess.run([NVCC, "-arch=sm_90", "-ptx", "-std=c++14", str(source), "-o",
                    str(tmp_path / "kernel.ptx")], check=True, capture_output=True)
    counts = {}
    for chunk in (tmp_path / "kernel.ptx").read_text().split(".entry ")[1:]:
        name = re.match(r"(\w+)", chunk).group(1)
        counts[name] = len(re.findall(r"\b(?:div|rem)\.[su]64\b", chunk))
    return counts


def test_no_64_bit_division(tmp_path):
    """Indices inside a plane are 32-bit and rows are decoded once per row: no kernel divides
    64-bit integers, except the flat DistLoss loop (its trip count, computed once) and the
    weight gradient's split bounds (once per tile)."""
    allowed = {"dist_loss_terms": 1, "igemm_backward_weight": 2}
    for name in ROW_PLANE:
        for kernel, count in ptx_divisions(_cuda.preamble(torch.float64) + _cuda.source(name),
                                           tmp_path).items():
            assert count <= allowed.get(kernel, 0), f"{kernel}: {count} 64-bit div/rem"
    for mode, dtype in (("3xtf32", torch.float32), ("bf16", torch.bfloat16)):
        for kernel, count in ptx_divisions(mc._igemm_code(dtype, mode), tmp_path).items():
            assert count <= allowed.get(kernel, 0), f"{mode} {kernel}: {count} 64-bit div/rem"


def test_fma_fallback_compiles_before_sm_80(tmp_path):
    """GPUs before sm_80 (no tensor-core mma for these types) run the FMA tiles, half storage
    included: those variants must build for sm_75."""
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert compile_report(mc._igemm_code(dtype, "simt"), "sm_75", tmp_path)


def test_float64_igemm_compiles(tmp_path):
    assert compile_report(mc._igemm_code(torch.float64, "simt"), "sm_90", tmp_path)
