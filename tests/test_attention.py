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
