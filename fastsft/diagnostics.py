"""Plain-words warnings for the ways SFT goes wrong, watched while the run goes and summed up in its report.

The seed's list of SFT failures, and what is watched for each:
- overfitting: validation loss has risen for `patience` evaluations in a row while the training loss fell;
- catastrophic forgetting: one held-out task's validation loss rose above its first value while the others fell;
- a low or wildly varying supervised-token ratio: below 30% of the real tokens of a step, or a step whose ratio
  is far from the run's running mean (the loss then averages over very different amounts of signal);
- never learning to stop: the share of generations that end with `<|assistant_end|>` within budget, when the
  evaluation harness reports it (`*/stop_rate` metrics) and it is below one half at the end.
Each warning is given once per kind and cause, so a long run does not drown its log.
"""

from __future__ import annotations

import math

LOW_SUPERVISED_RATIO = 0.30
RATIO_SWING = 0.5  # a step's ratio off the running mean by more than half of it
PATIENCE = 3
LOW_STOP_RATE = 0.5


class Diagnostics:
    def __init__(self, patience: int = PATIENCE):
        self.patience = patience
        self.warnings: list[str] = []
        self._given: set[str] = set()
        self._ratio_sum, self._ratio_n = 0.0, 0
        self._train_at_eval: list[float] = []
        self._val: list[float] = []
        self._first_task_val: dict[str, float] = {}
        self._recent_train: list[float] = []

    def _warn(self, key: str, text: str) -> str | None:
        if key in self._given:
            return None
        self._given.add(key)
        self.warnings.append(text)
        return text

    def step(self, step: int, loss: float, supervised: int, tokens: int) -> list[str]:
        out = []
        if math.isfinite(loss):
            self._recent_train = (self._recent_train + [loss])[-50:]
        ratio = supervised / tokens if tokens else 0.0
        if tokens and ratio < LOW_SUPERVISED_RATIO:
            out.append(self._warn("low_ratio", f"step {step}: only {100 * ratio:.0f}% of the tokens are supervised "
                                  f"(below {100 * LOW_SUPERVISED_RATIO:.0f}%): most of each batch is context the "
                                  "model does not learn from; check the data or the chat template"))
        if self._ratio_n >= 10:
            mean = self._ratio_sum / self._ratio_n
            if mean and abs(ratio - mean) > RATIO_SWING * mean:
                out.append(self._warn("ratio_swing", f"step {step}: the supervised ratio {100 * ratio:.0f}% is far "
                                      f"from the run's mean {100 * mean:.0f}%: steps weigh very different amounts of "
                                      "signal; shuffle the mixture or use larger steps"))
        self._ratio_sum += ratio
        self._ratio_n += 1
        return [w for w in out if w]

    def evaluation(self, step: int, metrics: dict) -> list[str]:
        out = []
        if "val_loss" in metrics:
            self._val.append(metrics["val_loss"])
            train = sum(self._recent_train) / len(self._recent_train) if self._recent_train else float("nan")
            self._train_at_eval.append(train)
            v, t = self._val[-self.patience - 1:], self._train_at_eval[-self.patience - 1:]
            if (len(v) == self.patience + 1 and all(b > a for a, b in zip(v, v[1:]))
                    and all(b < a for a, b in zip(t, t[1:]))):
                out.append(self._warn("overfit", f"step {step}: validation loss has risen for {self.patience} "
                                      f"evaluations ({v[0]:.4f} -> {v[-1]:.4f}) while the training loss fell: the "
                                      "model is overfitting; stop earlier, lower the learning rate or add data"))
        tasks = {k.removeprefix("val_loss/"): v for k, v in metrics.items() if k.startswith("val_loss/")}
        for name, value in tasks.items():
            first = self._first_task_val.setdefault(name, value)
            others_fell = any(tasks[o] < self._first_task_val.get(o, tasks[o]) for o in tasks if o != name)
            if value > first * 1.02 and others_fell:
                out.append(self._warn(f"forget:{name}", f"step {step}: validation loss of {name} rose from "
                                      f"{first:.4f} to {value:.4f} while the other tasks improved: the model is "
                                      "forgetting it; give it more weight in the mixture"))
        return [w for w in out if w]

    def final(self, metrics: dict) -> list[str]:
        out = []
        for key, value in metrics.items():
            if key.endswith("/stop_rate") and value < LOW_STOP_RATE:
                task = key.removesuffix("/stop_rate")
                out.append(self._warn(f"stop:{task}", f"{task}: only {100 * value:.0f}% of the generations end with "
                                      "<|assistant_end|> within the token budget: the model has not learned to stop"))
        return [w for w in out if w]
