"""fastsft.kernels.AdamW against torch.optim.AdamW (fp32) and the fp32-math reference (bf16 parameters).

On a CPU-only machine the Triton kernel runs under the interpreter (tests/conftest.py); with CUDA the same tests
run the compiled kernel on the GPU. A small block size makes the odd-sized tensors span several tiles with a
ragged last one. Every comparison asserts that the Triton step ran (fastsft.kernels.paths); the fallback for CPU
tensors without the interpreter has a test of its own.
"""

import copy

import pytest
import torch

from fastsft.kernels import AdamW, paths
from fastsft.kernels.adamw import adamw_reference_step

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SHAPES = [(37,), (5, 19), (3, 7, 11), (130,)]
BLOCK = 64  # tensors of 37..231 elements -> 1..4 tiles each, last one partial


@pytest.fixture(autouse=True)
def reset_paths():
    paths.reset()


def assert_kernel_ran():
    assert paths.ran("adamw") == paths.TRITON, f"AdamW took the {paths.ran('adamw')} path, not the Triton kernel"


def make_params(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(DEVICE, dtype).requires_grad_() for s in SHAPES]


def grads_for(step, dtype):
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(s, generator=g).to(DEVICE, dtype) for s in SHAPES]


def groups(params):
    # Different lr, betas, eps and weight decay per group; weight_decay given everywhere (torch's default is 0.01).
    return [
        dict(params=params[:2], lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0),
        dict(params=params[2:3], lr=3e-2, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1),
        dict(params=params[3:], lr=5e-3, betas=(0.5, 0.9), eps=1e-6, weight_decay=0.3),
    ]


def run(opt, params, steps, dtype, first_step=0):
    for step in range(first_step, first_step + steps):
        if step == 3:  # a scheduler changes lr between steps
            for group in opt.param_groups:
                group["lr"] *= 0.5
        for p, g in zip(params, grads_for(step, dtype)):
            p.grad = g
        opt.step()


def test_fp32_matches_torch_adamw():
    ours, ref = make_params(torch.float32), make_params(torch.float32)
    opt = AdamW(groups(ours), lr=1.0, block_size=BLOCK)
    opt_ref = torch.optim.AdamW(groups(ref), lr=1.0, foreach=False)
    run(opt, ours, 6, torch.float32)
    assert_kernel_ran()
    run(opt_ref, ref, 6, torch.float32)
    for p, q, init in zip(ours, ref, make_params(torch.float32)):
        assert not torch.equal(p, init)
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        for name in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt.state[p][name], opt_ref.state[q][name], rtol=1e-5, atol=1e-7)
        assert opt.state[p]["step"] == int(opt_ref.state[q]["step"]) == 6


def test_bf16_params_keep_fp32_moments_and_round_once():
    ours = make_params(torch.bfloat16)
    ref = [p.detach().clone() for p in ours]
    ref_m = [torch.zeros(s, device=DEVICE) for s in SHAPES]
    ref_v = [torch.zeros(s, device=DEVICE) for s in SHAPES]
    opt = AdamW(groups(ours), lr=1.0, block_size=BLOCK)
    for step in range(5):
        grads = grads_for(step, torch.bfloat16)
        for p, g in zip(ours, grads):
            p.grad = g
        opt.step()
        assert_kernel_ran()
        for gi, group in enumerate(groups(list(range(len(SHAPES))))):
            idx = group["params"]
            adamw_reference_step([ref[i] for i in idx], [grads[i] for i in idx], [ref_m[i] for i in idx],
                                 [ref_v[i] for i in idx], step + 1, group["lr"], *group["betas"], group["eps"],
                                 group["weight_decay"])
    for i, p in enumerate(ours):
        assert p.dtype == torch.bfloat16 and opt.state[p]["exp_avg"].dtype == torch.float32
        torch.testing.assert_close(opt.state[p]["exp_avg"], ref_m[i], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"], ref_v[i], rtol=1e-5, atol=1e-7)
        # Same fp32 value rounded once: equal, or one bf16 step apart where the fp32 results straddle a tie.
        diff = (p.float() - ref[i].float()).abs()
        ulp = ref[i].float().abs() * 2.0**-7
        assert bool((diff <= ulp + 1e-30).all()), f"tensor {i}: max diff {diff.max().item()}"
        assert (diff > 0).float().mean().item() < 0.05


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trip_continues_identically(dtype):
    straight = make_params(dtype)
    opt = AdamW(groups(straight), lr=1.0, block_size=BLOCK)
    run(opt, straight, 5, dtype)

    first = make_params(dtype)
    opt_a = AdamW(groups(first), lr=1.0, block_size=BLOCK)
    run(opt_a, first, 2, dtype)
    saved = copy.deepcopy(opt_a.state_dict())
    resumed = [p.detach().clone().requires_grad_() for p in first]
    opt_b = AdamW(groups(resumed), lr=1.0, block_size=BLOCK)
    opt_b.load_state_dict(saved)
    for group_b, group_a in zip(opt_b.param_groups, opt_a.param_groups):
        assert group_b["lr"] == group_a["lr"] and group_b["betas"] == group_a["betas"]
    run(opt_b, resumed, 3, dtype, first_step=2)
    assert_kernel_ran()

    for p, q in zip(resumed, straight):
        assert torch.equal(p, q)
        assert opt_b.state[p]["exp_avg"].dtype == torch.float32
        assert torch.equal(opt_b.state[p]["exp_avg_sq"], opt.state[q]["exp_avg_sq"])
        assert opt_b.state[p]["step"] == 5


def test_parameter_without_grad_is_left_alone():
    params = make_params(torch.float32)
    before = params[1].detach().clone()
    opt = AdamW(params, lr=0.1, block_size=BLOCK)
    for p, g in zip(params, grads_for(0, torch.float32)):
        p.grad = g
    params[1].grad = None
    opt.step()
    assert_kernel_ran()
    assert torch.equal(params[1], before)
    assert params[1] not in opt.state
    assert not torch.equal(params[0], make_params(torch.float32)[0])


def test_bad_input_is_rejected_with_a_clear_error():
    with pytest.raises(ValueError, match="lr must be >= 0"):
        AdamW([torch.zeros(3, requires_grad=True)], lr=-1.0)
    with pytest.raises(ValueError, match="betas"):
        AdamW([torch.zeros(3, requires_grad=True)], lr=1e-3, betas=(0.9, 1.0))
    base = torch.randn(4, 6, device=DEVICE)
    p = torch.nn.Parameter(base.t())  # a transposed view: not contiguous
    p.grad = torch.randn_like(p)
    with pytest.raises(ValueError, match="parameter 0 of group 0 .* not contiguous"):
        AdamW([p], lr=1e-3).step()
    q = torch.nn.Parameter(torch.randn(5, device=DEVICE, dtype=torch.float64))
    q.grad = torch.randn_like(q)
    with pytest.raises(TypeError, match="unsupported dtype"):
        AdamW([q], lr=1e-3).step()


@pytest.mark.skipif(DEVICE.type == "cuda", reason="CUDA tensors always take the Triton kernel")
def test_cpu_without_interpreter_falls_back_to_the_reference_and_says_so(monkeypatch):
    # A CPU machine without TRITON_INTERPRET=1 (the switch is read at each step): torch's AdamW math, recorded as the
    # reference path, and equal to torch.optim.AdamW.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ours, ref = make_params(torch.float32), make_params(torch.float32)
    opt = AdamW(groups(ours), lr=1.0, block_size=BLOCK)
    run(opt, ours, 4, torch.float32)
    assert paths.ran("adamw") == paths.REFERENCE
    run(torch.optim.AdamW(groups(ref), lr=1.0, foreach=False), ref, 4, torch.float32)
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
