"""Which implementation each kernel op ran last: its Triton kernel, or its PyTorch fallback.

Why this exists: where Triton imports but cannot run (a CPU without TRITON_INTERPRET=1), every op quietly takes its
PyTorch reference, and a test comparing the op with that reference compares the reference with itself and passes.
Kernel tests therefore reset this record, run the op and assert the path that ran (`ran("cross_entropy") ==
TRITON`); the fallback has tests of its own that assert REFERENCE. A driver may log it too.

Cost: one attribute store of a constant string per op call, on the host, where the path is decided; no tensor, no
device sync, no allocation. The Triton paths record inside the bodies of the custom ops, which torch.compile runs as
opaque calls at run time. The fallbacks record in the traced Python wrappers, where dynamo replays a store into an
object attribute as a side effect without reading or guarding on it (a module-level dict would not do: dynamo
guards on its keys, and every other op's store would recompile the graph; tests/test_kernel_paths.py checks this).
"""

TRITON = "triton"
REFERENCE = "reference"

# One attribute per op. Optimizers record per step; the loss ops per forward (and backward where it launches).
OPS = ("cross_entropy", "cross_entropy_backward", "linear_cross_entropy", "adamw", "muon", "muon_gram")


class _Record:
    """Plain attributes, one per op in OPS: the path its last call took, or None."""


_last = _Record()


def record(op: str, path: str) -> None:
    setattr(_last, op, path)


def ran(op: str) -> str | None:
    """The path the last call of `op` took since reset(): TRITON, REFERENCE (muon_gram: "triangle" or "bmm"),
    or None when it has not run."""
    if op not in OPS:
        raise KeyError(f"kernels.paths: unknown op {op!r}; known: {OPS}")
    return getattr(_last, op)


def reset() -> None:
    for op in OPS:
        setattr(_last, op, None)


reset()
