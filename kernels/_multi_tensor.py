"""Shared plumbing of the fused optimizer kernels: tables of tensor addresses and the Triton/CPU switch.

A fused optimizer step touches many tensors in one launch. Each kernel reads a small int64 table of raw
device addresses (one row per tensor) and casts them to typed pointers, so the parameters never need to live in
one flat buffer. The tables are built on the host and uploaded through pinned memory with a non-blocking copy,
which queues behind the previous work instead of waiting for it (no host sync).
"""

import os

import torch
import triton
import triton.language as tl

# Kernels use 16-byte vector loads when every table address is a multiple of this (the caching allocator gives
# 512-byte aligned blocks; only views with odd storage offsets miss it).
ALIGN_BYTES = 16

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def interpreter_enabled() -> bool:
    """True when Triton runs kernels on the CPU (TRITON_INTERPRET=1), as in the CPU test suite."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def runs_triton(device: torch.device) -> bool:
    """Whether tensors on `device` go through the Triton kernels (CUDA, or any device under the interpreter)."""
    return device.type == "cuda" or (device.type == "cpu" and interpreter_enabled())


def tl_dtype(dtype: torch.dtype, where: str):
    """The Triton element type of a supported floating dtype; a clear error otherwise."""
    if dtype not in _TL_DTYPES:
        raise TypeError(f"{where}: unsupported dtype {dtype}; expected one of float32, bfloat16, float16")
    return _TL_DTYPES[dtype]


def device_table(rows: list, device: torch.device) -> torch.Tensor:
    """An int64 tensor on `device` holding `rows` (ints), uploaded without a host sync."""
    host = torch.tensor(rows, dtype=torch.int64)
    if device.type == "cpu":
        return host
    # Pinned memory from torch's caching host allocator: the block is not reused before the copy has run.
    return host.pin_memory().to(device, non_blocking=True)


@triton.jit
def round_to_bf16(x, MANUAL: tl.constexpr):
    """fp32 -> bf16 with round-to-nearest-even. The interpreter truncates on conversion, so under it the
    rounding is done on the bits (finite values only; optimizer states are finite)."""
    if MANUAL:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(tl.bfloat16)


@triton.jit
def table_pointers(address_ptr, offs, DTYPE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """Pointers `offs` into the tensor whose int64 address sits at `address_ptr` of a device table.

    With ALIGNED (every address 16-byte aligned, blocks starting at multiples of BLOCK) the pointer tensor is hinted
    for 16-byte vector accesses: a hint on the int64 address itself is lost through the int-to-pointer cast.
    """
    ptrs = tl.load(address_ptr).to(tl.pointer_type(DTYPE)) + offs
    if ALIGNED:
        ptrs = tl.max_contiguous(tl.multiple_of(ptrs, 16), BLOCK)
    return ptrs


def params_with_grads(optimizer: str, gi: int, group: dict):
    """Yield the group's parameters that have a gradient, after the checks every fused step needs."""
    for pi, p in enumerate(group["params"]):
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            raise TypeError(f"{optimizer}: parameter {pi} of group {gi} has a sparse gradient; not supported")
        if not p.is_contiguous():
            raise ValueError(f"{optimizer}: parameter {pi} of group {gi} (shape {tuple(p.shape)}) is not contiguous")
        yield p


def check_skip(skip, device: torch.device, where: str):
    """Validate a device-side skip flag (None, or a 0-dim bool / integer tensor on `device`) without reading it.

    Shared by the optimizers. Only metadata (dim, dtype, device) is looked at: the value stays on the device.
    """
    if skip is None:
        return None
    if not torch.is_tensor(skip):
        raise TypeError(f"{where}: skip must be None or a 0-dim tensor on {device}, got {type(skip).__name__}")
    if skip.dim() != 0:
        raise ValueError(f"{where}: skip must be a 0-dim tensor, got shape {tuple(skip.shape)}")
    if skip.dtype.is_floating_point or skip.dtype.is_complex:
        raise TypeError(f"{where}: skip must be a bool or integer tensor, got {skip.dtype}")
    if skip.device != device:
        raise ValueError(f"{where}: skip is on {skip.device}, the parameters on {device}")
    return skip
