"""Helpers shared by the engine and evaluation tests: a small tokenizer, a tiny random GPT, a scripted model."""

from __future__ import annotations

import functools

import torch
import torch.nn as nn

from fastsft.model import GPT, GPTConfig
from fastsft.tokenizer import Tokenizer
from helpers import random_model

CORPUS = [
    "Mia has 12 apples. She gets 7 more. How many apples does Mia have now? 12+7 = 19 #### 19",
    "Multiple Choice question: What is the capital of France? - Paris=A - Rome=B - Berlin=C - Madrid=D",
    "Respond only with the letter of the correct answer. A B C D",
    "Spell the word: strawberry strawberry:s,t,r,a,w,b,e,r,r,y 'strawberry'.count('r') 3",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3)) 0123456789 * / - + ( ) ,",
]


@functools.cache
def small_tokenizer() -> Tokenizer:
    return Tokenizer.train_from_iterator(CORPUS * 20, vocab_size=420)


def tiny_model(vocab_size: int, seed: int = 0, **overrides) -> GPT:
    """A tiny 2026-architecture GPT with every parameter random and non-zero (no feature silently a no-op)."""
    base = dict(sequence_len=256, vocab_size=vocab_size, n_layer=2, n_head=2, n_kv_head=1, n_embd=32,
                short_window=8, window_pattern="SL")
    return random_model(GPTConfig(**{**base, **overrides}), seed)


class ScriptedModel(nn.Module):
    """Says `script[k]` as generated token k after the prompt (then <|assistant_end|>), through the KV-cache interface
    the engine uses; the cache only keeps count of the position. The prompt is whatever the first call (at cache
    position 0) feeds, so one model answers prompts of any length."""

    def __init__(self, script: list[int], vocab_size: int, end_id: int):
        super().__init__()
        self.config = GPTConfig.seed_era(sequence_len=64, vocab_size=vocab_size, n_layer=1, n_head=1, n_kv_head=1,
                                       n_embd=2)
        self.script, self.prompt_len, self.end_id = script, 0, end_id
        self.anchor = nn.Parameter(torch.zeros(1))  # the engine reads device and dtype from the parameters
        self.fed: list[list[int]] = []  # every token column the engine fed, for the tests to inspect

    def forward(self, idx, kv_cache=None):
        B, T = idx.shape
        self.fed.append(idx[:, -1].tolist())
        if kv_cache.pos == 0:
            self.prompt_len = T
        kv_cache.pos += T
        k = kv_cache.pos - self.prompt_len  # index of the token to predict next
        token = self.script[k] if k < len(self.script) else self.end_id
        logits = torch.zeros(B, T, self.config.vocab_size)
        logits[:, -1, token] = 10.0
        return logits
