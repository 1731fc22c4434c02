"""The driver's whole training step (the code `fastsft train` runs) as pytest-benchmark cases, GPU only.

Same run as bench/step.py (build_run over synthetic conversations, nanochat master's shape at d12 / d20, one
micro-batch per step); each round is one optimizer step, synchronized. The side-by-side with nanochat, the memory
split and the profile are bench/step.py's (`bash bench/gpu_session.sh step20 step12`).

    python -m pytest bench/bench_step.py --benchmark-only [--bench-rows rows.json]
"""

from __future__ import annotations

import math

import pytest

pytestmark = pytest.mark.gpu

ROUNDS, WARMUP = 10, 4


@pytest.mark.parametrize("depth,rows,fp8", [(12, 32, False), (20, 16, False), (12, 32, True), (20, 16, True)])
def test_driver_step(gpu_benchmark, benchmark, depth, rows, fp8):
    import step as step_bench

    from fastsft.train import optimizer_step

    args = step_bench.parse_args(["--depth", str(depth), "--batch", str(rows), "--steps", "0", "--warmup", "0",
                                  f"--override=--fp8={str(fp8).lower()}"])
    run = step_bench.build_step_run(args, extra_steps=ROUNDS + WARMUP)
    done = {"steps": 0, "tokens": 0, "losses": []}

    def one_step():
        loss, _, micro_batches = optimizer_step(run, done["steps"])
        done["steps"] += 1
        done["tokens"] += sum(b.num_tokens for b in micro_batches)
        done["losses"].append(loss)

    try:
        gpu_benchmark(one_step, rounds=ROUNDS, warmup_rounds=WARMUP)
    finally:
        run.loader.close()
    losses = [float(x) for x in done["losses"]]  # device scalars: the driver's step reads nothing back
    assert done["steps"] == ROUNDS + WARMUP and all(math.isfinite(x) for x in losses)
    benchmark.extra_info.update(depth=depth, rows=rows, fp8=fp8, seq_len=args.seq, loss_first=losses[0],
                                loss_last=losses[-1], tokens_per_step=done["tokens"] / done["steps"])
