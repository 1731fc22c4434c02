"""lm_head + masked cross-entropy without ever holding the (N, V) logits: the loss of SFT training.

Only supervised rows (target != -1) reach a matmul: they are gathered first, and their hidden gradient is scattered
back at the end (ignored rows get zeros). In SFT a third to a half of the rows are unsupervised, so this is the
largest saving of the op. The gradients are made in the forward pass (backward only scales them by the upstream
gradient of the loss sum). Two layouts of that work, chosen per call with `layout=` (a static argument of the
custom op, so torch.compile handles either):

layout="low_memory" (default): two passes over the M supervised rows, 4 matmuls.
    pass A, per row chunk (all V columns):
        logits_c = h_c @ W^T                 (cuBLAS, fp32 accumulation, stored in the input dtype)
        row kernel: lse, loss, dlogits_c = (softmax - onehot) * softcap'   written over logits_c in place
        dh_c = dlogits_c @ W                 (complete: one matmul over the whole vocabulary)
    pass B, per vocabulary chunk (all M rows), with the lse of pass A:
        dlogits_v = row kernel of (h @ W_v^T)   (one Triton matmul with the row kernel as its epilogue, _grad_tile.py;
                                                 for fp32 inputs cuBLAS, then the row kernel)
        dW_v = dlogits_v^T @ h                  (cuBLAS, complete over all rows)
Every gradient element is ONE matmul with fp32 accumulation over its whole reduction, written once in the output
dtype, except the last TAIL_COLS-wide chunks of pass B, which sum a few row blocks in an fp32 accumulator first: no
(V, H) or (M, H) fp32 accumulator. The gradient outputs double as workspace while not yet written: pass A's logits
chunk (H rows x V) lives in the dW output, the gathered rows in the spare rows of the dh output (dh of the supervised
rows is written densely at its top and moved home in place at the end, kernels/_scatter_rows.py), and so does pass
B's logits tile: in the rows of dh beyond the gathered ones when those hold a chunk, else in the last elements of
dW, beyond row v1 of chunk [v0, v1), i.e. in rows no chunk has written yet and disjoint from the slice it writes;
there the chunks shrink near the end of V to fit (vocab_chunks), and the last few hundred columns, where no tile
of all M rows fits, go in row blocks (split_rows) summed in a (TAIL_COLS, H) fp32 accumulator. What remains beyond
the gradients: that accumulator (64 KiB at H=1024) and two (M,) vectors (lse, row indices); plus the gathered rows
when fewer than half the targets are ignored.
Pick it when memory is tight (large vocabularies, long rows): bench/RESULTS.md has its time and memory beside CCE's.

layout="fast": one pass over row chunks of >= FAST_MIN_ROWS rows, 3 matmuls: logits_c = h_c @ W^T; row kernel
(lse, loss, dlogits in place); dh_c = dlogits_c @ W; dW_acc += dlogits_c^T @ h_c into an fp32 (V, H) accumulator
(cuBLAS with fp32 output), cast to the weight dtype at the end. Workspace: the logits chunk (FAST_CHUNK_BYTES, at
least FAST_MIN_ROWS rows; it lives in the dW output when that holds it, i.e. chunk <= H rows), the fp32
accumulator (for bf16 weights; an fp32 weight accumulates in its dW output) and the gathered rows when they do not
fit dh's spare rows. H100 80GB, torch 2.11 + CUDA 13, triton 3.6, 2026-11-25, N=32768, H=1024, V=65536, half
ignored: 13.6 ms (0.35x CCE) at 576 MiB above the inputs (3.0x
CCE); at N=16384, H=2048, V=151936, nothing ignored: 52.3 ms / 1847 MiB (2.8x CCE). Pick it when step time
matters more than a few hundred MiB, the usual case in training (the op runs once per micro-batch, at the end).

"fp32 accumulation" holds as far as cuBLAS gives it: torch lets cuBLAS reduce split-K partial sums of bf16 matmuls
in reduced precision unless torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction is False (a global
left to the caller). Measured gradient errors against the fp32 reference stay at the bf16 output rounding (~1e-3).

Returns the SUM of token losses (fp32) and the supervised count (int64), so the caller divides by a global count.

Host sync: one per call (0.05 ms on an H100). The gather of supervised rows needs their count on the host to size
the chunk loops; the same sync also checks that targets lie in [-1, V). It sits inside the custom op, so
torch.compile sees static shapes. The row kernel reads each gathered row's target through its row index (no
gathered copy of the targets), and the per-row losses exist one chunk at a time.

Where Triton cannot run (a CPU tensor without TRITON_INTERPRET=1), the op computes the same quantities with the
PyTorch reference math (full fp32 logits), so CPU-only training and tools work without a GPU.
"""

import dataclasses
import json
from typing import Optional

import torch
import torch.nn.functional as F

from ._ce_rows import ce_rows, check_softcap
from ._grad_tile import DEFAULT_LAUNCH, GradTileLaunch, grad_tile
from ._multi_tensor import runs_triton
from .paths import REFERENCE, TRITON, record
from ._scatter_rows import scatter_rows_home

LAYOUTS = ("low_memory", "fast")

# Pass B's logits tile (M rows x a vocabulary chunk, input dtype). Each chunk costs 3 launches and re-reads the
# gathered rows twice, so narrow tiles cost time. H100 sweep at M=16384, H=1024, V=65536 with the tile a buffer of
# its own (bench/RESULTS.md): 128 columns 53 ms, 256: 32 ms, 384: 44 ms, 512: 21 ms, 1024: 19 ms, 2048: 18.5 ms.
# Hence 16 MiB but at least MIN_VOCAB_CHUNK columns, in multiples of 256 (384 was slow). Now that the tile lives in
# memory the op holds anyway (vocab_chunks), a wider one also starts shrinking earlier in dW: 32 MiB took 39.8 ms
# against 16 MiB's 21.3 (H200, 2026-12-01).
VOCAB_CHUNK_BYTES = 16 * 2**20
MIN_VOCAB_CHUNK = 512
# Pass B's last chunks, once neither dW's unwritten end nor dh's spare rows hold a tile of this many columns over all
# M rows: they are this wide, their rows go in blocks (split_rows) and an fp32 (TAIL_COLS, H) accumulator sums the
# blocks. Each narrow chunk re-reads the gathered rows twice, and cuBLAS's kernels for narrow widths vary: H200,
# torch 2.11, triton 3.6, N=32768 H=1024 V=65536 half ignored (ms, all at 192.19 MiB above the inputs): TAIL_COLS 8:
# 26.9, 16: 21.3, 32: 29.8, 64: 29.8 (2026-12-01). Before, the tail was an (M, TAIL_COLS) tile of its own (H100: 16
# columns 22.8 ms at 194.4 MiB, 2 MiB of which a staging copy of the dh scatter, both gone now).
TAIL_COLS = 16
# Pass B's tile: True: one Triton matmul whose epilogue is the row kernel (kernels/_grad_tile.py); False: cuBLAS
# matmul into the tile, then the row kernel over it. The fused one is one launch and one aten call less per chunk,
# and pass B is host-bound at M = 16H; its matmul runs at ~366 TFLOP/s where cuBLAS gives ~570. H200, torch 2.11,
# triton 3.6, 2026-12-01, fused / unfused ms, same run: N=32768 H=1024 V=65536 half ignored 21.3 / 22.6 (a fast host)
# and 27.1 / 38.0 (a slow one); N=16384 H=2048 V=151936: 84.3 / 78.7 and 73.0 / 73.1; a quarter ignored: 29.4 / 29.5.
FUSED_GRAD_TILE = True
# Upper bound on pass A's rows per chunk (None: as many as a buffer the size of the weight holds, i.e. H rows: the
# borrowed dW output, or a buffer of that size when there is no dW to borrow). Tests set it small to cover the chunk
# loop; module-level like the others so the bench can sweep them.
MAX_ROW_CHUNK = None
# False: gradients made in the forward pass (4 matmuls; backward scales them). True: forward computes the loss only
# (one weight-sized logits buffer) and backward recomputes everything (5 matmuls, +4 ms at the shape above) with the
# same workspace as the default; it allows a second backward through one forward (retain_graph).
GRAD_IN_BACKWARD = False
# layout="fast": logits chunk of FAST_CHUNK_BYTES but at least FAST_MIN_ROWS rows. Each chunk reads and writes the
# whole fp32 (V, H) accumulator once, so short chunks cost time: at V=151936 the byte budget alone gave 768-row
# chunks and 66.6 ms against 52.2 ms with the 2048-row floor (H100, bench/RESULTS.md). MAX_ROW_CHUNK caps it too.
FAST_CHUNK_BYTES = 256 * 2**20
FAST_MIN_ROWS = 2048


@dataclasses.dataclass(frozen=True)
class LCETuning:
    """A variant of the op's tuning, passed as linear_cross_entropy(tuning=...): each field None means the module
    constant above (read at call time, so the constants stay the one place defaults are set). Benchmarks select
    variants this way, never by changing module state; grad_tile_launch is pass B's fused tile shape."""

    vocab_chunk_bytes: Optional[int] = None
    min_vocab_chunk: Optional[int] = None
    tail_cols: Optional[int] = None
    fused_grad_tile: Optional[bool] = None
    max_row_chunk: Optional[int] = None
    grad_in_backward: Optional[bool] = None
    fast_chunk_bytes: Optional[int] = None
    fast_min_rows: Optional[int] = None
    grad_tile_launch: Optional[GradTileLaunch] = None

    def encode(self) -> str:
        """The set fields as JSON: the custom ops take it as a string argument (an object cannot cross them)."""
        fields = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None:
                fields[f.name] = dataclasses.asdict(value) if isinstance(value, GradTileLaunch) else value
        return json.dumps(fields, sort_keys=True) if fields else ""


_DECODED: dict = {"": LCETuning()}


def _decode(encoded: str) -> LCETuning:
    if encoded not in _DECODED:
        fields = json.loads(encoded)
        if "grad_tile_launch" in fields:
            fields["grad_tile_launch"] = GradTileLaunch(**fields["grad_tile_launch"])
        _DECODED[encoded] = LCETuning(**fields)
    return _DECODED[encoded]


def _knob(tuning: Optional[LCETuning], name: str):
    """The tuning's value of a knob, else the module constant of that name (upper case)."""
    value = getattr(tuning, name) if tuning is not None else None
    return globals()[name.upper()] if value is None else value


def linear_cross_entropy_reference(hidden, weight, targets, softcap=None):
    """fp32 PyTorch reference: (sum of token losses over targets != -1, count of those targets)."""
    logits = hidden.float() @ weight.float().T  # (N, V)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    loss = F.cross_entropy(logits, targets, ignore_index=-1, reduction="sum")
    return loss, (targets != -1).sum()


def _check_inputs(hidden, weight, targets, softcap):
    where = "linear_cross_entropy"
    if hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"{where}: hidden must be (N, H) and weight (V, H), got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"{where}: hidden size differs: hidden (N, {hidden.shape[1]}), weight (V, {weight.shape[1]})")
    if not hidden.is_floating_point() or hidden.dtype != weight.dtype:
        raise TypeError(f"{where}: hidden and weight must share one float dtype, got {hidden.dtype} and {weight.dtype}")
    if targets.dim() != 1 or targets.shape[0] != hidden.shape[0]:
        raise ValueError(f"{where}: targets must be (N,) = ({hidden.shape[0]},), got {tuple(targets.shape)}")
    if targets.dtype != torch.int64:
        raise TypeError(f"{where}: targets must be int64, got {targets.dtype}")
    if not (hidden.device == weight.device == targets.device):
        raise ValueError(f"{where}: hidden, weight, targets on different devices: {hidden.device}, "
                         f"{weight.device}, {targets.device}")
    if weight.shape[0] == 0:
        raise ValueError(f"{where}: weight has an empty vocabulary dimension")
    check_softcap(softcap, where)


def _round_down_128(n):
    return n - n % 128 if n >= 128 else n


def rows_per_chunk(n_rows, vocab, hidden_size, tuning=None):
    """Pass A's rows per chunk: as many as a (vocab, hidden_size) buffer holds (hidden_size rows), a multiple of 128
    when that large, capped by MAX_ROW_CHUNK and n_rows."""
    rows = _round_down_128(max(1, hidden_size))
    max_rows = _knob(tuning, "max_row_chunk")
    if max_rows is not None:
        rows = min(rows, max_rows)
    return max(1, min(rows, n_rows))


def fast_rows_per_chunk(n_rows, vocab, dtype, tuning=None):
    """layout="fast": rows per chunk, FAST_CHUNK_BYTES of (rows, vocab) logits but >= FAST_MIN_ROWS, capped by
    MAX_ROW_CHUNK and n_rows."""
    rows = max(_knob(tuning, "fast_chunk_bytes") // max(1, vocab * torch.empty((), dtype=dtype).element_size()),
               _knob(tuning, "fast_min_rows"))
    max_rows = _knob(tuning, "max_row_chunk")
    if max_rows is not None:
        rows = min(rows, max_rows)
    return max(1, min(rows, n_rows))


def vocab_per_chunk(n_rows, vocab, dtype, tuning=None):
    """Pass B's vocabulary columns per chunk: VOCAB_CHUNK_BYTES of (n_rows, cols) logits, >= MIN_VOCAB_CHUNK, a
    multiple of 256 when that large."""
    cols = max(_knob(tuning, "vocab_chunk_bytes") // max(1, n_rows * torch.empty((), dtype=dtype).element_size()),
               _knob(tuning, "min_vocab_chunk"))
    if cols >= 256:
        cols -= cols % 256
    return max(1, min(vocab, cols))


def _round_width(width, cols):
    """A width below the full chunk width, rounded down: 384 columns were slow in the sweep above; multiples of 16
    keep bf16 rows 16-byte aligned for cuBLAS, and give the Triton kernels that take the width one specialization
    (divisible by 16) wherever the vocabulary is a multiple of 16, so a new number of supervised rows does not
    compile them again mid-run."""
    if width < cols and width >= 8:
        width -= width % (256 if width >= 256 else 128 if width >= 128 else 16 if width >= 16 else 8)
    return width


def vocab_chunks(n_rows, vocab, hidden_size, dtype, spare=0, tuning=None):
    """Pass B's walk over the vocabulary: [(v0, v1, place)], in order, covering [0, vocab). Each chunk's
    (n_rows, v1 - v0) logits tile lives in memory the op already holds, by `place`:

    "dw": in the last n_rows * (v1 - v0) elements of the (vocab, hidden_size) dW output, beyond row v1 (never
    written before this chunk, so free, and disjoint from the slice the chunk writes) iff width * (n_rows +
    hidden_size) <= (vocab - v0) * hidden_size; dW[v0:v1] is one matmul. Chunks are vocab_per_chunk wide while that
    holds, then shrink to the widest that fits (each step takes a share hidden_size / (n_rows + hidden_size) of
    what is left, so the widths fall geometrically over the last few % of V).
    "spare": in `spare` elements of the dh output that hold nothing during pass B (the rows beyond the gathered
    ones); chosen whenever they fit a chunk at least as wide as "dw" would, so the walk never shrinks below them.
    "split": once neither fits TAIL_COLS columns of all n_rows rows (the last chunk only has its own rows), the
    rest goes in TAIL_COLS-wide chunks whose rows go in blocks of split_rows, each block's tile again in dW's
    unwritten end (own rows included), summed in a small fp32 (TAIL_COLS, hidden_size) accumulator that is cast
    into dW[v0:v1] after the last block.
    """
    cols = vocab_per_chunk(n_rows, vocab, dtype, tuning)
    tail = max(1, min(cols, _knob(tuning, "tail_cols")))
    in_spare = _round_width(min(cols, spare // max(1, n_rows)), cols)
    chunks, v0 = [], 0
    while v0 < vocab:
        in_dw = _round_width(min(cols, (vocab - v0) * hidden_size // (n_rows + hidden_size)), cols)
        if in_spare >= max(in_dw, tail):
            place, width = "spare", min(in_spare, vocab - v0)
        elif in_dw >= tail:
            place, width = "dw", in_dw
        else:
            place, width = "split", min(tail, vocab - v0)
        chunks.append((v0, v0 + width, place))
        v0 += width
    return chunks


def split_rows(n_rows, vocab, hidden_size, v0, width):
    """Rows per block of a split chunk [v0, v0 + width): as many as dW's unwritten rows v0.. hold as a tile."""
    return max(1, min(n_rows, (vocab - v0) * hidden_size // width))


def _accumulate_dw(acc, dlogits, h, first):
    """acc (V, H) fp32 (+)= dlogits^T @ h with fp32 accumulation; cuBLAS writes fp32 from bf16 inputs directly."""
    if acc.dtype == dlogits.dtype:
        torch.addmm(acc, dlogits.t(), h, beta=0 if first else 1, out=acc)
    elif acc.is_cuda:
        torch.addmm(acc, dlogits.t(), h, beta=0 if first else 1, out_dtype=torch.float32, out=acc)
    else:  # CPU (interpreted tests) has no addmm with out_dtype
        torch.addmm(acc, dlogits.t().float(), h.float(), beta=0 if first else 1, out=acc)


def _supervised_rows(targets, vocab, known=-1):
    """(count of targets >= 0 as a host int, the same as a device scalar, their indices (M,) int32 or None).

    known < 0: the count is read from the device, the op's one host sync (the host then waits for everything queued
    before the op, a whole forward, and the GPU idles while the host launches the loss after it), and targets
    outside [-1, vocab) raise. known >= 0: the caller's count of targets >= 0, from targets it made and checked on
    the host (the packer's); nothing is read back. The indices are made before any output exists, so their int64
    form and the masks never add to the op's peak."""
    valid = targets >= 0
    if known >= 0:
        n_sup, count = known, valid.sum()
    else:
        counts = torch.stack([valid.sum(), ((targets < -1) | (targets >= vocab)).sum()])
        n_sup, n_bad = counts.tolist()
        if n_bad:
            raise ValueError(f"linear_cross_entropy: {n_bad} targets outside [-1, {vocab}) (vocab size {vocab}, "
                             f"-1 = ignore)")
        count = counts[0].clone()
    rows = None
    if 0 < n_sup < targets.shape[0]:
        rows = torch.nonzero_static(valid, size=n_sup).squeeze(1).to(torch.int32)  # (M,) sorted
    return n_sup, count, rows


def _row_block(h, lse, targets, rows, r0, r1):
    """Rows [r0, r1) of the supervised rows: their hidden rows, lse, and targets with the row index to read them
    through (the whole-row case slices nothing: pass B runs a few hundred chunks, host-bound at times, and every
    slice is a dispatcher call)."""
    if r0 == 0 and r1 == h.shape[0]:
        return h, lse, targets, rows
    if rows is None:
        return h[r0:r1], lse[r0:r1], targets[r0:r1], None
    return h[r0:r1], lse[r0:r1], targets, rows[r0:r1]


def _forward_impl(hidden, weight, targets, softcap, need_dh, need_dw, layout="low_memory", tuning=None, known=-1):
    n_rows, hidden_size = hidden.shape
    vocab = weight.shape[0]
    device = hidden.device
    fast = layout == "fast"
    n_sup, n_supervised, rows = _supervised_rows(targets, vocab, known)

    # Outputs first: they are the workspace (module docstring). Gradients of nothing supervised are zeros.
    # Layout "fast" with a low-precision weight: dW is cast from its fp32 accumulator, and exists early only when
    # it can hold the logits chunk meanwhile; otherwise it is made after the chunk buffer is freed (lower peak).
    fast_chunk = fast_rows_per_chunk(n_sup, vocab, hidden.dtype, tuning) if fast and n_sup else 0
    acc_separate = fast and need_dw and n_sup > 0 and weight.dtype != torch.float32
    dw_late = acc_separate and fast_chunk > hidden_size
    alloc = torch.empty if n_sup else torch.zeros
    dh = alloc(hidden.shape, dtype=hidden.dtype, device=device) if need_dh else None  # (N, H)
    dw = alloc(weight.shape, dtype=weight.dtype, device=device) if need_dw and not dw_late else None  # (V, H)

    parked = rows is not None and need_dh and 2 * n_sup <= n_rows
    if rows is None:
        h = hidden
    elif parked:  # the spare rows of dh hold the gathered rows until the last matmul
        h = torch.index_select(hidden, 0, rows, out=dh[n_sup:2 * n_sup])  # (M, H)
    else:
        h = hidden.index_select(0, rows)  # (M, H)
    # dh's rows beyond the supervised ones and the parked rows: free until the scatter (pass B's tiles may go there)
    spare = dh.view(-1)[(2 if parked else 1) * n_sup * hidden_size:] if need_dh and rows is not None else None
    dh_sup = dh[:n_sup] if need_dh else None  # (M, H): dense at the top of dh, scattered home at the end
    loss_sum = torch.zeros((), dtype=torch.float32, device=device)

    if n_sup:
        one = torch.ones((), dtype=torch.float32, device=device)
        lse = torch.empty(n_sup, dtype=torch.float32, device=device)  # pass B reads it for every row
        # Pass A (the only pass of layout "fast"): lse, loss, dh (and dW for "fast") per row chunk over all of V.
        acc = None
        if fast:
            chunk = fast_chunk
            if acc_separate and not dw_late:  # (C, V) borrowed from dW, written only after the last chunk
                buf = dw.view(-1)[: chunk * vocab].view(chunk, vocab)
            else:
                buf = torch.empty(chunk, vocab, dtype=hidden.dtype, device=device)
            if need_dw:  # (V, H) fp32; an fp32 weight accumulates in its own dW output
                acc = torch.empty(weight.shape, dtype=torch.float32, device=device) if acc_separate else dw
        else:
            chunk = rows_per_chunk(n_sup, vocab, hidden_size, tuning)
            if need_dw:
                buf = dw.view(-1)[: chunk * vocab].view(chunk, vocab)  # (C, V) borrowed: pass B overwrites it
            else:
                buf = torch.empty(chunk, vocab, dtype=hidden.dtype, device=device)
        # Per-row losses only per chunk, summed chunk by chunk (in order: deterministic).
        loss_rows = torch.empty(chunk, dtype=torch.float32, device=device)
        for start in range(0, n_sup, chunk):
            end = min(n_sup, start + chunk)
            logits = buf[: end - start]  # (c, V)
            h_b, lse_b, t, t_index = _row_block(h, lse, targets, rows, start, end)
            torch.mm(h_b, weight.t(), out=logits)
            ce_rows(logits, t, lse_b, loss_rows[: end - start], softcap=softcap,
                    grad_out=logits if (need_dh or acc is not None) else None, grad_scale=one, row_index=t_index)
            loss_sum += loss_rows[: end - start].sum()
            if need_dh:
                torch.mm(logits, weight, out=dh_sup[start:end])
            if acc is not None:
                _accumulate_dw(acc, logits, h_b, first=start == 0)
        del buf, logits, loss_rows
        if dw_late:
            dw = acc.to(weight.dtype)
        elif acc_separate:
            dw.copy_(acc)
        del acc
        # Pass B (layout "low_memory"): dW per vocabulary chunk over all supervised rows, with pass A's lse. The
        # logits tile lives in dh's spare rows or the unwritten end of dW (vocab_chunks); the last narrow chunks go
        # in row blocks.
        if need_dw and not fast:
            schedule = vocab_chunks(n_sup, vocab, hidden_size, hidden.dtype, 0 if spare is None else spare.numel(),
                                    tuning)
            tail_cols = max((v1 - v0 for v0, v1, place in schedule if place == "split"), default=0)
            tail_acc = (torch.empty(tail_cols, hidden_size, dtype=torch.float32, device=device) if tail_cols
                        else None)  # (TAIL_COLS, H)
            dw_flat = dw.view(-1)
            weight_t = weight.t()  # (H, V)
            # fp32 inputs keep cuBLAS: the Triton matmul would be a plain fp32 one on CUDA cores (no tf32), slower
            fused = _knob(tuning, "fused_grad_tile") and hidden.dtype != torch.float32
            launch = (tuning.grad_tile_launch if tuning is not None else None) or DEFAULT_LAUNCH
            for v0, v1, place in schedule:
                width = v1 - v0
                split = place == "split"
                block = split_rows(n_sup, vocab, hidden_size, v0, width) if split else n_sup
                for r0 in range(0, n_sup, block):
                    r1 = min(n_sup, r0 + block)
                    h_b, lse_b, t, t_index = _row_block(h, lse, targets, rows, r0, r1)
                    # (r1 - r0, width): in dh's spare rows, or dW's last elements, beyond dw[v1:] ("dw") or at
                    # least beyond dw[:v0] ("split")
                    size = (r1 - r0) * width
                    tile = (spare[:size] if place == "spare" else dw_flat[dw_flat.numel() - size:]).view(
                        r1 - r0, width)
                    if fused:
                        grad_tile(h_b, weight, v0, v1, t, lse_b, one, tile, softcap=softcap, row_index=t_index,
                                  launch=launch)
                    else:
                        torch.mm(h_b, weight_t[:, v0:v1], out=tile)
                        ce_rows(tile, t, lse_b, None, softcap=softcap, grad_out=tile, grad_scale=one,
                                compute_lse=False, col_offset=v0, row_index=t_index)
                    if split:
                        _accumulate_dw(tail_acc[:width], tile, h_b, first=r0 == 0)
                    else:
                        torch.mm(tile.t(), h, out=dw[v0:v1])
                if split:
                    dw[v0:v1].copy_(tail_acc[:width])
            del tail_acc, tile, dw_flat
        del h, lse, spare
        if need_dh and rows is not None:
            del rows
            scatter_rows_home(dh, targets, n_sup)

    if dh is None:
        dh = hidden.new_empty(0)  # outputs of a custom op must not alias each other
    if dw is None:
        dw = hidden.new_empty(0)
    record("linear_cross_entropy", TRITON)  # both layouts; GRAD_IN_BACKWARD's backward records again
    return loss_sum, n_supervised, dh, dw


@torch.library.custom_op("fastsft::linear_cross_entropy", mutates_args=())
def _forward(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: Optional[float],
             need_dh: bool, need_dw: bool, layout: str, tuning: str = "",
             known: int = -1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward_impl(hidden, weight, targets, softcap, need_dh, need_dw, layout, _decode(tuning), known)


@_forward.register_fake
def _(hidden, weight, targets, softcap, need_dh, need_dw, layout, tuning="", known=-1):
    return (hidden.new_empty((), dtype=torch.float32), hidden.new_empty((), dtype=torch.int64),
            torch.empty_like(hidden, memory_format=torch.contiguous_format) if need_dh else hidden.new_empty(0),
            torch.empty_like(weight, memory_format=torch.contiguous_format) if need_dw else hidden.new_empty(0))


def _setup_context(ctx, inputs, output):
    need_dh, need_dw = inputs[4], inputs[5]
    _, n, dh, dw = output
    # Kept as plain attributes, not save_for_backward, and handed over in backward: the gradients returned must have
    # no other owner, or autograd's AccumulateGrad clones them into .grad instead of taking them.
    ctx.grads = (dh, dw)
    ctx.need = (need_dh, need_dw)
    ctx.mark_non_differentiable(n, dh, dw)
    # Otherwise autograd hands backward zero-filled "gradients" of the dh and dW outputs: another (N, H) + (V, H)
    # at the peak (run 1 of 2026-11-25 measured exactly twice the gradients because of it).
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_loss, _grad_n, _grad_dh, _grad_dw):
    # Scaling in place: the stored gradients are private to this node, and a second (N, H) + (V, H) buffer at
    # the peak of backward is what this op exists to avoid. Hence backward may run once per forward.
    if ctx.grads is None:
        raise RuntimeError("linear_cross_entropy: backward ran twice through one forward (retain_graph=True); its "
                           "stored gradients are scaled in place, so call the op again for a second backward")
    dh, dw = ctx.grads
    ctx.grads = None
    need_dh, need_dw = ctx.need
    grad_loss = torch.zeros((), device=dh.device) if grad_loss is None else grad_loss.float()  # not materialized
    # detach(): a fresh tensor object over the same storage, owned by nobody but autograd (see _setup_context).
    grad_hidden = dh.mul_(grad_loss).detach() if need_dh else None
    grad_weight = dw.mul_(grad_loss).detach() if need_dw else None
    del dh, dw
    return grad_hidden, grad_weight, None, None, None, None, None, None, None


_forward.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("fastsft::linear_cross_entropy_recompute", mutates_args=())
def _loss_recompute(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                    softcap: Optional[float], layout: str, tuning: str = "",
                    known: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    loss, n, _, _ = _forward_impl(hidden, weight, targets, softcap, False, False, layout, _decode(tuning), known)
    return loss, n


@_loss_recompute.register_fake
def _(hidden, weight, targets, softcap, layout, tuning="", known=-1):
    return hidden.new_empty((), dtype=torch.float32), hidden.new_empty((), dtype=torch.int64)


def _setup_context_recompute(ctx, inputs, output):
    hidden, weight, targets, softcap, layout, tuning, known = inputs
    ctx.save_for_backward(hidden, weight, targets)
    ctx.softcap, ctx.layout, ctx.tuning, ctx.known = softcap, layout, tuning, known
    ctx.mark_non_differentiable(output[1])


def _backward_recompute(ctx, grad_loss, _grad_n):
    hidden, weight, targets = ctx.saved_tensors
    need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    _, _, dh, dw = _forward(hidden, weight, targets, ctx.softcap, need_dh, need_dw, ctx.layout, ctx.tuning,
                            ctx.known)
    grad_loss = grad_loss.float()
    return (dh.mul_(grad_loss) if need_dh else None, dw.mul_(grad_loss) if need_dw else None, None, None, None, None,
            None)


_loss_recompute.register_autograd(_backward_recompute, setup_context=_setup_context_recompute)


def _reference_on_cpu(hidden, weight, targets, softcap):
    """The op where Triton cannot run: the reference math after the same target check as the kernels."""
    vocab = weight.shape[0]
    n_bad = int(((targets < -1) | (targets >= vocab)).sum())
    if n_bad:
        raise ValueError(f"linear_cross_entropy: {n_bad} targets outside [-1, {vocab}) (vocab size {vocab}, "
                         f"-1 = ignore)")
    record("linear_cross_entropy", REFERENCE)
    return linear_cross_entropy_reference(hidden, weight, targets, softcap)


def linear_cross_entropy(hidden, weight, targets, softcap=None, *, layout="low_memory",
                         tuning: Optional[LCETuning] = None, num_supervised: Optional[int] = None):
    """Sum of masked token cross-entropies of logits = hidden @ weight^T, and the count of targets != -1.

    hidden: (N, H) bf16/fp16/fp32; weight: (V, H) same dtype; targets: (N,) int64, -1 = ignore; softcap: None or
    c > 0, applies c * tanh(x / c) to the logits. layout: "low_memory" (default) or "fast", see the module
    docstring (same results up to rounding; "fast" is ~1.5x quicker and holds an fp32 (V, H) accumulator).
    tuning: an LCETuning variant of the chunk sizes and passes (benchmarks); None: the module defaults.
    num_supervised: the count of targets != -1 when the caller knows it on the host, having checked them there
    (the packer's batches): the op then never waits for the device. A wrong count gives a wrong loss; None
    counts on the device (one host sync) and checks the targets' range.
    Returns (loss_sum fp32 scalar, n_supervised int64 scalar).
    """
    _check_inputs(hidden, weight, targets, softcap)
    known = -1 if num_supervised is None else int(num_supervised)
    if not 0 <= known <= targets.shape[0] and num_supervised is not None:
        raise ValueError(f"linear_cross_entropy: num_supervised must be in [0, {targets.shape[0]}], got {known}")
    if layout not in LAYOUTS:
        raise ValueError(f"linear_cross_entropy: layout must be one of {LAYOUTS}, got {layout!r}")
    softcap = None if softcap is None else float(softcap)
    if not runs_triton(hidden.device):
        return _reference_on_cpu(hidden, weight, targets, softcap)
    grad_on = torch.is_grad_enabled()
    need_dh, need_dw = grad_on and hidden.requires_grad, grad_on and weight.requires_grad
    # Traced by dynamo in a compiled model: plain reads only here (no globals(), no json for the default None).
    encoded = "" if tuning is None else tuning.encode()
    grad_in_backward = tuning.grad_in_backward if tuning is not None else None
    if grad_in_backward is None:
        grad_in_backward = GRAD_IN_BACKWARD
    if grad_in_backward and (need_dh or need_dw):
        return _loss_recompute(hidden, weight, targets, softcap, layout, encoded, known)
    loss, n, _dh, _dw = _forward(hidden, weight, targets, softcap, need_dh, need_dw, layout, encoded, known)
    return loss, n
