"""fastsft.kernels.linear_cross_entropy (chunked matmuls + Triton row kernel, interpreted on the CPU) against its
fp32 PyTorch reference: values, both gradients, ignored rows, chunking, torch.compile, bad input."""

import pytest
import torch

import fastsft.kernels._ce_rows as ce_rows_mod
import fastsft.kernels.linear_cross_entropy as lce_mod
from fastsft.kernels.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_reference

TOL = {torch.float32: dict(loss=1e-5, grad=1e-5), torch.bfloat16: dict(loss=2e-3, grad=2e-2)}
N, H, V = 37, 50, 203


@pytest.fixture(autouse=True)
def small_vocab_blocks(monkeypatch):
    # V=203 spans four 64-wide blocks in the row kernel (online log-sum-exp across blocks and a partial block).
    monkeypatch.setattr(ce_rows_mod, "INTERPRETED_BLOCK_V", 64)


def chunk_rows(monkeypatch, rows, dtype):
    monkeypatch.setattr(lce_mod, "CHUNK_BYTES", rows * V * torch.empty((), dtype=dtype).element_size())
    monkeypatch.setattr(lce_mod, "MIN_CHUNK_ROWS", 1)
    assert lce_mod.rows_per_chunk(N, V, dtype) == rows


def case_seed(dtype, softcap, ignored_fraction):
    return 100 * round(ignored_fraction * 2) + 10 * (softcap is not None) + (dtype == torch.bfloat16)


def rel_err(got, want):
    return ((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30)).item()


def make_case(dtype, ignored_fraction, seed, n=N):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, H, generator=gen).to(dtype)
    weight = (torch.randn(V, H, generator=gen) * 0.5).to(dtype)  # logits of a few units: softcap 15 bites
    targets = torch.randint(0, V, (n,), generator=gen)
    targets[torch.rand(n, generator=gen) < ignored_fraction] = -1
    if ignored_fraction == 1.0:
        targets[:] = -1
    return hidden, weight, targets


def run(fn, hidden, weight, targets, softcap, upstream=1.0, grad_hidden=True, grad_weight=True):
    h = hidden.detach().clone().requires_grad_(grad_hidden)
    w = weight.detach().clone().requires_grad_(grad_weight)
    loss, n = fn(h, w, targets, softcap)
    if grad_hidden or grad_weight:
        (loss * upstream).backward()
    return loss.detach(), n, h.grad, w.grad


def assert_close(got, want, dtype, ignored_fraction):
    loss, n, gh, gw = got
    ref_loss, ref_n, ref_gh, ref_gw = want
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert n.dtype == torch.int64 and n.dim() == 0 and int(n) == int(ref_n)
    assert gh.dtype == dtype and gw.dtype == dtype
    assert torch.isfinite(gh).all() and torch.isfinite(gw).all()
    if ignored_fraction == 1.0:
        assert float(loss) == 0.0 and (gh == 0).all() and (gw == 0).all()
        return
    assert abs(float(loss) - float(ref_loss)) <= TOL[dtype]["loss"] * abs(float(ref_loss))
    assert rel_err(gh, ref_gh) <= TOL[dtype]["grad"]
    assert rel_err(gw, ref_gw) <= TOL[dtype]["grad"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("softcap", [None, 15.0])
@pytest.mark.parametrize("ignored_fraction", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("rows_per_chunk", [N, 8])
def test_matches_reference(monkeypatch, dtype, softcap, ignored_fraction, rows_per_chunk):
    chunk_rows(monkeypatch, rows_per_chunk, dtype)  # 8: the supervised rows span several row chunks
    case = make_case(dtype, ignored_fraction, seed=case_seed(dtype, softcap, ignored_fraction))
    got = run(linear_cross_entropy, *case, softcap, upstream=0.37)
    want = run(linear_cross_entropy_reference, *case, softcap, upstream=0.37)
    assert int(got[1]) == int((case[2] != -1).sum())
    assert (got[2][case[2] == -1] == 0).all()  # ignored rows get exactly zero hidden gradient
    assert_close(got, want, dtype, ignored_fraction)


def test_ignored_rows_never_reach_a_matmul():
    hidden, weight, targets = make_case(torch.float32, 0.5, seed=11)
    poisoned = hidden.clone()
    poisoned[targets == -1] = float("nan")  # would poison every logit column sum if an ignored row were multiplied
    got = run(linear_cross_entropy, poisoned, weight, targets, 15.0)
    want = run(linear_cross_entropy_reference, hidden, weight, targets, 15.0)
    assert_close(got, want, torch.float32, 0.5)


def test_dw_accumulated_in_weight_dtype_is_still_close(monkeypatch):
    chunk_rows(monkeypatch, 8, torch.bfloat16)
    monkeypatch.setattr(lce_mod, "DW_ACCUM_FP32", False)
    case = make_case(torch.bfloat16, 0.5, seed=12)
    assert_close(run(linear_cross_entropy, *case, None), run(linear_cross_entropy_reference, *case, None),
                 torch.bfloat16, 0.5)


@pytest.mark.parametrize("grad_hidden,grad_weight", [(True, False), (False, True), (False, False)])
def test_partial_and_no_grad(grad_hidden, grad_weight):
    case = make_case(torch.float32, 0.5, seed=13)
    loss, n, gh, gw = run(linear_cross_entropy, *case, 15.0, grad_hidden=grad_hidden, grad_weight=grad_weight)
    ref_loss, _, ref_gh, ref_gw = run(linear_cross_entropy_reference, *case, 15.0, grad_hidden=True, grad_weight=True)
    assert abs(float(loss) - float(ref_loss)) <= 1e-5 * abs(float(ref_loss))
    assert (gh is None) == (not grad_hidden) and (gw is None) == (not grad_weight)
    if grad_hidden:
        assert rel_err(gh, ref_gh) <= 1e-5
    if grad_weight:
        assert rel_err(gw, ref_gw) <= 1e-5
    with torch.no_grad():
        nograd_loss, nograd_n = linear_cross_entropy(case[0], case[1].requires_grad_(), case[2], 15.0)
    assert float(nograd_loss) == pytest.approx(float(ref_loss), rel=1e-5) and int(nograd_n) == int(n)


def test_outputs_fully_written(monkeypatch):
    # Deterministic mode fills torch.empty with NaN: a chunk, row or gradient element left unwritten shows up.
    chunk_rows(monkeypatch, 8, torch.bfloat16)
    case = make_case(torch.bfloat16, 0.5, seed=14)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        loss, n, gh, gw = run(linear_cross_entropy, *case, 15.0)
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.isfinite(loss) and torch.isfinite(gh).all() and torch.isfinite(gw).all()


@pytest.mark.parametrize("backend,dtype,softcap", [
    ("aot_eager", torch.float32, 15.0),
    ("aot_eager", torch.bfloat16, None),
    ("inductor", torch.float32, 15.0),
])
def test_compiled_equals_eager_with_ignored_targets(monkeypatch, backend, dtype, softcap):
    chunk_rows(monkeypatch, 8, dtype)
    hidden, weight, targets = make_case(dtype, 0.5, seed=15)

    def mean_loss(h, w):
        loss, n = linear_cross_entropy(h, w, targets, softcap)
        return loss / n.clamp(min=1)

    outs = []
    for fn in (torch.compile(mean_loss, backend=backend, fullgraph=True), mean_loss):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        value = fn(h, w)
        value.backward()
        outs.append((value.detach(), h.grad, w.grad))
    for got, want in zip(*outs):
        assert torch.equal(got, want)  # same kernels, same order: bit-identical
    ref, ref_n = linear_cross_entropy_reference(hidden, weight, targets, softcap)
    assert abs(float(outs[0][0]) - float(ref / ref_n)) <= TOL[dtype]["loss"] * abs(float(ref / ref_n))


def test_second_backward_through_one_forward_raises():
    hidden, weight, targets = make_case(torch.float32, 0.5, seed=17)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, _ = linear_cross_entropy(h, w, targets)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_empty_batch():
    hidden, weight, targets = make_case(torch.float32, 0.0, seed=18, n=0)
    loss, n, gh, gw = run(linear_cross_entropy, hidden, weight, targets, None)
    assert float(loss) == 0.0 and int(n) == 0 and gh.shape == (0, H) and (gw == 0).all()


def test_bad_inputs_raise_clear_errors():
    hidden, weight, targets = make_case(torch.float32, 0.0, seed=16, n=5)
    with pytest.raises(ValueError, match=rf"outside \[-1, {V}\)"):
        linear_cross_entropy(hidden, weight, torch.tensor([0, 1, V, -1, 2]))
    with pytest.raises(ValueError, match=rf"outside \[-1, {V}\)"):
        linear_cross_entropy(hidden, weight, torch.tensor([0, -100, 1, -1, 2]))
    with pytest.raises(ValueError, match="hidden size differs"):
        linear_cross_entropy(hidden[:, :-1], weight, targets)
    with pytest.raises(TypeError, match="one float dtype"):
        linear_cross_entropy(hidden, weight.bfloat16(), targets)
    with pytest.raises(ValueError, match=r"targets must be \(N,\)"):
        linear_cross_entropy(hidden, weight, targets[:-1])
    with pytest.raises(TypeError, match="int64"):
        linear_cross_entropy(hidden, weight, targets.int())
    with pytest.raises(ValueError, match=r"\(N, H\)"):
        linear_cross_entropy(hidden[None], weight, targets)
    with pytest.raises(ValueError, match="softcap"):
        linear_cross_entropy(hidden, weight, targets, softcap=0.0)
