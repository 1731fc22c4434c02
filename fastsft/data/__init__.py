"""Datasets as tasks: conversation dicts from hub datasets, local files and synthetic generators, and their mixtures.

Entry points: `load_task("gsm8k:path/to/train.jsonl")`, `load_mixture("smoltalk,gsm8k*2")` (spec grammar in
fastsft/data/spec.py), the task classes for direct use, and `TaskMixture` / `TaskSequence` to combine tasks.
"""

import logging

from fastsft.data.arc import ARC
from fastsft.data.base import DataError, RowError, Task, TaskMixture, TaskSequence, TaskView
from fastsft.data.custom import ConversationFile
from fastsft.data.gsm8k import GSM8K
from fastsft.data.humaneval import HumanEval, build_program
from fastsft.data.mmlu import MMLU
from fastsft.data.multiple_choice import render_multiple_choice
from fastsft.data.rows import RowTask
from fastsft.data.smoltalk import SmolTalk
from fastsft.data.spec import KINDS, load_mixture, load_task, parse_spec
from fastsft.data.synthetic import DEMO_MIXTURE, SYNTHETIC_TASKS, Arithmetic, LetterCount, Spell

# A library logs (skipped rows, at WARNING) and leaves the output to the application: without this handler Python's
# last-resort handler would print those records to stderr of any program that has not configured logging.
logging.getLogger("fastsft.data").addHandler(logging.NullHandler())

__all__ = [
    "ARC", "Arithmetic", "ConversationFile", "DEMO_MIXTURE", "DataError", "GSM8K", "HumanEval", "KINDS",
    "LetterCount", "MMLU", "RowError", "RowTask", "SYNTHETIC_TASKS", "SmolTalk", "Spell", "Task", "TaskMixture",
    "TaskSequence", "TaskView", "build_program", "load_mixture", "load_task", "parse_spec",
    "render_multiple_choice",
]
