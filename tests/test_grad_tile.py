"""fastsft.kernels._grad_tile (pass B's matmul with the row kernel as its epilogue, interpreted on the CPU) against
the PyTorch math it replaces: odd sizes, a vocabulary slice not at column 0, softcap on and off, fp32 and bf16,
targets read directly or through a row index, ignored rows."""

import pytest
import torch

import fastsft.kernels._grad_tile as grad_tile_mod

# On a GPU machine the kernel runs compiled (tests/conftest.py sets the interpreter only where there is no GPU).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def reference(h, weight, v0, v1, targets, lse, scale, softcap):
    logits = (h.float() @ weight[v0:v1].float().T).to(h.dtype).float()  # stored in the input dtype, as cuBLAS does
    if softcap is not None:
        t = torch.tanh(logits / softcap)
        logits = softcap * t
    onehot = torch.zeros_like(logits)
    inside = (targets >= v0) & (targets < v1)
    onehot[inside.nonzero().squeeze(1), (targets[inside] - v0)] = 1.0
    g = torch.exp(logits - lse[:, None]) - onehot
    if softcap is not None:
        g = g * (1 - t * t)
    return torch.where((targets >= 0)[:, None], g * scale, torch.zeros_like(g))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("softcap", [None, 4.0])
@pytest.mark.parametrize("indexed", [False, True])
def test_matches_matmul_then_row_kernel(dtype, softcap, indexed):
    m, k, vocab, v0, v1 = 37, 45, 101, 13, 50  # no size a multiple of the interpreter's 16-wide blocks
    gen = torch.Generator().manual_seed(7 + 10 * indexed + (softcap is not None) + 100 * (dtype == torch.bfloat16))
    h = torch.randn(m, k, generator=gen).to(DEVICE, dtype)
    weight = (torch.randn(vocab, k, generator=gen) * 0.4).to(DEVICE, dtype)
    targets = torch.randint(0, vocab, (m,), generator=gen)
    targets[::5] = -1  # ignored rows get a zero gradient
    targets[1] = v0  # targets inside the slice, at its edges
    targets[2] = v1 - 1
    targets = targets.to(DEVICE)
    lse = (h.float() @ weight.float().T).logsumexp(dim=1) + 0.3
    scale = torch.tensor(0.37, device=DEVICE)
    out = torch.full((m, v1 - v0), float("nan"), dtype=dtype, device=DEVICE)  # every element must be written
    if indexed:  # the rows are a gathered subset of a longer batch: targets read through the row index
        batch = torch.full((3 * m,), -1, device=DEVICE)
        row_index = torch.randperm(3 * m, generator=gen)[:m].sort().values.to(DEVICE, torch.int32)
        batch[row_index.long()] = targets
        grad_tile_mod.grad_tile(h, weight, v0, v1, batch, lse, scale, out, softcap=softcap, row_index=row_index)
    else:
        grad_tile_mod.grad_tile(h, weight, v0, v1, targets, lse, scale, out, softcap=softcap)
    want = reference(h, weight, v0, v1, targets, lse, 0.37, softcap)
    assert torch.isfinite(out).all()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert ((out.float() - want).norm() / want.norm()).item() <= tol
    assert (out[targets == -1] == 0).all()


def test_writes_into_a_strided_view():
    # pass B's tiles are views into the dW or dh outputs: the row stride is the tile width, or not
    gen = torch.Generator().manual_seed(3)
    h, weight = torch.randn(20, 16, generator=gen).to(DEVICE), torch.randn(40, 16, generator=gen).to(DEVICE)
    targets = torch.randint(0, 40, (20,), generator=gen).to(DEVICE)
    lse = (h @ weight.T).logsumexp(dim=1)
    big = torch.zeros(20, 30, device=DEVICE)
    grad_tile_mod.grad_tile(h, weight, 5, 22, targets, lse, torch.tensor(1.0, device=DEVICE), big[:, 3:20])
    want = reference(h, weight, 5, 22, targets, lse, 1.0, None)
    assert torch.allclose(big[:, 3:20], want, atol=1e-5)  # fp32: an ieee dot, not tf32, on a GPU too
    assert (big[:, :3] == 0).all() and (big[:, 20:] == 0).all()  # nothing outside the view
