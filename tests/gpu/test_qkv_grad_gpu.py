"""kernels/qkv_grad.py compiled for the GPU, in bf16 and fp32: the kernel (autotuned through the custom op, and each
config) against its torch definition at d20's shape (32768 rows, 10 + 10 + 10 heads of 128) and odd ones, with the
maximum it folds into slots; the cast of dqkv from those slots (kernels/fp8_relu_square_grad.py, DH off) against
fastsft.fp8.quantize bit for bit at d12's and d20's dqkv, every config; the fp8 q/k/v projection's forward, eager and
compiled, with the bits q and k had before it (fp8.linear, then scaled_norm after apply_rotary), and its gradients
the previous path's (fp8.linear and the unit, inductor quantizing dqkv) to the bit, eager and compiled. Run on a GPU
machine: `python -m pytest -q -m gpu tests`."""

import pytest
import torch

from fastsft import fp8
from fastsft.kernels import fp8_relu_square_grad as rg
from fastsft.kernels import qkv_grad as qg
from fastsft.model import GPTConfig
from tests.test_qkv_grad import (SCALE, _gradients, _operands, before_unit, previous_projection, projection,
                                 projection_inputs)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

_D20, _D12 = GPTConfig.from_name("d20"), GPTConfig.from_name("d12")
SHAPES = [(16 * 2048, _D20.n_head, _D20.n_kv_head, _D20.head_dim), (1000, 4, 2, 64), (777, 6, 3, 128), (5, 3, 1, 64)]
# dqkv at d12 (32 x 2048 rows, 6 + 6 + 6 heads of 128) and d20, and one of partial tiles both ways
DQKV_SHAPES = [(32 * 2048, (_D12.n_head + 2 * _D12.n_kv_head) * _D12.head_dim),
               (16 * 2048, (_D20.n_head + 2 * _D20.n_kv_head) * _D20.head_dim), (1000, 1304)]


def _assert_close(got, want, dtype):
    """As the CPU test: one rounding each from fp32 values that differ in their last bits."""
    rtol = 2.0**-7 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=1e-6 * want.float().abs().max())


def _bits(t):
    return t.reshape(-1).view(torch.uint8)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_equals_the_reference(shape, dtype):
    """With the maxima too: dqkv's bits unchanged, and the slots' maximum max |dqkv|."""
    ops = _operands(*shape, dtype, device="cuda")
    want = qg.qkv_grad_reference(*ops, SCALE)
    launches = [None] + [qg.QKVGradLaunch(c.kwargs["BLOCK_M"], c.num_warps) for c in qg.CONFIGS]
    for launch in launches:  # None: the custom op, autotuned, as the step calls it
        got = qg.qkv_grad(*ops, SCALE, launch=launch)
        assert torch.equal(got[:, (shape[1] + shape[2]) * shape[3]:], ops[2].reshape(shape[0], -1))
        _assert_close(got, want, dtype)
        with_maxima, slots = qg.qkv_grad(*ops, SCALE, maxima=True, launch=launch)
        assert torch.equal(with_maxima, got) and torch.equal(rg.slots_maximum(slots), got.abs().amax().float())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_kernel_folds_a_non_finite_maximum(bad):
    """A NaN or inf in dv's last row (the last, partial row block): the slots' maximum is NaN (NAN_BITS wins over
    the inf placed elsewhere) or inf; every config, the atomics as compiled."""
    ops = _operands(777, 6, 3, 128, torch.bfloat16, device="cuda")
    ops[2][776, 2, 127] = bad
    ops[2][3, 0, 0] = float("inf")
    for launch in [None] + [qg.QKVGradLaunch(c.kwargs["BLOCK_M"], c.num_warps) for c in qg.CONFIGS]:
        _, slots = qg.qkv_grad(*ops, SCALE, maxima=True, launch=launch)
        biggest = rg.slots_maximum(slots)
        assert torch.isnan(biggest) if bad != bad else biggest == float("inf")


def _cast_launches():
    d = rg.DEFAULT_LAUNCH
    return [rg.GradLaunch(d.block, d.programs_per_sm, d.max_warps, c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"],
                          c.num_warps, c.kwargs["M_FASTEST"]) for c in rg.CAST_CONFIGS]


@pytest.mark.parametrize("shape", DQKV_SHAPES)
def test_cast_from_slots_is_fp8_quantize_bit_for_bit(shape):
    """Every cast config and the autotuned op against quantize (eager, and inductor's as the step compiled it),
    both layouts and 1/s; the slots as qkv_grad would leave them (the maximum in one of many)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    t = (torch.randn(shape, device="cuda", generator=g) * 1e-3).bfloat16()
    slots = torch.zeros(rg.MAX_SLOTS, dtype=torch.int32, device="cuda")
    for i, block in enumerate(t.chunk(37)):
        slots[(5 * i + 2) % rg.MAX_SLOTS] = rg.max_slots_reference(block)[0]
    want_q, want_inv = fp8.quantize(t, fp8.E5M2)
    compiled_q, compiled_inv = torch.compile(fp8.quantize)(t, fp8.E5M2)
    assert torch.equal(_bits(compiled_q), _bits(want_q)) and torch.equal(compiled_inv, want_inv)
    for launch in [None] + _cast_launches():
        q, qt, inv = rg.quantize_two_layouts(t, slots, fp8.E5M2, launch=launch)
        assert torch.equal(_bits(q), _bits(want_q)) and torch.equal(_bits(qt), _bits(want_q.t().contiguous()))
        assert torch.equal(inv, want_inv), launch


def test_cast_from_slots_nan_and_inf():
    t = (torch.randn(1000, 1304, device="cuda") * 1e-3).bfloat16()
    t[999, 1303] = float("nan")
    q, qt, inv = rg.quantize_two_layouts(t, rg.max_slots_reference(t), fp8.E5M2)
    assert torch.isnan(inv) and torch.isnan(q.float()).all() and torch.isnan(qt.float()).all()
    t[999, 1303] = float("inf")
    q, qt, inv = rg.quantize_two_layouts(t, rg.max_slots_reference(t), fp8.E5M2)
    want_q, want_inv = fp8.quantize(t, fp8.E5M2)
    nan = torch.isnan(want_q.float())
    assert torch.equal(inv, want_inv) and torch.equal(torch.isnan(q.float()), nan)
    assert torch.equal(q.view(torch.uint8)[~nan], want_q.view(torch.uint8)[~nan])


@pytest.mark.parametrize("compiled", [False, True])
def test_projection_forward_has_the_bits_q_and_k_had_under_autocast(compiled):
    """d20's shape under CUDA autocast: fp8.linear's qkv, then rms_norm in fp32, q and k rounded to bf16 once."""
    M, n_head, n_kv_head, head_dim = SHAPES[0]
    x, weights, cos, sin = projection_inputs(M, _D20.n_embd, n_head, n_kv_head, head_dim, torch.float32, seed=1,
                                             device="cuda")

    def before(x, weight, cos, sin, n_head, n_kv_head):
        return before_unit(fp8.linear(x, weight, True), cos, sin, n_head, n_kv_head)

    unit = projection
    if compiled:
        torch._dynamo.reset()
        unit, before = torch.compile(unit, fullgraph=True), torch.compile(before, fullgraph=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = unit(x, torch.cat(weights), cos, sin, n_head, n_kv_head)
        want = before(x, torch.cat(weights), cos, sin, n_head, n_kv_head)
    for g, w in zip(got, want):
        assert g.dtype == torch.bfloat16 and torch.equal(g, w)


@pytest.mark.parametrize("compiled", [False, True])
def test_projection_gradients_are_the_previous_paths_bit_for_bit(compiled):
    """dx and c_q's, c_k's and c_v's gradients under autocast as the previous composition gave them (qkv_grad, then
    quantize by torch ops, eager, or inductor's code, compiled), with the same output gradients: the kernels' slots
    and cast must give quantize's bits. Compiled, against eager too: zeros for q and k's rows would be torch 2.11's
    dropped gradients (pytorch issue 180642)."""
    M, C, n_head, n_kv_head, head_dim = 4096, 256, 4, 2, 128
    inputs = projection_inputs(M, C, n_head, n_kv_head, head_dim, torch.float32, seed=2, device="cuda")
    new, previous = projection, previous_projection
    if compiled:
        torch._dynamo.reset()
        new, previous = torch.compile(new, fullgraph=True), torch.compile(previous, fullgraph=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        outs, got = _gradients(new, *inputs, n_head, n_kv_head)
        previous_outs, want = _gradients(previous, *inputs, n_head, n_kv_head)
        _, eager = _gradients(projection, *inputs, n_head, n_kv_head)
    assert all(torch.equal(o, w) for o, w in zip(outs, previous_outs))
    for name, g, w, e in zip(("x", "c_q", "c_k", "c_v"), got, want, eager):
        assert torch.equal(g, w), name
        rel = ((g - e).norm() / e.norm()).item()
        assert rel < 5e-2, (name, rel)  # fusion's roundings moved through fp8; a dropped gradient reads 1
