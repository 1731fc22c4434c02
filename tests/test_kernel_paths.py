"""fastsft.kernels.paths: the record of which path each kernel op ran, that makes the kernel tests unable to pass
by comparing the PyTorch reference with itself. Checked here: kernel tests fail where Triton cannot run, and the
record costs torch.compile nothing (no graph break, no recompilation)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastsft.kernels import paths

TESTS = Path(__file__).resolve().parent

# One comparison with the reference per op; each passed by accident before the ops recorded their path.
ACCIDENTAL_PASSES = [
    "test_cross_entropy.py::test_no_grad_forward_matches",
    "test_linear_cross_entropy.py::test_empty_batch",
    "test_adamw.py::test_parameter_without_grad_is_left_alone",
    "test_muon.py::test_changing_set_of_gradients_keeps_one_stack_per_shape",
]


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the kernels run whatever TRITON_INTERPRET says")
def test_kernel_tests_fail_where_triton_cannot_run():
    # TRITON_INTERPRET=0 on a CPU: Triton imports but cannot launch, every op takes its reference. The tests must
    # fail saying so, not compare the reference with itself.
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
                           *(str(TESTS / t) for t in ACCIDENTAL_PASSES)],
                          env=env, capture_output=True, text=True, timeout=300, cwd=TESTS.parent)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    assert f"{len(ACCIDENTAL_PASSES)} failed" in out, out[-3000:]
    for op in ("cross_entropy", "linear_cross_entropy", "AdamW", "Muon"):
        assert f"{op} took the reference path" in out, out[-3000:]


def test_record_is_replayed_by_torch_compile_without_recompiling():
    # The fallbacks record inside code dynamo traces: the store must be replayed at run time, and other ops'
    # records between calls must not invalidate the graph (a module dict would be guarded on: a recompile per call).
    from torch._dynamo.utils import counters

    def step(x):
        paths.record("adamw", paths.REFERENCE)
        return x * 2

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(step, backend="eager", fullgraph=True)
    for i in range(3):
        paths.reset()
        paths.record("muon", paths.TRITON if i % 2 else paths.REFERENCE)
        assert torch.equal(compiled(torch.ones(3)), torch.full((3,), 2.0))
        assert paths.ran("adamw") == paths.REFERENCE and paths.ran("muon") is not None
    assert counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()


def test_unknown_op_is_an_error():
    paths.reset()
    assert paths.ran("cross_entropy") is None
    with pytest.raises(KeyError, match="unknown op 'cross_entropi'"):
        paths.ran("cross_entropi")
