"""Triton kernels of fastsft, shipped in the wheel as `fastsft.kernels`.

One file per op: the Triton kernel, its PyTorch reference and its autograd wrapper. Names resolve lazily so that
`import fastsft.kernels` does not pull in Triton until an op is used.
"""

import importlib

_EXPORTS = {
    "cross_entropy": ".cross_entropy",
    "linear_cross_entropy": ".linear_cross_entropy",
    "AdamW": ".adamw",
    "Muon": ".muon",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
