"""Causal attention over packed conversations (varlen), with one backend chosen by capability.

Training packs several conversations into each row; attention must stay inside each conversation. The token stream
is flattened to (N, H, D) and `cu_seqlens` (int32, fixed length, padded by repeating the total) marks where each
conversation starts, so every backend sees the same static shapes and a compiled model does not recompile between
batches. Backends, best first, chosen once per device type and logged:

- ``flash_attn_4``: flash-attn-4 (`flash_attn.cute`, CuTe DSL; Hopper and Blackwell), the fastest correct path
  measured on an H200 (1.20 ms fwd+bwd against FA2's 2.03 at 16x2048, 10 heads of 128). Its Python autograd
  Function makes dynamo graph-break, so it runs through the custom ops ``fastsft::varlen_attn_fwd`` /
  ``fastsft::varlen_attn_bwd`` below (fake shapes + registered autograd: one graph, no recompiles).
- ``flash_attn_3``: FlashAttention-3 (`flash_attn_interface`, Hopper).
- ``flash_attn_2``: `flash_attn.flash_attn_varlen_func`.
- ``torch_varlen``: `torch.nn.attention.varlen.varlen_attn` (torch >= 2.10, CUDA).
- ``sdpa_segments``: exact fallback anywhere: scaled_dot_product_attention once per conversation, with an
  explicit mask for sliding windows. Slow, but it is the reference the fast paths are tested against.

Window semantics follow FlashAttention: a left window ``w >= 0`` lets query i see keys j with ``i - w <= j <= i``
(w + 1 keys); ``w < 0`` means unlimited (plain causal).
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

BACKENDS = ("flash_attn_4", "flash_attn_3", "flash_attn_2", "torch_varlen", "sdpa_segments")
_GPU_ONLY = frozenset(BACKENDS[:-1])  # flash_attn_4 also runs through _OP_KERNELS
# A user or benchmark may pin the backend (e.g. to compare them); None means "choose by capability".
_forced_backend: str | None = os.environ.get("FASTSFT_ATTENTION") or None


# ----------------------------------------------------------------------------------------------------------------
# Backend implementations: each takes q (N, H, D), k/v (N, Hkv, D), cu_seqlens (S+1,) int32, max_seqlen, window
# and returns (N, H, D). Only the tokens inside [0, cu_seqlens[-1]) are defined; callers mask the tail.


def _flash_attn_3(q, k, v, cu_seqlens, max_seqlen, window):
    import flash_attn_interface

    out = flash_attn_interface.flash_attn_varlen_func(
        q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=True, window_size=(window, 0)
    )
    return out[0] if isinstance(out, tuple) else out


# Signatures differ between releases; they are read once, eagerly, into plain globals (cheap for torch.compile to
# read while tracing, unlike inspect or functools.cache).
_SIGNATURES: dict[str, frozenset] = {}


def _params_of(name: str, load) -> frozenset:
    if name not in _SIGNATURES:
        _SIGNATURES[name] = frozenset(inspect.signature(load()).parameters)
    return _SIGNATURES[name]


def _torch_varlen_func():
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn


def _flash_attn_2(q, k, v, cu_seqlens, max_seqlen, window):
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func(
        q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=True, window_size=(window, 0)
    )


def _torch_varlen(q, k, v, cu_seqlens, max_seqlen, window):
    from torch.nn.attention.varlen import varlen_attn

    params = _params_of("torch_varlen", _torch_varlen_func)
    kw = {}
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        else:  # older torch: expand the kv heads (head h reads kv head h // n_rep, as in SDPA's enable_gqa)
            n_rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
    if "window_size" in params:
        kw["window_size"] = (window, 0)
    else:
        if window >= 0:
            raise NotImplementedError("this torch's varlen_attn has no window_size; sliding windows need torch >= 2.10")
        kw["is_causal"] = True
    return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **kw)


def check_cu_seqlens(cu_seqlens: torch.Tensor, num_tokens: int) -> list[int]:
    """Validate cu_seqlens on the host and return it as a list (this synchronizes: for the fallback and for checks)."""
    if cu_seqlens.ndim != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D with at least 2 entries, got shape {tuple(cu_seqlens.shape)}")
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {bounds[0]}")
    for i in range(1, len(bounds)):
        if bounds[i] < bounds[i - 1]:
            raise ValueError(f"cu_seqlens must be non-decreasing: entry {i} is {bounds[i]} after {bounds[i - 1]}")
    if bounds[-1] > num_tokens:
        raise ValueError(f"cu_seqlens ends at {bounds[-1]} but the stream holds only {num_tokens} tokens")
    return bounds


def causal_window_mask(length: int, window: int, device) -> torch.Tensor:
    """(length, length) bool mask, True where query i may attend key j: j <= i and (window < 0 or i - j <= window)."""
    i = torch.arange(length, device=device)[:, None]
    j = torch.arange(length, device=device)[None, :]
    keep = j <= i
    if window >= 0:
        keep &= (i - j) <= window
    return keep


def attention_pairs(length: int, window: int) -> int:
    """(query, key) pairs causal attention with left window `window` (< 0: none) scores over `length` tokens."""
    if window < 0 or window >= length - 1:
        return length * (length + 1) // 2
    return window * (window + 1) // 2 + (length - window) * (window + 1)


@torch.compiler.disable
def _sdpa_segments(q, k, v, cu_seqlens, max_seqlen, window):
    n_tokens, n_head, _ = q.shape
    bounds = check_cu_seqlens(cu_seqlens, n_tokens)
    longest = max(e - s for s, e in zip(bounds[:-1], bounds[1:]))
    if longest > max_seqlen:
        raise ValueError(f"a segment of cu_seqlens holds {longest} tokens, more than max_seqlen={max_seqlen}")
    enable_gqa = k.shape[1] != n_head
    pieces = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        length = end - start
        if length == 0:
            continue  # padding entries of the fixed-length cu_seqlens
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))  # (H, L, D)
        if window < 0 or window >= length - 1:
            y = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=enable_gqa)
        else:
            mask = causal_window_mask(length, window, q.device)
            y = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, enable_gqa=enable_gqa)
        pieces.append(y.transpose(0, 1))  # (L, H, D)
    tail = n_tokens - bounds[-1]
    if tail:
        pieces.append(q.new_zeros(tail, *q.shape[1:]))
    return torch.cat(pieces, dim=0)


# ----------------------------------------------------------------------------------------------------------------
# Kernels given as a separate forward and backward run through one pair of torch custom ops. Dynamo cannot trace
# into flash-attn-4's Python autograd Function (it graph-breaks there and then hits the recompile limit), but it
# treats a custom op as one opaque node whose output shapes come from the fake implementation: the compiled model
# stays one graph, and the fixed-length cu_seqlens plus constant max_seqlen keep it from recompiling.


@dataclass(frozen=True)
class OpKernels:
    """A varlen attention kernel as a forward and a backward function, run through the fastsft custom ops.

    forward(q, k, v, cu_seqlens, max_seqlen, window) -> (out (N, H, D) in q's dtype, lse (H, N) float32): lse is
        the natural log of the softmax denominator of each query over its scaled scores (FlashAttention's layout),
        saved for the backward; tokens past cu_seqlens[-1] may hold anything (the op zeroes them).
    backward(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, window) -> (dq, dk, dv) shaped like q, k, v.
    device_types: tensor device types the kernels accept; half_only: they take bf16 / fp16 only.
    """

    forward: Callable
    backward: Callable
    device_types: tuple[str, ...] = ("cuda",)
    half_only: bool = True


def _fa4_interface():
    from flash_attn.cute import interface

    return interface


def _fa4_window(window: int) -> dict:
    # Causal with right window 0; None on the left means unlimited in the CuTe interface.
    return dict(causal=True, window_size_left=window if window >= 0 else None, window_size_right=0)


def _fa4_forward(q, k, v, cu_seqlens, max_seqlen, window):
    res = _fa4_interface()._flash_attn_fwd(
        q, k, v, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens, max_seqlen_q=max_seqlen,
        max_seqlen_k=max_seqlen, return_lse=True, **_fa4_window(window),
    )
    return res[0], res[1]  # (out, lse); later entries (p, row_max, ...) serve sparse MLA only


def _fa4_backward(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, window):
    res = _fa4_interface()._flash_attn_bwd(
        q, k, v, out, dout, lse, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens, max_seqlen_q=max_seqlen,
        max_seqlen_k=max_seqlen, **_fa4_window(window),
    )
    return res[0], res[1], res[2]


_OP_KERNELS: dict[str, OpKernels] = {"flash_attn_4": OpKernels(_fa4_forward, _fa4_backward)}


def register_op_kernels(name: str, kernels: OpKernels | None) -> None:
    """Run backend `name` through the custom ops with `kernels` (None removes it). For new kernels and for tests,
    which inject an exact CPU pair to check the op's structure where flash-attn-4 cannot run."""
    if name in _IMPLS:
        raise ValueError(f"{name!r} is a plain-function backend; choose another name")
    if kernels is None:
        _OP_KERNELS.pop(name, None)
    else:
        _OP_KERNELS[name] = kernels
    _CHOICES.clear()  # a pinned choice may name it


def _covered(cu_seqlens: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """(N, 1, 1) bool: True for tokens inside a segment. Static-shaped, no host sync."""
    return (torch.arange(num_tokens, device=cu_seqlens.device) < cu_seqlens[-1])[:, None, None]


class _ZeroTailGrad(torch.autograd.Function):
    """Identity forward; the backward zeroes the gradient rows of tokens in no segment. torch's varlen_attn (FA2)
    leaves dq / dk / dv of those rows uninitialized (NaN and 1e37 seen on an H200), which would reach the weight
    gradients through the projections; guarding q, k and v before the kernel keeps its contract: zeros there."""

    @staticmethod
    def forward(ctx, x, cu_seqlens):
        ctx.save_for_backward(cu_seqlens)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        (cu_seqlens,) = ctx.saved_tensors
        return torch.where(_covered(cu_seqlens, grad.shape[0]), grad, 0), None


@functools.cache
def _zero_tail_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def zero_tail(x_ptr, cu_ptr, last, num_rows, row_width, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
        first = tl.load(cu_ptr + last)  # cu_seqlens[-1]: the first row past every segment
        row0 = tl.program_id(0) * BLOCK_ROWS
        if row0 + BLOCK_ROWS > first:  # every other program (all of them for a packer's batch) only reads `first`
            rows = row0 + tl.arange(0, BLOCK_ROWS)
            in_tail = (rows >= first) & (rows < num_rows)
            for c in range(0, row_width, BLOCK_COLS):
                cols = c + tl.arange(0, BLOCK_COLS)
                ptrs = x_ptr + rows[:, None].to(tl.int64) * row_width + cols[None, :]
                zeros = tl.zeros((BLOCK_ROWS, BLOCK_COLS), dtype=x_ptr.dtype.element_ty)
                tl.store(ptrs, zeros, mask=in_tail[:, None] & (cols[None, :] < row_width))

    return zero_tail


def zero_tail_(x: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Zero, in place, the rows of x (N, ...) at or past cu_seqlens[-1]: the tokens of no segment, which kernels
    leave uninitialized (a NaN there would poison weight gradients through 0 * NaN). On the GPU a Triton kernel
    reads the bound on the device (no host sync) and writes only the tail: a packed batch (pack_rows covers the
    whole stream, row padding being a segment of its own) costs one launch and no traffic, where torch.where
    would read and write the whole tensor (~2% of a d20 step over the forward and backward of 20 layers)."""
    if x.device.type != "cuda":
        x[int(cu_seqlens[-1]):] = 0  # the host owns the data: no sync to avoid
        return x
    return _zero_tail_triton(x, cu_seqlens)


def _zero_tail_triton(x: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    if not x.is_contiguous():
        raise ValueError("zero_tail_ needs a contiguous tensor")
    num_rows, row_width = x.shape[0], x[0].numel() if x.shape[0] else 0
    if num_rows == 0 or row_width == 0:
        return x
    block_rows = 16
    block_cols = min(1024, 1 << (row_width - 1).bit_length())
    _zero_tail_kernel()[(-(-num_rows // block_rows),)](x, cu_seqlens, cu_seqlens.numel() - 1, num_rows, row_width,
                                                        BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols)
    return x


# `covered`: the caller knows that cu_seqlens[-1] == N (the packer's batches, whose row padding is a segment of its
# own): no token lies past the last segment, so the ops skip zero_tail_ (a launch each for out, dq, dk and dv: 48 a
# d12 step, each a no-op on such a batch, where the step's host is its bound: bench/RESULTS.md, run 15).


@torch.library.custom_op("fastsft::varlen_attn_fwd", mutates_args=())
def varlen_attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                    window: int, backend: str, covered: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward of an OpKernels backend: (out (N, H, D), lse (H, N) float32); tokens past the last segment get 0."""
    out, lse = _OP_KERNELS[backend].forward(q, k, v, cu_seqlens, max_seqlen, window)
    out = out.contiguous()
    return (out if covered else zero_tail_(out, cu_seqlens)), lse  # the kernel's own fresh tensor: safe to write


@varlen_attn_fwd.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, window, backend, covered=False):
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("fastsft::varlen_attn_bwd", mutates_args=())
def varlen_attn_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                    lse: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, window: int,
                    backend: str, covered: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of an OpKernels backend: (dq, dk, dv), zero for tokens past the last segment."""
    grads = _OP_KERNELS[backend].backward(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, window)
    grads = tuple(g.contiguous() for g in grads)
    return grads if covered else tuple(zero_tail_(g, cu_seqlens) for g in grads)  # the kernel's fresh tensors


@varlen_attn_bwd.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, window, backend, covered=False):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, window, backend, covered = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
    ctx.max_seqlen, ctx.window, ctx.backend, ctx.covered = max_seqlen, window, backend, covered
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    if dout is None:  # out unused by the loss
        dout = torch.zeros_like(out)
    dq, dk, dv = varlen_attn_bwd(dout.contiguous(), q, k, v, out, lse, cu_seqlens, ctx.max_seqlen, ctx.window,
                                 ctx.backend, ctx.covered)
    return dq, dk, dv, None, None, None, None, None


varlen_attn_fwd.register_autograd(_backward, setup_context=_setup_context)


_IMPLS = {
    "flash_attn_3": _flash_attn_3,
    "flash_attn_2": _flash_attn_2,
    "torch_varlen": _torch_varlen,
    "sdpa_segments": _sdpa_segments,
}


# ----------------------------------------------------------------------------------------------------------------
# Capability checks and the one choice.


def _importable(probe) -> bool:
    try:
        probe()
        return True
    except Exception:  # an installed but broken wheel counts as absent
        return False


def _probe_fa3():
    import flash_attn_interface

    if not hasattr(flash_attn_interface, "flash_attn_varlen_func"):
        raise ImportError("flash_attn_interface has no flash_attn_varlen_func")
    if torch.cuda.get_device_capability()[0] != 9:
        raise RuntimeError("FlashAttention-3 kernels are built for Hopper (sm90)")


def _probe_fa4():
    # The custom ops call flash-attn-4's private forward / backward entry points (its public function is an
    # autograd Function dynamo cannot trace); a release that renamed what they need counts as absent.
    fa = _fa4_interface()
    need = {"_flash_attn_fwd": {"cu_seqlens_q", "max_seqlen_q", "window_size_left", "return_lse"},
            "_flash_attn_bwd": {"cu_seqlens_q", "max_seqlen_q", "window_size_left"}}
    for fn, params in need.items():
        missing = params - set(inspect.signature(getattr(fa, fn)).parameters)
        if missing:
            raise ImportError(f"flash_attn.cute.interface.{fn} lacks {sorted(missing)}")
    if torch.cuda.get_device_capability()[0] not in (9, 10):
        raise RuntimeError("flash-attn-4 targets Hopper and Blackwell")


def _probe_fa2():
    from flash_attn import flash_attn_varlen_func  # noqa: F401


def _probe_torch_varlen():
    if "window_size" not in _params_of("torch_varlen", _torch_varlen_func):
        raise RuntimeError("sliding windows need varlen_attn's window_size (torch >= 2.10)")


_PROBES = {
    "flash_attn_4": _probe_fa4,
    "flash_attn_3": _probe_fa3,
    "flash_attn_2": _probe_fa2,
    "torch_varlen": _probe_torch_varlen,
}


@functools.cache
def available_backends(device_type: str = "cuda") -> tuple[str, ...]:
    """Backends usable on this machine for tensors of `device_type`, best first (the fallback is always last)."""
    found = []
    if device_type == "cuda" and torch.cuda.is_available():
        found = [name for name in BACKENDS if name in _PROBES and _importable(_PROBES[name])]
    return tuple(found) + ("sdpa_segments",)


def _check_name(name: str) -> None:
    if name not in BACKENDS and name not in _OP_KERNELS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {BACKENDS}")


_CHOICES: dict[tuple[str, str | None], str] = {}


@torch.compiler.disable
def _choose(device_type: str, forced: str | None) -> str:
    if forced is not None:
        _check_name(forced)
        if forced in _GPU_ONLY and forced not in available_backends(device_type):
            raise RuntimeError(f"attention backend {forced!r} is not available for {device_type} tensors here")
        name = forced
    else:
        name = available_backends(device_type)[0]
    logger.info("attention backend for %s tensors: %s (available: %s)", device_type, name,
                ", ".join(available_backends(device_type)))
    _CHOICES[(device_type, forced)] = name
    return name


def select_backend(device_type: str) -> str:
    """The backend used for tensors on `device_type`: pinned by set_backend / FASTSFT_ATTENTION, else the best.

    Decided (and logged) once per device type; call it before torch.compile so tracing only reads a dict.
    """
    name = _CHOICES.get((device_type, _forced_backend))
    return name if name is not None else _choose(device_type, _forced_backend)


def set_backend(name: str | None) -> None:
    """Pin the attention backend (None: choose by capability). Meant for benchmarks and tests, before compiling."""
    global _forced_backend
    if name is not None:
        _check_name(name)
    _forced_backend = name


_HALF = (torch.bfloat16, torch.float16)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                     window: int = -1, backend: str | None = None, covered: bool = False) -> torch.Tensor:
    """Causal attention inside each segment of a packed token stream.

    q: (N, H, D); k, v: (N, Hkv, D) with H % Hkv == 0 (grouped-query attention); cu_seqlens: (S+1,) int32 segment
    starts over the N tokens, padded by repeating the total; max_seqlen: an upper bound on segment length (pass a
    constant such as the row length to keep compiled graphs static); window: left window, < 0 for none;
    backend: one of BACKENDS (or a registered OpKernels name), None for select_backend's choice.
    Returns (N, H, D) in q's dtype. Tokens at or past cu_seqlens[-1] belong to no segment and come back as zeros,
    their gradients too; covered=True promises there are none (cu_seqlens[-1] == N), and nothing is zeroed.
    """
    if q.ndim != 3 or k.ndim != 3 or v.ndim != 3:
        raise ValueError(f"varlen_attention wants (N, H, D) tensors, got q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2] or q.shape[1] % k.shape[1]:
        raise ValueError(f"varlen_attention shapes disagree: q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)} (need equal N and D, and H divisible by Hkv)")
    if cu_seqlens.dtype != torch.int32:
        raise ValueError(f"cu_seqlens must be int32 (flash-attention's layout), got {cu_seqlens.dtype}")
    name = backend or select_backend(q.device.type)
    op_kernels = _OP_KERNELS.get(name)
    if op_kernels is None:
        _check_name(name)
    device_types = op_kernels.device_types if op_kernels is not None else (
        ("cuda",) if name in _GPU_ONLY else (q.device.type,))
    if q.device.type not in device_types:
        raise RuntimeError(f"attention backend {name!r} needs CUDA tensors, got {q.device}")
    if window >= max_seqlen - 1:
        window = -1  # the window covers every segment: plain causal takes the kernels' fastest path
    out_dtype = q.dtype
    half_only = op_kernels.half_only if op_kernels else name in _GPU_ONLY
    if half_only and q.dtype not in _HALF:
        q = q.bfloat16()  # flash kernels run in 16-bit only
    k, v = k.to(q.dtype), v.to(q.dtype)
    if op_kernels is not None:
        y, _lse = varlen_attn_fwd(q, k, v, cu_seqlens, max_seqlen, window, name, covered)  # zeroes the tail itself
        return y.to(out_dtype)
    zero_tail = name in _GPU_ONLY and not covered
    if zero_tail and torch.is_grad_enabled():
        q, k, v = (_ZeroTailGrad.apply(t, cu_seqlens) for t in (q, k, v))
    y = _IMPLS[name](q, k, v, cu_seqlens, max_seqlen, window)
    if zero_tail:
        # Kernels leave tokens past the last segment (unused tail of the stream) uninitialized; a NaN there would
        # poison weight gradients through 0 * NaN, so zero them. Cheap, static-shaped, no host sync.
        y = torch.where(_covered(cu_seqlens, q.shape[0]), y, 0)
    return y.to(out_dtype)
