"""nanochat's SFT step (`.peer/nanochat_sft_bench.py`) under fastsft's StepProfiler, for the side-by-side profile.

    python bench/peer_profile.py --depth 12 --batch 32 --steps 3

The peer script builds its model, optimizer and batch feeder and returns without a loop when NC_PROFILE is set;
this runs its step (forward with loss, backward, next batch, optimizer, zero_grad: the order of its own loop)
a few times, then profiles `--steps` steps. Prints the family table, the memory alive between steps and what
one forward keeps, and a last line `FAMILIES {json}` that bench/step.py reads.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PEER = ROOT / ".peer"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=int, default=12)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--window", default="L")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", default="/tmp/fastsft-peer-profile")
    args = ap.parse_args()
    script = PEER / "nanochat_sft_bench.py"
    if not script.is_file():
        raise SystemExit("peer_profile: .peer/nanochat_sft_bench.py not found (see ../shared/peer/README.md)")
    os.environ["NC_PROFILE"] = "1"
    sys.path.insert(0, str(PEER))
    sys.argv = [str(script), "--depth", str(args.depth), "--batch", str(args.batch), "--seq", str(args.seq),
                "--window", args.window]
    peer = runpy.run_path(str(script), run_name="peer")
    cmodel, model, opt, next_batch = peer["cmodel"], peer["model"], peer["opt"], peer["next_batch"]
    batch = [peer["x"], peer["y"]]

    def step():
        loss = cmodel(*batch)
        loss.backward()
        batch[:] = next_batch()
        opt.step()
        model.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    between = torch.cuda.memory_allocated()
    loss = cmodel(*batch)
    torch.cuda.synchronize()
    kept = torch.cuda.memory_allocated() - between
    loss.backward()
    model.zero_grad(set_to_none=True)

    from fastsft.profiling import StepProfiler

    profiler = StepProfiler(args.out, steps=args.steps)
    with profiler:
        for _ in range(args.steps + 1):
            step()
            profiler.step()
    print(f"memory: {between / 2**30:.2f} GiB between steps, {kept / 2**30:.2f} GiB kept by one forward, "
          f"peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    print("FAMILIES " + json.dumps(dict(families=profiler.families, between_gib=between / 2**30,
                                        activations_gib=kept / 2**30)))


if __name__ == "__main__":
    main()
