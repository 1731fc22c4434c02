"""segment_budget: a cu_seqlens budget sized to the data, that never drops a conversation and keeps rows full."""

import numpy as np
import pytest

from fastsft.packing import SEGMENT_BUCKETS, default_max_seqs, pack_rows, segment_budget


def chat_lengths(rng: np.random.Generator, n: int, seq_len: int) -> np.ndarray:
    """Lengths shaped like the benchmark's synthetic chats: 1-3 turns of log-normal user and assistant text."""
    out = []
    for _ in range(n):
        length = 1
        for _ in range(int(rng.integers(1, 4))):
            length += int(np.clip(rng.lognormal(4.6, 0.9), 8, 1500)) + 3
            length += int(np.clip(rng.lognormal(5.4, 0.8), 8, 1500)) + 1
        out.append(min(length, seq_len + 1))  # the loader renders up to seq_len + 1 tokens
    return np.array(out)


def rendered(lengths, rng):
    return [(rng.integers(1, 1000, size=n).astype(np.int32), np.ones(n, dtype=np.uint8)) for n in lengths]


def stream(conversations, rows, seq_len, max_seqs, buffer):
    """The loader's loop: pack from a buffer of pending conversations, carry the leftovers into the next batch.
    Returns (batches, the conversation indices in the order they were placed)."""
    batches, placed_order, pending, next_index = [], [], [], 0
    while True:
        while len(pending) < buffer and next_index < len(conversations):
            pending.append(next_index)
            next_index += 1
        if not pending:
            return batches, placed_order
        packed = pack_rows([conversations[i] for i in pending], seq_len, num_rows=rows, max_seqs=max_seqs)
        placed = [pending[k] for k in np.flatnonzero(packed.placement[:, 0] >= 0)]
        assert placed, "every batch must make progress"
        placed_order += placed
        pending = [pending[k] for k in packed.leftover]
        batches.append(packed)


def test_budget_for_chat_data_is_far_below_the_default():
    lengths = chat_lengths(np.random.default_rng(0), 2000, 2048)
    budget = segment_budget(lengths, rows=16, seq_len=2048)
    assert budget % 16 == 0 and budget // 16 in SEGMENT_BUCKETS
    # mean ~900 tokens: 1 + 1.25 * 2048 / 900 ~ 3.85 segments per row, rounded up to the bucket 4
    assert budget == 16 * 4 < default_max_seqs(16, 2048) == 16 * 66


def test_budget_follows_the_mean_length_and_never_exceeds_the_default():
    assert segment_budget([2048] * 10, rows=2, seq_len=2048) == 2 * 3  # 1 + 1.25 rounds up to 3
    assert segment_budget([4096], rows=1, seq_len=2048) == 3  # lengths are cut to the row first
    assert segment_budget([100] * 10, rows=1, seq_len=2048) == 32  # 1 + 25.6
    assert segment_budget([1] * 10, rows=3, seq_len=2048) == default_max_seqs(3, 2048)
    assert segment_budget([5] * 10, rows=1, seq_len=16) == default_max_seqs(1, 16)


@pytest.mark.parametrize("bad", [[], [0, 5], [-3]])
def test_budget_rejects_empty_or_nonpositive_samples(bad):
    with pytest.raises(ValueError, match="positive conversation lengths"):
        segment_budget(bad, rows=4, seq_len=128)


def test_a_stream_packed_under_the_budget_drops_nothing_and_fills_rows_as_the_default():
    rng = np.random.default_rng(1)
    rows, seq_len = 4, 2048
    lengths = chat_lengths(rng, 600, seq_len)
    conversations = rendered(lengths, rng)
    budget = segment_budget(lengths[:200], rows, seq_len)  # measured on a sample, as the driver does
    fills = {}
    for name, max_seqs in (("budget", budget), ("default", default_max_seqs(rows, seq_len))):
        batches, order = stream(conversations, rows, seq_len, max_seqs, buffer=2 * default_max_seqs(rows, seq_len))
        assert sorted(order) == list(range(len(conversations)))  # each placed exactly once
        assert all(b.cu_seqlens.shape == (max_seqs + 1,) for b in batches)  # one static shape
        full = batches[:-3]  # the stream's last batches run out of data
        fills[name] = sum(b.num_tokens for b in full) / (len(full) * rows * seq_len)
    assert fills["budget"] > fills["default"] - 0.02, fills


def test_when_the_budget_is_hit_leftovers_carry_over():
    """A budget measured on long conversations, then a stream of short ones: batches hit the segment budget (rows
    stay part empty with conversations waiting), and still every conversation is placed exactly once."""
    rng = np.random.default_rng(2)
    rows, seq_len = 2, 512
    budget = segment_budget([512] * 50, rows, seq_len)
    lengths = rng.integers(10, 60, size=300)
    batches, order = stream(rendered(lengths, rng), rows, seq_len, budget, buffer=64)
    assert sorted(order) == list(range(len(lengths)))
    hit = [b for b in batches[:-1] if b.num_seqs + rows >= budget and b.efficiency < 0.9]
    assert hit, "the budget was never the limit: this test checks nothing"
    assert all(b.cu_seqlens.shape == (budget + 1,) for b in batches)
