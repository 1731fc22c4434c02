"""fastsft.memory_peak on a GPU: the allocator's own trace, replayed to its peak, names the line that allocated the
largest live tensor."""

import pytest
import torch

from fastsft import memory_peak

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _step():
    kept = torch.empty(64 * 2**20, dtype=torch.uint8, device="cuda")  # 64 MiB alive at the peak
    scratch = torch.empty(16 * 2**20, dtype=torch.uint8, device="cuda")
    del scratch
    return kept


def test_record_peak_names_the_allocating_line(tmp_path):
    held = []
    peak = memory_peak.record_peak(lambda: held.append(_step()), tmp_path)
    assert (tmp_path / "memory_snapshot.pickle").stat().st_size > 0
    top = peak.sites[0]
    assert "_step" in top.where and "64 * 2**20" in top.code and top.bytes >= 64 * 2**20
    assert peak.peak_bytes - peak.before_bytes >= 80 * 2**20  # both alive at once before the del
