"""The GPT of nanochat (both eras), run on packed conversations, with a KV cache for generation.

Parameter names follow nanochat exactly (transformer.wte, transformer.h.{i}.attn.c_q, ..., lm_head, resid_lambdas,
x0_lambdas, smear_gate, smear_lambda, backout_lambda, value_embeds.{i}, transformer.h.{i}.attn.ve_gate), so
nanochat's state_dicts load by name. GPTConfig switches the 2026 features on or off; `GPTConfig.seed_era()` is the
Nov 2025 architecture, the defaults are the 2026 one.

One forward, three ways to call it (see GPT.forward):
- model(idx): idx (B, T), each row one sequence -> fp32 logits (B, T, vocab), softcapped.
- model(input_ids, targets, position_ids=..., cu_seqlens=...): the packer's batch. Attention stays inside each
  conversation (fastsft.attention), RoPE positions come from position_ids, and the loss gathers the supervised
  rows only and calls fastsft.kernels.linear_cross_entropy -> (loss_sum, n_supervised); no (N, vocab) logits.
  Without targets it returns the logits of every token instead.
- model(idx, kv_cache=cache): generation; appends idx (B, T) after what the cache holds -> logits (B, T, vocab).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastsft import fp8 as fp8_matmul
from fastsft.attention import attention_pairs, varlen_attention

logger = logging.getLogger(__name__)

# nanochat (2026) mixes value embeddings into v with a gate in (0, VE_GATE_SCALE), and scales q and k by
# QK_SCALE after their norm (sharper attention); both are checked against nanochat's own logits in the tests.
VE_GATE_SCALE = 3.0
QK_SCALE = 1.2


@dataclass
class GPTConfig:
    """Shape and architecture switches. Defaults: nanochat's 2026 architecture at d12."""

    sequence_len: int = 2048
    vocab_size: int = 32768
    n_layer: int = 12
    n_head: int = 6
    n_kv_head: int = 6
    n_embd: int = 768
    rope_base: float = 100000.0
    softcap: float | None = 15.0
    value_embeds: bool = True  # value embeddings on alternating layers (last one included) with ve_gate
    ve_gate_channels: int = 12  # the gate reads this many leading channels of the block input
    resid_lambdas: bool = True  # per-layer resid_lambdas and x0_lambdas
    smear: bool = True  # smear_gate / smear_lambda: mix the previous token's embedding in
    smear_channels: int = 24
    backout: bool = True  # subtract backout_lambda * (residual after layer n_layer // 2) before the final norm
    qk_scale: bool = True  # multiply q and k by QK_SCALE after the q/k norm
    window_pattern: str = "SSSL"  # tiled over layers, last layer always L; L = sequence_len, S = short_window
    short_window: int | None = None  # None: nanochat's rule, sequence_len / 4 rounded up to a multiple of 128
    pad_vocab_to: int = 64  # wte / lm_head rows rounded up to a multiple of this (logits are cropped)

    def __post_init__(self):
        # Strict types and ranges: configs come from JSON files and overrides, where "false" must not pass as True,
        # true must not pass as 1, and a NaN softcap or a rope base of 0 must not reach the logits as NaN. Every
        # message names the field (checkpoint.load adds the file). Numbers are normalized to int / float.
        for name in ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "pad_vocab_to",
                     "ve_gate_channels", "smear_channels"):
            setattr(self, name, self._checked_int(name, minimum=1))
        if self.short_window is not None:  # None: nanochat's rule (window_sizes)
            self.short_window = self._checked_int("short_window", minimum=0)
        for name in ("value_embeds", "resid_lambdas", "smear", "backout", "qk_scale"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ValueError(f"GPTConfig.{name} must be true or false, got {value!r} ({type(value).__name__})")
        self.rope_base = self._checked_positive_float("rope_base")
        if self.softcap is not None:  # None: no softcap
            self.softcap = self._checked_positive_float("softcap")
        if (not isinstance(self.window_pattern, str) or not self.window_pattern
                or any(c not in "SL" for c in self.window_pattern.upper())):
            raise ValueError(f"GPTConfig.window_pattern must be a non-empty string of S and L, "
                             f"got {self.window_pattern!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig: n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"GPTConfig: n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}")
        if self.head_dim % 2:
            raise ValueError(f"GPTConfig: head_dim={self.head_dim} must be even for rotary embeddings")
        if self.value_embeds and not self.ve_gate_channels <= self.n_embd:
            raise ValueError(f"GPTConfig.ve_gate_channels={self.ve_gate_channels} must be in 1..n_embd")
        if self.smear and not self.smear_channels <= self.n_embd:
            raise ValueError(f"GPTConfig.smear_channels={self.smear_channels} must be in 1..n_embd")

    def _checked_int(self, name: str, minimum: int) -> int:
        value = getattr(self, name)
        # An integer is anything with __index__ (numpy ints too) except a bool; 12.0 and "12" are not.
        if isinstance(value, bool) or not hasattr(type(value), "__index__"):
            raise ValueError(f"GPTConfig.{name} must be an integer, got {value!r} ({type(value).__name__})")
        value = value.__index__()
        if value < minimum:
            raise ValueError(f"GPTConfig.{name} must be >= {minimum}, got {value}")
        return value

    def _checked_positive_float(self, name: str) -> float:
        value = getattr(self, name)
        if isinstance(value, (bool, str, bytes)) or not hasattr(type(value), "__float__"):
            raise ValueError(f"GPTConfig.{name} must be a number, got {value!r} ({type(value).__name__})")
        value = float(value)
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"GPTConfig.{name} must be a finite number > 0, got {value}")
        return value

    @classmethod
    def seed_era(cls, **overrides) -> GPTConfig:
        """nanochat of Nov 2025: plain pre-norm blocks, RoPE base 10000, full causal attention, no padding."""
        base = dict(rope_base=10000.0, value_embeds=False, resid_lambdas=False, smear=False, backout=False,
                    qk_scale=False, window_pattern="L", pad_vocab_to=1)
        return cls(**{**base, **overrides})

    @classmethod
    def from_name(cls, name: str, **overrides) -> GPTConfig:
        """nanochat master's shape for depth "d<L>" ("d12", "d20", ...): n_embd = 64 * L rounded up to a multiple
        of 128, heads of 128 (as many kv heads), vocab 32768, sequence_len 2048. The one place bench scripts and
        the driver take model shapes from."""
        depth = name[1:] if isinstance(name, str) and name[:1] == "d" else ""
        if not depth.isdigit() or int(depth) < 1:
            raise ValueError(f"GPTConfig.from_name: expected 'd<depth>' such as 'd12' or 'd20', got {name!r}")
        n_layer = int(depth)
        n_embd = -(-n_layer * 64 // 128) * 128
        base = dict(sequence_len=2048, vocab_size=32768, n_layer=n_layer, n_embd=n_embd, n_head=n_embd // 128,
                    n_kv_head=n_embd // 128)
        return cls(**{**base, **overrides})

    @classmethod
    def from_dict(cls, data: dict) -> GPTConfig:
        if not isinstance(data, dict):
            raise ValueError(f"GPTConfig.from_dict: expected an object of fields, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"GPTConfig has no fields {unknown}; known fields: {sorted(known)}")
        return cls(**data)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // self.pad_vocab_to) * self.pad_vocab_to

    def window_sizes(self) -> list[int]:
        """Left attention window per layer, as nanochat: L = sequence_len, S = sequence_len/4 rounded up to 128."""
        long_window = self.sequence_len
        short_window = self.short_window
        if short_window is None:
            short_window = -(-self.sequence_len // 4 // 128) * 128
        pattern = self.window_pattern.upper()
        sizes = [long_window if pattern[i % len(pattern)] == "L" else short_window for i in range(self.n_layer)]
        sizes[-1] = long_window
        return sizes

    def has_value_embed(self, layer_idx: int) -> bool:
        return self.value_embeds and layer_idx % 2 == (self.n_layer - 1) % 2


def norm(x: torch.Tensor) -> torch.Tensor:
    """Parameter-free RMSNorm over the last dim."""
    return F.rms_norm(x, (x.size(-1),))


class _ScaledNormKeepingOutput(torch.autograd.Function):
    """scale * norm(x) in x's dtype, the backward reading the output and 1/rms instead of x. Attention keeps normed
    q and k for its own backward anyway, so the unnormed, rotated ones (two (N, H, D) tensors a layer, 3.1 GiB at
    d20) are no longer kept: the backward recovers y = out / scale and takes dx = rstd * (dy - y * mean(dy * y)).
    The forward is norm's, autocast included (CUDA's runs rms_norm in fp32, so 16-bit q and k are rounded once, where
    attention casts them), so the output has the bits it had; in 16 bits the backward's y carries that rounding (as
    attention's own backward does)."""

    @staticmethod
    def forward(ctx, x, scale):
        out, rstd = _scaled_norm_and_rstd(x, scale)
        ctx.save_for_backward(out, rstd)
        ctx.scale = scale
        # A view, not out itself: torch 2.11's dynamo sends the gradient of an output the Function also saves to
        # the wrong slot, so the compiled backward got zeros for q and k (pytorch issue 180642; the view is a
        # tensor of its own, the storage the same)
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        from fastsft.kernels.qkv_grad import scaled_norm_backward  # beside the fp8 path's kernel, its reference

        out, rstd = ctx.saved_tensors
        return scaled_norm_backward(grad, out, rstd, ctx.scale).to(grad.dtype), None


def _scaled_norm_and_rstd(x: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """scale * norm(x) in x's dtype (norm's own forward, so autocast's too), and the 1/rms its backward reads."""
    y = norm(x)
    xf = x.to(torch.promote_types(y.dtype, torch.float32))  # the dtype rms_norm computes in, at least fp32
    rstd = torch.rsqrt(xf.square().mean(-1, keepdim=True) + torch.finfo(xf.dtype).eps)  # and its eps
    return (y * scale).to(x.dtype), rstd


def _rotated_normed(qkv, cos, sin, n_head, n_kv_head, scale):
    """q (N, H, D), k and v (N, Hkv, D) from qkv (N, (H + 2 Hkv) D): q and k are scaled_norm(apply_rotary(.)) of
    their columns, to the bit, and v its columns copied out (a view would keep all of qkv alive for attention's
    backward). Also returns what scaled_norm and rotary saved for the backward (kernels/qkv_grad.py): normed q and k,
    their 1/rms, cos and sin."""
    N, head_dim = qkv.shape[0], qkv.shape[1] // (n_head + 2 * n_kv_head)
    q, k, v = qkv.split([n_head * head_dim, n_kv_head * head_dim, n_kv_head * head_dim], dim=-1)
    # cos and sin in qkv's dtype, saved as autograd saved them for rotary's backward, and whole (not a view): so
    # inductor stores them rounded before rotary reads them, as before (a cast fused into rotary is elided, and q
    # and k would get other bits)
    cos, sin = cos.to(qkv.dtype), sin.to(qkv.dtype)
    q, q_rstd = _scaled_norm_and_rstd(apply_rotary(q.view(N, n_head, head_dim), cos, sin), scale)
    k, k_rstd = _scaled_norm_and_rstd(apply_rotary(k.view(N, n_kv_head, head_dim), cos, sin), scale)
    return q, k, v.contiguous().view(N, n_kv_head, head_dim), (q, k, q_rstd, k_rstd, cos, sin)


class _QKVProjection(torch.autograd.Function):
    """The fp8 path's q (N, H, D), k and v (N, Hkv, D) from the block input x (N, C) and c_q's, c_k's and c_v's
    weights concatenated: qkv = x @ w.T as one fp8 matmul (x quantized once, one scale for the three), then
    `_rotated_normed`. It saves what the fp8 matmul saves (x transposed in fp8, the fp8 weight) and what
    scaled_norm and rotary saved, not qkv. The backward: one kernel writing dqkv whole and folding its max |.| as it
    goes (kernels/qkv_grad.py; autograd's was the norm's backward, its mean(dy * y) and the concatenation of dq, dk
    and dv, each a pass), one kernel casting dqkv to e5m2 in both layouts from that maximum
    (kernels/fp8_relu_square_grad.py; inductor took a pass for the maximum and one for the cast), then the two fp8
    matmuls of dx and dW. 2.4 ms a d12 step and 1.9 at d20 against fp8.linear with the same unit after it
    (bench/RESULTS.md, run 15)."""

    @staticmethod
    def forward(ctx, x, weight, cos, sin, n_head, n_kv_head, scale, out_dtype):
        # x (N, C), cos and sin (N, 1, D/2): the fp8 path runs only with gradients, so on the packed rows
        qkv, kept = fp8_matmul.linear_forward(x, weight, out_dtype)  # (N, (H + 2 Hkv) D)
        q, k, v, saved = _rotated_normed(qkv, cos, sin, n_head, n_kv_head, scale)
        ctx.save_for_backward(*kept, *saved)
        ctx.scale, ctx.dtypes = scale, (x.dtype, weight.dtype)
        # views of q and k, not themselves: torch 2.11's dynamo drops the gradient of an output also saved (see
        # _ScaledNormKeepingOutput)
        return q.view_as(q), k.view_as(k), v

    @staticmethod
    def backward(ctx, dq, dk, dv):
        from fastsft.kernels.fp8_relu_square_grad import quantize_two_layouts
        from fastsft.kernels.qkv_grad import qkv_grad

        *kept, q, k, q_rstd, k_rstd, cos, sin = ctx.saved_tensors
        dqkv, slots = qkv_grad(dq.contiguous(), dk.contiguous(), dv.contiguous(), q, k, q_rstd, k_rstd, cos, sin,
                               ctx.scale, maxima=True)
        g_q, g_qt, g_inv = quantize_two_layouts(dqkv, slots, fp8_matmul.E5M2)
        dx, dw = fp8_matmul.linear_grads(g_q, g_qt, g_inv, kept, *ctx.dtypes)
        return dx, dw, None, None, None, None, None, None


class _ValueEmbedMix(torch.autograd.Function):
    """v + gate * table[idx] (v (..., Hkv, D), gate (..., Hkv)), keeping idx rather than the rows looked up: the
    backward looks them up again, one gather, where autograd would keep an (N, Hkv * D) tensor per value-embedding
    layer (0.8 GiB at d20) for the gate's gradient."""

    @staticmethod
    def forward(ctx, v, gate, table, idx):
        ctx.save_for_backward(gate, table, idx)
        ctx.v_dtype = v.dtype
        return v + gate.unsqueeze(-1) * F.embedding(idx, table).view_as(v).to(v.dtype)

    @staticmethod
    def backward(ctx, grad):
        gate, table, idx = ctx.saved_tensors
        d_gate = d_table = None
        if ctx.needs_input_grad[1]:
            # index_select, not embedding: the compiled graph would merge a second embedding with the forward's,
            # and keep its output after all
            ve = table.index_select(0, idx.reshape(-1)).view_as(grad).to(ctx.v_dtype)
            d_gate = (grad * ve).sum(-1)
        if ctx.needs_input_grad[2]:
            d_rows = (grad * gate.unsqueeze(-1)).reshape(-1, table.shape[1]).to(table.dtype)
            d_table = torch.ops.aten.embedding_dense_backward(d_rows, idx.reshape(-1), table.shape[0], -1, False)
        return grad, d_gate, d_table, None


def scaled_norm(x: torch.Tensor, scale: float) -> torch.Tensor:
    """scale * norm(x) in x's dtype, keeping its output (not x) for the backward."""
    if not (torch.is_grad_enabled() and x.requires_grad):  # generation, evaluation: no 1/rms to keep
        return (norm(x) * scale).to(x.dtype)
    return _ScaledNormKeepingOutput.apply(x, scale)


def gate_input(x: torch.Tensor, channels: int) -> torch.Tensor:
    """x's first channels as a tensor of their own, for a gate's matmul: as a slice, the matmul's backward would
    keep all of x alive (an (N, width) tensor a layer)."""
    return x[..., :channels].contiguous()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of the head dim as nanochat does (by -theta). x (..., H, D); cos/sin (..., 1, D/2)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


def rotary_tables(length: int, head_dim: int, base: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (length, head_dim/2) in fp32 (nanochat's seed era kept them in bf16; we do not)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    freqs = torch.outer(torch.arange(length, dtype=torch.float32, device=device), inv_freq)
    return freqs.cos(), freqs.sin()


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.qk_scale = config.qk_scale
        C, kv_dim = config.n_embd, config.n_kv_head * config.head_dim
        self.c_q = nn.Linear(C, C, bias=False)
        self.c_k = nn.Linear(C, kv_dim, bias=False)
        self.c_v = nn.Linear(C, kv_dim, bias=False)
        self.c_proj = nn.Linear(C, C, bias=False)
        self.ve_gate_channels = config.ve_gate_channels
        self.ve_gate = (nn.Linear(config.ve_gate_channels, config.n_kv_head, bias=False)
                        if config.has_value_embed(layer_idx) else None)
        self.fp8 = False  # GPT.set_fp8

    def forward(self, x, ve, cos, sin, window, attend):
        # x (..., C) with ... = (N,) packed or (B, T) cached; ve: the layer's value embedding (table, idx) or None
        lead = x.shape[:-1]
        q, k, v = self._qkv(x, cos, sin)  # (..., H, D), (..., Hkv, D), (..., Hkv, D); q and k rotated and normed
        if ve is not None:
            gate = VE_GATE_SCALE * torch.sigmoid(self.ve_gate(gate_input(x, self.ve_gate_channels)))
            v = _ValueEmbedMix.apply(v, gate, *ve)
        y = attend(q, k, v, window, self.layer_idx)  # (..., H, D)
        return fp8_matmul.linear(y.reshape(*lead, -1), self.c_proj.weight, self.fp8)

    def _qkv(self, x, cos, sin):
        scale = QK_SCALE if self.qk_scale else 1.0
        weights = (self.c_q.weight, self.c_k.weight, self.c_v.weight)
        if self.fp8 and fp8_matmul.applies(x, *weights):
            # one fp8 matmul: x quantized once, one scale for the three, and one kernel for its gradient. bf16 keeps
            # three: there the backward's concatenation of dq, dk and dv cost more than the wide matmul saved
            # (bench/RESULTS.md, run 6).
            return _QKVProjection.apply(x, torch.cat(weights), cos, sin, self.n_head, self.n_kv_head, scale,
                                        fp8_matmul.output_dtype(x))
        lead = x.shape[:-1]
        q = self.c_q(x).view(*lead, self.n_head, self.head_dim)
        k = self.c_k(x).view(*lead, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(*lead, self.n_kv_head, self.head_dim)
        return scaled_norm(apply_rotary(q, cos, sin), scale), scaled_norm(apply_rotary(k, cos, sin), scale), v


def _keep_widening_matmul(ctx, op, *args, **kwargs):
    """Selective-recompute policy of MLP.recompute_square: keep the output of the matmul that widens (c_fc's, the
    only one the backward needs) and recompute the rest, relu(h)^2 being the one that matters: kept, it is a second
    (N, 4 x width) tensor per layer beside c_fc's output; recomputed, one elementwise pass in the backward."""
    from torch.utils.checkpoint import CheckpointPolicy

    if op is torch.ops.aten.mm.default and args[1].shape[-1] > args[0].shape[-1]:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)
        self.recompute_square = False  # GPT.set_recompute
        self.fp8 = False  # GPT.set_fp8

    def forward(self, x):
        if self.fp8 and fp8_matmul.applies(x, self.c_fc.weight, self.c_proj.weight):
            return fp8_matmul.relu_square_mlp(x, self.c_fc.weight, self.c_proj.weight)  # keeps fp8 relu^2 itself
        if self.recompute_square and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

            contexts = functools.partial(create_selective_checkpoint_contexts, _keep_widening_matmul)
            return checkpoint(self._forward, x, use_reentrant=False, context_fn=contexts)
        return self._forward(x)

    def _forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, ve, cos, sin, window, attend):
        x = x + self.attn(norm(x), ve, cos, sin, window, attend)
        return x + self.mlp(norm(x))


class KVCache:
    """Keys and values of every layer for a batch of sequences that all hold the same number of tokens.

    k, v: (n_layer, batch, max_len, n_kv_head, head_dim). `pos` counts the tokens cached so far (equal for every
    row: prompts of one batch must have the same length). `prev_embedding` (batch, 1, n_embd) keeps the last
    token's normalized embedding for the smear of the next one. The model writes each layer's new keys at
    [pos, pos + T) and advances `pos` after its last layer; sliding windows apply through the attention mask.
    Typical use: prefill a prompt into a one-row cache, `repeat(n)` it, then decode n samples one token a step.
    Generation runs without autograd.
    """

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        if batch_size < 1 or max_len < 1:
            raise ValueError(f"KVCache needs batch_size >= 1 and max_len >= 1, got {batch_size}, {max_len}")
        shape = (config.n_layer, batch_size, max_len, config.n_kv_head, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.batch_size, self.max_len = batch_size, max_len
        self.pos = 0
        self.prev_embedding: torch.Tensor | None = None

    def reset(self) -> None:
        self.pos = 0
        self.prev_embedding = None

    def repeat(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """A new cache of `batch_size` rows, each a copy of this one-row cache (prefill a prompt once, then sample
        several continuations); max_len defaults to this cache's."""
        if self.batch_size != 1:
            raise ValueError(f"KVCache.repeat copies a one-row cache, this one has {self.batch_size} rows")
        max_len = self.max_len if max_len is None else max_len
        if max_len < self.pos:
            raise ValueError(f"KVCache.repeat: max_len {max_len} < {self.pos} cached tokens")
        new = KVCache.__new__(KVCache)
        n_layer, _, _, n_kv_head, head_dim = self.k.shape
        shape = (n_layer, batch_size, max_len, n_kv_head, head_dim)
        new.k = self.k.new_zeros(shape)
        new.v = self.v.new_zeros(shape)
        new.k[:, :, : self.pos] = self.k[:, :, : self.pos]
        new.v[:, :, : self.pos] = self.v[:, :, : self.pos]
        new.batch_size, new.max_len, new.pos = batch_size, max_len, self.pos
        new.prev_embedding = None if self.prev_embedding is None else self.prev_embedding.expand(batch_size, -1, -1)
        return new

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
        """Store k, v (B, T, Hkv, D) of the new tokens and attend q (B, T, H, D) over everything cached."""
        T = q.shape[1]
        start, end = self.pos, self.pos + T
        self.k[layer, :, start:end] = k.to(self.k.dtype)
        self.v[layer, :, start:end] = v.to(self.v.dtype)
        keys = self.k[layer, :, :end].transpose(1, 2).to(q.dtype)  # (B, Hkv, end, D)
        values = self.v[layer, :, :end].transpose(1, 2).to(q.dtype)
        q_pos = torch.arange(start, end, device=q.device)[:, None]
        k_pos = torch.arange(end, device=q.device)[None, :]
        keep = k_pos <= q_pos
        if window >= 0:
            keep &= (q_pos - k_pos) <= window
        y = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=keep,
                                           enable_gqa=keys.shape[1] != q.shape[2])
        return y.transpose(1, 2)  # (B, T, H, D)


def segment_starts(cu_seqlens: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """(num_tokens,) bool, True at the first token of each segment; repeated (padding) entries add nothing."""
    marks = torch.zeros(num_tokens + 1, dtype=torch.int32, device=cu_seqlens.device)
    marks.index_add_(0, cu_seqlens.long().clamp(max=num_tokens), torch.ones_like(cu_seqlens))
    return marks[:num_tokens] > 0


class GPT(nn.Module):
    """nanochat's GPT over packed rows. `loss_layout` picks the fused loss kernel's layout, a run-time choice and
    not part of the architecture: "low_memory" (default, gradient-sized memory) or "fast" (fewer matmuls, a few
    hundred MiB more; see fastsft.kernels.linear_cross_entropy)."""

    def __init__(self, config: GPTConfig, loss_layout: str = "low_memory"):
        super().__init__()
        self.config = config
        self.loss_layout = loss_layout
        V, C, L = config.padded_vocab_size, config.n_embd, config.n_layer
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(V, C),
            "h": nn.ModuleList([Block(config, i) for i in range(L)]),
        })
        self.lm_head = nn.Linear(C, V, bias=False)
        if config.resid_lambdas:
            self.resid_lambdas = nn.Parameter(torch.ones(L))
            self.x0_lambdas = nn.Parameter(torch.zeros(L))
        if config.smear:
            self.smear_gate = nn.Linear(config.smear_channels, 1, bias=False)
            self.smear_lambda = nn.Parameter(torch.zeros(1))
        if config.backout:
            self.backout_lambda = nn.Parameter(0.2 * torch.ones(1))
        if config.value_embeds:
            kv_dim = config.n_kv_head * config.head_dim
            self.value_embeds = nn.ModuleDict(
                {str(i): nn.Embedding(V, kv_dim) for i in range(L) if config.has_value_embed(i)})
        self.window_sizes = config.window_sizes()
        self.backout_layer = L // 2
        # Positions beyond sequence_len are allowed for generation; 10x as nanochat.
        self.rotary_len = 10 * config.sequence_len
        cos, sin = rotary_tables(self.rotary_len, config.head_dim, config.rope_base, self.lm_head.weight.device)
        self.register_buffer("cos", cos, persistent=False)  # (rotary_len, D/2)
        self.register_buffer("sin", sin, persistent=False)

    # -- setup -----------------------------------------------------------------------------------------------------

    def set_recompute(self, mlp: bool) -> None:
        """mlp: every MLP keeps only c_fc's output for its backward and recomputes relu^2 (see MLP)."""
        for block in self.transformer.h:
            block.mlp.recompute_square = mlp

    def set_fp8(self, enabled: bool) -> None:
        """enabled: the blocks' projections train with fp8 matmuls (fastsft.fp8); evaluation stays in bf16."""
        for block in self.transformer.h:
            block.attn.fp8 = block.mlp.fp8 = enabled

    def init_rotary(self) -> None:
        """Recompute the rotary tables on the model's device (after building on the meta device)."""
        device = self.lm_head.weight.device
        self.cos, self.sin = rotary_tables(self.rotary_len, self.config.head_dim, self.config.rope_base, device)

    @torch.no_grad()
    def init_weights(self) -> None:
        """nanochat's 2026 init: embeddings N(0, 1), lm_head N(0, 0.001), matrices U(+-sqrt(3/C)), projections 0."""
        C = self.config.n_embd
        bound = math.sqrt(3.0 / C)
        nn.init.normal_(self.transformer.wte.weight, std=1.0)
        nn.init.normal_(self.lm_head.weight, std=0.001)
        for block in self.transformer.h:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                nn.init.uniform_(lin.weight, -bound, bound)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
            if block.attn.ve_gate is not None:
                nn.init.uniform_(block.attn.ve_gate.weight, 0.0, 0.02)
        if self.config.resid_lambdas:
            self.resid_lambdas.fill_(1.0)
            self.x0_lambdas.fill_(0.1)
        if self.config.smear:
            nn.init.uniform_(self.smear_gate.weight, 0.0, 0.02)
            self.smear_lambda.zero_()
        if self.config.backout:
            self.backout_lambda.fill_(0.2)
        if self.config.value_embeds:
            for emb in self.value_embeds.values():
                nn.init.uniform_(emb.weight, -bound, bound)
        self.init_rotary()

    @classmethod
    def from_state_dict(cls, config: GPTConfig, state_dict: dict, device="cpu") -> GPT:
        """Build without a throwaway random init (meta device), then take the given tensors by name, strictly."""
        with torch.device("meta"):
            model = cls(config)
        expected = set(model.state_dict())
        missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
        if missing or unexpected:
            raise ValueError(f"state_dict does not fit GPT({config}): missing {missing}, unexpected {unexpected}")
        for name, tensor in model.state_dict().items():
            if tuple(state_dict[name].shape) != tuple(tensor.shape):
                raise ValueError(f"state_dict[{name!r}] has shape {tuple(state_dict[name].shape)}, "
                                 f"the model wants {tuple(tensor.shape)}")
        # assign=True keeps the saved dtypes (e.g. bf16 weights stay bf16) instead of copying into fp32 params.
        model.load_state_dict({k: v.to(device) for k, v in state_dict.items()}, strict=True, assign=True)
        model.init_rotary()
        return model

    # -- forward ---------------------------------------------------------------------------------------------------

    def forward(self, idx, targets=None, *, position_ids=None, cu_seqlens=None, max_seqlen=None, kv_cache=None,
                num_supervised=None, covered=False):
        """Logits, or (loss_sum, n_supervised) when targets are given.

        idx: int64 (B, T), or the packer's (rows, T) / flattened (N,) input_ids when cu_seqlens is given.
        targets: same shape as idx, -1 = not supervised -> returns (loss_sum, n_supervised) through
            fastsft.kernels.linear_cross_entropy (never the full logits).
        position_ids, cu_seqlens, max_seqlen: the packed batch (see forward_packed); without cu_seqlens each row
            of idx is one sequence starting at position 0.
        kv_cache: a KVCache: idx (B, T) continues the cached sequences; returns logits (B, T, vocab).
        num_supervised: the count of targets != -1 when the host knows it (a 0-dim CPU tensor, so a compiled model
            keeps one graph): the loss then never waits for the device; None counts on the device.
        covered: the host knows that cu_seqlens[-1] == N, every token in a segment (the packer's batches): attention
            then zeroes no tail (fastsft.attention.varlen_attention). Rows without cu_seqlens always are.
        Logits are fp32, softcapped, cropped to vocab_size, shaped like idx plus a vocab dim.
        """
        if idx.dtype != torch.long:
            raise TypeError(f"GPT.forward: token ids must be int64, got {idx.dtype}")
        if kv_cache is not None:
            if targets is not None or cu_seqlens is not None:
                raise ValueError("GPT.forward: kv_cache generation takes neither targets nor cu_seqlens")
            return self._forward_cached(idx, kv_cache)
        if cu_seqlens is None:
            if idx.ndim != 2:
                raise ValueError(f"GPT.forward: idx must be (B, T), got shape {tuple(idx.shape)}")
            if position_ids is not None:
                raise ValueError("GPT.forward: position_ids without cu_seqlens; pass both for a packed batch")
            B, T = idx.shape
            cu_seqlens = torch.arange(0, B * T + 1, T, dtype=torch.int32, device=idx.device)
            position_ids = torch.arange(T, device=idx.device).expand(B, T)
            max_seqlen, covered = T, True
        elif position_ids is None:
            raise ValueError("GPT.forward: a packed batch needs position_ids along with cu_seqlens")
        return self._forward_packed(idx, position_ids, cu_seqlens, max_seqlen, targets, num_supervised, covered)

    def forward_packed(self, input_ids, position_ids, cu_seqlens, max_seqlen=None, targets=None, covered=False):
        """The packer's batch: input_ids / position_ids / targets (rows, T) or flattened (N,); cu_seqlens int32 over
        the flattened stream, fixed length, padded by repeating the total. max_seqlen bounds the longest segment;
        None means the row length T (a constant, so a compiled model keeps one graph). covered: as forward's.
        Returns (loss_sum, n_supervised) with targets, else fp32 logits shaped like input_ids plus vocab."""
        return self.forward(input_ids, targets, position_ids=position_ids, cu_seqlens=cu_seqlens,
                            max_seqlen=max_seqlen, covered=covered)

    def _forward_packed(self, idx, position_ids, cu_seqlens, max_seqlen, targets, num_supervised=None,
                        covered=False):
        if position_ids.shape != idx.shape:
            raise ValueError(f"position_ids shape {tuple(position_ids.shape)} != input_ids shape {tuple(idx.shape)}")
        if targets is not None and targets.shape != idx.shape:
            raise ValueError(f"targets shape {tuple(targets.shape)} != input_ids shape {tuple(idx.shape)}")
        if cu_seqlens.ndim != 1 or cu_seqlens.dtype != torch.int32:
            raise ValueError(f"cu_seqlens must be 1-D int32, got shape {tuple(cu_seqlens.shape)} {cu_seqlens.dtype}")
        if idx.ndim not in (1, 2):
            raise ValueError(f"input_ids must be (rows, T) or (N,), got shape {tuple(idx.shape)}")
        if max_seqlen is None:
            max_seqlen = idx.shape[-1]
        flat_idx = idx.reshape(-1)  # (N,)
        flat_pos = position_ids.reshape(-1)
        N = flat_idx.shape[0]
        cos, sin = self.cos[flat_pos][:, None, :], self.sin[flat_pos][:, None, :]  # (N, 1, D/2)

        # The residual stream keeps the embeddings' dtype: with bf16 tables (the driver's choice on GPUs) it stays bf16
        # under autocast, where rms_norm's fp32 output would otherwise turn every later elementwise op fp32.
        x = norm(self.transformer.wte(flat_idx)).to(self.transformer.wte.weight.dtype)  # (N, C)
        if self.config.smear:
            prev = torch.cat([torch.zeros_like(x[:1]), x[:-1]], dim=0)  # (N, C) previous token, no smear at starts
            has_prev = ~segment_starts(cu_seqlens, N)
            x = self._smear(x, prev, has_prev[:, None])

        def attend(q, k, v, window, layer_idx):
            return varlen_attention(q, k, v, cu_seqlens, max_seqlen, window, covered=covered)

        hidden = self._blocks(flat_idx, x, cos, sin, attend)  # (N, C)
        if targets is None:
            return self._logits(hidden).view(*idx.shape, -1)
        return self.supervised_loss(hidden, targets.reshape(-1), num_supervised)

    @torch.no_grad()
    def _forward_cached(self, idx, cache: KVCache):
        if idx.ndim != 2 or idx.shape[0] != cache.batch_size:
            raise ValueError(f"GPT.forward: with a KVCache of batch {cache.batch_size}, idx must be "
                             f"({cache.batch_size}, T), got {tuple(idx.shape)}")
        B, T = idx.shape
        start = cache.pos
        if start + T > cache.max_len or start + T > self.rotary_len:
            raise ValueError(f"KVCache overflow: {start} cached + {T} new tokens > capacity "
                             f"{min(cache.max_len, self.rotary_len)}")
        cos = self.cos[None, start:start + T, None, :]  # (1, T, 1, D/2)
        sin = self.sin[None, start:start + T, None, :]
        x = norm(self.transformer.wte(idx))  # (B, T, C)
        if self.config.smear:
            before = cache.prev_embedding if cache.prev_embedding is not None else torch.zeros_like(x[:, :1])
            prev = torch.cat([before, x[:, :-1]], dim=1)  # (B, T, C)
            has_prev = (torch.arange(start, start + T, device=x.device) > 0)[None, :, None]
            cache.prev_embedding = x[:, -1:]
            x = self._smear(x, prev, has_prev)

        def attend(q, k, v, window, layer_idx):
            return cache.attend(layer_idx, q, k, v, window)

        hidden = self._blocks(idx, x, cos, sin, attend)
        cache.pos = start + T
        return self._logits(hidden)

    def _smear(self, x, prev, has_prev):
        gate = self.smear_lambda.to(x.dtype) * torch.sigmoid(self.smear_gate(gate_input(x, self.config.smear_channels)))
        return x + has_prev.to(x.dtype) * gate * prev

    def _blocks(self, idx, x, cos, sin, attend):
        """The residual stream through every block, backout, final norm. x (..., C) -> (..., C)."""
        cfg = self.config
        x0 = x
        x_backout = None
        for i, block in enumerate(self.transformer.h):
            if cfg.resid_lambdas:
                x = self.resid_lambdas[i].to(x.dtype) * x + self.x0_lambdas[i].to(x.dtype) * x0
            ve = (self.value_embeds[str(i)].weight, idx) if cfg.has_value_embed(i) else None
            x = block(x, ve, cos, sin, self.window_sizes[i], attend)
            if cfg.backout and i == self.backout_layer:
                x_backout = x
        if cfg.backout:
            x = x - self.backout_lambda.to(x.dtype) * x_backout
        return norm(x)

    def _logits(self, hidden):
        logits = self.lm_head(hidden)[..., : self.config.vocab_size].float()
        if self.config.softcap is not None:
            logits = self.config.softcap * torch.tanh(logits / self.config.softcap)
        return logits

    @torch.compiler.disable
    def supervised_loss(self, hidden: torch.Tensor, targets: torch.Tensor, num_supervised=None):
        """(loss_sum, n_supervised) over rows with targets != -1. hidden (N, C), targets (N,).

        The fused kernel gathers the supervised rows itself (so only they meet lm_head, and the (N, vocab) logits
        never exist) and can park them in its own gradient buffer; gathering here too would cost a second host
        sync and a copy. Runs outside torch.compile's graph: the supervised count changes every batch.
        """
        from fastsft.kernels import linear_cross_entropy  # lazy: Triton loads only when a loss is computed

        weight = self.lm_head.weight[: self.config.vocab_size]  # drop the padded rows
        h = hidden
        device_type = h.device.type
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
            h, weight = h.to(dtype), weight.to(dtype)
        elif h.dtype != weight.dtype:
            h = h.to(weight.dtype)
        known = None if num_supervised is None else int(num_supervised)
        return linear_cross_entropy(h, weight, targets, softcap=self.config.softcap, layout=self.loss_layout,
                                    num_supervised=known)

    # -- helpers ---------------------------------------------------------------------------------------------------

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def training_flops(self, conversation_lengths, num_supervised: int) -> float:
        """Useful FLOPs of one forward+backward over a packed batch, for MFU: 6 per block weight per real token,
        6 per lm_head weight (unpadded) per supervised row, and attention inside each conversation only (sliding
        windows as windows; backward = 2.5x forward, as FlashAttention counts). Padding counts nothing."""
        cfg = self.config
        block_weights = sum(m.weight.numel() for m in self.transformer.h.modules() if isinstance(m, nn.Linear))
        if cfg.smear:
            block_weights += self.smear_gate.weight.numel()
        lengths = [int(n) for n in conversation_lengths]
        pairs = sum(attention_pairs(n, w) for w in self.window_sizes for n in lengths)
        return (6 * block_weights * sum(lengths) + 6 * cfg.vocab_size * cfg.n_embd * num_supervised
                + 14 * cfg.n_head * cfg.head_dim * pairs)
