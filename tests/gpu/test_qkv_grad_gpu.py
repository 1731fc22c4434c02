"""kernels/qkv_grad.py compiled for the GPU, in bf16 and fp32: the kernel (autotuned through the custom op, and each
config) against its torch definition at d20's shape (32768 rows, 10 + 10 + 10 heads of 128) and odd ones; the fp8
q/k/v unit's forward, eager and compiled, with the bits q and k had before it (scaled_norm after apply_rotary), and
its compiled gradient against eager. Run on a GPU machine: `python -m pytest -q -m gpu tests`."""

import pytest
import torch

from fastsft.kernels import qkv_grad as qg
from fastsft.model import GPTConfig, _QKVForAttention
from tests.test_qkv_grad import SCALE, _operands, _qkv, before_unit

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

_D20 = GPTConfig.from_name("d20")
SHAPES = [(16 * 2048, _D20.n_head, _D20.n_kv_head, _D20.head_dim), (1000, 4, 2, 64), (777, 6, 3, 128), (5, 3, 1, 64)]


def _assert_close(got, want, dtype):
    """As the CPU test: one rounding each from fp32 values that differ in their last bits."""
    rtol = 2.0**-7 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=1e-6 * want.float().abs().max())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_equals_the_reference(shape, dtype):
    ops = _operands(*shape, dtype, device="cuda")
    want = qg.qkv_grad_reference(*ops, SCALE)
    launches = [None] + [qg.QKVGradLaunch(c.kwargs["BLOCK_M"], c.num_warps) for c in qg.CONFIGS]
    for launch in launches:  # None: the custom op, autotuned, as the step calls it
        got = qg.qkv_grad(*ops, SCALE, launch=launch)
        assert torch.equal(got[:, (shape[1] + shape[2]) * shape[3]:], ops[2].reshape(shape[0], -1))
        _assert_close(got, want, dtype)


@pytest.mark.parametrize("compiled", [False, True])
def test_unit_forward_has_the_bits_q_and_k_had_under_autocast(compiled):
    """d20's shape under CUDA autocast: rms_norm in fp32, q and k rounded to bf16 once, as before the unit."""
    M, n_head, n_kv_head, head_dim = SHAPES[0]
    qkv, cos, sin = _qkv(M, n_head, n_kv_head, head_dim, torch.bfloat16, seed=1, device="cuda")
    unit, before = _QKVForAttention.apply, before_unit
    if compiled:
        torch._dynamo.reset()
        unit, before = torch.compile(unit, fullgraph=True), torch.compile(before, fullgraph=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = unit(qkv.clone().requires_grad_(), cos, sin, n_head, n_kv_head, SCALE)
        want = before(qkv.clone().requires_grad_(), cos, sin, n_head, n_kv_head)
    for g, w in zip(got, want):
        assert g.dtype == torch.bfloat16 and torch.equal(g, w)


def test_unit_compiled_gradient_equals_eager():
    """inductor's graph around the custom op, under autocast, against eager; zeros for q and k's columns would be
    torch 2.11's dropped gradients (pytorch issue 180642)."""
    M, n_head, n_kv_head, head_dim = 4096, 4, 2, 128
    qkv, cos, sin = _qkv(M, n_head, n_kv_head, head_dim, torch.bfloat16, seed=2, device="cuda")
    weights = [torch.randn(n, head_dim, device="cuda") for n in (n_head, n_kv_head, n_kv_head)]

    def loss(t):
        outs = _QKVForAttention.apply(t, cos, sin, n_head, n_kv_head, SCALE)
        return sum(((o.float() * w).sum(-1) ** 2).sum() for o, w in zip(outs, weights))

    def grad_of(fn):
        x = qkv.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return torch.autograd.grad(fn(x), x)[0]

    torch._dynamo.reset()
    eager, compiled = grad_of(loss), grad_of(torch.compile(loss, fullgraph=True))
    rel = ((compiled.float() - eager.float()).norm() / eager.float().norm()).item()
    assert rel < 1e-2, rel  # bf16 roundings of the loss's inputs in another order; a dropped gradient reads 0.5+
