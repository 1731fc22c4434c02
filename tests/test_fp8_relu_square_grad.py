"""kernels/fp8_relu_square_grad.py: the fp8 MLP's dh quantized in both layouts, against its torch definition bit for
bit under the interpreter (odd sizes: partial tiles in both dimensions), and the MLP's gradients through it."""

import pytest
import torch

from fastsft import fp8
from fastsft.kernels import fp8_relu_square as rs
from fastsft.kernels import fp8_relu_square_grad as rg


def _operands(M, N, da_dtype, seed=0):
    """da, and a = relu(h)^2 in e4m3 with its inverse scale, as the MLP's forward leaves them."""
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(M, N, generator=g) * 3).to(da_dtype)
    r = torch.relu(h)
    scale = fp8.scale_for(r * r, fp8.E4M3)
    a, _ = rs.relu_square_fp8_reference(h, scale, fp8.E4M3)
    da = (torch.randn(M, N, generator=g) * 0.01).to(da_dtype)
    da[0, :3] = torch.tensor([0.0, -1e-30, 7.0])  # a zero, a value that underflows, the largest
    return da, a, scale.reciprocal()


def _bits(t):
    return t.view(torch.uint8)


@pytest.mark.parametrize("da_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("dtype", [fp8.E5M2, fp8.E4M3])
def test_kernels_equal_the_reference_bit_for_bit(da_dtype, dtype):
    da, a, a_inv = _operands(37, 70, da_dtype)
    q, qt, inv = rg.relu_square_grad_fp8(da, a, a_inv, dtype, launch=rg.DEFAULT_LAUNCH)
    ref, ref_t, ref_inv = rg.relu_square_grad_fp8_reference(da, a, a_inv, dtype)
    assert q.dtype == qt.dtype == dtype and q.shape == (37, 70) and qt.shape == (70, 37)
    assert torch.equal(_bits(q), _bits(ref)) and torch.equal(_bits(qt), _bits(ref_t))
    assert torch.equal(inv, ref_inv)
    assert (q.float() != 0).float().mean() > 0.4  # relu zeroes about half of dh; the scale kept the rest


def test_the_reference_is_fp8_quantize_of_dh():
    da, a, a_inv = _operands(24, 40, torch.bfloat16, seed=1)
    dh = (2 * torch.sqrt(a.float() * a_inv) * da).to(da.dtype)
    q, inv = fp8.quantize(dh, fp8.E5M2)
    ref, ref_t, ref_inv = rg.relu_square_grad_fp8_reference(da, a, a_inv, fp8.E5M2)
    assert torch.equal(_bits(ref), _bits(q)) and torch.equal(ref_inv, inv) and torch.equal(_bits(ref_t), _bits(q.t()))


def test_the_scale_is_torchs_number_over_tensor():
    """torch computes fmax / m as (1 / m) * fmax, two roundings: a maximum where that differs from one division."""
    fmax = torch.finfo(fp8.E5M2).max
    ones = torch.arange(1.0, 2.0, 2.0**-7).bfloat16().float()  # every bf16 value in [1, 2)
    two_step = ones.reciprocal() * fmax
    one_step = (torch.tensor(fmax, dtype=torch.float64) / ones.double()).float()
    m = ones[two_step != one_step][0]
    da = torch.full((18, 34), 0.01).bfloat16()
    da[4, 9] = m / 2  # dh = 2 da where a * a_inv = 1
    a, a_inv = torch.ones(18, 34).to(fp8.E4M3), torch.tensor(1.0)
    q, qt, inv = rg.relu_square_grad_fp8(da, a, a_inv, fp8.E5M2, launch=rg.DEFAULT_LAUNCH)
    _, _, ref_inv = rg.relu_square_grad_fp8_reference(da, a, a_inv, fp8.E5M2)
    assert torch.equal(inv, ref_inv) and torch.equal(inv, (m.reciprocal() * fmax).reciprocal())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_dh_gives_a_non_finite_result(bad):
    da, a, a_inv = _operands(20, 36, torch.bfloat16, seed=2)
    da[5, 7] = bad
    q, qt, inv = rg.relu_square_grad_fp8(da, a, a_inv, fp8.E5M2, launch=rg.DEFAULT_LAUNCH)
    # the maximum is not finite, so the scale is 0 and 1/s infinite: every matmul result from q is NaN
    assert not torch.isfinite(inv) and not torch.isfinite(q.float()).all() and not torch.isfinite(qt.float()).all()


def test_all_zero_da_gives_zeros_and_the_floor_scale():
    da, a, a_inv = _operands(17, 33, torch.bfloat16, seed=3)
    q, qt, inv = rg.relu_square_grad_fp8(torch.zeros_like(da), a, a_inv, fp8.E5M2, launch=rg.DEFAULT_LAUNCH)
    assert not q.float().any() and not qt.float().any()
    assert torch.equal(inv, (torch.finfo(fp8.E5M2).max / torch.tensor(1e-12)).reciprocal())


def test_bad_arguments_are_refused_by_name():
    da, a, a_inv = _operands(16, 32, torch.bfloat16)
    with pytest.raises(ValueError, match="row-major"):
        rg.relu_square_grad_fp8(da.t(), a, a_inv, fp8.E5M2)
    with pytest.raises(TypeError, match="must be one of"):
        rg.relu_square_grad_fp8(da, a.float(), a_inv, fp8.E5M2)
    with pytest.raises(ValueError, match="empty"):
        rg.relu_square_grad_fp8(da[:0], a[:0], a_inv, fp8.E5M2)
    with pytest.raises(ValueError, match="a_inv"):
        rg.relu_square_grad_fp8(da, a, a_inv.double(), fp8.E5M2)


def test_custom_op_compiles_and_matches_eager():
    da, a, a_inv = _operands(32, 48, torch.bfloat16, seed=4)
    f = lambda *t: rg.relu_square_grad_fp8(*t, fp8.E5M2)  # noqa: E731
    eager = f(da, a, a_inv)
    compiled = torch.compile(f, fullgraph=True)(da, a, a_inv)
    for e, c in zip(eager, compiled):
        assert torch.equal(e.view(torch.uint8) if e.dtype != torch.float32 else e,
                           c.view(torch.uint8) if c.dtype != torch.float32 else c)
