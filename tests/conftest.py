"""Shared test setup: Triton kernels run under the interpreter when there is no GPU, and the shared data folder."""

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before triton is first imported; the interpreter runs kernels on the CPU.
    os.environ.setdefault("TRITON_INTERPRET", "1")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder of real public data beside the checkout; tests that need it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def run_without_interpreter():
    """Run a Python script in a fresh process with TRITON_INTERPRET unset (a CPU machine without Triton's
    interpreter, as users have it); returns (returncode, stdout, stderr)."""
    import subprocess
    import sys

    def run(script: str):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
        return proc.returncode, proc.stdout, proc.stderr

    return run
