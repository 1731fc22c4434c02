"""Tensorwise or blockwise fp8 scales for the step's matmuls, on the GPU: would the blockwise recipe pay?

Why: at d20 the fp8 step spends about 22 ms a step in kernels that find a tensor's largest value before its cast
(one tensorwise scale needs the whole tensor first) and 20 ms in the casts (bench/RESULTS.md, run 9). A blockwise
scale comes from 128 neighbouring values (1 x 128 groups for activations and gradients, 128 x 128 blocks for
weights; torch._scaled_mm takes them on Hopper from cuBLAS 12.9), so the cast needs no pass of its own and can fuse
into the kernel that produces its operand. This measures what the matmuls would cost, and what one quantization
costs, before the step is rebuilt on it.

For each projection of a block (q/k/v as one, attention's c_proj, c_fc, the MLP's c_proj) and each of its three
matmuls (forward, input gradient, weight gradient), at d20 (16 x 2048 rows, width 1280) and d12 (32 x 2048, 768):
bf16, tensorwise fp8 (the step's today: gradients in e5m2), the same with fast accumulation (`use_fast_accum`:
the tensor cores' own accumulator, not fp32; torchao's choice for the forward) and blockwise fp8 (gradients in
e4m3, whose 128-value groups need no e5m2 range: cuBLAS's blockwise recipes are e4m3), each fp8 result checked
against the float64 product of its dequantized operands; then their sum over a step's layers. Then one (rows,
width) bf16 activation quantized into both layouts the matmuls read (row-major for the forward, transposed for the
weight gradient), compiled: tensorwise (a pass for the maximum, then the cast) against blockwise (each layout's
groups from their own 128 values, no pass over the whole tensor first).

    python bench/gpu_fp8_scaling.py [--json rows.json] [--tiny --device cpu]  (--tiny: a smoke run of the script)

Blockwise runs twice, with the scales passed as dequantizing factors and as their reciprocals; the table keeps the
one whose result matches (the tensorwise path takes dequantizing factors).
"""

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import environment, median_ms, write_rows  # noqa: E402

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
G = 128  # cuBLAS's block edge
MODELS = {"d20": (20, 16 * 2048, 1280), "d12": (12, 32 * 2048, 768)}  # layers, rows, width


def block_quantize(t: torch.Tensor, dtype: torch.dtype, rows: int, cols: int):
    """(t / s in dtype, s): s the dequantizing scale of each rows x cols block (its max |t| over dtype's max)."""
    R, C = t.shape
    blocks = t.float().reshape(R // rows, rows, C // cols, cols)
    s = blocks.abs().amax(dim=(1, 3), keepdim=True).clamp(min=1e-12) / torch.finfo(dtype).max
    return (blocks / s).reshape(R, C).to(dtype), s.reshape(R // rows, C // cols)


def tensor_quantize(t: torch.Tensor, dtype: torch.dtype):
    s = t.abs().amax().float().clamp(min=1e-12) / torch.finfo(dtype).max
    return (t.float() / s).to(dtype), s


def dequantized(q: torch.Tensor, s: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    R, C = q.shape
    return (q.double().reshape(R // rows, rows, C // cols, cols) * s.double()[:, None, :, None]).reshape(R, C)


def outer_major(s: torch.Tensor, inverted: bool) -> torch.Tensor:
    """A 1 x 128 operand's scales (rows, K / 128) stored column by column, as cuBLAS reads them."""
    return (1 / s if inverted else s).t().contiguous().t()


def weight_scales(s: torch.Tensor, inverted: bool) -> torch.Tensor:
    """A 128 x 128 operand's scales (N / 128, K / 128) as (K / 128, N / 128), K-major. Unpadded: torch 2.11 refused
    every call whose K / 128 had been padded to a multiple of 4, and only those (run 10)."""
    return (1 / s if inverted else s).t()


def blockwise_calls(make, exact) -> dict:
    """make(inverted) -> the blockwise call with its scales as given or inverted, both against one exact product."""
    return {"blockwise": (make(False), exact), "blockwise 1/s": (make(True), exact)}


def tensorwise_calls(make, exact) -> dict:
    """make(fast) -> the tensorwise call accumulating in fp32 (the step's) or in the tensor cores' own narrower
    accumulator (use_fast_accum, torchao's choice for the forward), both against one exact product."""
    return {"tensorwise": (make(False), exact), "tensorwise fast": (make(True), exact)}


def matmuls(M: int, K_in: int, N_out: int, gen: torch.Generator, device: str):
    """The three matmuls of y = x @ W.T, x (M, K_in), W (N_out, K_in), as {name: {recipe: (fn, exact)}} where exact
    is the float64 product of the operands that recipe's call reads."""
    x = torch.randn(M, K_in, generator=gen, device=device).bfloat16()
    w = (torch.randn(N_out, K_in, generator=gen, device=device) / K_in ** 0.5).bfloat16()
    g = (torch.randn(M, N_out, generator=gen, device=device) * 1e-3).bfloat16()
    out = {}
    # forward: x (1 x 128 along K_in) @ W.T (128 x 128)
    xq, xs = block_quantize(x, E4M3, 1, G)
    wq, ws = block_quantize(w, E4M3, G, G)
    xt, xts = tensor_quantize(x, E4M3)
    wt, wts = tensor_quantize(w, E4M3)
    out["forward"] = {
        "bf16": (lambda: x @ w.t(), x.double() @ w.double().t()),
        **tensorwise_calls(lambda fast: lambda: torch._scaled_mm(
            xt, wt.t(), scale_a=xts, scale_b=wts, out_dtype=torch.bfloat16, use_fast_accum=fast),
            (xt.double() * xts.double()) @ (wt.double() * wts.double()).t()),
        **blockwise_calls(lambda inv: lambda: torch._scaled_mm(
            xq, wq.t(), scale_a=outer_major(xs, inv), scale_b=weight_scales(ws, inv), out_dtype=torch.bfloat16),
            dequantized(xq, xs, 1, G) @ dequantized(wq, ws, G, G).t()),
    }
    # input gradient: g (1 x 128 along N_out) @ W; W.T's blocks are W's, transposed (no second quantization)
    gq, gs = block_quantize(g, E4M3, 1, G)
    wtq, wtqs = wq.t().contiguous(), ws.t().contiguous()  # (K_in, N_out) row-major and its block scales
    gt, gts = tensor_quantize(g, E5M2)
    wcol = wt.t().contiguous().t()
    out["input grad"] = {
        "bf16": (lambda: g @ w, g.double() @ w.double()),
        **tensorwise_calls(lambda fast: lambda: torch._scaled_mm(
            gt, wcol, scale_a=gts, scale_b=wts, out_dtype=torch.bfloat16, use_fast_accum=fast),
            (gt.double() * gts.double()) @ (wt.double() * wts.double())),
        **blockwise_calls(lambda inv: lambda: torch._scaled_mm(
            gq, wtq.t(), scale_a=outer_major(gs, inv), scale_b=weight_scales(wtqs, inv), out_dtype=torch.bfloat16),
            dequantized(gq, gs, 1, G) @ dequantized(wtq, wtqs, G, G).t()),
    }
    # weight gradient: g.T (1 x 128 along the rows M) @ x (1 x 128 along M, read column-major)
    gTq, gTs = block_quantize(g.t().contiguous(), E4M3, 1, G)  # (N_out, M)
    xTq, xTs = block_quantize(x.t().contiguous(), E4M3, 1, G)  # (K_in, M)
    gTt = gt.t().contiguous()
    xTt = xt.t().contiguous()
    out["weight grad"] = {
        "bf16": (lambda: g.t() @ x, g.double().t() @ x.double()),
        **tensorwise_calls(lambda fast: lambda: torch._scaled_mm(
            gTt, xTt.t(), scale_a=gts, scale_b=xts, out_dtype=torch.bfloat16, use_fast_accum=fast),
            (gTt.double() * gts.double()) @ (xTt.double() * xts.double()).t()),
        **blockwise_calls(lambda inv: lambda: torch._scaled_mm(
            gTq, xTq.t(), scale_a=outer_major(gTs, inv), scale_b=outer_major(xTs, inv).t(), out_dtype=torch.bfloat16),
            dequantized(gTq, gTs, 1, G) @ dequantized(xTq, xTs, 1, G).t()),
    }
    return out


def quantize_both_layouts_tensorwise(x):
    q, s = tensor_quantize(x, E4M3)
    return q, q.t().contiguous(), s


def quantize_both_layouts_blockwise(x):
    q, s = block_quantize(x, E4M3, 1, G)
    qt, st = block_quantize(x.t(), E4M3, 1, G)
    return q, qt, s, st


_REFUSALS: set[str] = set()


def _time(fn, exact):
    """(ms, relative error against the float64 product), or NaNs where this build or GPU refuses the recipe."""
    try:
        got = fn().double()
        return median_ms(fn), ((got - exact).norm() / exact.norm()).item()
    except (RuntimeError, ValueError) as e:  # torch names the configurations it takes: the whole message, once
        message = " ".join(str(e).split())
        if message not in _REFUSALS:
            _REFUSALS.add(message)
            print(f"  refused: {message}")
        return float("nan"), float("nan")


def measure(models: dict, device: str) -> list[dict]:
    gen = torch.Generator(device).manual_seed(0)
    rows = []
    for model, (layers, M, C) in models.items():
        projections = {"q/k/v": (C, 3 * C), "attn c_proj": (C, C), "c_fc": (C, 4 * C), "mlp c_proj": (4 * C, C)}
        for proj, (K_in, N_out) in projections.items():
            for mm, recipes in matmuls(M, K_in, N_out, gen, device).items():
                for recipe, (fn, exact) in recipes.items():
                    ms, err = _time(fn, exact)
                    rows.append(dict(model=model, layers=layers, projection=proj, matmul=mm, recipe=recipe, ms=ms,
                                     rel_err=err))
            if device == "cuda":
                torch.cuda.empty_cache()
        for width in (C, 4 * C):
            x = torch.randn(M, width, generator=gen, device=device).bfloat16()
            for recipe, fn in (("tensorwise", quantize_both_layouts_tensorwise),
                               ("blockwise", quantize_both_layouts_blockwise)):
                compiled = torch.compile(fn)
                rows.append(dict(model=model, layers=layers, projection=f"quantize ({M}, {width}), both layouts",
                                 matmul="-", recipe=recipe, ms=median_ms(lambda: compiled(x)), rel_err=None))
    return rows


def blockwise(by: dict) -> dict:
    """The blockwise row whose scale convention matches (the smaller error; NaN, a refusal, loses)."""
    options = [by[k] for k in ("blockwise", "blockwise 1/s") if k in by]
    return min(options, key=lambda r: r["rel_err"] if math.isfinite(r["rel_err"] or math.nan) else math.inf,
               default={})


def report(rows: list[dict], models: dict) -> None:
    env = environment()
    print(f"\ndevice: {env['device']}, torch {env['torch']}, triton {env['triton']}")
    print(f"{'model':5} {'projection':34} {'matmul':12} {'bf16 ms':>8} {'tensor':>8} {'fast':>8} {'block':>8} "
          f"{'tensor err':>10} {'fast err':>9} {'block err':>9} {'scales':>6}")
    table = {}
    for r in rows:
        table.setdefault((r["model"], r["projection"], r["matmul"]), {})[r["recipe"]] = r
    for (model, proj, mm), by in table.items():
        block = blockwise(by)
        ms = [by.get(k, {}).get("ms", float("nan")) for k in ("bf16", "tensorwise", "tensorwise fast")]
        ms.append(block.get("ms", float("nan")))
        errs = [by.get(k, {}).get("rel_err") for k in ("tensorwise", "tensorwise fast")] + [block.get("rel_err")]
        err_text = ["" if e is None else f"{e:9.2e}" for e in errs]
        scales = "" if mm == "-" else ("1/s" if block.get("recipe", "").endswith("1/s") else "s")
        print(f"{model:5} {proj:34} {mm:12} {ms[0]:8.3f} {ms[1]:8.3f} {ms[2]:8.3f} {ms[3]:8.3f} {err_text[0]:>10} "
              f"{err_text[1]:>9} {err_text[2]:>9} {scales:>6}")
    print("\nper step (every projection's three matmuls, times the layers), ms:")
    for model, (layers, _, _) in models.items():
        keys = {(r["projection"], r["matmul"]) for r in rows if r["model"] == model and r["matmul"] != "-"}
        sums = {k: layers * sum(table[(model, *key)].get(k, {}).get("ms", float("nan")) for key in keys)
                for k in ("bf16", "tensorwise", "tensorwise fast")}
        sums["blockwise"] = layers * sum(blockwise(table[(model, *key)]).get("ms", float("nan")) for key in keys)
        print(f"  {model}: " + ", ".join(f"{k} {v:.1f}" for k, v in sums.items()))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="one 2-layer 256-row model of width 256 (a smoke run)")
    args = parser.parse_args()
    models = {"tiny": (2, 256, 256)} if args.tiny else MODELS
    rows = write_rows(args.json, measure(models, args.device))
    report(rows, models)
