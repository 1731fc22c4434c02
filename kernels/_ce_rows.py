"""The one Triton kernel under both loss ops: per-row log-sum-exp, target loss and dlogits over a (rows, V) block.

`cross_entropy` runs it over materialized logits (forward: lse + loss; backward: gradient), and
`linear_cross_entropy` runs it over each chunk of logits that a matmul just produced (lse + loss + gradient in one
launch, the gradient overwriting the chunk). Keeping a single kernel keeps one definition of the softcap, of the
ignored-row rule (target -1: loss 0, gradient 0, row never read) and of the numerics (fp32 after every load).
"""

import os

import torch
import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

# GPU launch shape: one program streams one row in blocks of ROW_BLOCK_V. Module-level so the bench can sweep it.
ROW_BLOCK_V = 2048  # H100 sweep (bench/RESULTS.md): 2048/8 warps best, all of 1024..8192 within 12%
ROW_NUM_WARPS = 8
# Warps for rows narrower than ROW_BLOCK_V (linear_cross_entropy's vocabulary tiles: one program per row of a few
# hundred columns, where 8 warps mostly idle). H100, 16384 rows x 512 columns: 2 warps 16.2 us, 4: 17.7, 8: 27.9.
NARROW_ROW_NUM_WARPS = 2
# Under the interpreter every block iteration costs milliseconds; tests shrink this to cover the multi-block loop.
INTERPRETED_BLOCK_V = 256


@triton.jit
def _tanh(x):
    # tanh through exp(-2|x|), which never overflows; the interpreter has no tanh intrinsic.
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x >= 0, t, -t)


@triton.jit
def softmax_grad(x, lse, is_target, valid, scale, softcap, HAS_SOFTCAP: tl.constexpr):
    """d loss / d logit for fp32 logits x (before the softcap): softcap' * (softmax - onehot) * scale, 0 where not
    valid. The one definition of the gradient rule, shared by this kernel and kernels/_grad_tile.py."""
    if HAS_SOFTCAP:
        t = _tanh(x / softcap)
        x = softcap * t
    g = tl.exp(x - lse) - tl.where(is_target, 1.0, 0.0)
    if HAS_SOFTCAP:
        g = g * (1.0 - t * t)  # d/dx c*tanh(x/c)
    return tl.where(valid, g * scale, 0.0)


# col_offset (a vocabulary chunk's start, scheduled from the number of supervised rows) comes from the data: not
# specialized (see kernels/_scatter_rows.py). V and the strides bound the loads, where divisibility lets them
# vectorize: kept. They are the vocabulary in layout "fast" (the default) and multiples of 16 in "low_memory"'s
# chunks wherever the vocabulary is one (kernels/_grad_tile.py).
@triton.jit(do_not_specialize=["col_offset"])
def _ce_rows_kernel(
    x_ptr, x_stride,  # logits (rows, V), any float dtype
    g_ptr, g_stride,  # gradient out (rows, V); may be x_ptr itself: each element is read before it is written
    tgt_ptr,  # (rows,) int64, -1 = ignored; indexed through idx_ptr when HAS_INDEX
    idx_ptr,  # (rows,) int32/int64: row i's target is tgt_ptr[idx_ptr[i]] (the gathered rows of a larger batch)
    lse_ptr,  # (rows,) fp32: written when COMPUTE_LSE, read otherwise
    loss_ptr,  # (rows,) fp32: lse - target logit, 0 for ignored rows (written when COMPUTE_LSE)
    scale_ptr,  # () fp32: upstream gradient of the loss sum, read on the device (no host sync)
    V,
    col_offset,  # vocabulary index of column 0 of this block (a vocabulary slice of the logits); 0 when COMPUTE_LSE
    softcap,
    HAS_SOFTCAP: tl.constexpr,
    HAS_INDEX: tl.constexpr,
    COMPUTE_LSE: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # row * stride overflows int32 past 2**31 elements
    x_row = x_ptr + row * x_stride
    if HAS_INDEX:
        tgt = tl.load(tgt_ptr + tl.load(idx_ptr + row).to(tl.int64))
    else:
        tgt = tl.load(tgt_ptr + row)
    valid = tgt >= 0
    # An ignored row has length 0 for reading (its logits are never loaded). Folding the flag into a bound also
    # sidesteps the interpreter, which mis-types `vector_mask & scalar_bool`.
    n_read = tl.where(valid, V, 0)
    offs = tl.arange(0, BLOCK_V)

    if COMPUTE_LSE:
        # Online softmax kept per lane (one running max and sum per position of the block), reduced once at the
        # end: no cross-lane reduction inside the loop.
        m = tl.full([BLOCK_V], float("-inf"), tl.float32)
        s = tl.zeros([BLOCK_V], tl.float32)
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            live = cols < n_read
            x = tl.load(x_row + cols, mask=live, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                x = softcap * _tanh(x / softcap)
            x = tl.where(live, x, float("-inf"))
            m_new = tl.maximum(m, x)
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # lanes with nothing yet: avoid -inf - -inf
            s = s * tl.exp(m - m_ref) + tl.exp(x - m_ref)
            m = m_new
        m_row = tl.max(m, axis=0)
        m_row_ref = tl.where(m_row == float("-inf"), 0.0, m_row)
        s_row = tl.sum(s * tl.exp(m - m_row_ref), axis=0)
        lse = tl.where(valid, m_row_ref + tl.log(tl.where(valid, s_row, 1.0)), 0.0)
        # Masked: an ignored row's target logit is not read either (column 0 as a safe address, never loaded).
        x_t = tl.load(x_row + tl.maximum(tgt, 0), mask=valid, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            x_t = softcap * _tanh(x_t / softcap)
        tl.store(lse_ptr + row, lse)
        tl.store(loss_ptr + row, tl.where(valid, lse - x_t, 0.0))
    else:
        lse = tl.load(lse_ptr + row)

    if WRITE_GRAD:
        scale = tl.load(scale_ptr).to(tl.float32)
        g_row = g_ptr + row * g_stride
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            inb = cols < V
            x = tl.load(x_row + cols, mask=cols < n_read, other=0.0).to(tl.float32)
            g = softmax_grad(x, lse, cols + col_offset == tgt, valid, scale, softcap, HAS_SOFTCAP)
            tl.store(g_row + cols, g.to(g_ptr.dtype.element_ty), mask=inb)


def ce_rows(logits, targets, lse, loss, *, softcap=None, grad_out=None, grad_scale=None, compute_lse=True,
            col_offset=0, row_index=None, num_warps=None):
    """Launch the row kernel over `logits` (rows, V), rows contiguous along V.

    targets: (rows,), or any length with row_index (rows,) giving row i's position in it (targets[row_index[i]]),
    so gathered rows need no gathered copy of their targets.

    compute_lse: write `lse` and `loss` (rows,) fp32; else read `lse`. grad_out: when given, write
    (softmax - onehot) * softcap' * grad_scale into it (it may be `logits` itself). col_offset: `logits` holds the
    vocabulary columns [col_offset, col_offset + V) of the full logits (gradient only: lse comes from a full pass).
    num_warps: None for the measured defaults (ROW_NUM_WARPS for wide rows, NARROW_ROW_NUM_WARPS for narrow ones);
    benchmarks pass others here.
    """
    rows, vocab = logits.shape
    if rows == 0:
        return
    write_grad = grad_out is not None
    if write_grad and grad_scale is None:
        raise ValueError("ce_rows: grad_out given without grad_scale")
    if compute_lse and col_offset:
        raise ValueError("ce_rows: the log-sum-exp needs every vocabulary column, got a slice at col_offset "
                         f"{col_offset}")
    block_v = min(triton.next_power_of_2(vocab), INTERPRETED_BLOCK_V if INTERPRETED else ROW_BLOCK_V)
    dummy = lse  # stands in for pointers the constexpr flags never touch
    _ce_rows_kernel[(rows,)](
        logits, logits.stride(0),
        grad_out if write_grad else logits, grad_out.stride(0) if write_grad else 0,
        targets, row_index if row_index is not None else targets, lse, loss if loss is not None else dummy,
        grad_scale if write_grad else dummy, vocab, int(col_offset), float(softcap) if softcap is not None else 1.0,
        HAS_SOFTCAP=softcap is not None, HAS_INDEX=row_index is not None, COMPUTE_LSE=compute_lse,
        WRITE_GRAD=write_grad, BLOCK_V=block_v,
        num_warps=num_warps or (ROW_NUM_WARPS if block_v >= ROW_BLOCK_V else NARROW_ROW_NUM_WARPS),
    )


def check_softcap(softcap, where):
    if softcap is not None and not (isinstance(softcap, (int, float)) and softcap > 0):
        raise ValueError(f"{where}: softcap must be None or a positive number, got {softcap!r}")
