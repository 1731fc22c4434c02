"""GPU kernels against their references, as pytest-benchmark cases (skipped without a CUDA device).

Shapes come from GPTConfig.from_name (d12 / d20), never invented here. The loss and optimizer cases first check
that the kernel agrees with its reference on the same inputs, then time it, so a number is never recorded for a
wrong result; attention's agreement (odd lengths, windows, GQA) is bench/gpu_attention.py's check section.

    python -m pytest bench/bench_kernels.py --benchmark-only [--bench-rows rows.json]
"""

from __future__ import annotations

import pytest
import torch

from fastsft.model import GPTConfig
from shapes import STEP_ROWS, parameter_shapes

pytestmark = pytest.mark.gpu

# ------------------------------------------------------------------------------------------------------------------
# Linear cross-entropy: lm_head + CE over the supervised rows of a step (two thirds of the tokens supervised).


@pytest.mark.parametrize("impl", ["low_memory", "fast", "reference"])
@pytest.mark.parametrize("model", ["d12", "d20"])
def test_linear_cross_entropy(gpu_benchmark, benchmark, model, impl):
    from fastsft.kernels.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_reference

    config = GPTConfig.from_name(model)
    n, h, v = STEP_ROWS[model] * config.sequence_len, config.n_embd, config.padded_vocab_size
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(n, h, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    weight = (torch.randn(v, h, device="cuda", generator=g) / h**0.5).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, v, (n,), device="cuda", generator=g)
    targets[torch.rand(n, device="cuda", generator=g) > 0.66] = -1

    def loss():
        if impl == "reference":
            return linear_cross_entropy_reference(hidden, weight, targets)[0]
        return linear_cross_entropy(hidden, weight, targets, layout=impl)[0]

    def step():
        hidden.grad = weight.grad = None
        loss().backward()

    want = linear_cross_entropy_reference(hidden.detach(), weight.detach(), targets)[0]
    torch.testing.assert_close(loss().detach(), want, rtol=2e-3, atol=1e-2)
    benchmark.extra_info.update(N=n, H=h, V=v, supervised=int((targets >= 0).sum()))
    gpu_benchmark(step)


# ------------------------------------------------------------------------------------------------------------------
# Optimizers at d12 and d20: AdamW over the embeddings, lm_head and scalars, Muon over the block matrices.


def _params(shapes, seed, dtype=torch.float32):
    g = torch.Generator(device="cuda").manual_seed(seed)
    params = [torch.nn.Parameter(0.02 * torch.randn(s, device="cuda", generator=g).to(dtype)) for s in shapes]
    for p in params:
        p.grad = 1e-3 * torch.randn(p.shape, device="cuda", generator=g).to(dtype)
    return params


@pytest.mark.parametrize("impl", ["fastsft", "torch_fused"])
@pytest.mark.parametrize("model", ["d12", "d20"])
def test_adamw(gpu_benchmark, benchmark, model, impl):
    from fastsft.kernels.adamw import AdamW

    shapes = parameter_shapes(model, muon=False)
    hyper = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    mine, ref = _params(shapes, 0), _params(shapes, 0)
    opt_mine, opt_ref = AdamW(mine, **hyper), torch.optim.AdamW(ref, fused=True, **hyper)
    for _ in range(2):
        opt_mine.step(), opt_ref.step()
    for a, b in zip(mine, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    benchmark.extra_info.update(tensors=len(shapes), params=sum(p.numel() for p in mine))
    gpu_benchmark((opt_mine if impl == "fastsft" else opt_ref).step)


@pytest.mark.parametrize("impl", ["fastsft", "reference"])
@pytest.mark.parametrize("model", ["d12", "d20"])
def test_muon(gpu_benchmark, benchmark, model, impl):
    from fastsft.kernels.muon import Muon, muon_reference_step, ns_coefficients

    shapes = parameter_shapes(model, muon=True)
    hyper = dict(lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.0)
    coefficients = ns_coefficients("polar_express", 5)

    def reference_step(params):
        groups: dict[tuple, list] = {}
        for p in params:
            groups.setdefault(tuple(p.shape), []).append(p)
        buffers = {s: torch.zeros(len(ps), *s, device="cuda") for s, ps in groups.items()}

        def step():
            with torch.no_grad():
                for s, ps in groups.items():
                    muon_reference_step(ps, [p.grad for p in ps], buffers[s], coefficients=coefficients, **hyper)

        return step

    # One step from the same start both ways: the updates agree to the rounding of five bf16 iterations (measured
    # 8% of the largest update at small shapes on the CPU; a wrong update differs by about 100%).
    mine, ref, start = _params(shapes, 1), _params(shapes, 1), _params(shapes, 1)
    Muon(mine, **hyper).step()
    reference_step(ref)()
    worst = max(((a - b).abs().max() / (b - s).abs().max()).item() for a, b, s in zip(mine, ref, start))
    assert worst < 0.25, f"Muon and its reference disagree: {worst:.2e} of the largest update"
    params = _params(shapes, 1)
    step = Muon(params, **hyper).step if impl == "fastsft" else reference_step(params)
    benchmark.extra_info["max_update_diff_vs_reference"] = worst
    benchmark.extra_info.update(matrices=len(shapes), params=sum(p.numel() for p in params))
    gpu_benchmark(step)


# ------------------------------------------------------------------------------------------------------------------
# Attention forward+backward at d20's heads on 16x2048 packed rows of synthetic chats, at the data-sized budget.


def _attention_backends():
    if not torch.cuda.is_available():
        return ["sdpa_segments"]
    from fastsft.attention import available_backends

    return list(available_backends("cuda"))


@pytest.mark.parametrize("backend", _attention_backends())
def test_attention_d20(gpu_benchmark, benchmark, backend):
    import gpu_attention as ga

    from fastsft.attention import attention_pairs, varlen_attention
    from fastsft.packing import segment_budget

    config = GPTConfig.from_name("d20")
    convs = ga.synth_conversations(1000, seed=0)
    budget = segment_budget([len(ids) for ids, _ in convs], ga.ROWS, config.sequence_len)
    cu, lengths = ga.packed(convs, budget)
    q, k, v = ga.qkv(ga.ROWS * config.sequence_len, config.n_head, config.n_kv_head)
    grad = torch.randn_like(q)
    benchmark.extra_info.update(segments=budget, conversations=len(lengths),
                                useful_flop=14 * config.head_dim * config.n_head
                                * sum(attention_pairs(n, -1) for n in lengths))
    gpu_benchmark(lambda: varlen_attention(q, k, v, cu, config.sequence_len, backend=backend).backward(grad),
                  rounds=5 if backend == "sdpa_segments" else 20)
