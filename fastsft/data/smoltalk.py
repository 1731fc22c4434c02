"""SmolTalk (HuggingFaceTB/smol-smoltalk): general chat in the `messages` layout, optional leading system message.

nanochat's SFT mixes it with the eval-style tasks; here it is also the model for any chat JSONL file.
"""

from __future__ import annotations

from fastsft.data.files import map_messages
from fastsft.data.rows import RowTask


class SmolTalk(RowTask):
    """Rows {"messages": [{"role", "content"}, ...]}; the system message is merged later, at render time."""

    kind = "smoltalk"
    hub_id = "HuggingFaceTB/smol-smoltalk"
    default_split = "train"
    fields = ("messages",)

    def map_row(self, row: dict) -> dict:
        return map_messages(row)
