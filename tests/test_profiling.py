"""StepProfiler on the CPU: a tiny model's training steps give a chrome trace with the phase ranges, a per-family
table whose matmul time is real, and nothing once the profiled steps are over."""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fastsft.model import GPT, GPTConfig
from fastsft.profiling import FAMILIES, StepProfiler, kernel_family


def tiny_training(steps, profiler):
    torch.manual_seed(0)
    config = GPTConfig(sequence_len=32, vocab_size=97, n_layer=2, n_head=2, n_kv_head=2, n_embd=32,
                       window_pattern="L")
    model = GPT(config)
    model.init_weights()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(steps):
        with profiler.range("data"):
            ids = torch.randint(0, 97, (2, 32))
        with profiler.range("forward"):
            loss = model(ids).float().square().mean()
        with profiler.range("backward"):
            loss.backward()
        with profiler.range("optimizer"):
            opt.step()
            opt.zero_grad()
        profiler.step()


def test_profile_writes_a_trace_with_the_phases_and_a_family_table(tmp_path):
    printed = []
    profiler = StepProfiler(tmp_path / "run", steps=2, warmup=1, print_fn=printed.append)
    with profiler:
        tiny_training(5, profiler)  # 1 warm-up, 2 profiled, 2 after: those record nothing
    assert profiler.done
    trace = json.loads(profiler.trace_path.read_text())
    names = {event.get("name") for event in trace["traceEvents"]}
    assert {"data", "forward", "backward", "optimizer"} <= names
    assert sum(name.startswith("ProfilerStep") for name in names if name) == 2  # only the profiled steps
    assert set(profiler.families) == set(FAMILIES)
    assert profiler.families["matmul"] > 0  # the model's projections, found by name
    assert not any(k.name in ("data", "forward", "backward", "optimizer") for k in profiler.kernels)
    # torch's own annotation around an optimizer step spans the work inside it: counting it would count that twice
    assert not any(k.name.startswith("Optimizer.") for k in profiler.kernels)
    assert any(k.family == "optimizer" for k in profiler.kernels)  # the step's own ops are still there
    [report] = printed
    assert "matmul" in report and "profile_trace.json" in report and "top " in report
    mm = next(k for k in profiler.kernels if k.family == "matmul")
    assert mm.calls_per_step > 0 and mm.ms_per_step > 0


def test_disabled_profiler_records_nothing(tmp_path):
    profiler = StepProfiler(tmp_path / "run", steps=0)
    with profiler:
        tiny_training(1, profiler)
    assert profiler.done and not profiler.kernels and not (tmp_path / "run").exists()
    with pytest.raises(ValueError):
        StepProfiler(tmp_path, steps=-1)


def test_the_device_is_waited_for_where_the_window_opens_and_closes(tmp_path, monkeypatch):
    # The driver's host runs ahead of the GPU: without these two waits the window takes in the warm-up step's
    # kernels. On this machine the waits are counted, not made.
    waits = []
    profiler = StepProfiler(tmp_path / "run", steps=2, warmup=1, print_fn=lambda text: None)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: waits.append(profiler._calls))
    with profiler:
        profiler._on_gpu = True
        for _ in range(4):
            torch.ones(8) @ torch.ones(8)
            profiler.step()
    assert waits == [1, 3]  # after the warm-up step, after the last profiled step


@pytest.mark.parametrize("name, family", [
    ("kernel_cutlass_kernel_flash_attncuteflash_fwd_sm90FlashAttentionForwardSm90", "attention"),
    ("flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel", "attention"),
    ("pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits>", "attention"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64", "matmul"),
    ("nvjet_tst_192x192_64x3_2x1_v_bz_coopA_TNT", "matmul"),
    ("triton_tem_fused_mm_0", "matmul"),
    ("aten::mm", "matmul"),
    ("_ce_rows_kernel", "loss"),
    ("_grad_tile_kernel", "loss"),
    ("_adamw_kernel", "optimizer"),
    ("_muon_momentum_kernel", "optimizer"),
    ("_gram_kernel", "optimizer"),
    ("Optimizer.step#AdamW.step", "optimizer"),  # torch's annotation of an optimizer step (CPU profiles)
    ("triton_poi_fused__to_copy_add_mul_0", "elementwise"),
    ("triton_red_fused__fused_rms_norm_1", "elementwise"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::BinaryFunctor<float, float, float>>",
     "elementwise"),
    ("void at::native::unrolled_elementwise_kernel<at::native::CUDAFunctor_add<float>>", "elementwise"),
    ("Memcpy DtoD (Device -> Device)", "copy/other"),
    ("void at::native::(anonymous namespace)::CatArrayBatchedCopy<float>", "copy/other"),
    ("void at::native::embedding_backward_feature_kernel<float, float, long>", "copy/other"),
    ("some_unknown_kernel", "copy/other"),
])
def test_kernel_families(name, family):
    assert kernel_family(name) == family


def test_triton_compiles_names_each_cache_miss_and_keeps_the_hook_before_it():
    import triton

    from fastsft.profiling import triton_compiles

    runtime = triton.knobs.runtime
    seen = []
    before = runtime.jit_cache_hook

    def outer(**kwargs):
        seen.append(kwargs["fn"].name)
        return False  # a truthy return would tell Triton to skip the compile

    runtime.jit_cache_hook = outer
    try:
        with triton_compiles() as names:
            # Triton calls the hook this way on a miss of a kernel's in-process cache (runtime/jit.py, _call_hook)
            for name in ("_scatter_home_kernel", "test_x.<locals>._fresh_kernel"):  # plain, qualified (triton 3.6)
                assert runtime.jit_cache_hook(key="k", repr="r", fn=SimpleNamespace(name=name), compile={},
                                              is_manual_warmup=False, already_compiled=False) is False
        assert names == ["_scatter_home_kernel", "_fresh_kernel"]
        assert seen == ["_scatter_home_kernel", "test_x.<locals>._fresh_kernel"]
        assert runtime.jit_cache_hook is outer  # put back
    finally:
        runtime.jit_cache_hook = before


@pytest.mark.parametrize("module, kernel, data_args", [
    ("fastsft.kernels._scatter_rows", "_scatter_home_kernel", {"n_rows", "n_sup"}),
    ("fastsft.kernels._grad_tile", "_grad_tile_kernel", {"M", "v0"}),
    ("fastsft.kernels._ce_rows", "_ce_rows_kernel", {"col_offset"}),
])
def test_sizes_from_the_data_are_not_specialized(module, kernel, data_args, run_without_interpreter):
    """A size that comes from the data (supervised rows, a vocabulary chunk scheduled from them) must not be part
    of the kernel's specialization key, or a new value compiles the kernel again mid-run (a slow step). Read from
    the compiled kernel object, as a GPU run has it (the interpreter's has no specialization)."""
    code, out, err = run_without_interpreter(
        f"import importlib; fn = getattr(importlib.import_module({module!r}), {kernel!r}); "
        "import json; print(json.dumps([p.name for p in fn.params if p.do_not_specialize]))")
    assert code == 0, err
    free = set(json.loads(out))
    assert data_args <= free, f"{kernel}: {sorted(data_args - free)} still specialized"


def _event(name, cat, ts, dur, tid=1, **args):
    """One complete ("X") event of a torch.profiler chrome trace."""
    return {"ph": "X", "name": name, "cat": cat, "ts": ts, "dur": dur, "pid": 1, "tid": tid, "args": args}


def _trace_gaps(tmp_path, events) -> str:
    """bench/trace_gaps.py's output for a trace of these events."""
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps({"traceEvents": events}))
    script = Path(__file__).resolve().parents[1] / "bench" / "trace_gaps.py"
    return subprocess.run([sys.executable, str(script), str(trace)], capture_output=True, text=True,
                          check=True).stdout


def test_trace_gaps_counts_each_profiler_step_once_and_finds_the_late_launch(tmp_path):
    """A CUDA trace names each ProfilerStep#N twice (the host's range and its GPU annotation); per-step numbers
    divide by the steps, not by the events. Two steps; one 60 us gap whose kernel was launched after the GPU idled."""
    events = [_event(f"ProfilerStep#{i}", cat, 300 * i, 300) for i in (1, 2)
              for cat in ("user_annotation", "gpu_user_annotation")]
    events += [_event("aten::mm", "cpu_op", 410, 30),
               _event("cudaLaunchKernel", "cuda_runtime", 420, 5, correlation=7),
               _event("k_first", "kernel", 300, 100, correlation=6),
               _event("k_late", "kernel", 460, 100, correlation=7), _event("k_next", "kernel", 565, 100, correlation=8)]
    out = _trace_gaps(tmp_path, events)
    assert "2 steps; GPU span 0.18 ms/step, busy 0.15, idle in gaps > 20 us: 0.03 ms/step" in out
    late = out.split("host late")[1].split("launched in time")[0]
    assert "0.030 ms  x0.5    aten::mm" in late


def test_trace_gaps_sets_each_phases_host_time_against_the_kernels_it_launched(tmp_path):
    """One step: the forward's range takes 200 us of host time and launches two kernels of 30 us (host-bound); the
    backward's kernel is launched from another thread (autograd's) inside the backward's range and takes 300 us."""
    events = [_event("ProfilerStep#1", "user_annotation", 0, 1000), _event("forward", "user_annotation", 0, 200),
              _event("backward", "user_annotation", 200, 400)]
    for corr, (ts, tid) in enumerate([(50, 1), (150, 1), (250, 2)]):
        events.append(_event("cudaLaunchKernel", "cuda_runtime", ts, 5, tid=tid, correlation=corr))
    events += [_event("k_fwd_a", "kernel", 60, 30, correlation=0), _event("k_fwd_b", "kernel", 160, 30, correlation=1),
               _event("k_bwd", "kernel", 260, 300, correlation=2)]
    out = _trace_gaps(tmp_path, events)
    rows = {line.split()[0]: line.split()[1:] for line in out.split("per phase")[1].splitlines()[2:] if line.strip()}
    assert rows["forward"] == ["0.20", "0.06", "2.0", "100.0"]
    assert rows["backward"] == ["0.40", "0.30", "1.0", "400.0"]
    assert "data" not in rows and "optimizer" not in rows


def test_trace_gaps_gives_each_phases_host_ops_by_self_time(tmp_path):
    """One step. Forward (thread 1): a custom op of 100 us launching a kernel (10 us of driver call) after a memset
    (2 us), and an mm of 30 us launching one (5 us). Backward, from autograd's thread 2: a compiled graph's 200 us
    wrapping a scaled mm of 50 us whose launch takes 8. Each op's self time is its own less its children's; phases
    and steps are not ops; each launch and memset is counted under the op that made it."""
    events = [_event("ProfilerStep#1", "user_annotation", 0, 1000), _event("forward", "user_annotation", 0, 200),
              _event("backward", "user_annotation", 200, 400),
              _event("fastsft::varlen_attn_fwd", "cpu_op", 10, 100),
              _event("cudaMemsetAsync", "cuda_runtime", 20, 2),
              _event("cudaLaunchKernel", "cuda_runtime", 50, 10, correlation=0),
              _event("aten::mm", "cpu_op", 120, 30), _event("cudaLaunchKernel", "cuda_runtime", 130, 5, correlation=1),
              _event("CompiledFunctionBackward", "cpu_op", 250, 200, tid=2),
              _event("aten::_scaled_mm", "cpu_op", 300, 50, tid=2),
              _event("cuLaunchKernel", "cuda_driver", 320, 8, tid=2, correlation=2),
              _event("k_fwd_a", "kernel", 60, 30, correlation=0), _event("k_fwd_b", "kernel", 160, 30, correlation=1),
              _event("k_bwd", "kernel", 330, 100, correlation=2)]
    out = _trace_gaps(tmp_path, events)

    def tables(phase):
        section = out.split(f"host self time in {phase}")[1].split("\n\n")[0]
        own, enqueued = section.split("GPU work enqueued")
        lines = own.splitlines()
        return (lines[0], {line.split("us  ")[-1]: line.split()[0] for line in lines[1:]},
                {line.split("ms  ")[-1]: line.split()[0] for line in enqueued.splitlines()[1:]})

    head, forward, enqueued = tables("forward")
    assert "(all ops: 0.13)" in head
    assert forward == {"fastsft::varlen_attn_fwd": "0.088", "aten::mm": "0.025", "cudaLaunchKernel": "0.015",
                       "cudaMemsetAsync": "0.002"}
    assert "x2 " in out.split("host self time in forward")[1].split("cudaLaunchKernel")[0].splitlines()[-1]
    assert enqueued == {"fastsft::varlen_attn_fwd > cudaMemsetAsync": "x1",
                        "fastsft::varlen_attn_fwd > cudaLaunchKernel": "x1", "aten::mm > cudaLaunchKernel": "x1"}
    head, backward, enqueued = tables("backward")
    assert backward == {"CompiledFunctionBackward": "0.150", "aten::_scaled_mm": "0.042", "cuLaunchKernel": "0.008"}
    assert enqueued == {"aten::_scaled_mm > cuLaunchKernel": "x1"}
    assert "host self time in data" not in out and "ProfilerStep" not in out.split("host self time")[1]


def test_gpu_host_cost_runs_every_op_of_a_layer_on_the_cpu(tmp_path):
    """bench/gpu_host_cost.py at tiny shapes on the CPU (the GPU's only ops, the Triton launcher's baseline and
    flash-attn-4, left out): a row per op with both times."""
    script = Path(__file__).resolve().parents[1] / "bench" / "gpu_host_cost.py"
    rows_file = tmp_path / "rows.json"
    out = subprocess.run([sys.executable, str(script), "--device", "cpu", "--calls", "2", "--json", str(rows_file)],
                         capture_output=True, text=True, check=True).stdout
    rows = json.loads(rows_file.read_text())
    assert [r["op"] for r in rows] == [
        "aten add (baseline)", "custom op, empty body (dispatch alone)", "_scaled_mm (q/k/v forward)",
        "quantize e4m3 (torch ops, eager)", "relu_square_fp8 (custom op)", "relu_square_grad_fp8 (custom op)",
        "qkv_grad, maxima (custom op)", "quantize_two_layouts (custom op)", "zero_tail_ (covered batch)",
        "optimizer step (tiny model, whole)"]
    assert all(r["host_us"] > 0 and r["gpu_us"] > 0 and r["model"] == "tiny" for r in rows)
    assert "host against GPU time a call, tiny layer shapes (64 rows" in out


def test_kernel_sources_copies_the_slowest_kernels_of_a_family_from_the_cache(tmp_path):
    cache = tmp_path / "cache"
    (cache / "ab").mkdir(parents=True)
    (cache / "ab" / "cslow.py").write_text("@triton.jit\ndef triton_per_fused_slow_3(in_ptr0, xnumel):\n    pass\n")
    (cache / "ab" / "cfast.py").write_text("def triton_poi_fused_fast_1(in_ptr0):\n    pass\n")
    kernels = [dict(name="triton_poi_fused_fast_1", family="elementwise", ms_per_step=0.5, calls_per_step=20),
               dict(name="triton_per_fused_slow_3", family="elementwise", ms_per_step=6.4, calls_per_step=9),
               dict(name="triton_red_fused_gone_2", family="elementwise", ms_per_step=2.0, calls_per_step=20),
               dict(name="nvjet_sm90_qqtst", family="matmul", ms_per_step=19.9, calls_per_step=80)]
    rows = tmp_path / "step.jsonl"
    rows.write_text(json.dumps(dict(side="fastsft", kernels=None)) + "\n" + json.dumps(dict(kernels=kernels)) + "\n")
    script = Path(__file__).resolve().parents[1] / "bench" / "kernel_sources.py"
    out = subprocess.run([sys.executable, str(script), str(rows), str(tmp_path / "out"), "--top", "2", "--cache",
                          str(cache)], capture_output=True, text=True, check=True).stdout
    assert out.index("triton_per_fused_slow_3") < out.index("triton_red_fused_gone_2")  # slowest first
    assert "not in the cache" in out and "triton_poi_fused_fast_1" not in out  # top 2 of the family only
    copied = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert copied == ["triton_per_fused_slow_3.py"]
    text = (tmp_path / "out" / "triton_per_fused_slow_3.py").read_text()
    assert text.startswith("# 6.400 ms per step, 9 calls, from cslow.py") and "def triton_per_fused_slow_3(" in text
