"""Task specs: one string names a task or a mixture, for the training config and `fastsft inspect` alike.

    SPEC    = KIND[:SOURCE][?KEY=VALUE[&KEY=VALUE...]][*N]
    MIXTURE = SPEC[,SPEC...]

KIND is one of smoltalk, arc-easy, arc-challenge, mmlu, gsm8k, humaneval (built-in datasets), jsonl (chat
`messages`, ShareGPT or Alpaca, detected from the fields), sharegpt, alpaca (layout named), synthetic.
SOURCE is a local .jsonl/.json/.parquet file (optionally .gz), or a hub dataset id with an optional @split
(`gsm8k:openai/gsm8k@test`; `gsm8k:@test` or plain `gsm8k` use the task's own hub id and default split), or for
synthetic the task name with an optional @split (`synthetic:arithmetic@test`).
Options: start, stop, step (a slice of the task), size and seed (synthetic), subset (hub config, e.g.
`mmlu?subset=auxiliary_train`), layout (jsonl: auto, messages, sharegpt, alpaca).
`*N` passes the task N times to the mixture, so each of its examples is seen N times per epoch.
Examples: `gsm8k:data/gsm8k_train.jsonl?stop=1000`, `smoltalk,mmlu?subset=auxiliary_train,gsm8k*2`,
`synthetic:arithmetic?size=20000,synthetic:spell@train?size=5000`. A path containing ',' cannot be in a spec.
"""

from __future__ import annotations

import re
from typing import Iterable

from fastsft.data.arc import ARC
from fastsft.data.base import DataError, Task, TaskMixture, check_on_error
from fastsft.data.custom import ConversationFile
from fastsft.data.gsm8k import GSM8K
from fastsft.data.humaneval import HumanEval
from fastsft.data.mmlu import MMLU
from fastsft.data.smoltalk import SmolTalk
from fastsft.data.synthetic import SYNTHETIC_TASKS

KINDS = ("smoltalk", "arc-easy", "arc-challenge", "mmlu", "gsm8k", "humaneval", "jsonl", "sharegpt", "alpaca",
         "synthetic")
INT_OPTIONS = ("start", "stop", "step", "size", "seed")
STR_OPTIONS = ("subset", "layout")
REPEAT = re.compile(r"\*(\d+)$")


def parse_spec(spec: str) -> tuple[str, str, dict, int]:
    """'KIND:SOURCE?k=v*N' -> (kind, source, options, repeats)."""
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"empty task spec {spec!r}; expected KIND[:SOURCE], KIND one of {', '.join(KINDS)}")
    text = spec.strip()
    repeats = 1
    match = REPEAT.search(text)
    if match:
        repeats = int(match.group(1))
        if repeats < 1:
            raise DataError(f"task spec {spec!r}: repeat count must be >= 1")
        text = text[: match.start()]
    text, _, query = text.partition("?")
    kind, _, source = text.partition(":")
    kind = kind.strip().lower()
    if kind not in KINDS:
        raise DataError(f"task spec {spec!r}: unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
    options: dict = {}
    for item in filter(None, query.split("&")):
        key, eq, value = item.partition("=")
        if not eq or key not in INT_OPTIONS + STR_OPTIONS:
            raise DataError(f"task spec {spec!r}: bad option {item!r}; expected KEY=VALUE with KEY one of "
                            f"{', '.join(INT_OPTIONS + STR_OPTIONS)}")
        if key in INT_OPTIONS:
            try:
                options[key] = int(value)
            except ValueError:
                raise DataError(f"task spec {spec!r}: option {key} must be an integer, got {value!r}") from None
        else:
            options[key] = value
    return kind, source.strip(), options, repeats


def _build(kind: str, source: str, options: dict, on_error: str) -> Task:
    if kind == "synthetic":
        name, _, split = source.partition("@")
        if name not in SYNTHETIC_TASKS:
            raise DataError(f"unknown synthetic task {name!r}; expected one of {', '.join(SYNTHETIC_TASKS)}")
        return SYNTHETIC_TASKS[name](split=split or "train", **options)
    rows_source, split = source or None, None
    if source.startswith("@"):  # the task's own hub id with another split
        rows_source, split = None, source[1:]
    common = dict(on_error=on_error, **options)
    if kind in ("jsonl", "sharegpt", "alpaca"):
        if rows_source is None:
            raise DataError(f"{kind}: a file path (or hub dataset id) is required, e.g. {kind}:data/train.jsonl")
        layout = common.pop("layout", "auto" if kind == "jsonl" else kind)
        return ConversationFile(rows_source, layout=layout, **common)
    cls = {"smoltalk": SmolTalk, "arc-easy": ARC, "arc-challenge": ARC, "mmlu": MMLU, "gsm8k": GSM8K,
           "humaneval": HumanEval}[kind]
    if kind.startswith("arc-"):
        common["subset"] = "ARC-Easy" if kind == "arc-easy" else "ARC-Challenge"
    if split is not None:
        rows_source = f"{cls.hub_id}@{split}"
    return cls(rows_source, **common)


def _build_checked(spec: str, kind: str, source: str, options: dict, on_error: str) -> Task:
    try:
        return _build(kind, source, options, on_error)
    except TypeError as e:
        if "unexpected keyword argument" not in str(e):
            raise
        raise DataError(f"task spec {spec!r}: option not taken by a {kind} task ({e})") from None


def load_task(spec: str, on_error: str = "error", **kw) -> Task:
    """The task named by one spec (see the module docstring); keyword arguments override the spec's options."""
    check_on_error(on_error)
    kind, source, options, repeats = parse_spec(spec)
    if repeats != 1:
        raise DataError(f"task spec {spec!r}: '*N' repeats only make sense in a mixture (load_mixture)")
    return _build_checked(spec, kind, source, {**options, **kw}, on_error)


def split_specs(specs: str | Iterable[str]) -> list[str]:
    """'a,b*2' or ['a', 'b*2'] -> ['a', 'b*2']."""
    items = [specs] if isinstance(specs, str) else list(specs)
    out = [part.strip() for item in items for part in item.split(",") if part.strip()]
    if not out:
        raise DataError(f"no task specs in {specs!r}")
    return out


def load_mixture(specs: str | Iterable[str], seed: int = 42, on_error: str = "error") -> TaskMixture:
    """A TaskMixture of comma-separated specs; `*N` oversamples, and a spec given twice is loaded once."""
    loaded: dict[str, Task] = {}
    tasks = []
    for item in split_specs(specs):
        kind, source, options, repeats = parse_spec(item)
        key = REPEAT.sub("", item.strip())
        if key not in loaded:
            loaded[key] = _build_checked(item, kind, source, options, on_error)
        tasks += [loaded[key]] * repeats
    return TaskMixture(tasks, seed=seed)
