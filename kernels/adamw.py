"""AdamW whose step is one fused Triton launch per (parameter group, dtype), whatever the number of tensors.

torch's own fused AdamW already reaches near the memory-bandwidth floor; this file exists so that fastsft has one
optimizer path it controls on every device (CPU tests under the Triton interpreter, CUDA in training), with
bf16 parameters kept next to fp32 moments (the update is computed in fp32 and rounded once).

Moments in the parameter's dtype (`moments_dtype="param"`, default "fp32"): bf16 parameters then get bf16
exp_avg / exp_avg_sq, as nanochat keeps them. It halves the moments' memory (the bf16 embedding tables of d20
carry 1.7 GiB of fp32 moments). The math stays fp32: each moment is loaded, widened, updated and rounded once
(to nearest even) when stored, and the parameter update uses the unrounded fp32 moments of the step. The cost is
numerical: v moves only by whole bf16 steps, so a change (1 - beta2) (g^2 - v) smaller than half a step (2^-9 to
2^-8 of v) is lost. At beta2 = 0.95 (fastsft's and nanochat's AdamW groups) that ignores g^2 within ~4-8% of v;
the closer beta2 is to 1 the larger the lost changes, and from beta2 ~ 0.998 on (1 - beta2 <= 2^-9) a v whose
gradients stop stays within a bf16 step of where it was instead of decaying. m loses the same way with beta1.
That is nanochat's trade; this class's default stays fp32 (the driver's `adam_moments` config picks "param").
fp32 parameters keep fp32 moments under both settings.

Skipping a step on the device (`step(skip=flag)`): the driver passes a 0-dim device tensor, nonzero when the
step must not happen (a non-finite loss), instead of reading the loss back to the host (a sync, ~3% of a d20
step on an H200). Each program of the kernel loads the flag and, when it is set, reads and writes nothing, so
parameters and moments stay bit-for-bit as they were. The host-side step counter `state["step"]` still advances:
a skipped step counts as a step for bias correction (the driver reports skipped steps; they are rare, and an
early skip only makes the next steps' correction slightly weaker).

How the launch covers many tensors: the host builds a table with one row per tensor (raw addresses of the
parameter, its gradient and both moments, plus its length) and a work list of tiles (tensor index, first
element). Each program loads its row, casts the addresses to typed pointers and updates BLOCK elements.
The tile list depends only on the tensor sizes and is cached; the address table is re-uploaded only when an
address changes (gradients re-allocated by `zero_grad(set_to_none=True)` usually come back at the same place).

Math (decoupled weight decay, bias correction; identical to torch.optim.AdamW):
    p <- p * (1 - lr * wd)
    m <- beta1 * m + (1 - beta1) * g
    v <- beta2 * v + (1 - beta2) * g^2
    p <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
"""

import math

import torch
import triton
import triton.language as tl

from ._multi_tensor import (ALIGN_BYTES, check_skip, device_table, interpreter_enabled, params_with_grads,
                            round_to_bf16, runs_triton, table_pointers, tl_dtype)
from .paths import REFERENCE, TRITON, record

_GPU_BLOCK = 2048
_GPU_WARPS = 4
# Under the interpreter a program costs ~1 ms whatever its size (numpy does the elements), so few big tiles.
_INTERPRETER_BLOCK = 1 << 16

# Row layout of the per-tensor table: param, grad, exp_avg, exp_avg_sq addresses, then numel.
_NUMEL, _ROW = 4, 5

MOMENTS_DTYPES = ("fp32", "param")


@triton.jit
def _adamw_tile(p_ptrs, g_ptrs, m_ptrs, v_ptrs, mask, lr, beta1, beta2, eps, weight_decay, step_size,
                bias_correction2_sqrt, PARAM_DTYPE: tl.constexpr, IS_BF16: tl.constexpr,
                MOMENTS_BF16: tl.constexpr, MANUAL_ROUNDING: tl.constexpr, MASKED: tl.constexpr):
    # Masked accesses cannot be vectorized (the tensor length is unknown), so full tiles go unmasked.
    # Cast right after each load: the update is fp32 math whatever the parameter and moment dtypes.
    if MASKED:
        p = tl.load(p_ptrs, mask=mask).to(tl.float32)
        g = tl.load(g_ptrs, mask=mask).to(tl.float32)
        m = tl.load(m_ptrs, mask=mask).to(tl.float32)
        v = tl.load(v_ptrs, mask=mask).to(tl.float32)
    else:
        p = tl.load(p_ptrs).to(tl.float32)
        g = tl.load(g_ptrs).to(tl.float32)
        m = tl.load(m_ptrs).to(tl.float32)
        v = tl.load(v_ptrs).to(tl.float32)

    p = p * (1.0 - lr * weight_decay)
    m = m + (1.0 - beta1) * (g - m)
    v = v * beta2 + (1.0 - beta2) * g * g
    denom = tl.sqrt(v) / bias_correction2_sqrt + eps
    p = p - step_size * (m / denom)

    if IS_BF16:
        p_out = round_to_bf16(p, MANUAL_ROUNDING)
    else:
        p_out = p.to(PARAM_DTYPE)
    if MOMENTS_BF16:  # rounded once, on the way out; this step's update used the fp32 values
        m = round_to_bf16(m, MANUAL_ROUNDING)
        v = round_to_bf16(v, MANUAL_ROUNDING)
    if MASKED:
        tl.store(m_ptrs, m, mask=mask)
        tl.store(v_ptrs, v, mask=mask)
        tl.store(p_ptrs, p_out, mask=mask)
    else:
        tl.store(m_ptrs, m)
        tl.store(v_ptrs, v)
        tl.store(p_ptrs, p_out)


@triton.jit
def _adamw_kernel(
    table_ptr,  # (T, 5) int64: param, grad, exp_avg, exp_avg_sq addresses, numel
    tile_tensor_ptr,  # (tiles,) int32: which tensor a tile belongs to
    tile_start_ptr,  # (tiles,) int64: first element of the tile in its tensor
    skip_ptr,  # () bool or integer: nonzero skips the step (read only when HAS_SKIP)
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    step_size,  # lr / (1 - beta1^t)
    bias_correction2_sqrt,  # sqrt(1 - beta2^t)
    PARAM_DTYPE: tl.constexpr,
    IS_BF16: tl.constexpr,
    MOMENT_DTYPE: tl.constexpr,
    MOMENTS_BF16: tl.constexpr,
    HAS_SKIP: tl.constexpr,
    MANUAL_ROUNDING: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # A set skip flag: the program reads and writes nothing (parameters and moments stay bit for bit).
    if HAS_SKIP:
        run = tl.load(skip_ptr) == 0
    else:
        run = True
    if run:
        tile = tl.program_id(0)
        t = tl.load(tile_tensor_ptr + tile).to(tl.int64)
        start = tl.load(tile_start_ptr + tile)
        row = table_ptr + t * 5  # _ROW
        numel = tl.load(row + 4)
        offs = start + tl.arange(0, BLOCK)
        p_ptrs = table_pointers(row + 0, offs, PARAM_DTYPE, ALIGNED, BLOCK)
        g_ptrs = table_pointers(row + 1, offs, PARAM_DTYPE, ALIGNED, BLOCK)
        m_ptrs = table_pointers(row + 2, offs, MOMENT_DTYPE, ALIGNED, BLOCK)
        v_ptrs = table_pointers(row + 3, offs, MOMENT_DTYPE, ALIGNED, BLOCK)
        if start + BLOCK <= numel:
            _adamw_tile(p_ptrs, g_ptrs, m_ptrs, v_ptrs, offs < numel, lr, beta1, beta2, eps, weight_decay,
                        step_size, bias_correction2_sqrt, PARAM_DTYPE, IS_BF16, MOMENTS_BF16, MANUAL_ROUNDING,
                        MASKED=False)
        else:
            _adamw_tile(p_ptrs, g_ptrs, m_ptrs, v_ptrs, offs < numel, lr, beta1, beta2, eps, weight_decay,
                        step_size, bias_correction2_sqrt, PARAM_DTYPE, IS_BF16, MOMENTS_BF16, MANUAL_ROUNDING,
                        MASKED=True)


def adamw_reference_step(params, grads, exp_avgs, exp_avg_sqs, step, lr, beta1, beta2, eps, weight_decay, *,
                         skip=None):
    """Plain PyTorch AdamW step in fp32 for any parameter and moment dtype; each result is rounded once into its
    tensor (parameters, and bf16 moments, round to nearest even on store; the update uses the fp32 moments).

    For fp32 parameters this is torch.optim.AdamW's math; it is the reference of the bf16 tests and the path used
    for CPU tensors when Triton is not interpreting. `skip` (a 0-dim bool / integer tensor, nonzero: leave every
    tensor as it was) is applied with torch.where, without reading it on the host.
    """
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = math.sqrt(1 - beta2**step)
    keep = None if skip is None else skip == 0
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
        p32 = p.float() * (1 - lr * weight_decay)
        g32 = g.float()
        m32 = m.float().lerp(g32, 1 - beta1)
        v32 = v.float().mul(beta2).addcmul_(g32, g32, value=1 - beta2)
        denom = v32.sqrt() / bias_correction2_sqrt + eps
        p32 = p32 - (lr / bias_correction1) * (m32 / denom)
        if keep is not None:  # the old values widen to fp32 exactly, so the copies below give them back unchanged
            p32, m32, v32 = torch.where(keep, p32, p.float()), torch.where(keep, m32, m), torch.where(keep, v32, v)
        m.copy_(m32)
        v.copy_(v32)
        p.copy_(p32)


class AdamW(torch.optim.Optimizer):
    """AdamW with a fused multi-tensor Triton step (see module docstring).

    State per parameter, under torch's names: `step` (int), `exp_avg` and `exp_avg_sq`. Their dtype is set by
    `moments_dtype`: "fp32" (the default) keeps them fp32 whatever the parameter dtype; "param" gives bf16
    parameters bf16 moments (half the memory, at the cost of small changes of v lost, more of them the closer
    beta2 is to 1, as in nanochat; module docstring) and fp32 parameters fp32 ones. fp16 parameters are refused
    under "param" (fp16 cannot hold g^2: it overflows above |g| = 256 and is zero below |g| ~ 2^-12).
    `group["lr"]` (and every other hyperparameter) is read at each step, so a scheduler may change it; it must be
    a Python number (a CUDA tensor would force a host sync).
    `step(skip=flag)`: a 0-dim bool / integer tensor on the parameters' device; nonzero leaves parameters and
    moments untouched, decided on the device (never read on the host). `state["step"]` advances anyway: a
    skipped step counts for bias correction.
    `block_size` / `num_warps` tune the CUDA kernel (elements per program, warps per program).
    """

    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, *, moments_dtype="fp32",
                 block_size=None, num_warps=None):
        _check_hyperparameters("AdamW", lr, betas, eps, weight_decay)
        if moments_dtype not in MOMENTS_DTYPES:
            raise ValueError(f"AdamW: moments_dtype must be one of {MOMENTS_DTYPES}, got {moments_dtype!r}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.moments_dtype = moments_dtype
        self._block_size = block_size
        self._num_warps = num_warps or _GPU_WARPS
        self._tiles_cache = {}  # (numels, block, device) -> (tile_tensor, tile_start)
        self._table_cache = {}  # (group index, device, dtype, moment dtype) -> (host rows, device table, aligned)

    def moment_dtype(self, param: torch.Tensor) -> torch.dtype:
        """The dtype of `param`'s exp_avg and exp_avg_sq under this optimizer's `moments_dtype`."""
        if self.moments_dtype == "fp32" or param.dtype == torch.float32:
            return torch.float32
        if param.dtype == torch.bfloat16:
            return torch.bfloat16
        raise TypeError(f"AdamW: moments_dtype='param' takes bf16 and fp32 parameters, got {param.dtype} "
                        "(fp16 moments would overflow at |g| > 256); use moments_dtype='fp32'")

    @torch.no_grad()
    def step(self, closure=None, *, skip=None):
        """One update of every parameter with a gradient; `skip` as in the class docstring."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for gi, group in enumerate(self.param_groups):
            _check_hyperparameters(f"AdamW group {gi}", group["lr"], group["betas"], group["eps"],
                                   group["weight_decay"])
            params = list(params_with_grads("AdamW", gi, group))
            for device in {p.device for p in params}:  # before any state changes
                check_skip(skip, device, f"AdamW group {gi}")
            buckets = {}
            for p in params:
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    moment_dtype = self.moment_dtype(p)
                    state["exp_avg"] = torch.zeros(p.shape, dtype=moment_dtype, device=p.device)
                    state["exp_avg_sq"] = torch.zeros(p.shape, dtype=moment_dtype, device=p.device)
                state["step"] += 1  # also on a skipped step (class docstring)
                key = (p.device, p.dtype, state["exp_avg"].dtype, state["step"])
                buckets.setdefault(key, []).append(p)
            for (device, dtype, moment_dtype, step), bucket in buckets.items():
                self._step_bucket(gi, group, device, dtype, moment_dtype, step, bucket, skip)
        return loss

    def _step_bucket(self, gi, group, device, dtype, moment_dtype, step, params, skip):
        beta1, beta2 = group["betas"]
        lr, eps, wd = float(group["lr"]), float(group["eps"]), float(group["weight_decay"])
        grads = [p.grad if p.grad.is_contiguous() else p.grad.contiguous() for p in params]
        exp_avgs = [self.state[p]["exp_avg"] for p in params]
        exp_avg_sqs = [self.state[p]["exp_avg_sq"] for p in params]
        if any(v.dtype != moment_dtype for v in exp_avg_sqs):
            raise TypeError(f"AdamW group {gi}: exp_avg_sq dtypes {sorted({str(v.dtype) for v in exp_avg_sqs})} "
                            f"differ from exp_avg's {moment_dtype}")
        param_dtype = tl_dtype(dtype, f"AdamW group {gi}")
        if not runs_triton(device):
            adamw_reference_step(params, grads, exp_avgs, exp_avg_sqs, step, lr, beta1, beta2, eps, wd, skip=skip)
            record("adamw", REFERENCE)
            return
        block = self._block_size or (_INTERPRETER_BLOCK if interpreter_enabled() else _GPU_BLOCK)
        rows = []
        for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
            rows += (p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr(), p.numel())
        key = (gi, device, dtype, moment_dtype)
        cached = self._table_cache.get(key)
        if cached is None or cached[0] != rows:
            aligned = all(a % ALIGN_BYTES == 0 for i, a in enumerate(rows) if i % _ROW != _NUMEL)
            cached = (rows, device_table(rows, device), aligned)
            self._table_cache[key] = cached
        _, table, aligned = cached
        tile_tensor, tile_start = self._tiles(tuple(p.numel() for p in params), block, device)
        _adamw_kernel[(tile_tensor.numel(),)](
            table, tile_tensor, tile_start, skip if skip is not None else table,
            lr, beta1, beta2, eps, wd, lr / (1 - beta1**step), math.sqrt(1 - beta2**step),
            PARAM_DTYPE=param_dtype, IS_BF16=dtype == torch.bfloat16,
            MOMENT_DTYPE=tl_dtype(moment_dtype, f"AdamW group {gi} moments"),
            MOMENTS_BF16=moment_dtype == torch.bfloat16, HAS_SKIP=skip is not None,
            MANUAL_ROUNDING=interpreter_enabled(), ALIGNED=aligned, BLOCK=block, num_warps=self._num_warps,
        )
        record("adamw", TRITON)

    def _tiles(self, numels, block, device):
        key = (numels, block, device)
        if key not in self._tiles_cache:
            tensor_index, starts = [], []
            for t, n in enumerate(numels):
                for s in range(0, n, block):
                    tensor_index.append(t)
                    starts.append(s)
            self._tiles_cache[key] = (
                device_table(tensor_index, device).to(torch.int32),
                device_table(starts, device),
            )
        return self._tiles_cache[key]

    def load_state_dict(self, state_dict):
        # torch casts loaded state to the parameter dtype; our moments take the dtype moments_dtype gives them
        # (a checkpoint saved under the other setting converts), so restore them from the source.
        saved_ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        super().load_state_dict(state_dict)
        for pid, p in zip(saved_ids, params):
            saved = state_dict["state"].get(pid)
            if not saved:
                continue
            state = self.state[p]
            step = saved["step"]
            state["step"] = int(step.item()) if torch.is_tensor(step) else int(step)
            for name in ("exp_avg", "exp_avg_sq"):
                state[name] = saved[name].to(device=p.device, dtype=self.moment_dtype(p), copy=True).contiguous()
        self._table_cache.clear()


def _check_hyperparameters(where, lr, betas, eps, weight_decay):
    if torch.is_tensor(lr) and lr.device.type != "cpu":
        raise TypeError(f"{where}: lr is a {lr.device} tensor; pass a Python float (reading it would sync)")
    if not 0.0 <= float(lr):
        raise ValueError(f"{where}: lr must be >= 0, got {lr}")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"{where}: betas must be two numbers in [0, 1), got {betas}")
    if not eps >= 0.0:
        raise ValueError(f"{where}: eps must be >= 0, got {eps}")
    if not weight_decay >= 0.0:
        raise ValueError(f"{where}: weight_decay must be >= 0, got {weight_decay}")
