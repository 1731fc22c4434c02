"""The driver's own training step, timed on the peer's synthetic conversations, beside nanochat's step.

    python bench/step.py --depth 12 --batch 32 [--peer]      # d12, 32 x 2048
    python bench/step.py --depth 20 --batch 16 [--peer]      # d20, 16 x 2048

fastsft side: `fastsft.train.build_run` + `optimizer_step`, the code `fastsft train` runs (compiled model, packed
rows from the C++ packer on the loader thread, fused linear cross-entropy, fused AdamW + Muon), over
`.peer/synth.py` conversations (1-3 turns, ~900 tokens, 66% supervised), model = nanochat master's shape at
that depth with full-length attention on every layer (window_pattern "L", as the peer runs it).
Peer side (--peer, needs `.peer/` as ../shared/peer/README.md says): `.peer/nanochat_sft_bench.py` in a
subprocess on the same GPU, same conversations and seed. Prints step time, real and supervised tokens/s,
conversations/s, MFU on useful FLOPs, peak memory, and the ratios; `--json FILE` appends the rows.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
PEER = ROOT / ".peer"
SYNTH_VOCAB = 32768  # synth.py's ids: specials at the top of a 32768 vocabulary, BOS = vocab - 9


def synth_source(n: int, seq_len: int):
    sys.path.insert(0, str(PEER))
    from synth import conversations  # the peer's generator, so both sides train on the same stream

    from fastsft.batches import RenderedSource

    return RenderedSource(conversations(n, seed=1, max_len=seq_len))


def fastsft_step(args) -> dict:
    from fastsft.train import build_run, optimizer_step
    from fastsft.train_config import load_config

    overrides = [f"--out_dir={args.out}", f"--model.name=d{args.depth}", f"--model.window_pattern={args.window}",
                 f"--seq_len={args.seq}", f"--device_batch_size={args.batch}",
                 f"--target_tokens_per_step={args.batch * args.seq}", "--target_examples_per_step=0",
                 f"--num_iterations={args.warmup + args.steps}", f"--loss_layout={args.loss_layout}",
                 f"--max_seqs_per_row={args.max_seqs_per_row}", "--init_lr_frac=1.0", "--eval_every=0",
                 "--answer_accuracy=false", "--samples=0", "--data=synthetic:spell"] + args.override
    cfg = load_config(None, overrides)
    tokenizer = SimpleNamespace(vocab_size=SYNTH_VOCAB, bos_id=SYNTH_VOCAB - 9)
    run = build_run(cfg, rendered=(synth_source(20000, args.seq), tokenizer))
    if run.micro_batches_per_step != 1:
        raise SystemExit(f"expected one micro-batch per step, got {run.micro_batches_per_step}")
    torch.cuda.reset_peak_memory_stats()
    times, real, supervised, convs, flops = [], 0, 0, 0, 0.0
    for step in range(args.warmup + args.steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss, _, mbs = optimizer_step(run, step)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if step >= args.warmup:
            times.append(dt)
            real += sum(b.num_tokens for b in mbs)
            supervised += sum(b.num_supervised for b in mbs)
            convs += sum(b.num_conversations for b in mbs)
            flops += sum(run.model.training_flops(b.lengths, b.num_supervised) for b in mbs)
    run.loader.close()
    total = sum(times)
    return dict(side="fastsft", depth=args.depth, batch=args.batch, step_ms=1000 * float(np.median(times)),
                real_tok_s=real / total, supervised_tok_s=supervised / total, convs_s=convs / total,
                mfu=flops / total / 989e12, peak_gib=torch.cuda.max_memory_allocated() / 2**30, last_loss=loss,
                max_seqs=run.max_seqs)


def peer_step(args) -> dict | None:
    script = PEER / "nanochat_sft_bench.py"
    if not script.is_file():
        print("peer: .peer/nanochat_sft_bench.py not found (see ../shared/peer/README.md); skipped")
        return None
    cmd = [sys.executable, str(script), "--depth", str(args.depth), "--batch", str(args.batch), "--seq",
           str(args.seq), "--steps", str(args.steps), "--warmup", str(args.warmup), "--window", args.window]
    out = subprocess.run(cmd, capture_output=True, text=True)
    text = out.stdout + out.stderr
    if out.returncode != 0:
        print(text[-3000:])
        return None
    num = r"([\d,\.]+)"

    def grab(pattern):
        m = re.search(pattern, text)
        return float(m.group(1).replace(",", "")) if m else float("nan")

    return dict(side="nanochat", depth=args.depth, batch=args.batch, step_ms=grab(r"step ms median " + num),
                real_tok_s=grab(r"real tok/s " + num), supervised_tok_s=grab(r"supervised tok/s " + num),
                convs_s=grab(r"convs/s " + num), mfu=grab(r"MFU\(nanochat formula, 989 TF peak\) " + num) / 100,
                peak_gib=grab(r"peak mem " + num))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=int, default=12)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=6)
    ap.add_argument("--window", default="L")
    ap.add_argument("--loss-layout", default="fast", choices=("fast", "low_memory"))
    ap.add_argument("--max-seqs-per-row", type=int, default=0, help="0 = sized to the data")
    ap.add_argument("--peer", action="store_true", help="run nanochat's step in the same command")
    ap.add_argument("--out", default="/tmp/fastsft-step-bench")
    ap.add_argument("--json", default=None, help="append the rows to this JSON-lines file")
    ap.add_argument("--override", action="append", default=[], help="extra --key=value for the driver config")
    args = ap.parse_args()
    rows = [fastsft_step(args)]
    torch.cuda.empty_cache()
    if args.peer:
        peer = peer_step(args)
        if peer:
            rows.append(peer)
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, date=datetime.now(timezone.utc).isoformat())
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        pass
    if args.json:
        with open(args.json, "a") as f:
            for r in rows:
                f.write(json.dumps({**meta, **r}) + "\n")
    print(f"\n{meta}")
    print(f"{'side':9s} {'d':>3s} {'B':>3s} {'step ms':>8s} {'real tok/s':>11s} {'sup tok/s':>10s} {'conv/s':>7s} "
          f"{'MFU':>6s} {'peak GiB':>8s}")
    for r in rows:
        print(f"{r['side']:9s} {r['depth']:3d} {r['batch']:3d} {r['step_ms']:8.1f} {r['real_tok_s']:11,.0f} "
              f"{r['supervised_tok_s']:10,.0f} {r['convs_s']:7.1f} {100 * r['mfu']:5.1f}% {r['peak_gib']:8.1f}")
    if len(rows) == 2:
        f, n = rows
        print(f"ratio fastsft/nanochat d{args.depth}: real {f['real_tok_s'] / n['real_tok_s']:.2f}x, supervised "
              f"{f['supervised_tok_s'] / n['supervised_tok_s']:.2f}x, memory {f['peak_gib'] / n['peak_gib']:.2f}x")


if __name__ == "__main__":
    main()
