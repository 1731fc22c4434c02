"""`fastsft inspect`: look at training data the way the model will see it, before spending GPU time on it.

Shows one rendered conversation with its supervision mask in colour, then statistics over many conversations
at a row length T: tokens, supervised share, length percentiles, how many conversations T would truncate and
how well they pack into rows of T (best-fit, the packer of training), and for a mixture each task's share of
rows, tokens and supervised tokens and how often each of its examples is seen per epoch. The statistics use
the fast render path (fastsft.packing.render_batch_flat), the same one training uses.

Tokenizer (`--tokenizer`): a tokenizer.json, or a directory holding GPT-2's vocab.json + merges.txt. Without it,
the FASTSFT_TOKENIZER environment variable is used the same way; failing that a small byte-level BPE
(DEFAULT_VOCAB_SIZE tokens) is trained on the inspected conversations themselves, which works offline but counts
more tokens than a full-size tokenizer would (the output says so).
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np

from fastsft.data.base import DataError, Task, TaskMixture, conversation_text
from fastsft.data.spec import load_mixture, load_task, parse_spec, split_specs

DEFAULT_VOCAB_SIZE = 4096
TOKENIZER_TRAIN_CONVERSATIONS = 2000  # enough text for a 4K vocabulary, trained in about a second
RENDER_CHUNK = 4096  # conversations per render call: bounded memory on big datasets
UNTRUNCATED = 1 << 30  # render without a cap, so truncation at T can be counted
ANSI = re.compile(r"\033\[[0-9;]*m")


def strip_ansi(text: str) -> str:
    return ANSI.sub("", text)


def load_tokenizer(path: str | None, sample: list[dict]):
    """(tokenizer, one-line description) from --tokenizer, FASTSFT_TOKENIZER, or trained on `sample`."""
    from fastsft.tokenizer import Tokenizer

    origin = "--tokenizer"
    if path is None and os.environ.get("FASTSFT_TOKENIZER"):
        path, origin = os.environ["FASTSFT_TOKENIZER"], "FASTSFT_TOKENIZER"
    if path is not None:
        p = Path(path).expanduser()
        if p.is_file() and p.name in ("vocab.json", "merges.txt"):
            # GPT-2's files are a pair: naming one of them means the folder that holds both.
            if not (p.parent / "vocab.json").is_file() or not (p.parent / "merges.txt").is_file():
                raise FileNotFoundError(f"{origin} {path}: GPT-2's {p.name} needs vocab.json and merges.txt side by "
                                        f"side in {p.parent}")
            p = p.parent
        if p.is_dir():
            vocab, merges = p / "vocab.json", p / "merges.txt"
            if not (vocab.is_file() and merges.is_file()):
                raise FileNotFoundError(f"{origin} {path}: a directory must hold vocab.json and merges.txt (GPT-2)")
            tok = Tokenizer.from_gpt2(vocab, merges)
            return tok, f"GPT-2 BPE from {p} ({tok.vocab_size:,} tokens with the chat specials)"
        if p.is_file():
            tok = Tokenizer.from_file(p)
            return tok, f"{p} ({tok.vocab_size:,} tokens)"
        raise FileNotFoundError(f"{origin} {path}: no such tokenizer.json file or GPT-2 directory")
    texts = [t for conv in sample[:TOKENIZER_TRAIN_CONVERSATIONS] for t in conversation_text(conv)]
    tok = Tokenizer.train_from_iterator(texts, DEFAULT_VOCAB_SIZE)
    used = min(len(sample), TOKENIZER_TRAIN_CONVERSATIONS)
    return tok, (
        f"none given: trained a {tok.vocab_size:,}-token byte-level BPE on {used:,} of these conversations"
        " (token counts run higher than with a full-size tokenizer; pass --tokenizer)"
    )


@dataclass
class Rendered:
    """Per-conversation lengths and supervised counts, and which task each came from."""

    lengths: np.ndarray  # (N,) int64, untruncated
    supervised: np.ndarray  # (N,) int64
    source: np.ndarray  # (N,) int64, position in the mixture's distinct tasks (0 for a single task)
    flat: list  # RenderedBatch chunks, for pack_rows


def render_sample(tokenizer, task: Task, count: int, sources: list[int]) -> Rendered:
    from fastsft.packing import render_batch_flat

    lengths, supervised, flat = [], [], []
    for start in range(0, count, RENDER_CHUNK):
        batch = render_batch_flat(tokenizer, [task[i] for i in range(start, min(count, start + RENDER_CHUNK))],
                                  max_tokens=UNTRUNCATED)
        flat.append(batch)
        lengths.append(batch.lengths)
        supervised.append(np.add.reduceat(batch.mask.astype(np.int64), batch.offsets[:-1]) if len(batch) else [])
    return Rendered(np.concatenate(lengths).astype(np.int64), np.concatenate(supervised).astype(np.int64),
                    np.asarray(sources, dtype=np.int64), flat)


def packing_efficiency(rendered: Rendered, seq_len: int) -> tuple[int, float, int, int]:
    """(rows, efficiency, truncated, supervised targets) of best-fit packing into rows of seq_len, one render chunk
    at a time.

    Packing chunk by chunk bounds memory and resembles a loader that packs from a buffer of conversations; one
    global best-fit over everything would report a slightly better efficiency than training sees.
    """
    from fastsft.packing import pack_rows

    rows = real = truncated = targets = 0
    for batch in rendered.flat:
        # Enough cu_seqlens segments for any packing; statistics only, no compiled shapes here.
        packed = pack_rows(batch, seq_len, max_seqs=2 * len(batch) + 1)
        rows, real, truncated = rows + packed.rows, real + packed.num_tokens, truncated + packed.num_truncated
        targets += packed.num_supervised
    return rows, real / (rows * seq_len), truncated, targets


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def inspect_data(spec: str, index: int = 0, seq_len: int = 2048, tokenizer: str | None = None,
                 limit: int | None = 20_000, seed: int = 42, on_error: str = "error", color: bool = True,
                 out: TextIO | None = None) -> dict:
    """Print the inspection report of `spec` to `out` (stdout) and return its numbers."""
    out = out or sys.stdout
    if seq_len < 2:
        raise ValueError(f"--seq-len must be >= 2, got {seq_len}")
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    specs = split_specs(spec)
    single = len(specs) == 1 and parse_spec(specs[0])[3] == 1
    task: Task = load_task(specs[0], on_error=on_error) if single else load_mixture(specs, seed=seed, on_error=on_error)
    n_total = len(task)
    if not -n_total <= index < n_total:
        raise IndexError(f"--index {index} out of range: {task.name} has {n_total} conversations")
    index %= n_total
    count = n_total if limit is None else min(limit, n_total)

    def physical(i: int) -> int:  # task[i] reads example start + i * step of the task's own numbering
        return task.start + i * task.step

    if isinstance(task, TaskMixture):
        distinct = task.repeats()
        position = {id(t): k for k, (t, _) in enumerate(distinct)}
        sources = [position[id(task.tasks[task.source_of(physical(i))[0]])] for i in range(count)]
    else:
        distinct, sources = [(task, 1)], [0] * count
    sample = [task[i] for i in range(min(n_total, TOKENIZER_TRAIN_CONVERSATIONS))]
    tok, tok_desc = load_tokenizer(tokenizer, sample)

    def say(line: str = "") -> None:
        out.write((line if color else strip_ansi(line)) + "\n")

    say(f"data: {spec}")
    say(f"  {n_total:,} conversations" + (f" in a mixture of {len(distinct)} tasks (seed {seed})"
                                          if isinstance(task, TaskMixture) else f" ({task.name})"))
    if task.skip_summary():
        say("  " + task.skip_summary().replace("\n", "\n  "))
    say(f"tokenizer: {tok_desc}")
    say()

    # One conversation, as the model sees it.
    from fastsft.chat import render_conversation, visualize_tokenization

    conversation = task[index]
    where = ""
    if isinstance(task, TaskMixture):
        t, local = task.source_of(physical(index))
        where = f" = {task.tasks[t].name} #{local}"
    elif hasattr(task, "row_number"):
        where = f" ({task.row_number(physical(index))})"
    ids, mask = render_conversation(tok, conversation, max_tokens=UNTRUNCATED)
    cut = f", truncated to {seq_len} in training" if len(ids) > seq_len else ""
    say(f"conversation {index}{where}: {len(ids)} tokens, {sum(mask)} supervised{cut}")
    say("(green = supervised target, mask 1; red = context only, mask 0; tokens separated by '|')")
    say(visualize_tokenization(tok, ids[:seq_len], mask[:seq_len]))
    say()

    # Statistics over the first `count` conversations (of the shuffled order, for a mixture).
    rendered = render_sample(tok, task, count, sources)
    lengths, supervised = rendered.lengths, rendered.supervised
    tokens, sup = int(lengths.sum()), int(supervised.sum())
    p50, p90, p99 = np.percentile(lengths, [50, 90, 99])
    long = lengths > seq_len
    rows, efficiency, truncated, targets = packing_efficiency(rendered, seq_len)
    scope = "all" if count == n_total else f"the first {count:,} of {n_total:,}; --limit to change"
    say(f"statistics over {count:,} conversations ({scope}), rows of T={seq_len}:")
    say(f"  tokens           {tokens:,} ({tokens / count:.1f} per conversation)")
    say(f"  supervised       {sup:,} ({_pct(sup / tokens)} of tokens)")
    say(f"  length           p50 {p50:.0f}, p90 {p90:.0f}, p99 {p99:.0f}, max {lengths.max():,}")
    say(f"  truncated at T   {int(long.sum()):,} conversations ({_pct(long.mean())}), losing "
        f"{int((lengths[long] - seq_len).sum()):,} tokens")
    say(f"  packed at T      {rows:,} rows, efficiency {_pct(efficiency)} (best-fit, real tokens / row slots)")
    say(f"  targets at T     {targets:,} supervised targets in the packed rows")
    stats = dict(conversations=count, total=n_total, tokens=tokens, supervised_tokens=sup,
                 supervised_ratio=sup / tokens,
                 length_p50=float(p50), length_p90=float(p90), length_p99=float(p99), length_max=int(lengths.max()),
                 truncated=int(long.sum()), pack_truncated=truncated, rows=rows, efficiency=efficiency,
                 supervised_targets=targets, tasks=[])
    if targets == 0:  # the statistics above are printed first: they show why
        if sup == 0:
            why = f"none of the {count:,} conversations has a supervised (assistant) token"
        else:
            why = (f"{int(long.sum()):,} of {count:,} conversations are longer than T={seq_len} and every supervised "
                   f"token lies past the cut; raise --seq-len")
        raise DataError(f"{spec}: no supervised target at T={seq_len}: {why}")

    if isinstance(task, TaskMixture):
        say()
        say("per task (shares of the sample; seen/epoch = times each example appears per epoch):")
        width = max(len(t.name) for t, _ in distinct)
        say(f"  {'task':<{width}}  {'size':>8}  {'seen/epoch':>10}  {'rows':>6}  {'tokens':>6}  {'supervised':>10}")
        for k, (t, repeats) in enumerate(distinct):
            pick = rendered.source == k
            row_share, tok_share = pick.mean(), lengths[pick].sum() / tokens
            sup_share = supervised[pick].sum() / sup if sup else 0.0
            say(f"  {t.name:<{width}}  {len(t):>8,}  {repeats:>10}  {_pct(row_share):>6}  {_pct(tok_share):>6}  "
                f"{_pct(sup_share):>10}")
            stats["tasks"].append(dict(name=t.name, size=len(t), repeats=repeats, rows=float(row_share),
                                       tokens=float(tok_share), supervised=float(sup_share)))
    return stats
