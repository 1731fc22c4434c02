"""RowTask: a task backed by dataset rows, with the one bad-row policy of the project.

At construction every row is mapped to a conversation and checked against the conversation rules
(`fastsft.chat.normalize_conversation`), so a bad dataset fails before training starts, not hours into it.
on_error='error' raises naming the dataset, the row (file line for JSONL) and the reason; on_error='skip'
leaves the row out and counts it in `task.skipped` by reason (`task.skip_summary()` reports them). Only the
indices of the kept rows are stored; `get_example` maps its row again, so every call returns fresh dicts.
Every text must be valid Unicode (no lone surrogate such as a JSON "\\ud800"): the tokenizer cannot encode one,
and a training run must not stop at it hours in.

Field mapping: `field_map={"output": "response"}` (spec: `alpaca:file.json?output=response`) reads the task's
field `output` from the row's field `response`, for files that differ from a layout only in a field name.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from fastsft.data.base import BadRowError, DataError, RowError, Task, check_on_error, conversation_text
from fastsft.data.files import DEFAULT_MAX_ROW_BYTES, Records, read_source


log = logging.getLogger("fastsft.data")


def check_text(conversation: dict) -> None:
    """A RowError when a text of the conversation is not valid Unicode (holds a lone surrogate)."""
    for text in conversation_text(conversation):
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                char = ord(text[e.start])
                byte = f" (from the invalid UTF-8 byte 0x{char - 0xDC00:02x} of a .json file, or an escape)" \
                    if 0xDC80 <= char <= 0xDCFF else ""
                raise RowError("lone surrogate in a text (not valid Unicode)",
                               f"U+{char:04X} at character {e.start}{byte}") from None


def _conversation_checker():
    from fastsft.chat import ConversationError, normalize_conversation

    return ConversationError, normalize_conversation


class RowTask(Task):
    """Subclasses set `kind` (spec name), `hub_id`/`hub_config`/`default_split`, `fields` and `map_row`.

    source: a local file, or a hub dataset id with an optional '@split' (default: `hub_id`); rows: the rows
    themselves instead (any list-like of dicts; named by source if given); subset: the hub config name.
    """

    kind = "rows"
    hub_id: str | None = None
    hub_config: str | None = None
    default_split = "train"
    fields: tuple[str, ...] = ()  # every row of this layout has them (checked on the first rows)
    optional_fields: tuple[str, ...] = ()  # read when present; field_map may name these too

    def __init__(
        self,
        source: str | None = None,
        *,
        on_error: str = "error",
        rows: Sequence[dict] | None = None,
        subset: str | None = None,
        start: int = 0,
        stop: int | None = None,
        step: int = 1,
        max_row_bytes: int = DEFAULT_MAX_ROW_BYTES,
        field_map: dict[str, str] | None = None,
    ):
        super().__init__(start, stop, step)
        self.on_error = check_on_error(on_error)
        self.field_map = dict(field_map or {})
        unknown = sorted(set(self.field_map) - set(self.mappable_fields()))
        if unknown:
            raise DataError(f"{self.kind}: {', '.join(map(repr, unknown))} is neither an option nor a field of a "
                            f"{self.kind} row that can be mapped ({', '.join(self.mappable_fields())})")
        if subset is not None:
            self.hub_config = subset  # the hub dataset's config name (ignored for local files)
        if rows is not None:
            records = Records(source or f"<{len(rows)} rows>", rows)
        else:
            if source is None:
                if self.hub_id is None:
                    raise DataError(f"{self.kind}: a source (file path or hub dataset id) is required")
                source = self.hub_id
            records = read_source(source, self.hub_config, self.default_split, on_error, max_row_bytes)
        self.source = records.name
        self.name = f"{self.kind}:{records.name}"
        self.records = records
        self.skipped.update(records.skipped)
        if len(records.rows) == 0:
            if self.skipped:  # every line was bad before a row could be read
                raise DataError(f"{self.name}: empty dataset: all {sum(self.skipped.values())} lines were skipped\n"
                                + self.skip_summary())
            raise DataError(f"{self.name}: empty dataset (no rows)")
        self.check_layout([self.renamed(records.rows[i]) for i in range(min(100, len(records.rows)))])
        self._kept = self._validate(records)

    def map_row(self, row: dict) -> dict:
        raise NotImplementedError

    def mappable_fields(self) -> tuple[str, ...]:
        """The row fields a field_map may redirect."""
        return self.fields + self.optional_fields

    def renamed(self, row):
        """The row with field_map applied: field `target` taken from the row's field `source`."""
        if not self.field_map or not isinstance(row, dict):
            return row
        row = dict(row)
        for target, source in self.field_map.items():
            if source in row:
                row[target] = row.pop(source)
        return row

    def unwrap(self, row):
        """The row as the layout check should see it (a hook for datasets that nest their fields)."""
        return row

    def check_layout(self, probe: Sequence[dict]) -> None:
        """A DataError when none of the first rows (`probe`, field_map applied) has this task's fields."""
        if not self.fields:
            return
        seen: set[str] = set()
        for row in map(self.unwrap, probe):
            if isinstance(row, dict):
                if all(f in row for f in self.fields):
                    return
                seen.update(row)
        where = f" (the layout of hub dataset {self.hub_id})" if self.hub_id else ""
        missing = next((f for f in self.fields if f not in seen), self.fields[0])
        raise DataError(
            f"{self.name}: unknown field layout: rows have fields {sorted(seen)[:20]}, "
            f"a {self.kind} source needs {list(self.fields)}{where}; to read a field under another name, map it "
            f"in the spec, e.g. {self.kind}:FILE?{missing}=NAME_IN_THE_FILE"
        )

    def _map_checked(self, row) -> dict:
        try:
            return self.map_row(self.renamed(row))
        except RowError:
            raise
        except (KeyError, TypeError, AttributeError, IndexError) as e:
            raise RowError(f"malformed row ({type(e).__name__}: {e})") from e

    def _validate(self, records: Records) -> np.ndarray:
        ConversationError, normalize = _conversation_checker()
        kept = []
        for i, row in enumerate(records.rows):
            try:
                conversation = self._map_checked(row)
                normalize(conversation, index=i)
                check_text(conversation)
            except (RowError, ConversationError) as e:
                reason = getattr(e, "reason", None) or str(e)
                if self.on_error == "error":
                    detail = getattr(e, "detail", "")
                    raise BadRowError(f"{self.name}: {records.where(i)}: {reason}"
                                      + (f": {detail}" if detail else "")) from e
                self.skipped[reason] += 1
                continue
            kept.append(i)
        if not kept:
            raise DataError(f"{self.name}: empty dataset: all {len(records.rows)} rows were skipped\n"
                            + self.skip_summary())
        if self.skipped:
            log.warning("%s (kept %d)", self.skip_summary(), len(kept))  # nothing is dropped silently
        return np.asarray(kept, dtype=np.int64)

    def num_examples(self) -> int:
        return len(self._kept)

    def row_number(self, index: int) -> str:
        """Where example `index` (physical) lives in the source, e.g. 'line 18'."""
        return self.records.where(int(self._kept[index]))

    def get_example(self, index: int) -> dict:
        return self.map_row(self.renamed(self.records.rows[int(self._kept[index])]))
