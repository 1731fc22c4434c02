"""pack_rows (C++) against its invariants and against pack_rows_reference (plain Python), plus bad-input errors."""

import random
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastsft import _C
from fastsft.batches import PackedStream, RenderedSource
from fastsft.data.base import DataError
from fastsft.packing import (PLACEMENT_ORDERS, RenderedBatch, default_max_seqs, pack_pool, pack_rows,
                             pack_rows_reference, render_batch_flat, segment_budget)
from fastsft.tokenizer import Tokenizer

FIELDS = ("input_ids", "targets", "position_ids", "cu_seqlens", "max_seqlen", "num_seqs", "num_supervised",
          "num_tokens", "num_truncated", "efficiency", "leftover", "placement")


def random_rendered(rng: np.random.Generator, n: int, max_len: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """n conversations of mixed lengths (mostly short, some long), random nonzero ids, ~60% supervised."""
    out = []
    for _ in range(n):
        if rng.random() < 0.7:
            length = int(rng.integers(1, max(2, max_len // 4)))
        else:
            length = int(rng.integers(1, max_len + 1))
        ids = rng.integers(1, 50_000, size=length).astype(np.int32)
        mask = (rng.random(length) < 0.6).astype(np.uint8)
        mask[0] = 0
        out.append((ids, mask))
    return out


def assert_same(a, b):
    for field in FIELDS:
        x, y = getattr(a, field), getattr(b, field)
        if isinstance(x, np.ndarray):
            assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y), field
        else:
            assert x == y, field


def check_invariants(rendered, packed, seq_len, num_rows=None, pad_id=0, max_seqs=None):
    rows = packed.rows
    n = len(rendered)
    if num_rows is not None:
        assert rows == num_rows
    if max_seqs is None:
        max_seqs = default_max_seqs(rows, seq_len)
    for name in ("input_ids", "targets", "position_ids"):
        arr = getattr(packed, name)
        assert arr.dtype == np.int64 and arr.shape == (rows, seq_len), name
    assert packed.cu_seqlens.dtype == np.int32 and packed.cu_seqlens.shape == (max_seqs + 1,)
    assert packed.max_seqlen == seq_len and packed.placement.shape == (n, 3)

    # Every (conversation, position) lands in exactly one cell; nothing is lost, duplicated or split.
    owner = np.full((rows, seq_len), -1)
    index_in_conv = np.full((rows, seq_len), -1)
    placed = packed.placement[:, 0] >= 0
    assert packed.leftover.tolist() == np.flatnonzero(~placed).tolist()
    if num_rows is None:
        assert placed.all()
    for i in np.flatnonzero(placed):
        r, off, length = packed.placement[i]
        ids, mask = rendered[i]
        assert length == min(len(ids), seq_len)
        assert (owner[r, off:off + length] == -1).all(), f"conversation {i} overlaps another"
        owner[r, off:off + length] = i
        index_in_conv[r, off:off + length] = np.arange(length)
        assert np.array_equal(packed.input_ids[r, off:off + length], ids[:length])
        assert np.array_equal(packed.position_ids[r, off:off + length], np.arange(length))
        # Targets: next token of the same conversation where supervised; -1 at the conversation's last token.
        expect = np.where(mask[1:length] == 1, ids[1:length], -1)
        assert np.array_equal(packed.targets[r, off:off + length - 1], expect)
        assert packed.targets[r, off + length - 1] == -1

    for r in range(rows):
        real = owner[r] >= 0
        used = int(real.sum())
        assert real[:used].all() and not real[used:].any(), f"row {r}: padding is not one tail"
        assert (packed.input_ids[r, used:] == pad_id).all()
        assert (packed.targets[r, used:] == -1).all()
        assert np.array_equal(packed.position_ids[r, used:], np.arange(seq_len - used))

    # No target crosses a conversation boundary (checked on the cells, independent of the placement table).
    flat_owner, flat_targets, flat_ids = owner.ravel(), packed.targets.ravel(), packed.input_ids.ravel()
    sup = np.flatnonzero(flat_targets != -1)
    assert (sup + 1 < flat_owner.size).all()
    assert (flat_owner[sup] >= 0).all() and np.array_equal(flat_owner[sup], flat_owner[sup + 1])
    assert np.array_equal(flat_targets[sup], flat_ids[sup + 1])

    # cu_seqlens: strictly increasing boundaries, then the total repeated; positions == arange in each segment.
    total = rows * seq_len
    k = packed.num_seqs
    cu = packed.cu_seqlens.astype(np.int64)
    assert cu[0] == 0 and cu[k] == total and (cu[k:] == total).all() and (np.diff(cu[:k + 1]) > 0).all()
    flat_pos = packed.position_ids.ravel()
    for start, end in zip(cu[:k], cu[1:k + 1]):
        assert np.array_equal(flat_pos[start:end], np.arange(end - start))
        assert np.unique(flat_owner[start:end]).size == 1  # a segment is one conversation or one padding tail
    assert np.array_equal(np.flatnonzero(flat_pos == 0), cu[:k])

    assert packed.num_supervised == int((packed.targets != -1).sum())
    assert packed.num_tokens == int((owner >= 0).sum())
    assert packed.efficiency == (packed.num_tokens / total if total else 0.0)
    assert packed.num_truncated == sum(1 for i in np.flatnonzero(placed) if len(rendered[i][0]) > seq_len)


@pytest.mark.parametrize("order", PLACEMENT_ORDERS)
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("seq_len,num_rows", [(37, None), (64, 5), (128, None), (50, 1)])
def test_pack_invariants_and_reference(seed, seq_len, num_rows, order):
    rng = np.random.default_rng(seed * 100 + seq_len)
    rendered = random_rendered(rng, int(rng.integers(1, 40)), max_len=int(seq_len * 1.5))
    kw = dict(num_rows=num_rows, pad_id=7, max_seqs=200, order=order)
    packed = pack_rows(rendered, seq_len, **kw)
    check_invariants(rendered, packed, seq_len, num_rows, pad_id=7, max_seqs=200)
    assert_same(packed, pack_rows_reference(rendered, seq_len, **kw))
    assert_same(packed, pack_rows(rendered, seq_len, **kw))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("seq_len,num_rows,budget", [(61, 3, None), (509, 7, "tight"), (97, 1, "tight"),
                                                     (33, None, None), (255, 13, "roomy")])
def test_arrival_order_matches_reference_at_odd_sizes(seed, seq_len, num_rows, budget):
    # Pools of up to 150 conversations, a few longer than the row (truncated), under a segment budget that binds
    # ("tight": about two conversations per row), does not ("roomy", and as many rows as needed), or the default.
    rng = np.random.default_rng(seed * 1000 + seq_len)
    rows = num_rows or 1
    rendered = random_rendered(rng, int(rng.integers(5 * rows, 150)), max_len=int(seq_len * 1.25))
    max_seqs = {None: None, "tight": rows + 2 * rows + int(rng.integers(0, 3)), "roomy": 40 * rows}[budget]
    if num_rows is None:
        max_seqs = 2 * len(rendered) + 1
    packed = pack_rows(rendered, seq_len, num_rows=num_rows, pad_id=3, max_seqs=max_seqs, order="arrival")
    check_invariants(rendered, packed, seq_len, num_rows, pad_id=3, max_seqs=max_seqs)
    assert_same(packed, pack_rows_reference(rendered, seq_len, num_rows=num_rows, pad_id=3, max_seqs=max_seqs,
                                            order="arrival"))
    if num_rows is not None and budget == "tight":
        # More conversations than the budget admits: some are left over.
        assert packed.num_seqs <= max_seqs and len(packed.leftover) > 0


@settings(max_examples=200, deadline=None)
@given(
    lengths=st.lists(st.integers(min_value=1, max_value=90), min_size=0, max_size=25),
    seq_len=st.integers(min_value=1, max_value=64),
    num_rows=st.one_of(st.none(), st.integers(min_value=0, max_value=6)),
    extra_seqs=st.one_of(st.none(), st.integers(min_value=0, max_value=40)),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
    order=st.sampled_from(PLACEMENT_ORDERS),
)
def test_pack_matches_reference_hypothesis(lengths, seq_len, num_rows, extra_seqs, seed, order):
    rng = np.random.default_rng(seed)
    rendered = [(rng.integers(1, 1000, size=n).astype(np.int32), rng.integers(0, 2, size=n).astype(np.uint8))
                for n in lengths]
    # A budget from tight (forces left-overs / errors) to roomy; None = the default.
    max_seqs = None if extra_seqs is None else (num_rows or 0) + extra_seqs
    try:
        expected = pack_rows_reference(rendered, seq_len, num_rows=num_rows, max_seqs=max_seqs, order=order)
    except ValueError as error:
        with pytest.raises(ValueError, match=re.escape(str(error).split(":")[1][:20])):
            pack_rows(rendered, seq_len, num_rows=num_rows, max_seqs=max_seqs, order=order)
        return
    packed = pack_rows(rendered, seq_len, num_rows=num_rows, max_seqs=max_seqs, order=order)
    assert_same(packed, expected)
    check_invariants(rendered, packed, seq_len, num_rows, max_seqs=max_seqs)


def test_best_fit_decreasing_by_hand():
    # Lengths 3, 5, 4, 2, 6 into rows of 8, visited as 6, 5, 4, 3, 2: 6 -> row 0 (2 free), 5 -> row 1 (3 free),
    # 4 -> row 2 (4 free), 3 -> row 1 (tightest fit), 2 -> row 0.
    rendered = [(np.arange(1, n + 1, dtype=np.int32), np.ones(n, dtype=np.uint8)) for n in (3, 5, 4, 2, 6)]
    packed = pack_rows(rendered, 8, max_seqs=10)
    assert packed.placement.tolist() == [[1, 5, 3], [1, 0, 5], [2, 0, 4], [0, 6, 2], [0, 0, 6]]
    assert packed.cu_seqlens.tolist() == [0, 6, 8, 13, 16, 20, 24, 24, 24, 24, 24]
    assert packed.num_seqs == 6 and packed.num_tokens == 20 and packed.efficiency == 20 / 24
    assert packed.num_supervised == sum(n - 1 for n in (3, 5, 4, 2, 6))
    # Two fixed rows: 4 fits nowhere after 6 and 5 are placed.
    fixed = pack_rows(rendered, 8, num_rows=2, max_seqs=10)
    assert fixed.leftover.tolist() == [2] and fixed.rows == 2
    # A segment budget of 4 (one padding segment reserved per row) admits only two conversations.
    tight = pack_rows(rendered, 8, num_rows=2, max_seqs=4)
    assert tight.leftover.tolist() == [0, 2, 3]
    assert tight.cu_seqlens.tolist() == [0, 6, 8, 13, 16]


def test_best_fit_in_arrival_order_by_hand():
    # The same lengths 3, 5, 4, 2, 6 into rows of 8, visited as given: 3 -> row 0 (5 free), 5 -> row 0 (fits
    # exactly: the tightest), 4 -> row 1 (4 free), 2 -> row 1 (2 free), 6 -> row 2 (2 free).
    rendered = [(np.arange(1, n + 1, dtype=np.int32), np.ones(n, dtype=np.uint8)) for n in (3, 5, 4, 2, 6)]
    packed = pack_rows(rendered, 8, max_seqs=10, order="arrival")
    assert packed.placement.tolist() == [[0, 0, 3], [0, 3, 5], [1, 0, 4], [1, 4, 2], [2, 0, 6]]
    assert packed.cu_seqlens.tolist() == [0, 3, 8, 12, 14, 16, 22, 24, 24, 24, 24]
    assert packed.num_seqs == 7 and packed.num_tokens == 20 and packed.efficiency == 20 / 24
    # Two fixed rows: 6 is left over (4 would have been, longest first); the rows are fuller than decreasing's.
    fixed = pack_rows(rendered, 8, num_rows=2, max_seqs=10, order="arrival")
    assert fixed.leftover.tolist() == [4] and fixed.efficiency == 14 / 16
    # A segment budget of 4 (one padding segment reserved per row) admits the first two conversations.
    tight = pack_rows(rendered, 8, num_rows=2, max_seqs=4, order="arrival")
    assert tight.leftover.tolist() == [2, 3, 4] and tight.placement[:2].tolist() == [[0, 0, 3], [0, 3, 5]]
    # Longer than the row: cut to seq_len and placed in an empty row, wherever it stands in line.
    long = rendered[:2] + [(np.arange(1, 12, dtype=np.int32), np.ones(11, dtype=np.uint8))]
    cut = pack_rows(long, 8, num_rows=2, max_seqs=10, order="arrival")
    assert cut.placement.tolist() == [[0, 0, 3], [0, 3, 5], [1, 0, 8]] and cut.num_truncated == 1


@pytest.mark.parametrize("pack", [pack_rows, pack_rows_reference])
def test_unknown_order_is_an_error(pack):
    with pytest.raises(ValueError, match=r"order must be one of \('decreasing', 'arrival'\), got 'sideways'"):
        pack([_pair()], 8, order="sideways")
    with pytest.raises(ValueError, match="order must be one of"):
        pack([_pair()], 8, order=None)
    with pytest.raises(ValueError, match='pack_place: order must be "decreasing" or "arrival", got "Arrival"'):
        _C.pack_place(np.array([3, 4], dtype=np.int64), 8, -1, -1, "Arrival")


def test_truncation_is_counted_not_dropped():
    rng = np.random.default_rng(5)
    rendered = random_rendered(rng, 12, max_len=40) + [
        (rng.integers(1, 99, size=100).astype(np.int32), np.ones(100, dtype=np.uint8))]
    packed = pack_rows(rendered, 32, max_seqs=64)
    check_invariants(rendered, packed, 32, max_seqs=64)
    assert packed.num_truncated == sum(len(ids) > 32 for ids, _ in rendered) >= 1
    row, offset, length = packed.placement[-1]
    assert length == 32 and offset == 0  # the longest goes first into a fresh row


def test_leftovers_carry_over_to_the_next_batch():
    rng = np.random.default_rng(11)
    rendered = random_rendered(rng, 60, max_len=64)
    seen = []
    pending = list(range(len(rendered)))
    for _ in range(30):
        if not pending:
            break
        packed = pack_rows([rendered[i] for i in pending], 64, num_rows=3, max_seqs=40)
        placed = [pending[k] for k in np.flatnonzero(packed.placement[:, 0] >= 0)]
        assert placed, "a batch must make progress"
        seen += placed
        pending = [pending[k] for k in packed.leftover]
    assert sorted(seen) == list(range(len(rendered)))


@pytest.mark.parametrize("order", PLACEMENT_ORDERS)
@pytest.mark.parametrize("seed", range(6))
def test_pack_pool_is_pack_rows_over_the_pool_fetching_only_what_it_places(order, seed):
    # A pool of ~8 batches' worth (as a training stream keeps), odd sizes, some conversations longer than a row:
    # the batch is pack_rows' over the whole pool field for field, and only the placed conversations' tokens are
    # asked for (the pool's waiting conversations cost nothing a batch).
    rng = np.random.default_rng(seed)
    seq_len, rows = int(rng.integers(17, 90)), int(rng.integers(1, 5))
    pool = random_rendered(rng, int(rng.integers(1, 120)), max_len=seq_len + 5)
    max_seqs = int(rng.integers(rows, 4 * rows + 9))  # down to a budget that fits nothing
    fetched = []

    def fetch(positions):
        fetched.append(np.asarray(positions).copy())
        return [pool[k] for k in positions]

    lengths = np.array([len(ids) for ids, _ in pool], dtype=np.int64)
    got = pack_pool(lengths, fetch, seq_len, num_rows=rows, pad_id=7, max_seqs=max_seqs, order=order)
    want = pack_rows(pool, seq_len, num_rows=rows, pad_id=7, max_seqs=max_seqs, order=order)
    for field in want.__dataclass_fields__:
        a, b = getattr(got, field), getattr(want, field)
        assert (np.array_equal(a, b) if isinstance(b, np.ndarray) else a == b), field
    assert len(fetched) == 1 and np.array_equal(fetched[0], np.flatnonzero(want.placement[:, 0] >= 0))
    if len(fetched[0]) == 0:
        return  # nothing fitted the budget (also a case pack_rows has)
    with pytest.raises(ValueError, match="fetched conversations do not have the pool's lengths"):
        pack_pool(lengths, lambda ks: [(pool[k][0][1:], pool[k][1][1:]) for k in ks], seq_len, num_rows=rows,
                  pad_id=7, max_seqs=max_seqs, order=order)


@pytest.mark.parametrize("bad, match", [
    ((np.array([1, -3, 2]), np.array([0, 1, 1])), "conversation 13 holds token id -3"),
    ((np.array([1, 2, 3]), np.array([0, 1])), "conversation 13 has 3 ids but 2 mask values"),
    ((np.array([1.0, 2.0]), np.array([0, 1])), "conversation 13 ids must be integers"),
    ((np.array([1, 2 ** 33]), np.array([0, 1])), r"conversation 13: token id 8589934592 is outside \[0, 2\^31\)"),
])
def test_stream_names_the_bad_conversation_by_its_index_in_the_data(bad, match):
    # Checked once, when it joins the pool: a DataError naming the source and the conversation's own index (not
    # its place in the pool), raised by the batch that would have rendered it.
    class Source:
        name = "my-source"

        def __init__(self, pairs):
            self.pairs = pairs

        def __len__(self):
            return len(self.pairs)

        def __call__(self, indices):
            return [self.pairs[i] for i in indices]

    pairs = [_pair(3) for _ in range(20)]
    pairs[13] = bad
    stream = PackedStream(Source(pairs), 1, 8, 4, pad_id=0, render_chunk=5, buffer=6)
    stream.next_batch()  # conversations 0-9 are in the pool
    with pytest.raises(DataError, match=f"my-source: {match}"):
        for _ in range(10):
            stream.next_batch()
    assert 13 not in stream.pending.tolist()


def two_task_stream(n: int, seq_len: int, seed: int = 0) -> tuple[RenderedSource, np.ndarray]:
    """n conversations of two interleaved tasks: short and mostly supervised (task 0), or long (log-normal, one in
    ten cut at seq_len + 1 as TaskRenderer cuts) and a third supervised (task 1)."""
    rng = np.random.default_rng(seed)
    task = (rng.random(n) < 0.5).astype(np.int64)
    pairs = []
    for t in task:
        length = (int(rng.integers(8, 40)) if t == 0 else
                  int(min(seq_len + 1, max(8, rng.lognormal(np.log(0.4 * seq_len), 0.7)))))
        mask = (rng.random(length) < (0.8 if t == 0 else 0.33)).astype(np.uint8)
        pairs.append((rng.integers(1, 1000, size=length).astype(np.int32), mask))
    return RenderedSource(pairs), task


class RenderLog:
    """A PackedStream's render callable that notes, per conversation, the batch during which it joined the pool."""

    def __init__(self, source):
        self.source, self.batch, self.joined = source, 0, {}

    def __len__(self):
        return len(self.source)

    def __call__(self, indices):
        self.joined.update((int(i), self.batch) for i in indices)
        return self.source(indices)


def stream_epoch(order: str, rows: int = 4, seq_len: int = 256, n: int = 2500) -> dict:
    """One epoch of PackedStream at its default pool for `order`: waits, fills, supervised shares, task shares."""
    source, task = two_task_stream(n, seq_len)
    log = RenderLog(source)
    max_seqs = segment_budget([len(ids) for ids, _ in source.pairs[:512]], rows, seq_len)
    stream = PackedStream(log, rows, seq_len, max_seqs, pad_id=0, order=order)
    waits, fills, supervised, shares, oldest_placed, pool_sizes = {}, [], [], [], [], []
    while True:
        log.batch += 1
        pending = list(stream.pending)
        batch = stream.next_batch()
        if batch.epoch > 0:
            break
        pool = pending + [i for i in log.joined if log.joined[i] == log.batch]  # data order, oldest first
        left = set(stream.pending)
        placed = [i for i in pool if i not in left]
        assert len(placed) == len(batch.lengths) and not set(placed) & set(waits)
        waits.update((i, log.batch - log.joined[i]) for i in placed)
        oldest_placed.append(pool[0] not in left)
        pool_sizes.append(len(pool))
        fills.append(batch.packed.efficiency)
        supervised.append(batch.packed.num_supervised / batch.packed.num_tokens)
        shares.append(float(np.mean(task[placed] == 0)))
    assert sorted(waits) == list(range(n)), "every conversation of the epoch is placed exactly once"
    # The pool's depth in batches: conversations in it over conversations placed per batch, both averaged; by
    # Little's law also the mean wait, whatever the order.
    depth = float(np.mean(pool_sizes)) / (n / len(fills))
    return dict(max_wait=max(waits.values()), depth=depth, fill=float(np.mean(fills[:-3])),
                supervised_sd=float(np.std(supervised)), share_sd=float(np.std(shares)),
                oldest_always_placed=all(oldest_placed), batches=len(fills))


def test_arrival_stream_places_the_oldest_first_and_bounds_every_wait():
    # Over a whole epoch of a two-task stream (the drain at its end included): in arrival order the oldest pending
    # conversation is placed in every batch, so no conversation waits much longer than the pool is deep (in
    # batches), and every batch draws both tasks about as the data does. Longest first (the old default) leaves
    # the short ones waiting and hands out runs of one task. The fill is reported (pytest -s).
    arrival, decreasing = stream_epoch("arrival"), stream_epoch("decreasing")
    for name, r in (("arrival", arrival), ("decreasing", decreasing)):
        print(f"\n{name}: {r['batches']} batches, pool {r['depth']:.1f} batches deep, max wait {r['max_wait']} "
              f"batches, fill {100 * r['fill']:.2f}%, supervised share sd {100 * r['supervised_sd']:.1f} points, "
              f"short-task share sd {100 * r['share_sd']:.1f} points")
    assert arrival["oldest_always_placed"]
    assert arrival["max_wait"] <= 2 * arrival["depth"]  # measured 1.6x
    assert decreasing["max_wait"] > 5 * decreasing["depth"]  # the measurement tells the two orders apart
    assert arrival["share_sd"] < 0.5 * decreasing["share_sd"]
    assert arrival["supervised_sd"] < 0.5 * decreasing["supervised_sd"]
    assert arrival["fill"] > 0.95
    with pytest.raises(ValueError, match=r"order must be one of \('arrival', 'decreasing'\), got 'random'"):
        PackedStream(RenderedSource([_pair()]), 1, 8, 4, pad_id=0, order="random")


@pytest.mark.parametrize("order", PLACEMENT_ORDERS)
def test_stream_state_resumes_its_own_order_and_pool(order):
    # A run resumes with the placement order and pool it started with, whatever the loading stream was built with
    # (a checkpoint of the old default, longest first from a 2x pool, resumed by code whose default is arrival):
    # mid-epoch with conversations waiting, through the epoch's end into the next.
    source, _ = two_task_stream(300, 128)

    def stream(**kw):
        return PackedStream(source, 4, 128, 40, pad_id=0, render_chunk=64, **kw)

    def continue_from(state, **kw):
        resumed = stream(**kw)
        resumed.load_state_dict(state)
        return [resumed.next_batch() for _ in range(40)]

    def assert_same_batches(got, want):
        for a, b in zip(got, want, strict=True):
            assert np.array_equal(a.packed.input_ids, b.packed.input_ids) and a.state == b.state

    first = stream(order=order)
    for _ in range(5):
        first.next_batch()
    state = first.state_dict()
    want = [first.next_batch() for _ in range(40)]
    assert state["pending"] and want[-1].epoch == 1
    other = PLACEMENT_ORDERS[1 - PLACEMENT_ORDERS.index(order)]
    assert_same_batches(continue_from(state, order=other), want)
    if order == "decreasing":  # a state saved before it named its order and pool: the old default's
        old = {k: v for k, v in state.items() if k not in ("order", "buffer")}
        assert_same_batches(continue_from(old), want)

def test_pack_rendered_batch_from_the_renderer():
    tokenizer = Tokenizer.train_from_iterator(["hello world, how are you? fine thanks " * 20], 300)
    rng = random.Random(3)
    conversations = [
        {"messages": [{"role": "user", "content": "hello " * rng.randint(0, 30)},
                      {"role": "assistant", "content": [{"type": "text", "text": "fine " * rng.randint(0, 30)},
                                                        {"type": "python_output", "text": "how " * 3}]}]}
        for _ in range(40)
    ]
    flat = render_batch_flat(tokenizer, conversations, max_tokens=90)
    packed = pack_rows(flat, 64, num_rows=8, pad_id=tokenizer.bos_id)
    check_invariants(flat.to_list(), packed, 64, 8, pad_id=tokenizer.bos_id)
    # The flat batch and its per-conversation list are two inputs of the C++ path: each against the reference.
    assert_same(packed, pack_rows_reference(flat.to_list(), 64, num_rows=8, pad_id=tokenizer.bos_id))
    from_list = pack_rows([(ids.copy(), mask.copy()) for ids, mask in flat.to_list()], 64, num_rows=8,
                          pad_id=tokenizer.bos_id)
    check_invariants(flat.to_list(), from_list, 64, 8, pad_id=tokenizer.bos_id)
    assert_same(from_list, pack_rows_reference(flat, 64, num_rows=8, pad_id=tokenizer.bos_id))


def test_empty_input():
    packed = pack_rows([], 16)
    assert packed.rows == 0 and packed.cu_seqlens.tolist() == [0] and packed.efficiency == 0.0
    fixed = pack_rows([], 16, num_rows=2, max_seqs=3)
    assert fixed.input_ids.shape == (2, 16) and fixed.cu_seqlens.tolist() == [0, 16, 32, 32]
    assert_same(fixed, pack_rows_reference([], 16, num_rows=2, max_seqs=3))


def _pair(n=5):
    return (np.arange(1, n + 1, dtype=np.int32), np.ones(n, dtype=np.uint8))


@pytest.mark.parametrize("pack", [pack_rows, pack_rows_reference])
def test_bad_input_errors(pack):
    good = [_pair(), _pair(3)]
    with pytest.raises(ValueError, match="seq_len must be >= 1"):
        pack(good, -4)
    with pytest.raises(TypeError, match="seq_len must be an int"):
        pack(good, 8.0)
    with pytest.raises(ValueError, match=r"rendered\[1\] has 3 ids but 2 mask values"):
        pack([_pair(), (np.arange(3), np.ones(2))], 8)
    with pytest.raises(TypeError, match=r"rendered\[0\] ids must be integers"):
        pack([(np.ones(4, dtype=np.float32), np.ones(4, dtype=np.uint8))], 8)
    with pytest.raises(TypeError, match=r"rendered\[0\] mask must be bool"):
        pack([(np.ones(4, dtype=np.int64), np.ones(4, dtype=np.float64))], 8)
    with pytest.raises(ValueError, match=r"conversation 1 mask holds 2 at position 1"):
        pack([_pair(), (np.arange(3), np.array([0, 2, 1]))], 8)
    with pytest.raises(ValueError, match=r"conversation 1 holds token id -1 at position 1"):
        pack([_pair(), (np.array([1, -1]), np.array([0, 1]))], 8)
    with pytest.raises(ValueError, match=r"conversation 1.* mask holds -1"):
        pack([_pair(), (np.array([1, 2]), np.array([0, -1]))], 8)
    with pytest.raises(ValueError, match=r"conversation 0.* token id 4294967301 .*outside \[0, 2\^31\)"):
        pack([(np.array([2**32 + 5]), np.array([0]))], 8)
    with pytest.raises(ValueError, match=r"rendered\[1\] is empty"):
        pack([_pair(), (np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.uint8))], 8)
    with pytest.raises(ValueError, match="needs 3 cu_seqlens segments .* max_seqs=2"):
        pack(good, 16, max_seqs=2)
    with pytest.raises(ValueError, match="max_seqs=1 < num_rows=2"):
        pack(good, 16, num_rows=2, max_seqs=1)
    with pytest.raises(ValueError, match="num_rows must be >= 0"):
        pack(good, 16, num_rows=-1)
    with pytest.raises(TypeError, match="RenderedBatch needs ids int32"):
        pack(RenderedBatch(np.arange(3), np.ones(3, dtype=np.uint8), np.array([0, 3])), 8)
    with pytest.raises(TypeError, match="sequence of \\(ids, mask\\) pairs"):
        pack(iter(good), 8)


def _flat(ids, mask, offsets):
    return RenderedBatch(np.array(ids, dtype=np.int32), np.array(mask, dtype=np.uint8), np.array(offsets))


@pytest.mark.parametrize("pack", [pack_rows, pack_rows_reference])
def test_rendered_batch_values_are_checked_like_lists(pack):
    # The flat form once skipped these checks and gave targets that differ from the reference.
    with pytest.raises(ValueError, match=r"conversation 1 mask holds 7 at position 0"):
        pack(_flat([1, 2, 3, 4], [0, 1, 7, 1], [0, 2, 4]), 8)
    with pytest.raises(ValueError, match=r"conversation 0 holds token id -3 at position 1"):
        pack(_flat([1, -3, 3, 4], [0, 1, 1, 1], [0, 2, 4]), 8)
    with pytest.raises(ValueError, match=r"offsets"):
        pack(_flat([1, 2, 3, 4], [0, 1, 1, 1], [0, 3, 2, 4]), 8)
    good = pack(_flat([1, 2, 3, 4], [0, 1, 0, 1], [0, 2, 4]), 8, max_seqs=3)
    assert good.targets.tolist() == [[2, -1, 4, -1, -1, -1, -1, -1]]  # worked out by hand


def test_out_of_range_ints_name_the_argument():
    good = [_pair(), _pair(3)]
    with pytest.raises(ValueError, match=r"pack_place: argument 'seq_len' = 1180591620717411303424 is outside the "
                                         r"int64 range"):
        pack_rows(good, 2**70)
    with pytest.raises(ValueError, match=r"num_rows=4294967296 rows of seq_len=8 tokens exceed"):
        pack_rows(good, 8, num_rows=2**32, max_seqs=2**33)
    with pytest.raises(ValueError, match=r"argument 'max_tokens' = 18446744073709551616 is outside"):
        _C.render_assemble(np.zeros(0, np.int32), np.zeros(1, np.int64), np.zeros(0, np.int64),
                           np.zeros(1, np.int64), 2**64)
    with pytest.raises(TypeError, match=r"argument 'max_tokens' must be an int, got float"):
        _C.render_assemble(np.zeros(0, np.int32), np.zeros(1, np.int64), np.zeros(0, np.int64),
                           np.zeros(1, np.int64), 8.0)
    with pytest.raises(ValueError, match=r"render_assemble: tokens\[1\] = -7 is not a token id"):
        _C.render_assemble(np.array([3, -7], np.int32), np.array([0, 2]), np.array([-2]), np.array([0, 1]), 8)
    args = _fill_args()
    # rows * seq_len overflows int64 here (2^62 * 4): the guard must not overflow with it.
    with pytest.raises(ValueError, match=r"rows=4611686018427387904 x seq_len=4 tokens exceed"):
        _C.pack_fill(*args, 2**62, 4, 0, 3)
    with pytest.raises(ValueError, match=r"argument 'pad_id' = -9223372036854775809 is outside the int64 range"):
        _C.pack_fill(*args, 1, 8, -2**63 - 1, 3)
    with pytest.raises(ValueError, match=r"max_seqs must be in \[0, 2\^31 - 1\)"):
        _C.pack_fill(*args, 1, 8, 0, 2**40)


def test_default_max_seqs_raises_when_exceeded_without_fixed_rows():
    tiny = [_pair(1) for _ in range(10)]
    assert default_max_seqs(1, 16) == 2  # 16 // 32 + 2
    with pytest.raises(ValueError, match="max_seqs=2; pass a larger max_seqs"):
        pack_rows(tiny, 16)
    # With fixed rows the same budget turns the overflow into left-overs instead.
    packed = pack_rows(tiny, 16, num_rows=1, max_seqs=4)
    assert packed.leftover.size == 7 and packed.num_seqs == 4


def _fill_args():
    ids = np.arange(1, 8, dtype=np.int32)
    mask = np.ones(7, dtype=np.uint8)
    offsets = np.array([0, 4, 7], dtype=np.int64)
    row, offset, length = np.array([0, 0]), np.array([0, 4]), np.array([4, 3])
    return [ids, mask, offsets, row, offset, length]


def test_pack_fill_rejects_wrong_arrays_and_bad_placements():
    args = _fill_args()
    input_ids, targets, positions, cu, *_ = _C.pack_fill(*args, 1, 8, 0, 3)
    assert input_ids.tolist() == [[1, 2, 3, 4, 5, 6, 7, 0]] and cu.tolist() == [0, 4, 7, 8]
    bad = list(args)
    bad[0] = args[0].astype(np.int64)
    with pytest.raises(TypeError, match="'ids' must be a 1-D C-contiguous int32"):
        _C.pack_fill(*bad, 1, 8, 0, 3)
    bad = list(args)
    bad[4] = np.array([0, 3])  # the second conversation overlaps the first
    with pytest.raises(ValueError, match="does not tile row 0"):
        _C.pack_fill(*bad, 1, 8, 0, 3)
    bad = list(args)
    bad[5] = np.array([4, 5])  # longer than the conversation
    with pytest.raises(ValueError, match="placement of conversation 1"):
        _C.pack_fill(*bad, 1, 8, 0, 3)
    with pytest.raises(ValueError, match="needs 3 cu_seqlens segments .* max_seqs=2"):
        _C.pack_fill(*args, 1, 8, 0, 2)
    with pytest.raises(TypeError, match="'lengths' must be a 1-D C-contiguous int64"):
        _C.pack_place(np.array([3, 4], dtype=np.int32), 8, -1, -1)


def test_recycled_buffers_are_fully_rewritten_and_never_shared():
    # The C++ side recycles freed output buffers; results must neither alias live arrays nor keep stale values.
    rng = np.random.default_rng(21)
    seq_len, rows = 48, 8
    # Full rows, every target supervised: a buffer with no -1 and no pad id anywhere.
    dense = [(rng.integers(100, 999, size=seq_len).astype(np.int32), np.ones(seq_len, dtype=np.uint8))
             for _ in range(rows)]
    sparse = random_rendered(rng, 6, max_len=20)  # mostly padding
    first = pack_rows(dense, seq_len, num_rows=rows, pad_id=3, max_seqs=64)
    snapshot = first.input_ids.copy(), first.targets.copy(), first.position_ids.copy()
    second = pack_rows(sparse, seq_len, num_rows=rows, pad_id=5, max_seqs=64)
    assert all(np.array_equal(a, b) for a, b in zip(snapshot, (first.input_ids, first.targets, first.position_ids)))
    assert not np.shares_memory(first.input_ids, second.input_ids)
    for _ in range(3):
        del first
        again = pack_rows(sparse, seq_len, num_rows=rows, pad_id=5, max_seqs=64)  # may take first's buffers
        check_invariants(sparse, again, seq_len, rows, pad_id=5, max_seqs=64)
        assert_same(again, pack_rows_reference(sparse, seq_len, num_rows=rows, pad_id=5, max_seqs=64))
        del again
        first = pack_rows(dense, seq_len, num_rows=rows, pad_id=3, max_seqs=64)
