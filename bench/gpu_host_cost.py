"""The host's cost of each op the fp8 step launches, beside its GPU time: which launches make a step host-bound.

Why: at d12 (and partly at d20) the step stopped following its GPU time (bench/RESULTS.md, run 15): 2.8 ms less GPU
work left the step where it was, and the profiled phases spent 60-130 us of host time a launch. This times, at one
layer of the step's shapes, each op as the compiled step calls it (our custom ops through the dispatcher,
flash-attn-4 through them and directly, `_scaled_mm`) and a few baselines (an aten add, an empty Triton kernel),
then the whole optimizer step of the model. Host time: calls issued back to back behind a GPU kept busy, so that
no call waits for the GPU (a call that does shows a host time near its GPU time: a sync). GPU time: the median
of timed calls. An op whose host time exceeds its GPU time is host-bound on its own; the step is host-bound when
the sum over its launches is.

    python bench/gpu_host_cost.py [--model d12] [--calls 50] [--json rows.json]   # the GPU
    python bench/gpu_host_cost.py --device cpu --calls 2                         # tiny shapes: that it runs
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

if "--device" in sys.argv and sys.argv[sys.argv.index("--device") + 1] == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton's first import

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from shapes import STEP_ROWS  # noqa: E402
from timing import median_ms, write_rows  # noqa: E402

from fastsft import attention, fp8  # noqa: E402
from fastsft.kernels import fp8_relu_square as rs  # noqa: E402
from fastsft.kernels import fp8_relu_square_grad as rg  # noqa: E402
from fastsft.kernels import qkv_grad as qg  # noqa: E402
from fastsft.model import GPTConfig  # noqa: E402
from fastsft.optim import build_optimizers  # noqa: E402
from tests.helpers import random_model  # noqa: E402
from tests.test_qkv_grad import SCALE, _operands  # noqa: E402

TINY = GPTConfig(n_layer=2, n_embd=64, n_head=2, n_kv_head=2, vocab_size=128, sequence_len=32)


@triton.jit
def _empty_kernel(x_ptr, n, BLOCK: tl.constexpr):
    """Nothing: its launch is Triton's launcher alone, the baseline of every Triton kernel's host cost."""
    pass


@torch.library.custom_op("fastsft_bench::empty_like_op", mutates_args=())
def _empty_op(x: torch.Tensor, size: int, name: str, flag: bool = False) -> torch.Tensor:
    """Nothing but an allocation, through a custom op with our ops' argument kinds: the dispatch's own host cost."""
    return x.new_empty(0)


@_empty_op.register_fake
def _(x, size, name, flag=False):
    return x.new_empty(0)


_empty_op.register_autograd(lambda ctx, grad: (None, None, None, None))  # as ours: an autograd kernel on the path


def host_us(fn, calls: int, device: str) -> float:
    """Host microseconds a call, calls issued back to back behind ~50 ms of GPU sleep (none waits for the GPU)."""
    fn()  # first-call work (compiles, autotuning, caches) stays out
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda._sleep(100_000_000)  # ~50 ms at ~2 GHz: the calls below only enqueue
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    if device == "cuda":
        torch.cuda.synchronize()
    return elapsed / calls * 1e6


def layer_ops(cfg: GPTConfig, rows: int, device: str) -> dict:
    """name -> a zero-argument call at one layer's shapes (rows tokens): what the fp8 step launches per layer."""
    C, H, Hkv, D = cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.head_dim
    gen = torch.Generator(device).manual_seed(0)

    def randn(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, generator=gen, device=device).to(dtype)

    x, h = randn(rows, C), randn(rows, 4 * C)
    ops = {"aten add (baseline)": lambda: x + x,
           "custom op, empty body (dispatch alone)": lambda: _empty_op(x, rows, "flash_attn_4", True)}
    if device == "cuda":
        ops["empty Triton kernel (launcher baseline)"] = lambda: _empty_kernel[(1,)](x, rows, BLOCK=128)
    x_q, x_inv = fp8.quantize(x, fp8.E4M3)
    w_q, w_inv = fp8.quantize(randn(3 * C, C), fp8.E4M3)
    ops["_scaled_mm (q/k/v forward)"] = lambda: torch._scaled_mm(x_q, w_q.t(), scale_a=x_inv, scale_b=w_inv,
                                                                 out_dtype=torch.bfloat16, use_fast_accum=True)
    ops["quantize e4m3 (torch ops, eager)"] = lambda: fp8.quantize(x, fp8.E4M3)
    a_scale = fp8.scale_for(torch.relu(h).square(), fp8.E4M3)
    ops["relu_square_fp8 (custom op)"] = lambda: rs.relu_square_fp8(h, a_scale, fp8.E4M3)
    _, a_qt = rs.relu_square_fp8(h, a_scale, fp8.E4M3)
    da_t, a_inv = randn(4 * C, rows), a_scale.reciprocal()
    ops["relu_square_grad_fp8 (custom op)"] = lambda: rg.relu_square_grad_fp8(da_t, a_qt, a_inv, fp8.E5M2)
    grad_ops = _operands(rows, H, Hkv, D, torch.bfloat16, device=device)
    ops["qkv_grad, maxima (custom op)"] = lambda: qg.qkv_grad(*grad_ops, SCALE, maxima=True)
    dqkv, slots = qg.qkv_grad(*grad_ops, SCALE, maxima=True)
    ops["quantize_two_layouts (custom op)"] = lambda: rg.quantize_two_layouts(dqkv, slots, fp8.E5M2)
    cu = torch.arange(0, rows + 1, cfg.sequence_len, dtype=torch.int32, device=device)  # whole rows: covered
    out = randn(rows, H, D)
    ops["zero_tail_ (covered batch)"] = lambda: attention.zero_tail_(out, cu)
    if "flash_attn_4" in attention.available_backends(device):
        q, k, v = randn(rows, H, D), randn(rows, Hkv, D), randn(rows, Hkv, D)
        fwd = attention._OP_KERNELS["flash_attn_4"]
        y, lse = fwd.forward(q, k, v, cu, cfg.sequence_len, -1)
        dy = randn(rows, H, D)
        ops["flash-attn-4 forward (direct)"] = lambda: fwd.forward(q, k, v, cu, cfg.sequence_len, -1)
        ops["flash-attn-4 forward (custom op)"] = lambda: attention.varlen_attn_fwd(
            q, k, v, cu, cfg.sequence_len, -1, "flash_attn_4")
        ops["flash-attn-4 backward (direct)"] = lambda: fwd.backward(dy, q, k, v, y, lse, cu, cfg.sequence_len, -1)
        ops["flash-attn-4 backward (custom op)"] = lambda: attention.varlen_attn_bwd(
            dy, q, k, v, y, lse, cu, cfg.sequence_len, -1, "flash_attn_4")
        ops["flash-attn-4 forward (custom op, covered)"] = lambda: attention.varlen_attn_fwd(
            q, k, v, cu, cfg.sequence_len, -1, "flash_attn_4", True)
        ops["flash-attn-4 backward (custom op, covered)"] = lambda: attention.varlen_attn_bwd(
            dy, q, k, v, y, lse, cu, cfg.sequence_len, -1, "flash_attn_4", True)
    return ops


def optimizer_op(cfg: GPTConfig, device: str):
    """The whole optimizer step (AdamW and Muon) of the model with random gradients, as the driver builds it."""
    model = random_model(cfg).to(device)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    optimizers = build_optimizers(model, adam_moments_dtype="param")
    return optimizers.step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="d12", choices=sorted(STEP_ROWS))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.device == "cpu":
        label, cfg, rows = "tiny", TINY, 2 * TINY.sequence_len
    else:
        label, cfg = args.model, GPTConfig.from_name(args.model)
        rows = STEP_ROWS[args.model] * cfg.sequence_len
    # (fn, calls): the optimizer step launches ~120 kernels, so a few calls already fill the launch queue, past
    # which the host would wait for the GPU
    ops = {name: (fn, args.calls) for name, fn in layer_ops(cfg, rows, args.device).items()}
    ops[f"optimizer step ({label} model, whole)"] = (optimizer_op(cfg, args.device), min(args.calls, 4))
    results = []
    for name, (fn, calls) in ops.items():
        host = host_us(fn, calls, args.device)
        gpu = median_ms(fn, warmup_ms=5, rep_ms=20) * 1e3
        results.append(dict(model=label, rows=rows, op=name, host_us=host, gpu_us=gpu))
        print(f"  {name:48} host {host:9.1f} us   GPU {gpu:9.1f} us", flush=True)
    write_rows(args.json, results)
    print(f"\nhost against GPU time a call, {label} layer shapes ({rows} rows; host-bound where host > GPU):")
    print(f"{'op':48} {'host us':>9} {'GPU us':>9} {'host/GPU':>9}")
    for r in results:
        print(f"{r['op']:48} {r['host_us']:9.1f} {r['gpu_us']:9.1f} {r['host_us'] / max(r['gpu_us'], 1e-9):9.2f}")


if __name__ == "__main__":
    main()
