"""The model's pieces under CUDA autocast, where rms_norm runs in fp32 (autocast's fp32 list)."""
import pytest
import torch
import torch.nn.functional as F

from fastsft.model import scaled_norm

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("size", [1.0, 0.003])  # small rows: there rms_norm's eps matters
def test_scaled_norm_under_autocast_has_the_bits_attention_got_before(size):
    x = (torch.randn(1000, 10, 128, device="cuda") * size).bfloat16().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = scaled_norm(x, 1.2)
        before = (F.rms_norm(x.detach(), (128,)) * 1.2).bfloat16()  # norm in fp32, scaled, cast by attention
    assert out.dtype == torch.bfloat16 and torch.equal(out, before)
    grad = torch.randn_like(out)
    out.backward(grad)
    xf = x.detach().float().requires_grad_()
    (F.rms_norm(xf, (128,)) * 1.2).backward(grad.float())
    assert (x.grad.float() - xf.grad).norm() / xf.grad.norm() < 1e-2
