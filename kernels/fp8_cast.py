"""A bf16 matrix to fp8 in both layouts in one pass: q (M, N) and its transpose (N, M), both row-major.

Why: Hopper's fp8 matmul reads both operands with the reduced dimension contiguous, so each fp8 projection's
weight gradient needs its input and its output gradient stored transposed as well (fastsft/fp8.py). Inductor writes
that copy with one-byte stores strided by the row length, about 1 TB/s on the H200 (bench/RESULTS.md, run 6).
Here each program loads one (BLOCK_M, BLOCK_N) tile, quantizes it once and stores it twice; Triton moves the
transposed copy through shared memory, so both stores write whole lines.

`relu_square=True` quantizes relu(x)^2 (x is the MLP's c_fc output) with the square rounded to x's dtype first, as
`r * r` in that dtype rounds it: the operand is the one the forward quantized, bit for bit.

The scale is a device scalar (no host sync). Rounding is to nearest even and the clamp saturates at the format's
largest finite value, as `fastsft.fp8.cast` does; a NaN stays NaN. Registered as a torch custom op, so
torch.compile calls it as one opaque kernel; on the CPU it computes the same with torch ops (the tests run the
kernel there under the interpreter through `launch=`).
"""

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._multi_tensor import interpreter_enabled, round_to_bf16

_TL_FP8 = {torch.float8_e4m3fn: tl.float8e4nv, torch.float8_e5m2: tl.float8e5}


@dataclass(frozen=True)
class CastLaunch:
    """The GPU launch shape; benchmarks pass variants to cast_fp8(launch=...)."""

    block_m: int = 128
    block_n: int = 128
    num_warps: int = 8


DEFAULT_LAUNCH = CastLaunch()
INTERPRETED_LAUNCH = CastLaunch(16, 32, 1)  # partial tiles in both dimensions on small test inputs


def cast_reference(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, relu_square: bool = False):
    """(q, q^T contiguous) by torch ops: the definition the kernel is tested against."""
    if relu_square:
        r = torch.relu(x)
        x = r * r
    fmax = torch.finfo(dtype).max
    q = (x.float() * scale).clamp(-fmax, fmax).to(dtype)
    return q, q.t().contiguous()


@triton.jit
def _round_to_fp8_grid(y, tiny, MANTISSA: tl.constexpr):
    """y (fp32, within the format's finite range) rounded to nearest even on the fp8 grid, in fp32: the
    interpreter's own conversion rounds some values to half their neighbour, so under it the rounding is done here
    and the conversion that follows is exact. tiny: the format's smallest normal value."""
    SHIFT: tl.constexpr = 23 - MANTISSA
    bits = y.to(tl.uint32, bitcast=True)
    normal = ((bits + ((1 << (SHIFT - 1)) - 1) + ((bits >> SHIFT) & 1)) >> SHIFT << SHIFT).to(tl.float32,
                                                                                             bitcast=True)
    magic = tiny * (1 << SHIFT)  # a float whose spacing is the subnormal step, so the sum rounds to that grid
    a = tl.abs(y)
    sub = tl.where(y < 0, -1.0, 1.0) * ((a + magic) - magic)
    return tl.where(a < tiny, sub, normal)


@triton.jit
def _cast_kernel(x_ptr, scale_ptr, q_ptr, qt_ptr, M, N, stride_xm, fmax, tiny, RELU_SQUARE: tl.constexpr,
                 ROWS: tl.constexpr, COLS: tl.constexpr, MANUAL_ROUNDING: tl.constexpr, MANTISSA: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m64 = offs_m.to(tl.int64)
    n64 = offs_n.to(tl.int64)
    ok = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    x = tl.load(x_ptr + m64[:, None] * stride_xm + n64[None, :], mask=ok, other=0.0)
    if RELU_SQUARE:
        r = x.to(tl.float32)
        r = tl.where(r < 0, 0.0, r)  # not maximum(): relu of NaN is NaN, as torch's
        x = r * r
        if MANUAL_ROUNDING and x_ptr.dtype.element_ty == tl.bfloat16:
            x = round_to_bf16(x, True)
        x = x.to(x_ptr.dtype.element_ty)  # rounded to x's dtype, as r * r there
    y = x.to(tl.float32) * tl.load(scale_ptr)
    y = tl.where(y > fmax, fmax, tl.where(y < -fmax, -fmax, y))  # comparisons, not min/max: a NaN stays NaN
    if MANUAL_ROUNDING:
        y = _round_to_fp8_grid(y, tiny, MANTISSA)
    y = y.to(q_ptr.dtype.element_ty)
    if ROWS:
        tl.store(q_ptr + m64[:, None] * N + n64[None, :], y, mask=ok)
    if COLS:
        tl.store(qt_ptr + n64[:, None] * M + m64[None, :], tl.trans(y),
                 mask=(offs_n < N)[:, None] & (offs_m < M)[None, :])


def _launch(x, scale, dtype, relu_square, rows, cols, launch):
    M, N = x.shape
    q = torch.empty((M, N) if rows else (0,), dtype=dtype, device=x.device)
    qt = torch.empty((N, M) if cols else (0,), dtype=dtype, device=x.device)
    interpreted = interpreter_enabled() and x.device.type == "cpu"
    launch = INTERPRETED_LAUNCH if interpreted else launch
    info = torch.finfo(dtype)
    grid = (triton.cdiv(M, launch.block_m), triton.cdiv(N, launch.block_n))
    _cast_kernel[grid](x, scale, q, qt, M, N, x.stride(0), info.max, info.smallest_normal, RELU_SQUARE=relu_square,
                       ROWS=rows, COLS=cols, MANUAL_ROUNDING=interpreted, MANTISSA=round(-math.log2(info.eps)),
                       BLOCK_M=launch.block_m, BLOCK_N=launch.block_n, num_warps=launch.num_warps)
    return q, qt


def _check(x, scale, dtype):
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"cast_fp8: x must be a row-major (M, N) matrix, got shape {tuple(x.shape)} "
                         f"strides {x.stride()}")
    if dtype not in _TL_FP8:
        raise TypeError(f"cast_fp8: dtype must be one of {list(_TL_FP8)}, got {dtype}")
    if scale.numel() != 1 or scale.dtype != torch.float32:
        raise ValueError(f"cast_fp8: scale must be one float32 value, got {scale.dtype} of shape {tuple(scale.shape)}")


@torch.library.custom_op("fastsft::cast_fp8", mutates_args=())
def _cast_op(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, relu_square: bool, rows: bool,
             cols: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if x.is_cuda:  # on the CPU, even under the interpreter, torch's ops: the model's fp8 tests stay fast
        return _launch(x, scale, dtype, relu_square, rows, cols, DEFAULT_LAUNCH)
    q, qt = cast_reference(x, scale, dtype, relu_square)
    empty = q.new_empty(0)
    return (q if rows else empty), (qt if cols else empty.clone())


@_cast_op.register_fake
def _(x, scale, dtype, relu_square, rows, cols):
    M, N = x.shape
    return (x.new_empty((M, N) if rows else (0,), dtype=dtype),
            x.new_empty((N, M) if cols else (0,), dtype=dtype))


def cast_fp8(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, *, relu_square: bool = False,
             rows: bool = True, cols: bool = True, launch: CastLaunch | None = None):
    """(q, q^T): x (M, N) times scale, clamped to dtype's finite range and rounded to dtype, in the layouts asked
    for (an empty tensor stands for a layout not asked for). `launch` picks a GPU tile (benchmarks); the default
    goes through the custom op."""
    _check(x, scale, dtype)
    if launch is not None:
        return _launch(x, scale.reshape(()), dtype, relu_square, rows, cols, launch)
    return _cast_op(x, scale.reshape(()), dtype, relu_square, rows, cols)
