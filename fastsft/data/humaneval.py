"""HumanEval (openai/openai_humaneval): 164 Python functions to complete, checked by running their tests.

Running model-written code needs a sandbox (a later issue), so `evaluate` is left to it; this task exposes
what it needs in each conversation (`entry_point`, `test`, `task_id`) and `build_program` assembles the
program the sandbox runs: the prompt's imports, the completion's code, the tests, `check(entry_point)`.
"""

from __future__ import annotations

import re

from fastsft.data.files import get_field
from fastsft.data.rows import RowTask

CODE_BLOCK = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)\n```", re.DOTALL)


def leading_imports(prompt: str) -> str:
    """The import lines at the top of a prompt (comments and blank lines skipped)."""
    imports = []
    for line in prompt.splitlines():
        stripped = line.strip()
        if stripped.startswith(("import ", "from ")):
            imports.append(stripped)
        elif stripped and not stripped.startswith("#"):
            break
    return "\n".join(imports)


def extract_code(completion: str) -> str:
    """The first fenced code block of a completion, else the whole completion."""
    match = CODE_BLOCK.search(completion)
    return (match.group(1) if match else completion).strip()


def build_program(conversation: dict, completion: str) -> str:
    """The program whose clean exit means the completion passes the task's tests."""
    prompt = conversation["messages"][0]["content"]
    check = f"check({conversation['entry_point']})\n"
    return "\n\n".join([leading_imports(prompt), extract_code(completion), conversation["test"], check])


class HumanEval(RowTask):
    """Rows {task_id, prompt, canonical_solution, test, entry_point}; user = prompt, assistant = whole function."""

    kind = "humaneval"
    hub_id = "openai/openai_humaneval"
    default_split = "test"
    eval_type = "generative"
    fields = ("prompt", "canonical_solution", "test", "entry_point")

    def map_row(self, row: dict) -> dict:
        prompt = get_field(row, "prompt")
        solution = get_field(row, "canonical_solution")
        return {
            "messages": [
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": f"{prompt}\n{solution}"},
            ],
            "task_id": row.get("task_id", ""),
            "entry_point": get_field(row, "entry_point"),
            "test": get_field(row, "test"),
        }

    def evaluate(self, conversation: dict, completion: str) -> bool:
        raise NotImplementedError(
            f"{self.name}: running completions needs the code sandbox (not written yet); "
            "build_program(conversation, completion) gives the program it will run"
        )
