"""MMLU (cais/mmlu): 57 subjects of four-choice questions, answer given as an index 0-3."""

from __future__ import annotations

import string

from fastsft.data.base import RowError
from fastsft.data.files import get_field
from fastsft.data.multiple_choice import MultipleChoiceTask, multiple_choice_conversation


class MMLU(MultipleChoiceTask):
    """Rows {question, subject, choices: [4 str], answer: int}; letters A-D."""

    kind = "mmlu"
    hub_id = "cais/mmlu"
    hub_config = "all"
    default_split = "validation"
    fields = ("question", "choices", "answer")

    def __init__(self, source: str | None = None, *, subset: str = "all", **kw):
        self.hub_config = subset
        super().__init__(source, **kw)

    def unwrap(self, row):
        if isinstance(row, dict) and isinstance(row.get("train"), dict):
            return row["train"]  # the hub's auxiliary_train rows wrap the fields in 'train'
        return row

    def map_row(self, row: dict) -> dict:
        row = self.unwrap(row)
        question = get_field(row, "question")
        choices = get_field(row, "choices", list)
        if not 2 <= len(choices) <= 26 or not all(isinstance(c, str) for c in choices):
            raise RowError("field 'choices' must be a list of 2 to 26 strings")
        answer = get_field(row, "answer", (int, str))
        letters = string.ascii_uppercase[: len(choices)]
        if isinstance(answer, str) and len(answer) == 1 and answer in letters:
            answer = letters.index(answer)  # some copies store the letter instead of the index
        if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
            raise RowError("field 'answer' is not an index into 'choices'")
        subject = row.get("subject") or ""
        return multiple_choice_conversation(question, letters, choices, letters[answer], subject=subject)
