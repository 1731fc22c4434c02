"""Muon for the 2D matrices of the transformer: Nesterov momentum, then orthogonalization of the update, then a
shape-scaled step. Same-shape matrices are stacked so that one batched orthogonalization serves them all.

Why this file: nanochat runs Muon as one torch.compile'd graph per shape group; most of its time is the bf16
matmuls of the orthogonalization, the rest is elementwise traffic (stacking grads, momentum, casts, the norm,
the update, copying the stack back into the parameters). Here the elementwise stages are two Triton kernels that
read the gradients and write the parameters in place through address tables (no stack/unstack copies):
    1. momentum: buf <- lerp(buf, g, 1 - mu); u = lerp(g, buf, mu) (Nesterov) or buf; X = bf16(u), written
       transposed for tall matrices so the iteration always works on a wide (K, rows <= cols) stack; and the
       per-tile sums of X^2 for the Frobenius norm (summed deterministically, no atomics).
    2. apply: p <- p - lr_eff * (O + wd * p * [O * p >= 0]), O the orthogonalized X (read back transposed).
The matmuls are cuBLAS batched GEMMs (torch.bmm / baddbmm, whose epilogues fold the linear combinations).

Orthogonalization: Polar Express (Amsel et al. 2025), as nanochat uses since early 2026: five tuned (a, b, c)
triples reach singular values near 1 in 5 steps, where the classic quintic Newton-Schulz (3.4445, -4.7750,
2.0315) leaves them spread over roughly [0.7, 1.2]; both run in bf16 and cost the same, so the better
converging one is the default (`coefficients="newton_schulz"` selects the quintic).
Each step: A = X X^T; B = b A + c A A; X <- a X + B X, after X <- X / (1.02 ||X||_F + 1e-6).

Scaling (nanochat's rule): the learning rate of an (rows, cols) matrix is lr * sqrt(max(1, rows / cols)).
Weight decay is nanochat's cautious decay: only where the update and the parameter agree in sign.
Not included: nanochat's NorMuon variance reduction (factored second moment after the orthogonalization).

DDP seam: `muon_update_stacked` is the whole update of one same-shape stack as a function of its lists of
parameters and gradients; a distributed version assigns stacks (or slices of stacks) to ranks and all-gathers.
"""

import torch
import triton
import triton.language as tl

from ._multi_tensor import ALIGN_BYTES, device_table, interpreter_enabled, round_to_bf16, runs_triton, tl_dtype

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

_GPU_TILE = 64
_GPU_WARPS = 4
_INTERPRETER_TILE = 256


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


def muon_reference_step(params, grads, momentum_buffer, *, lr, momentum, nesterov, coefficients, weight_decay):
    """One Muon step of a list of same-shape matrices; momentum_buffer (K, rows, cols) fp32 is updated in place."""
    rows, cols = params[0].shape
    G = torch.stack(grads).float()  # (K, rows, cols)
    momentum_buffer.lerp_(G, 1 - momentum)
    U = G.lerp(momentum_buffer, momentum) if nesterov else momentum_buffer
    O = orthogonalize_reference(U, coefficients).float()
    P = torch.stack(params).float()
    cautious = (O * P >= 0).float()
    P = P - lr * lr_shape_scale(rows, cols) * (O + weight_decay * P * cautious)
    torch._foreach_copy_(list(params), list(P.to(params[0].dtype).unbind(0)))


# --------------------------------------------------------------------------------------------------------------
# Triton kernels: grid (tiles of one matrix, K matrices).


@triton.jit
def _muon_momentum_kernel(
    grad_table_ptr,  # (K,) int64 addresses of the gradients, each (M, N) row-major
    buf_ptr,  # (K, M, N) fp32 momentum buffers
    x_ptr,  # (K, M, N) bf16 out, or (K, N, M) when TRANSPOSE
    partial_ptr,  # (K, tiles) fp32 out: sum of X^2 over each tile
    momentum,
    M,
    N,
    tiles_n,
    GRAD_DTYPE: tl.constexpr,
    NESTEROV: tl.constexpr,
    TRANSPOSE: tl.constexpr,
    MANUAL_ROUNDING: tl.constexpr,
    ALIGNED: tl.constexpr,
    EVEN: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
):
    tile = tl.program_id(0)
    k = tl.program_id(1).to(tl.int64)
    rows = (tile // tiles_n) * BM + tl.arange(0, BM)
    cols = (tile % tiles_n) * BN + tl.arange(0, BN)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    offs = rows[:, None] * N + cols[None, :]  # (BM, BN)
    base = k * M * N

    g_ptrs = tl.load(grad_table_ptr + k).to(tl.pointer_type(GRAD_DTYPE)) + offs
    if ALIGNED:  # 16-byte aligned matrices whose rows are whole 16-byte vectors
        g_ptrs = tl.max_contiguous(tl.multiple_of(g_ptrs, [16, 16]), [1, BN])
    if EVEN:  # no edge tiles: unmasked accesses vectorize
        g = tl.load(g_ptrs).to(tl.float32)
        buf = tl.load(buf_ptr + base + offs)
    else:
        g = tl.load(g_ptrs, mask=mask, other=0.0).to(tl.float32)
        buf = tl.load(buf_ptr + base + offs, mask=mask, other=0.0)
    buf = buf + (1.0 - momentum) * (g - buf)
    if EVEN:
        tl.store(buf_ptr + base + offs, buf)
    else:
        tl.store(buf_ptr + base + offs, buf, mask=mask)
    if NESTEROV:
        u = g + momentum * (buf - g)
    else:
        u = buf
    x = round_to_bf16(u, MANUAL_ROUNDING)  # (BM, BN)
    xf = x.to(tl.float32)
    tl.store(partial_ptr + k * tl.num_programs(0) + tile, tl.sum(tl.sum(xf * xf, axis=1), axis=0))
    if TRANSPOSE:
        # Write the (BN, BM) transposed tile with the contiguous axis last, so the stores coalesce.
        xt_offs = cols[:, None] * M + rows[None, :]
        xt_mask = (cols[:, None] < N) & (rows[None, :] < M)
        if EVEN:
            tl.store(x_ptr + base + xt_offs, tl.trans(x))
        else:
            tl.store(x_ptr + base + xt_offs, tl.trans(x), mask=xt_mask)
    elif EVEN:
        tl.store(x_ptr + base + offs, x)
    else:
        tl.store(x_ptr + base + offs, x, mask=mask)


@triton.jit
def _muon_apply_kernel(
    param_table_ptr,  # (K,) int64 addresses of the parameters, each (M, N) row-major
    x_ptr,  # (K, M, N) bf16 orthogonalized update, or (K, N, M) when TRANSPOSE
    lr,  # already scaled by sqrt(max(1, M / N))
    weight_decay,
    M,
    N,
    tiles_n,
    PARAM_DTYPE: tl.constexpr,
    IS_BF16: tl.constexpr,
    TRANSPOSE: tl.constexpr,
    MANUAL_ROUNDING: tl.constexpr,
    ALIGNED: tl.constexpr,
    EVEN: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
):
    tile = tl.program_id(0)
    k = tl.program_id(1).to(tl.int64)
    rows = (tile // tiles_n) * BM + tl.arange(0, BM)
    cols = (tile % tiles_n) * BN + tl.arange(0, BN)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    offs = rows[:, None] * N + cols[None, :]
    base = k * M * N

    p_ptrs = tl.load(param_table_ptr + k).to(tl.pointer_type(PARAM_DTYPE)) + offs
    if ALIGNED:
        p_ptrs = tl.max_contiguous(tl.multiple_of(p_ptrs, [16, 16]), [1, BN])
    if EVEN:
        p = tl.load(p_ptrs).to(tl.float32)
    else:
        p = tl.load(p_ptrs, mask=mask, other=0.0).to(tl.float32)
    if TRANSPOSE:
        xt_offs = cols[:, None] * M + rows[None, :]
        xt_mask = (cols[:, None] < N) & (rows[None, :] < M)
        if EVEN:
            xt = tl.load(x_ptr + base + xt_offs)
        else:
            xt = tl.load(x_ptr + base + xt_offs, mask=xt_mask, other=0.0)
        o = tl.trans(xt.to(tl.float32))
    elif EVEN:
        o = tl.load(x_ptr + base + offs).to(tl.float32)
    else:
        o = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    decay = tl.where(o * p >= 0, weight_decay * p, 0.0)
    p = p - lr * (o + decay)
    if IS_BF16:
        p_out = round_to_bf16(p, MANUAL_ROUNDING)
    else:
        p_out = p.to(PARAM_DTYPE)
    if EVEN:
        tl.store(p_ptrs, p_out)
    else:
        tl.store(p_ptrs, p_out, mask=mask)


class MuonWorkspace:
    """Buffers of one stack's orthogonalization, kept between steps (allocating 100s of MB per step is slow)."""

    def __init__(self, K, rows, cols, device):
        m, n = min(rows, cols), max(rows, cols)
        self.x = torch.empty(K, m, n, dtype=torch.bfloat16, device=device)  # (K, m, n), m <= n
        self.x_next = torch.empty_like(self.x)
        self.a = torch.empty(K, m, m, dtype=torch.bfloat16, device=device)
        self.b = torch.empty_like(self.a)
        self._tables = {}  # name -> (addresses, device table): re-uploaded only when an address changes

    def table(self, name, addresses, device):
        cached = self._tables.get(name)
        if cached is None or cached[0] != addresses:
            aligned = all(a % ALIGN_BYTES == 0 for a in addresses)
            cached = (addresses, device_table(addresses, device), aligned)
            self._tables[name] = cached
        return cached[1], cached[2]


def orthogonalize_(ws: MuonWorkspace, coefficients) -> torch.Tensor:
    """Polar iteration on ws.x (K, m, n) bf16, m <= n, already normalized; returns the buffer holding the result."""
    x, x_next = ws.x, ws.x_next
    for a, b, c in coefficients:
        torch.bmm(x, x.mT, out=ws.a)  # A = X X^T
        torch.baddbmm(ws.a, ws.a, ws.a, beta=b, alpha=c, out=ws.b)  # B = b A + c A A
        torch.baddbmm(x, ws.b, x, beta=a, alpha=1.0, out=x_next)  # X <- a X + B X
        x, x_next = x_next, x
    return x


def muon_update_stacked(params, grads, momentum_buffer, ws, *, lr, momentum, nesterov, coefficients, weight_decay,
                        tile=None, num_warps=None):
    """One Muon step of K same-shape matrices (the seam for a distributed version: a rank owns whole stacks).

    params, grads: lists of K contiguous (rows, cols) tensors; momentum_buffer: (K, rows, cols) fp32, updated in
    place; ws: the stack's MuonWorkspace. Parameters are updated in place.
    """
    K = len(params)
    rows, cols = params[0].shape
    device = params[0].device
    transpose = rows > cols
    manual = interpreter_enabled()
    if tile is None:
        tile = _INTERPRETER_TILE if manual else _GPU_TILE
    bm, bn = min(tile, triton.next_power_of_2(rows)), min(tile, triton.next_power_of_2(cols))
    tiles_n = triton.cdiv(cols, bn)
    n_tiles = triton.cdiv(rows, bm) * tiles_n
    warps = num_warps or _GPU_WARPS

    grad_table, grads_aligned = ws.table("grads", [g.data_ptr() for g in grads], device)
    param_table, params_aligned = ws.table("params", [p.data_ptr() for p in params], device)
    even = rows % bm == 0 and cols % bn == 0
    row_vectors = cols * params[0].element_size() % ALIGN_BYTES == 0
    partial = torch.empty(K, n_tiles, dtype=torch.float32, device=device)
    _muon_momentum_kernel[(n_tiles, K)](
        grad_table, momentum_buffer, ws.x, partial, float(momentum), rows, cols, tiles_n,
        GRAD_DTYPE=tl_dtype(grads[0].dtype, "Muon gradient"), NESTEROV=bool(nesterov), TRANSPOSE=transpose,
        MANUAL_ROUNDING=manual, ALIGNED=grads_aligned and row_vectors, EVEN=even, BM=bm, BN=bn, num_warps=warps,
    )
    norm = partial.sum(dim=1).sqrt_()  # (K,)
    ws.x.mul_((1.0 / (norm * NORM_SAFETY + NORM_EPS)).view(K, 1, 1))
    out = orthogonalize_(ws, coefficients)
    _muon_apply_kernel[(n_tiles, K)](
        param_table, out, float(lr) * lr_shape_scale(rows, cols), float(weight_decay), rows, cols, tiles_n,
        PARAM_DTYPE=tl_dtype(params[0].dtype, "Muon parameter"), IS_BF16=params[0].dtype == torch.bfloat16,
        TRANSPOSE=transpose, MANUAL_ROUNDING=manual, ALIGNED=params_aligned and row_vectors, EVEN=even,
        BM=bm, BN=bn, num_warps=warps,
    )


class _Stack:
    """A same-shape bucket of one group: its stacked momentum buffer (whose [k] views are the per-parameter
    state) and its orthogonalization workspace."""

    def __init__(self, params, states):
        K = len(params)
        rows, cols = params[0].shape
        device = params[0].device
        self.buffer = torch.zeros(K, rows, cols, dtype=torch.float32, device=device)  # (K, rows, cols)
        for k, state in enumerate(states):
            if "momentum_buffer" in state:  # carried over from load_state_dict or from another stack
                self.buffer[k].copy_(state["momentum_buffer"])
        self.views = list(self.buffer.unbind(0))
        for state, view in zip(states, self.views):
            state["momentum_buffer"] = view
        self.workspace = MuonWorkspace(K, rows, cols, device) if runs_triton(device) else None


class Muon(torch.optim.Optimizer):
    """Muon (see module docstring) for 2D parameters only.

    State per parameter: `momentum_buffer` (fp32, a view into its stack's buffer). Hyperparameters are read from
    the group at each step (a scheduler may change lr and momentum).
    `tile` / `num_warps` tune the elementwise CUDA kernels.
    """

    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5, weight_decay=0.0, *,
                 coefficients="polar_express", tile=None, num_warps=None):
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
        self._tile = tile
        self._num_warps = num_warps
        self._stacks = {}  # (group index, param ids) -> _Stack

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for gi, group in enumerate(self.param_groups):
            _check(f"Muon group {gi}", group["lr"], group["momentum"], group["weight_decay"])
            coefficients = ns_coefficients(group["coefficients"], group["ns_steps"])
            buckets = {}
            for pi, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise TypeError(f"Muon: parameter {pi} of group {gi} has a sparse gradient; not supported")
                if not p.is_contiguous():
                    raise ValueError(f"Muon: parameter {pi} of group {gi} (shape {tuple(p.shape)}) is not contiguous")
                buckets.setdefault((tuple(p.shape), p.dtype, p.device), []).append(p)
            for params in buckets.values():
                stack = self._stack(gi, params)
                grads = [p.grad if p.grad.is_contiguous() else p.grad.contiguous() for p in params]
                hyper = dict(lr=float(group["lr"]), momentum=float(group["momentum"]), nesterov=group["nesterov"],
                             coefficients=coefficients, weight_decay=float(group["weight_decay"]))
                if stack.workspace is None:  # CPU tensors without the Triton interpreter
                    muon_reference_step(params, grads, stack.buffer, **hyper)
                else:
                    muon_update_stacked(params, grads, stack.buffer, stack.workspace, **hyper, tile=self._tile,
                                        num_warps=self._num_warps)
        return loss

    def _stack(self, gi, params):
        key = (gi, tuple(id(p) for p in params))
        stack = self._stacks.get(key)
        states = [self.state[p] for p in params]
        if stack is None or any(s.get("momentum_buffer") is not v for s, v in zip(states, stack.views)):
            stack = _Stack(params, states)
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
