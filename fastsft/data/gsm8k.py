"""GSM8K (openai/gsm8k): grade-school math word problems solved with calculator calls.

The reference solutions mark each calculation as `<<expr=result>>`. They become a `python` part (expr, which
the model learns to write and is supervised) and a `python_output` part (result, which the tool supplies at
inference and is not supervised), with the text around them as `text` parts. The final answer follows '####'.
"""

from __future__ import annotations

import re

from fastsft.data.base import RowError
from fastsft.data.files import get_field
from fastsft.data.rows import RowTask

CALC_SPAN = re.compile(r"<<([^<>]*)>>")
FINAL_ANSWER = re.compile(r"####\s*(-?[0-9][0-9.,]*)")


def extract_answer(text: str) -> str | None:
    """The number after '####' with thousands separators removed, or None."""
    match = FINAL_ANSWER.search(text)
    return None if match is None else match.group(1).replace(",", "").rstrip(".")


def same_number(a: str | None, b: str | None) -> bool:
    """'72' == '72.0' == '72.00'; None never matches."""
    if a is None or b is None:
        return False
    try:
        return float(a) == float(b)
    except ValueError:
        return a == b


def calculator_parts(answer: str) -> list[dict]:
    """Split a solution into text / python / python_output parts at its `<<expr=result>>` spans."""
    parts, pos = [], 0
    for match in CALC_SPAN.finditer(answer):
        if match.start() > pos:
            parts.append({"type": "text", "text": answer[pos : match.start()]})
        expr, eq, result = match.group(1).rpartition("=")
        if not eq:
            raise RowError("calculator span <<...>> without '='")
        parts.append({"type": "python", "text": expr})
        parts.append({"type": "python_output", "text": result})
        pos = match.end()
    if pos < len(answer):
        parts.append({"type": "text", "text": answer[pos:]})
    return parts


def evaluate_final_answer(conversation: dict, completion: str) -> bool:
    """Right when the completion's number after '####' equals the reference's (tool-call tasks share this)."""
    if not isinstance(completion, str):
        raise TypeError(f"completion must be a str, got {type(completion).__name__}")
    content = conversation["messages"][-1]["content"]
    reference = content if isinstance(content, str) else "".join(p["text"] for p in content if p["type"] == "text")
    return same_number(extract_answer(completion), extract_answer(reference))


class GSM8K(RowTask):
    """Rows {question, answer}; generative evaluation on the final number."""

    kind = "gsm8k"
    hub_id = "openai/gsm8k"
    default_split = "train"
    eval_type = "generative"
    fields = ("question", "answer")

    def __init__(self, source: str | None = None, *, subset: str = "main", **kw):
        if subset not in ("main", "socratic"):
            raise ValueError(f"GSM8K subset must be 'main' or 'socratic', got {subset!r}")
        self.hub_config = subset
        super().__init__(source, **kw)

    def map_row(self, row: dict) -> dict:
        question = get_field(row, "question")
        answer = get_field(row, "answer")
        if extract_answer(answer) is None:
            raise RowError("answer has no final '#### N'")
        if answer.count("<<") != answer.count(">>") or len(CALC_SPAN.findall(answer)) != answer.count("<<"):
            raise RowError("unbalanced calculator span <<...>>")
        return {
            "messages": [
                {"role": "user", "content": question},
                {"role": "assistant", "content": calculator_parts(answer)},
            ]
        }

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return evaluate_final_answer(conversation, completion)
