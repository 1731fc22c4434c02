"""ARC-Easy and ARC-Challenge (allenai/ai2_arc): grade-school science multiple choice, letters from the row."""

from __future__ import annotations

from fastsft.data.base import RowError
from fastsft.data.files import get_field
from fastsft.data.multiple_choice import MultipleChoiceTask, multiple_choice_conversation


class ARC(MultipleChoiceTask):
    """Rows {id, question, choices: {text: [...], label: [...]}, answerKey}; labels are A-E or 1-5 as given."""

    hub_id = "allenai/ai2_arc"
    default_split = "test"
    fields = ("question", "choices", "answerKey")

    def __init__(self, source: str | None = None, *, subset: str = "ARC-Easy", **kw):
        if subset not in ("ARC-Easy", "ARC-Challenge"):
            raise ValueError(f"ARC subset must be 'ARC-Easy' or 'ARC-Challenge', got {subset!r}")
        self.hub_config = subset
        self.kind = "arc-easy" if subset == "ARC-Easy" else "arc-challenge"
        super().__init__(source, **kw)

    def map_row(self, row: dict) -> dict:
        question = get_field(row, "question")
        choices = get_field(row, "choices", dict)
        texts, labels = choices.get("text"), choices.get("label")
        if not isinstance(texts, list) or not isinstance(labels, list) or len(texts) != len(labels):
            raise RowError("field 'choices' must hold equally long lists 'text' and 'label'")
        if len(texts) < 2:
            raise RowError("fewer than 2 choices")
        if not all(isinstance(x, str) for x in texts + labels):
            raise RowError("choice texts and labels must be strings")
        if len(set(labels)) != len(labels):
            raise RowError("duplicate choice labels")
        answer = get_field(row, "answerKey")
        if answer not in labels:
            raise RowError("answerKey is not one of the choice labels")
        extra = {"id": row["id"]} if "id" in row else {}
        return multiple_choice_conversation(question, labels, texts, answer, **extra)
