"""The data path between the tokenizer and the model: render conversations to ids + mask, pack them into rows.

Why this file exists: the training step must never wait for data, so both steps run in C++ (csrc/render.cpp,
csrc/pack.cpp) on flat numpy arrays with the GIL released; Python only validates, encodes every text span of a
batch in ONE tokenizer call and describes the conversation structure. The plain-Python references
(fastsft.chat.render_conversation and pack_rows_reference here) define the results; tests check the C++ path
against them exactly.

Rendering. render_batch(tokenizer, conversations, max_tokens) -> list of (ids int32, mask uint8) arrays, equal to
render_conversation bit for bit (each conversation cut to its first max_tokens tokens). render_batch_flat returns
the same as one RenderedBatch (ids, mask back to back, offsets), which pack_rows consumes without splitting.

Packing algorithm (pack_rows and pack_rows_reference, identical by construction and by test):
  1. Every conversation of length > seq_len is cut to its first seq_len tokens (counted in num_truncated when
     placed). Empty conversations are an error.
  2. Best fit, in one of two visiting orders (`order`): "decreasing" (best-fit decreasing) visits conversations
     by clipped length, longest first, ties in input order (a stable sort); "arrival" visits them in input order.
     Each goes to the row with the least free space that still holds it, ties to the lowest row index. Inside a
     row, conversations sit in the order they were placed, back to back from offset 0. Decreasing fills rows
     best from a given set; arrival does not sort the stream: a streaming loader that passes its pending
     conversations oldest first always places the oldest (it is tried first, with every row empty), so none
     waits for ever and batches keep the data order's mixture (fastsft.batches.PackedStream).
  3. num_rows=None: a new row is opened when no row has room (so rows = as many as needed). num_rows=R: exactly
     R rows; a conversation that fits in no row is left over, and so is one that would make the number of
     cu_seqlens segments exceed max_seqs, counting one padding segment for each of the R rows (conservative:
     a row that ends up exactly full needs none). Left-over indices are returned in `leftover` (ascending) so a
     streaming loader can carry them into the next batch; nothing is dropped silently.
  4. Each row's free tail is padding: pad_id tokens, targets -1, positions 0, 1, ... as one segment.

Validation: the C++ functions copy every array they are given into memory they own before checking it or
releasing the GIL (csrc/array_checks.h), and check the values themselves (ids >= 0, mask 0 or 1, offsets, int
arguments in range), so every way of calling them, RenderedBatch or (ids, mask) pairs, gets the same checks.
pack_rows_reference checks its inputs with its own plain-Python code.

Row tensors: input_ids = the conversation tokens; targets[t] = the next token of the same conversation where
that token is supervised (mask 1), else -1; the last token of each conversation (also of a truncated one) and all
padding get -1. position_ids restart at 0 for every conversation and padding segment. cu_seqlens (int32) marks
every segment boundary over the flattened rows*seq_len stream, starting at 0 and padded to the FIXED length
max_seqs + 1 by repeating the total, so compiled kernels see one shape. max_seqs defaults to
default_max_seqs(rows, seq_len) = rows * (seq_len // 32 + 2), e.g. 66 segments per row of 2048 (enough for
conversations of ~32 tokens, as in short synthetic or Q/A data; fewer segments made rows of such data stop
filling at 79% in a measurement at 8 x 512); with num_rows=None a packing that needs more segments raises
(pass max_seqs). Zero-length padded entries cost the attention kernels nothing measurable.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from fastsft import _C
from fastsft.chat import PART_LAYOUT, ConversationError, normalize_conversation
from fastsft.tokenizer import TextEncodingError

SEGMENT_TOKENS = 32  # default budget: one segment per 32 tokens of a row, one more, and one for its padding
PLACEMENT_ORDERS = ("decreasing", "arrival")  # pack_rows' `order`: longest first, or as given (module docstring)

def default_max_seqs(rows: int, seq_len: int) -> int:
    """The default cu_seqlens budget (number of segments) for `rows` rows of `seq_len` tokens."""
    return rows * (seq_len // SEGMENT_TOKENS + 2)


# Per-row budgets segment_budget rounds up to (steps of about 1.5x): runs on similar data get the same cu_seqlens
# length, so compiled graphs and attention kernels are shared between them.
SEGMENT_BUCKETS = (2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
SEGMENT_HEADROOM = 1.25  # above the mean count, for batches that draw shorter conversations than average


def segment_budget(lengths: Sequence[int] | np.ndarray, rows: int, seq_len: int) -> int:
    """A cu_seqlens budget (max_seqs) sized to the data, from a sample of rendered conversation lengths.

    The default budget (default_max_seqs: 66 per row of 2048) is for data of ~32-token conversations; attention
    kernels launch work for every segment entry, mostly empty for chat data (measured on an H200 at d12: attention
    54.7 ms at 66 segments per row, 27.2 ms at 8). A full row holds on average seq_len / mean length
    conversations (lengths cut to seq_len, as the packer does); the budget per row is that times
    SEGMENT_HEADROOM, plus one for the row's padding segment, rounded up to a SEGMENT_BUCKETS entry and never above
    the default. A batch that would need more segments leaves the rest over for the next batch (pack_rows'
    leftover), so a small budget costs fill, never data.
    """
    rows = _check_int("rows", rows, 1)
    seq_len = _check_int("seq_len", seq_len, 1)
    clipped = np.minimum(np.asarray(lengths, dtype=np.int64).reshape(-1), seq_len)
    if clipped.size == 0 or clipped.min() < 1:
        raise ValueError("segment_budget needs a non-empty sample of positive conversation lengths")
    per_row = 1 + SEGMENT_HEADROOM * seq_len / float(clipped.mean())
    ceiling = seq_len // SEGMENT_TOKENS + 2  # default_max_seqs per row
    bucket = next((b for b in SEGMENT_BUCKETS if b >= per_row), ceiling)
    return rows * min(bucket, ceiling)


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


@dataclass(frozen=True)
class RenderedBatch:
    """Rendered conversations back to back: conversation i is ids[offsets[i]:offsets[i+1]] (same for mask)."""

    ids: np.ndarray  # (L,) int32
    mask: np.ndarray  # (L,) uint8, 1 = supervised target
    offsets: np.ndarray  # (N+1,) int64, offsets[0] = 0, offsets[-1] = L

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        start, end = self.offsets[i], self.offsets[i + 1]
        return self.ids[start:end], self.mask[start:end]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)  # (N,)

    def to_list(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per-conversation (ids, mask) views into the flat arrays."""
        bounds = self.offsets.tolist()
        return [(self.ids[a:b], self.mask[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def render_batch_flat(tokenizer, conversations: Iterable, max_tokens: int = 2048) -> RenderedBatch:
    """Render a batch of conversations with one encode_batch call and the C++ assembler.

    The batch becomes one list of ops, each carrying the mask value m of what it emits: a special token t is
    2*t + m; -1 / -2 is the next text span (texts are used in order) with mask 0 / 1. Validation errors carry
    the conversation's batch index.
    """
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be a positive int, got {max_tokens!r}")

    def special(name: str, mask: int) -> int:
        return 2 * tokenizer.encode_special(name) + mask

    text_ops = (-1, -2)  # next text span with mask 0 / 1
    bos = 2 * tokenizer.bos_id
    user_ops = (special("<|user_start|>", 0), text_ops[0], special("<|user_end|>", 0))
    assistant_start, assistant_end = special("<|assistant_start|>", 0), special("<|assistant_end|>", 1)
    assistant_text_ops = (assistant_start, text_ops[1], assistant_end)
    part_ops = {}  # part type -> its ops, specials around the text included
    for kind, (opening, closing, m) in PART_LAYOUT.items():
        part_ops[kind] = (text_ops[m],) if opening is None else (special(opening, m), text_ops[m], special(closing, m))

    texts: list[str] = []
    add_text = texts.append
    ops: list[int] = []
    add_op = ops.append
    conv_ops = [0]
    for index, conversation in enumerate(conversations):
        add_op(bos)
        for message in normalize_conversation(conversation, index):
            content = message["content"]
            if message["role"] == "user":
                add_text(content)
                ops += user_ops
            elif isinstance(content, str):
                add_text(content)
                ops += assistant_text_ops
            else:
                add_op(assistant_start)
                for part in content:
                    add_text(part["text"])
                    ops += part_ops[part["type"]]
                add_op(assistant_end)
        conv_ops.append(len(ops))

    try:
        token_lists = tokenizer.encode_batch(texts) if texts else []
    except TextEncodingError as e:  # name the conversation, as every other bad-conversation error does
        span_ops = np.flatnonzero(np.array(ops) < 0)  # position in `ops` of each text span, in text order
        index = int(np.searchsorted(np.array(conv_ops), span_ops[e.item], side="right")) - 1
        raise ConversationError(index, f"a text is {e.reason}") from None
    tokens, span_offsets = _C.flatten_token_lists(token_lists)
    ids, mask, offsets = _C.render_assemble(
        tokens, span_offsets, np.array(ops, dtype=np.int64), np.array(conv_ops, dtype=np.int64), max_tokens
    )
    return RenderedBatch(ids, mask, offsets)


def render_batch(tokenizer, conversations: Iterable, max_tokens: int = 2048) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per-conversation (ids int32, mask uint8) arrays, equal to fastsft.chat.render_conversation bit for bit."""
    return render_batch_flat(tokenizer, conversations, max_tokens).to_list()


@dataclass(frozen=True)
class PackedBatch:
    """Rows of packed conversations; see the module docstring for the exact layout."""

    input_ids: np.ndarray  # (rows, seq_len) int64
    targets: np.ndarray  # (rows, seq_len) int64, -1 = not supervised
    position_ids: np.ndarray  # (rows, seq_len) int64, restart at 0 per segment
    cu_seqlens: np.ndarray  # (max_seqs + 1,) int32 over the flattened rows*seq_len stream
    max_seqlen: int  # = seq_len
    num_seqs: int  # real segments in cu_seqlens (conversations + padded row tails)
    num_supervised: int  # targets != -1
    num_tokens: int  # real (non-padding) tokens
    num_truncated: int  # placed conversations cut to seq_len
    efficiency: float  # num_tokens / (rows * seq_len)
    leftover: np.ndarray  # (K,) int64 ascending indices of conversations not placed (num_rows given)
    placement: np.ndarray  # (N, 3) int64 (row, offset, placed length) per conversation; -1, -1, 0 if left over

    @property
    def rows(self) -> int:
        return self.input_ids.shape[0]


def _as_flat(rendered, where: str, label=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """RenderedBatch or a sequence of (ids, mask) pairs -> flat ids int32, mask uint8, offsets int64.

    Only types, shapes and the conversion to the C++ dtypes are checked here; the values (ids >= 0, mask 0 or 1,
    offsets) are checked once, by the C++ side (csrc/pack.cpp), for every way of calling it. label(i) names the
    i-th pair in errors (default "rendered[i]", and "conversation i" for its values).
    """
    value_label = label or "conversation {}".format
    label = label or "rendered[{}]".format
    if isinstance(rendered, RenderedBatch):
        ids, mask, offsets = rendered.ids, rendered.mask, rendered.offsets
        if ids.dtype != np.int32 or mask.dtype != np.uint8 or offsets.dtype != np.int64:
            raise TypeError(
                f"{where}: RenderedBatch needs ids int32, mask uint8, offsets int64; got "
                f"{ids.dtype}, {mask.dtype}, {offsets.dtype}"
            )
        if (offsets.ndim != 1 or len(offsets) < 1 or offsets[0] != 0 or offsets[-1] != len(ids)
                or len(mask) != len(ids) or (np.diff(offsets) < 0).any()):
            raise ValueError(f"{where}: RenderedBatch offsets must rise from 0 to len(ids) = {len(ids)} "
                             f"(= len(mask) = {len(mask)}), got {offsets[:8].tolist()}...")
        return np.ascontiguousarray(ids), np.ascontiguousarray(mask), np.ascontiguousarray(offsets)
    if not isinstance(rendered, Sequence):
        raise TypeError(f"{where}: rendered must be a RenderedBatch or a sequence of (ids, mask) pairs, "
                        f"got {type(rendered).__name__}")
    id_parts, mask_parts = [], []
    offsets = np.zeros(len(rendered) + 1, dtype=np.int64)
    for i, pair in enumerate(rendered):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise TypeError(f"{where}: {label(i)} must be an (ids, mask) pair")
        ids, mask = np.asarray(pair[0]), np.asarray(pair[1])
        if ids.ndim != 1 or mask.ndim != 1:
            raise ValueError(f"{where}: {label(i)} ids and mask must be 1-D, got shapes {ids.shape}, {mask.shape}")
        if len(ids) != len(mask):
            raise ValueError(f"{where}: {label(i)} has {len(ids)} ids but {len(mask)} mask values")
        if len(ids) and not np.issubdtype(ids.dtype, np.integer):
            raise TypeError(f"{where}: {label(i)} ids must be integers, got dtype {ids.dtype}")
        if len(mask) and not (mask.dtype == np.bool_ or np.issubdtype(mask.dtype, np.integer)):
            raise TypeError(f"{where}: {label(i)} mask must be bool or 0/1 integers, got dtype {mask.dtype}")
        id_parts.append(ids)
        mask_parts.append(mask)
        offsets[i + 1] = offsets[i] + len(ids)
    ids = np.concatenate(id_parts) if id_parts else np.zeros(0, dtype=np.int64)
    mask = np.concatenate(mask_parts) if mask_parts else np.zeros(0, dtype=np.uint8)
    # The casts below must not wrap a value into range (2^32 + 5 into 5, -1 into 255).
    for name, values, dtype, what in (("ids", ids, np.int32, "token id {} is outside [0, 2^31)"),
                                      ("mask", mask, np.uint8, "mask holds {}; mask values must be 0 or 1")):
        info = np.iinfo(dtype)
        if len(values) and values.dtype != np.bool_ and (values.min() < info.min or values.max() > info.max):
            bad = int(np.flatnonzero((values < info.min) | (values > info.max))[0])
            raise ValueError(f"{where}: {value_label(_conversation_at(offsets, bad))}: " + what.format(values[bad]))
    return ids.astype(np.int32), mask.astype(np.uint8), offsets


def rendered_lengths(rendered, where: str, label=None) -> np.ndarray:
    """The lengths (int64) of rendered conversations after all of pack_rows' checks (types, shapes, ids >= 0, mask
    0 or 1), on the host; errors name the where and label(i), by default "conversation i"."""
    label = label or "conversation {}".format
    ids, mask, offsets = _as_flat(rendered, where, label)
    for values, bad, what in ((ids, ids < 0, "holds token id {} at position {}, outside [0, 2^31)"),
                              (mask, mask > 1, "mask holds {} at position {}; mask values must be 0 or 1")):
        if bad.any():
            p = int(np.flatnonzero(bad)[0])
            conv = _conversation_at(offsets, p)
            raise ValueError(f"{where}: {label(conv)} " + what.format(int(values[p]), p - int(offsets[conv])))
    return np.diff(offsets)


def _conversation_at(offsets: np.ndarray, position: int) -> int:
    """Which conversation holds flat position `position` (offsets: each one's start, then the total)."""
    return int(np.searchsorted(offsets, position, side="right") - 1)


def _check_pack_args(where, lengths, seq_len, num_rows, pad_id, max_seqs, order):
    if not isinstance(order, str) or order not in PLACEMENT_ORDERS:
        raise ValueError(f"{where}: order must be one of {PLACEMENT_ORDERS}, got {order!r}")
    seq_len = _check_int("seq_len", seq_len, 1)
    if num_rows is not None:
        num_rows = _check_int("num_rows", num_rows, 0)
    pad_id = _check_int("pad_id", pad_id, 0)
    if max_seqs is not None:
        max_seqs = _check_int("max_seqs", max_seqs, 0)
    if len(lengths) and lengths.min() < 1:
        raise ValueError(f"{where}: rendered[{int(np.argmin(lengths))}] is empty; every conversation needs a token")
    if num_rows is not None:
        if max_seqs is None:
            max_seqs = default_max_seqs(num_rows, seq_len)
        if max_seqs < num_rows:
            raise ValueError(f"{where}: max_seqs={max_seqs} < num_rows={num_rows}; every row needs a segment")
    return seq_len, num_rows, pad_id, max_seqs


def pack_rows(rendered, seq_len: int, num_rows: int | None = None, pad_id: int = 0,
              max_seqs: int | None = None, order: str = "decreasing") -> PackedBatch:
    """Pack rendered conversations (RenderedBatch or (ids, mask) pairs) into rows of seq_len tokens, in C++.

    pad_id: the token written into padding (its targets are -1 and it is its own segment, so any id works;
    nanochat uses BOS). order: "decreasing" (longest first) or "arrival" (as given), see PLACEMENT_ORDERS. See the
    module docstring for the algorithm and the layout.
    """
    ids, mask, offsets = _as_flat(rendered, "pack_rows")
    return _place_and_fill("pack_rows", np.diff(offsets), lambda placed: (ids, mask, offsets), seq_len, num_rows,
                           pad_id, max_seqs, order, subset=False)


def pack_pool(lengths: np.ndarray, fetch, seq_len: int, num_rows: int, pad_id: int = 0, max_seqs: int | None = None,
              order: str = "arrival") -> PackedBatch:
    """pack_rows over a pool known by its lengths (int64), whose tokens are fetched only for what gets placed:
    `fetch(positions)` returns the (ids, mask) pairs at those positions of the pool. The batch is pack_rows' over
    the whole pool, field for field (leftover and placement index the pool).

    Why: a training stream's pool holds eight times the segment budget (fastsft.batches.PackedStream) and places
    one batch's worth. Flattening and checking the whole pool for every batch held the GIL on the loader thread,
    which the training loop needs to launch its kernels: 6.8 ms a d12 batch (32 x 2048, budget 128) on our CPU
    where this takes 1.1, 83 ms at a budget of 66 a row. The pool's conversations are checked once, as they join.
    """
    lengths = np.ascontiguousarray(lengths, dtype=np.int64)
    if lengths.ndim != 1:
        raise ValueError(f"pack_pool: lengths must be 1-D, got shape {lengths.shape}")

    def placed_tokens(placed):
        pairs = fetch(placed)
        ids, mask, offsets = _as_flat(pairs, "pack_pool")
        if len(pairs) != len(placed) or not np.array_equal(np.diff(offsets), lengths[placed]):
            raise ValueError("pack_pool: the fetched conversations do not have the pool's lengths")
        return ids, mask, offsets

    return _place_and_fill("pack_pool", lengths, placed_tokens, seq_len, num_rows, pad_id, max_seqs, order,
                           subset=True)


def _place_and_fill(where, lengths, tokens, seq_len, num_rows, pad_id, max_seqs, order, subset: bool) -> PackedBatch:
    """Place by lengths, then fill from `tokens(placed positions)`: the flat arrays of those conversations alone
    (subset) or of all of them."""
    seq_len, num_rows, pad_id, max_seqs = _check_pack_args(where, lengths, seq_len, num_rows, pad_id, max_seqs,
                                                           order)
    row, offset, placed, rows, num_segments = _C.pack_place(
        lengths, seq_len, -1 if num_rows is None else num_rows, -1 if max_seqs is None else max_seqs, order
    )
    if max_seqs is None:
        max_seqs = default_max_seqs(rows, seq_len)
    chosen = np.flatnonzero(row >= 0) if subset else slice(None)
    ids, mask, offsets = tokens(chosen)
    # pack_fill checks the values (ids, mask) first and the segment budget last, for every caller alike.
    input_ids, targets, position_ids, cu_seqlens, num_supervised, num_tokens, num_seqs = _C.pack_fill(
        ids, mask, offsets, row[chosen], offset[chosen], placed[chosen], rows, seq_len, pad_id, max_seqs
    )
    return PackedBatch(
        input_ids=input_ids,
        targets=targets,
        position_ids=position_ids,
        cu_seqlens=cu_seqlens,
        max_seqlen=seq_len,
        num_seqs=num_seqs,
        num_supervised=num_supervised,
        num_tokens=num_tokens,
        num_truncated=int(np.count_nonzero((row >= 0) & (lengths > seq_len))),
        efficiency=num_tokens / (rows * seq_len) if rows else 0.0,
        leftover=np.flatnonzero(row < 0).astype(np.int64),
        placement=np.stack([row, offset, placed], axis=1) if len(row) else np.zeros((0, 3), dtype=np.int64),
    )


def _reference_inputs(rendered, seq_len, num_rows, pad_id, max_seqs, order):
    """pack_rows_reference's own checks: (ids list, mask list) per conversation and the checked arguments."""
    where = "pack_rows_reference"
    if not isinstance(order, str) or order not in ("decreasing", "arrival"):
        raise ValueError(f"{where}: order must be one of ('decreasing', 'arrival'), got {order!r}")

    def integer(name, value, minimum):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{where}: {name} must be an int, got {type(value).__name__}")
        if value < minimum:
            raise ValueError(f"{where}: {name} must be >= {minimum}, got {value}")
        return int(value)

    seq_len, pad_id = integer("seq_len", seq_len, 1), integer("pad_id", pad_id, 0)
    num_rows = None if num_rows is None else integer("num_rows", num_rows, 0)
    max_seqs = None if max_seqs is None else integer("max_seqs", max_seqs, 0)
    if isinstance(rendered, RenderedBatch):
        if (rendered.ids.dtype, rendered.mask.dtype, rendered.offsets.dtype) != (np.int32, np.uint8, np.int64):
            raise TypeError(f"{where}: RenderedBatch needs ids int32, mask uint8, offsets int64; got "
                            f"{rendered.ids.dtype}, {rendered.mask.dtype}, {rendered.offsets.dtype}")
        bounds = rendered.offsets.tolist()
        if not bounds or bounds[0] != 0 or bounds[-1] != len(rendered.ids) or bounds != sorted(bounds):
            raise ValueError(f"{where}: RenderedBatch offsets must rise from 0 to {len(rendered.ids)}")
        pairs = [(rendered.ids[a:b], rendered.mask[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    elif isinstance(rendered, Sequence):
        pairs = list(rendered)
    else:
        raise TypeError(f"{where}: rendered must be a RenderedBatch or a sequence of (ids, mask) pairs, "
                        f"got {type(rendered).__name__}")
    convs = []
    for i, pair in enumerate(pairs):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise TypeError(f"{where}: rendered[{i}] must be an (ids, mask) pair")
        ids, mask = list(pair[0]), list(pair[1])
        if len(ids) != len(mask):
            raise ValueError(f"{where}: rendered[{i}] has {len(ids)} ids but {len(mask)} mask values")
        if not ids:
            raise ValueError(f"{where}: rendered[{i}] is empty; every conversation needs a token")
        if not all(isinstance(t, (int, np.integer)) and not isinstance(t, (bool, np.bool_)) for t in ids):
            raise TypeError(f"{where}: rendered[{i}] ids must be integers")
        if not all(isinstance(m, (int, np.integer, bool, np.bool_)) for m in mask):
            raise TypeError(f"{where}: rendered[{i}] mask must be bool or 0/1 integers")
        for j, t in enumerate(ids):
            if not 0 <= t < 2**31:
                raise ValueError(f"{where}: conversation {i} holds token id {t} at position {j}, outside [0, 2^31)")
        for j, m in enumerate(mask):
            if m not in (0, 1):
                raise ValueError(f"{where}: conversation {i} mask holds {m} at position {j}; mask values must be "
                                 f"0 or 1")
        convs.append(([int(t) for t in ids], [int(m) for m in mask]))
    if num_rows is not None:
        if max_seqs is None:
            max_seqs = num_rows * (seq_len // SEGMENT_TOKENS + 2)  # default_max_seqs, spelled out
        if max_seqs < num_rows:
            raise ValueError(f"{where}: max_seqs={max_seqs} < num_rows={num_rows}; every row needs a segment")
    return convs, seq_len, num_rows, pad_id, max_seqs


def pack_rows_reference(rendered, seq_len: int, num_rows: int | None = None, pad_id: int = 0,
                        max_seqs: int | None = None, order: str = "decreasing") -> PackedBatch:
    """The plain-Python definition of pack_rows (per-token loops; slow on purpose, for tests and benchmarks).

    Its input checks are its own plain-Python code (_reference_inputs), not the helpers of the C++ path, so that a
    check missing from one path shows up as a difference in the tests.
    """
    convs, seq_len, num_rows, pad_id, max_seqs = _reference_inputs(rendered, seq_len, num_rows, pad_id, max_seqs,
                                                                   order)
    lengths = [min(len(conv_ids), seq_len) for conv_ids, _ in convs]

    # Placement: best fit, longest first or in input order (see the module docstring).
    if order == "decreasing":
        visit = sorted(range(len(convs)), key=lambda i: -lengths[i])
    else:
        visit = list(range(len(convs)))
    free = [seq_len] * num_rows if num_rows is not None else []
    placement = [(-1, -1, 0)] * len(convs)
    num_placed = 0
    for i in visit:
        length = lengths[i]
        if num_rows is not None and num_placed + 1 + num_rows > max_seqs:
            continue
        best = -1
        for r in range(len(free)):
            if free[r] >= length and (best < 0 or free[r] < free[best]):
                best = r
        if best < 0:
            if num_rows is not None:
                continue
            free.append(seq_len)
            best = len(free) - 1
        placement[i] = (best, seq_len - free[best], length)
        free[best] -= length
        num_placed += 1
    rows = len(free)

    # Rows, token by token.
    input_ids = [[pad_id] * seq_len for _ in range(rows)]
    targets = [[-1] * seq_len for _ in range(rows)]
    positions = [[0] * seq_len for _ in range(rows)]
    bounds = [0]
    num_supervised = num_tokens = 0
    for r in range(rows):
        in_row = sorted((placement[i][1], i) for i in range(len(convs)) if placement[i][0] == r)
        cursor = 0
        for start, i in in_row:
            conv_ids, conv_mask = convs[i]
            length = placement[i][2]
            for j in range(length):
                input_ids[r][start + j] = conv_ids[j]
                positions[r][start + j] = j
                if j + 1 < length and conv_mask[j + 1] == 1:
                    targets[r][start + j] = conv_ids[j + 1]
                    num_supervised += 1
            cursor = start + length
            num_tokens += length
            bounds.append(r * seq_len + cursor)
        if cursor < seq_len:
            for j in range(cursor, seq_len):
                positions[r][j] = j - cursor
            bounds.append((r + 1) * seq_len)
    num_seqs = len(bounds) - 1
    if max_seqs is None:
        max_seqs = rows * (seq_len // SEGMENT_TOKENS + 2)  # default_max_seqs, spelled out
    if num_seqs > max_seqs:
        raise ValueError(f"pack_rows_reference: the packing into {rows} rows needs {num_seqs} cu_seqlens segments "
                         f"(conversations + padded row tails) but max_seqs={max_seqs}; pass a larger max_seqs")
    cu_seqlens = bounds + [rows * seq_len] * (max_seqs + 1 - len(bounds))

    def as_rows(table):
        return np.array(table, dtype=np.int64).reshape(rows, seq_len)

    return PackedBatch(
        input_ids=as_rows(input_ids),
        targets=as_rows(targets),
        position_ids=as_rows(positions),
        cu_seqlens=np.array(cu_seqlens, dtype=np.int32),
        max_seqlen=seq_len,
        num_seqs=num_seqs,
        num_supervised=num_supervised,
        num_tokens=num_tokens,
        num_truncated=sum(1 for i, p in enumerate(placement) if p[0] >= 0 and len(convs[i][0]) > seq_len),
        efficiency=num_tokens / (rows * seq_len) if rows else 0.0,
        leftover=np.array([i for i, p in enumerate(placement) if p[0] < 0], dtype=np.int64),
        placement=np.array(placement, dtype=np.int64).reshape(len(convs), 3),
    )
