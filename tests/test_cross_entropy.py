"""fastsft.kernels.cross_entropy (Triton, interpreted on the CPU) against its fp32 PyTorch reference, and its
reference fallback where Triton cannot run. Every comparison asserts that the kernel ran (fastsft.kernels.paths):
where Triton cannot run, the op takes the reference, and the comparison would be the reference against itself."""

import textwrap

import pytest
import torch

import fastsft.kernels._ce_rows as ce_rows_mod
from fastsft.kernels import paths
from fastsft.kernels.cross_entropy import cross_entropy, cross_entropy_reference

TOL = {torch.float32: dict(loss=1e-5, grad=1e-5), torch.bfloat16: dict(loss=2e-3, grad=2e-2)}


@pytest.fixture(autouse=True)
def small_vocab_blocks(monkeypatch):
    # V=203 then spans four 64-wide blocks: the online log-sum-exp crosses block boundaries and a partial block.
    monkeypatch.setattr(ce_rows_mod, "INTERPRETED_BLOCK_V", 64)
    paths.reset()


def assert_kernel_ran(backward=True):
    for op in ("cross_entropy", "cross_entropy_backward") if backward else ("cross_entropy",):
        assert paths.ran(op) == paths.TRITON, f"{op} took the {paths.ran(op)} path, not the Triton kernel"


def case_seed(dtype, softcap, ignored_fraction):
    return 100 * round(ignored_fraction * 2) + 10 * (softcap is not None) + (dtype == torch.bfloat16)


def rel_err(got, want):
    return ((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30)).item()


def make_case(n, vocab, dtype, ignored_fraction, seed):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, vocab, generator=gen) * 4 + 1).to(dtype)  # spread wide enough that softcap bites
    targets = torch.randint(0, vocab, (n,), generator=gen)
    targets[torch.rand(n, generator=gen) < ignored_fraction] = -1
    if ignored_fraction == 1.0:
        targets[:] = -1
    elif ignored_fraction == 0.0:
        assert (targets >= 0).all()
    return logits, targets


def loss_and_grad(fn, logits, targets, softcap, upstream, **kw):
    x = logits.detach().clone().requires_grad_()
    loss, n = fn(x * 1, targets, softcap, **kw)  # through a non-leaf, as after an lm_head
    (loss * upstream).backward()
    return loss.detach(), n, x.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("softcap", [None, 15.0])
@pytest.mark.parametrize("ignored_fraction", [0.0, 0.5, 1.0])
def test_matches_reference(dtype, softcap, ignored_fraction):
    logits, targets = make_case(37, 203, dtype, ignored_fraction, seed=case_seed(dtype, softcap, ignored_fraction))
    upstream = 0.37  # a non-unit upstream gradient must scale the logits gradient
    loss, n, grad = loss_and_grad(cross_entropy, logits, targets, softcap, upstream)
    ref_loss, ref_n, ref_grad = loss_and_grad(cross_entropy_reference, logits, targets, softcap, upstream)
    assert_kernel_ran()
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert n.dtype == torch.int64 and int(n) == int(ref_n) == int((targets != -1).sum())
    assert grad.dtype == logits.dtype and grad.shape == logits.shape
    assert torch.isfinite(grad).all()
    assert (grad[targets == -1] == 0).all()
    if ignored_fraction == 1.0:
        assert float(loss) == 0.0 and (grad == 0).all()
    else:
        assert abs(float(loss) - float(ref_loss)) <= TOL[dtype]["loss"] * abs(float(ref_loss))
        assert rel_err(grad, ref_grad) <= TOL[dtype]["grad"]


def test_single_partial_block_and_tiny_vocab(monkeypatch):
    monkeypatch.setattr(ce_rows_mod, "INTERPRETED_BLOCK_V", 256)
    for vocab in (1, 5):
        logits, targets = make_case(7, vocab, torch.float32, 0.3, seed=vocab)
        loss, n, grad = loss_and_grad(cross_entropy, logits, targets, None, 1.0)
        ref_loss, _, ref_grad = loss_and_grad(cross_entropy_reference, logits, targets, None, 1.0)
        assert_kernel_ran()
        assert torch.allclose(loss, ref_loss, rtol=1e-5, atol=1e-6)
        assert torch.allclose(grad, ref_grad, rtol=1e-5, atol=1e-6)


def test_inplace_backward_writes_into_logits_storage():
    logits, targets = make_case(23, 203, torch.bfloat16, 0.5, seed=3)
    _, _, want = loss_and_grad(cross_entropy, logits, targets, 15.0, 0.5)
    paths.reset()
    x = logits.detach().clone().requires_grad_()
    y = x * 1  # (N, V) intermediate, as the output of an lm_head
    loss, _ = cross_entropy(y, targets, 15.0, inplace_backward=True)
    (loss * 0.5).backward()
    assert_kernel_ran()
    assert torch.equal(x.grad, want)
    # the gradient overwrote y's storage (the documented cost of inplace_backward)
    assert torch.equal(y.detach(), want)


def test_inplace_backward_guards():
    logits, targets = make_case(11, 203, torch.float32, 0.5, seed=10)
    with pytest.raises(ValueError, match="contiguous"):
        cross_entropy(logits.t().contiguous().t(), targets, inplace_backward=True)
    x = logits.clone().requires_grad_()
    loss, _ = cross_entropy(x * 1, targets, inplace_backward=True)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_noncontiguous_logits():
    logits, targets = make_case(19, 203, torch.float32, 0.5, seed=4)
    strided = logits.t().contiguous().t()  # same values, stride (1, N)
    assert strided.stride(1) != 1
    loss, _, grad = loss_and_grad(cross_entropy, strided, targets, None, 1.0)
    ref_loss, _, ref_grad = loss_and_grad(cross_entropy_reference, logits, targets, None, 1.0)
    assert_kernel_ran()
    assert torch.allclose(loss, ref_loss, rtol=1e-5)
    assert rel_err(grad, ref_grad) <= 1e-5


def test_outputs_fully_written():
    # Deterministic mode makes torch.empty fill with NaN: any element the kernel forgets to write shows up.
    logits, targets = make_case(29, 203, torch.float32, 0.5, seed=5)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        loss, n, grad = loss_and_grad(cross_entropy, logits, targets, 15.0, 1.0)
    finally:
        torch.use_deterministic_algorithms(False)
    assert_kernel_ran()
    assert torch.isfinite(loss) and torch.isfinite(grad).all()


def test_no_grad_forward_matches():
    logits, targets = make_case(17, 203, torch.bfloat16, 0.5, seed=6)
    with torch.no_grad():
        loss, n = cross_entropy(logits, targets, 15.0)
    ref, ref_n = cross_entropy_reference(logits, targets, 15.0)
    assert_kernel_ran(backward=False)
    assert int(n) == int(ref_n)
    assert abs(float(loss) - float(ref)) <= 2e-3 * abs(float(ref))


# Each backend once, each backward once: the grid of all four repeated the same compile paths.
@pytest.mark.parametrize("backend,inplace_backward", [("aot_eager", True), ("inductor", False)])
def test_compiled_equals_eager_with_ignored_targets(backend, inplace_backward):
    logits, targets = make_case(31, 203, torch.float32, 0.5, seed=7)

    def mean_loss(x):
        loss, n = cross_entropy(x * 1.5, targets, 15.0, inplace_backward=inplace_backward)
        return loss / n.clamp(min=1)

    compiled = torch.compile(mean_loss, backend=backend, fullgraph=True)
    outs = []
    for fn in (compiled, mean_loss):
        paths.reset()
        x = logits.detach().clone().requires_grad_()
        value = fn(x)
        value.backward()
        assert_kernel_ran()  # compiled too: the custom ops run their Triton bodies inside the graph
        outs.append((value.detach(), x.grad))
    (v_c, g_c), (v_e, g_e) = outs
    assert torch.allclose(v_c, v_e, rtol=1e-6)
    assert torch.allclose(g_c, g_e, rtol=1e-6, atol=1e-9)
    ref, ref_n = cross_entropy_reference(logits * 1.5, targets, 15.0)
    assert torch.allclose(v_c, ref / ref_n, rtol=1e-5)


def test_bad_inputs_raise_clear_errors():
    logits, targets = make_case(5, 11, torch.float32, 0.0, seed=8)
    with pytest.raises(ValueError, match=r"outside \[-1, 11\)"):
        cross_entropy(logits, torch.tensor([0, 1, 11, -1, 2]), None)
    with pytest.raises(ValueError, match=r"outside \[-1, 11\)"):
        cross_entropy(logits, torch.tensor([0, 1, -2, -1, 2]), None)
    with pytest.raises(ValueError, match="targets must be"):
        cross_entropy(logits, targets[:4], None)
    with pytest.raises(TypeError, match="int64"):
        cross_entropy(logits, targets.int(), None)
    with pytest.raises(ValueError, match=r"\(N, V\)"):
        cross_entropy(logits[None], targets, None)
    with pytest.raises(ValueError, match="softcap"):
        cross_entropy(logits, targets, -1.0)


CPU_FALLBACK_SCRIPT = textwrap.dedent("""
    import torch
    from fastsft.kernels import paths
    from fastsft.kernels.cross_entropy import cross_entropy, cross_entropy_reference
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(11, 23, generator=gen) * 3
    targets = torch.randint(0, 23, (11,), generator=gen)
    targets[::4] = -1
    for kw in (dict(), dict(inplace_backward=True)):
        outs = []
        for fn, fn_kw in ((cross_entropy, kw), (cross_entropy_reference, {})):
            paths.reset()
            x = logits.clone().requires_grad_()
            loss, n = fn(x * 1, targets, 9.0, **fn_kw)
            (loss * 0.37).backward()
            outs.append((loss.detach(), n, x.grad))
            if fn is cross_entropy:  # the fallback says so, and no kernel claims to have run
                assert paths.ran("cross_entropy") == paths.REFERENCE, paths.ran("cross_entropy")
                assert paths.ran("cross_entropy_backward") is None, paths.ran("cross_entropy_backward")
        for got, want in zip(*outs):
            assert torch.equal(got, want), (kw, got, want)
    # The fallback records its path in code torch.compile traces (its target check breaks the graph; the record
    # after it is replayed as a side effect of the resumed graph).
    paths.reset()
    compiled = torch.compile(lambda x: cross_entropy(x * 1, targets, 9.0)[0], backend="eager")
    assert torch.equal(compiled(logits), cross_entropy_reference(logits, targets, 9.0)[0])
    assert paths.ran("cross_entropy") == paths.REFERENCE
    try:
        cross_entropy(logits, torch.full((11,), -2))
    except ValueError as e:
        assert "outside [-1, 23)" in str(e), e
    else:
        raise AssertionError("out-of-range targets were accepted")
    print("ok")
""")


def test_cpu_without_interpreter_falls_back_to_the_reference(run_without_interpreter):
    # Without TRITON_INTERPRET=1 a CPU tensor cannot reach a Triton kernel ("0 active drivers"): the op must use the
    # reference math instead. A fresh interpreter, since the test session itself runs with the interpreter on.
    code, out, err = run_without_interpreter(CPU_FALLBACK_SCRIPT)
    assert code == 0 and out.strip() == "ok", err[-2000:]
