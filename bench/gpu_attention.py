"""GPU check and timing of the attention backends on packed chat rows, flash-attn-4's custom op first.

  check    every available backend against the exact fallback (sdpa_segments on fp32 copies): max error of the
           output and of dq, dk, dv relative to the reference's largest entry, on odd conversation lengths (1 to
           2048 tokens, a 3-token uncovered tail, padding entries), full causal and sliding windows, with and
           without GQA. FAIL above 2e-2. flash_attn_4 runs through fastsft's custom op; the row "fa4_autograd"
           compares the op with flash-attn-4's own autograd function (the same kernels: expect ~0).
  compile  torch.compile(fullgraph=True) of a small model with the chosen backend, forward+backward over several
           packings: compiled frames (expect 1) and the largest logits difference to the eager fallback model.
  time     forward+backward at 16x2048 rows, 10 heads of 128 (d20's attention), on synth-like conversations,
           per backend, full causal and the short window (512) of nanochat's SSSL pattern, at the default segment
           budget (66 per row) and at fastsft.packing.segment_budget's; plus nanochat's dense causal SDPA over
           whole rows (across conversations, same useful FLOPs) and flash-attn-4's own autograd function.
           Useful TFLOP/s count 14 * D * H FLOPs per (query, key) pair inside each conversation.

Usage (the project installed, flash-attn-4 importable): python bench/gpu_attention.py [--json rows.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import environment, median_ms, write_rows  # noqa: E402

from fastsft import attention  # noqa: E402
from fastsft.attention import attention_pairs, available_backends, varlen_attention  # noqa: E402
from fastsft.model import GPT, GPTConfig  # noqa: E402
from fastsft.packing import default_max_seqs, pack_rows, segment_budget  # noqa: E402

D20 = GPTConfig.from_name("d20")  # the attention shape of the d20 step: 10 heads of 128, rows of 2048
SEQ_LEN, ROWS, HEADS, HEAD_DIM = D20.sequence_len, 16, D20.n_head, D20.head_dim
SHORT_WINDOW = min(D20.window_sizes())  # nanochat's S window: 2048 / 4 rounded up to 128 = 512
TOLERANCE = 2e-2


def row(section, backend, case, ms=None, tflops=None, note="", ok=None):
    return dict(section=section, backend=backend, case=case, ms=ms, tflops=tflops, note=note, ok=ok)


def synth_conversations(n: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The peer benchmark's synthetic conversations (.peer/synth.py beside the checkout when present), else the
    same length distribution restated (1-3 turns of log-normal user / assistant text)."""
    path = Path(__file__).resolve().parents[1] / ".peer" / "synth.py"
    if path.exists():
        spec = importlib.util.spec_from_file_location("peer_synth", path)
        synth = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(synth)
        convs = synth.conversations(n, seed=seed, max_len=SEQ_LEN)
    else:
        rng = np.random.default_rng(seed)
        convs = []
        for _ in range(n):
            length = 1 + sum(int(np.clip(rng.lognormal(4.6, 0.9), 8, 1500)) + 3
                             + int(np.clip(rng.lognormal(5.4, 0.8), 8, 1500)) + 1
                             for _ in range(int(rng.integers(1, 4))))
            length = min(length, SEQ_LEN)
            convs.append((rng.integers(0, 32000, length).tolist(), [1] * length))
    return [(np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=np.uint8)) for ids, mask in convs]


def packed(convs, max_seqs):
    """cu_seqlens (device) and the placed conversation lengths of one ROWS x SEQ_LEN batch from the C++ packer,
    over the first conversations in data order that fill 97% of the rows (as a streaming loader's batch: not the
    longest of the whole set, which best-fit decreasing over all of them would pick)."""
    total, take = 0, 0
    while take < len(convs) and total + len(convs[take][0]) <= 0.97 * ROWS * SEQ_LEN:
        total += len(convs[take][0])
        take += 1
    batch = pack_rows(convs[:take], SEQ_LEN, num_rows=ROWS, max_seqs=max_seqs)
    lengths = batch.placement[batch.placement[:, 0] >= 0, 2].tolist()
    return torch.from_numpy(batch.cu_seqlens).cuda(), lengths


def qkv(n, heads, kv_heads, seed=0, dtype=torch.bfloat16):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(n, h, HEAD_DIM, device="cuda", dtype=dtype, generator=g).requires_grad_()
            for h in (heads, kv_heads, kv_heads)]


def fa4_autograd(q, k, v, cu_seqlens, max_seqlen, window):
    """flash-attn-4's own public function (its autograd.Function): the same kernels as the op, for comparison."""
    from flash_attn.cute import flash_attn_varlen_func

    out = flash_attn_varlen_func(q, k, v, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens, max_seqlen_q=max_seqlen,
                                 max_seqlen_k=max_seqlen, causal=True,
                                 window_size=(window if window >= 0 else None, 0))
    return out[0] if isinstance(out, tuple) else out


# ----------------------------------------------------------------------------------------------------------------


def fwd_bwd(fn, q, k, v, grad):
    out = fn(q, k, v)
    return (out.float(), *torch.autograd.grad(out, (q, k, v), grad))


def rel_err(got, want):
    return ((got.float() - want).abs().max() / want.abs().max().clamp_min(1e-6)).item()


def check(backends) -> list[dict]:
    out = []
    lengths = [min(x, SEQ_LEN) for x in (1, 2047, 3, 129, 128, 777, 2048, 5, 1000, 1023, 255, 64, 17)]
    bounds = np.concatenate([[0], np.cumsum(lengths)]).tolist()
    n = bounds[-1] + 3  # an uncovered tail: must come back as zeros with zero gradients
    cu = torch.tensor(bounds + [bounds[-1]] * 4, dtype=torch.int32, device="cuda")
    for kv_heads in (HEADS, 2):
        for window in (-1, SHORT_WINDOW, 100):
            q, k, v = qkv(n, HEADS, kv_heads, seed=kv_heads + window)
            grad = torch.randn_like(q)
            ref_in = [t.detach().float().requires_grad_() for t in (q, k, v)]
            want = fwd_bwd(lambda a, b, c: varlen_attention(a, b, c, cu, SEQ_LEN, window, backend="sdpa_segments"),
                           *ref_in, grad.float())
            case = f"H{HEADS}/Hkv{kv_heads} window {window}, {len(lengths)} odd segs + tail"
            candidates = {b: (lambda a, b_, c, name=b: varlen_attention(a, b_, c, cu, SEQ_LEN, window, backend=name))
                          for b in backends if b != "sdpa_segments"}
            if "flash_attn_4" in backends:
                candidates["fa4_autograd"] = lambda a, b_, c: fa4_autograd(a, b_, c, cu, SEQ_LEN, window)
            for name, fn in candidates.items():
                try:
                    got = fwd_bwd(fn, q, k, v, grad)
                    errs = [rel_err(g, w) for g, w in zip(got, want)]
                    tail = max(t[-3:].abs().max().item() for t in got)  # out, dq, dk, dv past the segments
                    ok = max(errs) <= TOLERANCE and (tail == 0 or name == "fa4_autograd")
                    note = "rel err out {:.1e} dq {:.1e} dk {:.1e} dv {:.1e}; tail {:.0e}".format(*errs, tail)
                    out.append(row("check", name, case, note=note, ok=ok))
                except Exception as exc:  # one broken backend must not hide the others' numbers
                    out.append(row("check", name, case, note=f"ERROR {type(exc).__name__}: {str(exc)[:90]}", ok=False))
    if "flash_attn_4" in backends:  # the op against flash-attn-4's own autograd: same kernels
        q, k, v = qkv(n, HEADS, 2, seed=7)
        grad = torch.randn_like(q)
        case = f"H{HEADS}/Hkv2 causal, covered tokens"
        try:
            a = fwd_bwd(lambda x, y, z: varlen_attention(x, y, z, cu, SEQ_LEN, -1, backend="flash_attn_4"),
                        q, k, v, grad)
            b = fwd_bwd(lambda x, y, z: fa4_autograd(x, y, z, cu, SEQ_LEN, -1), q, k, v, grad)
            diffs = [(x[:bounds[-1]].float() - y[:bounds[-1]].float()).abs().max().item() for x, y in zip(a, b)]
            out.append(row("check", "fa4 op vs own", case, ok=max(diffs) <= 1e-2,
                           note="max diff out {:.1e} dq {:.1e} dk {:.1e} dv {:.1e}".format(*diffs)))
        except Exception as exc:
            out.append(row("check", "fa4 op vs own", case, note=f"ERROR {type(exc).__name__}: {str(exc)[:90]}",
                           ok=False))
    return out


def compile_check(backend, convs) -> list[dict]:
    """One graph, no recompiles, eager-equal logits: torch.compile(fullgraph=True) over differently packed batches."""
    from torch._dynamo.testing import CompileCounterWithBackend

    config = GPTConfig(sequence_len=SEQ_LEN, vocab_size=4096, n_layer=4, n_head=2, n_kv_head=2, n_embd=256)
    torch.manual_seed(0)
    model = GPT(config).cuda()
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(model.forward_packed, backend=counter, fullgraph=True)
    rows_n, worst, n_batches = 4, 0.0, 0
    rng = np.random.default_rng(1)
    try:
        attention.set_backend(backend)
        attention.select_backend("cuda")  # decided before tracing
        for i in range(5):
            pick = [convs[j] for j in rng.choice(len(convs), 40, replace=False)]
            batch = pack_rows(pick, SEQ_LEN, num_rows=rows_n, max_seqs=default_max_seqs(rows_n, SEQ_LEN))
            args = [torch.from_numpy(x).cuda() for x in (batch.input_ids, batch.position_ids, batch.cu_seqlens)]
            args[0] = args[0].long() % config.vocab_size
            args[1] = args[1].long()
            with torch.autocast("cuda", torch.bfloat16):
                logits = compiled(*args, SEQ_LEN)
                logits.float().square().mean().backward()
                with torch.no_grad():
                    attention.set_backend("sdpa_segments")
                    want = model.forward_packed(*args, SEQ_LEN)
                    attention.set_backend(backend)
            worst = max(worst, (logits.float() - want.float()).abs().max().item())
            n_batches += 1
        ok = counter.frame_count == 1 and worst < 5e-2
        note = f"frames compiled {counter.frame_count} over {n_batches} packings; max|logits - eager| {worst:.1e}"
    except Exception as exc:
        ok, note = False, f"ERROR {type(exc).__name__}: {str(exc)[:120]}"
    finally:
        attention.set_backend(None)
    return [row("compile", backend, "4 layers d256, 4x2048, fullgraph inductor", note=note, ok=ok)]


def time_backends(backends, convs) -> list[dict]:
    out = []
    sample = [len(ids) for ids, _ in convs[:1000]]
    budgets = {"default": default_max_seqs(ROWS, SEQ_LEN), "budget": segment_budget(sample, ROWS, SEQ_LEN)}
    n = ROWS * SEQ_LEN
    q, k, v = qkv(n, HEADS, HEADS, seed=1)
    grad = torch.randn_like(q)
    for window in (-1, SHORT_WINDOW):
        for budget_name, max_seqs in budgets.items():
            cu, lengths = packed(convs, max_seqs)
            useful = 14 * HEAD_DIM * HEADS * sum(attention_pairs(n_, window) for n_ in lengths)
            case = f"w{window} {budget_name} {max_seqs} segs, {len(lengths)} convs"
            runs = {b: (lambda b=b: varlen_attention(q, k, v, cu, SEQ_LEN, window, backend=b).backward(grad))
                    for b in backends}
            if "flash_attn_4" in backends:
                runs["fa4_autograd"] = lambda: fa4_autograd(q, k, v, cu, SEQ_LEN, window).backward(grad)
            for name, fn in runs.items():
                try:
                    ms = median_ms(fn)
                    out.append(row("time", name, case, ms, useful / ms / 1e9))
                except Exception as exc:
                    out.append(row("time", name, case, note=f"ERROR {type(exc).__name__}: {str(exc)[:90]}"))
        # nanochat: dense causal attention over whole rows (crossing conversations), sliding window by mask
        qd, kd, vd = (t.detach().view(ROWS, SEQ_LEN, HEADS, HEAD_DIM).transpose(1, 2).requires_grad_()
                      for t in (q, k, v))
        gd = grad.view(ROWS, SEQ_LEN, HEADS, HEAD_DIM).transpose(1, 2)
        mask = None if window < 0 else attention.causal_window_mask(SEQ_LEN, window, "cuda")

        def dense():
            torch.nn.functional.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask,
                                                             is_causal=mask is None).backward(gd)

        cu, lengths = packed(convs, budgets["budget"])
        useful = 14 * HEAD_DIM * HEADS * sum(attention_pairs(n_, window) for n_ in lengths)
        ms = median_ms(dense)
        out.append(row("time", "sdpa_rows_dense", f"w{window} whole rows", ms, useful / ms / 1e9,
                       "nanochat: across conversations"))
    return out


def print_table(rows):
    env = environment()
    print(f"\n{env['device']} | torch {env['torch']} | triton {env['triton']} | CUDA {env['cuda']} | {env['date']}")
    print(f"{'section':8} {'backend':16} {'case':46} {'ms':>7} {'TFLOP/s':>7} {'ok':>4}  note")
    for r in rows:
        ms = f"{r['ms']:.3f}" if r["ms"] is not None else "-"
        tf = f"{r['tflops']:.0f}" if r["tflops"] is not None else "-"
        ok = "-" if r["ok"] is None else ("PASS" if r["ok"] else "FAIL")
        print(f"{r['section']:8} {r['backend']:16} {r['case'][:46]:46} {ms:>7} {tf:>7} {ok:>4}  {r['note']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None, help="also write the rows (with device, versions, date) here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu_attention.py needs a CUDA device")
    backends = available_backends("cuda")
    print("attention backends here, best first:", ", ".join(backends))
    if "flash_attn_4" not in backends:
        print("flash_attn_4 is NOT available: is flash_attn.cute importable (PYTHONPATH)?")
    convs = synth_conversations(4000, seed=0)
    rows = check(backends)
    rows += compile_check(backends[0], convs)
    rows += time_backends(backends, convs)
    write_rows(args.json, rows)
    print_table(rows)


if __name__ == "__main__":
    main()
