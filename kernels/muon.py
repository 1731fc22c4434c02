"""Muon for the 2D matrices of the transformer: Nesterov momentum, then orthogonalization of the update, then a
shape-scaled step. Same-shape matrices are stacked so that one batched orthogonalization serves them all.

Why this file: nanochat runs Muon as one torch.compile'd graph per shape group; most of its time is the bf16
matmuls of the orthogonalization, the rest is elementwise traffic (stacking grads, momentum, casts, the norm,
the update, copying the stack back into the parameters). Here:
    1. momentum (Triton, one launch per stack, gradients read in place through an address table):
       buf <- lerp(buf, g, 1 - mu); u = lerp(g, buf, mu) (Nesterov) or buf; X = bf16(u) in the parameters' own
       layout; and per-block sums of X^2 for the Frobenius norm (summed deterministically, no atomics).
    2. orthogonalization: the symmetric products A = X X^T and A A come from a Triton kernel that computes only
       the tiles on and below the diagonal and mirrors them (about half their FLOPs; they are 2/3 of a step's
       FLOPs for square matrices, 5/9 for 1:4 ones), with B' = b A + c A A + a I formed in its epilogue, so that
       X <- a X + B X is one plain cuBLAS bmm X <- B' X (a bmm without the added operand: ~1.5x faster than
       baddbmm here). A tall stack iterates on X^T through strides and operand order, never through a
       transposed copy. The 1/||X|| normalization is folded into the first step's epilogues (no pass over X).
    3. apply (Triton, parameters written in place): p <- p - lr_eff * (O + wd * p * [O * p >= 0]).

Orthogonalization: Polar Express (Amsel et al. 2025), as nanochat uses since early 2026: five tuned (a, b, c)
triples reach singular values near 1 in 5 steps, where the classic quintic Newton-Schulz (3.4445, -4.7750,
2.0315) leaves them spread over roughly [0.7, 1.2]; both run in bf16 and cost the same, so the better
converging one is the default (`coefficients="newton_schulz"` selects the quintic).
Each step: A = X X^T; B = b A + c A A; X <- a X + B X, after X <- X / (1.02 ||X||_F + 1e-6).

Scaling (nanochat's rule): the learning rate of an (rows, cols) matrix is lr * sqrt(max(1, rows / cols)).
Weight decay is nanochat's cautious decay: only where the update and the parameter agree in sign.
Not included: nanochat's NorMuon variance reduction (factored second moment after the orthogonalization).

Skipping a step on the device (`step(skip=flag)`, a 0-dim bool / integer tensor, nonzero: skip): the momentum
kernel still fills the workspace and the orthogonalization runs on it, but the momentum buffer is not stored and
the apply kernel's programs load the flag and write nothing, so parameters and buffers stay bit for bit. The flag
is never read on the host (that read would be the sync it exists to avoid); adamw.py has the same flag.

DDP seam: `muon_update_stacked` is the whole update of one same-shape stack as a function of its lists of
parameters and gradients; a distributed version assigns stacks (or slices of stacks) to ranks and all-gathers.
"""

import torch
import triton
import triton.language as tl

from ._multi_tensor import (ALIGN_BYTES, check_skip, device_table, interpreter_enabled, params_with_grads,
                            round_to_bf16, runs_triton, table_pointers, tl_dtype)
from .paths import REFERENCE, TRITON, record

POLAR_EXPRESS_COEFFICIENTS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
NEWTON_SCHULZ_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NORM_SAFETY = 1.02  # keeps the top singular value below 1 despite bf16 rounding of the normalized X
NORM_EPS = 1e-6

_GPU_BLOCK = 4096
_GPU_WARPS = 4
# Under the interpreter a program costs ~1 ms whatever its size (numpy does the elements), so few big blocks.
_INTERPRETER_BLOCK = 1 << 14
# Gram kernel tiles, best of 7 configs on the H100 (bench/RESULTS.md): 3-5 stages or 4 warps are within 1%;
# 64-wide tiles cost 1.2x, a 128-deep k-step 1.15x. tl.dot needs tiles of at least 16.
_GPU_GRAM_TILE = 128
_GPU_GRAM_BK = 64
_GPU_GRAM_WARPS = 8
_GPU_GRAM_STAGES = 3
_INTERPRETER_GRAM_TILE = 16


def ns_coefficients(name: str, ns_steps: int) -> tuple:
    """The (a, b, c) triple of each orthogonalization step."""
    if not isinstance(ns_steps, int) or ns_steps < 1:
        raise ValueError(f"Muon: ns_steps must be a positive int, got {ns_steps!r}")
    if name == "polar_express":
        if ns_steps > len(POLAR_EXPRESS_COEFFICIENTS):
            raise ValueError(f"Muon: polar_express has {len(POLAR_EXPRESS_COEFFICIENTS)} tuned steps, "
                             f"got ns_steps={ns_steps}")
        return POLAR_EXPRESS_COEFFICIENTS[:ns_steps]
    if name == "newton_schulz":
        return (NEWTON_SCHULZ_COEFFICIENTS,) * ns_steps
    raise ValueError(f"Muon: coefficients must be 'polar_express' or 'newton_schulz', got {name!r}")


def lr_shape_scale(rows: int, cols: int) -> float:
    return max(1.0, rows / cols) ** 0.5


# --------------------------------------------------------------------------------------------------------------
# Reference: plain PyTorch, the same math on the same stacked layout (the bench torch.compiles it).


def orthogonalize_reference(G: torch.Tensor, coefficients) -> torch.Tensor:
    """Orthogonalize each matrix of G (K, rows, cols) in bf16; returns bf16 of G's shape."""
    X = G.bfloat16()
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT
    norm = X.float().norm(dim=(-2, -1), keepdim=True)  # (K, 1, 1)
    X = (X.float() * (1.0 / (norm * NORM_SAFETY + NORM_EPS))).bfloat16()
    for a, b, c in coefficients:
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    return X.mT if tall else X


def muon_reference_step(params, grads, momentum_buffer, *, lr, momentum, nesterov, coefficients, weight_decay,
                        skip=None):
    """One Muon step of a list of same-shape matrices; momentum_buffer (K, rows, cols) fp32 is updated in place.

    `skip` (a 0-dim bool / integer tensor, nonzero: leave parameters and buffer as they were) is applied with
    torch.where, without reading it on the host.
    """
    rows, cols = params[0].shape
    G = torch.stack(grads).float()  # (K, rows, cols)
    buf = momentum_buffer.lerp(G, 1 - momentum)
    U = G.lerp(buf, momentum) if nesterov else buf
    O = orthogonalize_reference(U, coefficients).float()
    P_old = torch.stack(params)  # (K, rows, cols), the parameters' dtype
    P = P_old.float()
    cautious = (O * P >= 0).float()
    P = (P - lr * lr_shape_scale(rows, cols) * (O + weight_decay * P * cautious)).to(P_old.dtype)
    if skip is not None:
        keep = skip == 0
        buf, P = torch.where(keep, buf, momentum_buffer), torch.where(keep, P, P_old)
    momentum_buffer.copy_(buf)
    torch._foreach_copy_(list(params), list(P.unbind(0)))


# --------------------------------------------------------------------------------------------------------------
# Triton kernels. Elementwise kernels: grid (blocks of one matrix, K matrices), each matrix a contiguous run of
# rows * cols elements. Gram kernel: grid (lower-triangle tile pairs, K matrices).


@triton.jit
def _muon_momentum_kernel(
    grad_table_ptr,  # (K,) int64 addresses of the gradients, each numel contiguous elements
    buf_ptr,  # (K, numel) fp32 momentum buffers
    x_ptr,  # (K, numel) bf16 out: the update before normalization
    partial_ptr,  # (K, blocks) fp32 out: sum of X^2 over each block
    skip_ptr,  # () bool or integer: nonzero leaves buf as it was (read only when HAS_SKIP)
    momentum,
    numel,
    GRAD_DTYPE: tl.constexpr,
    NESTEROV: tl.constexpr,
    HAS_SKIP: tl.constexpr,
    MANUAL_ROUNDING: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    blk = tl.program_id(0)
    k = tl.program_id(1).to(tl.int64)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    base = k * numel
    g_ptrs = table_pointers(grad_table_ptr + k, offs, GRAD_DTYPE, ALIGNED, BLOCK)
    full = (blk + 1) * BLOCK <= numel
    mask = offs < numel
    if full:  # unmasked accesses vectorize; only a matrix's last block is masked
        g = tl.load(g_ptrs).to(tl.float32)
        buf = tl.load(buf_ptr + base + offs)
    else:
        g = tl.load(g_ptrs, mask=mask, other=0.0).to(tl.float32)
        buf = tl.load(buf_ptr + base + offs, mask=mask, other=0.0)
    buf = buf + (1.0 - momentum) * (g - buf)
    if NESTEROV:
        u = g + momentum * (buf - g)
    else:
        u = buf
    x = round_to_bf16(u, MANUAL_ROUNDING)
    xf = x.to(tl.float32)  # masked lanes are 0: they add nothing to the norm
    tl.store(partial_ptr + k * tl.num_programs(0) + blk, tl.sum(xf * xf, axis=0))
    # Skipped step: X and the norm (workspace) are still written, the momentum buffer (state) is not.
    if HAS_SKIP:
        store_buf = tl.load(skip_ptr) == 0
    else:
        store_buf = True
    if full:
        if store_buf:
            tl.store(buf_ptr + base + offs, buf)
        tl.store(x_ptr + base + offs, x)
    else:
        if store_buf:
            tl.store(buf_ptr + base + offs, buf, mask=mask)
        tl.store(x_ptr + base + offs, x, mask=mask)


@triton.jit
def _muon_apply_kernel(
    param_table_ptr,  # (K,) int64 addresses of the parameters, each numel contiguous elements
    o_ptr,  # (K, numel) bf16 orthogonalized update
    skip_ptr,  # () bool or integer: nonzero skips the step (read only when HAS_SKIP)
    lr,  # already scaled by sqrt(max(1, rows / cols))
    weight_decay,
    numel,
    PARAM_DTYPE: tl.constexpr,
    IS_BF16: tl.constexpr,
    HAS_SKIP: tl.constexpr,
    MANUAL_ROUNDING: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # A set skip flag: the program reads and writes nothing (the parameters stay bit for bit).
    if HAS_SKIP:
        run = tl.load(skip_ptr) == 0
    else:
        run = True
    if run:
        blk = tl.program_id(0)
        k = tl.program_id(1).to(tl.int64)
        offs = blk * BLOCK + tl.arange(0, BLOCK)
        base = k * numel
        p_ptrs = table_pointers(param_table_ptr + k, offs, PARAM_DTYPE, ALIGNED, BLOCK)
        full = (blk + 1) * BLOCK <= numel
        mask = offs < numel
        if full:
            p = tl.load(p_ptrs).to(tl.float32)
            o = tl.load(o_ptr + base + offs).to(tl.float32)
        else:
            p = tl.load(p_ptrs, mask=mask, other=0.0).to(tl.float32)
            o = tl.load(o_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        decay = tl.where(o * p >= 0, weight_decay * p, 0.0)  # cautious: only where update and parameter agree
        p = p - lr * (o + decay)
        if IS_BF16:
            p_out = round_to_bf16(p, MANUAL_ROUNDING)
        else:
            p_out = p.to(PARAM_DTYPE)
        if full:
            tl.store(p_ptrs, p_out)
        else:
            tl.store(p_ptrs, p_out, mask=mask)


@triton.jit
def _gram_kernel(
    x_ptr,  # (K, ...) bf16: row r, column l of matrix k at k * stride_b + r * stride_r + l * stride_l
    d_ptr,  # (K, M, M) bf16 symmetric, added times beta when HAS_D
    out_ptr,  # (K, M, M) bf16 out
    scale_ptr,  # (K,) fp32 per-matrix factor when HAS_SCALE
    pairs_ptr,  # (pairs, 2) int32 tile coordinates (i, j), i >= j
    M,
    L,
    stride_b,
    stride_r,
    stride_l,
    alpha,
    beta,
    diag,
    HAS_D: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_DIAG: tl.constexpr,
    EVEN: tl.constexpr,
    FP32_DOT: tl.constexpr,
    MANUAL_ROUNDING: tl.constexpr,
    BM: tl.constexpr,
    BK: tl.constexpr,
):
    """out = scale_k * (alpha X X^T + beta D + diag I). The result is symmetric, so only tiles on and below the
    diagonal are computed; each off-diagonal tile is stored twice (as itself and transposed)."""
    pair = tl.program_id(0)
    k = tl.program_id(1).to(tl.int64)
    ti = tl.load(pairs_ptr + 2 * pair)
    tj = tl.load(pairs_ptr + 2 * pair + 1)
    ri = ti * BM + tl.arange(0, BM)
    rj = tj * BM + tl.arange(0, BM)
    ls = tl.arange(0, BK)
    a_ptrs = x_ptr + k * stride_b + ri[:, None] * stride_r + ls[None, :] * stride_l  # (BM, BK)
    b_ptrs = x_ptr + k * stride_b + rj[:, None] * stride_r + ls[None, :] * stride_l  # (BM, BK)
    acc = tl.zeros((BM, BM), dtype=tl.float32)
    for l0 in range(0, L, BK):
        if EVEN:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            in_l = (l0 + ls)[None, :] < L
            a = tl.load(a_ptrs, mask=(ri[:, None] < M) & in_l, other=0.0)
            b = tl.load(b_ptrs, mask=(rj[:, None] < M) & in_l, other=0.0)
        if FP32_DOT:  # the interpreter's bf16 arithmetic is wrong; fp32 products of bf16 inputs are exact
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, tl.trans(b), acc)
        a_ptrs += BK * stride_l
        b_ptrs += BK * stride_l

    offs = ri[:, None] * M + rj[None, :]  # (BM, BM)
    mask = (ri[:, None] < M) & (rj[None, :] < M)
    acc = acc * alpha
    if HAS_D:
        if EVEN:
            d = tl.load(d_ptr + k * M * M + offs).to(tl.float32)
        else:
            d = tl.load(d_ptr + k * M * M + offs, mask=mask, other=0.0).to(tl.float32)
        acc += beta * d
    if HAS_DIAG:
        acc = tl.where(ri[:, None] == rj[None, :], acc + diag, acc)
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + k)
    out = round_to_bf16(acc, MANUAL_ROUNDING)
    o_base = out_ptr + k * M * M
    if EVEN:
        tl.store(o_base + offs, out)
    else:
        tl.store(o_base + offs, out, mask=mask)
    if ti != tj:
        offs_t = rj[:, None] * M + ri[None, :]
        if EVEN:
            tl.store(o_base + offs_t, tl.trans(out))
        else:
            tl.store(o_base + offs_t, tl.trans(out), mask=(rj[:, None] < M) & (ri[None, :] < M))


class MuonWorkspace:
    """Buffers of one stack's orthogonalization, for one step at a time: Muon releases them after the stack's
    update (release()) and muon_update_stacked takes them again (acquire()) from torch's caching allocator, which
    hands back the memory the backward's activations have just left. Kept between steps they sat under the
    forward's peak (2.2 GiB at d20). The address tables stay; they are re-uploaded only if an address changes.

    X keeps the parameters' own (K, rows, cols) layout; a tall stack (rows > cols) iterates on its transpose
    through strides and operand order, never through a transposed copy: A = X^T X, X <- X B'.
    `gram` picks who computes the symmetric products X X^T and A A: "triangle" (the Triton kernel above, the
    default on CUDA) or "bmm" (the reference's order of operations with torch.bmm / baddbmm on full matrices: the
    measured alternative, and the default on the CPU, where the interpreter is slow; tests ask for "triangle").
    """

    def __init__(self, K, rows, cols, device, gram=None, gram_tile=None, gram_bk=None, gram_warps=None,
                 gram_stages=None):
        if gram is None:  # the interpreter runs a Gram program in ~20 ms: CPU tests take torch's bmm unless asked
            gram = "triangle" if torch.device(device).type == "cuda" else "bmm"
        if gram not in ("triangle", "bmm"):
            raise ValueError(f"MuonWorkspace: gram must be 'triangle' or 'bmm', got {gram!r}")
        self.K, self.rows, self.cols = K, rows, cols
        self.device = torch.device(device)
        self.tall = rows > cols
        self.x = self.x_next = self.a = self.b = None
        self.acquire()
        self.gram = gram
        self.set_gram_config(gram_tile, gram_bk, gram_warps, gram_stages)
        self._tables = {}  # name -> (addresses, device table, aligned): re-uploaded only when an address changes

    def set_gram_config(self, tile=None, bk=None, warps=None, stages=None):
        """Tile shape of the Gram kernel (None: the measured defaults below); rebuilds the tile-pair table."""
        interp = interpreter_enabled()
        self.gram_tile = tile or (_INTERPRETER_GRAM_TILE if interp else _GPU_GRAM_TILE)
        self.gram_bk = bk or (_INTERPRETER_GRAM_TILE if interp else _GPU_GRAM_BK)
        self.gram_warps = warps or _GPU_GRAM_WARPS
        self.gram_stages = stages or _GPU_GRAM_STAGES
        t = triton.cdiv(min(self.rows, self.cols), self.gram_tile)
        pairs = [(i, j) for i in range(t) for j in range(i + 1)]
        self.pairs = torch.tensor(pairs, dtype=torch.int32).to(self.device)  # (pairs, 2)

    def acquire(self) -> None:
        if self.x is None:
            m = min(self.rows, self.cols)
            self.x = torch.empty(self.K, self.rows, self.cols, dtype=torch.bfloat16, device=self.device)
            self.x_next = torch.empty_like(self.x)
            self.a = torch.empty(self.K, m, m, dtype=torch.bfloat16, device=self.device)  # (K, m, m)
            self.b = torch.empty_like(self.a)

    def release(self) -> None:
        self.x = self.x_next = self.a = self.b = None

    def table(self, name, addresses, device):
        cached = self._tables.get(name)
        if cached is None or cached[0] != addresses:
            aligned = all(a % ALIGN_BYTES == 0 for a in addresses)
            cached = (addresses, device_table(addresses, device), aligned)
            self._tables[name] = cached
        return cached[1], cached[2]


def gram_(ws: MuonWorkspace, x, out, *, gram_of_columns, alpha=1.0, beta=0.0, diag=None, d=None, scale=None):
    """out (K, m, m) <- scale_k * (alpha G + beta d + diag I), G = X X^T, or X^T X when gram_of_columns."""
    K = x.size(0)
    m = out.size(-1)
    if gram_of_columns:
        stride_r, stride_l, L = x.stride(2), x.stride(1), x.size(1)
    else:
        stride_r, stride_l, L = x.stride(1), x.stride(2), x.size(2)
    manual = interpreter_enabled()
    bm, bk = ws.gram_tile, ws.gram_bk
    _gram_kernel[(ws.pairs.size(0), K)](
        x, d if d is not None else out, out, scale if scale is not None else out, ws.pairs, m, L, x.stride(0),
        stride_r, stride_l, float(alpha), float(beta), float(diag or 0.0),
        HAS_D=d is not None, HAS_SCALE=scale is not None, HAS_DIAG=diag is not None,
        EVEN=m % bm == 0 and L % bk == 0, FP32_DOT=manual, MANUAL_ROUNDING=manual, BM=bm, BK=bk,
        num_warps=ws.gram_warps, num_stages=ws.gram_stages,
    )
    return out


def orthogonalize_(ws: MuonWorkspace, coefficients, scale=None) -> torch.Tensor:
    """Polar iteration on ws.x (K, rows, cols) bf16; returns the buffer holding the result.

    `scale` (K,) fp32 is the normalization 1 / (1.02 ||X||_F + eps) of each matrix, folded into the first step
    instead of a pass over X: A = s^2 X X^T, and X1 = a (sX) + B (sX) = (s (B + a I)) X. Every step forms
    B' = B + a I (symmetric, m x m) so the big product is a plain bmm: X <- B' X (wide) or X B' (tall).
    Without scale, ws.x must already be normalized.
    """
    x, x_next = ws.x, ws.x_next
    if ws.gram == "bmm" or not coefficients:
        record("muon_gram", "bmm")
        return _orthogonalize_bmm_(ws, coefficients, scale)
    record("muon_gram", "triangle")
    scale_sq = scale * scale if scale is not None else None
    for step, (a, b, c) in enumerate(coefficients):
        first = step == 0 and scale is not None
        gram_(ws, x, ws.a, gram_of_columns=ws.tall, scale=scale_sq if first else None)  # A = X X^T
        gram_(ws, ws.a, ws.b, gram_of_columns=False, alpha=c, beta=b, diag=a, d=ws.a,
              scale=scale if first else None)  # B' = b A + c A A + a I
        if ws.tall:
            torch.bmm(x, ws.b, out=x_next)  # (K, rows, m) @ (K, m, m); B' is symmetric
        else:
            torch.bmm(ws.b, x, out=x_next)  # (K, m, m) @ (K, m, cols)
        x, x_next = x_next, x
    return x


def _orthogonalize_bmm_(ws: MuonWorkspace, coefficients, scale=None) -> torch.Tensor:
    """The same iteration with full cuBLAS products and the reference's order of operations: a pass that
    normalizes X, then A = X X^T; B = b A + c A A; X <- a X + B X (linear combinations in the GEMM epilogues)."""
    x, x_next = ws.x, ws.x_next
    if scale is not None:
        x.mul_(scale.view(-1, 1, 1))
    for a, b, c in coefficients:
        if ws.tall:
            torch.bmm(x.mT, x, out=ws.a)  # A = X^T X
        else:
            torch.bmm(x, x.mT, out=ws.a)  # A = X X^T
        torch.baddbmm(ws.a, ws.a, ws.a, beta=b, alpha=c, out=ws.b)  # B = b A + c A A
        if ws.tall:
            torch.baddbmm(x, x, ws.b, beta=a, alpha=1.0, out=x_next)  # X <- a X + X B
        else:
            torch.baddbmm(x, ws.b, x, beta=a, alpha=1.0, out=x_next)  # X <- a X + B X
        x, x_next = x_next, x
    return x


def muon_update_stacked(params, grads, momentum_buffer, ws, *, lr, momentum, nesterov, coefficients, weight_decay,
                        block=None, num_warps=None, skip=None):
    """One Muon step of K same-shape matrices (the seam for a distributed version: a rank owns whole stacks).

    params, grads: lists of K contiguous (rows, cols) tensors; momentum_buffer: (K, rows, cols) fp32, updated in
    place; ws: the stack's MuonWorkspace. Parameters are updated in place. skip: None or a 0-dim bool / integer
    tensor on the parameters' device; nonzero leaves parameters and buffer untouched (decided on the device).
    """
    K = len(params)
    rows, cols = params[0].shape
    numel = rows * cols
    device = params[0].device
    manual = interpreter_enabled()
    block = block or (_INTERPRETER_BLOCK if manual else _GPU_BLOCK)
    warps = num_warps or _GPU_WARPS
    n_blocks = triton.cdiv(numel, block)

    ws.acquire()
    grad_table, grads_aligned = ws.table("grads", [g.data_ptr() for g in grads], device)
    param_table, params_aligned = ws.table("params", [p.data_ptr() for p in params], device)
    partial = torch.empty(K, n_blocks, dtype=torch.float32, device=device)
    _muon_momentum_kernel[(n_blocks, K)](
        grad_table, momentum_buffer, ws.x, partial, skip if skip is not None else partial, float(momentum), numel,
        GRAD_DTYPE=tl_dtype(grads[0].dtype, "Muon gradient"), NESTEROV=bool(nesterov), HAS_SKIP=skip is not None,
        MANUAL_ROUNDING=manual, ALIGNED=grads_aligned, BLOCK=block, num_warps=warps,
    )
    scale = torch.reciprocal_(partial.sum(dim=1).sqrt_().mul_(NORM_SAFETY).add_(NORM_EPS))  # (K,)
    out = orthogonalize_(ws, coefficients, scale)
    _muon_apply_kernel[(n_blocks, K)](
        param_table, out, skip if skip is not None else out, float(lr) * lr_shape_scale(rows, cols),
        float(weight_decay), numel,
        PARAM_DTYPE=tl_dtype(params[0].dtype, "Muon parameter"), IS_BF16=params[0].dtype == torch.bfloat16,
        HAS_SKIP=skip is not None, MANUAL_ROUNDING=manual, ALIGNED=params_aligned, BLOCK=block, num_warps=warps,
    )
    record("muon", TRITON)


class _Stack:
    """A same-shape bucket of one group: its stacked momentum buffer (whose [k] views are the per-parameter
    state) and its orthogonalization workspace."""

    def __init__(self, params, states, gram):
        K = len(params)
        rows, cols = params[0].shape
        device = params[0].device
        self.ids = tuple(id(p) for p in params)
        self.buffer = torch.zeros(K, rows, cols, dtype=torch.float32, device=device)  # (K, rows, cols)
        for k, state in enumerate(states):
            if "momentum_buffer" in state:  # carried over from load_state_dict or from another stack
                self.buffer[k].copy_(state["momentum_buffer"])
        self.views = list(self.buffer.unbind(0))
        for state, view in zip(states, self.views):
            state["momentum_buffer"] = view
        self.workspace = MuonWorkspace(K, rows, cols, device, gram=gram) if runs_triton(device) else None


class Muon(torch.optim.Optimizer):
    """Muon (see module docstring) for 2D parameters only.

    State per parameter: `momentum_buffer` (fp32, a view into its stack's buffer). Hyperparameters are read from
    the group at each step (a scheduler may change lr and momentum).
    `step(skip=flag)`: a 0-dim bool / integer tensor on the parameters' device; nonzero leaves parameters and
    momentum buffers bit for bit as they were, decided on the device (never read on the host; module docstring).
    `block` / `num_warps` tune the elementwise CUDA kernels; `gram` ("triangle", "bmm", None = by device) picks
    who computes the symmetric products of the orthogonalization (see MuonWorkspace).
    """

    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5, weight_decay=0.0, *,
                 coefficients="polar_express", block=None, num_warps=None, gram=None):
        ns_coefficients(coefficients, ns_steps)  # validates both
        _check("Muon", lr, momentum, weight_decay)
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, weight_decay=weight_decay,
                        coefficients=coefficients)
        super().__init__(params, defaults)
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                if p.ndim != 2:
                    raise ValueError(
                        f"Muon: parameter {pi} of group {gi} has shape {tuple(p.shape)}; Muon is for 2D matrices "
                        "only (give embeddings, heads, vectors and scalars to AdamW)")
        if gram not in (None, "triangle", "bmm"):
            raise ValueError(f"Muon: gram must be 'triangle' or 'bmm', got {gram!r}")
        self._block = block
        self._gram = gram
        self._num_warps = num_warps
        self._stacks = {}  # (group index, shape, dtype, device) -> _Stack

    @torch.no_grad()
    def step(self, closure=None, *, skip=None):
        """One update of every parameter with a gradient; `skip` as in the class docstring."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for gi, group in enumerate(self.param_groups):
            _check(f"Muon group {gi}", group["lr"], group["momentum"], group["weight_decay"])
            coefficients = ns_coefficients(group["coefficients"], group["ns_steps"])
            buckets = {}
            for p in params_with_grads("Muon", gi, group):
                buckets.setdefault((tuple(p.shape), p.dtype, p.device), []).append(p)
            for (_, _, device), params in buckets.items():
                skip_flag = check_skip(skip, device, f"Muon group {gi}")
                stack = self._stack(gi, params)
                grads = [p.grad if p.grad.is_contiguous() else p.grad.contiguous() for p in params]
                hyper = dict(lr=float(group["lr"]), momentum=float(group["momentum"]), nesterov=group["nesterov"],
                             coefficients=coefficients, weight_decay=float(group["weight_decay"]))
                if stack.workspace is None:  # CPU tensors without the Triton interpreter
                    muon_reference_step(params, grads, stack.buffer, **hyper, skip=skip_flag)
                    record("muon", REFERENCE)
                else:
                    muon_update_stacked(params, grads, stack.buffer, stack.workspace, **hyper, block=self._block,
                                        num_warps=self._num_warps, skip=skip_flag)
                    stack.workspace.release()
        return loss

    def _stack(self, gi, params):
        # One cached stack per (group, shape, dtype, device): when the set of parameters with gradients changes,
        # the new stack replaces the old one instead of piling up workspaces.
        p0 = params[0]
        key = (gi, tuple(p0.shape), p0.dtype, p0.device)
        ids = tuple(id(p) for p in params)
        stack = self._stacks.get(key)
        states = [self.state[p] for p in params]
        if (stack is None or stack.ids != ids
                or any(s.get("momentum_buffer") is not v for s, v in zip(states, stack.views))):
            stack = _Stack(params, states, self._gram)
            self._stacks[key] = stack
        return stack

    def load_state_dict(self, state_dict):
        # torch casts loaded state to the parameter dtype; the buffers stay fp32, so take them from the source.
        # They are fresh tensors either way; the next step copies them into new stacks.
        saved_ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        super().load_state_dict(state_dict)
        for pid, p in zip(saved_ids, params):
            saved = state_dict["state"].get(pid)
            if saved and "momentum_buffer" in saved:
                self.state[p]["momentum_buffer"] = saved["momentum_buffer"].to(
                    device=p.device, dtype=torch.float32, copy=True)
        self._stacks.clear()


def _check(where, lr, momentum, weight_decay):
    if torch.is_tensor(lr) and lr.device.type != "cpu":
        raise TypeError(f"{where}: lr is a {lr.device} tensor; pass a Python float (reading it would sync)")
    if not float(lr) >= 0.0:
        raise ValueError(f"{where}: lr must be >= 0, got {lr}")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"{where}: momentum must be in [0, 1), got {momentum}")
    if not weight_decay >= 0.0:
        raise ValueError(f"{where}: weight_decay must be >= 0, got {weight_decay}")
