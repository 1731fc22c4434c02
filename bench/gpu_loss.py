"""GPU benchmark of the loss kernels: linear_cross_entropy and cross_entropy against the compiled reference,
Liger's fused linear cross-entropy and Apple's cut-cross-entropy (CCE), at full size.

Prints a table last; `main()` returns its rows (list of dicts) for a combined kernels script. Liger and CCE are
optional imports: a failure is reported as a row and the run goes on. Timings are forward+backward medians of
triton.testing.do_bench; memory is the peak of torch.cuda.max_memory_allocated above what was allocated before
the call (gradients included, inputs excluded).

    python bench/gpu_loss.py            # everything
    python bench/gpu_loss.py --quick    # skip the tuning sweeps
"""

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F
import triton
import triton.testing

import fastsft.kernels.linear_cross_entropy as lce_mod
from fastsft.kernels.cross_entropy import cross_entropy, cross_entropy_reference
from fastsft.kernels.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_reference

GiB = 2**30
LCE_SHAPES = [  # (N, H, V, fraction of targets ignored)
    (32768, 1024, 65536, 0.5),
    (16384, 2048, 151936, 0.0),
]


SWEEPS = [  # (CHUNK_BYTES MiB, MIN_CHUNK_ROWS, DW_ACCUM_FP32) tried besides the default, per LCE shape
    [(256, 2048, False), (256, 4096, True), (1024, 2048, True), (1024, 2048, False)],
    [(256, 2048, False), (256, 4096, True), (256, 4096, False)],
]


def log(*args):
    print(*args, flush=True)


def make_lce_inputs(n, h, v, ignored, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    hidden = torch.randn(n, h, device="cuda", generator=gen, dtype=torch.bfloat16)
    weight = (torch.randn(v, h, device="cuda", generator=gen) / h**0.5 * 2).to(torch.bfloat16)
    targets = torch.randint(0, v, (n,), device="cuda", generator=gen)
    if ignored:
        targets[torch.rand(n, device="cuda", generator=gen) < ignored] = -1
    return hidden.requires_grad_(), weight.requires_grad_(), targets


def fwd_bwd(loss_fn, *tensors):
    def step():
        for t in tensors:
            t.grad = None
        loss_fn().backward()
    return step


def time_and_memory(step, tensors):
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
    ms = triton.testing.do_bench(step, warmup=10, rep=60, return_mode="median")
    for t in tensors:
        t.grad = None
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
    hidden, weight, targets = make_lce_inputs(n, h, v, ignored, seed=1)
    for softcap in (None, 15.0):
        loss, cnt = linear_cross_entropy(hidden, weight, targets, softcap)
        loss.backward()
        gh, gw = hidden.grad, weight.grad
        hidden.grad = weight.grad = None
        ref, ref_n = linear_cross_entropy_reference(hidden, weight, targets, softcap)
        ref.backward()
        rows.append(dict(kind="correctness", case=f"lce N={n} H={h} V={v} ign={ignored} softcap={softcap}",
                         impl="fastsft", loss_rel=abs(loss.item() - ref.item()) / abs(ref.item()),
                         n_ok=int(cnt) == int(ref_n), dh_rel=rel(gh, hidden.grad), dw_rel=rel(gw, weight.grad)))
        log(rows[-1])
        hidden.grad = weight.grad = None
        del ref, gh, gw
        torch.cuda.empty_cache()


def lce_timings(rows, shape, impls, errors, sweep):
    n, h, v, ignored = shape
    case = f"lce N={n} H={h} V={v} ign={ignored}"
    hidden, weight, targets = make_lce_inputs(n, h, v, ignored)
    tensors = (hidden, weight)
    compiled_ref = torch.compile(linear_cross_entropy_reference)  # fp32 matmul: the exactness reference

    @torch.compile
    def compiled_bf16(hidden, weight, targets):  # what nanochat does: bf16 matmul, fp32 logits, F.cross_entropy
        logits = (hidden @ weight.t()).float()
        return F.cross_entropy(logits, targets, ignore_index=-1, reduction="sum")

    def add(impl, fn, **extra):
        try:
            ms, mem = time_and_memory(fwd_bwd(lambda: fn(hidden, weight, targets), *tensors), tensors)
            rows.append(dict(kind="time", case=case, impl=impl, ms=round(ms, 3), extra_GiB=round(mem, 3), **extra))
        except Exception as e:
            rows.append(dict(kind="time", case=case, impl=impl, error=repr(e)[:160]))
        log(rows[-1])
        torch.cuda.empty_cache()

    add("fastsft", lambda *a: linear_cross_entropy(*a)[0], chunk_MiB=lce_mod.CHUNK_BYTES // 2**20,
        min_rows=lce_mod.MIN_CHUNK_ROWS, dw_fp32=lce_mod.DW_ACCUM_FP32)
    if v <= 65536:  # at V=151936 it runs ~0.6 s per step: not a contender, and slow to time
        add("torch.compile reference (fp32 matmul)", lambda *a: compiled_ref(*a)[0])
    add("torch.compile bf16 matmul + fp32 CE", compiled_bf16)
    for name, fn in impls.items():
        add(name, fn)
    for name, err in errors.items():
        rows.append(dict(kind="time", case=case, impl=name, error=err))
    if sweep:
        default = (lce_mod.CHUNK_BYTES, lce_mod.MIN_CHUNK_ROWS, lce_mod.DW_ACCUM_FP32)
        for chunk_mib, min_rows, dw_fp32 in sweep:
            lce_mod.CHUNK_BYTES, lce_mod.MIN_CHUNK_ROWS, lce_mod.DW_ACCUM_FP32 = chunk_mib * 2**20, min_rows, dw_fp32
            add("fastsft sweep", lambda *a: linear_cross_entropy(*a)[0], chunk_MiB=chunk_mib, min_rows=min_rows,
                dw_fp32=dw_fp32)
        lce_mod.CHUNK_BYTES, lce_mod.MIN_CHUNK_ROWS, lce_mod.DW_ACCUM_FP32 = default
    del hidden, weight, targets
    torch.cuda.empty_cache()


def lce_breakdown(rows, shape):
    """Per-part times of one default-size row chunk of linear_cross_entropy, and of one host sync."""
    from fastsft.kernels._ce_rows import ce_rows

    n, h, v, ignored = shape
    hidden, weight, targets = make_lce_inputs(n, h, v, ignored)
    hidden, weight = hidden.detach(), weight.detach()
    rows_c = lce_mod.rows_per_chunk(n, v, hidden.dtype)
    m = int((targets >= 0).sum())
    n_chunks = -(-m // rows_c)
    valid = targets >= 0
    idx = torch.nonzero_static(valid, size=m).squeeze(1)
    h_c, t_c = hidden[:rows_c], targets.clamp(min=0)[:rows_c]
    logits = torch.empty(rows_c, v, dtype=hidden.dtype, device="cuda")
    lse = torch.empty(rows_c, device="cuda")
    loss = torch.empty(rows_c, device="cuda")
    one = torch.ones((), device="cuda")
    dh_c = torch.empty(rows_c, h, dtype=hidden.dtype, device="cuda")
    acc32 = torch.zeros(v, h, device="cuda")
    acc16 = torch.zeros(v, h, dtype=hidden.dtype, device="cuda")
    torch.mm(h_c, weight.t(), out=logits)
    parts = {
        "mm logits": lambda: torch.mm(h_c, weight.t(), out=logits),
        "row kernel (lse+loss+dlogits)": lambda: ce_rows(logits, t_c, lse, loss, grad_out=logits, grad_scale=one),
        "mm dh": lambda: torch.mm(logits, weight, out=dh_c),
        "addmm dW fp32 acc": lambda: lce_mod._accumulate_dw(acc32, logits, h_c, first=False),
        "addmm dW bf16 acc": lambda: lce_mod._accumulate_dw(acc16, logits, h_c, first=False),
        "mm dW (first chunk, bf16 out)": lambda: torch.mm(logits.t(), h_c, out=acc16),
    }
    flops = 2 * rows_c * v * h
    for name, fn in parts.items():
        ms = triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")
        extra = dict(TFLOPs=round(flops / ms / 1e9, 0)) if "mm" in name else {}
        rows.append(dict(kind="breakdown", case=f"{rows_c} rows x V={v} x H={h}, {n_chunks} chunks", impl=name,
                         ms=round(ms, 3), ms_all_chunks=round(ms * n_chunks, 3), **extra))
        log(rows[-1])
    whole = {
        "gather rows (nonzero_static + index_select)": lambda: hidden.index_select(
            0, torch.nonzero_static(valid, size=m).squeeze(1)),
        "scatter dh (zeros + index_copy_)": lambda: torch.zeros_like(hidden).index_copy_(0, idx, hidden[:m]),
        "host sync (stack of 2 sums + tolist)": lambda: torch.stack([valid.sum(), valid.sum()]).tolist(),
        "backward scale dh, dW (mul_)": lambda: (hidden.mul_(one), weight.mul_(one)),
    }
    for name, fn in whole.items():
        ms = triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")
        rows.append(dict(kind="breakdown", case="whole call", impl=name, ms=round(ms, 3)))
        log(rows[-1])


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
    log(rows[0])
    impls, errors = outside_impls()
    t0 = time.time()
    if "lce_check" in parts:
        for shape in LCE_SHAPES:
            lce_correctness(rows, shape)
    if "lce_time" in parts:
        for shape, sweep in zip(LCE_SHAPES, SWEEPS):
            lce_timings(rows, shape, impls, errors, sweep=None if quick else sweep)
    if "breakdown" in parts:
        lce_breakdown(rows, LCE_SHAPES[0])
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
