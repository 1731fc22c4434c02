"""A model and its tokenizer from a fastsft checkpoint dir, or a training run dir (checkpoint in DIR/checkpoint)."""

from __future__ import annotations

import os
from pathlib import Path

from fastsft.checkpoint import CONFIG_FILE, TOKENIZER_FILE, load
from fastsft.tokenizer import Tokenizer

RUN_CHECKPOINT = "checkpoint"  # the training driver's layout: RUN_DIR/checkpoint


def checkpoint_dir(path: str | os.PathLike) -> Path:
    """The checkpoint directory meant by `path`: itself, or its `checkpoint` subdirectory in a run dir."""
    path = Path(path)
    if (path / CONFIG_FILE).is_file():
        return path
    if (path / RUN_CHECKPOINT / CONFIG_FILE).is_file():
        return path / RUN_CHECKPOINT
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    raise FileNotFoundError(f"{path} is neither a fastsft checkpoint (no {CONFIG_FILE}) nor a run dir with "
                            f"{RUN_CHECKPOINT}/{CONFIG_FILE}")


def load_for_inference(path: str | os.PathLike, device="cpu"):
    """(model in eval mode, Tokenizer, checkpoint dir)."""
    directory = checkpoint_dir(path)
    # The checkpoint's own tokenizer, else the run dir's (the driver writes one there before the first save).
    candidates = [directory / TOKENIZER_FILE, Path(path) / TOKENIZER_FILE]
    tokenizer_file = next((c for c in candidates if c.is_file()), None)
    if tokenizer_file is None:
        raise FileNotFoundError(f"checkpoint {directory} has no {TOKENIZER_FILE}; save the tokenizer with the model")
    model, _meta = load(directory, device=device)
    tokenizer = Tokenizer.from_file(tokenizer_file)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"checkpoint {directory}: tokenizer has {tokenizer.vocab_size} tokens, the model only "
                         f"{model.config.vocab_size}")
    return model.eval(), tokenizer, directory
