"""relu(h)^2 to fp8 (kernels/fp8_relu_square.py) on the GPU at the d20 MLP's shape, 32768 x 5120 bf16: each layout
the fp8 MLP asks for (row-major for c_proj's forward, transposed for its weight gradient, both) timed beside what
inductor compiles from the same definition (the fp8 step's code before the kernel) and a bf16 copy (the bandwidth
a memory-bound pass reaches), over launch shapes; every variant checked bit for bit against the definition
(inductor's may differ: it keeps the square in fp32 where the definition rounds it to bf16).

    python bench/gpu_fp8_relu_square.py [--json rows.json]
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import environment, median_ms  # noqa: E402

from fastsft import fp8  # noqa: E402
from fastsft.kernels import fp8_relu_square as rs  # noqa: E402

M, N = 32768, 5120
LAUNCHES = [rs.SquareLaunch(64, 128, 4), rs.SquareLaunch(128, 64, 4), rs.SquareLaunch(128, 128, 8),
            rs.SquareLaunch(64, 256, 8)]
LAYOUTS = {"both": (True, True), "rows (forward)": (True, False), "transposed (backward)": (False, True)}


def _inductor(h, scale, rows, cols):
    r = torch.relu(h)
    a = fp8.cast(r * r, scale, fp8.E4M3)
    return (a if rows else None), (a.t().contiguous() if cols else None)


def main():
    rows = []
    compiled = torch.compile(_inductor)
    h = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    scale = fp8.scale_for(torch.relu(h) * torch.relu(h), fp8.E4M3)
    ref, ref_t = rs.relu_square_fp8_reference(h, scale, fp8.E4M3)
    copy_ms = median_ms(lambda: h.clone())
    rows.append(dict(layout="-", variant="bf16 copy", ms=copy_ms, tb_s=M * N * 4 / 1e9 / copy_ms, bit_exact=None))
    for layout, (want_rows, want_cols) in LAYOUTS.items():
        gb = M * N * (2 + want_rows + want_cols) / 1e9  # h read once, one byte per layout written
        variants = {"inductor": lambda: compiled(h, scale, want_rows, want_cols)}
        for launch in LAUNCHES:
            variants[f"kernel {launch.block_m}x{launch.block_n} w{launch.num_warps}"] = (
                lambda launch=launch: rs.relu_square_fp8(h, scale, fp8.E4M3, rows=want_rows, cols=want_cols,
                                                         launch=launch))
        for label, fn in variants.items():
            a, at = fn()
            exact = ((not want_rows or torch.equal(a.view(torch.uint8), ref.view(torch.uint8)))
                     and (not want_cols or torch.equal(at.view(torch.uint8), ref_t.view(torch.uint8))))
            ms = median_ms(fn)
            rows.append(dict(layout=layout, variant=label, ms=ms, tb_s=gb / ms, bit_exact=bool(exact)))
    env = environment()
    return [{**r, **env} for r in rows]


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = main()
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    env = environment()
    print(f"device: {env['device']}, torch {env['torch']}, triton {env['triton']}; relu(h)^2 of {M} x {N} bf16 to e4m3")
    print(f"{'layout':22} {'variant':22} {'ms':>8} {'TB/s':>6} exact")
    for r in rows:
        print(f"{r['layout']:22} {r['variant']:22} {r['ms']:8.4f} {r['tb_s']:6.2f} {r['bit_exact']}")
