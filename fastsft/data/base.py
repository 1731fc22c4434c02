"""Tasks: indexable sets of conversations, and the two ways of combining them (mixture, sequence).

Every data source of the project (hub datasets, local files, synthetic generators) ends up as a `Task`: a
sized, indexable collection whose items are conversation dicts `{"messages": [...], ...}` ready for
`fastsft.chat.render_conversation`. Training reads a `TaskMixture` (deterministic shuffle over all tasks) or a
`TaskSequence` (curriculum); evaluation reads a single task and calls its `evaluate`.
"""

from __future__ import annotations

import bisect
import warnings
from collections import Counter
from typing import Any, Iterator, Sequence

import numpy as np

ON_ERROR_POLICIES = ("error", "skip")


class DataError(ValueError):
    """A data source cannot be used: missing file, unknown field layout, empty dataset, bad row, bad spec."""


class RowError(ValueError):
    """One row of a dataset cannot be mapped to a conversation; `reason` is short and groups rows for counting,
    `detail` (optional) says where in the row, e.g. the column of a JSON error."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


SKIP_HINT = "skip such rows with --skip-bad-rows (in Python: on_error='skip'); skipped rows are counted"


class BadRowError(DataError):
    """A bad row met under on_error='error': the message names the source, the row and the reason, and says how
    to skip such rows (for command-line users and Python callers alike)."""

    def __init__(self, message: str):
        super().__init__(f"{message}; {SKIP_HINT}")


def check_on_error(on_error: str) -> str:
    if on_error not in ON_ERROR_POLICIES:
        raise ValueError(f"on_error must be one of {ON_ERROR_POLICIES}, got {on_error!r}")
    return on_error


class Task:
    """A sized, indexable collection of conversations with an optional (start, stop, step) view over it.

    Subclasses implement `num_examples()` and `get_example(i)` over their whole underlying data; the view
    maps the logical index of `task[i]` to the physical index `start + i * step`.
    `eval_type` is 'categorical' (answer is one of `conversation["letters"]`), 'generative', or None (training
    data only). `skipped` counts the rows left out under on_error='skip', by reason.
    """

    eval_type: str | None = None
    name: str = "task"

    def __init__(self, start: int = 0, stop: int | None = None, step: int = 1):
        if not isinstance(start, (int, np.integer)) or start < 0:
            raise ValueError(f"{type(self).__name__}: start must be an int >= 0, got {start!r}")
        if stop is not None and (not isinstance(stop, (int, np.integer)) or stop < start):
            raise ValueError(f"{type(self).__name__}: stop must be None or an int >= start ({start}), got {stop!r}")
        if not isinstance(step, (int, np.integer)) or step < 1:
            raise ValueError(f"{type(self).__name__}: step must be an int >= 1, got {step!r}")
        self.start, self.stop, self.step = int(start), None if stop is None else int(stop), int(step)
        self.skipped: Counter = Counter()
        self._warned_stop = False

    # --- to implement -------------------------------------------------------------------------------------------
    def num_examples(self) -> int:
        raise NotImplementedError

    def get_example(self, index: int) -> dict:
        raise NotImplementedError

    def evaluate(self, conversation: dict, completion: str) -> bool:
        raise NotImplementedError(f"{self.name}: this task has no evaluate() (eval_type={self.eval_type!r})")

    # --- the view ---------------------------------------------------------------------------------------------------
    def _stop(self) -> int:
        n = self.num_examples()
        if self.stop is None:
            return n
        if self.stop > n and not self._warned_stop:
            warnings.warn(f"{self.name}: stop={self.stop} exceeds the {n} examples; using {n}", stacklevel=3)
            self._warned_stop = True
        return min(self.stop, n)

    def __len__(self) -> int:
        span = self._stop() - self.start
        return max(0, (span + self.step - 1) // self.step)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return TaskView(self, index)
        if not isinstance(index, (int, np.integer)):
            raise TypeError(f"{self.name}: index must be an int or a slice, got {type(index).__name__}")
        n = len(self)
        i = int(index) + n if index < 0 else int(index)
        if not 0 <= i < n:
            raise IndexError(f"{self.name}: index {index} out of range for {n} examples")
        return self.get_example(self.start + i * self.step)

    def __iter__(self) -> Iterator[dict]:
        for i in range(len(self)):
            yield self[i]

    def leaves(self) -> list["Task"]:
        """The distinct source tasks under this one (itself for a plain task)."""
        return [self]

    def skip_summary(self) -> str:
        """One line per source task with skipped rows, e.g. 'gsm8k:x.jsonl: skipped 2 rows: 2 x missing field ...'."""
        lines = []
        for task in self.leaves():
            if task.skipped:
                total = sum(task.skipped.values())
                reasons = "; ".join(f"{n} x {reason}" for reason, n in task.skipped.most_common())
                lines.append(f"{task.name}: skipped {total} rows: {reasons}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        try:
            size = f"{len(self)} examples"
        except AttributeError:  # repr of a task whose construction failed
            size = "not loaded"
        return f"<{type(self).__name__} {self.name} ({size})>"


class TaskView(Task):
    """`task[a:b:c]`: a lazy slice of another task (indices relative to that task's own view)."""

    def __init__(self, base: Task, index: slice):
        super().__init__()
        self.base = base
        self.range = range(len(base))[index]
        self.name = f"{base.name}[{index.start}:{index.stop}:{index.step}]"
        self.eval_type = base.eval_type

    def num_examples(self) -> int:
        return len(self.range)

    def get_example(self, index: int) -> dict:
        return self.base[self.range[index]]

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return self.base.evaluate(conversation, completion)

    def leaves(self) -> list[Task]:
        return self.base.leaves()


def _distinct(tasks: Sequence[Task]) -> list[Task]:
    seen: dict[int, Task] = {}
    for task in tasks:
        seen.setdefault(id(task), task)
    return list(seen.values())


class TaskMixture(Task):
    """All (task, index) pairs of the given tasks, shuffled once with `seed`.

    Passing the same task object several times oversamples it: each occurrence contributes all its examples.
    The order depends only on the seed and the task lengths, so the same seed gives the same order.
    """

    def __init__(self, tasks: Sequence[Task], seed: int = 42, **view):
        super().__init__(**view)
        if not tasks:
            raise DataError("TaskMixture needs at least one task")
        for t in tasks:
            if not isinstance(t, Task):
                raise TypeError(f"TaskMixture: expected Task objects, got {type(t).__name__}")
        self.tasks = list(tasks)
        self.seed = seed
        self.lengths = [len(t) for t in self.tasks]
        self.name = "mixture(" + ", ".join(t.name for t in _distinct(self.tasks)) + ")"
        kinds = {t.eval_type for t in self.tasks}
        self.eval_type = kinds.pop() if len(kinds) == 1 else None
        which = np.repeat(np.arange(len(self.tasks), dtype=np.int32), self.lengths)  # (N,)
        local = np.concatenate([np.arange(n, dtype=np.int64) for n in self.lengths])  # (N,)
        order = np.random.default_rng(seed).permutation(len(which))
        self.task_of, self.local_of = which[order], local[order]

    def num_examples(self) -> int:
        return len(self.task_of)

    def source_of(self, index: int) -> tuple[int, int]:
        """(position in `tasks`, index inside that task) of physical example `index`."""
        return int(self.task_of[index]), int(self.local_of[index])

    def get_example(self, index: int) -> dict:
        t, i = self.source_of(index)
        return self.tasks[t][i]

    def repeats(self) -> list[tuple[Task, int]]:
        """Each distinct task with how many times it was passed (= times each of its examples is seen per epoch)."""
        counts = Counter(id(t) for t in self.tasks)
        return [(t, counts[id(t)]) for t in _distinct(self.tasks)]

    def leaves(self) -> list[Task]:
        return _distinct([leaf for t in self.tasks for leaf in t.leaves()])


class TaskSequence(Task):
    """The tasks one after another (a curriculum): example i of the sequence is found by cumulative length."""

    def __init__(self, tasks: Sequence[Task], **view):
        super().__init__(**view)
        if not tasks:
            raise DataError("TaskSequence needs at least one task")
        self.tasks = list(tasks)
        self.offsets = np.cumsum([0] + [len(t) for t in self.tasks]).tolist()
        self.name = "sequence(" + ", ".join(t.name for t in self.tasks) + ")"
        kinds = {t.eval_type for t in self.tasks}
        self.eval_type = kinds.pop() if len(kinds) == 1 else None

    def num_examples(self) -> int:
        return self.offsets[-1]

    def source_of(self, index: int) -> tuple[int, int]:
        t = bisect.bisect_right(self.offsets, index) - 1
        return t, index - self.offsets[t]

    def get_example(self, index: int) -> dict:
        t, i = self.source_of(index)
        return self.tasks[t][i]

    def leaves(self) -> list[Task]:
        return _distinct([leaf for t in self.tasks for leaf in t.leaves()])


def conversation_text(conversation: dict[str, Any]) -> list[str]:
    """All text spans of a conversation (message strings and part texts), e.g. to train a tokenizer on."""
    out = []
    for message in conversation.get("messages", []):
        content = message.get("content")
        if isinstance(content, str):
            out.append(content)
        elif isinstance(content, list):
            out.extend(p.get("text", "") for p in content if isinstance(p, dict))
    return out
