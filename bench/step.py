"""The driver's own training step, timed on the peer's synthetic conversations, beside nanochat's step.

    python bench/step.py --depth 12 --batch 32 [--peer]      # d12, 32 x 2048
    python bench/step.py --depth 20 --batch 16 [--peer]      # d20, 16 x 2048
    python bench/step.py --depth 20 --batch 16 --micro-batch 4 --profile 3 --peer   # 4 micro-batches, profiled

fastsft side: `fastsft.train.build_run` + `optimizer_step`, the code `fastsft train` runs (compiled model, packed
rows from the C++ packer on the loader thread, fused linear cross-entropy, fused AdamW + Muon), over
`.peer/synth.py` conversations (1-3 turns, ~900 tokens, 66% supervised), model = nanochat master's shape at
that depth with full-length attention on every layer (window_pattern "L", as the peer runs it).
Peer side (--peer, needs `.peer/` as ../shared/peer/README.md says): `.peer/nanochat_sft_bench.py` in a
subprocess on the same GPU, same conversations and seed. Prints step time, real and supervised tokens/s,
conversations/s, MFU on useful FLOPs, peak memory, and the ratios; `--json FILE` appends the rows.
Memory is split into what lives between steps (weights, optimizer state) and what one micro-batch's forward keeps
for its backward (activations): the two numbers behind the memory-scaling table; `--memory-peak N` lists what is
alive at one step's peak, by the line that allocated it. `--profile N` adds both sides'
GPU time per step by kernel family (fastsft.profiling; the peer through bench/peer_profile.py).
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
    """The peer's synthetic conversations when .peer/ is there (both sides then train on the same stream), else
    stand-ins of the same shape: 1-3 turns' worth of tokens, log-normal lengths around 900, two thirds supervised."""
    from fastsft.batches import RenderedSource

    if (PEER / "synth.py").is_file():
        sys.path.insert(0, str(PEER))
        from synth import conversations

        return RenderedSource(conversations(n, seed=1, max_len=seq_len))
    rng = np.random.default_rng(1)
    lengths = np.clip(rng.lognormal(np.log(800), 0.5, n).astype(int), 16, seq_len)
    pairs = []
    for length in lengths:
        ids = rng.integers(0, SYNTH_VOCAB - 9, length, dtype=np.int32)
        ids[0] = SYNTH_VOCAB - 9  # BOS
        pairs.append((ids, (rng.random(length) < 0.66).astype(np.uint8)))
    return RenderedSource(pairs)


def build_step_run(args, extra_steps: int = 0):
    """The driver's Run for the benchmark's shape: build_run over synth_source, one step = args.batch rows."""
    from fastsft.train import build_run
    from fastsft.train_config import load_config

    overrides = [f"--out_dir={args.out}", f"--model.name=d{args.depth}", f"--model.window_pattern={args.window}",
                 f"--seq_len={args.seq}", f"--device_batch_size={args.micro_batch or args.batch}",
                 f"--target_tokens_per_step={args.batch * args.seq}", "--target_examples_per_step=0",
                 f"--num_iterations={args.warmup + args.steps + args.profile + 2 + extra_steps}",
                 f"--loss_layout={args.loss_layout}",
                 f"--max_seqs_per_row={args.max_seqs_per_row}", "--init_lr_frac=1.0", "--eval_every=0",
                 "--answer_accuracy=false", "--samples=0", "--data=synthetic:spell"] + args.override
    cfg = load_config(None, overrides)
    tokenizer = SimpleNamespace(vocab_size=SYNTH_VOCAB, bos_id=SYNTH_VOCAB - 9)
    run = build_run(cfg, rendered=(synth_source(20000, args.seq), tokenizer))
    micro = args.micro_batch or args.batch
    if args.batch % micro or run.micro_batches_per_step != args.batch // micro:
        raise SystemExit(f"expected {args.batch} // {micro} micro-batches per step, got {run.micro_batches_per_step}")
    return run


def fastsft_step(args) -> dict:
    from fastsft.profiling import triton_compiles
    from fastsft.train import compiled_graphs, frozen_heap, optimizer_step

    run = build_step_run(args)
    micro = args.micro_batch or args.batch
    torch.cuda.reset_peak_memory_stats()
    real, supervised, convs, flops, losses = 0, 0, 0, 0.0, []
    with frozen_heap() as freeze:
        for step in range(args.warmup):
            optimizer_step(run, step)
            if step == 0:
                freeze()  # the first step's compiled code
        # Timed as `fastsft train` runs: the host never waits for a step (the driver reads nothing back), so only
        # the window's ends synchronize; events on the stream give each step's device time for the spread.
        marks = [torch.cuda.Event(enable_timing=True) for _ in range(args.steps + 1)]
        graphs = compiled_graphs()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        reserved = [torch.cuda.memory_reserved()]
        compiles = []  # "kernel (step i)" for each JIT compile of fastsft's own Triton kernels in the window
        for i in range(args.steps):
            marks[i].record()
            with triton_compiles() as names:
                loss, _, mbs = optimizer_step(run, args.warmup + i)
            compiles += [f"{name} (step {i})" for name in names]
            losses.append(loss)
            reserved.append(torch.cuda.memory_reserved())  # host-side: the allocator maps memory as steps enqueue
            real += sum(b.num_tokens for b in mbs)
            supervised += sum(b.num_supervised for b in mbs)
            convs += sum(b.num_conversations for b in mbs)
            flops += sum(run.model.training_flops(b.lengths, b.num_supervised) for b in mbs)
        marks[-1].record()
        torch.cuda.synchronize()
        total = time.perf_counter() - t0
        graphs = compiled_graphs() - graphs  # a compile inside the window shows as one slow step
    times = [a.elapsed_time(b) / 1e3 for a, b in zip(marks, marks[1:])]
    mean_loss = float(torch.stack(losses).float().mean())  # same init and batches: comparable across variants
    peak = torch.cuda.max_memory_allocated() / 2**30
    # a one-time cost in the window is either a compile (counted above) or the allocator mapping new memory
    growth = [(i + 1, (b - a) / 2**20) for i, (a, b) in enumerate(zip(reserved, reserved[1:])) if b > a]
    grown = "reserved memory grew at " + (", ".join(f"step {i} (+{mib:.0f} MiB)" for i, mib in growth) or "no step")
    ms = 1000 * np.array(times)
    print(f"fastsft step ms (device, event to event): median {np.median(ms):.1f}, mean {ms.mean():.1f}, min "
          f"{ms.min():.1f}, max {ms.max():.1f}; wall {1000 * total / args.steps:.1f} per step over the window; "
          f"graphs compiled in the window {graphs}; Triton kernels compiled in it: "
          f"{', '.join(compiles) or 'none'}; mean loss {mean_loss:.4f}; {grown}; "
          f"all: {' '.join(f'{t:.0f}' for t in ms)}")
    memory = memory_split(run)
    peak_sites = None
    if args.memory_peak:
        from fastsft.memory_peak import format_peak, record_peak

        try:  # a diagnostic: its failure must not cost the timed row above
            at_peak = record_peak(lambda: optimizer_step(run, args.warmup + args.steps), args.out)
        except Exception as exc:  # noqa: BLE001
            print(f"--memory-peak failed: {type(exc).__name__}: {exc}")
        else:
            print(format_peak(at_peak, top=args.memory_peak))
            peak_sites = [dict(where=site.where, code=site.code, gib=site.bytes / 2**30)
                          for site in at_peak.sites[:args.memory_peak]]
    if args.profile:
        from fastsft.profiling import StepProfiler

        run.profiler = StepProfiler(args.out, steps=args.profile, top=args.top)
        with run.profiler:
            for step in range(args.profile + 1):
                optimizer_step(run, args.warmup + args.steps + step)
                run.profiler.step()
    run.loader.close()
    return dict(side="fastsft", depth=args.depth, batch=args.batch, micro_batch=micro,
                step_ms=1000 * float(np.median(times)), window_ms=1000 * total / args.steps, real_tok_s=real / total,
                supervised_tok_s=supervised / total, convs_s=convs / total, mfu=flops / total / 989e12, peak_gib=peak,
                mean_loss=mean_loss,
                overrides=args.override + [f"inductor.{i}" for i in args.inductor],
                max_seqs=run.max_seqs, **memory, families=run.profiler.families if args.profile else None,
                kernels=[vars(k) for k in run.profiler.kernels] if args.profile else None,  # all, read later
                peak_sites=peak_sites, triton_compiles=compiles)


def memory_split(run) -> dict:
    """GiB alive between steps (weights and optimizer state), and what one micro-batch's forward adds (the
    activations kept for its backward; the loss kernel's workspace is freed by then)."""
    from fastsft.train import forward_loss

    torch.cuda.synchronize()
    between = torch.cuda.memory_allocated()
    batch = run.loader.get()
    loss_sum, _ = forward_loss(run.step_model, batch, run.autocast)
    torch.cuda.synchronize()
    kept = torch.cuda.memory_allocated() - between
    loss_sum.backward()
    run.optimizers.zero_grad(set_to_none=True)
    return dict(between_gib=between / 2**30, activations_gib=kept / 2**30)


def run_peer(args, batch: int, side: str, extra: tuple = ()) -> dict | None:
    """`.peer/nanochat_sft_bench.py` in a subprocess on the same GPU and conversations; its printed numbers as a row."""
    script = PEER / "nanochat_sft_bench.py"
    if not script.is_file():
        print("peer: .peer/nanochat_sft_bench.py not found (see ../shared/peer/README.md); skipped")
        return None
    cmd = [sys.executable, str(script), "--depth", str(args.depth), "--batch", str(batch), "--seq", str(args.seq),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--window", args.window, *extra]
    out = subprocess.run(cmd, capture_output=True, text=True)
    text = out.stdout + out.stderr
    if out.returncode != 0:
        print(text[-3000:])
        return None
    return peer_row(text, side, args.depth, batch, args.seq, args.steps)


def peer_row(text: str, side: str, depth: int, batch: int, seq: int, steps: int) -> dict:
    """The peer's printed numbers as a row, with its real-token count mended.

    The peer zeroes its counters after the first timed step has already fetched (and counted) the next batch,
    so its real tokens and conversations cover steps - 1 batches while its time covers steps: both read 1/steps
    low (its supervised count is taken per step and is right). Its tok/s are over the window's total time; its
    mean step comes back from the MFU it prints (padded tokens over that time), so a ratio can also be taken at
    the median step, which slow outlier steps do not move."""
    num = r"([\d,\.]+)"

    def grab(pattern):
        m = re.search(pattern, text)
        return float(m.group(1).replace(",", "")) if m else float("nan")

    counted = steps / (steps - 1) if steps > 1 else float("nan")  # one timed step: no batch counted at all
    row = dict(side=side, depth=depth, batch=batch, step_ms=grab(r"step ms median " + num),
               real_tok_s=grab(r"real tok/s " + num) * counted, supervised_tok_s=grab(r"supervised tok/s " + num),
               convs_s=grab(r"convs/s " + num) * counted, peak_gib=grab(r"peak mem " + num),
               mfu=grab(r"MFU\(nanochat formula, 989 TF peak\) " + num) / 100)
    if "SEED-RECIPE" not in text:  # the seed recipe's MFU counts real tokens, not padded ones
        row["window_ms"] = 1000 * grab(r"flops/tok " + num) * 1e9 * batch * seq / (row["mfu"] * 989e12)
    return row


def ratios(f: dict, n: dict) -> dict:
    """fastsft / nanochat throughput over each side's timed window, and at each side's median step (the same
    tokens per step, divided by the median instead of the mean step time). The lower of the two is the claim."""
    window = {k: f[k] / n[k] for k in ("real_tok_s", "supervised_tok_s")}
    if "window_ms" not in f or not n.get("window_ms", 0) > 0:
        return dict(window=window)
    # tokens per step over the median step: each side's rate over its window, times window / median step
    spread = (f["window_ms"] / f["step_ms"]) / (n["window_ms"] / n["step_ms"])
    return dict(window=window, median={k: v * spread for k, v in window.items()})


def peer_step(args) -> dict | None:
    """nanochat's step at the same shape, and (with --profile) its GPU time by family from bench/peer_profile.py."""
    row = run_peer(args, args.batch, "nanochat")
    if row and args.profile and not args.no_peer_profile:
        out = subprocess.run([sys.executable, str(ROOT / "bench" / "peer_profile.py"), "--depth", str(args.depth),
                              "--batch", str(args.batch), "--steps", str(args.profile), "--window", args.window],
                             capture_output=True, text=True)
        print(out.stdout[-4000:] + out.stderr[-2000:])
        m = re.search(r"^FAMILIES (.*)$", out.stdout, re.M)
        if m:
            row.update(json.loads(m.group(1)))
    return row


def seed_recipe(args) -> dict | None:
    """nanochat's step fed as the seed article's collate does (each batch padded to its longest conversation,
    eager): the baseline of the 15x goal."""
    return run_peer(args, 4, "seed recipe", ("--seed-recipe",))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=int, default=12)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=6)
    ap.add_argument("--window", default="L")
    ap.add_argument("--loss-layout", default="fast", choices=("fast", "low_memory"))
    ap.add_argument("--max-seqs-per-row", type=int, default=0, help="0 = sized to the data")
    ap.add_argument("--micro-batch", type=int, default=0, help="rows per micro-batch (0 = --batch: one per step)")
    ap.add_argument("--peer", action="store_true", help="run nanochat's step in the same command")
    ap.add_argument("--seed-recipe", action="store_true", help="also nanochat with the seed article's collate")
    ap.add_argument("--profile", type=int, default=0, help="profile this many steps of each side")
    ap.add_argument("--top", type=int, default=15, help="with --profile: list this many kernels")
    ap.add_argument("--inductor", action="append", default=[], metavar="KEY=VALUE",
                    help="an experiment: set torch._inductor.config.KEY (Python literal) before compiling")
    ap.add_argument("--memory-peak", type=int, default=0, metavar="N",
                    help="record one more step's allocations; list the N largest sites alive at its peak "
                         "(fastsft.memory_peak; the snapshot goes to --out)")
    ap.add_argument("--no-peer-profile", action="store_true", help="with --profile: profile fastsft's side only")
    ap.add_argument("--out", default="/tmp/fastsft-step-bench")
    ap.add_argument("--json", default=None, help="append the rows to this JSON-lines file")
    ap.add_argument("--label", default=None, help="a name for this run's code or setup, kept in its JSON rows")
    ap.add_argument("--override", action="append", default=[], help="extra --key=value for the driver config")
    return ap.parse_args(argv)


def set_inductor(settings: list[str]) -> None:
    import ast

    import torch._inductor.config as inductor

    for item in settings:
        key, _, value = item.partition("=")
        target = inductor
        *path, name = key.split(".")
        for part in path:
            target = getattr(target, part)
        if not hasattr(target, name):
            raise SystemExit(f"--inductor: torch._inductor.config has no {key}")
        setattr(target, name, ast.literal_eval(value))


def main() -> None:
    args = parse_args()
    set_inductor(args.inductor)
    rows = [fastsft_step(args)]
    torch.cuda.empty_cache()
    if args.peer:
        peer = peer_step(args)
        if peer:
            rows.append(peer)
    seed = seed_recipe(args) if args.seed_recipe else None
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                date=datetime.now(timezone.utc).isoformat(), label=args.label)
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        pass
    if args.json:
        with open(args.json, "a") as f:
            for r in rows + ([seed] if seed else []):
                f.write(json.dumps({**meta, **r}) + "\n")
    print(f"\n{meta}")
    print(f"{'side':9s} {'d':>3s} {'B':>3s} {'mb':>3s} {'step ms':>8s} {'real tok/s':>11s} {'sup tok/s':>10s} "
          f"{'conv/s':>7s} {'MFU':>6s} {'peak GiB':>8s} {'between':>8s} {'act/mb':>7s}")
    for r in rows:
        print(f"{r['side']:9s} {r['depth']:3d} {r['batch']:3d} {r.get('micro_batch', r['batch']):3d} "
              f"{r['step_ms']:8.1f} {r['real_tok_s']:11,.0f} {r['supervised_tok_s']:10,.0f} {r['convs_s']:7.1f} "
              f"{100 * r['mfu']:5.1f}% {r['peak_gib']:8.1f} {r.get('between_gib', float('nan')):8.1f} "
              f"{r.get('activations_gib', float('nan')):7.1f}")
    if len(rows) == 2:
        f, n = rows
        for basis, r in ratios(f, n).items():
            print(f"ratio fastsft/nanochat d{args.depth} ({basis}): real {r['real_tok_s']:.2f}x, supervised "
                  f"{r['supervised_tok_s']:.2f}x, memory {f['peak_gib'] / n['peak_gib']:.2f}x")
    if seed:
        f = rows[0]
        print(f"seed recipe d{args.depth} B4: real {seed['real_tok_s']:,.0f} tok/s, supervised "
              f"{seed['supervised_tok_s']:,.0f}, peak {seed['peak_gib']} GiB; fastsft / seed recipe: real "
              f"{f['real_tok_s'] / seed['real_tok_s']:.1f}x, supervised {f['supervised_tok_s'] / seed['supervised_tok_s']:.1f}x")
    profiled = [r for r in rows if r.get("families")]
    if profiled:
        print("GPU ms per step by kernel family: " + " | ".join(r["side"] for r in profiled))
        for family in profiled[0]["families"]:
            print(f"  {family:12s} " + " ".join(f"{r['families'].get(family, 0.0):9.2f}" for r in profiled))
        print(f"  {'total':12s} " + " ".join(f"{sum(r['families'].values()):9.2f}" for r in profiled))


if __name__ == "__main__":
    main()
