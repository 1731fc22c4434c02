"""lm_head + masked cross-entropy without ever holding the (N, V) logits: the loss of SFT training.

Only supervised rows (target != -1) reach a matmul: they are gathered first, and their hidden gradient is scattered
back at the end (ignored rows get zeros). In SFT a third to a half of the rows are unsupervised, so this is the
largest saving of the op. The supervised rows are then processed in row chunks:

    logits_c = h_c @ W^T                      (cuBLAS, fp32 accumulation, stored in the input dtype)
    row kernel: lse, loss, and dlogits_c = (softmax - onehot) * softcap'   written over logits_c in place
    dh_c  = dlogits_c @ W                     (complete: the whole vocabulary is in one chunk)
    dW   += dlogits_c^T @ h_c                 (accumulated over row chunks in fp32)

i.e. the gradient is computed in the forward pass when one is needed (3 matmuls instead of the 4 of a recompute in
backward); backward only scales the stored gradients by the upstream gradient of the loss sum. Gradients are exact
(no filtering of small probabilities); the only rounding is that of the logits/dlogits chunk to the input dtype.

Returns the SUM of token losses (fp32) and the supervised count (int64), so the caller divides by a global count.

Workspace beyond the two gradients: the logits chunk (CHUNK_BYTES), the fp32 dW accumulator when there is more
than one chunk, and the gathered rows with their dh. Measured (bench/RESULTS.md, H100, N=32768, H=1024, V=65536,
half the targets ignored): 12.9 ms forward+backward, 0.75 GiB above the inputs (torch.compile 22.4 ms / 4.2 GiB).

Host sync: one per call (0.05 ms on an H100). The gather of supervised rows needs their count on the host to size
the chunk loop; the same sync also checks that targets lie in [-1, V). It sits inside the custom op, so
torch.compile sees static shapes.
"""

from typing import Optional

import torch
import torch.nn.functional as F

from ._ce_rows import ce_rows, check_softcap

# Bytes of the logits chunk buffer (rows_per_chunk x V in the input dtype), and a floor on its rows. Every row chunk
# costs one read + write of the (V, H) dW accumulator on top of its matmuls; that traffic relative to the chunk's
# matmul time falls as 1 / rows (about 300 / rows on an H100 with an fp32 accumulator), so chunks stay at least
# MIN_CHUNK_ROWS tall even when that exceeds CHUNK_BYTES (large vocabularies). Module-level so tests can force
# many chunks and the bench can sweep them.
CHUNK_BYTES = 256 * 2**20
MIN_CHUNK_ROWS = 2048
# Accumulate dW over row chunks in fp32 (exact up to the input rounding); False accumulates in the weight dtype
# (one rounding per chunk, less memory and traffic). Only matters with more than one row chunk of a bf16 weight.
DW_ACCUM_FP32 = True


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


def rows_per_chunk(n_rows, vocab, dtype):
    """Rows of logits per chunk: CHUNK_BYTES worth but at least MIN_CHUNK_ROWS, a multiple of 128 when that large."""
    rows = max(1, MIN_CHUNK_ROWS, CHUNK_BYTES // (vocab * torch.empty((), dtype=dtype).element_size()))
    if rows >= 128:
        rows -= rows % 128
    return min(rows, max(n_rows, 1))


_MIXED_ADDMM_OK = {}  # device type -> whether addmm(fp32 acc, bf16, bf16, out_dtype=fp32, out=acc) works


def _mixed_addmm_ok(device):
    if device.type not in _MIXED_ADDMM_OK:
        try:
            a = torch.ones(2, 2, device=device, dtype=torch.bfloat16)
            acc = torch.ones(2, 2, device=device)
            torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
            _MIXED_ADDMM_OK[device.type] = bool((acc == 3).all())
        except (RuntimeError, TypeError, NotImplementedError):
            _MIXED_ADDMM_OK[device.type] = False
    return _MIXED_ADDMM_OK[device.type]


def _accumulate_dw(acc, dlogits, h, first):
    """acc (V, H) += dlogits^T @ h (acc := on the first chunk, so acc may start uninitialized).

    An fp32 acc of a bf16/fp16 product is summed in fp32: one matmul with an fp32 C operand on CUDA.
    """
    beta = 0 if first else 1  # beta=0: BLAS ignores C, NaNs included
    if acc.dtype == dlogits.dtype:
        acc.addmm_(dlogits.t(), h, beta=beta)
    elif _mixed_addmm_ok(acc.device):
        torch.addmm(acc, dlogits.t(), h, beta=beta, out_dtype=torch.float32, out=acc)
    elif acc.is_cuda:  # older torch: the partial product lands in fp32 first (one more (V, H) fp32 buffer)
        if first:
            torch.mm(dlogits.t(), h, out_dtype=torch.float32, out=acc)
        else:
            acc.add_(torch.mm(dlogits.t(), h, out_dtype=torch.float32))
    else:  # the CPU has no mixed-dtype matmul
        acc.addmm_(dlogits.t().float(), h.float(), beta=beta)


def _forward_impl(hidden, weight, targets, softcap, need_dh, need_dw):
    n_rows, _ = hidden.shape
    vocab = weight.shape[0]
    device = hidden.device
    valid = targets >= 0
    counts = torch.stack([valid.sum(), ((targets < -1) | (targets >= vocab)).sum()])
    n_sup, n_bad = counts.tolist()  # the one host sync (see the module docstring)
    if n_bad:
        raise ValueError(f"linear_cross_entropy: {n_bad} targets outside [-1, {vocab}) (vocab size {vocab}, "
                         f"-1 = ignore)")
    n_supervised = counts[0].clone()

    if n_sup == n_rows:  # nothing ignored: no gather, no scatter
        rows = None
        h, t = hidden, targets
    else:
        rows = torch.nonzero_static(valid, size=n_sup).squeeze(1)  # (M,)
        h = hidden.index_select(0, rows)  # (M, H)
        t = targets.index_select(0, rows)  # (M,)

    need_grad = need_dh or need_dw
    chunk = rows_per_chunk(n_sup, vocab, hidden.dtype)
    n_chunks = -(-n_sup // chunk)
    buf = torch.empty(chunk if n_sup else 0, vocab, dtype=hidden.dtype, device=device)  # (C, V)
    lse = torch.empty(n_sup, dtype=torch.float32, device=device)
    loss = torch.empty(n_sup, dtype=torch.float32, device=device)
    one = torch.ones((), dtype=torch.float32, device=device)
    dh_sup = torch.empty_like(h) if need_dh else None  # (M, H)
    if need_dw:
        # One chunk, fp32 weights or DW_ACCUM_FP32 off: accumulate straight into dW (fp32 inside each matmul).
        direct = n_chunks <= 1 or hidden.dtype == torch.float32 or not DW_ACCUM_FP32
        alloc = torch.empty if n_sup else torch.zeros  # the first chunk overwrites; no chunk: dW = 0
        dw = alloc(weight.shape, dtype=weight.dtype, device=device)  # (V, H)
        acc = dw if direct else alloc(weight.shape, dtype=torch.float32, device=device)

    for start in range(0, n_sup, chunk):
        end = min(n_sup, start + chunk)
        h_c = h[start:end]  # (c, H)
        logits = buf[: end - start]  # (c, V)
        torch.mm(h_c, weight.t(), out=logits)
        ce_rows(logits, t[start:end], lse[start:end], loss[start:end], softcap=softcap,
                grad_out=logits if need_grad else None, grad_scale=one)
        if need_dh:
            torch.mm(logits, weight, out=dh_sup[start:end])
        if need_dw:
            _accumulate_dw(acc, logits, h_c, first=start == 0)

    if need_dh:
        if rows is None:
            dh = dh_sup
        else:
            dh = torch.zeros_like(hidden, memory_format=torch.contiguous_format)  # (N, H); ignored rows stay 0
            dh.index_copy_(0, rows, dh_sup)
    else:
        dh = hidden.new_empty(0)  # outputs of a custom op must not alias each other
    if need_dw:
        if acc is not dw:
            dw.copy_(acc)
    else:
        dw = hidden.new_empty(0)
    return loss.sum(), n_supervised, dh, dw


@torch.library.custom_op("fastsft::linear_cross_entropy", mutates_args=())
def _forward(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: Optional[float],
             need_dh: bool, need_dw: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward_impl(hidden, weight, targets, softcap, need_dh, need_dw)


@_forward.register_fake
def _(hidden, weight, targets, softcap, need_dh, need_dw):
    return (hidden.new_empty((), dtype=torch.float32), hidden.new_empty((), dtype=torch.int64),
            torch.empty_like(hidden, memory_format=torch.contiguous_format) if need_dh else hidden.new_empty(0),
            torch.empty_like(weight, memory_format=torch.contiguous_format) if need_dw else hidden.new_empty(0))


def _setup_context(ctx, inputs, output):
    _, _, _, _, need_dh, need_dw = inputs
    _, n, dh, dw = output
    ctx.save_for_backward(dh, dw)
    ctx.need = (need_dh, need_dw)
    ctx.mark_non_differentiable(n, dh, dw)


def _backward(ctx, grad_loss, _grad_n, _grad_dh, _grad_dw):
    # Scaling in place: the stored gradients are private to this node, and a second (N, H) + (V, H) buffer at
    # the peak of backward is what this op exists to avoid. Hence backward may run once per forward.
    if getattr(ctx, "backward_done", False):
        raise RuntimeError("linear_cross_entropy: backward ran twice through one forward (retain_graph=True); its "
                           "stored gradients are scaled in place, so call the op again for a second backward")
    ctx.backward_done = True
    dh, dw = ctx.saved_tensors
    need_dh, need_dw = ctx.need
    grad_loss = grad_loss.float()
    grad_hidden = dh.mul_(grad_loss) if need_dh else None
    grad_weight = dw.mul_(grad_loss) if need_dw else None
    return grad_hidden, grad_weight, None, None, None, None


_forward.register_autograd(_backward, setup_context=_setup_context)


def linear_cross_entropy(hidden, weight, targets, softcap=None):
    """Sum of masked token cross-entropies of logits = hidden @ weight^T, and the count of targets != -1.

    hidden: (N, H) bf16/fp16/fp32; weight: (V, H) same dtype; targets: (N,) int64, -1 = ignore; softcap: None or
    c > 0, applies c * tanh(x / c) to the logits. Returns (loss_sum fp32 scalar, n_supervised int64 scalar).
    """
    _check_inputs(hidden, weight, targets, softcap)
    softcap = None if softcap is None else float(softcap)
    grad_on = torch.is_grad_enabled()
    loss, n, _dh, _dw = _forward(hidden, weight, targets, softcap, grad_on and hidden.requires_grad,
                                 grad_on and weight.requires_grad)
    return loss, n
