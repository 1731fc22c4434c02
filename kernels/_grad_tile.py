"""One Triton launch for pass B's logits tile of linear_cross_entropy: G = dCE/dlogits over a vocabulary slice.

Pass B walks the vocabulary in chunks [v0, v1) and needs, for all M supervised rows, the gradient of the loss with
respect to those logits, given the log-sum-exp that pass A found: G = softcap' * (exp(cap(h @ W[v0:v1]^T) - lse) -
onehot(target)). With the lse known, that is elementwise in the logits, so it is the epilogue of the matmul itself:
no logits tile written and read back, and one launch where cuBLAS + the row kernel took two (pass B is host-bound
at M = 16H, where it runs a few hundred chunks; bench/RESULTS.md).

The logits are rounded to the input dtype before the epilogue, as the cuBLAS path stores them, so both paths share
the numerics of the row kernel (kernels/_ce_rows.py): the same softcap, the same rule for ignored rows (gradient 0).
"""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._ce_rows import softmax_grad
from ._multi_tensor import interpreter_enabled

# GPU tile: 128 x BLOCK_N x 64, BLOCK_N 128 for chunks that wide, else the next power of two (>= 16) of the width.
# H200, triton 3.6, tile 16384 x 512 x 1024 (bench/RESULTS.md): 0.047 ms (366 TFLOP/s) against 0.044 for cuBLAS's
# matmul (569 TFLOP/s) + the row kernel; 8 warps with BLOCK_N 256 the same. Operands through host-made TMA
# descriptors ran the tile in 0.040 ms but cost ~50 us more host time per launch, which the host-bound pass B pays.
@dataclass(frozen=True)
class GradTileLaunch:
    """The GPU launch shape of grad_tile; the default is the measured best above. Benchmarks pass variants to
    grad_tile(launch=...) instead of changing module state."""

    block_m: int = 128
    block_k: int = 64
    max_block_n: int = 128
    num_warps: int = 4
    num_stages: int = 3


DEFAULT_LAUNCH = GradTileLaunch()
# Under the interpreter: small tiles so tests cover partial tiles and the K loop.
INTERPRETED_BLOCKS = (16, 16, 16)


@triton.jit
def _grad_epilogue(acc, offs_m, offs_n, row_ok, col_ok, out_ptr, stride_out, tgt_ptr, idx_ptr, lse_ptr, scale_ptr,
                   v0, softcap, HAS_SOFTCAP: tl.constexpr, HAS_INDEX: tl.constexpr):
    """The row kernel's gradient rule on an fp32 (BLOCK_M, BLOCK_N) logits tile, stored into out."""
    if HAS_INDEX:
        src = tl.load(idx_ptr + offs_m, mask=row_ok, other=0).to(tl.int64)
        tgt = tl.load(tgt_ptr + src, mask=row_ok, other=-1)
    else:
        tgt = tl.load(tgt_ptr + offs_m, mask=row_ok, other=-1)
    lse = tl.load(lse_ptr + offs_m, mask=row_ok, other=0.0)
    scale = tl.load(scale_ptr).to(tl.float32)
    x = acc.to(out_ptr.dtype.element_ty).to(tl.float32)  # the logits as a matmul would have stored them
    g = softmax_grad(x, lse[:, None], (v0 + offs_n)[None, :] == tgt[:, None], (tgt >= 0)[:, None], scale, softcap,
                     HAS_SOFTCAP)
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_out + offs_n[None, :]
    tl.store(out_ptrs, g.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


# M (supervised rows) and v0 (a vocabulary chunk's start, scheduled from M) come from the data: not specialized, so
# a new value does not compile the kernel again mid-run (see kernels/_scatter_rows.py). W (and stride_out, the
# same) bound the stores, where divisibility by 16 lets them vectorize: kept. The schedule's widths are multiples
# of 16 wherever the vocabulary is (vocab_chunks rounds narrow chunks so), so they keep one specialization.
@triton.jit(do_not_specialize=["M", "v0"])
def _grad_tile_kernel(
    h_ptr, stride_h,  # (M, K) gathered hidden rows
    w_ptr, stride_w,  # (V, K) weight; columns v0.. of the logits are its rows v0..
    out_ptr, stride_out,  # (M, W) gradient tile
    tgt_ptr, idx_ptr,  # targets, and row index into them when HAS_INDEX
    lse_ptr,  # (M,) fp32
    scale_ptr,  # () fp32 upstream gradient
    M, W, K, v0, softcap,
    HAS_SOFTCAP: tl.constexpr,
    HAS_INDEX: tl.constexpr,
    UPCAST: tl.constexpr,  # the interpreter's bf16 arithmetic is wrong: fp32 operands there
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (a plain fp32 matmul, torch's default, not tf32); None:
    # Triton's default, as measured, for 16-bit inputs
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # Column tiles of one row block run next to each other, so the (BLOCK_M, K) rows are read from L2 after the
    # first: the weight slice is small, the gathered rows are not.
    n_tiles_n = tl.cdiv(W, BLOCK_N)
    pid = tl.program_id(0)
    pid_m = pid // n_tiles_n
    pid_n = pid % n_tiles_n
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    row_ok = offs_m < M
    col_ok = offs_n < W
    a_ptrs = h_ptr + offs_m.to(tl.int64)[:, None] * stride_h + offs_k[None, :]  # (BLOCK_M, BLOCK_K)
    b_ptrs = w_ptr + (v0 + offs_n).to(tl.int64)[None, :] * stride_w + offs_k[:, None]  # (BLOCK_K, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        k_ok = offs_k + k < K
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    _grad_epilogue(acc, offs_m, offs_n, row_ok, col_ok, out_ptr, stride_out, tgt_ptr, idx_ptr, lse_ptr, scale_ptr,
                   v0, softcap, HAS_SOFTCAP, HAS_INDEX)


def grad_tile(h, weight, v0, v1, targets, lse, grad_scale, out, *, softcap=None, row_index=None,
              launch: GradTileLaunch = DEFAULT_LAUNCH):
    """out (M, v1 - v0) = dCE/dlogits of logits h @ weight[v0:v1]^T for rows with log-sum-exp `lse` (M,) fp32.

    h (M, K) and weight (V, K) with unit column stride; targets (M,), or any length with row_index (M,) giving row
    i's position in it; grad_scale () fp32 on the device; out may be any (M, v1 - v0) view with unit column stride.
    launch: the GPU tile shape (the interpreter always uses its small INTERPRETED_BLOCKS).
    """
    m, k = h.shape
    width = v1 - v0
    if m == 0 or width == 0:
        return
    if h.stride(1) != 1 or weight.stride(1) != 1 or out.stride(1) != 1:
        raise ValueError("grad_tile: h, weight and out need unit column stride")
    interpreted = interpreter_enabled()
    if interpreted:
        block_m, block_n, block_k = INTERPRETED_BLOCKS
        warps, stages = 4, 1
    else:
        block_m, block_k = launch.block_m, launch.block_k
        block_n = min(launch.max_block_n, max(16, triton.next_power_of_2(width)))
        warps, stages = launch.num_warps, launch.num_stages
    grid = (triton.cdiv(m, block_m) * triton.cdiv(width, block_n),)
    _grad_tile_kernel[grid](
        h, h.stride(0), weight, weight.stride(0), out, out.stride(0),
        targets, row_index if row_index is not None else targets, lse, grad_scale,
        m, width, k, v0, float(softcap) if softcap is not None else 1.0,
        HAS_SOFTCAP=softcap is not None, HAS_INDEX=row_index is not None, UPCAST=interpreted,
        DOT_PRECISION="ieee" if h.dtype == torch.float32 else None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages,
    )
