"""lm_head and its loss in fp8, emulated: the loss's and its gradients' error against float64, beside bf16's.

Why: the d12 step's loss path (lm_head's three bf16 matmuls, 8.3 ms a step, and the row kernel, 4.3 ms;
bench/RESULTS.md, run 16) is the largest block of the step still in bf16. Before a kernel: whether fp8 keeps the
loss and its gradients as close to exact as bf16 does. The scales proposed need no pass for a maximum over a
large tensor:
- forward: h (N, C) per row and lm_head W (V, C) per vocabulary row, e4m3; each logit is rescaled by its row's and
  its column's scale (in the row kernel, where the softcap is applied);
- backward: dlogits = (softmax - onehot) * softcap' lies in [-1, 1], so e5m2 takes one static scale (2^15: values
  down to ~5e-10 keep a digit); W and h take one e4m3 scale each (both small: at most 65536 x 768).
Each operand is rounded to its format and the products run in float64: what the tensor cores compute, up to
their accumulation's rounding (bench/gpu_fp8_scaling.py measures that part on the GPU). bf16 is emulated the same
way (operands and dlogits rounded to bf16), as the fused loss computes today. Then fp8 one piece at a time (the
rest in float64), to say which piece costs most.

    python bench/fp8_loss_precision.py --checkpoint RUN/checkpoint [--rows 16]  # a trained fastsft checkpoint
    python bench/fp8_loss_precision.py --random                                 # random h and W (that it runs)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from timing import write_rows  # noqa: E402

from fastsft import fp8  # noqa: E402

DLOGITS_SCALE = 2.0 ** 15  # a power of two under e5m2's largest value (57344): |dlogits| <= 1 maps exactly


def _round(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype).double()


def _rowwise(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t with each row on dtype's grid at its own scale (the row's maximum -> dtype's largest value), in float64."""
    fmax = torch.finfo(dtype).max
    scale = fmax / t.abs().amax(dim=1, keepdim=True).clamp(min=1e-30)
    return _round((t * scale).clamp(-fmax, fmax), dtype) / scale


def _tensorwise_e4m3(t: torch.Tensor) -> torch.Tensor:
    scale = fp8.scale_for(t, fp8.E4M3).double()
    return fp8.cast(t, scale, fp8.E4M3).double() / scale


def _static_e5m2(t: torch.Tensor) -> torch.Tensor:
    fmax = torch.finfo(fp8.E5M2).max
    return _round((t * DLOGITS_SCALE).clamp(-fmax, fmax), fp8.E5M2) / DLOGITS_SCALE


# How each operand group is rounded, by name: the forward's h and W, the backward's h and W, dlogits.
FORWARD = {"fp64": lambda t: t, "bf16": lambda t: _round(t, torch.bfloat16), "fp8": lambda t: _rowwise(t, fp8.E4M3)}
BACKWARD = {"fp64": lambda t: t, "bf16": lambda t: _round(t, torch.bfloat16), "fp8": _tensorwise_e4m3}
DLOGITS = {"fp64": lambda t: t, "bf16": lambda t: _round(t, torch.bfloat16), "fp8": _static_e5m2,
           "e4m3-row": lambda t: _rowwise(t, fp8.E4M3)}  # per token: not a scale dW's matmul can take
# (label, forward, backward, dlogits): the formats whole, then fp8 one piece at a time (the rest float64)
CASES = (("bf16", "bf16", "bf16", "bf16"), ("fp8", "fp8", "fp8", "fp8"),
         ("fp8 forward only", "fp8", "fp64", "fp64"), ("fp8 backward h, W only", "fp64", "fp8", "fp64"),
         ("fp8 dlogits only (e5m2)", "fp64", "fp64", "fp8"),
         ("e4m3 dlogits per row only", "fp64", "fp64", "e4m3-row"))


def loss_and_grads(h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, softcap: float | None,
                   forward: str = "fp64", backward: str = "fp64", dlogits: str = "fp64"):
    """(mean loss, dh, dW) of cross-entropy over softcapped logits h @ w.T against targets (all supervised), with
    the forward's operands, the backward's h and W and dlogits rounded as named (FORWARD, BACKWARD, DLOGITS),
    float64 products."""
    h, w = h.double(), w.double()
    losses, d = losses_and_dlogits(h, w, targets, softcap, forward)
    d = DLOGITS[dlogits](d) / len(targets)
    return losses.mean().item(), d @ BACKWARD[backward](w), d.T @ BACKWARD[backward](h)


def losses_and_dlogits(h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, softcap: float | None,
                       forward: str = "fp64"):
    """Each row's cross-entropy over softcapped logits h @ w.T (operands rounded per FORWARD[forward], float64
    products) and dlogits = (softmax - onehot) * softcap', unrounded: d(sum of the losses) / d(h @ w.T)."""
    z = FORWARD[forward](h) @ FORWARD[forward](w).T
    logits = softcap * torch.tanh(z / softcap) if softcap else z
    logp = torch.log_softmax(logits, dim=1)
    rows = torch.arange(len(targets))
    d = logp.exp()
    d[rows, targets] -= 1
    if softcap:
        d *= 1 - torch.tanh(z / softcap) ** 2
    return -logp[rows, targets], d


def relative(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a - ref).norm() / ref.norm().clamp(min=1e-300))


def compare(h, w, targets, softcap, label: str) -> list[dict]:
    """One row per case (CASES): the loss's relative error and dh's and dW's (Frobenius) against float64."""
    loss64, dh64, dw64 = loss_and_grads(h, w, targets, softcap)
    rows = []
    for case, *formats in CASES:
        loss, dh, dw = loss_and_grads(h, w, targets, softcap, *formats)
        rows.append(dict(bench="fp8_loss_precision", inputs=label, format=case, rows=len(targets), vocab=w.shape[0],
                         width=w.shape[1], loss_fp64=loss64, loss_error=abs(loss - loss64) / abs(loss64),
                         dh_error=relative(dh, dh64), dw_error=relative(dw, dw64)))
    return rows


def checkpoint_inputs(path: str, rows: int):
    """(h, w, targets, softcap): the final hidden states of a checkpoint's model at the supervised positions of
    `rows` packed rows of the built-in synthetic tasks' held-out problems, its lm_head and its softcap."""
    from fastsft import checkpoint
    from fastsft.data.synthetic import Arithmetic, LetterCount, Spell
    from fastsft.packing import pack_rows, render_batch_flat

    model, extras = checkpoint.load(path)
    if extras["tokenizer"] is None:
        raise SystemExit(f"{path}: the checkpoint holds no tokenizer to render conversations with")
    cfg = model.config
    tasks = [Arithmetic(size=200, split="test"), LetterCount(size=200, split="test"), Spell(size=200, split="test")]
    conversations = [task.get_example(i) for i in range(200) for task in tasks]
    rendered = render_batch_flat(extras["tokenizer"], conversations, max_tokens=cfg.sequence_len)
    batch = pack_rows(rendered, cfg.sequence_len, num_rows=rows)
    captured = {}

    def keep_hidden(hidden, targets, num_supervised=None):  # in place of the fused loss: what it would be given
        captured["hidden"], captured["targets"] = hidden, targets
        return hidden.new_zeros(()), 0

    model.supervised_loss = keep_hidden
    with torch.no_grad():
        model.forward_packed(*(torch.as_tensor(a) for a in (batch.input_ids, batch.position_ids)),
                             torch.as_tensor(batch.cu_seqlens), targets=torch.as_tensor(batch.targets), covered=True)
    keep = captured["targets"] != -1
    w = model.lm_head.weight[: cfg.vocab_size].detach()
    return captured["hidden"][keep], w, captured["targets"][keep], cfg.softcap


def random_inputs(rows: int, vocab: int, width: int, seed: int = 0):
    """Normalized rows (as the final norm gives) and a small random lm_head (std 0.02): untrained logits."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, width, generator=gen)
    h = h / h.pow(2).mean(dim=1, keepdim=True).sqrt()
    w = torch.randn(vocab, width, generator=gen) * 0.02
    return h, w, torch.randint(0, vocab, (rows,), generator=gen), 15.0


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a fastsft checkpoint directory (fastsft train writes RUN/checkpoint)")
    src.add_argument("--random", action="store_true", help="random h and lm_head of the shapes below")
    ap.add_argument("--rows", type=int, default=16, help="packed rows (--checkpoint) or hidden rows (--random)")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if args.checkpoint:
        label, inputs = f"checkpoint {Path(args.checkpoint).name}", checkpoint_inputs(args.checkpoint, args.rows)
    else:
        label, inputs = "random", random_inputs(args.rows, args.vocab, args.width)
    rows = write_rows(args.json, compare(*inputs, label))
    r = rows[0]
    print(f"{label}: {r['rows']} supervised rows, vocab {r['vocab']}, width {r['width']}, loss {r['loss_fp64']:.5f} "
          "(float64); relative error against float64:")
    print(f"{'format':26} {'loss':>10} {'dh':>10} {'dW':>10}")
    for r in rows:
        print(f"{r['format']:26} {r['loss_error']:10.2e} {r['dh_error']:10.2e} {r['dw_error']:10.2e}")
    return rows


if __name__ == "__main__":
    main()
