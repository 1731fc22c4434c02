"""The device-side skip flag of the fused optimizers: `AdamW.step(skip=flag)` and `Muon.step(skip=flag)`.

A set flag (a 0-dim bool / integer tensor, nonzero) must leave every parameter and every state tensor bit for bit
as it was, decided on the device: the tests compare with torch.equal after a skipped step whose gradients are
non-finite (the case the flag exists for), check that a clear flag is the same step as no flag, and run the
Triton steps with every host read of a tensor (item, bool, int, float, tolist, ...) made to raise. The Triton
kernels run under the interpreter on a CPU-only machine (tests/conftest.py); the reference paths (CPU tensors
without the interpreter) have their own tests. Odd sizes (1, 37, 1000 elements; several blocks, a ragged last
one) and bf16 / fp32 parameters, as in tests/test_adamw.py and tests/test_muon.py.
"""

import contextlib
import functools

import pytest
import torch

from fastsft.kernels import AdamW, Muon, paths

# The skipped steps' gradients hold nan and inf: the interpreter's numpy warns about inf - inf in the work the
# flag discards (Muon's momentum into its workspace).
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ADAMW_SHAPES = [(1,), (37,), (1000,), (5, 19)]
MUON_SHAPES = [(13, 29), (13, 29), (37, 11), (1, 40), (24, 24)]  # a stack of two, tall, one row, square
SKIP_FLAGS = [
    pytest.param(lambda: torch.tensor(True), id="bool"),
    pytest.param(lambda: torch.tensor(1, dtype=torch.int32), id="int32"),
    pytest.param(lambda: torch.tensor(-7, dtype=torch.int64), id="int64"),
    pytest.param(lambda: torch.tensor(255, dtype=torch.uint8), id="uint8"),
]
CLEAR_FLAGS = [
    pytest.param(lambda: torch.tensor(False), id="bool"),
    pytest.param(lambda: torch.tensor(0, dtype=torch.int64), id="int64"),
]


@pytest.fixture(autouse=True)
def reset_paths():
    paths.reset()


def make_params(shapes, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(0.1 * torch.randn(s, generator=g)).to(DEVICE, dtype).requires_grad_() for s in shapes]


def set_grads(params, step, poison=False):
    """Random gradients; with `poison`, non-finite entries in some of them, as a step with a non-finite loss."""
    g = torch.Generator().manual_seed(100 + step)
    for i, p in enumerate(params):
        grad = torch.randn(p.shape, generator=g)
        if poison and i % 2 == 0:
            grad.view(-1)[0] = float("nan") if i % 4 == 0 else float("inf")
        p.grad = grad.to(DEVICE, p.dtype)


def snapshot(opt, params):
    """Clones of the parameters and of every tensor in their optimizer state."""
    return [(p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v)})
            for p in params]


def assert_unchanged(opt, params, before):
    for i, (p, (p0, state0)) in enumerate(zip(params, before)):
        assert torch.equal(p, p0), f"parameter {i} changed on a skipped step"
        for name, v0 in state0.items():
            assert torch.equal(opt.state[p][name], v0), f"state {name!r} of parameter {i} changed on a skipped step"


def assert_same(params_a, opt_a, params_b, opt_b):
    for i, (p, q) in enumerate(zip(params_a, params_b)):
        assert torch.equal(p, q), f"parameter {i}"
        for name, v in opt_a.state[p].items():
            w = opt_b.state[q][name]
            assert (torch.equal(v, w) if torch.is_tensor(v) else v == w), f"state {name!r} of parameter {i}"


@contextlib.contextmanager
def no_host_reads():
    """Every way of reading a tensor's value on the host raises (on CUDA each would be a sync)."""

    def refuse(name):
        def method(self, *args, **kwargs):
            raise AssertionError(f"host read: Tensor.{name} called during the step")
        return method

    with pytest.MonkeyPatch.context() as mp:
        for name in ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__"):
            mp.setattr(torch.Tensor, name, refuse(name))
        yield


def skip_then_step(opt, params, flag, name):
    """Two plain steps, then one with non-finite gradients and the set `flag` (nothing may move), then a plain
    step (every parameter moves again)."""
    for step in range(2):
        set_grads(params, step)
        opt.step()
    before = snapshot(opt, params)
    set_grads(params, 2, poison=True)
    opt.step(skip=flag)
    assert paths.ran(name) == paths.TRITON
    assert_unchanged(opt, params, before)
    set_grads(params, 3)
    opt.step(skip=torch.tensor(False, device=DEVICE))
    assert all(not torch.equal(p, p0) for p, (p0, _) in zip(params, before))


def assert_clear_flag_is_no_flag(new_params, make_opt, make_flag, name):
    """Three steps of twins, one without a flag and one with a clear flag, end the same (and not where they
    started)."""
    plain, flagged = new_params(), new_params()
    opt_plain, opt_flagged = make_opt(plain), make_opt(flagged)
    for step in range(3):
        set_grads(plain, step)
        set_grads(flagged, step)
        opt_plain.step()
        opt_flagged.step(skip=make_flag().to(DEVICE))
    assert paths.ran(name) == paths.TRITON
    assert not torch.equal(plain[0], new_params()[0])
    assert_same(plain, opt_plain, flagged, opt_flagged)


def adamw(params, **kwargs):
    return AdamW([dict(params=params[:2], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1),
                  dict(params=params[2:], lr=3e-2, betas=(0.8, 0.99), weight_decay=0.0)],
                 lr=1.0, eps=1e-8, block_size=64, **kwargs)


def muon(params):
    return Muon(params, lr=0.05, momentum=0.9, weight_decay=0.1, block=128)


# --------------------------------------------------------------------------------------------------------------
# AdamW


@pytest.mark.parametrize("make_flag", SKIP_FLAGS)
@pytest.mark.parametrize("dtype, moments_dtype", [(torch.float32, "fp32"), (torch.bfloat16, "fp32"),
                                                  (torch.bfloat16, "param")])
def test_adamw_set_flag_leaves_params_and_moments_bit_for_bit(dtype, moments_dtype, make_flag):
    params = make_params(ADAMW_SHAPES, dtype)
    opt = adamw(params, moments_dtype=moments_dtype)
    skip_then_step(opt, params, make_flag().to(DEVICE), "adamw")
    assert all(opt.state[p]["step"] == 4 for p in params)  # the skipped step counted (kernels/adamw.py)


def test_adamw_set_flag_on_the_first_step_leaves_zero_moments():
    params = make_params(ADAMW_SHAPES, torch.bfloat16)
    before = [p.detach().clone() for p in params]
    opt = adamw(params, moments_dtype="param")
    set_grads(params, 0, poison=True)
    opt.step(skip=torch.tensor(True, device=DEVICE))
    for p, p0 in zip(params, before):
        assert torch.equal(p, p0)
        assert not opt.state[p]["exp_avg"].any() and not opt.state[p]["exp_avg_sq"].any()


@pytest.mark.parametrize("make_flag", CLEAR_FLAGS)
@pytest.mark.parametrize("dtype, moments_dtype", [(torch.float32, "fp32"), (torch.bfloat16, "param")])
def test_adamw_clear_flag_is_the_step_without_flag(dtype, moments_dtype, make_flag):
    assert_clear_flag_is_no_flag(lambda: make_params(ADAMW_SHAPES, dtype),
                                 functools.partial(adamw, moments_dtype=moments_dtype), make_flag, "adamw")


# --------------------------------------------------------------------------------------------------------------
# Muon


@pytest.mark.parametrize("make_flag", SKIP_FLAGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_muon_set_flag_leaves_params_and_momentum_bit_for_bit(dtype, make_flag):
    params = make_params(MUON_SHAPES, dtype)
    skip_then_step(muon(params), params, make_flag().to(DEVICE), "muon")


def test_muon_set_flag_on_the_first_step_leaves_zero_momentum():
    params = make_params(MUON_SHAPES, torch.bfloat16)
    before = [p.detach().clone() for p in params]
    opt = muon(params)
    set_grads(params, 0, poison=True)
    opt.step(skip=torch.tensor(True, device=DEVICE))
    for p, p0 in zip(params, before):
        assert torch.equal(p, p0)
        assert not opt.state[p]["momentum_buffer"].any()


@pytest.mark.parametrize("make_flag", CLEAR_FLAGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_muon_clear_flag_is_the_step_without_flag(dtype, make_flag):
    assert_clear_flag_is_no_flag(lambda: make_params(MUON_SHAPES, dtype), muon, make_flag, "muon")


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_step_reads_nothing_on_the_host(name):
    shapes, make = (ADAMW_SHAPES, functools.partial(adamw, moments_dtype="param")) if name == "adamw" else \
        (MUON_SHAPES, muon)
    params = make_params(shapes, torch.bfloat16)
    opt = make(params)
    set_grads(params, 0)
    opt.step()
    before = snapshot(opt, params)
    set_grads(params, 1, poison=True)
    skip = torch.tensor(True, device=DEVICE)
    with no_host_reads():
        opt.step(skip=skip)
    assert paths.ran(name) == paths.TRITON
    assert_unchanged(opt, params, before)
    set_grads(params, 2)
    with no_host_reads():
        opt.step(skip=~skip)
    assert all(not torch.equal(p, p0) for p, (p0, _) in zip(params, before))


# --------------------------------------------------------------------------------------------------------------
# Both: the reference paths, and bad flags


@pytest.mark.skipif(DEVICE.type == "cuda", reason="CUDA tensors always take the Triton kernels")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_paths_skip_the_same_way(monkeypatch, dtype):
    # A CPU machine without TRITON_INTERPRET=1: torch.where on the flag, still no host read.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    for shapes, make in ((ADAMW_SHAPES, lambda ps: adamw(ps, moments_dtype="param")), (MUON_SHAPES, muon)):
        params, plain = make_params(shapes, dtype), make_params(shapes, dtype)
        opt, opt_plain = make(params), make(plain)
        for step in range(2):
            set_grads(params, step)
            set_grads(plain, step)
            opt.step(skip=torch.tensor(0))
            opt_plain.step()
        assert_same(params, opt, plain, opt_plain)
        before = snapshot(opt, params)
        set_grads(params, 2, poison=True)
        with no_host_reads():
            opt.step(skip=torch.tensor(True))
        assert_unchanged(opt, params, before)
    assert paths.ran("adamw") == paths.REFERENCE and paths.ran("muon") == paths.REFERENCE


@pytest.mark.parametrize("make_opt", [lambda ps: AdamW(ps, lr=1e-3), lambda ps: Muon(ps, lr=1e-3)],
                         ids=["adamw", "muon"])
def test_bad_flags_are_rejected_with_a_clear_error(make_opt):
    params = make_params([(3, 4)], torch.float32)
    set_grads(params, 0)
    opt = make_opt(params)
    with pytest.raises(TypeError, match="skip must be None or a 0-dim tensor"):
        opt.step(skip=True)
    with pytest.raises(ValueError, match=r"skip must be a 0-dim tensor, got shape \(1,\)"):
        opt.step(skip=torch.ones(1, dtype=torch.bool, device=DEVICE))
    with pytest.raises(TypeError, match="bool or integer tensor, got torch.float32"):
        opt.step(skip=torch.tensor(1.0, device=DEVICE))
    with pytest.raises(ValueError, match="skip is on meta"):
        opt.step(skip=torch.tensor(True, device="meta"))
    assert torch.equal(params[0], make_params([(3, 4)], torch.float32)[0])
