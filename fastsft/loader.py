"""Packed batches of fixed shape from a task, in data order: the CPU half of the training data path.

Why this file exists: a training step wants `rows x seq_len` tokens with static shapes, while conversations come
in all lengths. The stream renders conversations a chunk at a time (fastsft.packing.render_batch, C++), keeps a
pool of rendered conversations, and packs the pool best-fit in arrival order into `rows` rows (the training stream,
fastsft.batches.PackedStream, over one epoch); whatever does not fit waits in the pool for the next batch, so
nothing is dropped. Conversations longer than a row are cut to the row by the packer, which counts them (the
renderer stops one token past the row so the packer can tell). The same task, order and arguments always give the
same batches.

Moving batches to the GPU (pinned buffers, a background thread) belongs to the training driver.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from fastsft.batches import RENDER_CHUNK, PackedStream, TaskRenderer
from fastsft.packing import PackedBatch, default_max_seqs


def check_batch_shape(rows: int, seq_len: int) -> None:
    """A ValueError unless batches of `rows` x `seq_len` can hold a conversation (checked before any costly setup)."""
    for name, value in (("rows", rows), ("seq_len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if rows < 1 or seq_len < 2:
        raise ValueError(f"need rows >= 1 and seq_len >= 2 (a target needs two tokens), got rows={rows}, "
                         f"seq_len={seq_len}")


def no_supervision_reason(stats: "StreamStats", seq_len: int) -> str:
    """Why an epoch with `stats` holds no supervised target (for the error that stops such a run)."""
    if stats.truncated:
        return (f"{stats.truncated:,} of {stats.conversations:,} conversations were cut to seq_len={seq_len} and "
                f"every supervised (assistant) token lies past the cut; raise the row length (--seq-len)")
    return (f"none of the {stats.conversations:,} conversations has a supervised (assistant) token after its "
            f"first one")


@dataclass
class StreamStats:
    """Running totals over the batches yielded so far."""

    batches: int = 0
    conversations: int = 0  # packed into a batch
    truncated: int = 0  # of those, cut to seq_len
    tokens: int = 0  # real tokens
    supervised: int = 0  # supervised targets
    slots: int = 0  # rows * seq_len summed over batches

    @property
    def efficiency(self) -> float:
        return self.tokens / self.slots if self.slots else 0.0


class PackedBatchStream:
    """Iterate over one pass of `task` as PackedBatch objects of exactly `rows` x `seq_len` tokens: the first epoch
    of the stream training reads (fastsft.batches.PackedStream: the same renderer, packer, placement order and
    pool), with running totals in `stats`.

    buffer: how many rendered conversations the packer chooses from (default: the training stream's pool).
    render_chunk: conversations rendered per C++ call. pad_id defaults to the tokenizer's BOS, as nanochat pads.
    """

    def __init__(self, task, tokenizer, rows: int, seq_len: int, buffer: int | None = None,
                 render_chunk: int = RENDER_CHUNK, max_seqs: int | None = None, pad_id: int | None = None):
        check_batch_shape(rows, seq_len)
        if (buffer is not None and buffer < 1) or render_chunk < 1:
            raise ValueError(f"buffer and render_chunk must be >= 1, got {buffer} and {render_chunk}")
        self.task, self.tokenizer = task, tokenizer
        self.rows, self.seq_len = rows, seq_len
        self.max_seqs = max_seqs if max_seqs is not None else default_max_seqs(rows, seq_len)
        self.buffer, self.render_chunk = buffer, render_chunk
        self.pad_id = tokenizer.bos_id if pad_id is None else pad_id
        self.stats = StreamStats()

    def __iter__(self) -> Iterator[PackedBatch]:
        if len(self.task) == 0:
            return
        stream = PackedStream(TaskRenderer(self.task, self.tokenizer, self.seq_len), self.rows, self.seq_len,
                              self.max_seqs, self.pad_id, buffer=self.buffer, render_chunk=self.render_chunk)
        while stream.epoch == 0 and stream.epoch_left():
            batch = stream.next_batch()
            packed, s = batch.packed, self.stats
            s.batches += 1
            s.conversations += len(batch.lengths)
            s.truncated += packed.num_truncated
            s.tokens += packed.num_tokens
            s.supervised += packed.num_supervised
            s.slots += packed.rows * self.seq_len
            yield packed
