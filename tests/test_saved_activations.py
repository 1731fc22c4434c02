"""What the compiled training step keeps for its backward: q and k's norm keeps its output (which attention keeps
anyway), not its rotated input; nothing is kept as a view of a larger tensor (v of fused qkv, the gates' inputs of
the block input); the value embeddings' rows are looked up again, not kept."""
import functools
import operator

import pytest
import torch
import torch.nn.functional as F
from torch._functorch.aot_autograd import aot_module_simplified
from torch._functorch.partitioners import min_cut_rematerialization_partition

from fastsft import attention
from fastsft.model import GPT, GPTConfig, scaled_norm

_VIEWS = {torch.ops.aten.view.default, torch.ops.aten.slice.Tensor, torch.ops.aten.split_with_sizes.default,
          torch.ops.aten.split.Tensor, torch.ops.aten._unsafe_view.default}


@pytest.mark.parametrize("scale", [1.0, 1.2])
def test_scaled_norm_matches_rms_norm_and_gradcheck(scale):
    x = torch.randn(7, 3, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 3
    assert torch.allclose(scaled_norm(x, scale), F.rms_norm(x, (10,)) * scale, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda t: scaled_norm(t, scale), (x.requires_grad_(),))


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("size", [1.0, 0.05, 0.003])
def test_scaled_norm_bf16_has_norms_bits_and_its_gradient(size, autocast):
    """Small rows too: there rms_norm's eps (fp32's, the dtype it computes in, for 16-bit input) is what matters."""
    x = torch.randn(33, 5, 128, generator=torch.Generator().manual_seed(1)) * size
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).bfloat16()
    xb, xr = x.bfloat16().requires_grad_(), x.bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = scaled_norm(xb, 1.2)
        ref = F.rms_norm(xr, (128,)) * 1.2  # the model's formula before
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref.to(out.dtype))  # bit for bit
    out.backward(grad)
    xf = xb.detach().float().requires_grad_()
    (F.rms_norm(xf, (128,)) * 1.2).backward(grad.float())  # the same math in fp32, torch's default eps
    rel = (xb.grad.float() - xf.grad).norm() / xf.grad.norm()
    assert rel < 1e-2, rel


def test_scaled_norm_keeps_nothing_without_gradients():
    x = torch.randn(4, 2, 16)
    with torch.no_grad():
        assert torch.equal(scaled_norm(x, 1.2), F.rms_norm(x, (16,)) * 1.2)
    assert scaled_norm(x, 1.2).grad_fn is None  # x needs no gradient: the plain path


@pytest.fixture
def shape_only_attention(monkeypatch):
    """A custom-op attention backend on the CPU whose kernels only return the right shapes: the partition, not the
    values, is under test, and the op keeps what flash-attn-4's does (q, k, v, out, lse)."""
    kernels = attention.OpKernels(lambda q, k, v, cu, m, w: (q.clone(), q.new_zeros(q.shape[1], q.shape[0])),
                                  lambda do, q, k, v, o, lse, cu, m, w: (do.clone(), k.clone(), v.clone()),
                                  device_types=("cpu",), half_only=False)
    attention.register_op_kernels("shape_only", kernels)
    monkeypatch.setattr(attention, "_forced_backend", "shape_only")
    attention.select_backend("cpu")  # decided before compiling, as the driver does
    yield
    attention.register_op_kernels("shape_only", None)


def _saved_by_compiled_step(model, *args, **kwargs):
    """The forward graph's saved tensors as the partitioner inductor uses chooses them."""
    saved = []

    def forward_compiler(gm, _inputs):
        outputs = next(n for n in gm.graph.nodes if n.op == "output").args[0]
        saved.extend(o for o in outputs if isinstance(getattr(o, "meta", {}).get("val"), torch.Tensor))
        return gm

    def backend(gm, example_inputs):
        partition = functools.partial(min_cut_rematerialization_partition, compiler="inductor")
        return aot_module_simplified(gm, example_inputs, fw_compiler=forward_compiler,
                                     bw_compiler=lambda g, _i: g, partition_fn=partition)

    torch._dynamo.reset()
    torch.compile(model, backend=backend, fullgraph=True)(*args, **kwargs)
    return saved


def _viewed(node):
    """The node whose storage a saved node views (itself where it is no view)."""
    while node.op == "call_function" and (node.target in _VIEWS or (
            node.target is operator.getitem and node.args[0].target in _VIEWS)):  # a split's piece, not an output
        node = node.args[0]
    return node


def _numel(node):
    val = node.meta.get("val")
    return val.numel() if isinstance(val, torch.Tensor) else sum(v.numel() for v in val)


@pytest.mark.parametrize("fp8", [True, False])
def test_compiled_step_keeps_four_head_tensors_a_layer(shape_only_attention, fp8):
    torch.manual_seed(0)
    layers, heads, head_dim, n = 2, 2, 128, 256
    cfg = GPTConfig(n_layer=layers, n_embd=heads * head_dim, n_head=heads, n_kv_head=heads, vocab_size=512,
                    sequence_len=128)
    model = GPT(cfg)
    model.init_weights()
    model.set_fp8(fp8)
    idx = torch.randint(0, 500, (n,))
    cu = torch.tensor([0, 100, 128, 200, n, n], dtype=torch.int32)
    # the blocks to the logits (the loss is a graph of its own: GPT.supervised_loss)
    saved = _saved_by_compiled_step(model, idx, position_ids=torch.arange(n) % 128, cu_seqlens=cu,
                                    max_seqlen=128)
    head_shaped = [s for s in saved if tuple(s.meta["val"].shape) == (n, heads, head_dim)]
    # q and k (normed), v and attention's output: nothing else of a head's shape per layer
    assert len(head_shaped) == 4 * layers, [s.name for s in head_shaped]
    # a saved view keeps all of what it views: fused qkv behind v, the block input behind the gates' slices
    holders = [f"{s.name} of {_viewed(s).name}" for s in saved
               if _viewed(s).op != "placeholder" and _numel(_viewed(s)) > _numel(s)]
    assert not holders, f"saved as views of larger tensors: {holders}"
    # the value embeddings' rows are looked up again in the backward; only the token embedding's are kept
    lookups = [s.name for s in saved if s.target == torch.ops.aten.embedding.default]
    assert len(lookups) == 1, lookups


def test_value_embed_mix_gradients_equal_autograds():
    from fastsft.model import _ValueEmbedMix

    gen = torch.Generator().manual_seed(3)
    idx = torch.tensor([[4, 1, 4, 0, 6], [1, 1, 2, 6, 3]])  # repeats: the table's gradient accumulates
    v = torch.randn(2, 5, 3, 4, dtype=torch.float64, generator=gen).requires_grad_()
    gate = torch.rand(2, 5, 3, dtype=torch.float64, generator=gen).requires_grad_()
    table = torch.randn(7, 12, dtype=torch.float64, generator=gen).requires_grad_()
    assert torch.autograd.gradcheck(lambda *t: _ValueEmbedMix.apply(*t, idx), (v, gate, table))
    assert torch.autograd.gradcheck(lambda t: _ValueEmbedMix.apply(v.detach(), gate.detach(), t, idx), (table,))
    grad = torch.randn(2, 5, 3, 4, dtype=torch.float64, generator=gen)
    mine = torch.autograd.grad(_ValueEmbedMix.apply(v, gate, table, idx), (v, gate, table), grad)
    plain = torch.autograd.grad(v + gate.unsqueeze(-1) * F.embedding(idx, table).view_as(v), (v, gate, table), grad)
    for a, b in zip(mine, plain):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)
