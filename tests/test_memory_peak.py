"""fastsft.memory_peak: replaying an allocator trace to its peak, and naming what is alive there by allocation
site. The trace is built by hand in the format torch.cuda.memory._snapshot() returns (no GPU here)."""

from pathlib import Path

import pytest
import torch

from fastsft import memory_peak

HERE = __file__
INSIDE_TORCH = {"filename": "/x/site-packages/torch/nn/functional.py", "line": 12, "name": "linear"}


def _frame(line: int, name: str = "f") -> dict:
    return {"filename": HERE, "line": line, "name": name}


def _alloc(addr, size, *frames):
    return {"action": "alloc", "addr": addr, "size": size, "frames": list(frames)}


def _free(addr, size):
    return {"action": "free_requested", "addr": addr, "size": size, "frames": []}


def test_the_peak_and_what_is_alive_there_by_site():
    trace = [
        _alloc(1, 100, INSIDE_TORCH, _frame(10, "forward")),
        _alloc(2, 300, _frame(20, "backward")),
        {"action": "segment_alloc", "addr": 50, "size": 4096, "frames": []},  # not an allocation of a tensor
        _alloc(3, 200, INSIDE_TORCH, _frame(10, "forward")),  # same site as block 1
        _free(2, 300),
        _free(99, 64),  # a block allocated before recording began
        _alloc(4, 250, _frame(30)),
        {"action": "free_completed", "addr": 1, "size": 100, "frames": []},  # not counted: free_requested is
    ]
    peak = memory_peak.peak_allocations({"device_traces": [trace]}, before_bytes=1000)
    # totals: 1100, 1400, 1600 (peak: blocks 1, 2, 3), 1300, 1236, 1486
    assert peak.peak_bytes == 1600 and peak.before_bytes == 1000
    assert [(s.bytes, s.blocks) for s in peak.sites] == [(300, 2), (300, 1)]
    forward = next(s for s in peak.sites if s.blocks == 2)
    assert forward.where == "test_memory_peak.py:10 forward"  # the first frame outside torch names the site
    assert forward.code == Path(HERE).read_text().splitlines()[9].strip()
    lines = memory_peak.format_peak(peak, top=1).splitlines()
    assert len(lines) == 3 and "test_memory_peak.py" in lines[1] and lines[2].endswith("in 1 more sites")


def test_frees_of_older_blocks_lower_what_was_there_before():
    trace = [_free(7, 400), _alloc(1, 100, _frame(5))]
    peak = memory_peak.peak_allocations({"device_traces": [trace]}, before_bytes=1000)
    assert peak.peak_bytes == 1000 and peak.sites == []  # the peak is the start: nothing of the step alive
    trace = [_alloc(1, 100, _frame(5)), _free(7, 400), _alloc(2, 500, INSIDE_TORCH)]
    peak = memory_peak.peak_allocations({"device_traces": [trace]}, before_bytes=1000)
    assert peak.peak_bytes == 1200 and peak.before_bytes == 600
    assert [(s.where, s.bytes) for s in peak.sites] == [("(inside torch)", 500), ("test_memory_peak.py:5 f", 100)]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_recording_needs_a_gpu(tmp_path):
    with pytest.raises(RuntimeError, match="CUDA"):
        memory_peak.record_peak(lambda: None, tmp_path)


def test_generated_code_adds_up_the_same_allocation_of_every_layer(tmp_path):
    """Inductor's module allocates each layer's buffer on a line of its own (buf59 = ..., buf127 = ...): they are
    one site, named by the module and the statement with per-layer names numbered alike; another module's (the
    backward's) same statement is another site."""
    forward, backward = (tmp_path / "torchinductor_user" / name for name in ("cx/cxforward.py", "cb/cbackwrd.py"))
    alloc = "empty_strided_cuda((32768, 5120), (5120, 1), torch.bfloat16)"
    for path, text in ((forward, f"def call(args):\n    buf59 = {alloc}\n    buf127 = {alloc}\n"
                                 "    buf3 = torch.ops.aten.mm.default(buf59, primals_12)\n"),
                       (backward, f"def call(args):\n    buf7 = {alloc}\n")):
        path.parent.mkdir(parents=True)
        path.write_text(text)

    def frame(path, line):
        return {"filename": str(path), "line": line, "name": "call"}

    trace = [_alloc(1, 100, INSIDE_TORCH, frame(forward, 2)), _alloc(2, 100, frame(forward, 3)),
             _alloc(3, 50, frame(forward, 4)), _alloc(4, 60, frame(backward, 2))]
    peak = memory_peak.peak_allocations({"device_traces": [trace]}, before_bytes=0)
    assert [(s.where, s.bytes, s.blocks) for s in peak.sites] == [
        (f"inductor cxforwar: bufN = {alloc}", 200, 2), (f"inductor cbackwrd: bufN = {alloc}", 60, 1),
        ("inductor cxforwar: bufN = torch.ops.aten.mm.default(bufN, primals_N)", 50, 1)]
    assert peak.sites[0].code == "cxforward.py:2"  # one example line of the site
