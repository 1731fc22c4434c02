"""relu(h)^2 of the fp8 MLP, quantized to fp8 in one pass over h, in either layout or both: a (M, N) and a^T (N, M).

Why: the fp8 MLP needs relu(h)^2 of c_fc's output h as an fp8 operand twice: row-major for c_proj's forward, and
transposed for c_proj's weight gradient (Hopper's fp8 matmul reads both operands with the reduced dimension
contiguous); it keeps the transposed copy for its backward in place of h. Inductor writes a transposed copy with
one-byte stores strided by the row length: 9.9 ms per d20 step, 0.5 ms a layer (bench/RESULTS.md, run 6). Here each
program loads one (BLOCK_M, BLOCK_N) tile of h, squares and quantizes it once and stores it in the layouts asked
for; Triton moves the transposed store through shared memory, so it writes whole lines (both layouts at 32768 x 5120
in 0.20 ms against inductor's 0.29, run 7).

Only here: h is in memory anyway. The same kernel for every fp8 cast lost in the step (run 7): inductor fuses a
cast into the kernel that produces its operand, and a kernel of its own needs the operand written out first.

relu(h)^2 is rounded to h's dtype before it is scaled, as `r * r` in that dtype rounds it; both layouts come from
one pass, so the forward's operand and the one the backward keeps are the same bits. The scale is a device scalar
(no host sync). Rounding is to nearest even and the clamp saturates at the format's largest finite value, as
`fastsft.fp8.cast` does; a NaN stays NaN. Registered as a torch custom op, so torch.compile calls it as one opaque
kernel. It runs on CUDA for bf16 and fp16 h; fp32 h (no autocast) and the CPU take the same definition in torch ops:
on the H200, fp32 tiles gave wrong transposed copies (run 7). The tests run the kernel on the CPU under the
interpreter through `launch=`.
"""

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._multi_tensor import interpreter_enabled, round_to_bf16

_TL_FP8 = {torch.float8_e4m3fn: tl.float8e4nv, torch.float8_e5m2: tl.float8e5}
_KERNEL_INPUTS = (torch.bfloat16, torch.float16)  # fp32 tiles: wrong transposed copies on the H200 (run 7)


@dataclass(frozen=True)
class SquareLaunch:
    """The GPU launch shape; benchmarks pass variants to relu_square_fp8(launch=...)."""

    block_m: int = 128
    block_n: int = 128
    num_warps: int = 8


DEFAULT_LAUNCH = SquareLaunch()  # the best of six tiles for both layouts at 32768 x 5120 (run 7)
INTERPRETED_LAUNCH = SquareLaunch(16, 32, 1)  # partial tiles in both dimensions on small test inputs


def relu_square_fp8_reference(h: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype):
    """(a, a^T contiguous), a = relu(h)^2 in h's dtype, scaled, clamped and rounded to dtype, by torch ops: the
    definition the kernel is tested against."""
    r = torch.relu(h)
    fmax = torch.finfo(dtype).max
    a = ((r * r).float() * scale).clamp(-fmax, fmax).to(dtype)
    return a, a.t().clone(memory_format=torch.contiguous_format)  # a copy even where M or N is 1 (no alias)


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
    sub = (((a + magic) - magic).to(tl.uint32, bitcast=True) | (bits & 0x80000000)).to(tl.float32, bitcast=True)
    return tl.where(a < tiny, sub, normal)  # the sign from y's bits: -0 (and what rounds to it) stays -0


@triton.jit
def _relu_square_kernel(h_ptr, scale_ptr, a_ptr, at_ptr, M, N, stride_hm, fmax, tiny, ROWS: tl.constexpr,
                        COLS: tl.constexpr, MANUAL_ROUNDING: tl.constexpr, MANTISSA: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m64 = offs_m.to(tl.int64)
    n64 = offs_n.to(tl.int64)
    ok = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    r = tl.load(h_ptr + m64[:, None] * stride_hm + n64[None, :], mask=ok, other=0.0).to(tl.float32)
    r = tl.where(r < 0, 0.0, r)  # not maximum(): relu of NaN is NaN, as torch's
    a = r * r
    if MANUAL_ROUNDING and h_ptr.dtype.element_ty == tl.bfloat16:
        a = round_to_bf16(a, True)
    a = a.to(h_ptr.dtype.element_ty).to(tl.float32) * tl.load(scale_ptr)  # rounded to h's dtype, as r * r there
    a = tl.where(a > fmax, fmax, a)  # a comparison, not minimum(): a NaN stays NaN (a >= 0)
    if MANUAL_ROUNDING:
        a = _round_to_fp8_grid(a, tiny, MANTISSA)
    a = a.to(a_ptr.dtype.element_ty)
    if ROWS:
        tl.store(a_ptr + m64[:, None] * N + n64[None, :], a, mask=ok)
    if COLS:
        tl.store(at_ptr + n64[:, None] * M + m64[None, :], tl.trans(a),
                 mask=(offs_n < N)[:, None] & (offs_m < M)[None, :])


def _launch(h, scale, dtype, rows, cols, launch):
    if h.is_cuda and h.dtype not in _KERNEL_INPUTS:
        raise TypeError(f"relu_square_fp8: the kernel takes {list(_KERNEL_INPUTS)} h on CUDA, got {h.dtype} (fp32 "
                        "tiles gave wrong transposed copies on the H200); leave launch= unset for the torch path")
    M, N = h.shape
    a = torch.empty((M, N) if rows else (0,), dtype=dtype, device=h.device)
    at = torch.empty((N, M) if cols else (0,), dtype=dtype, device=h.device)
    interpreted = interpreter_enabled() and h.device.type == "cpu"
    launch = INTERPRETED_LAUNCH if interpreted else launch
    info = torch.finfo(dtype)
    grid = (triton.cdiv(M, launch.block_m), triton.cdiv(N, launch.block_n))
    _relu_square_kernel[grid](h, scale, a, at, M, N, h.stride(0), info.max, info.smallest_normal, ROWS=rows,
                              COLS=cols, MANUAL_ROUNDING=interpreted, MANTISSA=round(-math.log2(info.eps)),
                              BLOCK_M=launch.block_m, BLOCK_N=launch.block_n, num_warps=launch.num_warps)
    return a, at


def _check(h, scale, dtype):
    if h.dim() != 2 or h.stride(1) != 1:
        raise ValueError(f"relu_square_fp8: h must be a row-major (M, N) matrix, got shape {tuple(h.shape)} "
                         f"strides {h.stride()}")
    if dtype not in _TL_FP8:
        raise TypeError(f"relu_square_fp8: dtype must be one of {list(_TL_FP8)}, got {dtype}")
    if scale.numel() != 1 or scale.dtype != torch.float32:
        raise ValueError(f"relu_square_fp8: scale must be one float32 value, got {scale.dtype} of shape "
                         f"{tuple(scale.shape)}")


@torch.library.custom_op("fastsft::relu_square_fp8", mutates_args=())
def _relu_square_op(h: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, rows: bool,
                    cols: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if h.is_cuda and h.dtype in _KERNEL_INPUTS:
        return _launch(h, scale, dtype, rows, cols, DEFAULT_LAUNCH)
    a, at = relu_square_fp8_reference(h, scale, dtype)
    empty = a.new_empty(0)
    return (a if rows else empty), (at if cols else empty.clone())


@_relu_square_op.register_fake
def _(h, scale, dtype, rows, cols):
    M, N = h.shape
    return (h.new_empty((M, N) if rows else (0,), dtype=dtype),
            h.new_empty((N, M) if cols else (0,), dtype=dtype))


def relu_square_fp8(h: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, *, rows: bool = True,
                    cols: bool = True, launch: SquareLaunch | None = None):
    """(a, a^T), a = relu(h)^2 quantized with `scale` (a device scalar), in the layouts asked for (an empty tensor
    stands for a layout not asked for). `launch` runs the kernel with that tile (benchmarks, and the tests under
    the interpreter); the default goes through the custom op."""
    _check(h, scale, dtype)
    if launch is not None:
        return _launch(h, scale.reshape(()), dtype, rows, cols, launch)
    return _relu_square_op(h, scale.reshape(()), dtype, rows, cols)
