"""The fp8 two-layout cast (kernels/fp8_cast.py) on the GPU: bit-exact against its torch definition, timed beside
what inductor compiles from that definition (the fp8 step's code before the kernel) and a bf16 copy of the same
matrix (the bandwidth a memory-bound pass can reach), over launch shapes, at the d20 step's shapes.

    python bench/gpu_fp8_cast.py [--json rows.json]
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import environment, median_ms  # noqa: E402

from fastsft import fp8  # noqa: E402
from fastsft.kernels import fp8_cast  # noqa: E402

SHAPES = {"x (16x2048, 1280)": (32768, 1280), "h (16x2048, 5120)": (32768, 5120)}
LAUNCHES = [fp8_cast.CastLaunch(64, 64, 4), fp8_cast.CastLaunch(64, 128, 4), fp8_cast.CastLaunch(128, 64, 4),
            fp8_cast.CastLaunch(128, 128, 4), fp8_cast.CastLaunch(128, 128, 8), fp8_cast.CastLaunch(64, 256, 8)]


def _inductor(x, scale, dtype, relu_square):
    q, qt = fp8_cast.cast_reference(x, scale, dtype, relu_square)
    return q, qt


def main():
    rows = []
    compiled = torch.compile(_inductor)
    for name, (M, N) in SHAPES.items():
        x = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
        gb = M * N * (2 + 1 + 1) / 1e9  # read bf16, write two fp8 copies
        for relu_square in (False, True):
            scale = fp8.scale_for(torch.relu(x) ** 2 if relu_square else x, fp8.E4M3)
            ref_q, ref_qt = fp8_cast.cast_reference(x, scale, fp8.E4M3, relu_square)
            variants = {"inductor": lambda: compiled(x, scale, fp8.E4M3, relu_square),
                        "bf16 copy (2 B read + 2 B write)": lambda: x.clone()}
            for launch in LAUNCHES:
                variants[f"kernel {launch.block_m}x{launch.block_n} w{launch.num_warps}"] = (
                    lambda launch=launch: fp8_cast.cast_fp8(x, scale, fp8.E4M3, relu_square=relu_square,
                                                            launch=launch))
            for label, fn in variants.items():
                exact = None
                if not label.startswith("bf16"):
                    q, qt = fn()
                    exact = bool(torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8))
                                 and torch.equal(qt.view(torch.uint8), ref_qt.view(torch.uint8)))
                ms = median_ms(fn)
                rows.append(dict(shape=name, relu_square=relu_square, variant=label, ms=ms, tb_s=gb / ms,
                                 bit_exact=exact, **environment()))
    nan = torch.tensor([[float("nan"), 1.0] * 8], device="cuda", dtype=torch.bfloat16)
    q, qt = fp8_cast.cast_fp8(nan, torch.tensor(1.0, device="cuda"), fp8.E4M3)
    rows.append(dict(shape="NaN input", variant="default", nan_kept=bool(torch.isnan(q.float()[0, 0]))))
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = main()
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    env = environment()
    print(f"device: {env['device']}, torch {env['torch']}, triton {env['triton']}")
    print(f"{'shape':20} {'relu^2':6} {'variant':34} {'ms':>8} {'TB/s':>6} exact")
    for r in rows:
        if "ms" in r:
            print(f"{r['shape']:20} {str(r['relu_square']):6} {r['variant']:34} {r['ms']:8.4f} {r['tb_s']:6.2f} "
                  f"{r['bit_exact']}")
        else:
            print(r)
