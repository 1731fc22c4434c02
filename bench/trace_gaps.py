"""Where the GPU waits: the idle gaps of a torch.profiler chrome trace and what the host was doing.

    python bench/trace_gaps.py TRACE.json [--min-us 20] [--steps N] [--top N] [--host-top N]

A step whose wall time exceeds its GPU kernel time has gaps on the GPU timeline. For each gap this finds the
kernel that ended it, the host call that launched that kernel, and the CPU ops enclosing that launch. If the
launch came after the gap began, the host was late (host-bound: the enclosing ops are the cost); if it came
before, the GPU waited on something else (a copy, an event). Gaps are summed by the innermost enclosing op.

Then, per phase of the step (the profiler's ranges: data, forward, backward, optimizer), the host's time in the
phase against the GPU time of the kernels it launched there: a phase whose host time exceeds its kernels' is
host-bound, and the launches and host time per launch say whether fewer launches or cheaper ones would help.
Last, where a host-bound phase's time goes: its host ops by self time (an op's time less its child ops' on the
same thread, so a custom op's own Python, a launch's driver call and a compiled graph's wrapper each count once),
and its launches, memsets and copies by the op that made them (which op's 11 memsets a layer).
"""

from __future__ import annotations

import argparse
import bisect
import json
from collections import defaultdict

GPU_CATS = {"kernel", "gpu_memcpy", "gpu_memset"}
HOST_CATS = {"cpu_op", "user_annotation", "python_function"}
SELF_TIME_CATS = HOST_CATS | {"cuda_runtime", "cuda_driver"}  # what the host spends its time in, launches included
ENQUEUE_WORDS = ("Launch", "Memset", "Memcpy")  # runtime / driver calls that put work on the GPU
PHASES = ("data", "forward", "backward", "optimizer")  # fastsft.profiling's ranges


def load(path: str) -> list[dict]:
    with open(path) as f:
        data = json.load(f)
    return [e for e in data.get("traceEvents", data) if e.get("ph") == "X" and "dur" in e]


def enclosing(ops_by_tid: dict, tid, ts: float) -> list[str]:
    """Names of the host ops on `tid` that contain time `ts`, outermost first."""
    ops = ops_by_tid.get(tid, [])
    starts = [o["ts"] for o in ops]
    names = []
    for o in ops[:bisect.bisect_right(starts, ts)]:
        if o["ts"] + o["dur"] >= ts:
            names.append(o["name"])
    return [n for n in names if not n.startswith("ProfilerStep")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace")
    ap.add_argument("--min-us", type=float, default=20.0, help="ignore gaps shorter than this")
    ap.add_argument("--steps", type=int, default=0, help="divide totals by this many steps (0: count markers)")
    ap.add_argument("--top", type=int, default=15, help="rows of each gap table")
    ap.add_argument("--host-top", type=int, default=15, help="rows of each phase's host-op table")
    args = ap.parse_args()

    events = load(args.trace)
    gpu = sorted((e for e in events if e.get("cat") in GPU_CATS), key=lambda e: e["ts"])
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    ops_by_tid = defaultdict(list)
    for e in events:
        if e.get("cat") in HOST_CATS:
            ops_by_tid[e["tid"]].append(e)
    for ops in ops_by_tid.values():
        ops.sort(key=lambda o: o["ts"])
    # a CUDA trace holds each ProfilerStep#N twice (the host's range and its GPU annotation): count names, not events
    steps = args.steps or max(1, len({e["name"] for e in events if e["name"].startswith("ProfilerStep")}))
    if not gpu:
        raise SystemExit(f"{args.trace}: no GPU events (a CPU-only trace has no GPU gaps)")

    busy = idle = 0.0
    late, waiting = defaultdict(lambda: [0.0, 0]), defaultdict(lambda: [0.0, 0])
    end = gpu[0]["ts"]
    for e in gpu:
        gap = e["ts"] - end
        if gap > args.min_us:
            idle += gap
            launch = launches.get(e.get("args", {}).get("correlation"))
            if launch is None:
                key, table = f"(no launch record) before {e['name'][:60]}", waiting
            else:
                stack = enclosing(ops_by_tid, launch["tid"], launch["ts"])
                key = " > ".join(stack[-2:]) or "(no host op)"
                table = late if launch["ts"] > end else waiting
                if table is waiting:
                    key = f"{key} | next: {e['name'][:50]}"
            table[key][0] += gap
            table[key][1] += 1
        busy += max(0.0, e["ts"] + e["dur"] - max(end, e["ts"]))
        end = max(end, e["ts"] + e["dur"])

    span = end - gpu[0]["ts"]
    print(f"{args.trace}: {steps} steps; GPU span {span / 1e3 / steps:.2f} ms/step, busy {busy / 1e3 / steps:.2f}, "
          f"idle in gaps > {args.min_us:g} us: {idle / 1e3 / steps:.2f} ms/step")
    for title, table in (("host late (launch after the GPU went idle), by the ops around the launch", late),
                         ("launched in time, GPU waited on something else", waiting)):
        total = sum(v[0] for v in table.values())
        print(f"\n{title}: {total / 1e3 / steps:.2f} ms/step")
        for key, (us, n) in sorted(table.items(), key=lambda kv: -kv[1][0])[:args.top]:
            print(f"  {us / 1e3 / steps:8.3f} ms  x{n / steps:<6.3g} {key[:150]}")
    print_phases(events, gpu, launches, steps)
    print_host_ops(events, steps, args.host_top)


def print_phases(events: list[dict], gpu: list[dict], launches: dict, steps: int) -> None:
    """Host time of each phase against the GPU time of the kernels launched inside it (on any host thread: the
    backward's launches come from autograd's device thread, inside the main thread's range)."""
    ranges = _phase_ranges(events)
    if not ranges:
        return
    starts = [r["ts"] for r in ranges]
    host, gpu_us, count = defaultdict(float), defaultdict(float), defaultdict(int)
    for r in ranges:
        host[r["name"]] += r["dur"]
    for e in gpu:
        launch = launches.get(e.get("args", {}).get("correlation"))
        if launch is None:
            continue
        name = _phase_of(ranges, starts, launch["ts"])
        gpu_us[name] += e["dur"]
        count[name] += 1
    print("\nper phase, ms a step: the host's time in it, the GPU time of what it launched "
          "(host-bound where host > GPU)")
    print(f"  {'phase':10s} {'host':>8s} {'GPU':>8s} {'launches':>9s} {'host us/launch':>15s}")
    for name in [*PHASES, "(between)"]:
        if name in host or name in count:
            n = count[name] / steps
            per = host[name] / count[name] if count[name] else float("nan")
            print(f"  {name:10s} {host[name] / 1e3 / steps:8.2f} {gpu_us[name] / 1e3 / steps:8.2f} {n:9.1f} "
                  f"{per:15.1f}")


def _phase_ranges(events: list[dict]) -> list[dict]:
    return sorted((e for e in events if e.get("cat") == "user_annotation" and e["name"] in PHASES),
                  key=lambda e: e["ts"])


def _phase_of(ranges: list[dict], starts: list[float], ts: float) -> str:
    i = bisect.bisect_right(starts, ts) - 1
    return ranges[i]["name"] if i >= 0 and ts <= ranges[i]["ts"] + ranges[i]["dur"] else "(between)"


def self_times(events: list[dict]) -> list[tuple[dict, float, str]]:
    """(event, its self time, its parent's name): its duration less its direct children's on the same thread
    (nested by time); the parent is the innermost op around it ("(no host op)" for none)."""
    by_tid = defaultdict(list)
    for e in events:
        if e.get("cat") in SELF_TIME_CATS and not e["name"].startswith("ProfilerStep") and e["name"] not in PHASES:
            by_tid[(e.get("pid"), e["tid"])].append(e)
    out = []
    for ops in by_tid.values():
        ops.sort(key=lambda o: (o["ts"], -o["dur"]))
        stack: list[list] = []  # [event, end, children's time, parent's name]
        for o in ops:
            while stack and o["ts"] >= stack[-1][1]:
                done = stack.pop()
                out.append((done[0], done[0]["dur"] - done[2], done[3]))
            parent = stack[-1][0]["name"] if stack else "(no host op)"
            if stack:
                stack[-1][2] += o["dur"]
            stack.append([o, o["ts"] + o["dur"], 0.0, parent])
        out.extend((d[0], d[0]["dur"] - d[2], d[3]) for d in stack)
    return out


def print_host_ops(events: list[dict], steps: int, top: int) -> None:
    """Per phase, the host ops with the most self time a step (how many a step, and their mean), then the calls
    that enqueue GPU work (launches, memsets, copies) by the op that made them, most frequent first."""
    ranges = _phase_ranges(events)
    if not ranges:
        return
    starts = [r["ts"] for r in ranges]
    table = defaultdict(lambda: defaultdict(lambda: [0.0, 0]))
    enqueued = defaultdict(lambda: defaultdict(lambda: [0.0, 0]))
    for e, own, parent in self_times(events):
        phase = _phase_of(ranges, starts, e["ts"])
        rows = [table[phase][e["name"]]]
        if e.get("cat") in ("cuda_runtime", "cuda_driver") and any(w in e["name"] for w in ENQUEUE_WORDS):
            rows.append(enqueued[phase][f"{parent} > {e['name']}"])
        for row in rows:
            row[0] += own
            row[1] += 1
    for phase in [*PHASES, "(between)"]:
        if phase not in table:
            continue
        ops = sorted(table[phase].items(), key=lambda kv: -kv[1][0])
        total = sum(us for us, _ in table[phase].values())
        print(f"\nhost self time in {phase}, ms a step (all ops: {total / 1e3 / steps:.2f}): op, calls a step, "
              f"us a call")
        for name, (us, n) in ops[:top]:
            print(f"  {us / 1e3 / steps:8.3f} ms  x{n / steps:<7.4g} {us / n:8.1f} us  {name[:110]}")
        if enqueued[phase]:
            print(f"GPU work enqueued in {phase}, by the op around the call: calls a step, the calls' own host time")
            for name, (us, n) in sorted(enqueued[phase].items(), key=lambda kv: -kv[1][1])[:top]:
                print(f"  x{n / steps:<7.4g} {us / 1e3 / steps:8.3f} ms  {name[:120]}")


if __name__ == "__main__":
    main()
