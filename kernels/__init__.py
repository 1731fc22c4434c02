"""Triton kernels of fastsft, shipped in the wheel as `fastsft.kernels`.

One file per op: the Triton kernel, its PyTorch reference and its autograd wrapper. The ops are imported eagerly:
two of them share their module's name, and a lazy lookup would hand back the module once the submodule had been
imported directly (e.g. `import fastsft.kernels.linear_cross_entropy`).
"""

from .adamw import AdamW
from .cross_entropy import cross_entropy
from .linear_cross_entropy import linear_cross_entropy
from .muon import Muon

__all__ = ["AdamW", "Muon", "cross_entropy", "linear_cross_entropy"]
