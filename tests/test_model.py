"""The GPT: nanochat's own logits and loss, packed batches against one-conversation-at-a-time, the packed loss and
its gradients, KV-cache decoding, and input validation."""

import pytest
import torch
import torch.nn.functional as F

from fastsft.checkpoint import load_nanochat
from fastsft.model import GPT, GPTConfig, KVCache, segment_starts
from helpers import random_model

# Tolerances of the fixtures' README: the seed era cached RoPE cos/sin in bf16, we compute them in fp32.
FIXTURE_TOLERANCE = {"seed": 1e-2, "master": 1e-4}


def tiny_config(**overrides):
    base = dict(sequence_len=64, vocab_size=97, n_layer=4, n_head=4, n_kv_head=2, n_embd=64, short_window=5,
                window_pattern="SL")
    return GPTConfig(**{**base, **overrides})


def pack(conversations, row_len, pad_entries=3):
    """Pack by hand: conversations back to back in rows, each row's free tail one padding segment."""
    rows, row, bounds, placement = [], [], [0], []
    for conv in conversations:
        if len(row) + len(conv) > row_len:
            rows.append(row)
            row = []
        placement.append((len(rows), len(row)))
        row += conv.tolist()
    rows.append(row)
    input_ids, position_ids = [], []
    total = 0
    for r in rows:
        pos = []
        for (ri, off), conv in zip(placement, conversations):
            if ri == len(input_ids):
                pos += list(range(len(conv)))
                bounds.append(total + off + len(conv))
        pad = row_len - len(r)
        if pad:
            pos += list(range(pad))
            bounds.append(total + row_len)
        input_ids.append(r + [0] * pad)
        position_ids.append(pos)
        total += row_len
    bounds += [bounds[-1]] * pad_entries
    return (torch.tensor(input_ids), torch.tensor(position_ids), torch.tensor(bounds, dtype=torch.int32), placement)


def random_conversations(lengths, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g) for n in lengths]


# ---------------------------------------------------------------------------------------------------------------
# nanochat's fixtures


@pytest.fixture(scope="module", params=["seed", "master"])
def fixture(request, shared_data):
    era = request.param
    folder = shared_data / "nanochat" / era
    return era, load_nanochat(folder), torch.load(folder / "expected.pt", weights_only=True)


def test_fixture_logits_and_loss(fixture):
    era, model, expected = fixture
    idx, targets = expected["idx"], expected["targets"]
    with torch.no_grad():
        logits = model(idx)
        assert logits.dtype == torch.float32 and logits.shape == expected["logits"].shape
        assert (logits - expected["logits"]).abs().max().item() < FIXTURE_TOLERANCE[era]
        mean_loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)
        torch.testing.assert_close(mean_loss, expected["loss"], atol=FIXTURE_TOLERANCE[era], rtol=0)
    # The packed loss path (supervised rows only, with gradients as in training), on the rows as one stream.
    with torch.enable_grad():
        T = idx.shape[1]
        cu = torch.tensor([0, T, 2 * T, 2 * T, 2 * T], dtype=torch.int32)
        pos = torch.arange(T).repeat(2)
        loss_sum, n = model(idx.flatten(), targets.flatten(), position_ids=pos, cu_seqlens=cu, max_seqlen=T)
        assert int(n) == int((targets != -1).sum())
        torch.testing.assert_close(loss_sum / n, expected["loss"], atol=FIXTURE_TOLERANCE[era], rtol=0)


def test_fixture_master_is_the_2026_architecture(fixture):
    era, model, _ = fixture
    cfg = model.config
    if era == "master":
        assert cfg.value_embeds and cfg.smear and cfg.backout and cfg.resid_lambdas and cfg.rope_base == 100000
        assert model.window_sizes == [128, 128, 128, 512]
    else:
        assert not (cfg.value_embeds or cfg.smear or cfg.backout or cfg.resid_lambdas) and cfg.rope_base == 10000


# ---------------------------------------------------------------------------------------------------------------
# Packed batches equal one conversation at a time


PACK_CASES = {
    "full_attention": dict(window_pattern="L"),
    "sliding_windows": dict(window_pattern="SSL", short_window=4),
    "seed_era": dict(rope_base=10000.0, value_embeds=False, resid_lambdas=False, smear=False, backout=False,
                     qk_scale=False, window_pattern="L", pad_vocab_to=1),
}


@pytest.mark.parametrize("case", sorted(PACK_CASES))
def test_packed_logits_equal_each_conversation_alone(case):
    config = tiny_config(**PACK_CASES[case])
    model = random_model(config, seed=1)
    g = torch.Generator().manual_seed(len(case))
    lengths = [1, 31] + torch.randint(2, 30, (6,), generator=g).tolist()  # a one-token and a full-row conversation
    conversations = random_conversations(lengths, config.vocab_size, seed=2)
    input_ids, position_ids, cu, placement = pack(conversations, row_len=31)
    with torch.no_grad():
        packed = model(input_ids, position_ids=position_ids, cu_seqlens=cu)  # (rows, T, V)
        for conv, (row, off) in zip(conversations, placement):
            alone = model(conv[None])[0]
            torch.testing.assert_close(packed[row, off:off + len(conv)], alone, atol=2e-5, rtol=2e-5)


def test_packed_rows_and_flat_stream_agree_and_padding_entries_change_nothing():
    config = tiny_config()
    model = random_model(config, seed=3)
    conversations = random_conversations([9, 15, 4, 11], config.vocab_size, seed=4)
    input_ids, position_ids, cu, _ = pack(conversations, row_len=20, pad_entries=0)
    with torch.no_grad():
        rows = model(input_ids, position_ids=position_ids, cu_seqlens=cu)
        cu_padded = torch.cat([cu, cu[-1:].repeat(6)])
        flat = model.forward_packed(input_ids.flatten(), position_ids.flatten(), cu_padded, max_seqlen=20)
    assert torch.equal(rows.flatten(0, 1), flat)


def test_segment_starts_ignore_padding_entries():
    cu = torch.tensor([0, 3, 3, 7, 10, 10, 10], dtype=torch.int32)
    starts = segment_starts(cu, 10)
    assert starts.tolist() == [i in (0, 3, 7) for i in range(10)]


def supervised_targets(conv, seed):
    """Next-token targets with a random supervision mask; the last token predicts nothing."""
    g = torch.Generator().manual_seed(seed)
    targets = torch.cat([conv[1:], torch.tensor([-1])])
    keep = torch.rand(len(conv), generator=g) < 0.6
    return torch.where(keep, targets, torch.full_like(targets, -1))


def test_packed_loss_and_gradients_equal_sum_over_conversations():
    config = tiny_config(window_pattern="SL", short_window=6)
    model = random_model(config, seed=5).train()
    conversations = random_conversations([12, 19, 3, 25, 8], config.vocab_size, seed=6)
    targets = [supervised_targets(c, seed=i) for i, c in enumerate(conversations)]
    input_ids, position_ids, cu, placement = pack(conversations, row_len=27)
    packed_targets = torch.full_like(input_ids, -1)
    for t, (row, off) in zip(targets, placement):
        packed_targets[row, off:off + len(t)] = t

    loss_sum, n = model(input_ids, packed_targets, position_ids=position_ids, cu_seqlens=cu)
    loss_sum.backward()
    packed_grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()

    ref_sum, ref_n = 0.0, 0
    for conv, t in zip(conversations, targets):
        logits = model(conv[None])[0]
        ref_sum = ref_sum + F.cross_entropy(logits, t, ignore_index=-1, reduction="sum")
        ref_n += int((t != -1).sum())
    ref_sum.backward()
    assert int(n) == ref_n
    torch.testing.assert_close(loss_sum, ref_sum, atol=1e-4, rtol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(packed_grads[name], p.grad, atol=1e-4, rtol=1e-4, msg=name)


def test_packer_batch_loss_equals_sum_over_conversations():
    """fastsft.packing.pack_rows's layout (targets, positions, padding segments, fixed cu_seqlens) end to end."""
    import numpy as np

    from fastsft.packing import pack_rows

    config = tiny_config(window_pattern="SL", short_window=7)
    model = random_model(config, seed=11)
    rng = np.random.default_rng(12)
    rendered = []
    for length in (14, 3, 22, 9, 17, 30):
        rendered.append((rng.integers(0, config.vocab_size, length).astype(np.int32),
                         (rng.random(length) < 0.6).astype(np.uint8)))
    batch = pack_rows(rendered, seq_len=24, max_seqs=16)  # the 30-token conversation is truncated to the row
    t = {k: torch.from_numpy(getattr(batch, k)) for k in ("input_ids", "targets", "position_ids", "cu_seqlens")}
    with torch.no_grad():
        loss_sum, n = model(t["input_ids"], t["targets"], position_ids=t["position_ids"],
                            cu_seqlens=t["cu_seqlens"], max_seqlen=batch.max_seqlen)
        ref_sum, ref_n = 0.0, 0
        for ids, mask in rendered:
            ids, mask = torch.from_numpy(ids[:24]).long(), torch.from_numpy(mask[:24])
            targets = torch.where(mask[1:] == 1, ids[1:], -1)
            logits = model(ids[None])[0, :-1]
            ref_sum += F.cross_entropy(logits, targets, ignore_index=-1, reduction="sum").item()
            ref_n += int((targets != -1).sum())
    assert int(n) == ref_n == batch.num_supervised
    assert abs(loss_sum.item() - ref_sum) < 1e-3


def test_training_loss_goes_through_the_fused_kernel(monkeypatch):
    """The packed loss hands the hidden rows, their targets and the unpadded lm_head to the fused kernel, which
    alone decides which rows meet lm_head (its own tests show ignored rows never reach a matmul)."""
    config = tiny_config()
    model = random_model(config, seed=7)
    seen = {}

    import fastsft.kernels

    real = fastsft.kernels.linear_cross_entropy

    def spy(hidden, weight, targets, softcap=None, layout="low_memory", num_supervised=None):
        seen.update(rows=hidden.shape[0], weight=tuple(weight.shape), softcap=softcap,
                    supervised=int((targets >= 0).sum()), layout=layout, known=num_supervised)
        return real(hidden, weight, targets, softcap, layout=layout, num_supervised=num_supervised)

    monkeypatch.setattr(fastsft.kernels, "linear_cross_entropy", spy)
    conversations = random_conversations([10, 14], config.vocab_size, seed=8)
    input_ids, position_ids, cu, _ = pack(conversations, row_len=24)
    targets = torch.full_like(input_ids, -1)
    targets[0, 2:7] = 5
    loss_sum, n = model(input_ids, targets, position_ids=position_ids, cu_seqlens=cu)
    assert seen == dict(rows=input_ids.numel(), weight=(97, 64), softcap=15.0, supervised=5, layout="low_memory",
                        known=None)
    assert int(n) == 5 and torch.isfinite(loss_sum)
    model.loss_layout = "fast"
    fast_sum, _ = model(input_ids, targets, position_ids=position_ids, cu_seqlens=cu)
    assert seen["layout"] == "fast"
    torch.testing.assert_close(fast_sum, loss_sum, rtol=1e-5, atol=1e-5)
    # the host's count (a CPU scalar, as DeviceBatch.model_inputs passes it) reaches the kernel as an int
    known_sum, _ = model(input_ids, targets, position_ids=position_ids, cu_seqlens=cu, num_supervised=torch.tensor(5))
    assert seen["known"] == 5
    torch.testing.assert_close(known_sum, fast_sum, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# KV cache


@pytest.mark.parametrize("prefill", [1, 6])
def test_kv_cache_decoding_matches_full_forward(prefill):
    config = tiny_config(window_pattern="SSL", short_window=5)
    model = random_model(config, seed=9)
    g = torch.Generator().manual_seed(10)
    idx = torch.randint(0, config.vocab_size, (3, 17), generator=g)
    with torch.no_grad():
        full = model(idx)
        cache = KVCache(config, batch_size=3, max_len=20)
        steps = [model(idx[:, :prefill], kv_cache=cache)]
        for t in range(prefill, 17, 4 if prefill > 1 else 1):  # chunks after a long prefill, tokens after a short
            end = min(t + (4 if prefill > 1 else 1), 17)
            steps.append(model(idx[:, t:end], kv_cache=cache))
    assert cache.pos == 17
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=2e-5, rtol=2e-5)


def test_kv_cache_prefill_once_then_repeat_for_several_continuations():
    config = tiny_config(window_pattern="SL", short_window=4)
    model = random_model(config, seed=13)
    g = torch.Generator().manual_seed(14)
    prompt = torch.randint(0, config.vocab_size, (1, 9), generator=g)
    continuations = torch.randint(0, config.vocab_size, (3, 5), generator=g)
    with torch.no_grad():
        cache = KVCache(config, batch_size=1, max_len=9)
        model(prompt, kv_cache=cache)
        many = cache.repeat(3, max_len=14)
        got = torch.cat([model(continuations[:, t:t + 1], kv_cache=many) for t in range(5)], dim=1)
        full = model(torch.cat([prompt.expand(3, -1), continuations], dim=1))[:, 9:]
    torch.testing.assert_close(got, full, atol=2e-5, rtol=2e-5)


def test_kv_cache_overflow_and_batch_mismatch_raise():
    config = tiny_config()
    model = random_model(config)
    cache = KVCache(config, batch_size=2, max_len=4)
    with pytest.raises(ValueError, match="overflow"):
        model(torch.zeros(2, 5, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="batch 2"):
        model(torch.zeros(3, 2, dtype=torch.long), kv_cache=cache)


# ---------------------------------------------------------------------------------------------------------------
# Configuration and input validation


def test_config_window_sizes_and_padding():
    cfg = GPTConfig(sequence_len=2000, vocab_size=65537, n_layer=6, window_pattern="SSSL")
    assert cfg.window_sizes() == [512, 512, 512, 2000, 512, 2000]  # 2000/4 rounded up to 128; last layer long
    assert cfg.padded_vocab_size == 65600
    model = GPT(tiny_config())
    assert model.lm_head.weight.shape[0] == 128 and model.transformer.wte.weight.shape[0] == 128
    assert sorted(model.value_embeds) == ["1", "3"]  # alternating, last layer included


def test_training_flops_count_useful_work_only():
    config = tiny_config(window_pattern="SL", short_window=3)  # windows 3, 64, 3, 64
    model = GPT(config)
    C, V = config.n_embd, config.vocab_size
    per_layer = C * C + 2 * C * (C // 2) + C * C + 8 * C * C  # c_q, c_k + c_v (2 kv heads of 16), c_proj, mlp
    gates = 2 * config.ve_gate_channels * config.n_kv_head + config.smear_channels
    pairs = 2 * (sum(min(i, 3) + 1 for i in range(10)) + sum(min(i, 3) + 1 for i in range(4)))
    pairs += 2 * (10 * 11 // 2 + 4 * 5 // 2)
    want = 6 * (4 * per_layer + gates) * 14 + 6 * V * C * 9 + 14 * config.n_head * config.head_dim * pairs
    assert model.training_flops([10, 4], num_supervised=9) == want


@pytest.mark.parametrize("bad, message", [
    (dict(n_head=5), "not divisible by n_head"),
    (dict(n_kv_head=3), "not divisible by n_kv_head"),
    (dict(window_pattern="SXL"), "window_pattern"),
    (dict(window_pattern=["S", "L"]), "window_pattern"),
    (dict(vocab_size=0), "vocab_size must be >= 1"),
    # JSON's near misses: a string for a bool, a bool for an int, a float for an int, a string for a number
    (dict(qk_scale="false"), r"qk_scale must be true or false, got 'false' \(str\)"),
    (dict(smear=1), r"smear must be true or false, got 1 \(int\)"),
    (dict(short_window=True), r"short_window must be an integer, got True \(bool\)"),
    (dict(n_layer=4.0), r"n_layer must be an integer, got 4.0 \(float\)"),
    (dict(n_embd="64"), "n_embd must be an integer"),
    (dict(short_window=-1), "short_window must be >= 0"),
    (dict(ve_gate_channels=0), "ve_gate_channels must be >= 1"),
    (dict(smear_channels=65), r"smear_channels=65 must be in 1..n_embd"),
    # values that reach the logits as NaN
    (dict(softcap=float("nan")), "softcap must be a finite number > 0, got nan"),
    (dict(softcap=0), "softcap must be a finite number > 0"),
    (dict(softcap="15"), "softcap must be a number"),
    (dict(softcap=True), "softcap must be a number"),
    (dict(rope_base=0), "rope_base must be a finite number > 0, got 0.0"),
    (dict(rope_base=float("inf")), "rope_base must be a finite number > 0"),
    (dict(rope_base=None), "rope_base must be a number"),
])
def test_bad_config_raises(bad, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**bad)
    with pytest.raises(ValueError, match=message):  # every way of building a config checks the same
        GPTConfig.from_dict({**tiny_config().to_dict(), **bad})


def test_config_from_dict_rejects_what_is_not_a_field_or_not_a_dict():
    with pytest.raises(ValueError, match="no fields"):
        GPTConfig.from_dict({**tiny_config().to_dict(), "n_experts": 8})
    with pytest.raises(ValueError, match="expected an object of fields, got list"):
        GPTConfig.from_dict([["n_layer", 4]])


def test_config_numbers_are_normalized():
    import numpy as np

    config = tiny_config(rope_base=10000, softcap=15, n_layer=np.int64(4), short_window=np.int32(5))
    assert type(config.rope_base) is float and type(config.softcap) is float
    assert type(config.n_layer) is int and type(config.short_window) is int
    assert GPTConfig.from_dict(config.to_dict()) == config == tiny_config(rope_base=1e4, softcap=15.0)


def test_bad_inputs_raise():
    model = random_model(tiny_config())
    idx = torch.zeros(2, 6, dtype=torch.long)
    cu = torch.tensor([0, 6, 12], dtype=torch.int32)
    pos = torch.arange(6).repeat(2, 1)
    with pytest.raises(TypeError, match="int64"):
        model(idx.int())
    with pytest.raises(ValueError, match="position_ids"):
        model(idx, position_ids=pos[:, :5], cu_seqlens=cu)
    with pytest.raises(ValueError, match="int32"):
        model(idx, position_ids=pos, cu_seqlens=cu.long())
    with pytest.raises(ValueError, match="needs position_ids"):
        model(idx, cu_seqlens=cu)
    with pytest.raises(ValueError, match="targets shape"):
        model(idx, idx[:, :3], position_ids=pos, cu_seqlens=cu)


def _mlp_saved_and_grads(recompute: bool, backend):
    """(number of (N, 4 x width) tensors kept for the backward, loss, gradients) of one compiled bf16 step."""
    config = GPTConfig(sequence_len=64, vocab_size=97, n_layer=2, n_head=2, n_kv_head=2, n_embd=32,
                       window_pattern="L")
    model = random_model(config, seed=3)
    model.set_recompute(mlp=recompute)
    step_model = model if backend is None else torch.compile(model, backend=backend, dynamic=False)
    ids = torch.randint(0, 97, (2, 64), generator=torch.Generator().manual_seed(4))
    targets = ids.roll(-1, 1)
    targets[:, :7] = -1
    wide = []

    def keep(x):
        if tuple(x.shape) == (128, 4 * 32):
            wide.append(x)
        return x

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda x: x), torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = step_model(ids, targets)
    loss.backward()
    return len(wide), loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("backend", [None, "aot_eager"])
def test_mlp_recompute_keeps_half_the_wide_activations_and_changes_nothing(backend):
    kept, loss, grads = _mlp_saved_and_grads(False, backend)
    kept_rc, loss_rc, grads_rc = _mlp_saved_and_grads(True, backend)
    if backend is not None:  # compiled: c_fc's output and relu^2's per layer, then c_fc's only
        assert (kept, kept_rc) == (4, 2)
    assert torch.equal(loss, loss_rc)
    for name, g in grads.items():
        assert torch.equal(g, grads_rc[name]), name
