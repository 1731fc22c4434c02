"""The benchmark suite: `python -m pytest bench --benchmark-only` collects on any machine.

Files named bench_*.py hold pytest-benchmark cases (collected here: the test suite's testpaths is tests/ only).
CPU cases (render, pack) run everywhere; cases marked `gpu` skip cleanly without a CUDA device. Every case's
pytest-benchmark record carries bench/timing.environment() (device, torch, triton, date) in extra_info, and
`--bench-rows FILE` also writes one JSON row per case through timing.write_rows.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench files import timing and each other's helpers
from timing import environment, write_rows  # noqa: E402

_ROWS: list[dict] = []


def pytest_collect_file(file_path, parent):
    # A file named on the command line is collected by pytest itself; collecting it here too would run it twice.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_addoption(parser):
    parser.addoption("--bench-rows", default=None, metavar="FILE",
                     help="also write one JSON row per benchmark (median ms, device, versions, date) to FILE")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped on the CPU)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _record(request):
    """Stamp each benchmark with the environment and keep its median as a row for --bench-rows."""
    if "benchmark" not in request.fixturenames:
        yield
        return
    benchmark = request.getfixturevalue("benchmark")
    benchmark.extra_info.update(environment())
    yield
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        info = {k: v for k, v in benchmark.extra_info.items() if isinstance(v, (int, float, str, bool, type(None)))}
        _ROWS.append({**info, "name": request.node.nodeid, "median_ms": stats.stats.median * 1e3,
                      "min_ms": stats.stats.min * 1e3, "rounds": stats.stats.rounds})


def pytest_sessionfinish(session, exitstatus):
    path = session.config.getoption("--bench-rows")
    if path and _ROWS:
        write_rows(path, _ROWS)


@pytest.fixture
def gpu_benchmark(benchmark):
    """benchmark(fn) for GPU work: each round synchronizes, so the wall clock covers the kernels, not the launch."""

    def run(fn, rounds=20, warmup_rounds=3):
        def synced():
            out = fn()
            torch.cuda.synchronize()
            return out

        return benchmark.pedantic(synced, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)

    return run
