"""FP8 projections (fastsft.fp8): each matmul against a float64 reference over the same fp8 operands, the whole
against full precision, the fallbacks, the model and the driver's switch. torch._scaled_mm runs on the CPU too."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastsft import fp8
from fastsft.kernels import fp8_relu_square_grad as rg
from fastsft.model import GPT, GPTConfig
from tests.helpers import random_model


def _deq(t: torch.Tensor, dtype) -> torch.Tensor:
    """t as its fp8 operand sees it, back in float64."""
    q, inv = fp8.quantize(t, dtype)
    return q.double() * inv.double()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


def _leaves(*shapes, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g).to(device).requires_grad_() for s in shapes]


@pytest.mark.parametrize("dtype", [fp8.E4M3, fp8.E5M2])
def test_quantize_maps_the_largest_value_to_the_format_max(dtype):
    t = torch.randn(37, 53) * 1e-3
    q, inv = fp8.quantize(t, dtype)
    assert q.dtype == dtype and q.shape == t.shape
    assert float(q.float().abs().max()) == torch.finfo(dtype).max
    mantissa_bits = 3 if dtype == fp8.E4M3 else 2
    err = (q.double() * inv.double() - t.double()).abs()
    # relative rounding in the normal range, plus the subnormal step near zero
    bound = t.double().abs() * 2.0 ** -(mantissa_bits + 1) + float(inv) * torch.finfo(dtype).smallest_normal
    assert bool((err <= bound * 1.0001).all())
    zq, zinv = fp8.quantize(torch.zeros(4, 16), dtype)
    assert not zq.float().any() and torch.isfinite(zinv)
    bad, _ = fp8.quantize(torch.tensor([[1.0, float("inf")]]), dtype)
    assert not torch.isfinite(bad.float()).all()


@pytest.mark.parametrize("lead", [(48,), (3, 16)])
def test_linear_matches_the_float64_product_of_its_fp8_operands(lead):
    K, N = 32, 80
    x, w = _leaves((*lead, K), (N, K))
    y = fp8.linear(x, w, True)
    grad = torch.randn_like(y)
    y.backward(grad)
    x2, g2 = x.detach().reshape(-1, K), grad.reshape(-1, N)
    assert y.shape == (*lead, N) and y.dtype == x.dtype
    assert _rel(y.reshape(-1, N), _deq(x2, fp8.E4M3) @ _deq(w.detach(), fp8.E4M3).T) < 1e-6
    g = _deq(g2, fp8.E5M2)
    assert _rel(x.grad.reshape(-1, K), g @ _deq(w.detach(), fp8.E4M3)) < 1e-6
    assert _rel(w.grad, g.T @ _deq(x2, fp8.E4M3)) < 1e-6
    # and near the full-precision matmul: 3 (e4m3) and 2 (e5m2) mantissa bits
    assert _rel(y.reshape(-1, N), x2 @ w.detach().T) < 0.06
    assert _rel(w.grad, g2.T @ x2) < 0.1


def test_relu_square_mlp_matches_its_reference():
    C = 32
    x, w_fc, w_proj = _leaves((64, C), (4 * C, C), (C, 4 * C))
    y = fp8.relu_square_mlp(x, w_fc, w_proj)
    grad = torch.randn_like(y)
    y.backward(grad)
    # float64 over the same fp8 operands, each quantized where the function quantizes it
    xd, fc, proj = _deq(x.detach(), fp8.E4M3), _deq(w_fc.detach(), fp8.E4M3), _deq(w_proj.detach(), fp8.E4M3)
    h = (xd @ fc.T).float()  # the function's h is in the output dtype (fp32 here)
    a = _deq(F.relu(h).square(), fp8.E4M3)
    assert _rel(y, a @ proj.T) < 1e-6
    g = _deq(grad, fp8.E5M2)
    assert _rel(w_proj.grad, g.T @ a) < 1e-6
    dh = _deq(2 * a.sqrt() * (g @ proj), fp8.E5M2)  # relu(h) as the square root of the fp8 operand
    assert _rel(x.grad, dh @ fc) < 1e-6
    assert _rel(w_fc.grad, dh.T @ xd) < 1e-6
    # near full precision
    xr, fcr, projr = (t.detach().clone().requires_grad_() for t in (x, w_fc, w_proj))
    F.linear(F.relu(F.linear(xr, fcr)).square(), projr).backward(grad)
    for got, want in ((x.grad, xr.grad), (w_fc.grad, fcr.grad), (w_proj.grad, projr.grad)):
        assert _rel(got, want) < 0.15


def test_only_weight_gradients_keep_full_precision_accumulation(monkeypatch):
    """Forward and input-gradient matmuls take fast accumulation (sums of at most 4 x n_embd terms), weight gradients
    (sums over every row of the batch) do not; told apart by their output shapes (M = 48 rows, C = 32)."""
    calls = []
    scaled_mm = torch._scaled_mm

    def recording(a, b, **kwargs):
        out = scaled_mm(a, b, **kwargs)
        calls.append((tuple(out.shape), kwargs.get("use_fast_accum", False)))
        return out

    monkeypatch.setattr(torch, "_scaled_mm", recording)
    x = torch.randn(48, 32, requires_grad=True)
    w, w_fc, w_proj = (torch.randn(*s, requires_grad=True) for s in ((64, 32), (128, 32), (32, 128)))
    (fp8.linear(x, w, True).square().sum() + fp8.relu_square_mlp(x, w_fc, w_proj).square().sum()).backward()
    fast = {(48, 64), (48, 32), (48, 128), (128, 48)}  # outputs, dx, c_fc's h, the MLP's da (transposed)
    weight_grads = {(64, 32), (128, 32), (32, 128)}
    assert sorted(calls) == sorted([((48, 64), True), ((48, 32), True), ((64, 32), False),  # linear
                                    ((48, 128), True), ((48, 32), True),  # the MLP's forward
                                    ((32, 128), False), ((128, 48), True), ((48, 32), True), ((128, 32), False)])
    assert {s for s, f in calls if f} == fast and {s for s, f in calls if not f} == weight_grads


def test_unaligned_shapes_and_no_grad_fall_back_to_the_exact_matmul():
    x, w = _leaves((37, 32), (80, 32))  # 37 rows: not a multiple of 16
    assert not fp8.applies(x, w)
    assert torch.equal(fp8.linear(x, w, True), F.linear(x, w))
    x, w = _leaves((48, 32), (80, 32))
    assert fp8.applies(x, w)
    with torch.no_grad():
        assert not fp8.applies(x, w)
        assert torch.equal(fp8.linear(x, w, True), F.linear(x, w))
    assert torch.equal(fp8.linear(x, w, False), F.linear(x, w))


def test_under_autocast_the_output_is_bf16_and_gradients_keep_their_dtypes():
    x, w = _leaves((48, 32), (80, 32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fp8.linear(x, w, True)
        assert y.dtype == torch.bfloat16
        y.float().square().sum().backward()
    assert x.grad.dtype == w.grad.dtype == torch.float32 and torch.isfinite(w.grad).all()


def test_compiled_matches_eager():
    x, w_fc, w_proj, w = _leaves((64, 32), (128, 32), (32, 128), (96, 32))

    def f(x, w_fc, w_proj, w):
        return fp8.relu_square_mlp(x, w_fc, w_proj).square().sum() + fp8.linear(x, w, True).square().sum()

    grads = []
    for fn in (f, torch.compile(f, fullgraph=True)):
        loss = fn(x, w_fc, w_proj, w)
        loss.backward()
        grads.append([loss.detach()] + [t.grad.clone() for t in (x, w_fc, w_proj, w)])
        for t in (x, w_fc, w_proj, w):
            t.grad = None
    for eager, compiled in zip(*grads):
        assert _rel(compiled, eager) < 1e-5


def _packed_loss(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    N = 64
    idx = torch.randint(0, model.config.vocab_size, (N,), generator=g)
    targets = torch.where(torch.rand(N, generator=g) < 0.6, torch.roll(idx, -1), -1)
    cu = torch.tensor([0, 20, 45, 64], dtype=torch.int32)
    pos = torch.cat([torch.arange(n) for n in (20, 25, 19)])
    loss_sum, count = model.forward_packed(idx, pos, cu, targets=targets)
    return loss_sum / count


@pytest.mark.parametrize("n_kv_head", [4, 2])  # grouped-query: q, k and v of different widths in one matmul
def test_model_with_fp8_projections_trains_like_full_precision(n_kv_head):
    cfg = GPTConfig(n_layer=2, n_embd=128, n_head=4, n_kv_head=n_kv_head, vocab_size=96, sequence_len=64)
    model = random_model(cfg).train()
    base = _packed_loss(model)
    base.backward()
    base_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    model.set_fp8(True)
    assert all(b.attn.fp8 and b.mlp.fp8 for b in model.transformer.h)
    loss = _packed_loss(model)
    loss.backward()
    assert loss.item() != base.item() and abs(loss.item() - base.item()) < 0.05 * base.item()
    projections = [n for n in base_grads if any(k in n for k in ("c_q", "c_k", "c_v", "c_proj", "c_fc"))]
    assert len(projections) == 2 * 6
    for name in projections:
        cos = F.cosine_similarity(model.get_parameter(name).grad.flatten(), base_grads[name].flatten(), dim=0)
        assert cos > 0.95, (name, float(cos))  # 0.98-0.99 seen: e5m2 gradients through two fp8 layers
    # evaluation (no gradients) is the bf16/fp32 model's, to the bit
    with torch.no_grad():
        fp8_eval = _packed_loss(model)
        model.set_fp8(False)
        assert torch.equal(fp8_eval, _packed_loss(model))


@pytest.mark.parametrize("n_kv_head", [4, 2])
def test_model_fp8_qkv_is_one_projection_with_its_own_gradient_cast(n_kv_head, monkeypatch):
    """Each layer's q, k and v come from `_QKVProjection`, whose backward casts the whole (N, (H + 2 Hkv) D) dqkv
    from qkv_grad's slots (quantize_two_layouts, once a layer) and quantizes no gradient by fp8.quantize but the
    other projections'."""
    cfg = GPTConfig(n_layer=2, n_embd=128, n_head=4, n_kv_head=n_kv_head, vocab_size=96, sequence_len=64)
    model = random_model(cfg).train()
    model.set_fp8(True)
    casts, e5m2 = [], []
    two_layouts, quantize = rg.quantize_two_layouts, fp8.quantize

    def counting_two_layouts(t, *args, **kwargs):
        casts.append(tuple(t.shape))
        return two_layouts(t, *args, **kwargs)

    def counting_quantize(t, dtype):
        e5m2.extend([dtype] if dtype == fp8.E5M2 else [])
        return quantize(t, dtype)

    monkeypatch.setattr(rg, "quantize_two_layouts", counting_two_layouts)
    monkeypatch.setattr(fp8, "quantize", counting_quantize)
    _packed_loss(model).backward()
    assert casts == [(64, (4 + 2 * n_kv_head) * 32)] * cfg.n_layer
    # per layer: c_proj's gradient (its _Linear) and the MLP's output gradient by quantize
    assert len(e5m2) == 2 * cfg.n_layer
    for block in model.transformer.h:
        for name in ("c_q", "c_k", "c_v"):
            assert getattr(block.attn, name).weight.grad.abs().amax() > 0


def test_train_config_fp8_reaches_the_model(tmp_path):
    from fastsft import train as train_mod
    from fastsft.train_config import ConfigError
    from tests.test_train import tiny_config

    run = train_mod.build_run(tiny_config(tmp_path, "--fp8=true", "--compile=false"))
    run.loader.close()
    assert all(b.attn.fp8 and b.mlp.fp8 for b in run.model.transformer.h)
    with pytest.raises(ConfigError, match="fp8"):
        tiny_config(tmp_path, "--fp8=maybe")
    # sizes where no matmul could take the fp8 path: said, not silently trained in bf16
    with pytest.raises(ValueError, match=r"tokens per micro-batch .* multiple of 16.*got 1000"):
        train_mod.build_run(tiny_config(tmp_path, "--fp8=true", "--compile=false", "--seq_len=125",
                                        "--device_batch_size=8"))
    with pytest.raises(ValueError, match=r"model.n_embd .* got 72"):
        train_mod.build_run(tiny_config(tmp_path, "--fp8=true", "--compile=false", "--model.n_embd=72"))
