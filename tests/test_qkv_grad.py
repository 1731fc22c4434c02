"""kernels/qkv_grad.py: the fused qkv's gradient against its torch definition (under the interpreter: odd row counts,
grouped-query heads, head_dim 64 and 128, rows at position 0 and far from it), the maximum it folds into slots (each
slot's value, NaN, inf, zeros), that definition against autograd's gradient of the forward it inverts, and the
model's fp8 q/k/v projection (`_QKVProjection`): the forward's bits are fp8.linear's and scaled_norm's, its
gradients the previous composition's (fp8.linear, then the q/k/v unit with qkv_grad) to the bit, and compiled gradients
equal eager ones (pytorch issue 180642 dropped them under torch 2.11)."""

import pytest
import torch
import torch.nn.functional as F

from fastsft import fp8
from fastsft.kernels import fp8_relu_square_grad as rg
from fastsft.kernels import qkv_grad as qg
from fastsft.model import (_QKVProjection, _rotated_normed, _scaled_norm_and_rstd, apply_rotary, rotary_tables,
                           scaled_norm)

SCALE = 1.2


def _qkv(M, n_head, n_kv_head, head_dim, dtype, seed=0, device="cpu"):
    """qkv (M, (H + 2 Hkv) D) and its rows' cos, sin (M, 1, D/2) in fp32, as the model passes them: position 0
    first, then positions up to 2047."""
    g = torch.Generator().manual_seed(seed)
    qkv = (torch.randn(M, (n_head + 2 * n_kv_head) * head_dim, generator=g) * 2).to(device, dtype)
    return qkv, *_rotary(M, head_dim, g, device)


def _rotary(M, head_dim, g, device):
    """cos, sin (M, 1, D/2) in fp32 of random positions, the first two 0."""
    positions = torch.randint(0, 2048, (M,), generator=g).to(device)
    positions[:2] = 0
    cos, sin = rotary_tables(2048, head_dim, 100000.0, device)
    return cos[positions][:, None], sin[positions][:, None]


def _operands(M, n_head, n_kv_head, head_dim, dtype, seed=0, device="cpu"):
    """The kernel's operands as the model's backward gets them: the forward's normed q, k and 1/rms, cos and sin
    in qkv's dtype, and random dq, dk, dv."""
    qkv, cos, sin = _qkv(M, n_head, n_kv_head, head_dim, dtype, seed, device)
    cos, sin = cos.to(dtype), sin.to(dtype)
    q, k, _ = qkv.split([n_head * head_dim, n_kv_head * head_dim, n_kv_head * head_dim], dim=-1)
    q, q_rstd = _scaled_norm_and_rstd(apply_rotary(q.reshape(M, n_head, head_dim), cos, sin), SCALE)
    k, k_rstd = _scaled_norm_and_rstd(apply_rotary(k.reshape(M, n_kv_head, head_dim), cos, sin), SCALE)
    g = torch.Generator().manual_seed(seed + 1)
    dq, dk, dv = (torch.randn(t.shape, generator=g).to(device, dtype) for t in (q, k, k))
    return dq, dk, dv, q, k, q_rstd, k_rstd, cos, sin


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M, n_head, n_kv_head, head_dim", [(37, 4, 2, 64), (19, 2, 1, 128), (9, 3, 3, 128)])
def test_kernel_equals_the_reference(M, n_head, n_kv_head, head_dim, dtype):
    """Row counts not a multiple of the interpreter's 8-row blocks; the kernel and the reference round once from
    fp32 values that differ in their last bits (sums in another order), so bf16 may differ by one unit in the last
    place, fp32 by a few (more relative to values near 0, where rotary's two terms cancel)."""
    ops = _operands(M, n_head, n_kv_head, head_dim, dtype)
    got = qg.qkv_grad(*ops, SCALE, launch=qg.QKVGradLaunch())
    want = qg.qkv_grad_reference(*ops, SCALE)
    assert got.shape == want.shape == (M, (n_head + 2 * n_kv_head) * head_dim) and got.dtype == dtype
    v_cols = slice((n_head + n_kv_head) * head_dim, None)
    assert torch.equal(got[:, v_cols], ops[2].reshape(M, -1))  # dv copied
    rtol = 2.0**-7 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=1e-6 * want.float().abs().max())
    assert (got[:2] != 0).float().mean() > 0.9  # position 0's rows (cos 1, sin 0) are written too


def _slots_by_program(out, n_heads, head_dim, block_m):
    """What the kernel's atomics leave in the slots, from its output: program (head j, row block i), the
    (i * n_heads + j)-th, folds max |its tile| into slot (that mod MAX_SLOTS)."""
    slots = torch.zeros(rg.MAX_SLOTS, dtype=torch.int32)
    for i in range(-(-out.shape[0] // block_m)):
        for j in range(n_heads):
            tile = out[i * block_m:(i + 1) * block_m, j * head_dim:(j + 1) * head_dim]
            at = (i * n_heads + j) % rg.MAX_SLOTS
            slots[at] = max(slots[at], rg.max_slots_reference(tile)[0])
    return slots


def _with_maxima(ops):
    """The kernel's (dqkv, slots) under the interpreter, after checking dqkv's bits are those it writes without."""
    out, slots = qg.qkv_grad(*ops, SCALE, maxima=True, launch=qg.QKVGradLaunch())
    without = qg.qkv_grad(*ops, SCALE, launch=qg.QKVGradLaunch())
    assert torch.equal(out.view(torch.uint8), without.view(torch.uint8))  # the bits: NaNs too
    M, n_head, head_dim = ops[0].shape
    want = _slots_by_program(out, n_head + 2 * ops[1].shape[1], head_dim, qg.INTERPRETED_LAUNCH.block_m)
    assert slots.dtype == torch.int32 and torch.equal(slots, want)
    return out, slots


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M, n_head, n_kv_head, head_dim", [(37, 4, 2, 64), (299, 3, 2, 16)])
def test_kernel_folds_the_stored_maximum_into_each_programs_slot(M, n_head, n_kv_head, head_dim, dtype):
    """Each slot holds the largest |dqkv| of its programs' tiles as stored (rounded to dqkv's dtype), a partial last
    row block included; 299 rows make 266 programs, so the first slots take two. Their maximum is max |dqkv|."""
    out, slots = _with_maxima(_operands(M, n_head, n_kv_head, head_dim, dtype, seed=8))
    assert torch.equal(rg.slots_maximum(slots), out.abs().amax().float())
    assert (slots != 0).sum() == min(rg.MAX_SLOTS, -(-M // 8) * (n_head + 2 * n_kv_head))  # each program wrote


@pytest.mark.parametrize("where", ["dq", "dv"])
def test_a_nan_in_dqkv_makes_the_maximum_nan(where):
    """A NaN in dq spreads over its row's head (the norm's mean) in the partial last row block; one in dv is copied.
    Its slot holds NAN_BITS, above inf's, so the maximum reads NaN and the cast's scale and result are NaN, as
    fastsft.fp8.quantize's."""
    ops = _operands(37, 4, 2, 64, torch.bfloat16, seed=9)
    if where == "dq":
        ops[0][36, 1, 5] = float("nan")
    else:
        ops[2][4, 1, 70 - 64] = float("nan")
    ops[2][9, 0, 3] = float("inf")  # an inf elsewhere: the NaN still wins
    out, slots = _with_maxima(ops)
    assert (slots == rg.NAN_BITS).any() and torch.isnan(rg.slots_maximum(slots))
    q, qt, inv = rg.quantize_two_layouts(out, slots, fp8.E5M2, launch=rg.DEFAULT_LAUNCH)
    want_q, want_inv = fp8.quantize(out, fp8.E5M2)
    assert torch.isnan(want_inv) and torch.isnan(inv)
    assert torch.isnan(want_q.float()).all() and torch.isnan(q.float()).all() and torch.isnan(qt.float()).all()


def test_an_inf_in_dqkv_makes_the_maximum_inf():
    ops = _operands(19, 2, 1, 128, torch.bfloat16, seed=10)
    ops[2][18, 0, 100] = float("-inf")
    out, slots = _with_maxima(ops)
    assert rg.slots_maximum(slots) == float("inf")


def test_all_zero_gradients_fold_to_zero():
    ops = list(_operands(21, 3, 1, 64, torch.bfloat16, seed=11))
    ops[:3] = [torch.zeros_like(t) for t in ops[:3]]
    out, slots = _with_maxima(ops)
    assert not out.float().any() and not slots.any()


@pytest.mark.parametrize("scale", [1.0, SCALE])
def test_reference_is_autograds_gradient_of_the_forward(scale):
    """float64: split, heads, rotary, norm and scale by autograd against the reference from the saved tensors."""
    M, n_head, n_kv_head, head_dim = 11, 4, 2, 16
    qkv, cos, sin = _qkv(M, n_head, n_kv_head, head_dim, torch.float64, seed=2)
    qkv.requires_grad_()
    q, k, v = qkv.split([n_head * head_dim, n_kv_head * head_dim, n_kv_head * head_dim], dim=-1)
    norm = lambda t, h: F.rms_norm(apply_rotary(t.view(M, h, head_dim), cos, sin), (head_dim,))  # noqa: E731
    outs = (norm(q, n_head) * scale, norm(k, n_kv_head) * scale, v.view(M, n_kv_head, head_dim))
    g = torch.Generator().manual_seed(3)
    grads = [torch.randn(o.shape, dtype=torch.float64, generator=g) for o in outs]
    (want,) = torch.autograd.grad(outs, qkv, grads)
    rstd = lambda t, h: torch.rsqrt(apply_rotary(t.view(M, h, head_dim), cos, sin)  # noqa: E731
                                    .square().mean(-1, keepdim=True) + torch.finfo(torch.float64).eps)
    got = qg.qkv_grad_reference(*grads, outs[0].detach(), outs[1].detach(), rstd(q, n_head).detach(),
                                rstd(k, n_kv_head).detach(), cos, sin, scale)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)




def before_unit(qkv, cos, sin, n_head, n_kv_head):
    """q, k, v as the model computed them from qkv (N, W) before the unit: split, heads, scaled_norm(apply_rotary)."""
    M, head_dim = qkv.shape[0], qkv.shape[1] // (n_head + 2 * n_kv_head)
    q, k, v = qkv.split([n_head * head_dim, n_kv_head * head_dim, n_kv_head * head_dim], dim=-1)
    return (scaled_norm(apply_rotary(q.view(M, n_head, head_dim), cos, sin), SCALE),
            scaled_norm(apply_rotary(k.view(M, n_kv_head, head_dim), cos, sin), SCALE),
            v.contiguous().view(M, n_kv_head, head_dim))


class _PreviousUnit(torch.autograd.Function):
    """The model's q/k/v unit before `_QKVProjection` (run 14's path): `_rotated_normed` of fp8.linear's qkv, its
    backward qkv_grad alone, so fp8.linear's backward quantized dqkv by torch ops."""

    @staticmethod
    def forward(ctx, qkv, cos, sin, n_head, n_kv_head, scale):
        q, k, v, saved = _rotated_normed(qkv, cos, sin, n_head, n_kv_head, scale)
        ctx.save_for_backward(*saved)
        ctx.scale = scale
        return q.view_as(q), k.view_as(k), v

    @staticmethod
    def backward(ctx, dq, dk, dv):
        dqkv = qg.qkv_grad(dq.contiguous(), dk.contiguous(), dv.contiguous(), *ctx.saved_tensors, ctx.scale)
        return dqkv, None, None, None, None, None


def previous_projection(x, weight, cos, sin, n_head, n_kv_head):
    return _PreviousUnit.apply(fp8.linear(x, weight, True), cos, sin, n_head, n_kv_head, SCALE)


def projection(x, weight, cos, sin, n_head, n_kv_head):
    return _QKVProjection.apply(x, weight, cos, sin, n_head, n_kv_head, SCALE, fp8.output_dtype(x))


def projection_inputs(M, C, n_head, n_kv_head, head_dim, dtype, seed=0, device="cpu"):
    """x (M, C) and c_q's, c_k's and c_v's weights, leaves in dtype, and the rows' cos, sin (M, 1, D/2) in fp32."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, C, generator=g).to(device, dtype).requires_grad_()
    weights = [(torch.randn(n * head_dim, C, generator=g) / C**0.5).to(device, dtype).requires_grad_()
               for n in (n_head, n_kv_head, n_kv_head)]
    return x, weights, *_rotary(M, head_dim, g, device)


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_projection_forward_has_fp8_linears_and_scaled_norms_bits(dtype, autocast):
    """q and k as scaled_norm(apply_rotary(.)) of fp8.linear's qkv gave them before, v its columns; under autocast
    too."""
    M, C, n_head, n_kv_head, head_dim = 48, 80, 3, 1, 16
    x, weights, cos, sin = projection_inputs(M, C, n_head, n_kv_head, head_dim, dtype, seed=4)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        got = projection(x, torch.cat(weights), cos, sin, n_head, n_kv_head)
        qkv = fp8.linear(x, torch.cat(weights), True)
        want = before_unit(qkv, cos, sin, n_head, n_kv_head)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert got[0].dtype == (torch.bfloat16 if autocast else dtype)
    assert {type(t.grad_fn).__name__ for t in got} == {"_QKVProjectionBackward"}


def test_projection_compiled_forward_has_compiled_bits():
    """inductor elides a cast to bf16 fused into its consumer: the unit keeps cos and sin rounded in memory, as
    autograd's rotary did, so q and k keep their bits compiled too (with cos and sin cast where used, 28% differed)."""
    M, C, n_head, n_kv_head, head_dim = 32, 48, 4, 2, 32
    x, weights, cos, sin = projection_inputs(M, C, n_head, n_kv_head, head_dim, torch.bfloat16, seed=4)

    def before(x, weight, cos, sin, n_head, n_kv_head):
        return before_unit(fp8.linear(x, weight, True), cos, sin, n_head, n_kv_head)

    torch._dynamo.reset()
    got = torch.compile(projection, fullgraph=True)(x, torch.cat(weights), cos, sin, n_head, n_kv_head)
    want = torch.compile(before, fullgraph=True)(x, torch.cat(weights), cos, sin, n_head, n_kv_head)
    assert all(torch.equal(g, w) for g, w in zip(got, want))


def _gradients(fn, x, weights, cos, sin, n_head, n_kv_head, seed=0):
    """(q, k, v), and the gradients of x and of c_q's, c_k's and c_v's weights for random output gradients."""
    outs = fn(x, torch.cat(weights), cos, sin, n_head, n_kv_head)
    g = torch.Generator().manual_seed(seed)
    grads = [torch.randn(o.shape, generator=g).to(o.device, o.dtype) for o in outs]
    return outs, torch.autograd.grad(outs, [x, *weights], grads)


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M, C, n_head, n_kv_head, head_dim", [(48, 80, 3, 1, 16), (32, 48, 4, 2, 32)])
def test_projection_gradients_are_the_previous_paths_bit_for_bit(M, C, n_head, n_kv_head, head_dim, dtype,
                                                                  autocast, monkeypatch):
    """dx and each weight's gradient as the previous composition gave them (fp8.linear, whose backward quantizes dqkv by
    torch ops, then the unit): on the CPU both take qkv_grad's and the cast's torch definitions, so the two differ
    only where the new code could (the slots, the cast from them, the wiring). The new backward must not quantize by
    fp8.quantize and must take the cast from the slots; the previous one must."""
    x, weights, cos, sin = projection_inputs(M, C, n_head, n_kv_head, head_dim, dtype, seed=12)
    calls = {"quantize e5m2": 0, "quantize_two_layouts": 0}
    quantize, two_layouts = fp8.quantize, rg.quantize_two_layouts

    def counting_quantize(t, fmt):
        calls["quantize e5m2"] += fmt == fp8.E5M2
        return quantize(t, fmt)

    def counting_two_layouts(*args, **kwargs):
        calls["quantize_two_layouts"] += 1
        return two_layouts(*args, **kwargs)

    monkeypatch.setattr(fp8, "quantize", counting_quantize)
    monkeypatch.setattr(rg, "quantize_two_layouts", counting_two_layouts)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        outs, got = _gradients(projection, x, weights, cos, sin, n_head, n_kv_head)
        assert calls == {"quantize e5m2": 0, "quantize_two_layouts": 1}
        previous_outs, want = _gradients(previous_projection, x, weights, cos, sin, n_head, n_kv_head)
        assert calls == {"quantize e5m2": 1, "quantize_two_layouts": 1}
    assert all(torch.equal(o, w) for o, w in zip(outs, previous_outs))
    for name, g, w in zip(("x", "c_q", "c_k", "c_v"), got, want):
        assert g.dtype == w.dtype == dtype and torch.equal(g, w), name
        assert g.abs().amax() > 0, name


def test_unit_gradcheck():
    """The q/k/v unit's gradient (`_rotated_normed` and qkv_grad, which _QKVProjection takes) in float64."""
    M, n_head, n_kv_head, head_dim = 5, 2, 1, 8
    qkv, cos, sin = _qkv(M, n_head, n_kv_head, head_dim, torch.float64, seed=5)
    f = lambda t: _PreviousUnit.apply(t, cos, sin, n_head, n_kv_head, SCALE)  # noqa: E731
    assert torch.autograd.gradcheck(f, (qkv.requires_grad_(),))


@pytest.mark.parametrize("n_kv_head", [2, 4])
def test_projection_compiled_gradients_equal_eager(n_kv_head):
    """One graph (fullgraph), and every output's gradient reaching x and the weight: under torch 2.11 a Function
    returning a tensor it also saves got its gradient in the wrong slot (zeros for q and k)."""
    M, C, n_head, head_dim = 32, 64, 4, 16
    x, weights, cos, sin = projection_inputs(M, C, n_head, n_kv_head, head_dim, torch.float32, seed=6)
    mix = [torch.randn(n, head_dim) for n in (n_head, n_kv_head, n_kv_head)]

    def loss(x, weight):
        outs = projection(x, weight, cos, sin, n_head, n_kv_head)
        return sum(((o * w).sum(-1) ** 2).sum() for o, w in zip(outs, mix))

    def grads_of(fn):
        x_, weight = x.detach().clone().requires_grad_(), torch.cat(weights).detach().requires_grad_()
        return torch.autograd.grad(fn(x_, weight), (x_, weight))

    torch._dynamo.reset()
    eager, compiled = grads_of(loss), grads_of(torch.compile(loss, backend="aot_eager", fullgraph=True))
    for c, e in zip(compiled, eager):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-5)
    assert eager[1][:n_head * head_dim].abs().amax() > 0  # q's rows of the weight got a gradient


@pytest.mark.parametrize("maxima", [False, True])
def test_custom_op_passes_opcheck(maxima):
    """torch's own checks of the op: schema, fake shapes against the real output, no aliasing."""
    torch.library.opcheck(qg._qkv_grad_op, (*_operands(13, 4, 2, 16, torch.float32, seed=7), SCALE, maxima))


def test_the_ops_torch_path_folds_the_maximum_into_slot_0():
    ops = _operands(13, 4, 2, 16, torch.bfloat16, seed=7)
    out, slots = qg.qkv_grad(*ops, SCALE, maxima=True)
    assert torch.equal(out, qg.qkv_grad_reference(*ops, SCALE))
    assert torch.equal(slots, rg.max_slots_reference(out)) and not slots[1:].any()
    assert torch.equal(rg.slots_maximum(slots), out.abs().amax().float())


def test_bad_arguments_are_refused_by_name():
    ops = list(_operands(8, 2, 1, 16, torch.float32))
    with pytest.raises(ValueError, match="dq must be contiguous"):
        qg.qkv_grad(ops[0].transpose(0, 1).contiguous().transpose(0, 1), *ops[1:], SCALE)
    with pytest.raises(ValueError, match="cos must be contiguous of shape"):
        qg.qkv_grad(*ops[:7], ops[7][..., :4], ops[8], SCALE)
    with pytest.raises(ValueError, match="one dtype"):
        qg.qkv_grad(ops[0].double(), *ops[1:], SCALE)
