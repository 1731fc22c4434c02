"""dh = 2 sqrt(a) da to fp8 in both layouts (kernels/fp8_relu_square_grad.py) on the GPU at the fp8 MLP's backward
shapes: version 1 (a 2-D tile and an atomic maximum; 0.45 + 0.49 ms at d20 in the step, slower than inductor),
version 2 (the module's kernels: each config, and the autotuned choice), and inductor's code for the same definition
(torch.compile of `relu_square_grad_fp8_reference`), each pass timed on its own where it is ours; version 2 checked
bit for bit against the definition. Version 1 is kept here as it was (commit "dh kernel after review"), so the
history reruns. A table comes last: ms per call and GB/s (the maximum reads 3 bytes an element, the cast 3 and writes
2, inductor's two passes together 8).

The shapes are da's in the step, (4 n_embd, tokens) (fastsft/fp8.py's backward takes da transposed), and the same
transposed.

    python bench/gpu_dh_kernel.py [--json rows.json]          # the GPU (about 2 minutes, most of it compiling)
    python bench/gpu_dh_kernel.py --tiny --device cpu         # the interpreter on tiny shapes: that it runs
"""

import argparse
import math
import os
import sys
from pathlib import Path

if "--device" in sys.argv and sys.argv[sys.argv.index("--device") + 1] == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton's first import

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shapes import STEP_ROWS  # noqa: E402
from timing import median_ms, write_rows  # noqa: E402

from fastsft import fp8  # noqa: E402
from fastsft.kernels import fp8_relu_square as rs  # noqa: E402
from fastsft.kernels import fp8_relu_square_grad as rg  # noqa: E402
from fastsft.kernels._multi_tensor import round_to_bf16  # noqa: E402
from fastsft.kernels.fp8_relu_square import _round_to_fp8_grid  # noqa: E402
from fastsft.model import GPTConfig  # noqa: E402

TINY_SHAPES = {"tiny": (40, 72), "tiny^T": (72, 40)}


def step_shapes():
    """da in the step: (4 n_embd, tokens of a micro-batch), d20 then d12; each also transposed."""
    shapes = {}
    for name in ("d20", "d12"):
        config = GPTConfig.from_name(name)
        rows, cols = 4 * config.n_embd, STEP_ROWS[name] * config.sequence_len
        shapes[name] = (rows, cols)
        shapes[name + "^T"] = (cols, rows)
    return shapes


# ---- version 1, as committed before this benchmark (the 2-D tile kernels and their launch) ----

@triton.jit
def _v1_tile(da_ptr, a_ptr, a_inv, offs_m, offs_n, M, N, MANUAL_ROUNDING: tl.constexpr):
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
def _v1_max_kernel(da_ptr, a_ptr, a_inv_ptr, max_ptr, M, N, MANUAL_ROUNDING: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    dh, ok = _v1_tile(da_ptr, a_ptr, tl.load(a_inv_ptr), offs_m, offs_n, M, N, MANUAL_ROUNDING)
    size = tl.where(dh == dh, tl.abs(dh), float("inf"))  # a NaN counts as inf: the scale becomes 0, dh * 0 NaN
    tl.atomic_max(max_ptr, tl.max(tl.max(tl.where(ok, size, 0.0), axis=1), axis=0))  # >= 0: int order holds


@triton.jit
def _v1_cast_kernel(da_ptr, a_ptr, a_inv_ptr, max_ptr, q_ptr, qt_ptr, inv_ptr, M, N, fmax, tiny, floor,
                    MANUAL_ROUNDING: tl.constexpr, MANTISSA: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # fmax / m as torch computes a number over a tensor: 1 / m rounded, times fmax rounded (not one division)
    scale = tl.div_rn(1.0, tl.maximum(tl.load(max_ptr), floor)) * fmax
    if (pid_m == 0) & (pid_n == 0):
        tl.store(inv_ptr, tl.div_rn(1.0, scale))
    dh, ok = _v1_tile(da_ptr, a_ptr, tl.load(a_inv_ptr), offs_m, offs_n, M, N, MANUAL_ROUNDING)
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


def v1_passes(da, a, a_inv, dtype, block_m, block_n, num_warps, interpreted):
    """Version 1's two launches, each a callable (the maximum into a zeroed float, then the cast)."""
    M, N = da.shape
    info = torch.finfo(dtype)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    biggest = torch.zeros((), dtype=torch.float32, device=da.device)
    q = torch.empty((M, N), dtype=dtype, device=da.device)
    qt = torch.empty((N, M), dtype=dtype, device=da.device)
    inv = torch.empty((), dtype=torch.float32, device=da.device)

    def max_pass():
        biggest.zero_()  # part of version 1's cost: its atomic maximum needs a zeroed float
        _v1_max_kernel[grid](da, a, a_inv, biggest, M, N, MANUAL_ROUNDING=interpreted, BLOCK_M=block_m,
                             BLOCK_N=block_n, num_warps=num_warps)

    def cast_pass():
        _v1_cast_kernel[grid](da, a, a_inv, biggest, q, qt, inv, M, N, info.max, info.smallest_normal, 1e-12,
                              MANUAL_ROUNDING=interpreted, MANTISSA=round(-math.log2(info.eps)), BLOCK_M=block_m,
                              BLOCK_N=block_n, num_warps=num_warps)

    return max_pass, cast_pass, (q, qt, inv)


# ---- version 2: the module's kernels, one pass at a time ----

def v2_passes(da, a, a_inv, dtype, launch, interpreted):
    """The module's two passes as callables; launch None: the autotuned choice."""
    M, N = da.shape
    partial = torch.empty(rg.partial_slots(da.device, launch), dtype=torch.float32, device=da.device)
    q = torch.empty((M, N), dtype=dtype, device=da.device)
    qt = torch.empty((N, M), dtype=dtype, device=da.device)
    inv = torch.empty((), dtype=torch.float32, device=da.device)
    partials = [rg._max_pass(da, a, a_inv, partial, launch, interpreted)]  # tunes, on the first call

    def max_pass():
        partials[0] = rg._max_pass(da, a, a_inv, partial, launch, interpreted)

    def cast_pass():
        rg._cast_pass(da, a, a_inv, partial, partials[0], q, qt, inv, launch, interpreted)

    return max_pass, cast_pass, (q, qt, inv)


def operands(M, N, device):
    """da (bf16) and a = relu(h)^2 in e4m3 with its inverse scale, as the MLP's backward gets them."""
    h = torch.randn(M, N, device=device).bfloat16() * 3
    scale = fp8.scale_for(torch.relu(h) * torch.relu(h), fp8.E4M3)
    a, _ = rs.relu_square_fp8_reference(h, scale, fp8.E4M3)
    da = (torch.randn(M, N, device=device) * 1e-3).bfloat16()
    return da, a, scale.reciprocal()


def exact(got, want):
    return all(torch.equal(g.view(torch.uint8) if g.dtype != torch.float32 else g,
                           w.view(torch.uint8) if w.dtype != torch.float32 else w) for g, w in zip(got, want))


def fixed_launches():
    """Each config of both lists as a fixed launch (the other kernel at the module's default)."""
    d = rg.DEFAULT_LAUNCH
    out = [(f"max {c.kwargs['BLOCK']} w{c.num_warps} x{c.kwargs['PROGRAMS_PER_SM']}/SM", "max",
            rg.GradLaunch(c.kwargs["BLOCK"], c.kwargs["PROGRAMS_PER_SM"], c.num_warps, d.block_m, d.block_n,
                          d.cast_warps, d.m_fastest)) for c in rg.MAX_CONFIGS]
    out += [(f"cast {c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']} w{c.num_warps} "
             f"{'m' if c.kwargs['M_FASTEST'] else 'n'}-fastest", "cast",
             rg.GradLaunch(d.block, d.programs_per_sm, d.max_warps, c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"],
                           c.num_warps, c.kwargs["M_FASTEST"])) for c in rg.CAST_CONFIGS]
    return out


def main(tiny, device):
    interpreted = device == "cpu"
    if interpreted and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("--device cpu runs the kernels under the interpreter: TRITON_INTERPRET=1")
    rows = []
    inductor = torch.compile(rg.relu_square_grad_fp8_reference)
    for name, (M, N) in (TINY_SHAPES if tiny else step_shapes()).items():
        da, a, a_inv = operands(M, N, device)
        want = rg.relu_square_grad_fp8_reference(da, a, a_inv, fp8.E5M2)
        gb = dict(max=3 * M * N / 1e9, cast=5 * M * N / 1e9, both=8 * M * N / 1e9)

        def row(variant, stage, fn, result=None):
            ms = median_ms(fn)
            rows.append(dict(shape=name, M=M, N=N, variant=variant, stage=stage, ms=ms,
                             gb_s=gb[stage] / ms * 1e3, bit_exact=None if result is None else exact(result, want)))
            print(f"  {name:7} {variant:34} {stage:5} {ms:8.4f} ms  {rows[-1]['gb_s']:7.0f} GB/s  "
                  f"exact={rows[-1]['bit_exact']}", flush=True)

        print(f"{name}: da {M} x {N}", flush=True)
        got = inductor(da, a, a_inv, fp8.E5M2)
        row("inductor", "both", lambda: inductor(da, a, a_inv, fp8.E5M2), got)

        v1 = (16, 32, 1) if interpreted else (128, 128, 8)
        max_pass, cast_pass, out = v1_passes(da, a, a_inv, fp8.E5M2, *v1, interpreted)
        max_pass(), cast_pass()
        row(f"v1 {v1[0]}x{v1[1]} w{v1[2]}", "max", max_pass)
        row(f"v1 {v1[0]}x{v1[1]} w{v1[2]}", "cast", cast_pass, out)
        row(f"v1 {v1[0]}x{v1[1]} w{v1[2]}", "both", lambda: (max_pass(), cast_pass()), out)

        launches = [("v2 interpreted", "both", rg.INTERPRETED_LAUNCH)] if interpreted else fixed_launches()
        for label, stage, launch in launches:
            max_pass, cast_pass, out = v2_passes(da, a, a_inv, fp8.E5M2, launch, interpreted)
            max_pass(), cast_pass()
            if stage in ("max", "both"):
                row(label, "max", max_pass, out)
            if stage in ("cast", "both"):
                row(label, "cast", cast_pass, out)
        if not interpreted:
            max_pass, cast_pass, out = v2_passes(da, a, a_inv, fp8.E5M2, None, interpreted)  # autotunes here
            max_pass(), cast_pass()
            for kernel in (rg._dh_max_tuned, rg._cast_tuned):
                print(f"  autotuned {kernel.base_fn.__name__}: {kernel.best_config}")
                for config, timing in sorted(getattr(kernel, "configs_timings", {}).items(), key=lambda t: t[1]):
                    print(f"      {timing}  {config}")
            row("v2 autotuned", "max", max_pass, out)
            row("v2 autotuned", "cast", cast_pass, out)
            row("v2 autotuned", "both", lambda: (max_pass(), cast_pass()), out)
            got = rg.relu_square_grad_fp8(da, a, a_inv, fp8.E5M2)  # the custom op, as the step calls it
            row("v2 op (as the step)", "both", lambda: rg.relu_square_grad_fp8(da, a, a_inv, fp8.E5M2), got)
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default=None)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (for the interpreter)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = parser.parse_args()
    rows = write_rows(args.json, main(args.tiny, args.device))
    env = rows[0]
    print(f"\ndevice: {env['device']}, torch {env['torch']}, triton {env['triton']}; dh to e5m2 in both layouts")
    print(f"{'shape':8} {'variant':34} {'pass':5} {'ms':>8} {'GB/s':>7} exact")
    for r in rows:
        if r["variant"] in ("inductor", "v2 autotuned", "v2 op (as the step)", "v2 interpreted") or \
                r["variant"].startswith("v1"):
            print(f"{r['shape']:8} {r['variant']:34} {r['stage']:5} {r['ms']:8.4f} {r['gb_s']:7.0f} {r['bit_exact']}")
    failures = [r for r in rows if r["bit_exact"] is False and not r["variant"].startswith("inductor")]
    if failures:
        raise SystemExit(f"NOT bit-exact: {[(r['shape'], r['variant'], r['stage']) for r in failures]}")
