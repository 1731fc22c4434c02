"""Move the hidden gradient of the supervised rows home, in place, with no staging copy.

linear_cross_entropy computes the gradient of its M supervised rows densely at the top of the (N, H) dh output
(rows 0..M-1, in order) and must end with each one at its own row (the k-th supervised row of `targets`) and zeros
in every ignored row. A staging copy of the moving rows costs memory at the op's peak; this kernel needs none.

Why it is safe in place: the k-th supervised row r_k has r_k >= k, so no source lies above its destination. Each
program owns a slice of columns and walks the destination rows in blocks, last block first. A block [r0, r1) reads
the sources [s0, s1), s0 and s1 being the counts of supervised rows before r0 and before r1, so s0 <= r0 and
s1 <= r1: every source of a block still to come lies below r0 (not yet overwritten), and no source of this block
lies in the blocks above, already written. Within a block the sources may overlap the destinations: all its loads
come before a barrier, all its stores after it. Column slices are disjoint, so programs never race with each other.
The source index of each row comes from `targets` (a running count and a prefix sum per block): no index vector.
"""

import torch
import triton
import triton.language as tl

from ._multi_tensor import interpreter_enabled

# GPU launch shape: blocks of SCATTER_BLOCK_ROWS rows, the columns split so that about SCATTER_PROGRAMS programs
# run side by side (each program walks all N rows in order, so parallelism comes from the column slices only).
SCATTER_BLOCK_ROWS = 512
SCATTER_PROGRAMS = 128
# Under the interpreter: small row blocks so tests cover the walk across blocks; tests set the column slice small
# to cover several programs (None: one program over all columns).
INTERPRETED_BLOCK_ROWS = 8
INTERPRETED_BLOCK_COLS = None


# n_rows and n_sup come from the data. Triton would specialize them (n % 16 == 0, n == 1), and a value of a new
# class would compile the kernel again at any step (fastsft.profiling.triton_compiles); unspecialized, the loop
# and the targets' loads they bound lose their vector width (a few KB a call).
@triton.jit(do_not_specialize=["n_rows", "n_sup"])
def _scatter_home_kernel(
    dh_ptr, stride,  # (N, H) rows 0..M-1 hold the gradients of the supervised rows, in order
    tgt_ptr,  # (N,) targets, -1 = ignored
    n_rows, n_sup, hidden_size,
    BLOCK_R: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_ok = cols < hidden_size
    offs = tl.arange(0, BLOCK_R)
    n_blocks = tl.cdiv(n_rows, BLOCK_R)
    below_end = n_sup  # supervised rows before the end of the current block
    for i in range(n_blocks):
        r = (n_blocks - 1 - i) * BLOCK_R + offs
        in_range = r < n_rows
        sup = (tl.load(tgt_ptr + r, mask=in_range, other=-1) >= 0).to(tl.int32)
        first = below_end - tl.sum(sup, axis=0)  # source index of the block's first supervised row
        src = (first + tl.cumsum(sup, axis=0) - 1).to(tl.int64)
        moved = tl.load(dh_ptr + src[:, None] * stride + cols[None, :],
                        mask=(sup > 0)[:, None] & col_ok[None, :], other=0.0)
        tl.debug_barrier()  # every load of this block before any store: sources may be destinations
        tl.store(dh_ptr + r.to(tl.int64)[:, None] * stride + cols[None, :], moved,
                 mask=in_range[:, None] & col_ok[None, :])
        below_end = first


def scatter_rows_home(dh: torch.Tensor, targets: torch.Tensor, n_sup: int) -> None:
    """dh[:n_sup] holds the gradients of the supervised rows of `targets` (target >= 0), in order: move each to its
    row, in place, and zero the rows of ignored targets. dh (N, H) with unit column stride; targets (N,)."""
    n_rows, hidden_size = dh.shape
    if n_rows == 0:
        return
    if dh.stride(1) != 1:
        raise ValueError("scatter_rows_home: dh needs unit column stride")
    if interpreter_enabled():
        block_r, block_h = INTERPRETED_BLOCK_ROWS, INTERPRETED_BLOCK_COLS or triton.next_power_of_2(hidden_size)
    else:
        block_r = SCATTER_BLOCK_ROWS
        # At least 16 bytes per row segment (one vector access), otherwise as many slices as SCATTER_PROGRAMS.
        min_cols = max(1, 16 // dh.element_size())
        block_h = max(min_cols, triton.next_power_of_2(triton.cdiv(hidden_size, SCATTER_PROGRAMS)))
    grid = (triton.cdiv(hidden_size, block_h),)
    _scatter_home_kernel[grid](dh, dh.stride(0), targets, n_rows, n_sup, hidden_size, BLOCK_R=block_r,
                               BLOCK_H=block_h, num_warps=4)
