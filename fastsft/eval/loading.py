"""A model and its tokenizer from a fastsft checkpoint dir, or from a training run dir (checkpoint in DIR/checkpoint)."""

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
    """(model in eval mode, Tokenizer, checkpoint dir). The tokenizer must be saved beside the weights."""
    directory = checkpoint_dir(path)
    tokenizer_file = directory / TOKENIZER_FILE
    if not tokenizer_file.is_file():
        raise FileNotFoundError(f"checkpoint {directory} has no {TOKENIZER_FILE}; save the tokenizer with the model")
    model, _meta = load(directory, device=device)
    tokenizer = Tokenizer.from_file(tokenizer_file)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"checkpoint {directory}: tokenizer has {tokenizer.vocab_size} tokens, the model only "
                         f"{model.config.vocab_size}")
    return model.eval(), tokenizer, directory
