"""HumanEval (openai/openai_humaneval): 164 Python functions to complete, checked by running their tests.

Each conversation carries what checking needs (`entry_point`, `test`, `task_id`); `build_program` assembles the
program (the prompt's imports, the completion's code, the tests, `check(entry_point)`) and `evaluate` runs it in
the sandbox of fastsft.execution: the completion passes when the program exits cleanly within the time limit.
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

    timeout_s = 10.0  # per program; the canonical solutions take well under a second
    memory_mb = 512

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return self.run(conversation, completion).passed

    def run(self, conversation: dict, completion: str):
        """The sandbox's ExecutionResult of the completion's program (status, output, what was applied)."""
        from fastsft.execution import run_program

        if not isinstance(completion, str):
            raise TypeError(f"{self.name}: completion must be a str, got {type(completion).__name__}")
        return run_program(build_program(conversation, completion), timeout_s=self.timeout_s,
                           memory_mb=self.memory_mb)
