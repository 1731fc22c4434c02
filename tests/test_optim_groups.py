"""fastsft.optim.build_optimizers: nanochat's split of parameters by name between AdamW and Muon.

Uses a small stand-in module with nanochat's parameter names (the real model is not imported here).
"""

import copy

import pytest
import torch
from torch import nn

from fastsft.kernels import AdamW, Muon
from fastsft.optim import Optimizers, build_optimizers

N_EMBD, N_LAYER, VOCAB, N_HEAD, VE_CHANNELS = 48, 2, 61, 3, 8


class Attention(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.c_q = nn.Linear(N_EMBD, N_EMBD, bias=False)
        self.c_k = nn.Linear(N_EMBD, N_EMBD, bias=False)
        self.c_v = nn.Linear(N_EMBD, N_EMBD, bias=False)
        self.c_proj = nn.Linear(N_EMBD, N_EMBD, bias=False)
        if layer % 2 == 1:  # value-embedding gate on alternate layers, as nanochat
            self.ve_gate = nn.Linear(VE_CHANNELS, N_HEAD, bias=False)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.c_fc = nn.Linear(N_EMBD, 4 * N_EMBD, bias=False)
        self.c_proj = nn.Linear(4 * N_EMBD, N_EMBD, bias=False)


class Block(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.attn = Attention(layer)
        self.mlp = MLP()


class FakeGPT(nn.Module):
    """nanochat's parameter names and kinds, no forward."""

    def __init__(self):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(wte=nn.Embedding(VOCAB, N_EMBD),
                                              h=nn.ModuleList(Block(i) for i in range(N_LAYER))))
        self.lm_head = nn.Linear(N_EMBD, VOCAB, bias=False)
        self.value_embeds = nn.ModuleDict({"1": nn.Embedding(VOCAB, N_EMBD)})
        self.resid_lambdas = nn.Parameter(torch.ones(N_LAYER))
        self.x0_lambdas = nn.Parameter(torch.zeros(N_LAYER))
        self.smear_gate = nn.Linear(VE_CHANNELS, 1, bias=False)
        self.smear_lambda = nn.Parameter(torch.zeros(1))
        self.backout_lambda = nn.Parameter(torch.zeros(1))


def group_of(opts, p):
    found = [g for g in opts.param_groups if any(q is p for q in g["params"])]
    assert len(found) == 1, f"parameter in {len(found)} groups"
    return found[0]


def test_every_parameter_lands_in_exactly_one_group():
    model = FakeGPT()
    opts = build_optimizers(model)
    adamw, muon = opts  # unpacks as a pair
    assert isinstance(adamw, AdamW) and isinstance(muon, Muon) and isinstance(opts, Optimizers)
    grouped = [p for g in opts.param_groups for p in g["params"]]
    assert len(grouped) == len({id(p) for p in grouped}) == len(list(model.parameters()))
    muon_params = {id(p) for g in muon.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        group_of(opts, p)
        expected_muon = name.startswith("transformer.h.") and p.ndim == 2
        assert (id(p) in muon_params) == expected_muon, name


@pytest.mark.parametrize("kwargs", [{}, dict(embedding_lr=0.3, unembedding_lr=0.01, matrix_lr=0.04, scalar_lr=0.2,
                                             weight_decay=0.05, adam_betas=(0.7, 0.9))])
def test_learning_rates_follow_nanochat(kwargs):
    model = FakeGPT()
    opts = build_optimizers(model, **kwargs)
    h = dict(embedding_lr=0.2, unembedding_lr=0.004, matrix_lr=0.02, scalar_lr=0.5, weight_decay=0.0,
             adam_betas=(0.8, 0.95)) | kwargs
    width_scale = (N_EMBD / 768) ** -0.5  # nanochat's AdamW lrs were tuned at width 768
    beta1, beta2 = h["adam_betas"]
    params = dict(model.named_parameters())
    expected = {  # name -> (lr, betas); None betas = Muon
        "transformer.wte.weight": (h["embedding_lr"] * width_scale, (beta1, beta2)),
        "value_embeds.1.weight": (h["embedding_lr"] * width_scale, (beta1, beta2)),
        "lm_head.weight": (h["unembedding_lr"] * width_scale, (beta1, beta2)),
        "resid_lambdas": (h["scalar_lr"] * 0.01, (beta1, beta2)),
        "x0_lambdas": (h["scalar_lr"], (0.96, beta2)),
        "smear_gate.weight": (h["scalar_lr"], (beta1, beta2)),
        "smear_lambda": (h["scalar_lr"], (beta1, beta2)),
        "backout_lambda": (h["scalar_lr"], (beta1, beta2)),
        "transformer.h.0.attn.c_q.weight": (h["matrix_lr"], None),
        "transformer.h.1.attn.ve_gate.weight": (h["matrix_lr"], None),
        "transformer.h.1.mlp.c_proj.weight": (h["matrix_lr"], None),
    }
    for name, (lr, betas) in expected.items():
        group = group_of(opts, params[name])
        assert group["lr"] == pytest.approx(lr), name
        assert group["initial_lr"] == group["lr"]
        if betas is None:
            assert group["momentum"] == 0.95 and group["ns_steps"] == 5
            assert group["weight_decay"] == h["weight_decay"]
        else:
            assert tuple(group["betas"]) == betas and group["eps"] == 1e-10 and group["weight_decay"] == 0.0


def test_unclaimed_parameters_are_named_in_the_error():
    model = FakeGPT()
    model.adapter = nn.Linear(N_EMBD, N_EMBD, bias=False)  # a matrix outside the blocks that no rule knows
    with pytest.raises(ValueError, match=r"'adapter.weight' \(shape \(48, 48\)\) matches no optimizer rule"):
        build_optimizers(model)
    model = FakeGPT()
    model.transformer.h[0].mlp.conv = nn.Parameter(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match=r"'transformer.h.0.mlp.conv' has shape \(2, 3, 4\)"):
        build_optimizers(model)


def test_frozen_parameters_are_left_out():
    model = FakeGPT()
    model.lm_head.weight.requires_grad_(False)
    opts = build_optimizers(model)
    assert all(p is not model.lm_head.weight for g in opts.param_groups for p in g["params"])


def test_combined_step_and_state_dict():
    torch.manual_seed(0)
    model = FakeGPT()
    opts = build_optimizers(model, weight_decay=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opts.step()
    for n, p in model.named_parameters():
        assert not torch.equal(p, before[n]), n
    state = copy.deepcopy(opts.state_dict())
    assert set(state) == {"adamw", "muon"}
    fresh = build_optimizers(model, weight_decay=0.1)
    fresh.load_state_dict(state)
    assert fresh.adamw.state[model.lm_head.weight]["step"] == 1
    assert torch.equal(fresh.muon.state[model.transformer.h[0].attn.c_q.weight]["momentum_buffer"],
                       opts.muon.state[model.transformer.h[0].attn.c_q.weight]["momentum_buffer"])
    opts.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(KeyError, match="lacks"):
        fresh.load_state_dict({"adamw": state["adamw"]})


def test_combined_step_passes_the_skip_flag_to_both():
    """Optimizers.step(skip=flag): a set flag leaves every parameter and every state tensor of both optimizers bit
    for bit (tests/test_optim_skip.py covers each optimizer); a clear one is the plain step."""
    torch.manual_seed(0)
    model, twin = FakeGPT(), FakeGPT()
    twin.load_state_dict(model.state_dict())
    opts, opts_twin = build_optimizers(model, weight_decay=0.1), build_optimizers(twin, weight_decay=0.1)

    def grads(step):
        for m in (model, twin):
            g = torch.Generator().manual_seed(step)
            for p in m.parameters():
                p.grad = torch.randn(p.shape, generator=g)

    grads(0)
    opts.step(skip=torch.tensor(False))
    opts_twin.step()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    state_before = copy.deepcopy(opts.state_dict())
    grads(1)
    for p in model.parameters():
        p.grad[..., 0] = float("nan")
    opts.step(skip=torch.tensor(True))
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    for part in ("adamw", "muon"):
        for pid, state in opts.state_dict()[part]["state"].items():
            for name, value in state.items():
                if torch.is_tensor(value) and name != "step":
                    assert torch.equal(value, state_before[part]["state"][pid][name]), (part, pid, name)
    for n, p in twin.named_parameters():
        assert torch.equal(dict(model.named_parameters())[n], p), n


def test_adam_moments_dtype_reaches_adamw():
    assert build_optimizers(FakeGPT()).adamw.moments_dtype == "fp32"
    assert build_optimizers(FakeGPT(), adam_moments_dtype="param").adamw.moments_dtype == "param"
    with pytest.raises(ValueError, match="moments_dtype must be one of"):
        build_optimizers(FakeGPT(), adam_moments_dtype="bfloat16")
