"""Gradients quantized to fp8 in both layouts: the fp8 MLP's dh = 2 sqrt(a) da (one pass for its maximum, one for
the cast), and the fused q/k/v projection's dqkv (the cast alone: its maximum comes with it).

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

Version 2 (version 1, a 2-D tile with an atomic maximum, lost to inductor in the step: 0.45 + 0.49 ms at d20 against
0.24 + 0.35; it is kept in bench/gpu_dh_kernel.py). In version 1's SASS, torch's correctly rounded root was half the
instructions: relu's zeros leave sqrt.rn's fast path, so each element's call was taken by every warp, and the call's
register convention took 200 registers a thread, so one 8-warp program an SM. Here the root is the fast path
alone, with a power of two from a_inv around it (`_dh`): 48 registers for the maximum, under 80 for the cast. The
maximum reads both operands as one flat array, a few programs per SM in a grid-stride loop, each writing one partial
maximum (no atomics, nothing to zero first); each cast program reduces those few itself. Tile shapes, warps and
programs per SM are autotuned per shape from short lists. On an H200 the maximum runs at 3.8 TB/s and the cast at
3.0, 0.13 + 0.28 ms a call at d20: 8.3 ms a step where inductor's passes took 11.6 (bench/RESULTS.md, run 12).

dqkv (`quantize_two_layouts`, the cast with DH off): the fp8 q/k/v projection's backward (fastsft/model.py,
`_QKVProjection`) quantizes its (M, (H + 2 Hkv) D) bf16 gradient for both of its matmuls. Inductor did it in two
passes, the maximum (0.10 ms a d12 layer, M = 65536, width 2304) and the cast into both layouts (0.25 ms; its
transposed one-byte stores strided by M). Here the maximum costs no pass: kernels/qkv_grad.py, which writes dqkv,
folds max |dqkv| of the values it stores into MAX_SLOTS int32 slots by atomic maxima (a non-negative float orders
like its bits read as an int32; a NaN is folded as NAN_BITS, above inf's bits, so it wins and reads back as NaN),
and the cast reduces the slots itself (1 KiB from L2 a program). The result is `fastsft.fp8.quantize` of dqkv bit
for bit, a NaN included: its maximum reads NaN, so the scale, 1/s and every element do, as torch's (where the dh
path counts a NaN as inf). A custom op as dh's, with the same torch path for the CPU and fp32. On an H200 the cast
takes 0.159 ms a d12 layer and 0.133 at d20, where inductor's code for the same maximum and cast, compiled alone,
took 0.692 and 0.274 (bench/gpu_qkv_grad.py, bench/RESULTS.md run 15).
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
MAX_SLOTS = 256  # int32 slots of a maximum folded by atomics (kernels/qkv_grad.py): few writers a slot, 1 KiB to read
NAN_BITS = 0x7FC00000  # a NaN's slot value: the quiet NaN, above every finite value's and inf's bits


@dataclass(frozen=True)
class GradLaunch:
    """One fixed launch of both kernels (the tests, and the benchmark's rows per config); left unset, each kernel
    takes the best of its config list for the shape (autotuned on the first call)."""

    block: int = 4096  # elements of the maximum's pass per program per step
    programs_per_sm: int = 4  # the maximum's programs (so its partial maxima) per SM
    max_warps: int = 8
    block_m: int = 64  # the cast's tile; q^T's rows are block_m bytes
    block_n: int = 128
    cast_warps: int = 4
    m_fastest: bool = True  # the cast's tile order: down a column band (q^T's rows fill up first) or along rows


DEFAULT_LAUNCH = GradLaunch()
# Under the interpreter (one "SM"): 3 programs loop over several blocks of 64 with a partial last one, and the cast's
# tiles are partial in both dimensions on the tests' odd sizes
INTERPRETED_LAUNCH = GradLaunch(64, 3, 1, 16, 32, 1, True)

# The maximum's pass streams 3 bytes an element and is bound by what keeps loads in flight: 16 to 32 elements a
# thread per step (two to four 16-byte loads of da), and enough programs per SM to cover the latency
MAX_CONFIGS = [triton.Config(dict(BLOCK=block, PROGRAMS_PER_SM=programs), num_warps=warps)
               for block, warps, programs in ((4096, 8, 4), (8192, 8, 4), (4096, 8, 8), (4096, 4, 8), (2048, 4, 8),
                                              (8192, 16, 2))]
# The cast: q^T's rows are block_m bytes (64 or 128: whole sectors); 32 to 64 elements a thread
CAST_CONFIGS = [triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, M_FASTEST=m_fastest), num_warps=warps)
                for bm, bn, warps in ((64, 128, 4), (128, 64, 4), (128, 128, 8), (64, 256, 8), (64, 64, 4))
                for m_fastest in (True, False)]


def _quantize_reference(x: torch.Tensor, biggest: torch.Tensor, dtype: torch.dtype):
    """(q, q^T contiguous, 1/s) of x with s = fmax / biggest (biggest = max |x|), as fastsft.fp8.quantize does."""
    fmax = torch.finfo(dtype).max
    scale = fmax / biggest.float().clamp(min=_TINY_MAX)
    q = (x.float() * scale).clamp(-fmax, fmax).to(dtype)
    return q, q.t().clone(memory_format=torch.contiguous_format), scale.reciprocal()


def relu_square_grad_fp8_reference(da: torch.Tensor, a: torch.Tensor, a_inv: torch.Tensor, dtype: torch.dtype):
    """(q, q^T contiguous, 1/s): dh = 2 sqrt(a a_inv) da in da's dtype, quantized as fastsft.fp8.quantize does."""
    dh = (2 * torch.sqrt(a.float() * a_inv) * da).to(da.dtype)
    return _quantize_reference(dh, dh.abs().amax(), dtype)


def max_slots_reference(t: torch.Tensor) -> torch.Tensor:
    """max |t| as the kernels fold it, in torch ops: (MAX_SLOTS,) int32, slot 0 the bits of max |t| in fp32 (NAN_BITS
    where it is NaN), the others 0."""
    biggest = t.detach().abs().amax().float()
    slots = torch.zeros(MAX_SLOTS, dtype=torch.int32, device=t.device)
    slots[0] = torch.where(biggest.isnan(), NAN_BITS, biggest.view(torch.int32))
    return slots


def slots_maximum(slots: torch.Tensor) -> torch.Tensor:
    """The fp32 maximum (a scalar tensor) that int32 slots hold."""
    return slots.max().view(torch.float32)


def quantize_two_layouts_reference(t: torch.Tensor, slots: torch.Tensor, dtype: torch.dtype):
    """(q, q^T contiguous, 1/s): t quantized as fastsft.fp8.quantize does, its maximum read from the slots."""
    return _quantize_reference(t, slots_maximum(slots), dtype)


@triton.jit
def _root_fast_path(x):
    """ptxas's own expansion of sqrt.rn.f32 on [2^-101, 2^128), its fast path (an approximate 1/sqrt and one Newton
    step; sm_90 SASS): the correctly rounded root there, bit for bit, without the range test and the call per lane
    that lead out of it (0 among what leaves it: relu zeroes half of a, so every warp took the call for nearly every
    element; and the call's convention doubled the registers, so halved the warps an SM keeps)."""
    return tl.inline_asm_elementwise(
        """{ .reg .f32 r, s, h, e;
        rsqrt.approx.ftz.f32 r, $1;
        mul.ftz.f32 s, $1, r;
        mul.ftz.f32 h, r, 0f3F000000;
        neg.f32 e, s;
        fma.rn.f32 e, e, s, $1;
        fma.rn.f32 $0, e, h, s; }""",
        "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _dh(da, a, a_inv, INTERPRETED: tl.constexpr):
    """dh = 2 sqrt(a a_inv) da in fp32 (not yet rounded to da's dtype) from da and a as loaded.

    The root is torch's, correctly rounded, for every input. x = a a_inv lies within a factor 2^32 of a_inv (fp8's
    nonzero values, e5m2's included, span 2^-16 to 2^16), so one power of two 2^(2j), from a_inv alone, brings
    every nonzero x into the fast path's range, exactly (also an x that underflowed), and 2^-j takes the root back,
    exactly (every root of a float is normal): sqrt(x 4^j) = sqrt(x) 2^j holds after rounding too. 0 and inf are
    their own roots; a NaN or a negative x gives NaN either way."""
    x = a.to(tl.float32) * a_inv
    up = a_inv < 2.0**-80  # then x < 2^-64: x 2^64 lies in [2^-85, 1)
    down = a_inv > 2.0**100  # then x > 2^84 (or inf): x 2^-64 lies in [2^20, 2^64]
    scaled = x * tl.where(up, 2.0**64, tl.where(down, 2.0**-64, 1.0))
    if INTERPRETED:
        root = tl.sqrt_rn(scaled)  # the interpreter runs no PTX; the scaling around it is the same
    else:
        root = _root_fast_path(scaled)
    root = root * tl.where(up, 2.0**-32, tl.where(down, 2.0**32, 1.0))
    root = tl.where((x == 0) | (x == float("inf")), x, root)
    return 2.0 * root * da.to(tl.float32)


@triton.jit
def _round_to(x, dtype: tl.constexpr, MANUAL_ROUNDING: tl.constexpr):
    """fp32 x rounded to nearest even in dtype (bf16 or fp16) and back to fp32."""
    if MANUAL_ROUNDING and dtype == tl.bfloat16:
        return round_to_bf16(x, True).to(tl.float32)
    return x.to(dtype).to(tl.float32)


@triton.jit
def _abs_bits(x):
    """|x| (fp32) as the int32 a slot folds: its bits, which order as the values do (|x| >= 0), and NAN_BITS for any
    NaN: not the bits abs leaves a NaN with (its sign is not something to count on, and a negative int would lose
    the maximum; a payload such as 0x7FFFFFFF the cast's manual rounding under the interpreter turns into -0)."""
    magnitude = tl.abs(x)
    return tl.where(magnitude == magnitude, magnitude.to(tl.int32, bitcast=True), 0x7FC00000)  # NAN_BITS


@triton.jit
def _dh_max_kernel(da_ptr, a_ptr, a_inv_ptr, partial_ptr, numel, MANUAL_ROUNDING: tl.constexpr,
                   BLOCK: tl.constexpr, PROGRAMS_PER_SM: tl.constexpr):
    """One partial max |dh| per program, over blocks pid, pid + programs, ... of the flat (M * N) operands (both
    row-major, so one index serves both). PROGRAMS_PER_SM sets the grid (the launcher reads it)."""
    pid = tl.program_id(0)
    a_inv = tl.load(a_inv_ptr)
    biggest = tl.zeros([BLOCK], dtype=tl.float32)
    for block in range(pid, tl.cdiv(numel, BLOCK), tl.num_programs(0)):
        offs = tl.cast(block, tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < numel
        # lanes past the end load zeros, so their dh is 0, or NaN where a_inv is not finite, and then every dh is
        dh = _dh(tl.load(da_ptr + offs, mask=ok, other=0.0), tl.load(a_ptr + offs, mask=ok, other=0.0), a_inv,
                 MANUAL_ROUNDING)
        biggest = tl.maximum(biggest, tl.abs(dh), propagate_nan=tl.PropagateNan.ALL)
    biggest = tl.where(biggest == biggest, biggest, float("inf"))  # a NaN counts as inf: the scale becomes 0
    # rounding to da's dtype is monotonic (and odd), so the largest rounded |dh| is the largest |dh| rounded
    tl.store(partial_ptr + pid, _round_to(tl.max(biggest, axis=0), da_ptr.dtype.element_ty, MANUAL_ROUNDING))


@triton.jit
def _cast_kernel(x_ptr, a_ptr, a_inv_ptr, partial_ptr, q_ptr, qt_ptr, inv_ptr, M, N, partials, fmax, tiny, floor,
                 DH: tl.constexpr, MANUAL_ROUNDING: tl.constexpr, MANTISSA: tl.constexpr, PARTIALS: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, M_FASTEST: tl.constexpr):
    """q = x s (M, N) and q^T (N, M), both row-major, and 1/s; s = fmax / max |x| from the partial maxima. DH: x is
    dh = 2 sqrt(a a_inv) da, da at x_ptr, the partial maxima fp32 (_dh_max_kernel's). Else x is x_ptr's matrix as
    it is (a_ptr and a_inv_ptr unread) and the partial maxima are int32 slots (`_abs_bits`)."""
    pid = tl.program_id(0)
    if M_FASTEST:
        tiles_m = tl.cdiv(M, BLOCK_M)
        pid_m, pid_n = pid % tiles_m, pid // tiles_m
    else:
        tiles_n = tl.cdiv(N, BLOCK_N)
        pid_m, pid_n = pid // tiles_n, pid % tiles_n
    # every program reduces the few partial maxima itself (a few KiB out of L2): no third launch
    slots = tl.arange(0, PARTIALS)
    biggest = tl.max(tl.load(partial_ptr + slots, mask=slots < partials, other=0), axis=0)
    if not DH:
        biggest = biggest.to(tl.float32, bitcast=True)  # the int maximum of the bits is the bits of the maximum
    # fmax / m as torch computes a number over a tensor: 1 / m rounded, times fmax rounded (not one division); a
    # NaN maximum (only DH off has one) makes the scale NaN, as torch's clamp keeps it
    scale = tl.div_rn(1.0, tl.maximum(biggest, floor, propagate_nan=tl.PropagateNan.ALL)) * fmax
    if pid == 0:
        tl.store(inv_ptr, tl.div_rn(1.0, scale))
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m64 = offs_m.to(tl.int64)
    n64 = offs_n.to(tl.int64)
    ok = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    at = m64[:, None] * N + n64[None, :]
    if DH:
        dh = _dh(tl.load(x_ptr + at, mask=ok, other=0.0), tl.load(a_ptr + at, mask=ok, other=0.0),
                 tl.load(a_inv_ptr), MANUAL_ROUNDING)
        x = _round_to(dh, x_ptr.dtype.element_ty, MANUAL_ROUNDING)
    else:
        x = tl.load(x_ptr + at, mask=ok, other=0.0).to(tl.float32)
    q = x * scale
    # a NaN-propagating clamp, as torch's: a NaN stays NaN
    q = tl.maximum(tl.minimum(q, fmax, propagate_nan=tl.PropagateNan.ALL), -fmax, propagate_nan=tl.PropagateNan.ALL)
    if MANUAL_ROUNDING:
        q = _round_to_fp8_grid(q, tiny, MANTISSA)
    q = q.to(q_ptr.dtype.element_ty)
    tl.store(q_ptr + at, q, mask=ok)
    tl.store(qt_ptr + n64[:, None] * M + m64[None, :], tl.trans(q),
             mask=(offs_n < N)[:, None] & (offs_m < M)[None, :])


_dh_max_tuned = triton.autotune(MAX_CONFIGS, key=["numel"])(_dh_max_kernel)
_cast_tuned = triton.autotune(CAST_CONFIGS, key=["M", "N", "DH"])(_cast_kernel)


def _sm_count(device):
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _max_programs(sms, numel, meta):
    return min(sms * meta["PROGRAMS_PER_SM"], triton.cdiv(numel, meta["BLOCK"]))


def _max_pass(da, a, a_inv, partial, launch, interpreted):
    """The partial maxima of |dh| into `partial`; returns how many (the slots the cast reads)."""
    sms = _sm_count(da.device)
    grid = lambda meta: (_max_programs(sms, da.numel(), meta),)  # noqa: E731
    args = (da, a, a_inv, partial, da.numel())
    if launch is None:
        _dh_max_tuned[grid](*args, MANUAL_ROUNDING=False)
        return _max_programs(sms, da.numel(), _dh_max_tuned.best_config.kwargs)
    meta = dict(BLOCK=launch.block, PROGRAMS_PER_SM=launch.programs_per_sm)
    _dh_max_kernel[grid](*args, MANUAL_ROUNDING=interpreted, **meta, num_warps=launch.max_warps)
    return _max_programs(sms, da.numel(), meta)


def _cast_pass(x, a, a_inv, partial, partials, q, qt, inv, launch, interpreted, dh=True):
    """q, q^T and 1/s from the partial maxima; dh: x is da and q is dh's (a and a_inv unread without)."""
    M, N = x.shape
    info = torch.finfo(q.dtype)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    args = (x, a, a_inv, partial, q, qt, inv, M, N, partials, info.max, info.smallest_normal, _TINY_MAX)
    meta = dict(DH=dh, MANUAL_ROUNDING=interpreted, MANTISSA=round(-math.log2(info.eps)),
                PARTIALS=triton.next_power_of_2(partials))
    if launch is None:
        _cast_tuned[grid](*args, **meta)
    else:
        _cast_kernel[grid](*args, **meta, BLOCK_M=launch.block_m, BLOCK_N=launch.block_n, M_FASTEST=launch.m_fastest,
                           num_warps=launch.cast_warps)


def partial_slots(device, launch):
    """The length of the partial maxima's buffer: enough for every config's grid."""
    return _sm_count(device) * max([c.kwargs["PROGRAMS_PER_SM"] for c in MAX_CONFIGS]
                                   + [launch.programs_per_sm if launch else 0])


def _cast(x, a, a_inv, partial, partials, dtype, launch, interpreted, dh):
    """_cast_pass into q, q^T and 1/s allocated here."""
    M, N = x.shape
    q = torch.empty((M, N), dtype=dtype, device=x.device)
    qt = torch.empty((N, M), dtype=dtype, device=x.device)
    inv = torch.empty((), dtype=torch.float32, device=x.device)
    _cast_pass(x, a, a_inv, partial, partials, q, qt, inv, launch, interpreted, dh)
    return q, qt, inv


def _kernel_launch(x, name, launch):
    """(launch, interpreted): the interpreter's fixed launch on the CPU, else `launch` (None: autotuned); a dtype the
    kernels do not take on CUDA is refused."""
    if x.is_cuda and x.dtype not in _KERNEL_INPUTS:
        raise TypeError(f"{name}: the kernels take {list(_KERNEL_INPUTS)} on CUDA, got {x.dtype}; leave launch= "
                        "unset for the torch path")
    interpreted = interpreter_enabled() and x.device.type == "cpu"
    return (INTERPRETED_LAUNCH if interpreted else launch), interpreted


def _launch(da, a, a_inv, dtype, launch):
    """launch None: each kernel's best config for the shape (autotuned); a GradLaunch: that one."""
    launch, interpreted = _kernel_launch(da, "relu_square_grad_fp8", launch)
    partial = torch.empty(partial_slots(da.device, launch), dtype=torch.float32, device=da.device)
    partials = _max_pass(da, a, a_inv, partial, launch, interpreted)  # every slot the cast reads is written
    return _cast(da, a, a_inv, partial, partials, dtype, launch, interpreted, dh=True)


def _launch_two_layouts(t, slots, dtype, launch):
    """The cast alone (DH off), its maximum from the slots; launch None: autotuned."""
    launch, interpreted = _kernel_launch(t, "quantize_two_layouts", launch)
    return _cast(t, t, t, slots, MAX_SLOTS, dtype, launch, interpreted, dh=False)  # t for a and a_inv: unread


def _check(da, a, a_inv, dtype):
    if da.dim() != 2 or not da.is_contiguous() or a.shape != da.shape or not a.is_contiguous():
        raise ValueError(f"relu_square_grad_fp8: da and a must be row-major matrices of one shape, got "
                         f"{tuple(da.shape)} {da.stride()} and {tuple(a.shape)} {a.stride()}")
    if dtype not in _TL_FP8 or a.dtype not in _TL_FP8:
        raise TypeError(f"relu_square_grad_fp8: a and the result must be one of {list(_TL_FP8)}, got {a.dtype} "
                        f"and {dtype}")
    if da.numel() == 0:
        raise ValueError(f"relu_square_grad_fp8: da is empty {tuple(da.shape)}: its maximum, so its scale, is "
                         "undefined")
    if a_inv.numel() != 1 or a_inv.dtype != torch.float32:
        raise ValueError(f"relu_square_grad_fp8: a_inv must be one float32 value, got {a_inv.dtype} of shape "
                         f"{tuple(a_inv.shape)}")


@torch.library.custom_op("fastsft::relu_square_grad_fp8", mutates_args=())
def _relu_square_grad_op(da: torch.Tensor, a: torch.Tensor, a_inv: torch.Tensor,
                         dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if da.is_cuda and da.dtype in _KERNEL_INPUTS:
        return _launch(da, a, a_inv, dtype, None)
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


def _check_two_layouts(t, slots, dtype):
    if t.dim() != 2 or not t.is_contiguous() or t.numel() == 0:
        raise ValueError(f"quantize_two_layouts: t must be a non-empty row-major matrix, got {tuple(t.shape)} "
                         f"{t.stride()}")
    if dtype not in _TL_FP8 or t.dtype not in (*_KERNEL_INPUTS, torch.float32):
        raise TypeError(f"quantize_two_layouts: t must be bf16, fp16 or fp32 and the result one of {list(_TL_FP8)}, "
                        f"got {t.dtype} and {dtype}")
    if slots.shape != (MAX_SLOTS,) or slots.dtype != torch.int32 or slots.device != t.device:
        raise ValueError(f"quantize_two_layouts: slots must be ({MAX_SLOTS},) int32 on t's device, got "
                         f"{tuple(slots.shape)} {slots.dtype} on {slots.device}")


@torch.library.custom_op("fastsft::quantize_two_layouts", mutates_args=())
def _quantize_two_layouts_op(t: torch.Tensor, slots: torch.Tensor,
                             dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if t.is_cuda and t.dtype in _KERNEL_INPUTS:
        return _launch_two_layouts(t, slots, dtype, None)
    return quantize_two_layouts_reference(t, slots, dtype)


@_quantize_two_layouts_op.register_fake
def _(t, slots, dtype):
    M, N = t.shape
    return t.new_empty((M, N), dtype=dtype), t.new_empty((N, M), dtype=dtype), t.new_empty((), dtype=torch.float32)


def quantize_two_layouts(t: torch.Tensor, slots: torch.Tensor, dtype: torch.dtype, *,
                         launch: GradLaunch | None = None):
    """(q, q^T, 1/s): t (M, N) row-major quantized to `dtype` as fastsft.fp8.quantize does, bit for bit, in both
    layouts (q^T contiguous), its maximum max |t| read from `slots` ((MAX_SLOTS,) int32 that the kernel writing t
    folded it into, as `_abs_bits`: kernels/qkv_grad.py with maxima=True; `max_slots_reference` in torch ops). `launch`
    runs the cast kernel with that tile (its block_m, block_n, cast_warps and m_fastest: benchmarks, and the tests
    under the interpreter); the default goes through the custom op."""
    _check_two_layouts(t, slots, dtype)
    if launch is not None:
        return _launch_two_layouts(t, slots, dtype, launch)
    return _quantize_two_layouts_op(t, slots, dtype)
