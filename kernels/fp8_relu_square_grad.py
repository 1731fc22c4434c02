"""The fp8 MLP's dh = 2 sqrt(a) da, quantized to fp8 in both layouts: one pass for its maximum, one for the cast.

Why: the MLP's backward gets da (bf16, out of its matmul) and keeps a = relu(h)^2 in fp8 (kernels/fp8_relu_square.py),
and needs dh quantized twice: as it comes (the weight gradient's operand) and transposed (the input gradient's).
Inductor's two kernels for it, the maximum and then the cast into both layouts, took 4.9 and 7.2 ms of a d20 step
(20 layers), at 2.0-2.3 TB/s (bench/RESULTS.md, run 10). Both operands are in memory anyway and both outputs go to
matmuls, so a kernel of its own here undoes no fusion (what made run 7's cast kernel lose).

dh is computed in fp32 as torch does it, 2 * sqrt(a * a_inv) * da with a correctly rounded square root, and
rounded to da's dtype before its maximum and its cast, so the result is `fastsft.fp8.quantize` of that dh bit for
bit: the scale fmax / max|dh| (the maximum clamped at 1e-12), round to nearest even, saturating at the format's
largest finite value. A non-finite dh makes the whole result non-finite, as torch's maximum would (the step then
reports and skips it). Registered as a torch custom op; on the CPU and for fp32 da the op runs the same definition
in torch ops, and the tests run the kernels under the interpreter through `launch=`.
"""

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._multi_tensor import interpreter_enabled, round_to_bf16
from .fp8_relu_square import _TL_FP8, _round_to_fp8_grid

_KERNEL_INPUTS = (torch.bfloat16, torch.float16)
_TINY_MAX = 1e-12  # fastsft.fp8.scale_for's floor on the maximum


@dataclass(frozen=True)
class GradLaunch:
    block_m: int = 128
    block_n: int = 128
    num_warps: int = 8


DEFAULT_LAUNCH = GradLaunch()  # run 7's best tile for a two-layout fp8 store at 32768 x 5120
INTERPRETED_LAUNCH = GradLaunch(16, 32, 1)  # partial tiles in both dimensions on small test inputs


def relu_square_grad_fp8_reference(da: torch.Tensor, a: torch.Tensor, a_inv: torch.Tensor, dtype: torch.dtype):
    """(q, q^T contiguous, 1/s): dh = 2 sqrt(a a_inv) da in da's dtype, quantized as fastsft.fp8.quantize does."""
    dh = (2 * torch.sqrt(a.float() * a_inv) * da).to(da.dtype)
    fmax = torch.finfo(dtype).max
    scale = fmax / dh.abs().amax().float().clamp(min=_TINY_MAX)
    q = (dh.float() * scale).clamp(-fmax, fmax).to(dtype)
    return q, q.t().clone(memory_format=torch.contiguous_format), scale.reciprocal()


@triton.jit
def _dh_tile(da_ptr, a_ptr, a_inv, offs_m, offs_n, M, N, MANUAL_ROUNDING: tl.constexpr):
    """The (BLOCK_M, BLOCK_N) tile of dh in fp32, rounded to da's dtype, with its mask."""
    m64 = offs_m.to(tl.int64)
    n64 = offs_n.to(tl.int64)
    ok = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    at = m64[:, None] * N + n64[None, :]
    da = tl.load(da_ptr + at, mask=ok, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + at, mask=ok, other=0.0).to(tl.float32)
    dh = 2.0 * tl.sqrt_rn(a * a_inv) * da
    if MANUAL_ROUNDING and da_ptr.dtype.element_ty == tl.bfloat16:
        dh = round_to_bf16(dh, True)
    return dh.to(da_ptr.dtype.element_ty).to(tl.float32), ok


@triton.jit
def _dh_max_kernel(da_ptr, a_ptr, a_inv_ptr, max_ptr, M, N, MANUAL_ROUNDING: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    dh, ok = _dh_tile(da_ptr, a_ptr, tl.load(a_inv_ptr), offs_m, offs_n, M, N, MANUAL_ROUNDING)
    size = tl.where(dh == dh, tl.abs(dh), float("inf"))  # a NaN counts as inf: the scale becomes 0, dh * 0 NaN
    tl.atomic_max(max_ptr, tl.max(tl.max(tl.where(ok, size, 0.0), axis=1), axis=0))  # >= 0: int order holds


@triton.jit
def _dh_cast_kernel(da_ptr, a_ptr, a_inv_ptr, max_ptr, q_ptr, qt_ptr, inv_ptr, M, N, fmax, tiny, floor,
                    MANUAL_ROUNDING: tl.constexpr, MANTISSA: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # fmax / m as torch computes a number over a tensor: 1 / m rounded, times fmax rounded (not one division)
    scale = tl.div_rn(1.0, tl.maximum(tl.load(max_ptr), floor)) * fmax
    if (pid_m == 0) & (pid_n == 0):
        tl.store(inv_ptr, tl.div_rn(1.0, scale))
    dh, ok = _dh_tile(da_ptr, a_ptr, tl.load(a_inv_ptr), offs_m, offs_n, M, N, MANUAL_ROUNDING)
    q = dh * scale
    q = tl.where(q > fmax, fmax, tl.where(q < -fmax, -fmax, q))  # comparisons: a NaN stays NaN
    if MANUAL_ROUNDING:
        q = _round_to_fp8_grid(q, tiny, MANTISSA)
    q = q.to(q_ptr.dtype.element_ty)
    m64 = offs_m.to(tl.int64)
    n64 = offs_n.to(tl.int64)
    tl.store(q_ptr + m64[:, None] * N + n64[None, :], q, mask=ok)
    tl.store(qt_ptr + n64[:, None] * M + m64[None, :], tl.trans(q),
             mask=(offs_n < N)[:, None] & (offs_m < M)[None, :])


def _launch(da, a, a_inv, dtype, launch):
    if da.is_cuda and da.dtype not in _KERNEL_INPUTS:
        raise TypeError(f"relu_square_grad_fp8: the kernels take {list(_KERNEL_INPUTS)} da on CUDA, got {da.dtype}; "
                        "leave launch= unset for the torch path")
    M, N = da.shape
    interpreted = interpreter_enabled() and da.device.type == "cpu"
    launch = INTERPRETED_LAUNCH if interpreted else launch
    info = torch.finfo(dtype)
    grid = (triton.cdiv(M, launch.block_m), triton.cdiv(N, launch.block_n))
    biggest = torch.zeros((), dtype=torch.float32, device=da.device)
    _dh_max_kernel[grid](da, a, a_inv, biggest, M, N, MANUAL_ROUNDING=interpreted, BLOCK_M=launch.block_m,
                         BLOCK_N=launch.block_n, num_warps=launch.num_warps)
    q = torch.empty((M, N), dtype=dtype, device=da.device)
    qt = torch.empty((N, M), dtype=dtype, device=da.device)
    inv = torch.empty((), dtype=torch.float32, device=da.device)
    _dh_cast_kernel[grid](da, a, a_inv, biggest, q, qt, inv, M, N, info.max, info.smallest_normal, _TINY_MAX,
                          MANUAL_ROUNDING=interpreted, MANTISSA=round(-math.log2(info.eps)),
                          BLOCK_M=launch.block_m, BLOCK_N=launch.block_n, num_warps=launch.num_warps)
    return q, qt, inv


def _check(da, a, a_inv, dtype):
    if da.dim() != 2 or not da.is_contiguous() or a.shape != da.shape or not a.is_contiguous():
        raise ValueError(f"relu_square_grad_fp8: da and a must be row-major matrices of one shape, got "
                         f"{tuple(da.shape)} {da.stride()} and {tuple(a.shape)} {a.stride()}")
    if dtype not in _TL_FP8 or a.dtype not in _TL_FP8:
        raise TypeError(f"relu_square_grad_fp8: a and the result must be one of {list(_TL_FP8)}, got {a.dtype} "
                        f"and {dtype}")
    if da.numel() == 0:
        raise ValueError(f"relu_square_grad_fp8: da is empty {tuple(da.shape)}: its maximum, so its scale, is undefined")
    if a_inv.numel() != 1 or a_inv.dtype != torch.float32:
        raise ValueError(f"relu_square_grad_fp8: a_inv must be one float32 value, got {a_inv.dtype} of shape "
                         f"{tuple(a_inv.shape)}")


@torch.library.custom_op("fastsft::relu_square_grad_fp8", mutates_args=())
def _relu_square_grad_op(da: torch.Tensor, a: torch.Tensor, a_inv: torch.Tensor,
                         dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if da.is_cuda and da.dtype in _KERNEL_INPUTS:
        return _launch(da, a, a_inv, dtype, DEFAULT_LAUNCH)
    return relu_square_grad_fp8_reference(da, a, a_inv, dtype)


@_relu_square_grad_op.register_fake
def _(da, a, a_inv, dtype):
    M, N = da.shape
    return da.new_empty((M, N), dtype=dtype), da.new_empty((N, M), dtype=dtype), a_inv.new_empty(())


def relu_square_grad_fp8(da: torch.Tensor, a: torch.Tensor, a_inv: torch.Tensor, dtype: torch.dtype, *,
                         launch: GradLaunch | None = None):
    """(q, q^T, 1/s): dh = 2 sqrt(a * a_inv) * da (a = relu(h)^2 in fp8 with inverse scale a_inv, da its gradient,
    both (M, N) row-major) quantized to `dtype` with its own dynamic scale s. `launch` runs the kernels with that
    tile (benchmarks, and the tests under the interpreter); the default goes through the custom op."""
    _check(da, a, a_inv, dtype)
    if launch is not None:
        return _launch(da, a, a_inv.reshape(()), dtype, launch)
    return _relu_square_grad_op(da, a, a_inv.reshape(()), dtype)
