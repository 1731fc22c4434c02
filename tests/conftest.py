"""Shared test setup: Triton kernels run under the interpreter when there is no GPU, the small data files kept in
the repo (tests/fixtures/data), and the large shared data folder beside the checkout."""

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before triton is first imported; the interpreter runs kernels on the CPU.
    os.environ.setdefault("TRITON_INTERPRET", "1")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
FIXTURE_DATA = Path(__file__).resolve().parent / "fixtures" / "data"


@pytest.fixture(scope="session")
def fixture_data() -> Path:
    """The first rows of the shared data files, same names and layouts, kept in the repo: tests of loaders and
    task mappings run from a clone with them (tests/fixtures/data/README.md lists what is there)."""
    return FIXTURE_DATA


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder of real public data beside the checkout, for the large external checks (whole files, GPT-2's
    tokenizer, nanochat checkpoints); tests that need it skip when it is absent."""
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
