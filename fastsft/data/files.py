"""Where rows come from: local .jsonl / .json / .parquet files (optionally .gz) or the Hugging Face hub.

Both paths hand the same list-like of row dicts to the same row-mapping code (fastsft/data/rows.py), so a task
read from a local copy of a hub dataset behaves exactly like the hub version. This file also holds the mappers
of the three common conversation file layouts: chat `messages`, ShareGPT `conversations`, Alpaca
`instruction/input/output`.
"""

from __future__ import annotations

import gzip
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from fastsft.data.base import DataError, RowError

FILE_SUFFIXES = (".jsonl", ".json", ".parquet")


@dataclass
class Records:
    """Rows of one source plus how to name row i in messages (file line numbers for JSONL)."""

    name: str
    rows: Sequence[dict]
    line_numbers: list[int] | None = None
    skipped: Counter = field(default_factory=Counter)

    def where(self, i: int) -> str:
        return f"line {self.line_numbers[i]}" if self.line_numbers is not None else f"row {i}"


def _base_suffix(path: Path) -> str:
    """'.jsonl' for both x.jsonl and x.jsonl.gz."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def looks_like_file(source: str) -> bool:
    """True when a source string names a local file rather than a hub id (used to give 'file not found')."""
    p = Path(source)
    return (
        p.exists()
        or _base_suffix(p) in FILE_SUFFIXES
        or source.startswith((".", "/", "~"))
        or os.sep in source and source.count("/") != 1
    )


def _open_text(path: Path):
    if path.suffix.lower() == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def read_jsonl(path: Path, on_error: str = "error") -> Records:
    rows, lines, skipped = [], [], Counter()
    with _open_text(path) as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                if on_error == "error":
                    raise DataError(f"{path}: line {line_no}: malformed JSON ({e.msg} at column {e.colno})") from None
                skipped["malformed JSON line"] += 1
                continue
            rows.append(row)
            lines.append(line_no)
    return Records(str(path), rows, lines, skipped)


def read_json(path: Path) -> Records:
    """A JSON list of rows, or an object whose only list-valued field holds the rows ({"data": [...]})."""
    with _open_text(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            hint = " (one object per line is JSON Lines: name the file .jsonl)" if e.msg == "Extra data" else ""
            raise DataError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno} ({e.msg}){hint}") from None
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(
                f"{path}: a .json file must hold a list of rows (or an object with exactly one list of rows); "
                f"got an object with fields {sorted(data)[:10]}"
            )
        data = lists[0]
    if not isinstance(data, list):
        raise DataError(f"{path}: a .json file must hold a list of rows, got {type(data).__name__}")
    return Records(str(path), data)


def read_parquet(path: Path) -> Records:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"reading {path} needs the optional `pyarrow` package (pip install pyarrow)") from None
    return Records(str(path), pq.read_table(path).to_pylist())


def read_file(path: str | Path, on_error: str = "error") -> Records:
    """Rows of a local .jsonl / .json / .parquet file (.jsonl.gz and .json.gz too)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"data file not found: {path}" + (" (it is a directory)" if path.is_dir() else ""))
    suffix = _base_suffix(path)
    if suffix == ".jsonl":
        return read_jsonl(path, on_error)
    if suffix == ".json":
        return read_json(path)
    if suffix == ".parquet":
        return read_parquet(path)
    raise DataError(f"{path}: unknown file type {suffix or '(none)'!r}; expected one of {FILE_SUFFIXES} (or .gz)")


def read_hub(dataset_id: str, config: str | None, split: str) -> Records:
    """Rows of a hub dataset through the optional `datasets` package (an Arrow-backed list of dicts)."""
    try:
        import datasets
    except ImportError:
        raise ImportError(
            f"{dataset_id!r} is not a local file, and reading it from the Hugging Face hub needs the optional "
            f"`datasets` package: pip install 'fastsft[hub]' (or pass a local .jsonl/.json/.parquet file)"
        ) from None
    args = (dataset_id, config) if config else (dataset_id,)
    try:
        ds = datasets.load_dataset(*args, split=split)
    except Exception as e:  # noqa: BLE001 - any hub failure becomes one clear message
        raise DataError(f"could not load hub dataset {dataset_id!r} (config {config!r}, split {split!r}): {e}") from e
    return Records(f"{dataset_id}@{split}", ds)


def read_source(source: str, hub_config: str | None, default_split: str, on_error: str = "error") -> Records:
    """A local file when `source` names one, else a hub id with an optional '@split'."""
    if looks_like_file(source):
        return read_file(source, on_error)
    dataset_id, _, split = source.partition("@")
    return read_hub(dataset_id, hub_config, split or default_split)


# --- field helpers and layout mappers -----------------------------------------------------------------------------


def get_field(row: Any, name: str, kind: type | tuple[type, ...] = str) -> Any:
    """row[name] checked for type; a RowError (counted by reason) otherwise."""
    if not isinstance(row, dict):
        raise RowError(f"row is a {type(row).__name__}, not an object")
    if name not in row or row[name] is None:
        raise RowError(f"missing field {name!r}")
    value = row[name]
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise RowError(f"field {name!r} has type {type(value).__name__}, expected {names}")
    return value


def _copy_content(content: Any) -> Any:
    # Fresh containers so that callers mutating a conversation never change the rows held by the task.
    if isinstance(content, list):
        return [dict(p) if isinstance(p, dict) else p for p in content]
    return content


def map_messages(row: dict) -> dict:
    """Chat layout {"messages": [{"role", "content"}, ...]} (SmolTalk, OpenAI-style JSONL)."""
    messages = get_field(row, "messages", list)
    out = []
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise RowError("a message is not an object with 'role' and 'content'")
        out.append({"role": m["role"], "content": _copy_content(m["content"])})
    return {"messages": out}


SHAREGPT_ROLES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "bard": "assistant", "bing": "assistant",
    "system": "system",
}


def map_sharegpt(row: dict) -> dict:
    """ShareGPT layout {"conversations": [{"from": human|gpt|system, "value": str}, ...]} (optional "system")."""
    turns = get_field(row, "conversations", list)
    out = []
    system = row.get("system")
    if isinstance(system, str) and system.strip():
        out.append({"role": "system", "content": system})
    for t in turns:
        if not isinstance(t, dict) or "from" not in t or "value" not in t:
            raise RowError("a ShareGPT turn is not an object with 'from' and 'value'")
        role = SHAREGPT_ROLES.get(str(t["from"]).lower())
        if role is None:
            raise RowError(f"unknown ShareGPT speaker {t['from']!r}")
        out.append({"role": role, "content": t["value"]})
    return {"messages": out}


def map_alpaca(row: dict) -> dict:
    """Alpaca layout {"instruction", "input" (optional), "output"}; optional "system" and "history" [[q, a], ...]."""
    instruction = get_field(row, "instruction")
    output = get_field(row, "output")
    extra = row.get("input") or ""
    if not isinstance(extra, str):
        raise RowError(f"field 'input' has type {type(extra).__name__}, expected str")
    messages = []
    system = row.get("system")
    if isinstance(system, str) and system.strip():
        messages.append({"role": "system", "content": system})
    history = row.get("history") or []
    if not isinstance(history, list):
        raise RowError("field 'history' is not a list of [question, answer] pairs")
    for pair in history:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise RowError("field 'history' is not a list of [question, answer] pairs")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    return {"messages": messages}


# layout name -> (fields that identify it, mapper)
LAYOUTS = {
    "messages": (("messages",), map_messages),
    "sharegpt": (("conversations",), map_sharegpt),
    "alpaca": (("instruction", "output"), map_alpaca),
}


def detect_layout(rows: Sequence[dict], name: str, probe: int = 100) -> str:
    """The conversation layout of the first rows that identify one; a DataError listing the fields otherwise."""
    seen: set[str] = set()
    for row in rows[:probe] if isinstance(rows, list) else (rows[i] for i in range(min(probe, len(rows)))):
        if not isinstance(row, dict):
            continue
        seen.update(row)
        for layout, (fields, _) in LAYOUTS.items():
            if all(f in row for f in fields):
                return layout
    raise DataError(
        f"{name}: unknown field layout: rows have fields {sorted(seen)[:20]}; expected 'messages' (chat), "
        f"'conversations' (ShareGPT) or 'instruction' + 'output' (Alpaca)"
    )
