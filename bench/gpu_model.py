"""GPU benchmark of the model on packed batches: backend agreement, attention and model speed, compile stability.

One run prints a table last. Sections:
  agree    every available attention backend against the exact per-conversation fallback (fp32), on packed bf16
           batches, output and dq max abs error; and the whole model's logits per backend against the fallback.
  attn     causal attention forward+backward over chat-like packed rows (16 heads of 128), per backend, with
           useful TFLOP/s counted inside each conversation only; the row "sdpa_rows_dense" is what nanochat does
           (causal SDPA over whole rows, across the packed conversations), with the same useful FLOPs.
  model    forward+backward of the packed loss (eager, bf16 autocast) at d12/d20 widths per backend; useful
           TFLOP/s = 6 * block weights * real tokens + 6 * lm_head * supervised rows + attention inside
           conversations (sliding windows counted as windows).
  compile  torch.compile(model) over 50 steps of differently packed batches: graphs compiled after the first step
           (0 = no recompiles) and the compiled vs eager step time.

Usage: python bench/gpu_model.py [--quick]
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

from fastsft import attention
from fastsft.attention import attention_pairs, available_backends, varlen_attention
from fastsft.model import GPT, GPTConfig

SEQ_LEN = 2048


def chat_lengths(rng: np.random.Generator, mean: float, count: int, max_len: int) -> list[int]:
    """Lognormal conversation lengths with the given mean (sigma 0.8), clipped to [8, max_len]."""
    sigma = 0.8
    mu = math.log(mean) - sigma**2 / 2
    return np.clip(rng.lognormal(mu, sigma, count), 8, max_len).astype(int).tolist()


def pack_lengths(lengths: list[int], rows: int, seq_len: int) -> list[list[int]]:
    """First-fit decreasing into a fixed number of rows; conversations that fit nowhere are left out."""
    free = [seq_len] * rows
    placed: list[list[int]] = [[] for _ in range(rows)]
    for length in sorted(lengths, reverse=True):
        for r in range(rows):
            if free[r] >= length:
                placed[r].append(length)
                free[r] -= length
                break
    return placed


def packed_batch(rng, rows, seq_len, mean, vocab, device, supervised_frac=0.66):
    """A packer-shaped batch: each row's conversations back to back, its free tail one padding segment,
    cu_seqlens padded to the packer's fixed length (fastsft.packing.default_max_seqs + 1, restated here so this
    script runs without the C++ extension; first-fit instead of the packer's best-fit changes no timing)."""
    placed = pack_lengths(chat_lengths(rng, mean, rows * seq_len // int(mean) * 2, seq_len), rows, seq_len)
    bounds, positions, conv_lengths = [0], [], []
    supervised = np.zeros((rows, seq_len), dtype=bool)
    for r, lengths in enumerate(placed):
        off = 0
        for length in lengths:
            positions += list(range(length))
            supervised[r, off:off + length - 1] = rng.random(length - 1) < supervised_frac
            off += length
            bounds.append(r * seq_len + off)
            conv_lengths.append(length)
        if off < seq_len:
            positions += list(range(seq_len - off))
            bounds.append((r + 1) * seq_len)
    fixed = rows * (seq_len // 32 + 2) + 1
    bounds += [bounds[-1]] * (fixed - len(bounds))
    input_ids = torch.from_numpy(rng.integers(0, vocab, (rows, seq_len)))
    targets = torch.roll(input_ids, -1, dims=1)
    targets[~torch.from_numpy(supervised)] = -1
    return dict(
        input_ids=input_ids.to(device), targets=targets.to(device),
        position_ids=torch.tensor(positions).view(rows, seq_len).to(device),
        cu_seqlens=torch.tensor(bounds, dtype=torch.int32, device=device),
        lengths=conv_lengths, num_supervised=int(supervised.sum()),
    )


def timeit(fn, warmup=3, iters=10) -> float:
    """Median milliseconds of fn() on the GPU."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return float(np.median(times))


def row(section, backend, case, ms=None, tflops=None, note=""):
    return dict(section=section, backend=backend, case=case, ms=ms, tflops=tflops, note=note)


# ----------------------------------------------------------------------------------------------------------------


def bench_agreement(backends, rng, device):
    out = []
    heads, dim = 16, 128
    for n_kv, window in ((16, -1), (4, -1), (4, 255)):
        batch = packed_batch(rng, 4, SEQ_LEN, 420, 2, device)
        cu, n = batch["cu_seqlens"], 4 * SEQ_LEN
        q = torch.randn(n, heads, dim, device=device, dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(n, n_kv, dim, device=device, dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(n, n_kv, dim, device=device, dtype=torch.bfloat16, requires_grad=True)
        grad = torch.randn(n, heads, dim, device=device, dtype=torch.bfloat16)
        q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
        ref = varlen_attention(q32, k32, v32, cu, SEQ_LEN, window, backend="sdpa_segments")
        (dq_ref,) = torch.autograd.grad((ref * grad.float()).sum(), (q32,))
        for b in backends:
            case = f"H{heads}/Hkv{n_kv} D{dim} window {window}"
            try:
                y = varlen_attention(q, k, v, cu, SEQ_LEN, window, backend=b)
                (dq,) = torch.autograd.grad((y.float() * grad.float()).sum(), (q,))
                err = (y.float() - ref).abs().max().item()
                derr = (dq.float() - dq_ref).abs().max().item()
                out.append(row("agree", b, case, note=f"max|out-ref| {err:.2e}  max|dq-ref| {derr:.2e}"))
            except Exception as exc:  # one broken backend must not hide the others' numbers
                out.append(row("agree", b, case, note=f"ERROR {type(exc).__name__}: {str(exc)[:80]}"))
    # Whole model, tiny: logits of every backend against the fallback.
    config = GPTConfig(sequence_len=512, vocab_size=512, n_layer=4, n_head=4, n_kv_head=2, n_embd=256)
    torch.manual_seed(0)
    model = GPT(config).to(device)
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    batch = packed_batch(rng, 4, 512, 150, 512, device)
    kw = dict(position_ids=batch["position_ids"], cu_seqlens=batch["cu_seqlens"])
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
        attention.set_backend("sdpa_segments")
        ref = model(batch["input_ids"], **kw)
        for b in backends:
            attention.set_backend(b)
            try:
                err = (model(batch["input_ids"], **kw) - ref).abs().max().item()
                out.append(row("agree", b, "model logits d256 L4 (SSSL)", note=f"max|logits-ref| {err:.2e}"))
            except Exception as exc:
                out.append(row("agree", b, "model logits", note=f"ERROR {type(exc).__name__}: {str(exc)[:80]}"))
    attention.set_backend(None)
    return out


def bench_attention(backends, rng, device, rows_n=16):
    out = []
    heads, dim = 16, 128
    for mean in (420, 900):
        batch = packed_batch(rng, rows_n, SEQ_LEN, mean, 2, device)
        cu, n = batch["cu_seqlens"], rows_n * SEQ_LEN
        useful = 14 * dim * heads * sum(attention_pairs(L, -1) for L in batch["lengths"])
        q = torch.randn(n, heads, dim, device=device, dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(n, heads, dim, device=device, dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(n, heads, dim, device=device, dtype=torch.bfloat16, requires_grad=True)
        grad = torch.randn_like(q)
        case = f"mean {mean} tok, {len(batch['lengths'])} convs, {rows_n}x{SEQ_LEN}"
        for b in backends:
            def step(b=b):
                varlen_attention(q, k, v, cu, SEQ_LEN, backend=b).backward(grad)
            try:
                ms = timeit(step, iters=3 if b == "sdpa_segments" else 10)
                out.append(row("attn", b, case, ms, useful / ms / 1e9))
            except Exception as exc:
                out.append(row("attn", b, case, note=f"ERROR {type(exc).__name__}: {str(exc)[:80]}"))
        qd, kd, vd = (t.detach().view(rows_n, SEQ_LEN, heads, dim).transpose(1, 2).requires_grad_() for t in (q, k, v))
        gd = grad.view(rows_n, SEQ_LEN, heads, dim).transpose(1, 2)

        def dense():
            torch.nn.functional.scaled_dot_product_attention(qd, kd, vd, is_causal=True).backward(gd)

        ms = timeit(dense)
        out.append(row("attn", "sdpa_rows_dense", case, ms, useful / ms / 1e9, "nanochat: across conversations"))
    return out


def train_step(model, batch):
    with torch.autocast("cuda", torch.bfloat16):
        loss_sum, n = model(batch["input_ids"], batch["targets"], position_ids=batch["position_ids"],
                            cu_seqlens=batch["cu_seqlens"])
    (loss_sum / n).backward()
    return loss_sum


def bench_model(backends, rng, device, rows_n=8):
    out = []
    for name in ("d12", "d20"):
        config = GPTConfig.from_name(name, sequence_len=SEQ_LEN)
        torch.manual_seed(0)
        model = GPT(config).to(device)
        model.init_weights()
        batch = packed_batch(rng, rows_n, SEQ_LEN, 900, config.vocab_size, device)
        flops = model.training_flops(batch["lengths"], batch["num_supervised"])
        case = f"{name} {rows_n}x{SEQ_LEN} mean 900, SSSL"
        for b in backends:
            attention.set_backend(b)
            try:
                ms = timeit(lambda: train_step(model, batch), warmup=2, iters=3 if b == "sdpa_segments" else 8)
                out.append(row("model", b, case, ms, flops / ms / 1e9,
                               f"peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"))
            except Exception as exc:
                out.append(row("model", b, case, note=f"ERROR {type(exc).__name__}: {str(exc)[:80]}"))
            torch.cuda.reset_peak_memory_stats()
            model.zero_grad(set_to_none=True)
        attention.set_backend(None)
        del model
        torch.cuda.empty_cache()
    return out


def bench_compile(rng, device, steps=50, rows_n=8):
    from torch._dynamo.utils import counters

    torch._logging.set_logs(recompiles=True)  # any recompile prints its reason
    backend = available_backends("cuda")[0]
    attention.set_backend(backend)
    attention.select_backend("cuda")  # decided before tracing
    config = GPTConfig.from_name("d12", n_layer=4, sequence_len=SEQ_LEN)  # d12's width, 4 layers
    torch.manual_seed(0)
    model = GPT(config).to(device)
    model.init_weights()
    compiled = torch.compile(model)
    batches = [packed_batch(rng, rows_n, SEQ_LEN, 420 + 40 * (i % 12), config.vocab_size, device)
               for i in range(steps)]
    t0 = time.perf_counter()
    train_step(compiled, batches[0])
    torch.cuda.synchronize()
    compile_s = time.perf_counter() - t0
    graphs_after_first = counters["stats"]["unique_graphs"]
    for batch in batches[1:]:
        train_step(compiled, batch)
    torch.cuda.synchronize()
    recompiles = counters["stats"]["unique_graphs"] - graphs_after_first
    ms_compiled = timeit(lambda: train_step(compiled, batches[1]), warmup=1, iters=8)
    ms_eager = timeit(lambda: train_step(model, batches[1]), warmup=1, iters=8)
    attention.set_backend(None)
    case = f"d12 width, 4 layers, {rows_n}x{SEQ_LEN}, {steps} packings"
    return [row("compile", backend, case, ms_compiled, None,
                f"new graphs after step 1: {recompiles} (graphs at step 1: {graphs_after_first}); "
                f"first step {compile_s:.0f} s; eager {ms_eager:.1f} ms")]


def main(quick: bool = False) -> list[dict]:
    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu_model.py needs a CUDA device")
    device = torch.device("cuda")
    rng = np.random.default_rng(0)
    backends = available_backends("cuda")
    rows = bench_agreement(backends, rng, device)
    rows += bench_attention(backends, rng, device)
    if not quick:
        rows += bench_model(backends, rng, device)
    try:
        rows += bench_compile(rng, device, steps=10 if quick else 50)
    except Exception as exc:
        rows.append(row("compile", "-", "torch.compile(model)", note=f"ERROR {type(exc).__name__}: {str(exc)[:120]}"))
    return rows


def print_table(rows):
    import triton

    print(f"\n{torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__}")
    print(f"{'section':8} {'backend':16} {'case':42} {'ms':>9} {'TFLOP/s':>8}  note")
    for r in rows:
        ms = f"{r['ms']:.2f}" if r["ms"] is not None else "-"
        tf = f"{r['tflops']:.0f}" if r["tflops"] is not None else "-"
        print(f"{r['section']:8} {r['backend']:16} {r['case'][:42]:42} {ms:>9} {tf:>8}  {r['note']}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="skip the model section, 10 compile steps")
    print_table(main(parser.parse_args().quick))
