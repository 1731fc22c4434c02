"""kernels/fp8_cast.py: the two-layout fp8 cast against its torch definition, bit for bit, under the interpreter
(odd sizes: partial tiles in both dimensions), and the custom op as the fp8 projections call it."""

import pytest
import torch

from fastsft import fp8
from fastsft.kernels import fp8_cast

DTYPES = [torch.float8_e4m3fn, torch.float8_e5m2]


def _input(M, N, dtype, fp8_dtype=fp8.E4M3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, N, generator=g) * 3
    # the largest magnitude (40, so the scale is fmax / 40), a zero, and three values that scale into fp8's
    # subnormal range (the tie 2.5 steps rounds to even)
    info = torch.finfo(fp8_dtype)
    step = info.smallest_normal * info.eps / (info.max / 40)
    x[0, :5] = torch.tensor([40.0, 0.0, 1.5 * step, 2.5 * step, -7.25 * step])
    return x.to(dtype)


def _bits(t):
    return t.view(torch.uint8)


@pytest.mark.parametrize("fp8_dtype", DTYPES)
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("relu_square", [False, True])
def test_kernel_equals_the_reference_bit_for_bit(fp8_dtype, x_dtype, relu_square):
    x = _input(37, 70, x_dtype, fp8_dtype)
    a = torch.relu(x) * torch.relu(x) if relu_square else x
    scale = fp8.scale_for(a, fp8_dtype)
    q, qt = fp8_cast.cast_fp8(x, scale, fp8_dtype, relu_square=relu_square, launch=fp8_cast.DEFAULT_LAUNCH)
    ref_q, ref_qt = fp8_cast.cast_reference(x, scale, fp8_dtype, relu_square)
    assert q.dtype == qt.dtype == fp8_dtype and q.shape == (37, 70) and qt.shape == (70, 37)
    assert torch.equal(_bits(q), _bits(ref_q)) and torch.equal(_bits(qt), _bits(ref_qt))
    assert float(q.float().abs().max()) == torch.finfo(fp8_dtype).max
    if not relu_square:
        assert bool((q.float()[0, 2:5] != 0).all()), "subnormal values flushed to zero"


def test_one_layout_only_and_a_strided_input():
    base = _input(48, 96, torch.bfloat16)
    x = base[:, 8:72]  # row stride 96: the kernel reads through it
    scale = fp8.scale_for(x, fp8.E4M3)
    ref_q, ref_qt = fp8_cast.cast_reference(x, scale, fp8.E4M3)
    q, empty = fp8_cast.cast_fp8(x, scale, fp8.E4M3, cols=False, launch=fp8_cast.DEFAULT_LAUNCH)
    assert torch.equal(_bits(q), _bits(ref_q)) and empty.numel() == 0
    empty, qt = fp8_cast.cast_fp8(x, scale, fp8.E4M3, rows=False, launch=fp8_cast.DEFAULT_LAUNCH)
    assert torch.equal(_bits(qt), _bits(ref_qt)) and empty.numel() == 0


def test_saturates():
    # (NaN staying NaN is checked on the GPU: the interpreter's own fp8 conversion turns NaN into a number)
    x = torch.tensor([[1.0, -1.0, 0.25, 0.5] * 4], dtype=torch.bfloat16)
    scale = torch.tensor(1000.0)  # 1000 > 448: both signs clamp to the format's max
    q, _ = fp8_cast.cast_fp8(x, scale, fp8.E4M3, launch=fp8_cast.DEFAULT_LAUNCH)
    assert q.float()[0, :4].tolist() == [448, -448, 256, 448]


def test_the_op_compiles_and_matches_the_reference():
    x = _input(64, 48, torch.bfloat16)
    scale = fp8.scale_for(x, fp8.E5M2)
    q, qt = torch.compile(fp8_cast.cast_fp8, fullgraph=True)(x, scale, fp8.E5M2)
    ref_q, ref_qt = fp8_cast.cast_reference(x, scale, fp8.E5M2)
    assert torch.equal(_bits(q), _bits(ref_q)) and torch.equal(_bits(qt), _bits(ref_qt))


def test_bad_arguments_name_the_problem():
    x = torch.randn(16, 32)
    with pytest.raises(ValueError, match="row-major"):
        fp8_cast.cast_fp8(x.t(), torch.tensor(1.0), fp8.E4M3)
    with pytest.raises(TypeError, match="dtype"):
        fp8_cast.cast_fp8(x, torch.tensor(1.0), torch.bfloat16)
    with pytest.raises(ValueError, match="scale"):
        fp8_cast.cast_fp8(x, torch.ones(2), fp8.E4M3)
