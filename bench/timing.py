"""The benchmark suite's one timer and one result format: JSON rows that carry the device, versions and date.

Every bench script and pytest-benchmark case times through `median_ms` and records through `write_rows`, so a
number in bench/RESULTS.md can always be traced to the machine and software that produced it.
"""

from __future__ import annotations

import datetime
import json
import platform
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch


def environment() -> dict:
    """Where a measurement was taken: device name, torch / triton / CUDA versions, UTC date."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:  # triton is Linux-only
        triton_version = None
    on_gpu = torch.cuda.is_available()
    return dict(
        device=torch.cuda.get_device_name() if on_gpu else f"cpu ({platform.processor() or platform.machine()})",
        torch=torch.__version__,
        triton=triton_version,
        cuda=torch.version.cuda if on_gpu else None,
        python=platform.python_version(),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )


def median_ms(fn: Callable[[], object], warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """Median milliseconds of one fn() call. On a GPU: triton.testing.do_bench (CUDA events, L2 flushed between
    runs); on the CPU: wall-clock over repeats filling about rep_ms."""
    if torch.cuda.is_available():
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    fn()  # warm up (first-call allocations, lazy imports)
    times = []
    deadline = time.perf_counter() + rep_ms / 1e3
    while len(times) < 3 or time.perf_counter() < deadline:
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return times[len(times) // 2]


def write_rows(path: str | Path | None, rows: Iterable[dict]) -> list[dict]:
    """Stamp each row with environment() (a row's own keys win) and, when path is given, write them as a JSON
    list. Returns the stamped rows."""
    env = environment()
    stamped = [{**env, **row} for row in rows]
    if path is not None:
        Path(path).write_text(json.dumps(stamped, indent=1) + "\n")
    return stamped
