"""Model-derived shapes for the benchmarks: everything comes from GPTConfig.from_name, nothing is restated here.

STEP_ROWS: the step shapes of issue 10 (rows of 2048 per micro-batch): d12 at 32x2048, d20 at 16x2048.
"""

from __future__ import annotations

import torch

from fastsft.model import GPT, GPTConfig

STEP_ROWS = {"d12": 32, "d20": 16}


def parameter_shapes(name: str, muon: bool) -> list[tuple[int, ...]]:
    """Shapes of the named model's parameters that the step gives to Muon (muon=True) or to AdamW, by the driver's
    own rule (fastsft.optim.classify_parameter); the model is built on the meta device (no memory, no init)."""
    from fastsft.optim import classify_parameter

    with torch.device("meta"):
        model = GPT(GPTConfig.from_name(name))
    return [tuple(p.shape) for n, p in model.named_parameters() if (classify_parameter(n, p) == "matrix") == muon]
