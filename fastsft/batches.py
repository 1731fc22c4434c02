"""Packed micro-batches for training: one rank's resumable stream, and the one hand-off to device tensors.

Why this file exists: the training step wants fixed-shape batches that are ready when it asks, and a resumed run
must see exactly the batches the interrupted one would have seen. So:
- `PackedStream` walks this rank's share of the conversations (every `world`-th of the epoch order, a new seeded
  order each epoch after the first), renders them a chunk at a time (C++), packs best-fit into `rows` rows (C++),
  oldest first, and carries what did not fit into the next batch. Its `state_dict()` (epoch, position, waiting
  conversations, placement order and pool size) restores the same stream; every batch carries the state after it,
  so a checkpoint saves the state of the last batch the step consumed, not of whatever a loader thread has
  prepared since.
- `to_device` is the ONE place a `PackedBatch` becomes tensors: it checks token ids against the model's vocabulary
  on the host (an id past the vocabulary would index padded embedding rows silently on the GPU), copies through
  pinned host buffers with `non_blocking`, and keeps the host-side counts (supervised targets, real tokens,
  conversation lengths for MFU) so the step never reads them back from the device.
- `BatchLoader` runs the stream on a background thread (render and pack release the GIL) a few batches ahead.

The row length, the cu_seqlens segment budget and the ignore index are named here once: `seq_len`, `max_seqs`
and `IGNORE_INDEX` (targets that are not supervised; the loss kernel skips them).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fastsft.chat import ConversationError
from fastsft.data.base import DataError
from fastsft.packing import PackedBatch, pack_pool, render_batch, rendered_lengths

IGNORE_INDEX = -1  # targets of unsupervised positions and padding, as the packer writes them
RENDER_CHUNK = 256  # conversations per C++ render call


class TaskRenderer:
    """Rendered (ids, mask) of conversations of a task by index, cut one token past the row so the packer counts
    truncations."""

    def __init__(self, task, tokenizer, seq_len: int):
        self.task, self.tokenizer, self.max_tokens = task, tokenizer, seq_len + 1
        self.name = task.name

    def __len__(self) -> int:
        return len(self.task)

    def __call__(self, indices: Sequence[int]) -> list[tuple[np.ndarray, np.ndarray]]:
        conversations = [self.task[int(i)] for i in indices]
        try:
            return render_batch(self.tokenizer, conversations, max_tokens=self.max_tokens)
        except ConversationError as e:  # its index counts inside the chunk: name the task's own
            raise DataError(f"{self.task.name}: conversation {int(indices[e.index])}: {e.reason}") from e


class RenderedSource:
    """Already rendered (ids, mask) pairs, e.g. the peer benchmark's synthetic token streams."""

    name = "pre-rendered conversations"

    def __init__(self, pairs: Sequence[tuple]):
        self.pairs = [(np.asarray(i, dtype=np.int32), np.asarray(m, dtype=np.uint8)) for i, m in pairs]

    def __len__(self) -> int:
        return len(self.pairs)

    def __call__(self, indices: Sequence[int]) -> list[tuple[np.ndarray, np.ndarray]]:
        return [self.pairs[int(i)] for i in indices]


@dataclass
class HostBatch:
    """One packed micro-batch on the host with what the step needs to know about it without the device."""

    packed: PackedBatch
    lengths: np.ndarray  # placed (possibly truncated) length of each conversation in it
    state: dict  # the stream's state after this batch (for checkpoints)
    epoch: int


class PackedStream:
    """Endless packed micro-batches of `rows` x `seq_len` over this rank's share, epoch after epoch.

    order: the packer's placement order (fastsft.packing.PLACEMENT_ORDERS), given the pending conversations oldest
    first; buffer: the pool size in conversations, by default POOL_DEPTH[order] times the segment budget.
    """

    POOL_DEPTH = {"arrival": 8, "decreasing": 2}  # pool / max_seqs per order; why: the comment in __init__
    ORDER = "arrival"

    def __init__(self, render: Callable, rows: int, seq_len: int, max_seqs: int, pad_id: int, seed: int = 0,
                 rank: int = 0, world: int = 1, buffer: int | None = None, order: str = ORDER,
                 render_chunk: int = RENDER_CHUNK):
        if len(render) < world:
            raise DataError(f"{len(render)} conversations cannot be shared by {world} ranks")
        if order not in self.POOL_DEPTH:
            raise ValueError(f"order must be one of {tuple(self.POOL_DEPTH)}, got {order!r}")
        self.render, self.rows, self.seq_len, self.max_seqs, self.pad_id = render, rows, seq_len, max_seqs, pad_id
        self.seed, self.rank, self.world, self.placement_order = seed, rank, world, order
        # A deep pool is safe only in arrival order: longest first sorts the stream, leaving short conversations
        # to pile up until batches of nothing but short ones (of a mixture: of one task), and cut the embedded
        # default's accuracy from 0.683 to 0.44 at 8x. Arrival order places the oldest first, so batches keep the
        # data's mixture; 8x fills 98.2% of 32 x 2048 rows against 93.6% for longest first at 2x (bench/RESULTS.md,
        # run 5).
        self.render_chunk = render_chunk
        self.buffer = buffer or self._default_pool(order)
        self.epoch, self.position = 0, 0
        self.pending = np.zeros(0, dtype=np.int64)  # conversation indices waiting for a row, in data order
        self._lengths = np.zeros(0, dtype=np.int64)  # their rendered lengths
        self._rendered: dict[int, tuple] = {}
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        n = len(self.render)
        order = np.arange(n) if epoch == 0 else np.random.default_rng([self.seed, epoch]).permutation(n)
        return order[self.rank::self.world]

    def _default_pool(self, order: str) -> int:
        return max(self.POOL_DEPTH[order] * self.max_seqs, self.render_chunk)

    def epoch_left(self) -> bool:
        """Whether this epoch has conversations still to place (else the next batch starts the next epoch)."""
        return self.position < len(self._order) or len(self.pending) > 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "pending": self.pending.tolist(),
                "rank": self.rank, "world": self.world, "order": self.placement_order, "buffer": self.buffer}

    def load_state_dict(self, state: dict) -> None:
        if (state["rank"], state["world"]) != (self.rank, self.world):
            raise ValueError(f"data state of rank {state['rank']} of {state['world']} cannot resume rank "
                             f"{self.rank} of {self.world}: resume with the same number of processes")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        pending = np.asarray([int(i) for i in state["pending"]], dtype=np.int64)
        # The placement order and the pool size decide the batches, so a run resumes with those it started with;
        # states saved before "arrival" existed lack them and were longest first from a pool of 2x the budget.
        self.placement_order = state.get("order", "decreasing")
        self.buffer = int(state.get("buffer", self._default_pool("decreasing")))
        self.pending, self._lengths, self._rendered = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), {}
        self._admit(pending)
        self._order = self._epoch_order(self.epoch)

    def _admit(self, indices: np.ndarray) -> None:
        """Render conversations into the pool, each checked once here (types, shapes, the values' ranges) and named
        by its index in the data when it fails, rather than on every batch while it waits."""
        if len(indices) == 0:
            return
        pairs = self.render([int(i) for i in indices])
        name = getattr(self.render, "name", "conversations")
        try:
            lengths = rendered_lengths(pairs, name, label=lambda k: f"conversation {int(indices[k])}")
        except (TypeError, ValueError) as e:
            raise DataError(str(e)) from None
        self._rendered.update(zip(indices.tolist(), pairs))
        self.pending = np.concatenate([self.pending, indices])
        self._lengths = np.concatenate([self._lengths, lengths])

    def next_batch(self) -> HostBatch:
        while len(self.pending) < self.buffer:
            if self.position >= len(self._order):
                if len(self.pending):
                    break  # finish this epoch's conversations before the next epoch's
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._epoch_order(self.epoch)
            chunk = self._order[self.position:self.position + self.render_chunk].astype(np.int64)
            self._admit(chunk)
            self.position += len(chunk)
        epoch = self.epoch
        pending = self.pending
        packed = pack_pool(self._lengths, lambda ks: [self._rendered[int(pending[k])] for k in ks], self.seq_len,
                           num_rows=self.rows, pad_id=self.pad_id, max_seqs=self.max_seqs, order=self.placement_order)
        placed = packed.placement[:, 0] >= 0
        if not placed.any():
            raise RuntimeError(f"no conversation fits in {self.rows} rows of {self.seq_len} with "
                               f"max_seqs={self.max_seqs}")
        for i in pending[placed].tolist():
            del self._rendered[i]
        self.pending, self._lengths = pending[~placed], self._lengths[~placed]
        return HostBatch(packed, packed.placement[placed, 2], self.state_dict(), epoch)


# -- device hand-off -------------------------------------------------------------------------------------------------


@dataclass
class DeviceBatch:
    """A micro-batch as the model takes it, with its host-side counts (never read back from the device)."""

    input_ids: torch.Tensor  # (rows, seq_len) int64
    targets: torch.Tensor  # (rows, seq_len) int64, IGNORE_INDEX where not supervised
    position_ids: torch.Tensor  # (rows, seq_len) int64
    cu_seqlens: torch.Tensor  # (max_seqs + 1,) int32
    max_seqlen: int
    num_supervised: int
    num_tokens: int
    num_truncated: int
    lengths: np.ndarray  # conversation lengths (for useful FLOPs)
    state: dict
    epoch: int
    covered: bool = False  # cu_seqlens[-1] == every token (the packer's batches): attention zeroes no tail

    @property
    def num_conversations(self) -> int:
        return len(self.lengths)

    def model_inputs(self) -> tuple[tuple, dict]:
        # The packer's supervised count rides along as a CPU scalar: the loss needs it on the host, and reading it
        # from the device would stall the host until the forward is done (a Python int would recompile per value).
        return ((self.input_ids, self.targets),
                dict(position_ids=self.position_ids, cu_seqlens=self.cu_seqlens, max_seqlen=self.max_seqlen,
                     num_supervised=torch.tensor(self.num_supervised), covered=self.covered))


def check_vocab(packed: PackedBatch, vocab_size: int, where: str = "batch") -> None:
    """Token ids must index the model's vocabulary (not its padded rows); checked on the host, before the copy."""
    top = int(packed.input_ids.max(initial=0))
    low = int(packed.input_ids.min(initial=0))
    if top >= vocab_size or low < 0:
        bad = top if top >= vocab_size else low
        raise DataError(f"{where}: token id {bad} is outside the model's vocabulary [0, {vocab_size}); "
                        "the tokenizer does not match the model")


class PinnedSlots:
    """A ring of pinned host buffers for the four arrays; a slot is reused only after its copy has finished."""

    def __init__(self, shapes: dict, slots: int = 4):
        self.buffers = [{k: torch.empty(s, dtype=d, pin_memory=True) for k, (s, d) in shapes.items()}
                        for _ in range(slots)]
        self.events: list[torch.cuda.Event | None] = [None] * slots
        self.next = 0

    def take(self) -> tuple[int, dict]:
        i = self.next
        self.next = (i + 1) % len(self.buffers)
        if self.events[i] is not None:
            self.events[i].synchronize()  # the copy that read this slot is done (long ago, in practice)
        return i, self.buffers[i]

    def copied(self, i: int) -> None:
        event = torch.cuda.Event()
        event.record()
        self.events[i] = event


ARRAYS = ("input_ids", "targets", "position_ids", "cu_seqlens")


def to_device(batch: HostBatch, device: torch.device, vocab_size: int, slots: PinnedSlots | None = None,
              staged: dict | None = None) -> DeviceBatch:
    """The hand-off. On CUDA the arrays go through pinned buffers (`staged`, filled by `stage`, or a slot taken
    here) and are copied with non_blocking on the current stream; on the CPU they are wrapped without a copy."""
    p = batch.packed
    if device.type == "cuda":
        if staged is None:
            staged = stage(batch, vocab_size, slots)
        slot, host = staged["slot"], staged["host"]
        tensors = {k: host[k].to(device, non_blocking=True) for k in ARRAYS}
        slots.copied(slot)
    else:
        if staged is None:
            check_vocab(p, vocab_size)
        tensors = {k: torch.from_numpy(getattr(p, k)) for k in ARRAYS}
    return DeviceBatch(**tensors, max_seqlen=p.max_seqlen, num_supervised=p.num_supervised, num_tokens=p.num_tokens,
                       num_truncated=p.num_truncated, lengths=batch.lengths, state=batch.state, epoch=batch.epoch,
                       covered=int(p.cu_seqlens[-1]) == p.input_ids.size)


def stage(batch: HostBatch, vocab_size: int, slots: PinnedSlots | None) -> dict | None:
    """Host work of the hand-off, safe on the loader thread: the vocabulary check and the copy into pinned memory."""
    check_vocab(batch.packed, vocab_size)
    if slots is None:
        return None
    slot, host = slots.take()
    for k in ARRAYS:
        host[k].numpy()[...] = getattr(batch.packed, k)
    return {"slot": slot, "host": host}


def pinned_slots_for(rows: int, seq_len: int, max_seqs: int, device: torch.device, ahead: int) -> PinnedSlots | None:
    """Slots for a loader `ahead` batches ahead. The producer stages batch i only after batch i-1 entered a queue of
    `ahead`, so batch i-1-ahead was dequeued and batch i-2-ahead's copy is enqueued: ahead + 2 slots never overwrite
    a buffer that a copy may still read."""
    if device.type != "cuda":
        return None
    shape = (rows, seq_len)
    return PinnedSlots({"input_ids": (shape, torch.int64), "targets": (shape, torch.int64),
                        "position_ids": (shape, torch.int64), "cu_seqlens": ((max_seqs + 1,), torch.int32)},
                       slots=ahead + 2)


class BatchLoader:
    """Micro-batches from a PackedStream, prepared `ahead` batches in advance on a background thread (or inline).

    `get()` returns the next DeviceBatch; an error on the thread is raised here, in the training loop.
    """

    def __init__(self, stream: PackedStream, device: torch.device, vocab_size: int, thread: bool = True,
                 ahead: int = 3):
        self.stream, self.device, self.vocab_size = stream, device, vocab_size
        self.slots = pinned_slots_for(stream.rows, stream.seq_len, stream.max_seqs, device, ahead)
        self.thread = thread
        self._queue: queue.Queue = queue.Queue(maxsize=ahead)
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None

    def _produce(self):
        batch = self.stream.next_batch()
        return batch, stage(batch, self.vocab_size, self.slots)

    def _run(self):
        try:
            while not self._stop.is_set():
                item = self._produce()
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # handed to the consumer, which raises it
            self._queue.put(e)

    def get(self) -> DeviceBatch:
        if not self.thread:
            batch, staged = self._produce()
        else:
            if self._worker is None:
                self._worker = threading.Thread(target=self._run, name="fastsft-loader", daemon=True)
                self._worker.start()
            item = self._queue.get()
            if isinstance(item, BaseException):
                raise item
            batch, staged = item
        return to_device(batch, self.device, self.vocab_size, self.slots, staged)

    def close(self) -> None:
        self._stop.set()
        if self._worker is not None:
            while self._worker.is_alive():
                try:
                    self._queue.get(timeout=0.1)
                except queue.Empty:
                    pass
            self._worker = None
