"""Categorical scoring: many multiple-choice prompts of different lengths through ONE packed forward each batch,
the answer read from the logits of the allowed letters only (so a model that would rather say something else still
gets its best letter counted, as in nanochat's ChatCORE)."""

from __future__ import annotations

import torch

from fastsft.chat import render_for_completion

MAX_BATCH_TOKENS = 16384  # the forward returns (tokens, vocab) fp32 logits: 2 GiB at vocab 32768


def letter_ids(tokenizer, conversation: dict, where: str) -> list[int]:
    letters = conversation.get("letters")
    if not letters:
        raise ValueError(f"{where}: a categorical conversation needs 'letters'")
    ids = []
    for letter in letters:
        tokens = tokenizer.encode(letter)
        if len(tokens) != 1:
            raise ValueError(f"{where}: answer letter {letter!r} is {len(tokens)} tokens, not one")
        ids.append(tokens[0])
    return ids


def _batches(lengths: list[int], batch_size: int):
    start = 0
    while start < len(lengths):
        end, tokens = start, 0
        while end < len(lengths) and end - start < batch_size and (end == start or
                                                                    tokens + lengths[end] <= MAX_BATCH_TOKENS):
            tokens += lengths[end]
            end += 1
        yield start, end
        start = end


@torch.no_grad()
def choose_letters(model, tokenizer, conversations: list[dict], *, batch_size: int = 32, device=None,
                   names: list[str] | None = None) -> list[str]:
    """The letter each conversation's prompt makes most likely among its own `letters`."""
    device = device or next(model.parameters()).device
    prompts = [render_for_completion(tokenizer, c, index=i) for i, c in enumerate(conversations)]
    names = names or [f"conversation {i}" for i in range(len(conversations))]
    choices = [letter_ids(tokenizer, c, names[i]) for i, c in enumerate(conversations)]
    longest = getattr(model, "rotary_len", None)  # positions the model has rotary tables for
    for i, prompt in enumerate(prompts):
        if longest is not None and len(prompt) > longest:
            raise ValueError(f"{names[i]}: prompt of {len(prompt)} tokens is longer than the model's "
                             f"{longest} positions")
    picked: list[str] = []
    for start, end in _batches([len(p) for p in prompts], batch_size):
        batch = prompts[start:end]
        lengths = torch.tensor([len(p) for p in batch])
        ids = torch.tensor([t for p in batch for t in p], dtype=torch.long, device=device)  # (N,)
        positions = torch.cat([torch.arange(n) for n in lengths.tolist()]).to(device)  # restart per prompt
        cu_seqlens = torch.cat([torch.zeros(1, dtype=torch.int32), lengths.cumsum(0).int()]).to(device)
        logits = model(ids, position_ids=positions, cu_seqlens=cu_seqlens, max_seqlen=int(lengths.max()))
        last = logits[cu_seqlens[1:].long() - 1]  # (B, vocab): the position after <|assistant_start|>
        for row, k in enumerate(range(start, end)):
            allowed = torch.tensor(choices[k], device=device)
            best = int(last[row, allowed].argmax())
            picked.append(conversations[k]["letters"][best])
    return picked
