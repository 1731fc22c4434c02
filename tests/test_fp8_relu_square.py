"""kernels/fp8_relu_square.py: relu(h)^2 quantized to fp8 in both layouts, against its torch definition bit for bit
under the interpreter (odd sizes: partial tiles in both dimensions), and the custom op as the fp8 MLP calls it."""

import pytest
import torch

from fastsft import fp8
from fastsft.kernels import fp8_relu_square as rs

DTYPES = [torch.float8_e4m3fn, torch.float8_e5m2]


def _h(M, N, dtype, fp8_dtype=fp8.E4M3, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(M, N, generator=g) * 3
    # the largest relu(h)^2 (40^2, so the scale is fmax / 1600), a zero, a negative, and three values whose
    # squares scale into fp8's subnormal range (the middle one a tie that rounds to even)
    info = torch.finfo(fp8_dtype)
    step = info.smallest_normal * info.eps / (info.max / 1600)
    h[0, :6] = torch.tensor([40.0, 0.0, -5.0, (1.5 * step) ** 0.5, (2.5 * step) ** 0.5, (7.25 * step) ** 0.5])
    return h.to(dtype)


def _scale(h, fp8_dtype):
    r = torch.relu(h)
    return fp8.scale_for(r * r, fp8_dtype)


def _bits(t):
    return t.view(torch.uint8)


@pytest.mark.parametrize("fp8_dtype", DTYPES)
@pytest.mark.parametrize("h_dtype", [torch.bfloat16, torch.float32])
def test_kernel_equals_the_reference_bit_for_bit(fp8_dtype, h_dtype):
    h = _h(37, 70, h_dtype, fp8_dtype)
    scale = _scale(h, fp8_dtype)
    a, at = rs.relu_square_fp8(h, scale, fp8_dtype, launch=rs.DEFAULT_LAUNCH)
    ref, ref_t = rs.relu_square_fp8_reference(h, scale, fp8_dtype)
    assert a.dtype == at.dtype == fp8_dtype and a.shape == (37, 70) and at.shape == (70, 37)
    assert torch.equal(_bits(a), _bits(ref)) and torch.equal(_bits(at), _bits(ref_t))
    assert float(a.float().max()) == torch.finfo(fp8_dtype).max and float(a.float().min()) == 0
    if h_dtype == torch.float32:  # bf16 rounds the tiny squares off the grid points this test aims at
        assert bool((a.float()[0, 3:6] != 0).all()), "subnormal values flushed to zero"


def test_one_layout_only_and_a_strided_input():
    base = _h(48, 96, torch.bfloat16)
    h = base[:, 0:64]  # row stride 96: the kernel reads through it
    scale = _scale(h, fp8.E4M3)
    ref, ref_t = rs.relu_square_fp8_reference(h, scale, fp8.E4M3)
    a, empty = rs.relu_square_fp8(h, scale, fp8.E4M3, cols=False, launch=rs.DEFAULT_LAUNCH)
    assert torch.equal(_bits(a), _bits(ref)) and empty.numel() == 0
    empty, at = rs.relu_square_fp8(h, scale, fp8.E4M3, rows=False, launch=rs.DEFAULT_LAUNCH)
    assert torch.equal(_bits(at), _bits(ref_t)) and empty.numel() == 0


def test_saturates():
    # (NaN staying NaN is checked on the GPU: the interpreter's own fp8 conversion turns NaN into a number)
    h = torch.tensor([[1.0, -1.0, 0.5, 0.25] * 4], dtype=torch.bfloat16)
    a, _ = rs.relu_square_fp8(h, torch.tensor(1000.0), fp8.E4M3, launch=rs.DEFAULT_LAUNCH)
    assert a.float()[0, :4].tolist() == [448, 0, 256, 64]  # 1000 > 448 clamps; 250 rounds to 256; 62.5 to 64


def test_the_op_dispatches_and_compiles_in_one_graph():
    """Through the custom op (its fake under torch.compile, fullgraph): on the CPU the op runs the torch
    definition, so this checks the op's plumbing and layouts; the kernel inside it is checked on the GPU
    (tests/gpu/test_fp8_gpu.py)."""
    h = _h(64, 48, torch.bfloat16)
    scale = _scale(h, fp8.E5M2)
    a, at = torch.compile(rs.relu_square_fp8, fullgraph=True)(h, scale, fp8.E5M2)
    ref, ref_t = rs.relu_square_fp8_reference(h, scale, fp8.E5M2)
    assert torch.equal(_bits(a), _bits(ref)) and torch.equal(_bits(at), _bits(ref_t))


@pytest.mark.parametrize("shape", [(1, 32), (16, 1)])
def test_a_single_row_or_column_gives_two_tensors(shape):
    """a^T of a one-row matrix is the same memory as a; the op must still return two (no alias between outputs)."""
    h = torch.randn(*shape, dtype=torch.bfloat16)
    scale = _scale(h, fp8.E4M3)
    a, at = rs.relu_square_fp8(h, scale, fp8.E4M3)
    ref, _ = rs.relu_square_fp8_reference(h, scale, fp8.E4M3)
    assert torch.equal(_bits(a), _bits(ref)) and torch.equal(_bits(at), _bits(ref.t().contiguous()))
    assert a.data_ptr() != at.data_ptr()


def test_bad_arguments_name_the_problem():
    h = torch.randn(16, 32)
    with pytest.raises(ValueError, match="row-major"):
        rs.relu_square_fp8(h.t(), torch.tensor(1.0), fp8.E4M3)
    with pytest.raises(TypeError, match="dtype"):
        rs.relu_square_fp8(h, torch.tensor(1.0), torch.bfloat16)
    with pytest.raises(ValueError, match="scale"):
        rs.relu_square_fp8(h, torch.ones(2), fp8.E4M3)
