"""Conversation files of the user: chat `messages` JSONL, ShareGPT or Alpaca, layout detected or named.

The layout is decided once per file (from the first rows that identify one) so that every row of the file
goes through the same mapper, and a row of another layout is a bad row, not a silent reinterpretation.
"""

from __future__ import annotations

from typing import Sequence

from fastsft.data.files import LAYOUTS, OPTIONAL_FIELDS, detect_layout
from fastsft.data.rows import RowTask


class ConversationFile(RowTask):
    """A local file (or hub dataset) of conversations; layout 'auto', 'messages', 'sharegpt' or 'alpaca'."""

    kind = "jsonl"

    def __init__(self, source: str | None = None, *, layout: str = "auto", **kw):
        if layout != "auto" and layout not in LAYOUTS:
            raise ValueError(f"layout must be 'auto' or one of {sorted(LAYOUTS)}, got {layout!r}")
        self.layout = layout
        if layout != "auto":
            self.kind = "jsonl" if layout == "messages" else layout
            self.fields = LAYOUTS[layout][0]
        super().__init__(source, **kw)

    def mappable_fields(self) -> tuple[str, ...]:
        layouts = LAYOUTS if self.layout == "auto" else {self.layout: LAYOUTS[self.layout]}
        names = [f for fields, _ in layouts.values() for f in fields] + list(OPTIONAL_FIELDS)
        return tuple(dict.fromkeys(names))

    def check_layout(self, probe: Sequence[dict]) -> None:
        if self.layout == "auto":
            self.layout = detect_layout(probe, self.name)
            self.fields = LAYOUTS[self.layout][0]
        super().check_layout(probe)

    def map_row(self, row: dict) -> dict:
        return LAYOUTS[self.layout][1](row)
