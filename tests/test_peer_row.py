"""bench/step.py's reading of the peer's printout: the real-token count mended, the mean step recovered from the
MFU, and the ratio taken both over the window and at the median step."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("step_bench", Path(__file__).resolve().parents[1] / "bench" / "step.py")
step_bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(step_bench)


def printout(median_ms, real, sup, convs, mfu_pct, gflops, seed=False):
    return (f"{'SEED-RECIPE ' if seed else ''}nanochat d20 dim1280 B16 T2048 window=L\n"
            f"  step ms median {median_ms}\n"
            f"  padded tok/s 140,000  real tok/s {real:,}  supervised tok/s {sup:,}  convs/s {convs}\n"
            f"  MFU(nanochat formula, 989 TF peak) {mfu_pct}%  peak mem 38.2 GiB\n"
            f"  params 561M  flops/tok {gflops} GF\n")


def test_real_tokens_and_conversations_are_counted_over_every_timed_step():
    row = step_bench.peer_row(printout(234.4, 110144, 77616, 123.3, 38.5, 3.25), "nanochat", 20, 16, 2048, 20)
    assert row["real_tok_s"] == pytest.approx(110144 * 20 / 19)
    assert row["convs_s"] == pytest.approx(123.3 * 20 / 19)
    assert row["supervised_tok_s"] == 77616  # counted per step already
    assert row["step_ms"] == 234.4 and row["peak_gib"] == 38.2


def test_mean_step_comes_back_from_the_mfu():
    # 3.25 GF/token x 16 x 2048 tokens at 45% of 989 TF/s is a 239.3 ms step
    row = step_bench.peer_row(printout(237.0, 129000, 91000, 145.0, 45.0, 3.25), "nanochat", 20, 16, 2048, 20)
    assert row["window_ms"] == pytest.approx(3.25e9 * 16 * 2048 / (0.45 * 989e12) * 1000)
    seed = step_bench.peer_row(printout(262.6, 13264, 9541, 15.4, 4.3, 3.25, seed=True), "seed recipe", 20, 4, 2048,
                               20)
    assert "window_ms" not in seed  # its MFU counts real tokens, so no mean step can be read from it


def test_slow_peer_steps_do_not_raise_the_median_ratio():
    fastsft = dict(step_ms=178.0, window_ms=179.0, real_tok_s=179728.0, supervised_tok_s=120458.0)
    steady = dict(step_ms=234.4, window_ms=235.7, real_tok_s=136000.0, supervised_tok_s=91000.0)
    slowed = dict(steady, window_ms=279.4, real_tok_s=136000.0 * 235.7 / 279.4,
                  supervised_tok_s=91000.0 * 235.7 / 279.4)
    a, b = step_bench.ratios(fastsft, steady), step_bench.ratios(fastsft, slowed)
    assert b["window"]["supervised_tok_s"] > 1.15 * a["window"]["supervised_tok_s"]  # outliers flatter the window
    for key in ("real_tok_s", "supervised_tok_s"):
        assert b["median"][key] == pytest.approx(a["median"][key])
        assert b["median"][key] < b["window"][key]
    assert a["median"]["supervised_tok_s"] == pytest.approx(120458 / 91000 * (179.0 / 178.0) / (235.7 / 234.4))
    assert set(step_bench.ratios(fastsft, dict(step_ms=1.0, real_tok_s=1.0, supervised_tok_s=1.0))) == {"window"}
