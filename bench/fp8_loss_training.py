"""Train with lm_head's loss path emulated in bf16 or in fp8: whether fp8 there trains as bf16 does.

Why: bench/fp8_loss_precision.py found the fp8 loss path's gradients 5.5-6.9% off on a small trained model, where
bf16's are 0.3-0.6% off (bench/RESULTS.md, run 16): per-step error says little about training, so this trains. It
runs `fastsft train` (any config and overrides) with the model's loss replaced, in training steps only, by cross-
entropy whose three matmuls take operands rounded as bench/fp8_loss_precision.py rounds them for `--format`
(float64 products); evaluation keeps the model's own loss, so the held-out numbers of the runs compare. Everything
else in the run is unchanged, so two runs of one seed differ only in the loss path's rounding.

    python bench/fp8_loss_training.py --format bf16 --out_dir=RUN_BF16    # the embedded default run, CPU
    python bench/fp8_loss_training.py --format fp8 --out_dir=RUN_FP8
then compare RUN_*/summary.json (eval_after: val_loss, answer_accuracy).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fp8_loss_precision as lp  # noqa: E402

from fastsft.model import GPT  # noqa: E402


class EmulatedLoss(torch.autograd.Function):
    """loss_sum over supervised rows of softcapped cross-entropy, its matmuls' operands rounded per `fmt`; dlogits
    is made in the forward (the backward only rounds and multiplies)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, softcap, fmt):
        keep = targets != -1
        h = hidden[keep].double()
        losses, d = lp.losses_and_dlogits(h, weight.double(), targets[keep], softcap, fmt)
        ctx.save_for_backward(keep, h, weight, lp.DLOGITS[fmt](d))
        ctx.fmt, ctx.dtypes = fmt, (hidden.dtype, weight.dtype)
        return losses.sum().to(hidden.dtype)

    @staticmethod
    def backward(ctx, grad):
        keep, h, weight, d = ctx.saved_tensors
        rounded = lp.BACKWARD[ctx.fmt]
        dh = torch.zeros(keep.shape[0], weight.shape[1], dtype=torch.float64)
        dh[keep] = d @ rounded(weight.double())
        dw = d.T @ rounded(h)
        return (grad * dh).to(ctx.dtypes[0]), (grad * dw).to(ctx.dtypes[1]), None, None, None


def emulate(fmt: str):
    """Put the emulated loss in GPT.supervised_loss for steps with gradients; returns the function it replaced."""
    original = GPT.supervised_loss

    @torch.compiler.disable  # as the model's own: outside the compiled graph
    def supervised_loss(self, hidden, targets, num_supervised=None):
        if not torch.is_grad_enabled():  # evaluation: the model's own loss, the same for every format
            return original(self, hidden, targets, num_supervised)
        weight = self.lm_head.weight[: self.config.vocab_size]
        return EmulatedLoss.apply(hidden, weight, targets, self.config.softcap, fmt), (targets != -1).sum()

    GPT.supervised_loss = supervised_loss
    return original


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--format", required=True, choices=("bf16", "fp8"))
    args, rest = ap.parse_known_args(argv)
    from fastsft import train

    original = emulate(args.format)
    try:
        return train.main(rest)
    finally:
        GPT.supervised_loss = original


if __name__ == "__main__":
    sys.exit(main())
