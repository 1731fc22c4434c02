"""GPU attention backends against the exact fallback (`sdpa_segments`), forward and backward, on a packed stream
with odd segment lengths, a one-token segment, padding entries in cu_seqlens, an uncovered tail, grouped-query heads
and sliding windows. Every backend available here is tested (flash-attn-4 when importable, torch's varlen always
on CUDA); each is held to twice the bf16 error of the fallback itself run in bf16, both measured against the
fallback in float64. Run on a GPU machine: `python -m pytest -q -m gpu tests`."""

import pytest
import torch

from fastsft.attention import BACKENDS, available_backends, varlen_attention

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

LENGTHS = [1, 7, 130, 257, 33, 2]  # odd, single-token, across 128-blocks
TAIL = 5  # tokens past cu_seqlens[-1]: no segment, must come back as zeros (and get zero gradients)
PAD_ENTRIES = 3  # cu_seqlens padded by repeating the total, as the packer makes it
MAX_SEQLEN = 512  # a constant above the longest segment, as the model passes it
FAST_BACKENDS = [name for name in BACKENDS if name != "sdpa_segments"]


def packed_case(n_head, n_kv_head, head_dim, seed):
    g = torch.Generator().manual_seed(seed)
    n = sum(LENGTHS) + TAIL
    q, k, v = (torch.randn(n, h, head_dim, generator=g) for h in (n_head, n_kv_head, n_kv_head))
    dout = torch.randn(n, n_head, head_dim, generator=g)
    bounds = [0]
    for length in LENGTHS:
        bounds.append(bounds[-1] + length)
    cu = torch.tensor(bounds + [bounds[-1]] * PAD_ENTRIES, dtype=torch.int32)
    return [t.cuda() for t in (q, k, v, dout, cu)]


def forward_backward(backend, q, k, v, dout, cu, window, dtype):
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    out = varlen_attention(q, k, v, cu, MAX_SEQLEN, window, backend=backend)
    out.backward(dout.to(out.dtype))
    return [t.double() for t in (out, q.grad, k.grad, v.grad)]


def rel_err(x, want):
    return ((x - want).norm() / want.norm()).item()


@pytest.mark.parametrize("window", [-1, 37])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2)])
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_backend_matches_exact_fallback(backend, heads, window):
    if backend not in available_backends("cuda"):
        pytest.skip(f"{backend} is not available here (available: {available_backends('cuda')})")
    head_dim = 128
    case = packed_case(*heads, head_dim, seed=window + 10 * heads[1])
    gold = forward_backward("sdpa_segments", *case, window, torch.float64)
    fallback_bf16 = forward_backward("sdpa_segments", *case, window, torch.bfloat16)
    got = forward_backward(backend, *case, window, torch.bfloat16)
    covered = sum(LENGTHS)
    for name, x, ref, want in zip(("out", "dq", "dk", "dv"), got, fallback_bf16, gold):
        assert torch.isfinite(x).all(), f"{backend} {name}: not finite"
        assert (x[covered:] == 0).all(), f"{backend} {name}: the uncovered tail is not zero"
        err, base = rel_err(x[:covered], want[:covered]), rel_err(ref[:covered], want[:covered])
        assert err <= 2 * base + 2e-3, f"{backend} {name}: error {err:.2e}, the bf16 fallback's {base:.2e}"
