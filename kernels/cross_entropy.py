"""Masked cross-entropy over materialized logits: one read forward, one read + one write backward.

For callers that already hold the (N, V) logits (evaluation, models whose head is not a plain linear layer). The
training path gathers supervised rows and calls `linear_cross_entropy` instead, which never holds full logits.

Returns the SUM of token losses and the supervised count, so the caller divides by a global count (all micro-batches,
all ranks). Registered as torch custom ops so torch.compile treats the Triton launches as opaque calls.

Memory traffic is the floor for this op: forward streams the logits once (online log-sum-exp per row, target logit
picked directly); backward streams them once more and writes the gradient. Rows with target -1 are never read.

In-place gradient: with `inplace_backward=True` the backward writes the gradient into the logits' own storage and
hands that storage back as the gradient (saves one (N, V) buffer). Safe only when nothing reads the logits after
backward, e.g. logits straight out of an lm_head matmul (whose backward needs only its inputs). Not safe when the
logits are a leaf you keep or are reused by another loss; a second backward through one forward (retain_graph)
raises. The default (False) writes a fresh gradient buffer.

Measured (bench/RESULTS.md, H100): 32768 x 65536 bf16 forward+backward 4.9 ms vs 5.7 ms for torch.compile'd
F.cross_entropy; after an lm_head, inplace_backward saves the 4 GiB gradient buffer.

Host syncs: one per forward, to reject targets outside [-1, V) with a clear error (reading out of bounds otherwise).

Where Triton cannot run (a CPU tensor without TRITON_INTERPRET=1), the op computes the same quantities with the
PyTorch reference math; `inplace_backward` then has no effect (autograd's own gradient buffer is used).
"""

from typing import Optional

import torch
import torch.nn.functional as F

from ._ce_rows import ce_rows, check_softcap
from ._multi_tensor import runs_triton
from .paths import REFERENCE, TRITON, record


def cross_entropy_reference(logits, targets, softcap=None):
    """fp32 PyTorch reference: (sum of token losses over targets != -1, count of those targets)."""
    x = logits.float()
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    loss = F.cross_entropy(x, targets, ignore_index=-1, reduction="sum")
    return loss, (targets != -1).sum()


def _check_inputs(logits, targets, softcap):
    where = "cross_entropy"
    if logits.dim() != 2:
        raise ValueError(f"{where}: logits must be (N, V), got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise TypeError(f"{where}: logits must be a float tensor, got {logits.dtype}")
    if targets.dim() != 1 or targets.shape[0] != logits.shape[0]:
        raise ValueError(f"{where}: targets must be (N,) = ({logits.shape[0]},), got {tuple(targets.shape)}")
    if targets.dtype != torch.int64:
        raise TypeError(f"{where}: targets must be int64, got {targets.dtype}")
    if targets.device != logits.device:
        raise ValueError(f"{where}: targets on {targets.device} but logits on {logits.device}")
    if logits.shape[1] == 0:
        raise ValueError(f"{where}: logits have an empty vocabulary dimension")
    check_softcap(softcap, where)


def _forward_impl(logits, targets, softcap):
    n_rows, vocab = logits.shape
    bad = ((targets < -1) | (targets >= vocab)).sum()
    if bad.item():  # the one host sync of this op
        raise ValueError(f"cross_entropy: {int(bad)} targets outside [-1, {vocab}) (vocab size {vocab}, -1 = ignore)")
    logits = logits if logits.stride(1) == 1 else logits.contiguous()
    lse = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    loss = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    ce_rows(logits, targets, lse, loss, softcap=softcap)
    record("cross_entropy", TRITON)
    return loss.sum(), (targets >= 0).sum(), lse


def _forward_fake(logits, targets, softcap):
    return (logits.new_empty((), dtype=torch.float32), logits.new_empty((), dtype=torch.int64),
            logits.new_empty(logits.shape[0], dtype=torch.float32))


# Two forward ops that differ only in their backward (fresh gradient buffer vs. the logits' own storage).
@torch.library.custom_op("fastsft::cross_entropy_forward", mutates_args=())
def _forward(logits: torch.Tensor, targets: torch.Tensor,
             softcap: Optional[float]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward_impl(logits, targets, softcap)


@torch.library.custom_op("fastsft::cross_entropy_forward_inplace_backward", mutates_args=())
def _forward_for_inplace(logits: torch.Tensor, targets: torch.Tensor,
                         softcap: Optional[float]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward_impl(logits, targets, softcap)


_forward.register_fake(_forward_fake)
_forward_for_inplace.register_fake(_forward_fake)


@torch.library.custom_op("fastsft::cross_entropy_backward", mutates_args=())
def _backward(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, grad_loss: torch.Tensor,
              softcap: Optional[float]) -> torch.Tensor:
    logits = logits if logits.stride(1) == 1 else logits.contiguous()
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
    ce_rows(logits, targets, lse, None, softcap=softcap, grad_out=grad, grad_scale=grad_loss.float(), compute_lse=False)
    record("cross_entropy_backward", TRITON)
    return grad


@_backward.register_fake
def _(logits, targets, lse, grad_loss, softcap):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.custom_op("fastsft::cross_entropy_backward_", mutates_args=("logits",))
def _backward_inplace(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, grad_loss: torch.Tensor,
                      softcap: Optional[float]) -> None:
    if logits.stride(1) != 1:
        raise ValueError("cross_entropy: inplace_backward needs logits contiguous along the vocabulary")
    ce_rows(logits, targets, lse, None, softcap=softcap, grad_out=logits, grad_scale=grad_loss.float(),
            compute_lse=False)
    record("cross_entropy_backward", TRITON)


@_backward_inplace.register_fake
def _(logits, targets, lse, grad_loss, softcap):
    return None


def _setup_context(ctx, inputs, output):
    logits, targets, softcap = inputs
    ctx.save_for_backward(logits, targets, output[2])
    ctx.softcap = softcap
    ctx.mark_non_differentiable(output[1], output[2])


def _grad(ctx, grad_loss, _grad_n, _grad_lse):
    logits, targets, lse = ctx.saved_tensors
    return _backward(logits, targets, lse, grad_loss, ctx.softcap), None, None


def _grad_inplace(ctx, grad_loss, _grad_n, _grad_lse):
    if getattr(ctx, "backward_done", False):
        raise RuntimeError("cross_entropy(inplace_backward=True): backward ran twice through one forward "
                           "(retain_graph=True), but the first one overwrote the logits with their gradient")
    ctx.backward_done = True
    logits, targets, lse = ctx.saved_tensors
    _backward_inplace(logits, targets, lse, grad_loss, ctx.softcap)
    return logits, None, None


_forward.register_autograd(_grad, setup_context=_setup_context)
_forward_for_inplace.register_autograd(_grad_inplace, setup_context=_setup_context)


def cross_entropy(logits, targets, softcap=None, *, inplace_backward=False):
    """Sum of masked token cross-entropies over logits (N, V) and the count of targets != -1.

    logits: (N, V) float (bf16/fp16/fp32); targets: (N,) int64, -1 = ignore; softcap: None or c > 0, applies
    c * tanh(x / c) to the logits first. Returns (loss_sum fp32 scalar, n_supervised int64 scalar).
    See the module docstring for `inplace_backward`.
    """
    _check_inputs(logits, targets, softcap)
    if inplace_backward and logits.stride(1) != 1:
        raise ValueError("cross_entropy: inplace_backward needs logits contiguous along the vocabulary (stride 1), "
                         f"got strides {logits.stride()}")
    softcap = None if softcap is None else float(softcap)
    if not runs_triton(logits.device):
        vocab = logits.shape[1]
        n_bad = int(((targets < -1) | (targets >= vocab)).sum())
        if n_bad:
            raise ValueError(f"cross_entropy: {n_bad} targets outside [-1, {vocab}) (vocab size {vocab}, -1 = ignore)")
        record("cross_entropy", REFERENCE)  # its backward is autograd's, not recorded
        return cross_entropy_reference(logits, targets, softcap)
    op = _forward_for_inplace if inplace_backward else _forward
    loss, n, _lse = op(logits, targets, softcap)
    return loss, n
