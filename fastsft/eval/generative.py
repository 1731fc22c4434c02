"""Generative scoring: completions from the engine, judged by the task's own `evaluate` (GSM8K's final number,
HumanEval's tests in the sandbox, the synthetic tasks' answers), with pass@k over k samples."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from math import comb

from fastsft.chat import render_for_completion
from fastsft.engine import Engine, Generation


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of a problem with c correct among n samples (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


@dataclass
class ProblemResult:
    correct: list[bool]  # one per sample
    generations: list[Generation]


def generate_and_score(engine: Engine, task, conversations: list[dict], *, num_samples: int, max_new_tokens: int,
                       temperature: float, seeds: list[int], names: list[str] | None = None) -> list[ProblemResult]:
    """Generate num_samples completions per conversation, then score all of them; scoring runs in threads because
    HumanEval's runs wait on sandbox processes (other tasks' checks are microseconds either way)."""
    generations = []
    longest = getattr(engine.model, "rotary_len", None)  # positions the model has rotary tables for
    for i, conversation in enumerate(conversations):
        prompt = render_for_completion(engine.tokenizer, conversation, index=i)
        if longest is not None and len(prompt) + max_new_tokens > longest:
            name = names[i] if names else f"conversation {i}"
            raise ValueError(f"{name}: prompt of {len(prompt)} tokens + {max_new_tokens} new tokens is longer than "
                             f"the model's {longest} positions")
        generations.append(engine.generate_batch(prompt, num_samples=num_samples, max_new_tokens=max_new_tokens,
                                                 temperature=temperature, seed=seeds[i]))
    pairs = [(conv, g.text) for conv, gens in zip(conversations, generations) for g in gens]
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        verdicts = list(pool.map(lambda pair: bool(task.evaluate(*pair)), pairs))
    return [ProblemResult(verdicts[i * num_samples:(i + 1) * num_samples], gens)
            for i, gens in enumerate(generations)]
