"""fastsft.kernels.Muon against the plain-PyTorch reference of the same math (kernels/muon.py).

The elementwise stages (momentum, Nesterov blend, bf16 cast + transpose, Frobenius norm, shape-scaled cautious
update) are checked tightly with the orthogonalization switched off (zero iterations), so both sides see the same
bf16 input; the full step is then checked within bf16 orthogonalization noise, and the orthogonalization itself
by the singular values it produces. The Triton Gram kernel (lower-triangle tiles mirrored, fused epilogue) is
checked against float64 products of the same bf16 inputs, in both layouts. Odd shapes: several matrices of one
shape (one stacked launch), tall, wide. Under the interpreter the optimizer defaults to torch's bmm for the Gram
products (a Gram program costs ~20 ms there), so the tests that exercise the Triton kernel ask for it. Every
comparison asserts which path ran (fastsft.kernels.paths): where Triton cannot run, the optimizer takes the
reference step, and a comparison with the reference would compare it with itself.
"""

import copy

import pytest
import torch

from fastsft.kernels import Muon, paths
from fastsft.kernels.muon import (
    MuonWorkspace,
    gram_,
    lr_shape_scale,
    muon_reference_step,
    muon_update_stacked,
    ns_coefficients,
    orthogonalize_,
    orthogonalize_reference,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SHAPES = [(13, 29), (13, 29), (13, 29), (37, 11), (37, 11), (24, 24)]  # wide x3, tall x2, square


@pytest.fixture(autouse=True)
def reset_paths():
    paths.reset()


def assert_kernel_ran(gram=None):
    assert paths.ran("muon") == paths.TRITON, f"Muon took the {paths.ran('muon')} path, not the Triton kernels"
    if gram is not None:
        assert paths.ran("muon_gram") == gram, f"the Gram products ran as {paths.ran('muon_gram')}, not {gram}"


def make_params(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(0.1 * torch.randn(s, generator=g)).to(DEVICE, dtype).requires_grad_() for s in SHAPES]


def grads_for(step, dtype=torch.float32):
    g = torch.Generator().manual_seed(500 + step)
    return [torch.randn(s, generator=g).to(DEVICE, dtype) for s in SHAPES]


def stacks():
    """Indices of SHAPES grouped by shape, in first-seen order."""
    out = {}
    for i, s in enumerate(SHAPES):
        out.setdefault(s, []).append(i)
    return out


@pytest.mark.parametrize("nesterov", [True, False])
def test_elementwise_stages_match_reference(nesterov):
    hyper = dict(lr=0.05, momentum=0.9, nesterov=nesterov, coefficients=(), weight_decay=0.2)
    ours = [p.detach().clone() for p in make_params()]
    ref = [p.detach().clone() for p in ours]
    bufs = {s: torch.zeros(len(idx), *s, device=DEVICE) for s, idx in stacks().items()}
    ref_bufs = {s: b.clone() for s, b in bufs.items()}
    workspaces = {s: MuonWorkspace(len(idx), *s, DEVICE) for s, idx in stacks().items()}
    for step in range(3):
        grads = grads_for(step)
        for s, idx in stacks().items():
            # block=128: several blocks per matrix, the last one ragged (377, 407, 576 elements).
            muon_update_stacked([ours[i] for i in idx], [grads[i] for i in idx], bufs[s], workspaces[s], block=128,
                                **hyper)
            muon_reference_step([ref[i] for i in idx], [grads[i] for i in idx], ref_bufs[s], **hyper)
    assert_kernel_ran()
    for s in bufs:
        torch.testing.assert_close(bufs[s], ref_bufs[s], rtol=1e-6, atol=1e-7)
    for p, q, init in zip(ours, ref, make_params()):
        # One bf16 step of the normalized update (the norm is summed in another order) times lr.
        torch.testing.assert_close(p, q, rtol=0, atol=0.05 * 2 * 2.0**-8 * 0.5)
        assert (p - init).abs().max() > 1e-3


@pytest.mark.parametrize("dtype, gram", [(torch.float32, "triangle"), (torch.bfloat16, "bmm")])
def test_full_step_matches_reference(dtype, gram):
    hyper = dict(lr=0.05, momentum=0.95, nesterov=True, weight_decay=0.1)
    coefficients = ns_coefficients("polar_express", 5)
    ours = make_params(dtype)
    ref = [p.detach().clone() for p in ours]
    init = [p.detach().float().clone() for p in ours]
    ref_bufs = {s: torch.zeros(len(idx), *s, device=DEVICE) for s, idx in stacks().items()}
    opt = Muon(ours, ns_steps=5, gram=gram, **hyper)
    for step in range(3):
        grads = grads_for(step, dtype)
        for p, g in zip(ours, grads):
            p.grad = g
        opt.step()
        assert_kernel_ran(gram)
        for s, idx in stacks().items():
            muon_reference_step([ref[i] for i in idx], [grads[i] for i in idx], ref_bufs[s],
                                coefficients=coefficients, **hyper)
    assert len(opt._stacks) == 3  # one stacked launch per shape
    for s, idx in stacks().items():
        ours_buf = torch.stack([opt.state[ours[i]]["momentum_buffer"] for i in idx])
        assert ours_buf.dtype == torch.float32
        torch.testing.assert_close(ours_buf, ref_bufs[s], rtol=1e-6, atol=1e-7)
    for p, q, p0 in zip(ours, ref, init):
        delta, delta_ref = p.float() - p0, q.float() - p0
        rel = ((delta - delta_ref).norm() / delta_ref.norm()).item()
        assert rel < (0.08 if dtype == torch.float32 else 0.12), rel


@pytest.mark.parametrize("name, lo, hi", [("polar_express", 0.8, 1.2), ("newton_schulz", 0.6, 1.25)])
def test_one_step_update_is_nearly_orthogonal(name, lo, hi):
    lr = 0.01
    params = make_params()
    before = [p.detach().clone() for p in params]
    opt = Muon(params, lr=lr, momentum=0.0, coefficients=name)
    for p, g in zip(params, grads_for(0)):
        p.grad = g
    opt.step()
    assert_kernel_ran()
    for p, p0 in zip(params, before):
        if p.shape[0] == p.shape[1]:
            continue  # square Gaussian matrices have singular values near 0, which 5 steps cannot lift
        update = (p0 - p.detach()) / (lr * lr_shape_scale(*p.shape))
        sv = torch.linalg.svdvals(update.double().cpu())
        assert lo < sv.min().item() and sv.max().item() < hi, (name, tuple(p.shape), sv.min(), sv.max())


@pytest.mark.parametrize("gram", ["triangle", "bmm"])
@pytest.mark.parametrize("tall", [False, True])
def test_batched_orthogonalization_tracks_the_exact_iteration(gram, tall):
    g = torch.Generator().manual_seed(3)
    G = torch.randn(3, 12, 40, generator=g).to(DEVICE)  # (K, m, n), m <= n
    if tall:
        G = G.mT.contiguous()  # (K, n, m): iterated through strides, never transposed in memory
    coefficients = ns_coefficients("polar_express", 5)
    x = G.bfloat16()
    norm = x.float().norm(dim=(-2, -1))  # (K,)
    scale = 1.0 / (norm * 1.02 + 1e-6)
    ws = MuonWorkspace(3, *G.shape[1:], DEVICE, gram=gram)
    ws.x.copy_(x)  # not normalized: the scale is folded into the first step
    ours = orthogonalize_(ws, coefficients, scale).double()
    assert paths.ran("muon_gram") == gram
    ref = orthogonalize_reference(G, coefficients).double()
    exact = (x.double() * scale.double().view(3, 1, 1))  # the same polynomial iteration in float64
    if tall:
        exact = exact.mT
    for a, b, c in coefficients:
        A = exact @ exact.mT
        exact = a * exact + (b * A + c * A @ A) @ exact
    if tall:
        exact = exact.mT

    def rel(u):
        return ((u - exact).norm() / exact.norm()).item()

    # bf16 rounding noise only; the fused epilogues round less often than the reference's separate ops.
    assert rel(ours) < 0.04 and rel(ours) <= rel(ref) + 0.01, (rel(ours), rel(ref))
    gram_ours = ours.mT @ ours if tall else ours @ ours.mT
    eye = torch.eye(12, device=DEVICE, dtype=torch.float64).expand(3, 12, 12)
    assert ((gram_ours - eye).abs().max()).item() < 0.5  # Polar Express: singular values within ~15% of 1


@pytest.mark.parametrize("m, length, columns", [(37, 29, False), (37, 29, True), (32, 48, False)])
def test_gram_kernel_matches_float64(m, length, columns):
    """out = s_k (alpha X X^T + beta D + diag I) over lower-triangle tiles; (32, 48) takes the unmasked path."""
    g = torch.Generator().manual_seed(m + length)
    K = 2
    x = torch.randn(K, m, length, generator=g).bfloat16().to(DEVICE)  # (K, m, L)
    if columns:
        x = x.mT.contiguous()  # (K, L, m): the kernel forms X^T X through strides
    d = torch.randn(K, m, m, generator=g)
    d = (d + d.mT).bfloat16().to(DEVICE)  # symmetric, as A is
    scale = (torch.rand(K, generator=g) + 0.5).to(DEVICE)
    ws = MuonWorkspace(K, m, m, DEVICE, gram="triangle", gram_tile=16, gram_bk=16, gram_warps=4)
    assert ws.pairs.size(0) == (3 * 4 // 2 if m == 37 else 2 * 3 // 2)  # lower triangle only
    out = torch.empty(K, m, m, dtype=torch.bfloat16, device=DEVICE)
    gram_(ws, x, out, gram_of_columns=columns, alpha=-1.7, beta=0.6, diag=2.5, d=d, scale=scale)
    x64 = x.double().mT if columns else x.double()
    want = -1.7 * (x64 @ x64.mT) + 0.6 * d.double() + 2.5 * torch.eye(m, dtype=torch.float64, device=DEVICE)
    want = want * scale.double().view(K, 1, 1)
    torch.testing.assert_close(out.double(), want, rtol=2.0**-8, atol=1e-2)
    assert torch.equal(out, out.mT)  # mirrored tiles: exactly symmetric
    plain = gram_(ws, x, torch.empty_like(out), gram_of_columns=columns)
    torch.testing.assert_close(plain.double(), x64 @ x64.mT, rtol=2.0**-8, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trip_continues_identically(dtype):
    def run(opt, params, steps, first=0):
        for step in range(first, first + steps):
            for p, g in zip(params, grads_for(step, dtype)):
                p.grad = g
            opt.step()

    straight = make_params(dtype)
    opt = Muon(straight, lr=0.05, weight_decay=0.1)
    run(opt, straight, 3)

    first = make_params(dtype)
    opt_a = Muon(first, lr=0.05, weight_decay=0.1)
    run(opt_a, first, 1)
    saved = copy.deepcopy(opt_a.state_dict())
    resumed = [p.detach().clone().requires_grad_() for p in first]
    opt_b = Muon(resumed, lr=0.05, weight_decay=0.1)
    opt_b.load_state_dict(saved)
    run(opt_b, resumed, 2, first=1)
    assert_kernel_ran()
    for p, q in zip(resumed, straight):
        assert torch.equal(p, q)
        assert opt_b.state[p]["momentum_buffer"].dtype == torch.float32
        assert torch.equal(opt_b.state[p]["momentum_buffer"], opt.state[q]["momentum_buffer"])


def test_rejects_what_muon_cannot_do():
    with pytest.raises(ValueError, match=r"parameter 1 of group 0 has shape \(3, 4, 5\).*2D matrices only"):
        Muon([torch.zeros(3, 4, requires_grad=True), torch.zeros(3, 4, 5, requires_grad=True)])
    with pytest.raises(ValueError, match="shape \\(7,\\)"):
        Muon([torch.zeros(7, requires_grad=True)])
    with pytest.raises(ValueError, match="polar_express has 5 tuned steps"):
        Muon([torch.zeros(3, 4, requires_grad=True)], ns_steps=6)
    with pytest.raises(ValueError, match="gram must be 'triangle' or 'bmm'"):
        Muon([torch.zeros(3, 4, requires_grad=True)], gram="cutlass")
    with pytest.raises(ValueError, match="momentum must be in"):
        Muon([torch.zeros(3, 4, requires_grad=True)], momentum=1.5)


def test_changing_set_of_gradients_keeps_one_stack_per_shape():
    """A parameter without a gradient sits a step out; its momentum is kept and no workspace piles up."""
    from fastsft.kernels import Muon

    g = torch.Generator().manual_seed(11)
    params = [torch.nn.Parameter(torch.randn(13, 7, generator=g).to(DEVICE)) for _ in range(3)]
    opt = Muon(params, lr=0.01)
    for step, with_grad in enumerate([(0, 1, 2), (0, 2), (1,), (0, 1, 2)]):
        for i, p in enumerate(params):
            p.grad = torch.randn(13, 7, generator=g).to(DEVICE) if i in with_grad else None
        before = {i: opt.state[p]["momentum_buffer"].clone() for i, p in enumerate(params) if p in opt.state}
        opt.step()
        assert_kernel_ran()
        assert len(opt._stacks) == 1
        # the orthogonalization buffers live only during the step: between steps they would sit under the
        # forward's peak
        assert all(s.workspace.x is None and s.workspace.a is None for s in opt._stacks.values())
        for i, buf in before.items():
            moved = not torch.equal(opt.state[params[i]]["momentum_buffer"], buf)
            assert moved == (i in with_grad), (step, i)


@pytest.mark.skipif(DEVICE.type == "cuda", reason="CUDA tensors always take the Triton kernels")
def test_cpu_without_interpreter_falls_back_to_the_reference_and_says_so(monkeypatch):
    # A CPU machine without TRITON_INTERPRET=1 (read when a stack is made): no workspace, the reference step,
    # recorded as such; the result is the reference's own (checked against the kernels by the tests above).
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    hyper = dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1)
    ours = make_params()
    ref = [p.detach().clone() for p in ours]
    opt = Muon(ours, ns_steps=5, **hyper)
    grads = grads_for(0)
    for p, g in zip(ours, grads):
        p.grad = g
    opt.step()
    assert paths.ran("muon") == paths.REFERENCE and paths.ran("muon_gram") is None
    assert all(stack.workspace is None for stack in opt._stacks.values())
    for s, idx in stacks().items():
        muon_reference_step([ref[i] for i in idx], [grads[i] for i in idx], torch.zeros(len(idx), *s),
                            coefficients=ns_coefficients("polar_express", 5), **hyper)
    for p, q in zip(ours, ref):
        assert torch.equal(p, q)
