"""GPU benchmark of the fused optimizer steps against their baselines, printed as one table.

AdamW: 124M fp32 parameters in GPT-2-small shapes (nanoGPT layout, tied head: 148 tensors) against
torch.optim.AdamW(fused=True) and (foreach=True), plus bf16 parameters with fp32 moments; the bandwidth floor is
the bytes a step must move divided by the measured device-copy bandwidth.
Muon: the matrices d20 gives to Muon (GPTConfig.from_name("d20") through bench/shapes.py: c_q, c_k, c_v, c_proj
1280x1280, c_fc 5120x1280, mlp c_proj 1280x5120, value-embedding gates) against the plain-PyTorch reference of the same math (kernels/muon.py) under torch.compile,
with both Gram backends (gram="triangle", the default; gram="bmm", the reference's order on cuBLAS).
Each comparison first checks agreement after a few steps from identical inputs.

Run: python bench/gpu_optim.py [--muon-only] [--sweep]   (needs CUDA; --sweep adds the Gram kernel's tile configs
against cuBLAS per stack, elementwise block sizes and a torch.profiler kernel table of one Muon step)
"""

import math
import sys

import torch
import triton
from triton.testing import do_bench

from fastsft.kernels.adamw import AdamW
from fastsft.kernels.muon import Muon, muon_reference_step, ns_coefficients
from shapes import parameter_shapes

# AdamW's shapes are GPT-2 small's on purpose: the figure torch's fused AdamW is compared at (DESIGN.md), not a
# fastsft model; model shapes come from GPTConfig.from_name.
GPT2_SMALL = dict(vocab=50257, ctx=1024, n_embd=768, n_layer=12)


def gpt2_small_shapes():
    V, T, C, L = GPT2_SMALL["vocab"], GPT2_SMALL["ctx"], GPT2_SMALL["n_embd"], GPT2_SMALL["n_layer"]
    shapes = [(V, C), (T, C)]
    for _ in range(L):
        shapes += [(C,), (C,), (3 * C, C), (3 * C,), (C, C), (C,), (C,), (C,), (4 * C, C), (4 * C,), (C, 4 * C), (C,)]
    return shapes + [(C,), (C,)]


def d20_matrix_shapes():
    return parameter_shapes("d20", muon=True)


def copy_bandwidth(device):
    """Bytes per second of a large device-to-device copy (read + write)."""
    src = torch.empty(1 << 28, dtype=torch.float32, device=device)  # 1 GiB
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=10, rep=200, return_mode="median")
    return 2 * src.numel() * 4 / (ms * 1e-3)


def make_params(shapes, dtype, device, seed, scale=0.02):
    g = torch.Generator(device=device).manual_seed(seed)
    return [torch.nn.Parameter((torch.randn(s, generator=g, device=device) * scale).to(dtype)) for s in shapes]


def set_grads(params, seed):
    g = torch.Generator(device=params[0].device).manual_seed(seed)
    for p in params:
        p.grad = (torch.randn(p.shape, generator=g, device=p.device) * 1e-3).to(p.dtype)


def bench_step(opt):
    return do_bench(opt.step, warmup=10, rep=300, return_mode="median")


def adamw_rows(device, bandwidth):
    rows = []
    shapes = gpt2_small_shapes()
    n = sum(math.prod(s) for s in shapes)
    hyper = dict(lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)

    # Agreement with torch after 3 steps (fp32).
    ref, mine = make_params(shapes, torch.float32, device, 0), make_params(shapes, torch.float32, device, 0)
    opt_ref, opt_mine = torch.optim.AdamW(ref, fused=True, **hyper), AdamW(mine, **hyper)
    for s in range(3):
        set_grads(ref, s), set_grads(mine, s)
        opt_ref.step(), opt_mine.step()
    err = max((a - b).abs().max().item() for a, b in zip(ref, mine))
    rows.append(dict(what=f"AdamW fp32 max|mine - torch fused| after 3 steps ({len(shapes)} tensors, {n/1e6:.1f}M)",
                     value=f"{err:.2e}", unit="abs"))

    floor32 = 28 * n / bandwidth * 1e3  # read p, g, m, v; write p, m, v (fp32)
    t_fused = bench_step(opt_ref)
    rows.append(dict(what="AdamW fp32 torch fused", value=f"{t_fused:.3f}", unit="ms"))
    del opt_ref
    ref_fe = make_params(shapes, torch.float32, device, 0)
    set_grads(ref_fe, 0)
    opt_fe = torch.optim.AdamW(ref_fe, foreach=True, **hyper)
    rows.append(dict(what="AdamW fp32 torch foreach", value=f"{bench_step(opt_fe):.3f}", unit="ms"))
    del opt_fe, ref_fe
    best = None
    for block in (1024, 2048, 4096, 8192):
        for warps in (4, 8):
            opt = AdamW(mine, block_size=block, num_warps=warps, **hyper)
            opt.load_state_dict(opt_mine.state_dict())
            t = bench_step(opt)
            best = t if best is None else min(best, t)
            rows.append(dict(what=f"AdamW fp32 fastsft block={block} warps={warps}", value=f"{t:.3f}", unit="ms",
                             note=f"{t / t_fused:.2f}x fused; {floor32 / t * 100:.0f}% of floor"))
    rows.append(dict(what="AdamW fp32 bandwidth floor (28 B/param)", value=f"{floor32:.3f}", unit="ms",
                     note=f"copy bw {bandwidth / 1e12:.2f} TB/s"))
    del opt_mine, mine, ref

    # bf16 parameters: ours keeps fp32 moments; torch fused keeps bf16 moments (less traffic, less precision).
    mine = make_params(shapes, torch.bfloat16, device, 0)
    set_grads(mine, 0)
    t_mine = bench_step(AdamW(mine, **hyper))
    ref = make_params(shapes, torch.bfloat16, device, 0)
    set_grads(ref, 0)
    t_ref = bench_step(torch.optim.AdamW(ref, fused=True, **hyper))
    floor16 = 22 * n / bandwidth * 1e3
    rows.append(dict(what="AdamW bf16 params, fastsft (fp32 moments)", value=f"{t_mine:.3f}", unit="ms",
                     note=f"floor {floor16:.3f} ms (22 B/param): {floor16 / t_mine * 100:.0f}%"))
    rows.append(dict(what="AdamW bf16 params, torch fused (bf16 moments)", value=f"{t_ref:.3f}", unit="ms",
                     note="floor 14 B/param: not the same math"))
    return rows


def muon_setup(device):
    shapes = d20_matrix_shapes()
    groups = {}
    for i, s in enumerate(shapes):
        groups.setdefault(s, []).append(i)
    return shapes, groups


def muon_rows(device, sweep=False):
    rows = []
    shapes, groups = muon_setup(device)
    n = sum(math.prod(s) for s in shapes)
    hyper = dict(lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.1)
    coefficients = ns_coefficients("polar_express", 5)

    mine = make_params(shapes, torch.float32, device, 1)
    ref = [p.detach().clone() for p in mine]
    bufs = {s: torch.zeros(len(idx), *s, device=device) for s, idx in groups.items()}
    compiled = torch.compile(muon_reference_step, dynamic=False)

    def ref_step():
        for s, idx in groups.items():
            compiled([ref[i] for i in idx], [ref_grads[i] for i in idx], bufs[s], coefficients=coefficients, **hyper)

    opts = {gram: Muon(p, ns_steps=5, gram=gram, **hyper)
            for gram, p in (("triangle", mine), ("bmm", [q.detach().clone().requires_grad_() for q in mine]))}
    start = [p.detach().clone() for p in mine]
    for step in range(2):
        set_grads(mine, 10 + step)
        ref_grads = [p.grad.clone() for p in mine]
        for p, g in zip(opts["bmm"].param_groups[0]["params"], ref_grads):
            p.grad = g.clone()
        for opt in opts.values():
            opt.step()
        ref_step()
    for gram, opt in opts.items():
        ps = opt.param_groups[0]["params"]
        rel = max(((a.detach() - s) - (b - s)).norm().item() / (b - s).norm().item() for a, b, s in zip(ps, ref, start))
        rows.append(dict(what=f"Muon d20 gram={gram}: max rel diff of param change vs reference, 2 steps",
                         value=f"{rel:.3f}", unit="rel", note=f"{n/1e6:.0f}M params; bf16 noise"))
    del start

    t_ref = do_bench(ref_step, warmup=3, rep=1000, return_mode="median")
    rows.append(dict(what="Muon d20 torch.compile'd reference", value=f"{t_ref:.2f}", unit="ms"))
    for gram, opt in opts.items():
        t = do_bench(opt.step, warmup=3, rep=1000, return_mode="median")
        rows.append(dict(what=f"Muon d20 fastsft gram={gram}", value=f"{t:.2f}", unit="ms",
                         note=f"{t / t_ref:.2f}x reference (goal <= 0.80)"))

    # Where the time goes: the orthogonalization alone (normalization folded in), on each optimizer's workspaces.
    from fastsft.kernels.muon import orthogonalize_
    flops_full = flops_tri = 0
    for s, idx in groups.items():
        m, k = min(s), max(s)
        flops_full += len(idx) * 5 * (4 * m * m * k + 2 * m ** 3)
        flops_tri += len(idx) * 5 * (3 * m * m * k + m ** 3)
    for gram, opt in opts.items():
        stacks = list(opt._stacks.values())
        scales = [torch.full((st.workspace.K,), 1e-3, device=device) for st in stacks]
        t_mm = do_bench(lambda: [orthogonalize_(st.workspace, coefficients, sc) for st, sc in zip(stacks, scales)],
                        warmup=3, rep=500, return_mode="median")
        rows.append(dict(what=f"Muon d20 orthogonalization only, gram={gram}", value=f"{t_mm:.2f}", unit="ms",
                         note=f"{flops_full / (t_mm * 1e-3) / 1e12:.0f} TFLOP/s of the full-matrix FLOPs "
                              f"({(flops_tri if gram == 'triangle' else flops_full) / 1e12:.1f} TFLOP done)"))
    if sweep:
        rows += muon_sweep(device, opts["triangle"], hyper, coefficients)
    return rows


GRAM_CONFIGS = ((128, 64, 8, 3), (128, 64, 8, 4), (128, 64, 4, 4), (128, 32, 8, 5), (128, 128, 8, 2),
                (64, 64, 4, 4), (128, 64, 8, 5))  # (tile, bk, warps, stages)


def muon_sweep(device, opt, hyper, coefficients):
    """Exploration: the Gram kernel's tile configs against cuBLAS per stack and in the whole step, elementwise
    block sizes, and a kernel table of a few steps from torch.profiler."""
    from fastsft.kernels.muon import gram_
    rows = []
    stacks = list(opt._stacks.values())
    cublas = {}
    for st in stacks:
        ws = st.workspace
        K, r, c = ws.K, ws.rows, ws.cols
        m, L = min(r, c), max(r, c)
        x = ws.x  # (K, r, c) the last step's bf16 data
        t_cb = do_bench(lambda: torch.bmm(x.mT, x, out=ws.a) if ws.tall else torch.bmm(x, x.mT, out=ws.a),
                        warmup=5, rep=200, return_mode="median")
        t_aa = do_bench(lambda: torch.baddbmm(ws.a, ws.a, ws.a, beta=0.5, alpha=0.5, out=ws.b),
                        warmup=5, rep=200, return_mode="median")
        t_bx = do_bench(lambda: torch.bmm(x, ws.b, out=ws.x_next) if ws.tall else torch.bmm(ws.b, x, out=ws.x_next),
                        warmup=5, rep=200, return_mode="median")
        t_bx_add = do_bench(lambda: torch.baddbmm(x, x, ws.b, beta=2.0, out=ws.x_next) if ws.tall
                            else torch.baddbmm(x, ws.b, x, beta=2.0, out=ws.x_next),
                            warmup=5, rep=200, return_mode="median")
        cublas[id(st)] = (t_cb, t_aa)
        name = f"K={K} {r}x{c}"
        rows.append(dict(what=f"  {name} cuBLAS bmm X X^T (full)", value=f"{t_cb:.3f}", unit="ms",
                         note=f"{2 * K * m * m * L / t_cb / 1e9:.0f} TFLOP/s"))
        rows.append(dict(what=f"  {name} cuBLAS baddbmm b A + c A A", value=f"{t_aa:.3f}", unit="ms",
                         note=f"{2 * K * m ** 3 / t_aa / 1e9:.0f} TFLOP/s"))
        rows.append(dict(what=f"  {name} cuBLAS bmm B' X", value=f"{t_bx:.3f}", unit="ms",
                         note=f"baddbmm a X + B X: {t_bx_add:.3f} ms"))
    params = opt.param_groups[0]["params"]
    for cfg in GRAM_CONFIGS:
        tile, bk, warps, stages = cfg
        label = f"tile={tile} bk={bk} w={warps} s={stages}"
        try:
            for st in stacks:
                ws = st.workspace
                ws.set_gram_config(*cfg)
                x = ws.x
                t = do_bench(lambda: gram_(ws, x, ws.a, gram_of_columns=ws.tall), warmup=5, rep=200,
                             return_mode="median")
                want = torch.bmm(x.mT, x) if ws.tall else torch.bmm(x, x.mT)
                err = ((ws.a.float() - want.float()).abs().max() / want.float().abs().max()).item()
                t2 = do_bench(lambda: gram_(ws, ws.a, ws.b, gram_of_columns=False, alpha=0.5, beta=0.5, diag=1.0,
                                            d=ws.a), warmup=5, rep=200, return_mode="median")
                t_cb, t_aa = cublas[id(st)]
                rows.append(dict(what=f"  K={ws.K} {ws.rows}x{ws.cols} triangle X X^T {label}", value=f"{t:.3f}",
                                 unit="ms", note=f"{t / t_cb:.2f}x cuBLAS; B' {t2:.3f} ms = {t2 / t_aa:.2f}x; "
                                                 f"err {err:.1e}"))
            t = do_bench(opt.step, warmup=3, rep=300, return_mode="median")
            rows.append(dict(what=f"  Muon step, Gram {label}", value=f"{t:.2f}", unit="ms"))
        except Exception as e:  # noqa: BLE001 - a config that does not compile is a row, not a crash
            rows.append(dict(what=f"  Gram {label} FAILED", value="-", unit="", note=f"{type(e).__name__}: {e}"[:80]))
    for st in stacks:
        st.workspace.set_gram_config()
    for block, warps in ((2048, 4), (4096, 4), (4096, 8), (8192, 8)):
        o = Muon(params, ns_steps=5, block=block, num_warps=warps, **hyper)
        t = do_bench(o.step, warmup=3, rep=300, return_mode="median")
        rows.append(dict(what=f"  Muon step block={block} warps={warps}", value=f"{t:.2f}", unit="ms"))
        del o
    from torch.profiler import ProfilerActivity, profile
    opt.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            opt.step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=70))
    return rows


def main():
    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu_optim.py needs a CUDA device")
    device = torch.device("cuda")
    bandwidth = copy_bandwidth(device)
    rows = []
    sections = [lambda: muon_rows(device, sweep="--sweep" in sys.argv)]
    if "--muon-only" not in sys.argv:
        sections.insert(0, lambda: adamw_rows(device, bandwidth))
    for section in sections:
        try:  # one failing section still leaves the other's numbers
            rows += section()
        except Exception as e:  # noqa: BLE001 - reported in the table
            import traceback
            traceback.print_exc()
            rows.append(dict(what=f"FAILED: {type(e).__name__}: {e}"[:84], value="-", unit=""))
        torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":
    rows = main()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"python {sys.version.split()[0]}")
    print(f"{'what':<84} {'value':>10} {'unit':<5} note")
    for r in rows:
        print(f"{r['what']:<84} {r['value']:>10} {r['unit']:<5} {r.get('note', '')}")
