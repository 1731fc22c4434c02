"""What is alive at a step's memory peak, by the line of code that allocated it.

Why: peak memory is a goal of its own, and the peak is not always where the activations are largest: with
activation_memory_budget = 0.5 the peak holds about twice what the forward keeps (bench/RESULTS.md, run 7), so
something in the backward or the optimizer step decides it. torch's allocator can record every allocation and
free with its Python stack (`torch.cuda.memory._record_memory_history`); `record_peak` does that around one step,
and `peak_allocations` replays the trace to the moment of the peak and sums what is alive by allocation site.

The snapshot is also written as a pickle that torch's memory visualizer reads (pytorch.org/memory_viz).
"""

from __future__ import annotations

import linecache
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path

import torch

# Frames inside torch itself say nothing about which tensor it is; the first frame outside names it (fastsft's code
# or the module inductor generated, whose line is the buffer's allocation).
_INTERNAL = ("/torch/", "/site-packages/triton/", "<frozen ", "/contextlib.py", "/threading.py")
# Names that differ per layer in generated code (`buf59 = empty_strided_cuda(...)`, `primals_12`), numbered alike
_NUMBERED = re.compile(r"\b(buf|primals_|tangents_|getitem_|arg)\d+\b")


@dataclass
class Site:
    where: str  # file:line function
    code: str  # that line's source, when the file is readable
    bytes: int
    blocks: int


@dataclass
class Peak:
    peak_bytes: int  # allocated at the peak, as torch.cuda.memory_allocated counts it
    before_bytes: int  # of which allocated before recording began (weights, optimizer state, ...) and still alive
    sites: list[Site]  # what the step allocated and holds at the peak, largest first


def _site(frames: list[dict]) -> tuple[str, str]:
    for frame in frames:
        filename = frame.get("filename", "?")
        if not any(part in filename for part in _INTERNAL):
            line = frame.get("line", 0)
            code = linecache.getline(filename, line).strip() if line else ""
            if "torchinductor" in filename and code:
                # Generated code allocates each layer's buffer on a line of its own; a site named by its module (the
                # forward's or the backward's) and the statement with the per-layer names numbered alike adds the
                # layers' copies of one buffer together. `code` keeps one example line.
                statement = _NUMBERED.sub(lambda m: m.group(1) + "N", code)
                return f"inductor {Path(filename).stem[:8]}: {statement}", f"{Path(filename).name}:{line}"
            return f"{Path(filename).name}:{line} {frame.get('name', '?')}", code
    return "(inside torch)", ""


def peak_allocations(snapshot: dict, before_bytes: int, device: int = 0) -> Peak:
    """Replay one device's allocation trace from `before_bytes` allocated; the live blocks at the largest total.

    An allocation counts from its 'alloc' event until its 'free_requested' (where torch's allocated-bytes counter
    drops); a freed block that was allocated before recording began comes off `before_bytes`."""
    events = [e for e in snapshot["device_traces"][device] if e["action"] in ("alloc", "free_requested")]
    # a free names its block's size, so the running total needs no bookkeeping of which blocks are alive
    totals = list(accumulate((e["size"] if e["action"] == "alloc" else -e["size"] for e in events),
                             initial=before_bytes))
    at = max(range(len(totals)), key=totals.__getitem__)  # the first of the largest; 0: before any event
    live, before = {}, before_bytes
    for e in events[:at]:
        if e["action"] == "alloc":
            live[e["addr"]] = e
        elif live.pop(e["addr"], None) is None:
            before -= e["size"]
    sites: dict[str, Site] = {}
    for e in live.values():
        where, code = _site(e.get("frames", []))
        site = sites.setdefault(where, Site(where, code, 0, 0))
        site.bytes += e["size"]
        site.blocks += 1
    return Peak(totals[at], before, sorted(sites.values(), key=lambda s: -s.bytes))


def record_peak(step: Callable[[], object], out_dir: str | Path, max_entries: int = 1_000_000) -> Peak:
    """Run step() once with the CUDA allocator's history recorded; write the snapshot to out_dir and return the
    peak's allocations."""
    if not torch.cuda.is_available():
        raise RuntimeError("memory_peak: recording the allocator's history needs a CUDA device")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(max_entries=max_entries, stacks="python")
    try:
        step()
        torch.cuda.synchronize()
        snapshot = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    path = Path(out_dir) / "memory_snapshot.pickle"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(snapshot))
    return peak_allocations(snapshot, before, torch.cuda.current_device())


def format_peak(peak: Peak, top: int = 15) -> str:
    gib = 2**30
    lines = [f"memory peak {peak.peak_bytes / gib:.2f} GiB: {peak.before_bytes / gib:.2f} allocated before the step "
             f"(weights, optimizer state, ...), {(peak.peak_bytes - peak.before_bytes) / gib:.2f} by the step; "
             f"largest sites alive at the peak:"]
    for site in peak.sites[:top]:
        lines.append(f"  {site.bytes / gib:7.3f} GiB  x{site.blocks:<4d} {site.where}  {site.code[:90]}")
    rest = sum(s.bytes for s in peak.sites[top:])
    if rest:
        lines.append(f"  {rest / gib:7.3f} GiB  in {len(peak.sites) - top} more sites")
    return "\n".join(lines)
