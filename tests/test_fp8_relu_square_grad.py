"""kernels/fp8_relu_square_grad.py: the fp8 MLP's dh quantized in both layouts, against its torch definition bit for
bit under the interpreter (odd sizes: partial tiles in both dimensions), and the MLP's gradients through it; and the
same cast of a matrix as it is from slots of its maximum (`quantize_two_layouts`, dqkv's), against
fastsft.fp8.quantize bit for bit in both layouts: odd sizes, maxima spread over the slots, NaN, inf, zeros."""

import pytest
import torch

from fastsft import fp8
from fastsft.kernels import fp8_relu_square as rs
from fastsft.kernels import fp8_relu_square_grad as rg


def _operands(M, N, da_dtype, seed=0):
    """da, and a = relu(h)^2 in e4m3 with its inverse scale, as the MLP's forward leaves them."""
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(M, N, generator=g) * 3).to(da_dtype)
    r = torch.relu(h)
    scale = fp8.scale_for(r * r, fp8.E4M3)
    a, _ = rs.relu_square_fp8_reference(h, scale, fp8.E4M3)
    da = (torch.randn(M, N, generator=g) * 0.01).to(da_dtype)
    da[0, :3] = torch.tensor([0.0, -1e-30, 7.0])  # a zero, a value that underflows, the largest
    return da, a, scale.reciprocal()


def _bits(t):
    return t.view(torch.uint8)


@pytest.mark.parametrize("da_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("dtype", [fp8.E5M2, fp8.E4M3])
def test_kernels_equal_the_reference_bit_for_bit(da_dtype, dtype):
    da, a, a_inv = _operands(37, 70, da_dtype)
    q, qt, inv = rg.relu_square_grad_fp8(da, a, a_inv, dtype, launch=rg.DEFAULT_LAUNCH)
    ref, ref_t, ref_inv = rg.relu_square_grad_fp8_reference(da, a, a_inv, dtype)
    assert q.dtype == qt.dtype == dtype and q.shape == (37, 70) and qt.shape == (70, 37)
    assert torch.equal(_bits(q), _bits(ref)) and torch.equal(_bits(qt), _bits(ref_t))
    assert torch.equal(inv, ref_inv)
    assert (q.float() != 0).float().mean() > 0.4  # relu zeroes about half of dh; the scale kept the rest


def test_the_reference_is_fp8_quantize_of_dh():
    da, a, a_inv = _operands(24, 40, torch.bfloat16, seed=1)
    dh = (2 * torch.sqrt(a.float() * a_inv) * da).to(da.dtype)
    q, inv = fp8.quantize(dh, fp8.E5M2)
    ref, ref_t, ref_inv = rg.relu_square_grad_fp8_reference(da, a, a_inv, fp8.E5M2)
    assert torch.equal(_bits(ref), _bits(q)) and torch.equal(ref_inv, inv) and torch.equal(_bits(ref_t), _bits(q.t()))


def test_the_scale_is_torchs_number_over_tensor():
    """torch computes fmax / m as (1 / m) * fmax, two roundings: a maximum where that differs from one division."""
    fmax = torch.finfo(fp8.E5M2).max
    ones = torch.arange(1.0, 2.0, 2.0**-7).bfloat16().float()  # every bf16 value in [1, 2)
    two_step = ones.reciprocal() * fmax
    one_step = (torch.tensor(fmax, dtype=torch.float64) / ones.double()).float()
    m = ones[two_step != one_step][0]
    da = torch.full((18, 34), 0.01).bfloat16()
    da[4, 9] = m / 2  # dh = 2 da where a * a_inv = 1
    a, a_inv = torch.ones(18, 34).to(fp8.E4M3), torch.tensor(1.0)
    q, qt, inv = rg.relu_square_grad_fp8(da, a, a_inv, fp8.E5M2, launch=rg.DEFAULT_LAUNCH)
    _, _, ref_inv = rg.relu_square_grad_fp8_reference(da, a, a_inv, fp8.E5M2)
    assert torch.equal(inv, ref_inv) and torch.equal(inv, (m.reciprocal() * fmax).reciprocal())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_dh_gives_a_non_finite_result(bad):
    da, a, a_inv = _operands(20, 36, torch.bfloat16, seed=2)
    da[5, 7] = bad
    q, qt, inv = rg.relu_square_grad_fp8(da, a, a_inv, fp8.E5M2, launch=rg.DEFAULT_LAUNCH)
    # the maximum is not finite, so the scale is 0 and 1/s infinite: every matmul result from q is NaN
    assert not torch.isfinite(inv) and not torch.isfinite(q.float()).all() and not torch.isfinite(qt.float()).all()


def test_all_zero_da_gives_zeros_and_the_floor_scale():
    da, a, a_inv = _operands(17, 33, torch.bfloat16, seed=3)
    q, qt, inv = rg.relu_square_grad_fp8(torch.zeros_like(da), a, a_inv, fp8.E5M2, launch=rg.DEFAULT_LAUNCH)
    assert not q.float().any() and not qt.float().any()
    assert torch.equal(inv, (torch.finfo(fp8.E5M2).max / torch.tensor(1e-12)).reciprocal())


def test_bad_arguments_are_refused_by_name():
    da, a, a_inv = _operands(16, 32, torch.bfloat16)
    with pytest.raises(ValueError, match="row-major"):
        rg.relu_square_grad_fp8(da.t(), a, a_inv, fp8.E5M2)
    with pytest.raises(TypeError, match="must be one of"):
        rg.relu_square_grad_fp8(da, a.float(), a_inv, fp8.E5M2)
    with pytest.raises(ValueError, match="empty"):
        rg.relu_square_grad_fp8(da[:0], a[:0], a_inv, fp8.E5M2)
    with pytest.raises(ValueError, match="a_inv"):
        rg.relu_square_grad_fp8(da, a, a_inv.double(), fp8.E5M2)


def test_custom_op_compiles_and_matches_eager():
    da, a, a_inv = _operands(32, 48, torch.bfloat16, seed=4)
    f = lambda *t: rg.relu_square_grad_fp8(*t, fp8.E5M2)  # noqa: E731
    eager = f(da, a, a_inv)
    compiled = torch.compile(f, fullgraph=True)(da, a, a_inv)
    for e, c in zip(eager, compiled):
        assert torch.equal(e.view(torch.uint8) if e.dtype != torch.float32 else e,
                           c.view(torch.uint8) if c.dtype != torch.float32 else c)


@pytest.mark.parametrize("shape", [(1, 5), (5, 3), (37, 70), (33, 130)])
@pytest.mark.parametrize("launch", [rg.GradLaunch(64, 3, 1, 16, 32, 1, True),
                                    rg.GradLaunch(32, 7, 1, 32, 16, 1, False)])
def test_partial_maxima_and_tile_orders_equal_the_reference(shape, launch, monkeypatch):
    """Fewer blocks than programs (programs with nothing to do write no slot the cast reads), several blocks a
    program with a partial last one, partial tiles in both dimensions, and both tile orders."""
    monkeypatch.setattr(rg, "INTERPRETED_LAUNCH", launch)
    da, a, a_inv = _operands(*shape, torch.bfloat16, seed=5)
    q, qt, inv = rg.relu_square_grad_fp8(da, a, a_inv, fp8.E5M2, launch=launch)
    ref, ref_t, ref_inv = rg.relu_square_grad_fp8_reference(da, a, a_inv, fp8.E5M2)
    assert torch.equal(_bits(q), _bits(ref)) and torch.equal(_bits(qt), _bits(ref_t)) and torch.equal(inv, ref_inv)


@pytest.mark.parametrize("where", ["first", "last"])
def test_a_nan_in_any_partial_maximum_gives_a_non_finite_result(where):
    """The largest |dh| elsewhere is finite; the NaN sits in the first block or in the last, partial one."""
    da, a, a_inv = _operands(37, 70, torch.bfloat16, seed=6)
    a = torch.full_like(a, 1.0)  # a > 0 everywhere, so da's NaN reaches dh
    da[(0, 5) if where == "first" else (36, 69)] = float("nan")
    q, qt, inv = rg.relu_square_grad_fp8(da, a, a_inv, fp8.E5M2, launch=rg.DEFAULT_LAUNCH)
    assert not torch.isfinite(inv) and not torch.isfinite(q.float()).all() and not torch.isfinite(qt.float()).all()


@pytest.mark.parametrize("a_inv", [2.0**-120, 2.0**-85, 1e-3, 3.0, 2.0**105, 2.0**125])
@pytest.mark.parametrize("a_dtype", [fp8.E4M3, fp8.E5M2])
def test_every_fp8_a_and_extreme_scales_give_torchs_root(a_inv, a_dtype):
    """Every value a can hold (negatives, subnormals, NaN, e5m2's inf), with scales that push a * a_inv under
    sqrt's fast path, to its top and over it (the power-of-two rescaling around the root); da of 1 and -1."""
    a = torch.arange(256, dtype=torch.uint8).view(a_dtype).reshape(16, 16)
    a = torch.cat([a, a]).contiguous()  # (32, 16)
    da = torch.ones(32, 16, dtype=torch.bfloat16)
    da[16:] = -1
    q, qt, inv = rg.relu_square_grad_fp8(da, a, torch.tensor(a_inv), fp8.E5M2, launch=rg.DEFAULT_LAUNCH)
    ref, ref_t, ref_inv = rg.relu_square_grad_fp8_reference(da, a, torch.tensor(a_inv), fp8.E5M2)
    finite = torch.isfinite(ref_inv)
    if finite:
        assert torch.equal(_bits(q), _bits(ref)) and torch.equal(_bits(qt), _bits(ref_t)) and torch.equal(inv, ref_inv)
    else:  # a NaN or inf in a: both non-finite (the kernel counts a NaN as inf, so its 1/s may be inf, not NaN)
        assert not torch.isfinite(inv)


def test_the_root_sees_every_a_exactly():
    """The rescaled root against torch's sqrt on every e4m3 and e5m2 value, finite scales only, through dh's maximum
    alone: the largest element decides the scale, so each a in turn is made the largest."""
    for a_dtype in (fp8.E4M3, fp8.E5M2):
        values = torch.arange(256, dtype=torch.uint8).view(a_dtype)
        keep = torch.isfinite(values.float()) & (values.float() > 0)
        for a_inv in (2.0**-100, 2.0**-81, 0.37, 2.0**101):
            a = values[keep].reshape(1, -1).contiguous()
            da = torch.ones_like(a, dtype=torch.bfloat16)
            _, _, inv = rg.relu_square_grad_fp8(da, a, torch.tensor(a_inv), fp8.E5M2, launch=rg.DEFAULT_LAUNCH)
            _, _, ref_inv = rg.relu_square_grad_fp8_reference(da, a, torch.tensor(a_inv), fp8.E5M2)
            assert torch.equal(inv, ref_inv), (a_dtype, a_inv)


def _matrix(M, N, dtype, seed=0):
    """A gradient-like matrix with a zero, a value that flushes to fp8's zero, and -0 in its first row."""
    g = torch.Generator().manual_seed(seed)
    t = (torch.randn(M, N, generator=g) * 0.01).to(dtype)
    t.view(-1)[:3] = torch.tensor([0.0, -1e-30, -0.0])
    return t


def _spread_slots(t, pieces):
    """max |t| folded as a kernel writing t in `pieces` row blocks would: block i into slot 3 i + 1 (mod the slots),
    so the maximum is in no particular slot and most slots are 0."""
    slots = torch.zeros(rg.MAX_SLOTS, dtype=torch.int32)
    for i, block in enumerate(t.chunk(pieces)):
        at = (3 * i + 1) % rg.MAX_SLOTS
        slots[at] = max(slots[at], rg.max_slots_reference(block)[0])
    return slots


def _quantize_bits(t, dtype):
    q, inv = fp8.quantize(t, dtype)
    return _bits(q), _bits(q.t().contiguous()), inv


@pytest.mark.parametrize("t_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dtype", [fp8.E5M2, fp8.E4M3])
@pytest.mark.parametrize("shape", [(1, 5), (37, 70), (33, 130)])
@pytest.mark.parametrize("launch", [rg.DEFAULT_LAUNCH, rg.GradLaunch(64, 3, 1, 32, 16, 1, False)])
def test_two_layouts_cast_is_fp8_quantize_bit_for_bit(shape, dtype, t_dtype, launch, monkeypatch):
    """The kernel (DH off) from slots that hold the maximum anywhere: q, q^T and 1/s as quantize gives them; partial
    tiles in both dimensions, both tile orders."""
    monkeypatch.setattr(rg, "INTERPRETED_LAUNCH", launch)
    t = _matrix(*shape, t_dtype, seed=shape[0])
    slots = _spread_slots(t, 5)
    q, qt, inv = rg.quantize_two_layouts(t, slots, dtype, launch=launch)
    want_q, want_qt, want_inv = _quantize_bits(t, dtype)
    assert q.dtype == qt.dtype == dtype and q.shape == shape and qt.shape == shape[::-1]
    assert torch.equal(_bits(q), want_q) and torch.equal(_bits(qt), want_qt) and torch.equal(inv, want_inv)
    assert float(q.float().abs().max()) == torch.finfo(dtype).max  # the maximum was found, wherever its slot


def test_two_layouts_reference_is_fp8_quantize_bit_for_bit():
    """The op's torch path (the CPU's, fp32's), from the slots a reference fold gives and from spread ones."""
    for t_dtype in (torch.bfloat16, torch.float32):
        t = _matrix(24, 40, t_dtype, seed=1)
        want_q, want_qt, want_inv = _quantize_bits(t, fp8.E5M2)
        for slots in (rg.max_slots_reference(t), _spread_slots(t, 7)):
            q, qt, inv = rg.quantize_two_layouts(t, slots, fp8.E5M2)
            assert torch.equal(_bits(q), want_q) and torch.equal(_bits(qt), want_qt) and torch.equal(inv, want_inv)


@pytest.mark.parametrize("launch", [None, rg.DEFAULT_LAUNCH])  # the torch path, the kernel
def test_two_layouts_nan_and_inf_are_quantizes(launch):
    """A NaN: the slots' maximum reads NaN, so 1/s and every element are NaN, as quantize's. An inf: the scale is 0,
    so 1/s is inf, the inf's element NaN and the others (signed) zeros, quantize's bits."""
    t = _matrix(20, 36, torch.bfloat16, seed=2)
    t[19, 35] = float("nan")
    q, qt, inv = rg.quantize_two_layouts(t, _spread_slots(t, 3), fp8.E5M2, launch=launch)
    want_q, _ = fp8.quantize(t, fp8.E5M2)
    assert torch.isnan(inv) and torch.isnan(q.float()).all() and torch.isnan(qt.float()).all()
    assert torch.isnan(want_q.float()).all()
    t[19, 35] = float("-inf")
    q, qt, inv = rg.quantize_two_layouts(t, _spread_slots(t, 3), fp8.E5M2, launch=launch)
    want_q, want_inv = fp8.quantize(t, fp8.E5M2)
    assert torch.equal(inv, want_inv) and inv == float("inf")
    nan = torch.isnan(want_q.float())
    assert nan.sum() == 1 and torch.equal(torch.isnan(q.float()), nan) and torch.equal(torch.isnan(qt.float()), nan.t())
    assert torch.equal(_bits(q)[~nan], _bits(want_q)[~nan])  # zeros with their signs


def test_two_layouts_all_zero_gives_zeros_and_the_floor_scale():
    t = torch.zeros(17, 33, dtype=torch.bfloat16)
    q, qt, inv = rg.quantize_two_layouts(t, rg.max_slots_reference(t), fp8.E5M2, launch=rg.DEFAULT_LAUNCH)
    assert not q.float().any() and not qt.float().any()
    assert torch.equal(inv, fp8.quantize(t, fp8.E5M2)[1])


def test_two_layouts_op_passes_opcheck_and_compiles():
    t = _matrix(32, 48, torch.bfloat16, seed=4)
    slots = _spread_slots(t, 4)
    torch.library.opcheck(rg._quantize_two_layouts_op, (t, slots, fp8.E5M2))
    f = lambda t, s: rg.quantize_two_layouts(t, s, fp8.E5M2)  # noqa: E731
    for e, c in zip(f(t, slots), torch.compile(f, fullgraph=True)(t, slots)):
        assert torch.equal(e.reshape(-1).view(torch.uint8), c.reshape(-1).view(torch.uint8))


def test_two_layouts_bad_arguments_are_refused_by_name():
    t = _matrix(16, 32, torch.bfloat16)
    slots = rg.max_slots_reference(t)
    with pytest.raises(ValueError, match="row-major"):
        rg.quantize_two_layouts(t.t(), slots, fp8.E5M2)
    with pytest.raises(ValueError, match="non-empty"):
        rg.quantize_two_layouts(t[:0], slots, fp8.E5M2)
    with pytest.raises(TypeError, match="bf16, fp16 or fp32"):
        rg.quantize_two_layouts(t.double(), slots, fp8.E5M2)
    with pytest.raises(TypeError, match="the result one of"):
        rg.quantize_two_layouts(t, slots, torch.bfloat16)
    with pytest.raises(ValueError, match="int32"):
        rg.quantize_two_layouts(t, slots.float(), fp8.E5M2)
    with pytest.raises(ValueError, match="int32"):
        rg.quantize_two_layouts(t, slots[:16], fp8.E5M2)
