"""The fused qkv's gradient (kernels/qkv_grad.py) on the GPU at the step's shapes: the kernel with each config, the
autotuned choice through the custom op (as the step calls it), and inductor's code for the same definition
(torch.compile of `qkv_grad_reference`, the passes the step ran before); each checked against the reference. A table
comes last: ms per call and GB/s (dq, dk, dv, q and k read, dqkv written, in bf16; the rstds and cos, sin besides).

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


def main(device):
    rows = []
    inductor = torch.compile(qg.qkv_grad_reference)
    for name, (M, n_head, n_kv_head, head_dim) in (TINY_SHAPES if device == "cpu" else step_shapes()).items():
        ops = _operands(M, n_head, n_kv_head, head_dim, torch.bfloat16, device=device)
        want = qg.qkv_grad_reference(*ops, SCALE)
        heads = n_head + 2 * n_kv_head
        gb = (2 * M * heads * head_dim * 2 + M * (n_head + n_kv_head) * (head_dim * 2 + 4) + 2 * M * head_dim) / 1e9

        def row(variant, fn):
            ok = close(fn(), want)
            ms = median_ms(fn)
            rows.append(dict(shape=name, M=M, heads=heads, head_dim=head_dim, variant=variant, ms=ms,
                             gb_s=gb / ms * 1e3, close=ok))
            print(f"  {name:5} {variant:24} {ms:8.4f} ms  {rows[-1]['gb_s']:7.0f} GB/s  close={ok}", flush=True)

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


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default=None)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a tiny shape, interpreted")
    args = parser.parse_args()
    rows = write_rows(args.json, main(args.device))
    print(f"\ndevice: {rows[0]['device']}, torch {rows[0]['torch']}, triton {rows[0]['triton']}; dqkv in bf16")
    print(f"{'shape':6} {'variant':24} {'ms':>8} {'GB/s':>7} close")
    for r in rows:
        print(f"{r['shape']:6} {r['variant']:24} {r['ms']:8.4f} {r['gb_s']:7.0f} {r['close']}")
    if not all(r["close"] for r in rows):
        raise SystemExit(f"NOT close to the reference: {[(r['shape'], r['variant']) for r in rows if not r['close']]}")
