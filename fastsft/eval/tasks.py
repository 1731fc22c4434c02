"""Evaluation task names (`ARC-Easy`, `MMLU`, `GSM8K`, ...) and how they map to data specs.

A name maps to a hub spec, or with a data directory to the first of its usual file names found there (so the
shared data folder, or any folder holding files of those names, evaluates without the network). Anything else is
taken as a fastsft.data spec (`gsm8k:path/test.jsonl?stop=200`, `synthetic:arithmetic@test`) named by itself.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from fastsft.data import DataError, Task, load_task
from fastsft.data.spec import split_specs

# name -> (spec kind, hub spec, local file names in order of preference)
EVAL_TASKS = {
    "ARC-Easy": ("arc-easy", "arc-easy:@test", ("arc_easy_test.jsonl", "arc_easy_test.jsonl.gz")),
    "ARC-Challenge": ("arc-challenge", "arc-challenge:@test", ("arc_challenge_test.jsonl",)),
    "MMLU": ("mmlu", "mmlu:@test", ("mmlu_test.jsonl", "mmlu_validation.jsonl", "mmlu_dev.jsonl")),
    "GSM8K": ("gsm8k", "gsm8k:@test", ("gsm8k_test.jsonl", "gsm8k_train.jsonl")),
    "HumanEval": ("humaneval", "humaneval:@test", ("humaneval.jsonl.gz", "humaneval.jsonl")),
    "arithmetic": ("synthetic", "synthetic:arithmetic@test?size=1000", ()),
    "letter-count": ("synthetic", "synthetic:letter-count@test?size=1000", ()),
    "spell": ("synthetic", "synthetic:spell@test?size=1000", ()),
}
_BY_LOWER = {name.lower(): name for name in EVAL_TASKS}


def task_spec(name: str, data_dir: str | os.PathLike | None = None) -> tuple[str, str]:
    """(display name, spec) of one task name or spec."""
    canonical = _BY_LOWER.get(name.strip().lower())
    if canonical is None:
        return name.strip(), name.strip()
    kind, hub_spec, files = EVAL_TASKS[canonical]
    if data_dir is not None:
        for file_name in files:
            path = os.path.join(data_dir, file_name)
            if os.path.exists(path):
                return canonical, f"{kind}:{path}"
        if files:
            raise DataError(f"{canonical}: none of {', '.join(files)} in the data dir {data_dir}")
    return canonical, hub_spec


def resolve_tasks(tasks: Mapping[str, Task] | str, data_dir: str | os.PathLike | None = None) -> dict[str, Task]:
    """A dict name -> Task, from such a dict (returned as is) or a comma list of names / specs."""
    if isinstance(tasks, Mapping):
        for name, task in tasks.items():
            if not isinstance(task, Task):
                raise TypeError(f"evaluation task {name!r} is a {type(task).__name__}, not a fastsft.data Task")
        return dict(tasks)
    if not isinstance(tasks, str):
        raise TypeError(f"tasks must be a dict name -> Task or a comma list of names, got {type(tasks).__name__}")
    resolved = {}
    for item in split_specs(tasks):
        name, spec = task_spec(item, data_dir)
        task = load_task(spec)
        if task.eval_type not in ("categorical", "generative"):
            raise DataError(f"{name} ({spec}) is training data without an evaluation (eval_type={task.eval_type!r})")
        resolved[name] = task
    return resolved
