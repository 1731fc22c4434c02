"""Task specs: one string names a task or a mixture, for the training config and `fastsft inspect` alike.

    SPEC    = KIND[:SOURCE][?KEY=VALUE[&KEY=VALUE...]][*N]
    MIXTURE = SPEC[,SPEC...]

KIND is one of smoltalk, arc-easy, arc-challenge, mmlu, gsm8k, humaneval (built-in datasets), jsonl (chat
`messages`, ShareGPT or Alpaca, detected from the fields), sharegpt, alpaca (layout named), synthetic.
SOURCE is a local .jsonl/.json/.parquet file (optionally .gz), or a hub dataset id with an optional @split
(`gsm8k:openai/gsm8k@test`; `gsm8k:@test` or plain `gsm8k` use the task's own hub id and default split), or for
synthetic the task name with an optional @split (`synthetic:arithmetic@test`).
Options: start, stop, step (a slice of the task), size and seed (synthetic), subset (hub config, e.g.
`mmlu?subset=auxiliary_train`), layout (jsonl: auto, messages, sharegpt, alpaca), max_row_bytes (the longest
JSONL line read, fastsft/data/files.py), and FIELD=NAME to read a field of the task's layout from another field of
the rows (`alpaca:data.json?output=response`). Options begin at the last '?' followed by KEY=VALUE pairs, so a
file name may itself contain '?'.
`*N` passes the task N times to the mixture, so each of its examples is seen N times per epoch.
Examples: `gsm8k:data/gsm8k_train.jsonl?stop=1000`, `smoltalk,mmlu?subset=auxiliary_train,gsm8k*2`,
`synthetic:arithmetic?size=20000,synthetic:spell@train?size=5000`. A path containing ',' cannot be in a spec.
"""

from __future__ import annotations

import os
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
INT_OPTIONS = ("start", "stop", "step", "size", "seed", "max_row_bytes")
STR_OPTIONS = ("subset", "layout")
REPEAT = re.compile(r"\*(\d+)$")
# A '*' near the end that is not a valid '*N' (a typo such as 'gsm8k*2x' or 'gsm8k*'): nothing after it but
# characters that cannot end a path ('/' would make it a directory name, '.' a file suffix).
BAD_REPEAT = re.compile(r"\*[^*/.?]*$")
FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*$")


def _parse_options(spec: str, query: str) -> dict | None:
    """'k=v&k2=v2' -> options (field mappings under 'field_map'); None when `query` is not an option list at all."""
    items = query.split("&")
    if not all("=" in item and FIELD_NAME.match(item.partition("=")[0]) for item in items):
        return None
    options: dict = {}
    for item in items:
        key, _, value = item.partition("=")
        if key in INT_OPTIONS:
            try:
                options[key] = int(value)
            except ValueError:
                raise DataError(f"task spec {spec!r}: option {key} must be an integer, got {value!r}") from None
        elif key in STR_OPTIONS:
            options[key] = value
        elif FIELD_NAME.match(value):  # a field mapping: the task's field KEY is the row's field VALUE
            options.setdefault("field_map", {})[key] = value
        else:
            raise DataError(f"task spec {spec!r}: bad option {item!r}; expected KEY=VALUE with KEY one of "
                            f"{', '.join(INT_OPTIONS + STR_OPTIONS)}, or FIELD=NAME to read a field of the task "
                            f"from the row's field NAME")
    return options


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
    elif BAD_REPEAT.search(text) and not os.path.exists(text.partition(":")[2]):
        raise DataError(f"task spec {spec!r}: bad repeat {BAD_REPEAT.search(text).group(0)!r}; '*N' needs a "
                        f"whole number N >= 1 (e.g. gsm8k*2)")
    kind, _, rest = text.partition(":")
    kind = kind.strip().lower()
    if kind not in KINDS:
        kind_only = kind.partition("?")[0]
        if kind_only in KINDS:  # 'gsm8k?stop=3': options straight after the kind
            kind, rest = kind_only, text[len(kind_only):]
        else:
            raise DataError(f"task spec {spec!r}: unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
    # Options start at the last '?' whose tail is a KEY=VALUE list, so a file name may contain '?' itself.
    source, options = rest, {}
    cut = rest.rfind("?")
    while cut >= 0:
        parsed = _parse_options(spec, rest[cut + 1:])
        if parsed is not None:
            source, options = rest[:cut], parsed
            break
        cut = rest.rfind("?", 0, cut)
    if cut < 0 and "?" in rest and not os.path.exists(rest):
        query = rest[rest.rfind("?") + 1:]
        raise DataError(f"task spec {spec!r}: bad option {query!r}; expected KEY=VALUE pairs joined by '&' with KEY "
                        f"one of {', '.join(INT_OPTIONS + STR_OPTIONS)} or a field name (no such file either)")
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
