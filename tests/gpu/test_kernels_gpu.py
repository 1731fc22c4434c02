"""The Triton kernels compiled on the GPU, in bf16, at sizes where the GPU tile shapes (not the interpreter's small
ones) and odd edges both show: each against its PyTorch reference, and each asserting that its Triton path ran
(fastsft.kernels.paths). Run on a GPU machine: `python -m pytest -q -m gpu tests`."""

import pytest
import torch

from fastsft.kernels import AdamW, Muon, paths
from fastsft.kernels.adamw import adamw_reference_step
from fastsft.kernels.cross_entropy import cross_entropy, cross_entropy_reference
from fastsft.kernels.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_reference
from fastsft.kernels.muon import muon_reference_step, ns_coefficients

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

BF16_LOSS_TOL, BF16_GRAD_TOL = 2e-3, 2e-2  # as the CPU tests: bf16 rounding of logits and gradients


@pytest.fixture(autouse=True)
def reset_paths():
    paths.reset()


def rel_err(got, want):
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def targets_for(n, vocab, gen, ignored=0.5):
    targets = torch.randint(0, vocab, (n,), generator=gen)
    targets[torch.rand(n, generator=gen) < ignored] = -1
    targets[0], targets[1] = 0, vocab - 1  # the vocabulary's edges
    return targets.cuda()


@pytest.mark.parametrize("inplace_backward", [False, True])
def test_cross_entropy_bf16(inplace_backward):
    gen = torch.Generator().manual_seed(1)
    n, vocab = 1000, 50257  # vocabulary not a multiple of any block
    logits = (torch.randn(n, vocab, generator=gen) * 4).cuda().bfloat16()
    targets = targets_for(n, vocab, gen)
    results = []
    for fn, kw in ((cross_entropy, dict(inplace_backward=inplace_backward)), (cross_entropy_reference, {})):
        x = logits.clone().requires_grad_()
        loss, count = fn(x * 1, targets, 15.0, **kw)
        (loss * 0.37).backward()
        results.append((loss.float(), int(count), x.grad))
    assert paths.ran("cross_entropy") == paths.TRITON and paths.ran("cross_entropy_backward") == paths.TRITON
    (loss, count, grad), (ref_loss, ref_count, ref_grad) = results
    assert count == ref_count == int((targets >= 0).sum())
    assert abs(loss.item() - ref_loss.item()) <= BF16_LOSS_TOL * abs(ref_loss.item())
    assert grad.dtype == torch.bfloat16 and rel_err(grad, ref_grad) <= BF16_GRAD_TOL
    assert (grad[targets < 0] == 0).all()


@pytest.mark.parametrize("layout", ["low_memory", "fast"])
def test_linear_cross_entropy_bf16(layout):
    gen = torch.Generator().manual_seed(2)
    n, hidden_size, vocab = 3000, 384, 32771  # odd vocabulary: partial chunks and tiles in both passes
    hidden = torch.randn(n, hidden_size, generator=gen).cuda().bfloat16()
    weight = (torch.randn(vocab, hidden_size, generator=gen) * 0.05).cuda().bfloat16()
    targets = targets_for(n, vocab, gen, ignored=0.4)
    results = []
    for fn, kw in ((linear_cross_entropy, dict(layout=layout)), (linear_cross_entropy_reference, {})):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss, count = fn(h, w, targets, 15.0, **kw)
        (loss * 0.37).backward()
        results.append((loss.float(), int(count), h.grad, w.grad))
    assert paths.ran("linear_cross_entropy") == paths.TRITON
    (loss, count, dh, dw), (ref_loss, ref_count, ref_dh, ref_dw) = results
    assert count == ref_count
    assert abs(loss.item() - ref_loss.item()) <= BF16_LOSS_TOL * abs(ref_loss.item())
    assert rel_err(dh, ref_dh) <= BF16_GRAD_TOL and rel_err(dw, ref_dw) <= BF16_GRAD_TOL
    assert (dh[targets < 0] == 0).all()


def test_adamw_bf16_params_match_the_fp32_math_rounded_once():
    gen = torch.Generator().manual_seed(3)
    shapes = [(1000, 385), (4097,), (3, 7, 11)]  # ragged last tiles at the GPU block size
    params = [torch.randn(s, generator=gen).cuda().bfloat16().requires_grad_() for s in shapes]
    ref = [p.detach().clone() for p in params]
    moments = [(torch.zeros(s, device="cuda"), torch.zeros(s, device="cuda")) for s in shapes]
    opt = AdamW(params, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for step in range(1, 4):
        grads = [torch.randn(s, generator=gen).cuda().bfloat16() for s in shapes]
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        adamw_reference_step(ref, grads, [m for m, _ in moments], [v for _, v in moments], step, 1e-2, 0.9, 0.95,
                             1e-8, 0.1)
    assert paths.ran("adamw") == paths.TRITON
    for p, r, (m, v) in zip(params, ref, moments):
        torch.testing.assert_close(opt.state[p]["exp_avg"], m, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"], v, rtol=1e-5, atol=1e-7)
        ulp = r.float().abs() * 2.0**-7  # one bf16 step where the two fp32 results straddle a rounding tie
        assert ((p.float() - r.float()).abs() <= ulp + 1e-30).all()


def test_muon_bf16_params_match_the_reference_within_orthogonalization_noise():
    gen = torch.Generator().manual_seed(4)
    shapes = [(768, 768), (768, 768), (3072, 768), (768, 3072), (200, 72)]  # square x2 (one stack), tall, wide, odd
    params = [(0.02 * torch.randn(s, generator=gen)).cuda().bfloat16().requires_grad_() for s in shapes]
    ref = [p.detach().clone() for p in params]
    init = [p.detach().float().clone() for p in params]
    hyper = dict(lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.1)
    opt = Muon(params, ns_steps=5, **hyper)  # gram "triangle" on CUDA: the Triton Gram kernel
    buffers = [torch.zeros(1, *s, device="cuda") for s in shapes]
    for _ in range(2):
        grads = [torch.randn(s, generator=gen).cuda().bfloat16() for s in shapes]
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        for i in range(len(shapes)):
            muon_reference_step([ref[i]], [grads[i]], buffers[i], coefficients=ns_coefficients("polar_express", 5),
                                **hyper)
    assert paths.ran("muon") == paths.TRITON and paths.ran("muon_gram") == "triangle"
    for p, r, p0 in zip(params, ref, init):
        delta, delta_ref = p.float() - p0, r.float() - p0
        assert rel_err(delta, delta_ref) < 0.12  # bf16 orthogonalization noise, as the CPU test allows


def test_a_new_number_of_supervised_rows_does_not_compile_the_loss_again():
    """The linear loss (layout "fast", the default) over batches whose supervised-row counts differ in their
    divisibility by 16 (15, 16, 17, 32 of 64 rows): after the first batch, no Triton kernel of the loss compiles
    again (a compile is a slow step). A kernel compiled for the first time inside the block shows it is watched."""
    import triton
    import triton.language as tl

    from fastsft.profiling import triton_compiles

    @triton.jit
    def _fresh_kernel(x_ptr, n):
        tl.store(x_ptr + tl.arange(0, 16), tl.arange(0, 16).to(tl.float32), mask=tl.arange(0, 16) < n)

    with triton_compiles() as names:
        _fresh_kernel[(1,)](torch.empty(16, device="cuda"), 16)
        torch.cuda.synchronize()
    assert names == ["_fresh_kernel"]

    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(1000, 64, generator=gen).to("cuda", torch.bfloat16).requires_grad_()
    later = []
    for n_sup in (15, 16, 17, 32):
        targets = torch.full((64,), -1, dtype=torch.long)
        targets[torch.randperm(64, generator=gen)[:n_sup]] = torch.randint(0, 1000, (n_sup,), generator=gen)
        hidden = torch.randn(64, 64, generator=gen).to("cuda", torch.bfloat16).requires_grad_()
        with triton_compiles() as names:
            linear_cross_entropy(hidden, weight, targets.cuda(), layout="fast")[0].backward()
            torch.cuda.synchronize()
        if n_sup != 15:
            later += [(n_sup, name) for name in names]
    assert later == []
