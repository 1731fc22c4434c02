"""The fused qkv's gradient (kernels/qkv_grad.py) on the GPU at the step's shapes: the kernel with each config, the
autotuned choice through the custom op (as the step calls it), and inductor's code for the same definition
(torch.compile of `qkv_grad_reference`, the passes the step ran before); each checked against the reference. Then the
fp8 projection's gradient up to its matmuls' operands, old against new: qkv_grad, then inductor's quantize of dqkv to
e5m2 in both layouts (torch.compile of fastsft.fp8.quantize and the transposed copy, as the compiled step fused
`_Linear`'s backward), against qkv_grad folding max |dqkv| into slots, then the cast kernel from them
(`quantize_two_layouts`); each part on its own too, and the new result checked bit for bit against the old. A table
comes last: ms per call and GB/s (dq, dk, dv, q and k read, dqkv written, in bf16; the rstds and cos, sin besides;
the cast's rows count dqkv read and its two fp8 layouts written, the old quantize's dqkv read twice).

    python bench/gpu_qkv_grad.py [--json rows.json]          # the GPU
    python bench/gpu_qkv_grad.py --device cpu                # the interpreter on a tiny shape: that it runs
"""

import argparse
import os
import sys
from pathlib import Path

if "--device" in sys.argv and sys.argv[sys.argv.index("--device") + 1] == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton's first import

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from shapes import STEP_ROWS  # noqa: E402
from timing import median_ms, write_rows  # noqa: E402

from fastsft import fp8  # noqa: E402
from fastsft.kernels import fp8_relu_square_grad as rg  # noqa: E402
from fastsft.kernels import qkv_grad as qg  # noqa: E402
from fastsft.model import GPTConfig  # noqa: E402
from tests.test_qkv_grad import SCALE, _operands  # noqa: E402

TINY_SHAPES = {"tiny": (40, 4, 2, 64)}  # the interpreter's


def step_shapes():
    """(rows of a micro-batch, heads, kv heads, head_dim), d20 then d12."""
    configs = {name: GPTConfig.from_name(name) for name in ("d20", "d12")}
    return {name: (STEP_ROWS[name] * c.sequence_len, c.n_head, c.n_kv_head, c.head_dim) for name, c in configs.items()}


def close(got, want):
    return torch.allclose(got.float(), want.float(), rtol=2.0**-7, atol=1e-6 * want.float().abs().max().item())


def grad_gb(M, n_head, n_kv_head, head_dim):
    """GB qkv_grad moves in bf16: dq, dk, dv, q and k read, dqkv written, the rstds, cos and sin."""
    heads = n_head + 2 * n_kv_head
    return (2 * M * heads * head_dim * 2 + M * (n_head + n_kv_head) * (head_dim * 2 + 4) + 2 * M * head_dim) / 1e9


def timed_row(rows, shape, variant, fn, gb, ok):
    """Time fn, append its row (ok: close to, or for the backward's rows exactly, what it is checked against)."""
    M, n_head, n_kv_head, head_dim = shape[1]
    ms = median_ms(fn)
    rows.append(dict(shape=shape[0], M=M, heads=n_head + 2 * n_kv_head, head_dim=head_dim, variant=variant, ms=ms,
                     gb_s=gb / ms * 1e3, close=ok))
    print(f"  {shape[0]:5} {variant:24} {ms:8.4f} ms  {rows[-1]['gb_s']:7.0f} GB/s  ok={ok}", flush=True)


def main(device):
    rows = []
    inductor = torch.compile(qg.qkv_grad_reference)
    for shape in (TINY_SHAPES if device == "cpu" else step_shapes()).items():
        name, (M, n_head, n_kv_head, head_dim) = shape
        ops = _operands(M, n_head, n_kv_head, head_dim, torch.bfloat16, device=device)
        want = qg.qkv_grad_reference(*ops, SCALE)
        gb = grad_gb(M, n_head, n_kv_head, head_dim)

        def row(variant, fn):
            timed_row(rows, shape, variant, fn, gb, close(fn(), want))

        print(f"{name}: {M} rows, {n_head} + {n_kv_head} + {n_kv_head} heads of {head_dim}", flush=True)
        row("inductor (reference)", lambda: inductor(*ops, SCALE))
        launches = [qg.INTERPRETED_LAUNCH] if device == "cpu" else [
            qg.QKVGradLaunch(c.kwargs["BLOCK_M"], c.num_warps) for c in qg.CONFIGS]
        for launch in launches:
            row(f"kernel {launch.block_m} rows w{launch.num_warps}", lambda: qg.qkv_grad(*ops, SCALE, launch=launch))
        if device != "cpu":
            row("op, autotuned (the step)", lambda: qg.qkv_grad(*ops, SCALE))
            print(f"  autotuned: {qg._qkv_grad_tuned.best_config}")
    return rows


def quantize_both_layouts(dqkv):
    """The old backward's cast: fastsft.fp8.quantize (a pass for the maximum, one for the cast) and the transposed
    copy that `fastsft.fp8.linear_grads` reads."""
    g_q, g_inv = fp8.quantize(dqkv, fp8.E5M2)
    return g_q, g_q.t().contiguous(), g_inv


def exact(got, want):
    return all(torch.equal(g.reshape(-1).view(torch.uint8), w.reshape(-1).view(torch.uint8)) for g, w in zip(got, want))


def backward_rows(device):
    """Old against new, qkv_grad through the e5m2 operands of dx's and dW's matmuls; the custom ops autotuned as the
    step calls them (the interpreter's fixed launches on the CPU)."""
    rows = []
    inductor_quantize = torch.compile(quantize_both_layouts)
    interpreted = device == "cpu"
    grad_launch = qg.INTERPRETED_LAUNCH if interpreted else None
    cast_launch = rg.INTERPRETED_LAUNCH if interpreted else None
    for shape in (TINY_SHAPES if interpreted else step_shapes()).items():
        name, (M, n_head, n_kv_head, head_dim) = shape
        ops = _operands(M, n_head, n_kv_head, head_dim, torch.bfloat16, device=device)
        width = (n_head + 2 * n_kv_head) * head_dim
        gb = grad_gb(M, n_head, n_kv_head, head_dim)
        cast_gb, quantize_gb = 4 * M * width / 1e9, 6 * M * width / 1e9  # dqkv read (twice by inductor), 2 x 1 B out

        def old():
            return inductor_quantize(qg.qkv_grad(*ops, SCALE, launch=grad_launch))

        def new():
            dqkv, slots = qg.qkv_grad(*ops, SCALE, maxima=True, launch=grad_launch)
            return rg.quantize_two_layouts(dqkv, slots, fp8.E5M2, launch=cast_launch)

        want = old()
        dqkv, slots = qg.qkv_grad(*ops, SCALE, maxima=True, launch=grad_launch)
        same_dqkv = exact([dqkv], [qg.qkv_grad(*ops, SCALE, launch=grad_launch)])
        print(f"{name}: the backward to fp8 operands, dqkv {M} x {width}", flush=True)
        timed_row(rows, shape, "old: qkv_grad", lambda: qg.qkv_grad(*ops, SCALE, launch=grad_launch), gb, True)
        timed_row(rows, shape, "old: inductor quantize", lambda: inductor_quantize(dqkv), quantize_gb, True)
        timed_row(rows, shape, "old: both", old, gb + quantize_gb, True)
        timed_row(rows, shape, "new: qkv_grad + maxima", lambda: qg.qkv_grad(*ops, SCALE, maxima=True,
                                                                             launch=grad_launch), gb,
                  same_dqkv and bool(torch.equal(rg.slots_maximum(slots), dqkv.abs().amax().float())))
        timed_row(rows, shape, "new: cast from slots",
                  lambda: rg.quantize_two_layouts(dqkv, slots, fp8.E5M2, launch=cast_launch), cast_gb,
                  exact(rg.quantize_two_layouts(dqkv, slots, fp8.E5M2, launch=cast_launch), want))
        timed_row(rows, shape, "new: both", new, gb + cast_gb, exact(new(), want))
        if not interpreted:
            print(f"  autotuned: {qg._qkv_grad_tuned.best_config}; cast {rg._cast_tuned.best_config}")
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default=None)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a tiny shape, interpreted")
    args = parser.parse_args()
    rows = write_rows(args.json, main(args.device) + backward_rows(args.device))
    print(f"\ndevice: {rows[0]['device']}, torch {rows[0]['torch']}, triton {rows[0]['triton']}; dqkv in bf16; "
          "close: exact for the backward's rows")
    print(f"{'shape':6} {'variant':24} {'ms':>8} {'GB/s':>7} close")
    for r in rows:
        print(f"{r['shape']:6} {r['variant']:24} {r['ms']:8.4f} {r['gb_s']:7.0f} {r['close']}")
    if not all(r["close"] for r in rows):
        raise SystemExit(f"NOT close to (or for the backward's rows, not exactly) what they are checked against: "
                         f"{[(r['shape'], r['variant']) for r in rows if not r['close']]}")
