"""fastsft: supervised fine-tuning of GPT chat models, performance first.

The data path runs csrc/ (render, pack) -> fastsft/ (data, model, driver) -> fastsft.kernels (loss, optimizers).
"""

__version__ = "0.1.0"
