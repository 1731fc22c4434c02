"""Profiling of training steps: `fastsft train --profile STEPS`.

Why this file exists: every speed decision of this project is made from a profile of the whole step (where the
GPU time goes, by family: matmul, attention, loss, optimizer, elementwise, copy/other), and the driver must be
able to produce one on any run without a separate script. StepProfiler runs torch.profiler over a few steps,
writes a chrome trace into the run directory (open it in Perfetto or chrome://tracing), and prints the kernels by
time grouped by family. `range(name)` marks a phase of the step (data, forward, backward, optimizer) both as an
NVTX range (for Nsight Systems; skipped without CUDA) and as a profiler annotation (in the chrome trace).

    profiler = StepProfiler(run_dir, steps=args.profile)
    with profiler:
        for step in range(num_steps):
            with profiler.range("data"):
                batch = next(loader)
            with profiler.range("forward"):
                loss = ...
            ...
            profiler.step()          # after each training step; a no-op once the profiled steps are done
"""

from __future__ import annotations

import contextlib
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function, schedule

FAMILIES = ("matmul", "attention", "loss", "optimizer", "elementwise", "copy/other")

# Kernel (GPU) or op (CPU) names, matched in this order, lower-cased: attention before matmul (flash kernels are
# CUTLASS GEMMs too), fastsft's own Triton kernels by name, then cuBLAS / CUTLASS / inductor templates, then
# elementwise work (inductor's fused pointwise / reduction kernels, ATen's vectorized functors, norms); copies
# and whatever else is left count as copy/other.
_FAMILY_PATTERNS = (
    ("attention", r"flash|fmha|attention|attn|sdpa|varlen"),
    ("loss", r"_ce_rows|_grad_tile|_grad_epilogue|_scatter_home|cross_entropy|nll_loss|log_softmax|logsumexp"),
    ("optimizer", r"optimizer\.step|_adamw|_muon|_gram_kernel|multi_tensor_apply|fused_adam|foreach_|_fused_sgd"
                  r"|lerp"),
    ("matmul", r"gemm|matmul|\bmm\b|aten::mm|aten::addmm|aten::bmm|aten::baddbmm|cublas|cutlass|nvjet|xmma|wgmma"
               r"|triton_tem_|splitk"),
    ("elementwise", r"^triton_(poi|per|red)_"),  # inductor's fused kernels, even those named after a copy or cat
    ("copy/other", r"memcpy|memset|copy|fill|\bcat\b|aten::cat|catarray|index|gather|scatter|embedding_dense"
                   r"|nonzero"),
    ("elementwise", r"elementwise|vectorized|unrolled|functor|reduce|norm|silu"
                    r"|relu|gelu|tanh|sigmoid|softmax|aten::(add|mul|sub|div|pow|neg|exp|rsqrt|where|clamp|sum|mean)"),
)
_COMPILED = [(family, re.compile(pattern)) for family, pattern in _FAMILY_PATTERNS]


def kernel_family(name: str) -> str:
    """The family of a GPU kernel or CPU op name (one of FAMILIES); unknown names count as copy/other."""
    lowered = name.lower()
    for family, pattern in _COMPILED:
        if pattern.search(lowered):
            return family
    return "copy/other"


@dataclass
class KernelTime:
    name: str
    family: str
    ms_per_step: float
    calls_per_step: float


class StepProfiler:
    """torch.profiler over `steps` training steps after `warmup` steps (compilation and autotuning happen in the
    first steps; they are not what a step costs). `steps` 0 disables it: every method is then a cheap no-op
    except range(), which keeps the NVTX ranges for an outside profiler."""

    def __init__(self, run_dir: str | Path, steps: int, warmup: int = 1, top: int = 15, print_fn=print):
        if steps < 0 or warmup < 0:
            raise ValueError(f"StepProfiler: steps and warmup must be >= 0, got {steps} and {warmup}")
        self.run_dir = Path(run_dir)
        self.steps, self.warmup, self.top, self.print_fn = steps, warmup, top, print_fn
        self.trace_path = self.run_dir / "profile_trace.json"
        self.kernels: list[KernelTime] = []
        self.families: dict[str, float] = {}
        self._prof = None
        self._calls = 0  # steps seen by step() while profiling
        self._ranges: set[str] = set()
        self._on_gpu = torch.cuda.is_available()

    @property
    def enabled(self) -> bool:
        return self.steps > 0

    @property
    def done(self) -> bool:
        """True once the profiled steps are recorded (the driver may stop a --profile run there)."""
        return bool(self.kernels) or not self.enabled

    def __enter__(self) -> StepProfiler:
        if self.enabled:
            if self._on_gpu and self.warmup == 0:
                torch.cuda.synchronize()  # the window opens now: see step()
            self.run_dir.mkdir(parents=True, exist_ok=True)
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self._on_gpu else [])
            self._prof = profile(activities=activities,
                                 schedule=schedule(wait=0, warmup=self.warmup, active=self.steps, repeat=1),
                                 on_trace_ready=self._on_trace_ready, record_shapes=False)
            self._prof.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._prof is not None:
            self._prof.__exit__(*exc)
            self._prof = None

    def step(self) -> None:
        """Call once after each training step. The device waits for the host where the profiled window opens and
        closes: the driver's host runs a step or two ahead of the GPU, and without the wait the window would take
        in the warm-up step's kernels still running (measured: 1.2 steps counted per step at d20) and lose its own
        last step's."""
        if self._prof is not None and not self.kernels:
            self._calls += 1
            if self._on_gpu and self._calls in (self.warmup, self.warmup + self.steps):
                torch.cuda.synchronize()
            self._prof.step()

    @contextlib.contextmanager
    def range(self, name: str):
        """One phase of the step: an NVTX range (with CUDA) and, while profiling, a chrome-trace annotation."""
        self._ranges.add(name)
        with contextlib.ExitStack() as stack:
            if self._on_gpu:
                stack.enter_context(torch.cuda.nvtx.range(name))
            if self._prof is not None and not self.kernels:
                stack.enter_context(record_function(name))
            yield

    # -- the report --------------------------------------------------------------------------------------------

    def _on_trace_ready(self, prof) -> None:
        prof.export_chrome_trace(str(self.trace_path))
        self.kernels = self._kernel_times(prof)
        totals: dict[str, float] = defaultdict(float)
        for k in self.kernels:
            totals[k.family] += k.ms_per_step
        self.families = {f: totals.get(f, 0.0) for f in FAMILIES}
        self.print_fn(self.report())

    def _kernel_times(self, prof) -> list[KernelTime]:
        """GPU kernels by self device time (with CUDA); on the CPU, ATen ops by self CPU time. Step markers and
        our own phase ranges are annotations, not work, and are left out."""
        rows = []
        # Annotations (record_function ranges such as "Optimizer.step#Muon.step") also show on the GPU timeline,
        # spanning the kernels they enclose: counting them would count those kernels twice.
        annotations = {e.name for e in prof.events() if getattr(e, "is_user_annotation", False)}
        for event in prof.key_averages():
            if event.key.startswith("ProfilerStep") or event.key in self._ranges or event.key in annotations:
                continue
            if self._on_gpu:
                if event.device_type != torch.autograd.DeviceType.CUDA:
                    continue
                us = event.self_device_time_total
            else:
                us = event.self_cpu_time_total
            if us > 0:
                rows.append(KernelTime(event.key, kernel_family(event.key), us / 1e3 / self.steps,
                                       event.count / self.steps))
        return sorted(rows, key=lambda k: -k.ms_per_step)

    def report(self) -> str:
        total = sum(self.families.values()) or 1.0
        unit = "GPU kernel" if self._on_gpu else "CPU op (no GPU)"
        lines = [f"profile: {self.steps} steps after {self.warmup} warm-up; {unit} time per step by family "
                 f"(chrome trace: {self.trace_path})"]
        for family, ms in sorted(self.families.items(), key=lambda kv: -kv[1]):
            lines.append(f"  {family:12} {ms:9.3f} ms  {100 * ms / total:5.1f}%")
        lines.append(f"  {'total':12} {total:9.3f} ms")
        lines.append(f"top {min(self.top, len(self.kernels))} by time per step:")
        for k in self.kernels[:self.top]:
            lines.append(f"  {k.ms_per_step:9.3f} ms  x{k.calls_per_step:<6.4g} {k.family:12} {k.name[:90]}")
        return "\n".join(lines)


@contextlib.contextmanager
def triton_compiles():
    """Yield a list that collects the name of every Triton kernel JIT-compiled while the block runs.

    Why: a kernel is compiled again for each new specialization of its arguments (an int argument divisible by 16
    or equal to 1, a pointer 16-byte aligned), and a size that comes from the data can reach a new one at any step:
    a compile (about 0.2-0.5 s, or a load from the disk cache) looks like one slow step. Counted through Triton's
    cache hook, which fires on each miss of a kernel's in-process cache; the hook in place before is still called.
    Only @triton.jit kernels launched as such (fastsft's own); inductor's kernels are compiled by inductor."""
    import triton

    runtime = triton.knobs.runtime
    previous = runtime.jit_cache_hook
    names: list[str] = []

    def record(*args, **kwargs):
        fn = kwargs.get("fn")
        name = getattr(fn, "name", None) or repr(fn)
        names.append(name.rsplit(".", 1)[-1])  # some Triton versions pass the qualified name ("f.<locals>.kernel")
        return previous(*args, **kwargs) if previous is not None else None  # truthy would skip the compile

    runtime.jit_cache_hook = record
    try:
        yield names
    finally:
        runtime.jit_cache_hook = previous
