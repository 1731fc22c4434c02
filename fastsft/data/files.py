"""Where rows come from: local .jsonl / .json / .parquet files (optionally .gz) or the Hugging Face hub.

Both paths hand the same list-like of row dicts to the same row-mapping code (fastsft/data/rows.py), so a task
read from a local copy of a hub dataset behaves exactly like the hub version. This file also holds the mappers
of the three common conversation file layouts: chat `messages`, ShareGPT `conversations`, Alpaca
`instruction/input/output`.

Bad input (docs/bad_input.md has the table). JSONL is read as a stream of byte lines, each line at most
`max_row_bytes` (DEFAULT_MAX_ROW_BYTES unless the spec sets `max_row_bytes=N`), so a .gz that inflates to
gigabytes in one line is stopped at the limit and never reaches memory or the tokenizer. A line that is too
long, not UTF-8, not JSON, or nested deeper than the JSON parser goes is a bad row: an error naming the file, the
line and the reason, or with on_error='skip' left out and counted by reason. Corrupt or truncated gzip data is an
error naming the file and the last line read. A UTF-8 byte order mark at the start of a file is accepted.

Memory: the lines of a JSONL file are kept as raw bytes back to back (JsonLines) and parsed again each time a row
is read, so reading a file holds about its own size instead of the several times that parsed Python dicts take
(tests/test_bad_input.py measures it). A .json file is one document: it is read whole (up to MAX_JSON_BYTES),
parsed at once (the peak), then held the same way; invalid UTF-8 inside it reaches the rows as lone surrogates,
which the row check names.
"""

from __future__ import annotations

import gzip
import inspect
import json
import os
import zlib
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from fastsft.data.base import BadRowError, DataError, RowError

FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
DEFAULT_MAX_ROW_BYTES = 64 << 20  # one JSONL line; far above any real conversation, far below a memory problem
MAX_JSON_BYTES = 1 << 30  # a whole .json document (decompressed; parsed it takes several times that); use JSONL
BOM = b"\xef\xbb\xbf"
# What a broken .gz raises while it is read: a bad header, a bad deflate stream, or data ending mid-stream.
GZIP_ERRORS = (gzip.BadGzipFile, zlib.error, EOFError)


@dataclass
class Records:
    """Rows of one source plus how to name row i in messages (file line numbers for JSONL)."""

    name: str
    rows: Sequence[dict]
    line_numbers: Sequence[int] | None = None
    skipped: Counter = field(default_factory=Counter)

    def where(self, i: int) -> str:
        return f"line {self.line_numbers[i]}" if self.line_numbers is not None else f"row {i}"


class JsonLines(Sequence):
    """The rows of a JSONL file kept as their raw UTF-8 lines back to back, parsed on every access.

    Every line stored here was parsed once already while reading (so it is valid), and each access returns
    fresh dicts, so no caller can change the rows another caller sees.
    """

    def __init__(self, blob: bytearray, offsets: np.ndarray):
        self.blob = blob  # the lines, back to back
        self.offsets = offsets  # (N+1,) int64: line i is blob[offsets[i]:offsets[i+1]]

    @classmethod
    def from_rows(cls, rows: list) -> "JsonLines":
        """Parsed rows serialized back to lines (a .json document), so they too are held at about file size.

        'surrogatepass' keeps a lone surrogate (an invalid byte of the file, see read_json) for the row check."""
        blob, offsets = bytearray(), array("q", [0])
        for row in rows:
            blob += json.dumps(row, ensure_ascii=False).encode("utf-8", "surrogatepass")
            offsets.append(len(blob))
        return cls(blob, np.frombuffer(offsets, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"row {i} out of range for {n} rows")
        i = int(i) % n
        a, b = self.offsets[i], self.offsets[i + 1]
        return json.loads(self.blob[a:b].decode("utf-8", "surrogatepass"))

    def __iter__(self) -> Iterator[Any]:
        for i in range(len(self)):
            yield self[i]


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


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.suffix.lower() == ".gz" else open(path, "rb")


def parse_line(raw: bytes) -> Any:
    """One JSONL line -> its value, or a RowError whose reason groups such lines for counting."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RowError("invalid UTF-8 line", f"byte 0x{raw[e.start]:02x} at byte {e.start + 1}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise RowError("malformed JSON line", f"{e.msg} at column {e.colno}") from None
    except RecursionError:
        raise RowError("JSON nested too deeply") from None


def read_jsonl(path: Path, on_error: str = "error", max_row_bytes: int = DEFAULT_MAX_ROW_BYTES) -> Records:
    """The rows of a JSON Lines file (or .jsonl.gz), streamed line by line; see the module docstring."""
    if isinstance(max_row_bytes, bool) or not isinstance(max_row_bytes, int) or max_row_bytes < 1:
        raise ValueError(f"max_row_bytes must be a positive int, got {max_row_bytes!r}")
    blob, offsets, lines, skipped = bytearray(), array("q", [0]), array("q"), Counter()
    line_no = 0
    with _open_binary(path) as f:
        try:
            while True:
                raw = f.readline(max_row_bytes + 1)
                if not raw:
                    break
                line_no += 1
                if line_no == 1 and raw.startswith(BOM):
                    raw = raw[len(BOM):]
                too_long = len(raw) > max_row_bytes and not raw.endswith(b"\n")
                try:
                    if too_long:
                        raise RowError("line longer than max_row_bytes",
                                       f"more than {max_row_bytes:,} bytes; if such rows are real, raise the limit "
                                       f"with the spec option ?max_row_bytes=N")
                    if not raw.strip():
                        continue
                    parse_line(raw)
                except RowError as e:
                    if on_error == "error":
                        raise BadRowError(f"{path}: line {line_no}: {e}") from None
                    if too_long:
                        raw = b""  # let the piece go before reading on
                        while (rest := f.readline(1 << 20)) and not rest.endswith(b"\n"):
                            pass  # skip the rest of the line in bounded pieces, never holding it
                    skipped[e.reason] += 1
                    continue
                blob += raw.rstrip(b"\r\n")
                offsets.append(len(blob))
                lines.append(line_no)
        except GZIP_ERRORS as e:
            raise DataError(f"{path}: corrupt or truncated gzip data after line {line_no} ({e})") from None
    return Records(str(path), JsonLines(blob, np.frombuffer(offsets, dtype=np.int64)),
                   np.frombuffer(lines, dtype=np.int64), skipped)


def read_json(path: Path) -> Records:
    """A JSON list of rows, or an object whose only list-valued field holds the rows ({"data": [...]})."""
    with _open_binary(path) as f:
        try:
            raw = f.read(MAX_JSON_BYTES + 1)
        except GZIP_ERRORS as e:
            raise DataError(f"{path}: corrupt or truncated gzip data ({e})") from None
    if len(raw) > MAX_JSON_BYTES:
        raise DataError(f"{path}: a .json document larger than {MAX_JSON_BYTES:,} bytes; store the rows as JSON "
                        f"Lines (.jsonl), which is read line by line")
    # surrogateescape: an invalid byte becomes a lone surrogate inside its row's text, which the row check names.
    text = raw.decode("utf-8-sig", errors="surrogateescape")
    del raw
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        hint = " (one object per line is JSON Lines: name the file .jsonl)" if e.msg == "Extra data" else ""
        raise DataError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno} ({e.msg}){hint}") from None
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply to parse") from None
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
    return Records(str(path), JsonLines.from_rows(data))


def read_parquet(path: Path) -> Records:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"reading {path} needs the optional `pyarrow` package (pip install pyarrow)") from None
    return Records(str(path), pq.read_table(path).to_pylist())


def read_file(path: str | Path, on_error: str = "error", max_row_bytes: int = DEFAULT_MAX_ROW_BYTES) -> Records:
    """Rows of a local .jsonl / .json / .parquet file (.jsonl.gz and .json.gz too)."""
    path = Path(path).expanduser()
    if not path.is_file():
        hint = ""
        if path.is_dir():
            hint = " (it is a directory)"
        elif "?" in str(path):
            hint = " ('?' starts the spec's options only when KEY=VALUE pairs follow it)"
        raise DataError(f"data file not found: {path}{hint}")
    suffix = _base_suffix(path)
    if suffix == ".jsonl":
        return read_jsonl(path, on_error, max_row_bytes)
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
    # Never run a dataset's own loading script: reading data must not execute code from the hub. datasets < 4
    # takes the switch (and has defaulted it to True in some versions); datasets >= 4 runs no scripts at all and
    # refuses the argument, so it is passed exactly where load_dataset declares it.
    kwargs = {"split": split}
    if "trust_remote_code" in inspect.signature(datasets.load_dataset).parameters:
        kwargs["trust_remote_code"] = False
    try:
        ds = datasets.load_dataset(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - any hub failure becomes one clear message
        raise DataError(f"could not load hub dataset {dataset_id!r} (config {config!r}, split {split!r}): {e}") from e
    return Records(f"{dataset_id}@{split}", ds)


def read_source(source: str, hub_config: str | None, default_split: str, on_error: str = "error",
                max_row_bytes: int = DEFAULT_MAX_ROW_BYTES) -> Records:
    """A local file when `source` names one, else a hub id with an optional '@split'."""
    if looks_like_file(source):
        return read_file(source, on_error, max_row_bytes)
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


# Fields the mappers read when present (Alpaca's input, system, history; ShareGPT's system).
OPTIONAL_FIELDS = ("input", "system", "history")

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
        f"'conversations' (ShareGPT) or 'instruction' + 'output' (Alpaca); a field under another name can be "
        f"mapped in the spec, e.g. alpaca:FILE?output=response"
    )
