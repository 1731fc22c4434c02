"""`fastsft train --dry-run`: run the whole CPU data path of training and report what the model would see.

Loads the data spec, takes a tokenizer (as `fastsft inspect` does), streams one epoch through the C++ renderer
and packer into fixed `rows x seq_len` batches (fastsft.loader.PackedBatchStream) and prints the batches'
shape and the epoch's totals: conversations, tokens, supervised targets, truncations, packing efficiency, and how
fast the data path ran. No model is built and nothing is trained.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from fastsft.data.base import DataError
from fastsft.data.spec import load_mixture
from fastsft.inspect import TOKENIZER_TRAIN_CONVERSATIONS, load_tokenizer
from fastsft.loader import PackedBatchStream, check_batch_shape, no_supervision_reason


def dry_run(spec: str, rows: int = 8, seq_len: int = 512, tokenizer: str | None = None, seed: int = 42,
            on_error: str = "error", out: TextIO | None = None) -> dict:
    """Print the dry-run report of `spec` and return the epoch's totals."""
    out = out or sys.stdout
    check_batch_shape(rows, seq_len)  # before the data is read and a tokenizer trained on it
    task = load_mixture(spec, seed=seed, on_error=on_error)
    sample = [task[i] for i in range(min(len(task), TOKENIZER_TRAIN_CONVERSATIONS))]
    tok, tok_desc = load_tokenizer(tokenizer, sample)
    out.write(f"data: {spec}\n  {len(task):,} conversations in a mixture of {len(task.tasks)} task(s) "
              f"(seed {seed})\n")
    out.write(f"tokenizer: {tok_desc}\n")

    stream = PackedBatchStream(task, tok, rows=rows, seq_len=seq_len)
    start = time.perf_counter()
    first = None
    for batch in stream:
        first = first or batch
    seconds = time.perf_counter() - start
    s = stream.stats
    if first is None:
        raise ValueError(f"{spec}: no conversations to train on")
    out.write(f"batches: {s.batches:,} per epoch of input_ids/targets/position_ids {first.input_ids.shape} int64, "
              f"cu_seqlens ({len(first.cu_seqlens)},) int32 (fixed), max_seqlen {first.max_seqlen}\n")
    out.write(f"first batch: {first.num_seqs} segments, {first.num_tokens:,} tokens, "
              f"{first.num_supervised:,} supervised targets\n")
    out.write(f"epoch: {s.conversations:,} conversations, {s.tokens:,} tokens, {s.supervised:,} supervised targets "
              f"({100 * s.supervised / max(1, s.tokens):.1f}%), {s.truncated:,} truncated to {seq_len}, "
              f"packing efficiency {100 * s.efficiency:.1f}%\n")
    out.write(f"data path: {seconds:.2f} s for the epoch ({s.conversations / seconds:,.0f} conversations/s, "
              f"{s.tokens / seconds / 1e6:.2f} M tokens/s, render + pack, one CPU thread)\n")
    if task.skip_summary():  # the skip policy reports every left-out row by reason, at the end
        out.write("skipped rows (--skip-bad-rows):\n  " + task.skip_summary().replace("\n", "\n  ") + "\n")
    if s.supervised == 0:  # a run on this data would train on nothing: stop and say why
        raise DataError(f"{spec}: no supervised target in the epoch: {no_supervision_reason(s, seq_len)}")
    out.write("dry run: no model was built and nothing was trained\n")
    return dict(batches=s.batches, conversations=s.conversations, tokens=s.tokens, supervised=s.supervised,
                truncated=s.truncated, efficiency=s.efficiency)
