"""Multiple-choice questions as conversations whose answer is one letter (ARC, MMLU).

The prompt lists each choice followed by '=' and its letter, with no space before the letter, and the
assistant answers with the bare letter: small models bind a letter better when it follows its choice, and
the letter in the prompt must be the same token as the letter of the answer (nanochat's finding).
`conversation["letters"]` lists the letters, so a categorical evaluation can restrict the model's choice to them.
"""

from __future__ import annotations

from typing import Sequence

from fastsft.data.rows import RowTask


def render_multiple_choice(question: str, letters: Sequence[str], choices: Sequence[str]) -> str:
    """The user message of a multiple-choice question."""
    lines = [f"Multiple Choice question: {question}"]
    lines += [f"- {choice}={letter}" for letter, choice in zip(letters, choices)]
    return "\n".join(lines) + "\n\nRespond only with the letter of the correct answer."


def multiple_choice_conversation(question: str, letters: Sequence[str], choices: Sequence[str], answer: str,
                                 **extra) -> dict:
    messages = [
        {"role": "user", "content": render_multiple_choice(question, letters, choices)},
        {"role": "assistant", "content": answer},
    ]
    return {"messages": messages, "letters": list(letters), **extra}


class MultipleChoiceTask(RowTask):
    """Categorical: the completion is right when it is the answer letter (surrounding whitespace ignored)."""

    eval_type = "categorical"

    def evaluate(self, conversation: dict, completion: str) -> bool:
        if not isinstance(completion, str):
            raise TypeError(f"{self.name}: completion must be a str, got {type(completion).__name__}")
        answer = conversation["messages"][-1]["content"]
        # A completion outside the letters is simply wrong; a categorical evaluator never produces one.
        return completion.strip() == answer
