"""fastsft.fp8 on the GPU: cuBLAS's fp8 kernels (their operand layouts and scales) against the float64 product of
the same fp8 operands, eager and compiled, at sizes that are multiples of 16 but not of the kernels' tiles. The
tensor cores accumulate fp8 products with fewer bits than fp32 (1e-4 relative seen on an H200): a matmul is held to
1e-3. The MLP's second matmuls are held to 5e-2: their fp8 operands are quantized from the first's output, which
differs from float64's by that 1e-4 and its amax with it, so some elements round to the neighbouring fp8 value
(4.4e-3 seen for the output on an H200). A wrong layout or scale gives errors of order 1."""

import pytest
import torch
import torch.nn.functional as F

from fastsft import fp8
from tests.test_fp8 import _deq, _leaves, _rel

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
              pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9),
                                 reason="fp8 matmuls need compute capability 8.9+")]


TOL, MLP_TOL = 1e-3, 5e-2


@pytest.mark.parametrize("compiled", [False, True])
def test_linear_and_mlp_match_the_float64_product_of_their_fp8_operands(compiled):
    M, C = 208, 80
    x, w, w_fc, w_proj = _leaves((M, C), (3 * C, C), (4 * C, C), (C, 4 * C), device="cuda")
    lin = torch.compile(fp8.linear, fullgraph=True) if compiled else fp8.linear
    mlp = torch.compile(fp8.relu_square_mlp, fullgraph=True) if compiled else fp8.relu_square_mlp

    y = lin(x, w, True)
    g = torch.randn_like(y)
    y.backward(g)
    xd, wd, gd = _deq(x.detach(), fp8.E4M3), _deq(w.detach(), fp8.E4M3), _deq(g, fp8.E5M2)
    assert _rel(y, xd @ wd.T) < TOL
    assert _rel(x.grad, gd @ wd) < TOL
    assert _rel(w.grad, gd.T @ xd) < TOL

    x.grad = None
    y = mlp(x, w_fc, w_proj)
    g = torch.randn_like(y)
    y.backward(g)
    fc, proj = _deq(w_fc.detach(), fp8.E4M3), _deq(w_proj.detach(), fp8.E4M3)
    h = (xd @ fc.T).float()
    a = _deq(F.relu(h).square(), fp8.E4M3)
    assert _rel(y, a @ proj.T) < MLP_TOL
    gd = _deq(g, fp8.E5M2)
    dh = _deq(2 * a.sqrt() * (gd @ proj), fp8.E5M2)
    assert _rel(w_proj.grad, gd.T @ a) < MLP_TOL
    assert _rel(x.grad, dh @ fc) < MLP_TOL
    assert _rel(w_fc.grad, dh.T @ xd) < MLP_TOL


def test_bf16_autocast_output_near_full_precision():
    x, w = _leaves((4096, 1280), (3840, 1280), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = torch.compile(fp8.linear, fullgraph=True)(x, w, True)
    assert y.dtype == torch.bfloat16
    assert _rel(y.float(), x.detach() @ w.detach().T) < 0.06


@pytest.mark.parametrize("h_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("dtype", [fp8.E4M3, fp8.E5M2])
def test_relu_square_kernel_equals_its_definition_bit_for_bit(dtype, h_dtype):
    from fastsft.kernels import fp8_relu_square as rs

    h = (torch.randn(1000, 1304, device="cuda") * 3).to(h_dtype)  # partial tiles in both dimensions
    scale = fp8.scale_for(torch.relu(h[1:]) * torch.relu(h[1:]), dtype)
    h[0, :2] = float("nan")
    ref, ref_t = rs.relu_square_fp8_reference(h, scale, dtype)
    for rows, cols in ((True, True), (True, False), (False, True)):
        a, at = rs.relu_square_fp8(h, scale, dtype, rows=rows, cols=cols)
        if rows:
            assert torch.equal(a.view(torch.uint8), ref.view(torch.uint8))
            assert bool(torch.isnan(a.float()[0, :2]).all())
        if cols:
            assert torch.equal(at.view(torch.uint8), ref_t.view(torch.uint8))


@pytest.mark.parametrize("da_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dtype", [fp8.E5M2, fp8.E4M3])
def test_relu_square_grad_kernels_equal_their_definition_bit_for_bit(dtype, da_dtype):
    from fastsft.kernels import fp8_relu_square as rs
    from fastsft.kernels import fp8_relu_square_grad as rg

    h = (torch.randn(1000, 1304, device="cuda") * 3).to(da_dtype)  # partial tiles in both dimensions
    a_scale = fp8.scale_for(torch.relu(h) * torch.relu(h), fp8.E4M3)
    a, _ = rs.relu_square_fp8(h, a_scale, fp8.E4M3)
    da = (torch.randn(1000, 1304, device="cuda") * 1e-3).to(da_dtype)
    ref, ref_t, ref_inv = rg.relu_square_grad_fp8_reference(da, a, a_scale.reciprocal(), dtype)
    q, qt, inv = rg.relu_square_grad_fp8(da, a, a_scale.reciprocal(), dtype)
    assert torch.equal(q.view(torch.uint8), ref.view(torch.uint8))
    assert torch.equal(qt.view(torch.uint8), ref_t.view(torch.uint8))
    assert torch.equal(inv, ref_inv)
    da[3, 5] = float("nan")
    q, qt, inv = rg.relu_square_grad_fp8(da, a, a_scale.reciprocal(), dtype)
    assert not torch.isfinite(inv) and not bool(torch.isfinite(q.float()).all())


def _grad_launches():
    """Every config of both autotuned kernels, as fixed launches (the max configs paired round the cast's)."""
    from fastsft.kernels import fp8_relu_square_grad as rg

    maxes, casts = rg.MAX_CONFIGS, rg.CAST_CONFIGS
    return [rg.GradLaunch(m.kwargs["BLOCK"], m.kwargs["PROGRAMS_PER_SM"], m.num_warps, c.kwargs["BLOCK_M"],
                          c.kwargs["BLOCK_N"], c.num_warps, c.kwargs["M_FASTEST"])
            for m, c in zip(maxes * len(casts), casts)]


@pytest.mark.parametrize("launch", _grad_launches(), ids=str)
def test_relu_square_grad_every_config_is_bit_exact(launch):
    from fastsft.kernels import fp8_relu_square as rs
    from fastsft.kernels import fp8_relu_square_grad as rg

    h = torch.randn(1000, 1304, device="cuda").bfloat16() * 3  # partial tiles in both dimensions
    a_scale = fp8.scale_for(torch.relu(h) * torch.relu(h), fp8.E4M3)
    a, _ = rs.relu_square_fp8(h, a_scale, fp8.E4M3)
    da = (torch.randn(1000, 1304, device="cuda") * 1e-3).bfloat16()
    ref, ref_t, ref_inv = rg.relu_square_grad_fp8_reference(da, a, a_scale.reciprocal(), fp8.E5M2)
    q, qt, inv = rg.relu_square_grad_fp8(da, a, a_scale.reciprocal(), fp8.E5M2, launch=launch)
    assert torch.equal(q.view(torch.uint8), ref.view(torch.uint8))
    assert torch.equal(qt.view(torch.uint8), ref_t.view(torch.uint8)) and torch.equal(inv, ref_inv)


@pytest.mark.parametrize("a_dtype", [fp8.E4M3, fp8.E5M2])
def test_relu_square_grad_root_is_torchs_on_every_fp8_value(a_dtype):
    """The kernels' root (ptxas's sqrt.rn fast path, rescaled by a power of two) against torch's on every value a can
    hold, each made the largest in turn through da, at scales under, inside and over the fast path's range."""
    from fastsft.kernels import fp8_relu_square_grad as rg

    values = torch.arange(256, dtype=torch.uint8, device="cuda").view(a_dtype)
    a = values[torch.isfinite(values.float()) & (values.float() > 0)]
    n = a.numel()
    a = a.repeat(n, 1).contiguous()  # row i: every value; da picks out value i as the largest dh
    da = torch.full((n, n), 2.0**-30, device="cuda").bfloat16()
    da.diagonal().fill_(1.0)
    for a_inv in (2.0**-120, 2.0**-81, 2.0**-79, 0.37, 3.0, 2.0**99, 2.0**101, 2.0**110):
        a_inv = torch.tensor(a_inv, device="cuda")
        for row in range(n):
            pick = da[row:row + 1].contiguous()
            ref, _, ref_inv = rg.relu_square_grad_fp8_reference(pick, a[:1], a_inv, fp8.E5M2)
            q, _, inv = rg.relu_square_grad_fp8(pick, a[:1], a_inv, fp8.E5M2)
            assert torch.equal(inv, ref_inv) and torch.equal(q.view(torch.uint8), ref.view(torch.uint8))
