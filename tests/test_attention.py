"""Packed (varlen) attention: the CPU fallback against a dense masked reference, windows, GQA, padding, errors."""

import logging

import pytest
import torch

from fastsft import attention
from fastsft.attention import attention_pairs, causal_window_mask, varlen_attention


def dense_reference(q, k, v, cu_seqlens, window):
    """Plain softmax attention in float64 with the full (N, N) mask: same segment, causal, inside the window."""
    n_tokens, n_head, head_dim = q.shape
    segment = torch.full((n_tokens,), -1, dtype=torch.long)
    bounds = cu_seqlens.tolist()
    for s, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        segment[start:end] = s
    i = torch.arange(n_tokens)[:, None]
    j = torch.arange(n_tokens)[None, :]
    keep = (segment[:, None] == segment[None, :]) & (segment[:, None] >= 0) & (j <= i)
    if window >= 0:
        keep &= (i - j) <= window
    rep = n_head // k.shape[1]
    kk = k.double().repeat_interleave(rep, dim=1)  # (N, H, D)
    vv = v.double().repeat_interleave(rep, dim=1)
    scores = torch.einsum("ihd,jhd->hij", q.double(), kk) / head_dim**0.5
    scores = scores.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows without any key (uncovered tail) -> zeros
    return torch.einsum("hij,jhd->ihd", probs, vv)


def make_inputs(lengths, n_head, n_kv_head, head_dim, n_pad_entries=0, tail=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    n_tokens = sum(lengths) + tail
    q = torch.randn(n_tokens, n_head, head_dim, generator=g)
    k = torch.randn(n_tokens, n_kv_head, head_dim, generator=g)
    v = torch.randn(n_tokens, n_kv_head, head_dim, generator=g)
    bounds = [0]
    for length in lengths:
        bounds.append(bounds[-1] + length)
    bounds += [bounds[-1]] * n_pad_entries
    return q, k, v, torch.tensor(bounds, dtype=torch.int32)


@pytest.mark.parametrize("window", [-1, 0, 3, 8])
@pytest.mark.parametrize("heads", [(4, 4), (6, 2), (3, 1)])
def test_fallback_equals_dense_reference(window, heads):
    n_head, n_kv_head = heads
    lengths = [7, 1, 19, 12, 3]
    q, k, v, cu = make_inputs(lengths, n_head, n_kv_head, head_dim=10, n_pad_entries=3, seed=window + 7 * n_head)
    out = varlen_attention(q, k, v, cu, max_seqlen=19, window=window, backend="sdpa_segments")
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out.double(), dense_reference(q, k, v, cu, window), atol=1e-5, rtol=1e-5)


def test_fallback_gradients_equal_dense_reference():
    lengths = [9, 14, 5]
    q, k, v, cu = make_inputs(lengths, 4, 2, head_dim=6, n_pad_entries=2, seed=3)
    q, k, v = (t.double().requires_grad_() for t in (q, k, v))
    grad_out = torch.randn(q.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    got = torch.autograd.grad((varlen_attention(q, k, v, cu, 14, window=4, backend="sdpa_segments") * grad_out).sum(),
                              (q, k, v))
    want = torch.autograd.grad((dense_reference(q, k, v, cu, 4) * grad_out).sum(), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


def test_zero_length_padding_entries_change_nothing():
    lengths = [11, 4, 17]
    q, k, v, cu = make_inputs(lengths, 4, 2, head_dim=8, seed=11)
    padded = torch.cat([cu, cu[-1:].repeat(5)])
    for window in (-1, 5):
        plain = varlen_attention(q, k, v, cu, 17, window=window, backend="sdpa_segments")
        with_pad = varlen_attention(q, k, v, padded, 17, window=window, backend="sdpa_segments")
        assert torch.equal(plain, with_pad)


def test_tokens_past_the_last_segment_are_zero_and_do_not_leak():
    lengths = [6, 9]
    q, k, v, cu = make_inputs(lengths, 2, 2, head_dim=4, tail=5, seed=2)
    out = varlen_attention(q, k, v, cu, 9, backend="sdpa_segments")
    assert torch.equal(out[15:], torch.zeros_like(out[15:]))
    torch.testing.assert_close(out.double(), dense_reference(q, k, v, cu, -1), atol=1e-5, rtol=1e-5)


def test_segments_are_independent():
    """Changing one conversation's tokens leaves every other conversation's output bit for bit unchanged."""
    lengths = [5, 13, 8]
    q, k, v, cu = make_inputs(lengths, 4, 2, head_dim=8, seed=4)
    before = varlen_attention(q, k, v, cu, 13, window=3, backend="sdpa_segments")
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for t in (q2, k2, v2):
        t[5:18] = torch.randn_like(t[5:18])
    after = varlen_attention(q2, k2, v2, cu, 13, window=3, backend="sdpa_segments")
    assert torch.equal(before[:5], after[:5]) and torch.equal(before[18:], after[18:])
    assert not torch.allclose(before[5:18], after[5:18])


def test_causal_window_mask():
    mask = causal_window_mask(6, 2, "cpu")
    for i in range(6):
        for j in range(6):
            assert bool(mask[i, j]) == (j <= i and i - j <= 2)
    assert torch.equal(causal_window_mask(5, -1, "cpu"), torch.ones(5, 5, dtype=torch.bool).tril())


def test_attention_pairs_count_the_mask():
    for length in (1, 2, 7, 31):
        for window in (-1, 0, 1, 5, 30, 40):
            assert attention_pairs(length, window) == int(causal_window_mask(length, window, "cpu").sum())


@pytest.mark.parametrize(
    "bounds, max_seqlen, message",
    [
        ([1, 5, 9], 9, "start at 0"),
        ([0, 6, 4, 9], 9, "non-decreasing"),
        ([0, 5, 12], 9, "only 9 tokens"),
        ([0, 8, 9], 4, "more than max_seqlen"),
    ],
)
def test_bad_cu_seqlens_raise(bounds, max_seqlen, message):
    q, k, v, _ = make_inputs([9], 2, 1, head_dim=4)
    with pytest.raises(ValueError, match=message):
        varlen_attention(q, k, v, torch.tensor(bounds, dtype=torch.int32), max_seqlen, backend="sdpa_segments")


def test_bad_shapes_and_dtypes_raise():
    q, k, v, cu = make_inputs([9], 4, 2, head_dim=4)
    with pytest.raises(ValueError, match="int32"):
        varlen_attention(q, k, v, cu.long(), 9)
    with pytest.raises(ValueError, match="divisible"):
        varlen_attention(q, k[:, :1].expand(-1, 3, -1), v[:, :1].expand(-1, 3, -1), cu, 9)
    with pytest.raises(ValueError, match=r"\(N, H, D\)"):
        varlen_attention(q[None], k, v, cu, 9)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            varlen_attention(q, k, v, cu, 9, backend="torch_varlen")


def test_backend_choice_is_made_once_and_logged(caplog, monkeypatch):
    monkeypatch.setattr(attention, "_forced_backend", None)
    monkeypatch.setattr(attention, "_CHOICES", {})
    with caplog.at_level(logging.INFO, logger="fastsft.attention"):
        assert attention.select_backend("cpu") == "sdpa_segments"
        assert attention.select_backend("cpu") == "sdpa_segments"
    assert sum("attention backend for cpu" in r.getMessage() for r in caplog.records) == 1
    assert attention.available_backends("cpu") == ("sdpa_segments",)
    with pytest.raises(ValueError, match="unknown attention backend"):
        attention.set_backend("no_such_backend")


# ------------------------------------------------------------------------------------------------------------------
# The custom-op path (flash-attn-4's route). flash-attn-4 cannot run on the CPU, so an exact forward/backward pair
# with FlashAttention's interface (out plus lse (H, N); a backward from the saved lse) is injected in its place:
# it checks the op's structure (fake shapes, autograd, one compiled graph) with the same code path FA4 takes.


class MathKernels:
    """Segment-by-segment softmax attention in float32 that counts its calls (so a test sees it ran)."""

    def __init__(self):
        self.forward_calls = 0
        self.backward_calls = 0

    @staticmethod
    def _segments(cu_seqlens):
        bounds = cu_seqlens.tolist()
        return [(s, e) for s, e in zip(bounds[:-1], bounds[1:]) if e > s]

    @staticmethod
    def _probs(qs, ks, window, lse=None):
        """(H, L, L) probabilities; scores scaled by 1/sqrt(D), causal inside the window."""
        scores = torch.einsum("ihd,jhd->hij", qs, ks) / qs.shape[-1] ** 0.5
        keep = causal_window_mask(qs.shape[0], window, qs.device)
        scores = scores.masked_fill(~keep, float("-inf"))
        if lse is None:
            lse = torch.logsumexp(scores, dim=-1)
        return torch.exp(scores - lse[..., None]), lse

    def forward(self, q, k, v, cu_seqlens, max_seqlen, window):
        self.forward_calls += 1
        rep = q.shape[1] // k.shape[1]
        out = torch.full_like(q, float("nan"))  # like the real kernels: the uncovered tail is garbage
        lse = torch.zeros(q.shape[1], q.shape[0], dtype=torch.float32)
        for s, e in self._segments(cu_seqlens):
            qs = q[s:e].float()
            ks, vs = (t[s:e].float().repeat_interleave(rep, 1) for t in (k, v))  # (L, H, D)
            probs, lse[:, s:e] = self._probs(qs, ks, window)
            out[s:e] = torch.einsum("hij,jhd->ihd", probs, vs).to(q.dtype)
        return out, lse

    def backward(self, dout, q, k, v, out, lse, cu_seqlens, max_seqlen, window):
        """FlashAttention's backward from the saved lse: dS = P * (dP - rowsum(dO * O))."""
        self.backward_calls += 1
        rep = q.shape[1] // k.shape[1]
        dq, dk, dv = (torch.full_like(t, float("nan")) for t in (q, k, v))
        for s, e in self._segments(cu_seqlens):
            qs = q[s:e].float()
            ks, vs = (t[s:e].float().repeat_interleave(rep, 1) for t in (k, v))  # (L, H, D)
            do, o = dout[s:e].float(), out[s:e].float()
            probs, _ = self._probs(qs, ks, window, lse[:, s:e])
            dp = torch.einsum("ihd,jhd->hij", do, vs)
            ds = probs * (dp - (do * o).sum(-1).T[..., None]) / qs.shape[-1] ** 0.5
            dq[s:e] = torch.einsum("hij,jhd->ihd", ds, ks).to(q.dtype)
            group = lambda g: g.unflatten(1, (k.shape[1], rep)).sum(2)  # (L, H, D) -> (L, Hkv, D)
            dk[s:e] = group(torch.einsum("hij,ihd->jhd", ds, qs)).to(k.dtype)
            dv[s:e] = group(torch.einsum("hij,ihd->jhd", probs, do)).to(v.dtype)
        return dq, dk, dv


@pytest.fixture
def math_backend(monkeypatch):
    """Register MathKernels as the op backend "math_op" on the CPU and pin it; undone after the test."""
    kernels = MathKernels()
    attention.register_op_kernels("math_op", attention.OpKernels(kernels.forward, kernels.backward,
                                                                 device_types=("cpu",), half_only=False))
    monkeypatch.setattr(attention, "_forced_backend", "math_op")
    yield kernels
    attention.register_op_kernels("math_op", None)


@pytest.mark.parametrize("window", [-1, 4])
def test_op_backend_forward_and_backward_equal_the_fallback(math_backend, window):
    lengths = [9, 14, 1, 5]
    q, k, v, cu = make_inputs(lengths, 4, 2, head_dim=8, n_pad_entries=2, tail=3, seed=21)
    q, k, v = (t.double().requires_grad_() for t in (q, k, v))
    grad_out = torch.randn(q.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    outs, grads = [], []
    for backend in ("math_op", "sdpa_segments"):
        out = varlen_attention(q, k, v, cu, 14, window=window, backend=backend)
        outs.append(out)
        grads.append(torch.autograd.grad((out * grad_out).sum(), (q, k, v)))
    assert math_backend.forward_calls == 1 and math_backend.backward_calls == 1
    assert torch.equal(outs[0][-3:], torch.zeros_like(outs[0][-3:]))  # the NaN tail was zeroed
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    for got, want in zip(grads[0], grads[1]):
        assert torch.isfinite(got).all()  # the NaN rows of the kernel's dq, dk, dv tail were zeroed
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_custom_ops_pass_opcheck(math_backend):
    """torch's own checks: schema, fake (meta) shapes against the real outputs, autograd registration."""
    q, k, v, cu = make_inputs([6, 11, 3], 4, 2, head_dim=8, n_pad_entries=1, seed=5)
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    torch.library.opcheck(attention.varlen_attn_fwd, (q, k, v, cu, 11, 3, "math_op"))
    out, lse = attention.varlen_attn_fwd(q.detach(), k.detach(), v.detach(), cu, 11, 3, "math_op")
    assert lse.shape == (4, q.shape[0]) and lse.dtype == torch.float32
    dout = torch.randn_like(out)
    torch.library.opcheck(attention.varlen_attn_bwd, (dout, q.detach(), k.detach(), v.detach(), out, lse, cu, 11, 3,
                                                      "math_op"))


def test_a_covered_stream_skips_the_tail_zeroing(math_backend, monkeypatch):
    """covered=True (cu_seqlens[-1] == N, the packer's batches) launches no zero_tail_ for out, dq, dk or dv and
    changes nothing; without it the op zeroes all four. Both forms pass torch's op checks."""
    q, k, v, cu = make_inputs([9, 14, 1, 5], 4, 2, head_dim=8, n_pad_entries=2, seed=23)
    q, k, v = (t.double().requires_grad_() for t in (q, k, v))
    grad_out = torch.randn(q.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    zeroed, zero_tail = [], attention.zero_tail_
    monkeypatch.setattr(attention, "zero_tail_", lambda x, cu: zeroed.append(x.shape) or zero_tail(x, cu))
    results = []
    for covered in (False, True):
        zeroed.clear()
        out = varlen_attention(q, k, v, cu, 14, backend="math_op", covered=covered)
        results.append((out, *torch.autograd.grad((out * grad_out).sum(), (q, k, v))))
        assert zeroed == ([] if covered else [q.shape, q.shape, k.shape, v.shape])
    for got, want in zip(*results):
        assert torch.equal(got, want)
    torch.library.opcheck(attention.varlen_attn_fwd, (q.detach(), k.detach(), v.detach(), cu, 14, -1, "math_op",
                                                      True))
    out, lse = attention.varlen_attn_fwd(q.detach(), k.detach(), v.detach(), cu, 14, -1, "math_op", True)
    torch.library.opcheck(attention.varlen_attn_bwd, (grad_out, q.detach(), k.detach(), v.detach(), out, lse, cu,
                                                      14, -1, "math_op", True))


def _packing(lengths, rows, seq_len, max_seqs, seed):
    """A packed batch in the packer's layout: (rows*seq_len,) ids and positions, cu_seqlens of max_seqs + 1."""
    g = torch.Generator().manual_seed(seed)
    bounds, positions = [0], []
    for length in lengths:
        bounds.append(bounds[-1] + length)
        positions += list(range(length))
    bounds += [bounds[-1]] * (max_seqs + 1 - len(bounds))
    total = rows * seq_len
    assert bounds[-1] == total
    ids = torch.randint(0, 97, (total,), generator=g)
    return ids.view(rows, seq_len), torch.tensor(positions).view(rows, seq_len), torch.tensor(bounds, dtype=torch.int32)


def test_the_model_passes_covered_to_every_layer(math_backend, monkeypatch):
    """forward_packed(covered=True) zeroes no tail in any layer and gives the same logits and gradients."""
    from fastsft.model import GPT, GPTConfig

    config = GPTConfig(sequence_len=32, vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)
    torch.manual_seed(0)
    model = GPT(config)
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ids, pos, cu = _packing([20, 12, 9, 23], rows=2, seq_len=32, max_seqs=8, seed=3)
    zeroed, zero_tail = [], attention.zero_tail_
    monkeypatch.setattr(attention, "zero_tail_", lambda x, cu: zeroed.append(x.shape) or zero_tail(x, cu))
    results = []
    for covered in (False, True):
        zeroed.clear()
        model.zero_grad()
        logits = model.forward_packed(ids, pos, cu, 32, covered=covered)
        logits.square().mean().backward()
        results.append([logits.detach()] + [p.grad.clone() for p in model.parameters()])
        assert len(zeroed) == (0 if covered else 4 * config.n_layer)
    for got, want in zip(*results):
        assert torch.equal(got, want)


@pytest.mark.parametrize("fp8", [False, True])  # fp8: q, k and v from one matmul, their gradient one custom op
def test_compiled_model_is_one_graph_with_no_recompiles_across_packings(math_backend, fp8):
    """fullgraph=True fails on any graph break; the counter sees one compiled frame over three different packings,
    and the compiled model's logits and gradients equal the eager model on the exact fallback."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from fastsft.model import GPT, GPTConfig

    torch._dynamo.reset()
    config = GPTConfig(sequence_len=32, vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, short_window=5,
                       window_pattern="SL")
    torch.manual_seed(0)
    model = GPT(config)
    model.init_weights()
    with torch.no_grad():  # projections start at zero: make attention matter
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.set_fp8(fp8)
    assert attention.select_backend("cpu") == "math_op"  # decided before tracing, as the driver does
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model.forward_packed, backend=counter, fullgraph=True)
    packings = [[20, 12, 9, 23], [32, 5, 5, 5, 17], [1, 31, 30, 2]]
    for i, lengths in enumerate(packings):
        ids, pos, cu = _packing(lengths, rows=2, seq_len=32, max_seqs=8, seed=i)
        logits = compiled(ids, pos, cu, 32)
        model.zero_grad()
        logits.square().mean().backward()
        got = [p.grad.clone() for p in model.parameters()]
        calls = math_backend.forward_calls
        attention.set_backend("sdpa_segments")
        try:
            model.zero_grad()
            want_logits = model.forward_packed(ids, pos, cu, 32)
            want_logits.square().mean().backward()
        finally:
            attention.set_backend("math_op")
        torch.testing.assert_close(logits, want_logits, atol=1e-4, rtol=1e-4)
        for g, p in zip(got, model.parameters()):
            torch.testing.assert_close(g, p.grad, atol=1e-4, rtol=1e-4)
        assert calls == config.n_layer * (i + 1)  # every layer ran the op kernels, once per batch
    assert counter.frame_count == 1
    assert math_backend.backward_calls == config.n_layer * len(packings)


def test_flash_attn_4_is_preferred_and_runs_through_the_op(monkeypatch):
    """The preference order, with every probe passing as on a GPU machine with all wheels installed."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(attention, "_PROBES", {name: (lambda: None) for name in attention._PROBES})
    attention.available_backends.cache_clear()
    try:
        assert attention.available_backends("cuda") == attention.BACKENDS
        assert attention.BACKENDS[:2] == ("flash_attn_4", "flash_attn_3")
    finally:
        attention.available_backends.cache_clear()
    assert "flash_attn_4" in attention._OP_KERNELS and "flash_attn_4" not in attention._IMPLS


@pytest.mark.parametrize("shape, first", [((37, 3, 5), 21), ((40, 10, 128), 33), ((19, 2, 4), 19), ((8, 4), 0)])
def test_zero_tail_kernel_zeroes_exactly_the_rows_past_the_last_segment(shape, first):
    """The Triton kernel behind the op's tail zeroing (under Triton's interpreter on a CPU machine): rows at or
    past cu_seqlens[-1] become 0, every other row keeps its bits; widths below, at and above one column block."""
    import os

    if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET")):
        pytest.skip("needs a GPU or Triton's interpreter")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(shape, device=device).to(torch.bfloat16)
    x[first:] = float("nan")  # as a kernel's uninitialized rows may be
    before = x.clone()
    cu = torch.tensor([0, first // 2, first, first], dtype=torch.int32, device=device)
    assert attention._zero_tail_triton(x, cu) is x
    assert torch.equal(x[:first], before[:first])
    assert torch.equal(x[first:], torch.zeros_like(x[first:]))


def test_tail_gradient_guard_zeroes_rows_of_no_segment():
    """torch varlen (FA2) leaves the gradients of tokens past cu_seqlens[-1] uninitialized on the GPU; the guard in
    front of it must turn whatever arrives there into zeros and pass the covered rows through unchanged."""
    from fastsft.attention import _ZeroTailGrad

    cu = torch.tensor([0, 3, 5, 5], dtype=torch.int32)
    x = torch.randn(7, 2, 4, requires_grad=True)
    y = _ZeroTailGrad.apply(x, cu)
    assert torch.equal(y, x)
    incoming = torch.randn(7, 2, 4)
    incoming[5:] = float("nan")
    y.backward(incoming)
    assert torch.equal(x.grad[:5], incoming[:5]) and torch.equal(x.grad[5:], torch.zeros(2, 2, 4))
