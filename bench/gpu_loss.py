"""GPU benchmark of the loss kernels: linear_cross_entropy and cross_entropy against the compiled reference,
Liger's fused linear cross-entropy and Apple's cut-cross-entropy (CCE), at full size.

Prints a header line (device, torch, triton) first and a table last (the header again as its first row); `main()`
returns the rows (list of dicts) for a combined kernels script. Liger and CCE are optional imports: a failure is
reported as a row and the run goes on. Timings are forward+backward medians of triton.testing.do_bench; memory is
the peak of torch.cuda.max_memory_allocated above what was allocated before the call (gradients included, inputs
excluded), in MiB: the two bf16 gradients alone are the floor (e.g. 192 MiB at N=32768, H=1024, V=65536).

Both layouts of linear_cross_entropy run side by side: `layout="low_memory"` (two passes, gradients as their own
workspace; the default) and `layout="fast"` (one pass over row chunks with an fp32 (V, H) dW accumulator), each
checked against the fp32 reference and timed, with its own sweep of chunk sizes; low_memory also with pass B's
tile made the other way (fused Triton matmul vs cuBLAS + row kernel). Each timing row carries host_ms, the time to
enqueue one call: near `ms`, the call is host-bound. Parts: lce_check, lce_time, breakdown, ce, host (per-call host
cost of each pass-B piece), profile (torch.profiler kernel and host-op tables).

    python bench/gpu_loss.py            # lce_check, lce_time with the sweeps, breakdown, ce
    python bench/gpu_loss.py --quick    # the same without the tuning sweeps
    python bench/gpu_loss.py --parts host,profile
"""

import argparse
import importlib
import json
import sys
import time

import torch
import torch.nn.functional as F
import triton
import triton.testing

# By module path: the package re-exports a function of the same name, which `import ... as` may resolve to.
lce_mod = importlib.import_module("fastsft.kernels.linear_cross_entropy")
grad_tile_mod = importlib.import_module("fastsft.kernels._grad_tile")
from fastsft.kernels._grad_tile import GradTileLaunch
from fastsft.kernels._scatter_rows import scatter_rows_home
from fastsft.kernels.cross_entropy import cross_entropy, cross_entropy_reference
from fastsft.kernels.linear_cross_entropy import LCETuning, linear_cross_entropy, linear_cross_entropy_reference

GiB = 2**30
# do_bench's time budget per measurement: ~10 runs of a 30 ms call (runs of the same code differed by up to 40%
# with 60 ms, i.e. medians of 2-3 runs)
REP_MS = 300
LCE_SHAPES = [  # (N, H, V, fraction of targets ignored)
    (32768, 1024, 65536, 0.5),
    (16384, 2048, 151936, 0.0),
    (32768, 1024, 65536, 0.25),  # fewer than half ignored: the gathered rows need their own buffer
]


LAYOUTS = ("low_memory", "fast")
# Tuning variants tried besides the defaults, per LCE shape (passed as linear_cross_entropy(tuning=...)); layout
# "low_memory" then "fast". tail_cols trades the split chunks' accumulator (4 * H bytes per column) against narrow
# chunks.
SWEEPS = [
    [LCETuning(tail_cols=8), LCETuning(tail_cols=32), LCETuning(tail_cols=64), LCETuning(vocab_chunk_bytes=32 * 2**20)],
    [LCETuning(tail_cols=8), LCETuning(tail_cols=32), LCETuning(vocab_chunk_bytes=32 * 2**20)],
    [LCETuning(tail_cols=32)],
]
FAST_SWEEPS = [
    [LCETuning(fast_chunk_bytes=128 * 2**20, fast_min_rows=1024),
     LCETuning(fast_chunk_bytes=512 * 2**20, fast_min_rows=4096)],
    [LCETuning(fast_min_rows=1024), LCETuning(fast_min_rows=4096)],
    [],
]


PROFILE_TUNINGS = [None, LCETuning(tail_cols=32)]


def tuning_fields(tuning):
    """The set fields of a tuning, for a row (byte sizes in MiB)."""
    fields = json.loads(tuning.encode() or "{}")
    return {(k[:-6] + "_MiB" if k.endswith("_bytes") else k): (v // 2**20 if k.endswith("_bytes") else v)
            for k, v in fields.items()}


def log(*args):
    print(*args, flush=True)


def make_lce_inputs(n, h, v, ignored, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    hidden = torch.randn(n, h, device="cuda", generator=gen, dtype=torch.bfloat16)
    weight = (torch.randn(v, h, device="cuda", generator=gen) / h**0.5 * 2).to(torch.bfloat16)
    targets = torch.randint(0, v, (n,), device="cuda", generator=gen)
    if ignored:  # exactly this fraction: the layout of the gathered rows depends on whether it is >= 1/2
        targets[torch.randperm(n, device="cuda", generator=gen)[: round(ignored * n)]] = -1
    return hidden.requires_grad_(), weight.requires_grad_(), targets


def fwd_bwd(loss_fn, *tensors):
    def step():
        for t in tensors:
            t.grad = None
        loss_fn().backward()
    return step


def time_and_memory(step, tensors, host=False):
    """(median ms, peak GiB above the inputs[, median host ms]). Host ms: how long the Python call takes to return
    after a synchronize, i.e. to enqueue everything; near the device time means the op is host-bound."""
    step()  # warm-up / compile
    torch.cuda.synchronize()
    for t in tensors:
        t.grad = None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    extra = (torch.cuda.max_memory_allocated() - base) / GiB
    ms = triton.testing.do_bench(step, warmup=25, rep=REP_MS, return_mode="median")
    host_ms = []
    for _ in range(5 if host else 0):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        host_ms.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    for t in tensors:
        t.grad = None
    if host:
        return ms, extra, sorted(host_ms)[2]
    return ms, extra


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def outside_impls():
    impls, errors = {}, {}
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        impls["liger_flce"] = lambda h, w, t: liger_fused_linear_cross_entropy(h, w, t, ignore_index=-1,
                                                                               reduction="sum")
    except Exception as e:  # reported as a row, the run goes on
        errors["liger_flce"] = repr(e)[:120]
    try:
        from cut_cross_entropy import linear_cross_entropy as cce

        impls["cce (filter default)"] = lambda h, w, t: cce(h, w, t, ignore_index=-1, reduction="sum")
        impls["cce (exact, filter_eps=None)"] = lambda h, w, t: cce(h, w, t, ignore_index=-1, reduction="sum",
                                                                    filter_eps=None)
    except Exception as e:
        errors["cce"] = repr(e)[:120]
    return impls, errors


def lce_correctness(rows, shape):
    n, h, v, ignored = shape
    cases = [(ignored, None), (ignored, 15.0)]
    if ignored:  # both layouts of the gathered rows: own buffer (< half ignored) and parked in dh (>= half)
        cases += [(0.25, None), (0.75, None)]
    for (ignored, softcap), layout in [(c, lay) for c in cases for lay in LAYOUTS]:
        hidden, weight, targets = make_lce_inputs(n, h, v, ignored, seed=1)
        loss, cnt = linear_cross_entropy(hidden, weight, targets, softcap, layout=layout)
        loss.backward()
        gh, gw = hidden.grad, weight.grad
        hidden.grad = weight.grad = None
        ref, ref_n = linear_cross_entropy_reference(hidden, weight, targets, softcap)
        ref.backward()
        rows.append(dict(kind="correctness", case=f"lce N={n} H={h} V={v} ign={ignored} softcap={softcap}",
                         parked_in_dh=2 * int(cnt) <= n,
                         impl=f"fastsft {layout}", loss_rel=abs(loss.item() - ref.item()) / abs(ref.item()),
                         n_ok=int(cnt) == int(ref_n), dh_rel=rel(gh, hidden.grad), dw_rel=rel(gw, weight.grad)))
        log(rows[-1])
        hidden.grad = weight.grad = None
        del ref, gh, gw, hidden, weight, targets
        torch.cuda.empty_cache()


def scatter_check(rows):
    """The in-place move of dh home, at full size, against index_copy_ into zeros: bit-exact or wrong (a race in
    the kernel's barrier would show as a few rows off, different from run to run, so it runs several times)."""
    for n, h, ignored, dtype in [(32768, 1024, 0.5, torch.bfloat16), (32768, 1024, 0.25, torch.bfloat16),
                                 (16384, 2048, 0.9, torch.bfloat16), (20000, 1000, 0.3, torch.float32)]:
        gen = torch.Generator(device="cuda").manual_seed(n + h)
        bad = 0
        for _ in range(5):
            targets = torch.randint(0, 1000, (n,), device="cuda", generator=gen)
            # runs of ignored rows, as in chat data, plus scattered ones
            targets[torch.rand(n, device="cuda", generator=gen) < ignored] = -1
            targets[n // 3: n // 3 + 700] = -1
            m = int((targets >= 0).sum())
            dh = torch.randn(n, h, device="cuda", generator=gen).to(dtype) + 3
            want = torch.zeros_like(dh).index_copy_(0, torch.nonzero(targets >= 0).squeeze(1), dh[:m])
            scatter_rows_home(dh, targets, m)
            bad += int((dh != want).any(dim=1).sum())
        rows.append(dict(kind="correctness", case=f"scatter N={n} H={h} ign~{ignored} {dtype}", impl="fastsft",
                         rows_wrong_in_5_runs=bad))
        log(rows[-1])


def lce_timings(rows, shape, impls, errors, sweep, fast_sweep):
    n, h, v, ignored = shape
    case = f"lce N={n} H={h} V={v} ign={ignored}"
    hidden, weight, targets = make_lce_inputs(n, h, v, ignored)
    tensors = (hidden, weight)
    @torch.compile
    def compiled_bf16(hidden, weight, targets):  # what nanochat does: bf16 matmul, fp32 logits, F.cross_entropy
        logits = (hidden @ weight.t()).float()
        return F.cross_entropy(logits, targets, ignore_index=-1, reduction="sum")

    def add(impl, fn, **extra):
        try:
            ms, mem, host = time_and_memory(fwd_bwd(lambda: fn(hidden, weight, targets), *tensors), tensors,
                                            host=True)
            rows.append(dict(kind="time", case=case, impl=impl, ms=round(ms, 3), host_ms=round(host, 2),
                             extra_GiB=round(mem, 4), extra_MiB=round(mem * 1024, 3), **extra))
        except Exception as e:
            rows.append(dict(kind="time", case=case, impl=impl, error=repr(e)[:160]))
        log(rows[-1])
        torch.cuda.empty_cache()

    floor = (n * h + v * h) * hidden.element_size() / 2**20
    rows.append(dict(kind="time", case=case, impl="floor: the two gradients", extra_MiB=round(floor, 3)))
    add("fastsft low_memory (default)", lambda *a: linear_cross_entropy(*a)[0],
        tile_MiB=lce_mod.VOCAB_CHUNK_BYTES / 2**20, min_cols=lce_mod.MIN_VOCAB_CHUNK, tail_cols=lce_mod.TAIL_COLS)
    other_tile = LCETuning(fused_grad_tile=not lce_mod.FUSED_GRAD_TILE)
    add(f"fastsft low_memory, pass B tile {'fused' if other_tile.fused_grad_tile else 'by cuBLAS + row kernel'}",
        lambda *a: linear_cross_entropy(*a, tuning=other_tile)[0])
    add("fastsft fast (row chunks, fp32 dW acc)", lambda *a: linear_cross_entropy(*a, layout="fast")[0],
        chunk_MiB=lce_mod.FAST_CHUNK_BYTES / 2**20, min_rows=lce_mod.FAST_MIN_ROWS)
    add("fastsft low_memory, grad_in_backward (5 matmuls)",
        lambda *a: linear_cross_entropy(*a, tuning=LCETuning(grad_in_backward=True))[0])
    add("torch.compile bf16 matmul + fp32 CE", compiled_bf16)
    for name, fn in impls.items():
        add(name, fn)
    for name, err in errors.items():
        rows.append(dict(kind="time", case=case, impl=name, error=err))
    for layout, variants in (("low_memory", sweep or []), ("fast", fast_sweep or [])):
        for tuning in variants:
            add(f"fastsft {layout} sweep",
                lambda *a, lay=layout, tun=tuning: linear_cross_entropy(*a, layout=lay, tuning=tun)[0],
                **tuning_fields(tuning))
    del hidden, weight, targets
    torch.cuda.empty_cache()


def lce_breakdown(rows, shape):
    """Per-part times of linear_cross_entropy's two passes at the default chunk sizes, and of the whole-call parts."""
    from fastsft.kernels._ce_rows import ce_rows

    n, h, v, ignored = shape
    hidden, weight, targets = make_lce_inputs(n, h, v, ignored)
    hidden, weight = hidden.detach(), weight.detach()
    valid = targets >= 0
    m = int(valid.sum())
    idx = torch.nonzero_static(valid, size=m).squeeze(1)
    hg, tg = hidden.index_select(0, idx), targets.index_select(0, idx)
    rows_c = lce_mod.rows_per_chunk(m, v, h)
    cols = lce_mod.vocab_per_chunk(m, v, hidden.dtype)
    logits = torch.empty(rows_c, v, dtype=hidden.dtype, device="cuda")
    tile = torch.empty(m, cols, dtype=hidden.dtype, device="cuda")
    lse = torch.empty(m, device="cuda")
    loss = torch.empty(m, device="cuda")
    one = torch.ones((), device="cuda")
    dh_c = torch.empty(rows_c, h, dtype=hidden.dtype, device="cuda")
    dw_c = torch.empty(cols, h, dtype=hidden.dtype, device="cuda")
    torch.mm(hg[:rows_c], weight.t(), out=logits)
    ce_rows(logits, tg[:rows_c], lse[:rows_c], loss[:rows_c])
    lse.copy_(lse[:rows_c].repeat(-(-m // rows_c))[:m])  # plausible lse values for the tile's rows
    torch.mm(hg, weight[:cols].t(), out=tile)
    a_chunks, b_chunks = -(-m // rows_c), -(-v // cols)
    parts = {
        f"A: mm logits ({rows_c} x {v} x {h})": (lambda: torch.mm(hg[:rows_c], weight.t(), out=logits), a_chunks,
                                                  rows_c * v * h),
        "A: row kernel (lse+loss+dlogits)": (lambda: ce_rows(logits, tg[:rows_c], lse[:rows_c], loss[:rows_c],
                                                             grad_out=logits, grad_scale=one), a_chunks, 0),
        "A: mm dh": (lambda: torch.mm(logits, weight, out=dh_c), a_chunks, rows_c * v * h),
        f"B: mm logits tile ({m} x {cols} x {h})": (lambda: torch.mm(hg, weight[:cols].t(), out=tile), b_chunks,
                                                     m * cols * h),
        "B: row kernel (dlogits from lse)": (lambda: ce_rows(tile, tg, lse, None, grad_out=tile, grad_scale=one,
                                                             compute_lse=False), b_chunks, 0),
        "B: mm dW slice": (lambda: torch.mm(tile.t(), hg, out=dw_c), b_chunks, m * cols * h),
    }
    # the fused tile against the two launches it replaces, and its launch shapes (tile error vs the unfused path)
    ref_tile = torch.empty_like(tile)
    torch.mm(hg, weight[:cols].t(), out=ref_tile)
    ce_rows(ref_tile, tg, lse, None, grad_out=ref_tile, grad_scale=one, compute_lse=False)
    for cfg in [{}, dict(max_block_n=256, num_warps=8), dict(num_stages=4), dict(block_k=128, num_stages=2)]:
        launch = GradTileLaunch(**cfg)
        try:
            fused = lambda launch=launch: grad_tile_mod.grad_tile(hg, weight, 0, cols, tg, lse, one, tile,
                                                                  launch=launch)
            fused()
            err = rel(tile, ref_tile)
            ms = triton.testing.do_bench(fused, warmup=10, rep=100, return_mode="median")
            rows.append(dict(kind="breakdown", case=f"x{-(-v // cols)} chunks",
                             impl=f"B: fused grad tile {cfg or 'default'}", ms=round(ms, 4),
                             TFLOPs=round(2 * m * cols * h / ms / 1e9, 0), rel_vs_unfused=err))
        except Exception as e:
            rows.append(dict(kind="breakdown", case="fused grad tile", impl=str(cfg), error=repr(e)[:160]))
        log(rows[-1])
    for warps in (2, 4, 8):
        parts[f"B: row kernel, {warps} warps"] = (
            lambda w=warps: ce_rows(tile, tg, lse, None, grad_out=tile, grad_scale=one, compute_lse=False,
                                    num_warps=w),
            b_chunks, 0)
    for name, (fn, count, macs) in parts.items():
        ms = triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")
        extra = dict(TFLOPs=round(2 * macs / ms / 1e9, 0)) if macs else {}
        rows.append(dict(kind="breakdown", case=f"x{count} chunks", impl=name, ms=round(ms, 4),
                         ms_all_chunks=round(ms * count, 3), **extra))
        log(rows[-1])
    dh_full = torch.randn_like(hidden)
    whole = {
        "gather rows (nonzero_static + index_select)": lambda: hidden.index_select(
            0, torch.nonzero_static(valid, size=m).squeeze(1)),
        "in-place scatter of dh (Triton, no staging)": lambda: scatter_rows_home(dh_full, targets, m),
        "same move out of place (index_copy_ into zeros)": lambda: torch.zeros_like(dh_full).index_copy_(
            0, idx, dh_full[:m]),
        "host sync (stack of 2 sums + tolist)": lambda: torch.stack([valid.sum(), valid.sum()]).tolist(),
        "backward scale dh, dW (mul_)": lambda: (hidden.mul_(one), weight.mul_(one)),
    }
    for name, fn in whole.items():
        ms = triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")
        rows.append(dict(kind="breakdown", case="whole call", impl=name, ms=round(ms, 3)))
        log(rows[-1])


def lce_profile(rows, shape, tuning, top=6):
    """torch.profiler over one forward+backward of the default layout: wall time, summed GPU kernel time, and the
    kernels that take it (by name, with counts). Shows whether narrow chunks are host-bound or slow in cuBLAS."""
    from torch.profiler import ProfilerActivity, profile

    n, h, v, ignored = shape
    hidden, weight, targets = make_lce_inputs(n, h, v, ignored)
    step = fwd_bwd(lambda: linear_cross_entropy(hidden, weight, targets, tuning=tuning)[0], hidden, weight)
    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) * 1e3
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu = sum(e.self_device_time_total for e in kernels) / 1e3
    case = f"profile N={n} H={h} V={v} ign={ignored} {tuning_fields(tuning) if tuning else 'defaults'}"
    rows.append(dict(kind="profile", case=case, impl="whole call", ms=round(wall, 2), gpu_ms=round(gpu, 2)))
    log(rows[-1])
    for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:top]:
        rows.append(dict(kind="profile", case=case, impl=e.key[:70], gpu_ms=round(e.self_device_time_total / 1e3, 3),
                         count=e.count))
        log(rows[-1])
    host = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CPU]
    for e in sorted(host, key=lambda e: -e.self_cpu_time_total)[:top]:  # host time per op (profiler-inflated)
        rows.append(dict(kind="profile", case=case, impl=f"host: {e.key[:64]}",
                         cpu_ms=round(e.self_cpu_time_total / 1e3, 3), count=e.count))
        log(rows[-1])
    del hidden, weight, targets
    torch.cuda.empty_cache()


def lce_host_costs(rows, shape, calls=200):
    """Host (enqueue) time per call of each piece of a pass-B chunk at the shape's default tile, after a sync and
    with nothing waited on: what a host-bound call of the op is made of."""
    from fastsft.kernels._ce_rows import ce_rows

    n, h, v, ignored = shape
    hidden, weight, targets = make_lce_inputs(n, h, v, ignored)
    hidden, weight = hidden.detach(), weight.detach()
    rows_idx = torch.nonzero(targets >= 0).squeeze(1).to(torch.int32)
    m = rows_idx.numel()
    cols = lce_mod.vocab_per_chunk(m, v, hidden.dtype)
    hg = hidden.index_select(0, rows_idx)
    tile = torch.empty(m, cols, dtype=hidden.dtype, device="cuda")
    dw = torch.empty(cols, h, dtype=hidden.dtype, device="cuda")
    lse = torch.randn(m, device="cuda").abs() + 5
    one = torch.ones((), device="cuda")
    weight_t = weight.t()
    pieces = {
        "torch.mm(h, W^T slice, out=tile)": lambda: torch.mm(hg, weight_t[:, :cols], out=tile),
        "ce_rows (Triton launch, row index)": lambda: ce_rows(tile, targets, lse, None, grad_out=tile,
                                                              grad_scale=one, compute_lse=False, col_offset=0,
                                                              row_index=rows_idx),
        "torch.mm(tile^T, h, out=dW slice)": lambda: torch.mm(tile.t(), hg, out=dw),
        "one slice (aten::slice)": lambda: weight_t[:, :cols],
    }
    for name, fn in pieces.items():
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        us = (time.perf_counter() - t0) / calls * 1e6
        torch.cuda.synchronize()
        rows.append(dict(kind="host", case=f"pass B piece, tile {m}x{cols}", impl=name, host_us=round(us, 1)))
        log(rows[-1])
    del hidden, weight, targets, hg, tile, dw
    torch.cuda.empty_cache()


def lm_head_ce(rows):
    """Materialized logits after an lm_head: where inplace_backward saves the (N, V) gradient buffer."""
    n, h, v = 32768, 1024, 65536
    hidden, weight, targets = make_lce_inputs(n, h, v, 0.5, seed=3)
    case = f"lm_head + ce N={n} H={h} V={v} ign=0.5"

    @torch.compile
    def compiled(hidden, weight, targets):
        return F.cross_entropy((hidden @ weight.t()).float(), targets, ignore_index=-1, reduction="sum")

    variants = [("fastsft cross_entropy", lambda: cross_entropy(hidden @ weight.t(), targets)[0]),
                ("fastsft cross_entropy inplace_backward",
                 lambda: cross_entropy(hidden @ weight.t(), targets, inplace_backward=True)[0]),
                ("torch.compile bf16 matmul + fp32 CE", lambda: compiled(hidden, weight, targets))]
    for impl, fn in variants:
        ms, mem = time_and_memory(fwd_bwd(fn, hidden, weight), (hidden, weight))
        rows.append(dict(kind="time", case=case, impl=impl, ms=round(ms, 3), extra_GiB=round(mem, 3)))
        log(rows[-1])
    del hidden, weight, targets
    torch.cuda.empty_cache()


def ce_bench(rows):
    n, v = 32768, 65536
    gen = torch.Generator(device="cuda").manual_seed(2)
    base = (torch.randn(n, v, device="cuda", generator=gen) * 3).to(torch.bfloat16)
    for ignored in (0.0, 0.5):
        targets = torch.randint(0, v, (n,), device="cuda", generator=gen)
        if ignored:
            targets[torch.rand(n, device="cuda", generator=gen) < ignored] = -1
        case = f"ce bf16 {n}x{v} ign={ignored}"
        # correctness
        x = base.clone().requires_grad_()
        loss, cnt = cross_entropy(x, targets)
        loss.backward()
        g = x.grad
        x.grad = None
        ref, _ = cross_entropy_reference(x, targets)
        ref.backward()
        rows.append(dict(kind="correctness", case=case, impl="fastsft",
                         loss_rel=abs(loss.item() - ref.item()) / ref.item(),
                         n_ok=int(cnt) == int((targets >= 0).sum()), grad_rel=rel(g, x.grad)))
        log(rows[-1])
        del x, g, ref
        torch.cuda.empty_cache()

        x = base.clone().requires_grad_()
        compiled = torch.compile(lambda x, t: F.cross_entropy(x.float(), t, ignore_index=-1, reduction="sum"))
        variants = [("fastsft", lambda: cross_entropy(x, targets)[0]),
                    ("torch.compile F.cross_entropy", lambda: compiled(x, targets))]
        for impl, fn in variants:
            try:
                ms, mem = time_and_memory(fwd_bwd(fn, x), (x,))
                gbytes = x.numel() * 2 * 3 / 1e9  # read fwd + read and write bwd
                rows.append(dict(kind="time", case=case, impl=impl, ms=round(ms, 3), extra_GiB=round(mem, 3),
                                 TBps_3pass=round(gbytes / ms, 2)))
            except Exception as e:
                rows.append(dict(kind="time", case=case, impl=impl, error=repr(e)[:160]))
            log(rows[-1])
        del x
        torch.cuda.empty_cache()


def print_table(rows):
    keys = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    widths = {k: max(len(k), *(len(str(r.get(k, ""))) for r in rows)) for k in keys}
    log(" | ".join(k.ljust(widths[k]) for k in keys))
    for r in rows:
        log(" | ".join(str(r.get(k, "")).ljust(widths[k]) for k in keys))


def main(quick=False, parts=("lce_check", "lce_time", "breakdown", "ce")):
    assert torch.cuda.is_available(), "bench/gpu_loss.py needs a CUDA device"
    rows = [dict(kind="env", case=torch.cuda.get_device_name(),
                 impl=f"torch {torch.__version__} triton {triton.__version__}")]
    log(f"device: {rows[0]['case']} | {rows[0]['impl']}")
    impls, errors = outside_impls()
    t0 = time.time()
    if "lce_check" in parts:
        scatter_check(rows)
        for shape in LCE_SHAPES:
            lce_correctness(rows, shape)
    if "lce_time" in parts:
        for shape, sweep, fast_sweep in zip(LCE_SHAPES, SWEEPS, FAST_SWEEPS):
            lce_timings(rows, shape, impls, errors, sweep=None if quick else sweep,
                        fast_sweep=None if quick else fast_sweep)
    if "breakdown" in parts:
        lce_breakdown(rows, LCE_SHAPES[0])
    if "host" in parts:
        lce_host_costs(rows, LCE_SHAPES[0])
    if "profile" in parts:
        for shape in LCE_SHAPES:
            for tuning in PROFILE_TUNINGS:
                lce_profile(rows, shape, tuning)
    if "ce" in parts:
        ce_bench(rows)
        lm_head_ce(rows)
    log(f"bench wall {time.time() - t0:.0f} s")
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--parts", default="lce_check,lce_time,breakdown,ce")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args()
    rows = main(quick=args.quick, parts=tuple(args.parts.split(",")))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    print_table(rows)
    sys.exit(0)
