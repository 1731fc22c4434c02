"""PackedBatchStream: fixed-shape batches over one pass of a task, nothing lost, truncation counted."""

import numpy as np
import pytest

from fastsft.chat import render_conversation
from fastsft.data import load_task
from fastsft.data.base import conversation_text
from fastsft.loader import PackedBatchStream
from fastsft.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def task():
    return load_task("synthetic:arithmetic?size=150&seed=3")


@pytest.fixture(scope="module")
def tokenizer(task):
    return Tokenizer.train_from_iterator([t for i in range(len(task)) for t in conversation_text(task[i])], 600)


def reference_totals(task, tokenizer, seq_len):
    """Tokens, supervised targets and truncations of the whole task, from the Python renderer."""
    tokens = supervised = truncated = 0
    for i in range(len(task)):
        ids, mask = render_conversation(tokenizer, task[i], max_tokens=seq_len)
        full = len(render_conversation(tokenizer, task[i], max_tokens=1 << 20)[0])
        tokens += len(ids)
        supervised += sum(mask[1:])  # token t is a target of position t-1 inside the same conversation
        truncated += full > seq_len
    return tokens, supervised, truncated


@pytest.mark.parametrize("rows,seq_len,buffer", [(3, 257, 7), (2, 61, 5)])
def test_one_pass_packs_every_conversation_once(task, tokenizer, rows, seq_len, buffer):
    stream = PackedBatchStream(task, tokenizer, rows=rows, seq_len=seq_len, buffer=buffer, render_chunk=11)
    batches = list(stream)
    for b in batches:
        assert b.input_ids.shape == (rows, seq_len) and b.targets.shape == (rows, seq_len)
        assert b.cu_seqlens.shape == (stream.max_seqs + 1,)
    tokens, supervised, truncated = reference_totals(task, tokenizer, seq_len)
    s = stream.stats
    assert s.conversations == len(task)
    assert s.tokens == tokens == sum(b.num_tokens for b in batches)
    assert s.supervised == supervised == sum(int((b.targets >= 0).sum()) for b in batches)
    assert s.truncated == truncated
    assert s.batches == len(batches) and s.slots == len(batches) * rows * seq_len
    assert 0 < s.efficiency <= 1
    if seq_len == 61:
        assert truncated > 0  # the short rows really exercise truncation


def test_same_arguments_same_batches(task, tokenizer):
    a = list(PackedBatchStream(task, tokenizer, rows=2, seq_len=200, buffer=9))
    b = list(PackedBatchStream(task, tokenizer, rows=2, seq_len=200, buffer=9))
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.input_ids, y.input_ids)
        np.testing.assert_array_equal(x.targets, y.targets)
        np.testing.assert_array_equal(x.cu_seqlens, y.cu_seqlens)


def test_padding_uses_bos_by_default(task, tokenizer):
    batch = next(iter(PackedBatchStream(task, tokenizer, rows=1, seq_len=997, buffer=2)))
    assert batch.num_tokens < 997
    assert (batch.input_ids[0, batch.num_tokens:] == tokenizer.bos_id).all()


def test_bad_arguments(task, tokenizer):
    with pytest.raises(ValueError, match="rows"):
        PackedBatchStream(task, tokenizer, rows=0, seq_len=64)
    with pytest.raises(ValueError, match="buffer"):
        PackedBatchStream(task, tokenizer, rows=1, seq_len=64, buffer=0)


def test_dry_run_report(capsys):
    from fastsft.dry_run import dry_run

    totals = dry_run("synthetic:spell?size=40", rows=2, seq_len=96)
    out = capsys.readouterr().out
    assert "epoch: 40 conversations" in out and "(2, 96) int64" in out and "nothing was trained" in out
    assert totals["conversations"] == 40 and totals["supervised"] > 0


@pytest.mark.parametrize("rows,seq_len", [(2, 0), (0, 64), (2, 1)])
def test_dry_run_rejects_a_bad_shape_before_any_tokenizer_is_trained(monkeypatch, rows, seq_len):
    import fastsft.dry_run

    def no_tokenizer(*_):
        raise AssertionError("a tokenizer was made before the arguments were checked")

    monkeypatch.setattr(fastsft.dry_run, "load_tokenizer", no_tokenizer)
    with pytest.raises(ValueError, match="rows >= 1 and seq_len >= 2"):
        fastsft.dry_run.dry_run("synthetic:spell?size=40", rows=rows, seq_len=seq_len)


def test_dry_run_without_supervised_targets_is_an_error(tmp_path, capsys):
    import json

    from fastsft.data.base import DataError
    from fastsft.dry_run import dry_run

    # Long questions, short answers: at seq_len 16 every conversation is cut before its answer.
    rows = [{"messages": [{"role": "user", "content": "word " * 60 + str(i)}, {"role": "assistant", "content": "ok"}]}
            for i in range(20)]
    path = tmp_path / "long.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(DataError, match=r"no supervised target.*20 of 20 conversations were cut to seq_len=16"):
        dry_run(f"jsonl:{path}", rows=2, seq_len=16)
    assert dry_run(f"jsonl:{path}", rows=2, seq_len=1024)["supervised"] > 0


def test_a_bad_conversation_is_named_by_task_and_position(tokenizer):
    from helpers import ListTask

    from fastsft.data.base import DataError

    firsts = ["assistant" if i == 23 else "user" for i in range(30)]
    one_bad_row = ListTask("one-bad-row", [{"messages": [{"role": f, "content": "hi"},
                                                         {"role": "assistant", "content": "yo"}]} for f in firsts])
    stream = PackedBatchStream(one_bad_row, tokenizer, rows=2, seq_len=64, render_chunk=8)
    with pytest.raises(DataError, match=r"one-bad-row: conversation 23: message 0: expected role 'user'"):
        list(stream)


def test_dry_run_reports_skipped_rows_at_the_end(tmp_path, capsys):
    import json

    from fastsft.dry_run import dry_run

    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(12)]
    rows[5] = {"messages": [{"role": "assistant", "content": "out of order"}]}
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    dry_run(f"jsonl:{path}", rows=1, seq_len=64, on_error="skip")
    out = capsys.readouterr().out
    assert "epoch: 11 conversations" in out
    tail = out[out.index("skipped rows"):]
    assert "skipped 1 rows" in tail and "nothing was trained" in tail
