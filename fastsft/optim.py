"""nanochat's split of a GPT's parameters between Muon and AdamW, with its learning rates, by parameter name.

The rules (names follow nanochat's GPT, so its checkpoints load by name):
- 2D parameters under `transformer.h.` (attention c_q/c_k/c_v/c_proj, mlp c_fc/c_proj, the value-embedding gates
  attn.ve_gate) -> Muon, lr = matrix_lr, momentum 0.95, 5 Polar Express steps, weight_decay (nanochat decays
  only the matrices).
- `transformer.wte.*` and `value_embeds.*` -> AdamW at embedding_lr * s; `lm_head.*` -> AdamW at
  unembedding_lr * s, where s = (n_embd / 768) ** -0.5: nanochat tuned these lrs at width 768 and scales them
  as 1/sqrt(width) (n_embd is read from the width of transformer.wte).
- scalars, vectors and gates outside the blocks (resid_lambdas, x0_lambdas, smear_*, backout_lambda, any
  *lambda*/*gate* name, any parameter of at most one dimension) -> AdamW at scalar_lr, except as in nanochat:
  resid_lambdas at scalar_lr * 0.01, x0_lambdas with beta1 = 0.96.
All AdamW groups use eps = 1e-10 and no weight decay (nanochat's choice). A parameter no rule claims (e.g. a 3D
tensor in a block, or an unknown matrix outside the blocks) is an error that names it. Frozen parameters
(requires_grad=False) are left out.

Every group carries `initial_lr` (its lr at construction) and `name` (which rule made it), for the scheduler.
`build_optimizers` returns an `Optimizers` pair: unpack it (`adamw, muon = build_optimizers(model)`) or use it
as one optimizer (step, zero_grad, state_dict, load_state_dict, param_groups across both); `step(skip=flag)`
skips both updates on the device when the 0-dim flag is nonzero (a non-finite loss) without reading it back.
"""

import torch
from torch import nn

from fastsft.kernels import AdamW, Muon

ADAM_EPS = 1e-10
REFERENCE_WIDTH = 768  # the width at which nanochat's AdamW learning rates were tuned
MUON_MOMENTUM = 0.95
MUON_NS_STEPS = 5


def _is_scalar_name(name: str) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return (
        "lambda" in leaf
        or "gate" in name
        or name.startswith("smear")
    )


def classify_parameter(name: str, p: torch.Tensor) -> str:
    """Which group a named parameter belongs to: 'matrix', 'embedding', 'unembedding', 'resid', 'x0', 'scalar'."""
    if name.startswith("transformer.h."):
        if p.ndim == 2:
            return "matrix"
        if p.ndim <= 1:
            return "scalar"
        raise ValueError(f"parameter {name!r} has shape {tuple(p.shape)}: a {p.ndim}D tensor inside a block, which "
                         "neither Muon (2D only) nor the scalar AdamW group takes")
    if name.startswith("transformer.wte.") or name.startswith("value_embeds."):
        return "embedding"
    if name.startswith("lm_head."):
        return "unembedding"
    if name == "resid_lambdas":
        return "resid"
    if name == "x0_lambdas":
        return "x0"
    if p.ndim <= 1 or _is_scalar_name(name):
        return "scalar"
    raise ValueError(f"parameter {name!r} (shape {tuple(p.shape)}) matches no optimizer rule: not under "
                     "transformer.h., not an embedding / lm_head, and not a scalar, vector or gate")


class Optimizers:
    """AdamW + Muon driven as one optimizer; also unpacks as `adamw, muon`."""

    def __init__(self, adamw: AdamW, muon: Muon):
        self.adamw = adamw
        self.muon = muon

    def __iter__(self):
        return iter((self.adamw, self.muon))

    @property
    def param_groups(self):
        return self.adamw.param_groups + self.muon.param_groups

    def step(self, *, skip=None):
        """Both updates. `skip`: None, or a 0-dim bool / integer device tensor (e.g. ~torch.isfinite(loss)); when
        nonzero both optimizers leave parameters and state as they were, decided on the device without a host
        read (AdamW's step counter still advances: kernels/adamw.py)."""
        self.adamw.step(skip=skip)
        self.muon.step(skip=skip)

    def zero_grad(self, set_to_none: bool = True):
        self.adamw.zero_grad(set_to_none=set_to_none)
        self.muon.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {"adamw": self.adamw.state_dict(), "muon": self.muon.state_dict()}

    def load_state_dict(self, state_dict):
        missing = {"adamw", "muon"} - set(state_dict)
        if missing:
            raise KeyError(f"optimizer state_dict lacks {sorted(missing)}; expected keys 'adamw' and 'muon'")
        self.adamw.load_state_dict(state_dict["adamw"])
        self.muon.load_state_dict(state_dict["muon"])


def build_optimizers(model: nn.Module, embedding_lr=0.2, unembedding_lr=0.004, matrix_lr=0.02, scalar_lr=0.5,
                     weight_decay=0.0, adam_betas=(0.8, 0.95), adam_moments_dtype="fp32") -> Optimizers:
    """Split `model`'s trainable parameters by name (module docstring) into AdamW and Muon groups.

    `adam_moments_dtype` is AdamW's `moments_dtype`: "fp32" (default) or "param" (bf16 moments for bf16
    parameters, e.g. the embedding tables on GPUs; kernels/adamw.py says what it saves and costs)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    by_kind = {}
    for name, p in named:
        by_kind.setdefault(classify_parameter(name, p), []).append(p)

    wte = dict(model.named_parameters()).get("transformer.wte.weight")
    if wte is None or wte.ndim != 2:
        raise ValueError("build_optimizers: model has no 2D transformer.wte.weight to read the width n_embd from")
    width_scale = (wte.shape[1] / REFERENCE_WIDTH) ** -0.5

    beta1, beta2 = adam_betas
    adam_specs = [  # (rule, lr, betas)
        ("unembedding", unembedding_lr * width_scale, (beta1, beta2)),
        ("embedding", embedding_lr * width_scale, (beta1, beta2)),
        ("resid", scalar_lr * 0.01, (beta1, beta2)),
        ("x0", scalar_lr, (0.96, beta2)),
        ("scalar", scalar_lr, (beta1, beta2)),
    ]
    adam_groups = [dict(params=by_kind[kind], name=kind, lr=lr, betas=betas, eps=ADAM_EPS, weight_decay=0.0)
                   for kind, lr, betas in adam_specs if kind in by_kind]
    if not adam_groups:
        raise ValueError("build_optimizers: no parameter for AdamW (expected at least transformer.wte)")
    if "matrix" not in by_kind:
        raise ValueError("build_optimizers: no 2D parameter under transformer.h. for Muon")
    muon_groups = [dict(params=by_kind["matrix"], name="matrix", lr=matrix_lr, momentum=MUON_MOMENTUM,
                        ns_steps=MUON_NS_STEPS, weight_decay=weight_decay)]

    adamw = AdamW(adam_groups, lr=embedding_lr, betas=adam_betas, eps=ADAM_EPS, weight_decay=0.0,
                  moments_dtype=adam_moments_dtype)
    muon = Muon(muon_groups, lr=matrix_lr, momentum=MUON_MOMENTUM, ns_steps=MUON_NS_STEPS, weight_decay=weight_decay)
    for opt in (adamw, muon):
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return Optimizers(adamw, muon)
