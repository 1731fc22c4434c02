"""The gradient of the fused fp8 projection's output qkv, written whole by one kernel from attention's dq, dk, dv.

Why: with fp8 the model takes q, k and v from one matmul (fastsft/model.py, `_QKVProjection`, with `maxima`), and
rotates and norms q and k keeping only the normed output and 1/rms. Autograd's backward for that ran the norm's
backward, its mean(dy * y) as a reduction of its own, and the concatenation of dq, dk and dv into the (N, 3840)
gradient of qkv as separate passes: 7.1 ms of a d20 step, all bound by memory (bench/RESULTS.md, run 12). Here each
program reads its rows of one head's gradient and normed output once and writes its columns of dqkv in place: 0.68
GB a d20 layer. On an H200 it takes 0.17 ms (4.0 TB/s) where inductor's code for the same math took 0.41, and the
d20 fp8 step fell from 178.2 to 174.7 ms (bench/RESULTS.md, run 13).

The math, per row and head of q and of k (out = scale * y the forward's output, y = r * rstd, r = rotary(x)):
    dy = scale * grad, dr = rstd * (dy - y * mean(dy * y))           the norm's backward
    dx1 = dr1 cos - dr2 sin, dx2 = dr1 sin + dr2 cos                  rotary's, inverted (x1, x2 the halves)
in fp32 from cos and sin in qkv's dtype (as the forward's rotary took them), rounded once to qkv's dtype at the
end; v's columns are dv copied. Registered as a torch custom op, so torch.compile calls it as one opaque
kernel. It runs on CUDA; the CPU takes the same math in torch ops (`qkv_grad_reference`), and the tests run the
kernel on the CPU under the interpreter through `launch=`.

With `maxima=True` it also returns max |dqkv| of the values as stored (rounded to dqkv's dtype), folded into
MAX_SLOTS int32 slots: each program takes its tile's maximum as the bits of a non-negative float (which order as
ints do; a NaN as NAN_BITS, above inf's, so a non-finite dqkv gives a NaN or inf maximum, as torch's amax) and
atomic-maxes it into slot (program id mod MAX_SLOTS). The fp8 projection's backward casts dqkv to e5m2 from those
slots (kernels/fp8_relu_square_grad.py, `quantize_two_layouts`), so dqkv's maximum costs no pass of its own.
"""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._multi_tensor import interpreter_enabled, tl_dtype
from .fp8_relu_square_grad import MAX_SLOTS, _abs_bits, _round_to, max_slots_reference


@dataclass(frozen=True)
class QKVGradLaunch:
    """One fixed launch (tests, benchmarks); left unset, the kernel takes the best of CONFIGS for the shape."""

    block_m: int = 32  # rows of one head a program
    num_warps: int = 4


INTERPRETED_LAUNCH = QKVGradLaunch(8, 1)  # partial row blocks on the tests' odd sizes

# Rows a program and warps; on the H200 16 to 64 rows ran within 2% of each other and 128 rows 20% slower
CONFIGS = [triton.Config(dict(BLOCK_M=block_m), num_warps=warps)
           for block_m, warps in ((16, 4), (32, 4), (64, 8), (128, 8))]


def scaled_norm_backward(grad: torch.Tensor, out: torch.Tensor, rstd: torch.Tensor, scale: float) -> torch.Tensor:
    """dx of out = scale * x * rstd (rstd = 1/rms(x) over the last dim) from the output and rstd, in rstd's dtype."""
    y, dy = out.to(rstd.dtype) / scale, grad.to(rstd.dtype) * scale
    return rstd * (dy - y * (dy * y).mean(-1, keepdim=True))


def qkv_grad_reference(dq, dk, dv, q, k, q_rstd, k_rstd, cos, sin, scale):
    """(M, (H + 2 Hkv) D) in dq's dtype: the kernel's definition in torch ops. dq, q (M, H, D), dk, dv, k (M, Hkv, D),
    q_rstd (M, H, 1), k_rstd (M, Hkv, 1), cos and sin (M, 1, D/2), all but the rstds in one dtype."""
    dtype = dq.dtype
    cos, sin = cos.to(q_rstd.dtype), sin.to(q_rstd.dtype)

    def unrotated(grad, out, rstd):
        dr1, dr2 = scaled_norm_backward(grad, out, rstd, scale).chunk(2, dim=-1)
        return torch.cat([dr1 * cos - dr2 * sin, dr1 * sin + dr2 * cos], dim=-1).to(dtype)

    parts = [unrotated(dq, q, q_rstd), unrotated(dk, k, k_rstd), dv.to(dtype)]
    return torch.cat(parts, dim=1).reshape(dq.shape[0], -1)


@triton.jit
def _unrotated_grad(grad_ptr, y_ptr, rstd_ptr, cos_ptr, sin_ptr, out_at, head, r64, rows, cols, ok, M, scale,
                    HEADS: tl.constexpr, HALF: tl.constexpr, MANUAL_ROUNDING: tl.constexpr):
    """dx of one head of q or k (HEADS of them a row) for the rows r64, into out_at; returns the larger |.| of each
    stored pair as `_abs_bits`."""
    dtype = grad_ptr.dtype.element_ty
    at = (r64[:, None] * HEADS + head) * 2 * HALF + cols[None, :]
    dy1 = tl.load(grad_ptr + at, mask=ok, other=0.0).to(tl.float32) * scale
    dy2 = tl.load(grad_ptr + at + HALF, mask=ok, other=0.0).to(tl.float32) * scale
    y1 = tl.load(y_ptr + at, mask=ok, other=0.0).to(tl.float32) / scale
    y2 = tl.load(y_ptr + at + HALF, mask=ok, other=0.0).to(tl.float32) / scale
    rstd = tl.load(rstd_ptr + r64 * HEADS + head, mask=rows < M, other=0.0)[:, None]
    mean = ((tl.sum(dy1 * y1, axis=1) + tl.sum(dy2 * y2, axis=1)) / (2 * HALF))[:, None]
    dr1 = rstd * (dy1 - y1 * mean)
    dr2 = rstd * (dy2 - y2 * mean)
    trig = r64[:, None] * HALF + cols[None, :]
    cos = tl.load(cos_ptr + trig, mask=ok, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + trig, mask=ok, other=0.0).to(tl.float32)
    dx1 = _round_to(dr1 * cos - dr2 * sin, dtype, MANUAL_ROUNDING)
    dx2 = _round_to(dr1 * sin + dr2 * cos, dtype, MANUAL_ROUNDING)
    tl.store(out_at, dx1.to(dtype), mask=ok)
    tl.store(out_at + HALF, dx2.to(dtype), mask=ok)
    return tl.maximum(_abs_bits(dx1), _abs_bits(dx2))


@triton.jit
def _qkv_grad_kernel(dq_ptr, dk_ptr, dv_ptr, q_ptr, k_ptr, q_rstd_ptr, k_rstd_ptr, cos_ptr, sin_ptr, out_ptr,
                     slots_ptr, M, scale, N_HEAD: tl.constexpr, N_KV_HEAD: tl.constexpr, HALF: tl.constexpr,
                     BLOCK_HALF: tl.constexpr, MAXIMA: tl.constexpr, SLOTS: tl.constexpr,
                     MANUAL_ROUNDING: tl.constexpr, BLOCK_M: tl.constexpr):
    """Program (j, i): rows i * BLOCK_M.. of dqkv's head j (q's heads, then k's, then v's). Heads vary fastest, so
    the programs of one row block run together and find cos and sin in L2. MAXIMA: also the tile's max |.| into
    slots_ptr (int32, zeroed before; unread without), at slot (program id mod SLOTS)."""
    j = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    r64 = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_HALF)  # a half of a head's columns: rotary pairs column c with c + HALF
    ok = (rows < M)[:, None] & (cols < HALF)[None, :]
    out_at = out_ptr + r64[:, None] * ((N_HEAD + 2 * N_KV_HEAD) * 2 * HALF) + j * 2 * HALF + cols[None, :]
    if j < N_HEAD:
        biggest = _unrotated_grad(dq_ptr, q_ptr, q_rstd_ptr, cos_ptr, sin_ptr, out_at, j, r64, rows, cols, ok, M,
                                  scale, N_HEAD, HALF, MANUAL_ROUNDING)
    elif j < N_HEAD + N_KV_HEAD:
        biggest = _unrotated_grad(dk_ptr, k_ptr, k_rstd_ptr, cos_ptr, sin_ptr, out_at, j - N_HEAD, r64, rows, cols,
                                  ok, M, scale, N_KV_HEAD, HALF, MANUAL_ROUNDING)
    else:
        v_at = dv_ptr + (r64[:, None] * N_KV_HEAD + (j - N_HEAD - N_KV_HEAD)) * 2 * HALF + cols[None, :]
        dv1 = tl.load(v_at, mask=ok)
        dv2 = tl.load(v_at + HALF, mask=ok)
        tl.store(out_at, dv1, mask=ok)
        tl.store(out_at + HALF, dv2, mask=ok)
        biggest = tl.maximum(_abs_bits(dv1.to(tl.float32)), _abs_bits(dv2.to(tl.float32)))
    if MAXIMA:
        # lanes past the last row or the head's columns hold whatever was loaded or computed there: 0 stands in
        biggest = tl.max(tl.max(tl.where(ok, biggest, 0), axis=1), axis=0)
        program = tl.program_id(1) * tl.num_programs(0) + j
        tl.atomic_max(slots_ptr + program % SLOTS, biggest, sem="relaxed")  # read by the next launch


_qkv_grad_tuned = triton.autotune(CONFIGS, key=["M", "N_HEAD", "N_KV_HEAD", "HALF", "MAXIMA"])(_qkv_grad_kernel)


def _launch(dq, dk, dv, q, k, q_rstd, k_rstd, cos, sin, scale, maxima, launch):
    """(dqkv, its slots or an empty tensor); launch None: the best of CONFIGS for the shape (autotuned); a
    QKVGradLaunch: that one."""
    tl_dtype(dq.dtype, "qkv_grad")
    M, n_head, head_dim = dq.shape
    n_kv_head = dk.shape[1]
    out = torch.empty((M, (n_head + 2 * n_kv_head) * head_dim), dtype=dq.dtype, device=dq.device)
    # zeroed once: the autotuner's repeated runs fold the same maxima again, which leaves them as they are
    slots = torch.zeros(MAX_SLOTS if maxima else 0, dtype=torch.int32, device=dq.device)
    interpreted = interpreter_enabled() and dq.device.type == "cpu"
    launch = INTERPRETED_LAUNCH if interpreted else launch
    grid = lambda meta: (n_head + 2 * n_kv_head, triton.cdiv(M, meta["BLOCK_M"]))  # noqa: E731
    args = (dq, dk, dv, q, k, q_rstd, k_rstd, cos, sin, out, slots if maxima else out, M, scale)
    meta = dict(N_HEAD=n_head, N_KV_HEAD=n_kv_head, HALF=head_dim // 2,
                BLOCK_HALF=triton.next_power_of_2(head_dim // 2), MAXIMA=maxima, SLOTS=MAX_SLOTS,
                MANUAL_ROUNDING=interpreted)
    if launch is None:
        _qkv_grad_tuned[grid](*args, **meta)
    else:
        _qkv_grad_kernel[grid](*args, **meta, BLOCK_M=launch.block_m, num_warps=launch.num_warps)
    return out, slots


def _check(dq, dk, dv, q, k, q_rstd, k_rstd, cos, sin):
    M, n_head, head_dim = dq.shape
    n_kv_head = dk.shape[1]
    shapes = {"dq": (dq, (M, n_head, head_dim)), "q": (q, (M, n_head, head_dim)), "dk": (dk, (M, n_kv_head, head_dim)),
              "k": (k, (M, n_kv_head, head_dim)), "dv": (dv, (M, n_kv_head, head_dim)),
              "q_rstd": (q_rstd, (M, n_head, 1)), "k_rstd": (k_rstd, (M, n_kv_head, 1)),
              "cos": (cos, (M, 1, head_dim // 2)), "sin": (sin, (M, 1, head_dim // 2))}
    for name, (t, shape) in shapes.items():
        if tuple(t.shape) != shape or not t.is_contiguous():
            raise ValueError(f"qkv_grad: {name} must be contiguous of shape {shape}, got {tuple(t.shape)} "
                             f"{t.stride()}")
    if head_dim % 2 or {dk.dtype, dv.dtype, q.dtype, k.dtype, cos.dtype, sin.dtype} != {dq.dtype} or \
            k_rstd.dtype != q_rstd.dtype:
        raise ValueError(f"qkv_grad: an even head_dim (got {head_dim}), one dtype for dq, dk, dv, q, k, cos and sin, "
                         f"one for the rstds")


@torch.library.custom_op("fastsft::qkv_grad", mutates_args=())
def _qkv_grad_op(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                 q_rstd: torch.Tensor, k_rstd: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, scale: float,
                 maxima: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if dq.is_cuda:
        return _launch(dq, dk, dv, q, k, q_rstd, k_rstd, cos, sin, scale, maxima, None)
    out = qkv_grad_reference(dq, dk, dv, q, k, q_rstd, k_rstd, cos, sin, scale)
    return out, (max_slots_reference(out) if maxima else out.new_empty(0, dtype=torch.int32))


@_qkv_grad_op.register_fake
def _(dq, dk, dv, q, k, q_rstd, k_rstd, cos, sin, scale, maxima):
    M, n_head, head_dim = dq.shape
    return (dq.new_empty((M, (n_head + 2 * dk.shape[1]) * head_dim)),
            dq.new_empty(MAX_SLOTS if maxima else 0, dtype=torch.int32))


def qkv_grad(dq, dk, dv, q, k, q_rstd, k_rstd, cos, sin, scale: float, *, maxima: bool = False,
             launch: QKVGradLaunch | None = None):
    """dqkv (M, (H + 2 Hkv) D) in dq's dtype from attention's dq (M, H, D), dk and dv (M, Hkv, D), the normed q and k
    the forward returned, their 1/rms (M, H or Hkv, 1) and the rotary cos and sin (M, 1, D/2) in dq's dtype, as the
    forward's rotary took them; all contiguous (the math: the module docstring). maxima: (dqkv, slots), slots
    max |dqkv| folded into (MAX_SLOTS,) int32 for `quantize_two_layouts`. `launch` runs the kernel with that launch
    (benchmarks, and the tests under the interpreter); the default goes through the custom op."""
    _check(dq, dk, dv, q, k, q_rstd, k_rstd, cos, sin)
    if launch is not None:
        out, slots = _launch(dq, dk, dv, q, k, q_rstd, k_rstd, cos, sin, scale, maxima, launch)
    else:
        out, slots = _qkv_grad_op(dq, dk, dv, q, k, q_rstd, k_rstd, cos, sin, scale, maxima)
    return (out, slots) if maxima else out
