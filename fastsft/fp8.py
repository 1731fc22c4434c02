"""FP8 matmuls for the blocks' projections (`fp8 = true`; off by default).

Each projection's three matmuls (forward, input gradient, weight gradient) run as `torch._scaled_mm` on float8
operands with one dynamic scale per tensor: activations and weights in e4m3 (more mantissa), gradients in e5m2
(more range), written in the autocast dtype. Hopper runs fp8 at twice the bf16 rate; the quantizations are plain
torch ops, so torch.compile fuses each into the kernel that produces its operand.

Accumulation: the forward and input-gradient matmuls take cuBLAS's fast accumulation (`use_fast_accum`: Hopper's
fp8 tensor cores keep their narrower accumulator, not promoted to fp32 every few k-steps); their sums run over at
most 4 x n_embd terms, and their error against the float64 product of the same operands rose from 1.67e-3 to at
most 2.25e-3 at d12 and d20 (bench/gpu_fp8_scaling.py, RESULTS run 15). The weight gradients sum over every row
of the batch (65,536 at d12) and keep fp32 promotion: fast, their error rose to 4.5e-3 - 6.6e-3. At d12 the step's
GPU work fell 2.8 ms (matmuls 1.8); the step itself, host-bound on that machine, moved 0.1 ms.

What stays in bf16: the embeddings, lm_head (the fused loss kernel), the small gates, attention itself, every
forward without gradients (evaluation, generation), and any matmul whose dimensions are not multiples of 16 (the
fp8 kernels' constraint). Those matmuls fall back per call (`applies`), so one model serves training and
generation; `fp8 = true` refuses a run where none could take fp8 (`check_supported`).

Memory: a projection keeps its input for the weight gradient as fp8 (1 byte instead of 2), and the MLP keeps fp8
x and fp8 relu^2 only (where bf16 keeps c_fc's output in 2 bytes; `_ReluSquareMLP` says why that is enough). q, k
and v are one fp8 matmul (the model's `_QKVProjection`, from `linear_forward` and `linear_grads`), whose gradient is
quantized by kernels of its own, not by inductor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

E4M3 = torch.float8_e4m3fn  # activations and weights
E5M2 = torch.float8_e5m2  # gradients
_ALIGN = 16  # torch._scaled_mm needs every dimension a multiple of 16


def scale_for(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """s mapping max |t| to dtype's largest finite value (fp32 scalar). An all-zero t gets s = 1e12 (its values
    stay 0); a non-finite t gives a non-finite result, which the step's loss reports and skips."""
    return torch.finfo(dtype).max / t.detach().abs().amax().float().clamp(min=1e-12)


def cast(t: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    fmax = torch.finfo(dtype).max
    return (t.float() * scale).clamp(-fmax, fmax).to(dtype)


def quantize(t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(t * s in dtype, 1/s), s = scale_for(t, dtype)."""
    scale = scale_for(t, dtype)
    return cast(t, scale, dtype), scale.reciprocal()


def _column_major(t: torch.Tensor) -> torch.Tensor:
    """The same matrix stored column by column: _scaled_mm's layout for its second operand."""
    return t.t().contiguous().t()


def _mm(a, a_inv, b, b_inv, out_dtype, fast_accum=False):
    """a @ b rescaled; `fast_accum` for the forward and input gradients only (the module's docstring says why)."""
    return torch._scaled_mm(a, b, scale_a=a_inv, scale_b=b_inv, out_dtype=out_dtype, use_fast_accum=fast_accum)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t as a row-major (M, last) matrix: _scaled_mm's layout for its first operand."""
    return t.reshape(-1, t.shape[-1]).contiguous()


def _project(x_q, x_inv, weight, out_dtype):
    """x @ weight.T from fp8 x; also returns the fp8 weight and its inverse scale, which the backward reuses."""
    w_q, w_inv = quantize(weight, E4M3)
    return _mm(x_q, x_inv, w_q.t(), w_inv, out_dtype, True), w_q, w_inv


def linear_forward(x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype):
    """(y, kept): y = x @ weight.T (M, N) in fp8 from x's rows (M, K), and what its backward keeps (`linear_grads`):
    x transposed in fp8 (the weight gradient reads it so, and the quantizing kernel writes it so once), the fp8
    weight, and their inverse scales."""
    x_q, x_inv = quantize(_rows(x), E4M3)
    y, w_q, w_inv = _project(x_q, x_inv, weight, out_dtype)
    return y, (x_q.t().contiguous(), x_inv, w_q, w_inv)


def linear_grads(g_q, g_qt, g_inv, kept, x_dtype, w_dtype):
    """(dx, dW) of y = x @ w.T from the fp8 gradient g (M, N) and its transpose g_qt (N, M), both row-major, and
    what `linear_forward` kept (x's transpose (K, M) among it): dW = g.T @ x reads both with M contiguous, the only
    layout Hopper's fp8 matmul takes."""
    x_qt, x_inv, w_q, w_inv = kept
    dx = _mm(g_q, g_inv, _column_major(w_q), w_inv, x_dtype, True)
    dw = _mm(g_qt, g_inv, x_qt.t(), x_inv, w_dtype)
    return dx, dw


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, out_dtype):
        y, kept = linear_forward(x, weight, out_dtype)
        ctx.save_for_backward(*kept)
        ctx.x_shape, ctx.dtypes = x.shape, (x.dtype, weight.dtype)
        return y.view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad):
        g_q, g_inv = quantize(_rows(grad), E5M2)
        dx, dw = linear_grads(g_q, g_q.t().contiguous(), g_inv, ctx.saved_tensors, *ctx.dtypes)
        return dx.view(ctx.x_shape), dw, None


class _ReluSquareMLP(torch.autograd.Function):
    """c_proj(relu(c_fc(x))^2) with both matmuls in fp8. It keeps only fp8 operands: x and a = relu(h)^2, both
    transposed as the weight gradients read them (1 byte each, where keeping h takes 2). a's two layouts come
    from h in one pass (kernels/fp8_relu_square.py), and h is dropped. The backward takes relu(h) as sqrt(a):
    a's rounding error halves under the root (under 3.2% for e4m3's normal values; more for relu(h) under ~0.6%
    of its largest, which a holds as a subnormal, and 0, so dh = 0, under ~0.15%) and dh is rounded to e5m2 next
    (up to 12.5%), so it adds little, and relu^2 is not recomputed. The backward works in a's layout (M
    contiguous): da comes out of its matmul transposed."""

    @staticmethod
    def forward(ctx, x, w_fc, w_proj, out_dtype):
        x_q, x_inv = quantize(_rows(x), E4M3)
        h, fc_q, fc_inv = _project(x_q, x_inv, w_fc, out_dtype)  # (M, 4C)
        r = F.relu(h)
        a_scale = scale_for(r * r, E4M3)
        from fastsft.kernels.fp8_relu_square import relu_square_fp8  # lazy: Triton loads with the first fp8 MLP

        a_q, a_qt = relu_square_fp8(h, a_scale, E4M3)
        a_inv = a_scale.reciprocal()
        y, proj_q, proj_inv = _project(a_q, a_inv, w_proj, out_dtype)
        ctx.save_for_backward(x_q.t().contiguous(), x_inv, fc_q, fc_inv, proj_q, proj_inv, a_qt, a_inv)
        ctx.x_shape, ctx.dtypes = x.shape, (x.dtype, w_fc.dtype, w_proj.dtype, out_dtype)
        return y.view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad):
        x_qt, x_inv, fc_q, fc_inv, proj_q, proj_inv, a_qt, a_inv = ctx.saved_tensors
        x_dtype, fc_dtype, proj_dtype, h_dtype = ctx.dtypes
        g_q, g_inv = quantize(_rows(grad), E5M2)
        d_proj = _mm(g_q.t().contiguous(), g_inv, a_qt.t(), a_inv, proj_dtype)
        da_t = _mm(proj_q.t().contiguous(), proj_inv, g_q.t(), g_inv, h_dtype, True)  # (4C, M) = W_proj.T @ g.T
        from fastsft.kernels.fp8_relu_square_grad import relu_square_grad_fp8

        # dh = 2 sqrt(a) da quantized into both layouts (dh.T row-major is d_fc's first operand, dh is dx's) by two
        # kernels of its own: its operands and outputs are in memory anyway, where inductor's passes were slow
        dh_tq, dh_q, dh_inv = relu_square_grad_fp8(da_t, a_qt, a_inv, E5M2)
        dx = _mm(dh_q, dh_inv, _column_major(fc_q), fc_inv, x_dtype, True)
        d_fc = _mm(dh_tq, dh_inv, x_qt.t(), x_inv, fc_dtype)
        return dx.view(ctx.x_shape), d_fc, d_proj, None


def output_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the fp8 matmuls write: autocast's where it is on, else x's."""
    device_type = x.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype


def applies(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether the fp8 path takes this matmul: a training forward with every dimension a multiple of 16."""
    rows = x.numel() // x.shape[-1]
    dims = [rows] + [d for w in weights for d in w.shape]
    return torch.is_grad_enabled() and all(d % _ALIGN == 0 for d in dims)


def check_supported(device: torch.device, rows: int, model) -> None:
    """Raise ValueError, naming the cause, where `fp8 = true` would crash or never apply: a GPU without fp8 matmuls,
    or a micro-batch or block width not a multiple of 16 (every matmul would fall back to bf16)."""
    if device.type == "cuda":
        if torch.version.hip:
            raise ValueError("fp8 = true uses CUDA's float8 (e4m3fn) matmuls; this is a ROCm build of torch")
        capability = torch.cuda.get_device_capability(device)
        if capability < (8, 9):
            raise ValueError(f"fp8 = true needs a GPU of compute capability 8.9 or newer (Ada, Hopper); "
                             f"{torch.cuda.get_device_name(device)} is {capability}")
    widths = {"tokens per micro-batch (device_batch_size x seq_len)": rows, "model.n_embd": model.config.n_embd,
              "model.n_kv_head x head_dim": model.config.n_kv_head * model.config.head_dim}
    for name, value in widths.items():
        if value % _ALIGN:
            raise ValueError(f"fp8 = true needs {name} to be a multiple of {_ALIGN} (fp8 matmul tiles); got {value}")


def linear(x: torch.Tensor, weight: torch.Tensor, fp8: bool) -> torch.Tensor:
    """x @ weight.T, in fp8 when asked and `applies`, else F.linear (autocast as usual)."""
    if fp8 and applies(x, weight):
        return _Linear.apply(x, weight, output_dtype(x))
    return F.linear(x, weight)


def relu_square_mlp(x: torch.Tensor, w_fc: torch.Tensor, w_proj: torch.Tensor) -> torch.Tensor:
    """nanochat's MLP in fp8 (the caller checks `applies`)."""
    return _ReluSquareMLP.apply(x, w_fc, w_proj, output_dtype(x))
