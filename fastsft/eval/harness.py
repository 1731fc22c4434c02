"""evaluate_model: every task's problems (strided over ranks), scored, reduced over ranks, into flat metrics."""

from __future__ import annotations

import contextlib
import logging
import time

import torch
import torch.distributed as dist

from fastsft.engine import Engine
from fastsft.eval.categorical import choose_letters
from fastsft.eval.generative import generate_and_score, pass_at_k
from fastsft.eval.tasks import resolve_tasks

logger = logging.getLogger(__name__)

MULTI_TURN_PROBLEMS = 50  # per task: the 3-turn check is a regression alarm, not a second benchmark
# Sums reduced over ranks, per task, in this order.
COUNTS = ("problems", "score", "pass_k", "baseline", "generations", "stopped", "answer_tokens", "mt_problems",
          "mt_correct")


def select_problems(num_examples: int, max_problems: int | None) -> list[int]:
    """Evenly spaced indices over the whole task (not its first N: MMLU's first rows are all one subject)."""
    n = num_examples if max_problems is None else min(max_problems, num_examples)
    return [i * num_examples // n for i in range(n)]


def multi_turn(task, index: int) -> dict:
    """Problem `index` asked as the third question of a conversation whose first two turns are two other problems
    of the task with their reference answers: a model that only handles single turns fails here."""
    n = len(task)
    history = [task[(index + 1) % n], task[(index + 2) % n]]
    final = task[index]
    messages = [m for conv in history for m in conv["messages"][-2:]] + final["messages"][-2:]
    return {**final, "messages": messages}


def _rank_world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _evaluate_task(model, tokenizer, engine, task, name, indices, mt_indices, *, batch_size, max_new_tokens,
                   num_samples, temperature, device) -> dict:
    sums = dict.fromkeys(COUNTS, 0.0)
    conversations = [task[i] for i in indices]
    mt_conversations = [multi_turn(task, i) for i in mt_indices]
    if task.eval_type == "categorical":
        picked = choose_letters(model, tokenizer, conversations + mt_conversations, batch_size=batch_size,
                                device=device, names=[f"{name} row {i}" for i in indices + mt_indices])
        main, mt = picked[:len(indices)], picked[len(indices):]
        for conv, letter in zip(conversations, main):
            sums["score"] += float(task.evaluate(conv, letter))
            sums["baseline"] += 1.0 / len(conv["letters"])
        sums["pass_k"] = sums["score"]
        sums["mt_correct"] = float(sum(task.evaluate(c, letter) for c, letter in zip(mt_conversations, mt)))
    else:
        options = dict(num_samples=num_samples, max_new_tokens=max_new_tokens, temperature=temperature)
        results = generate_and_score(engine, task, conversations, seeds=indices,
                                     names=[f"{name} row {i}" for i in indices], **options)
        for result in results:
            c = sum(result.correct)
            sums["score"] += pass_at_k(num_samples, c, 1)
            sums["pass_k"] += float(c > 0)
            sums["generations"] += len(result.generations)
            sums["stopped"] += sum(g.finished for g in result.generations)
            sums["answer_tokens"] += sum(g.num_tokens for g in result.generations)
        mt_results = generate_and_score(engine, task, mt_conversations, seeds=mt_indices,
                                        names=[f"{name} row {i} (3-turn)" for i in mt_indices],
                                        **{**options, "num_samples": 1})
        sums["mt_correct"] = float(sum(r.correct[0] for r in mt_results))
    sums["problems"] = float(len(indices))
    sums["mt_problems"] = float(len(mt_indices))
    return sums


def _metrics(name: str, eval_type: str, totals: dict, num_samples: int) -> dict:
    out = {}
    n = max(totals["problems"], 1.0)
    accuracy = totals["score"] / n
    out[f"{name}/accuracy"] = accuracy
    baseline = totals["baseline"] / n if eval_type == "categorical" else 0.0
    out[f"{name}/centered"] = (accuracy - baseline) / (1.0 - baseline)
    if eval_type == "generative":
        if num_samples > 1:
            out[f"{name}/pass@{num_samples}"] = totals["pass_k"] / n
        gens = max(totals["generations"], 1.0)
        out[f"{name}/stop_rate"] = totals["stopped"] / gens
        out[f"{name}/mean_answer_tokens"] = totals["answer_tokens"] / gens
    if totals["mt_problems"]:
        out[f"{name}/multi_turn_accuracy"] = totals["mt_correct"] / totals["mt_problems"]
    out[f"{name}/problems"] = totals["problems"]
    return out


def evaluate_model(model, tokenizer, tasks, *, max_problems=None, max_new_tokens=256, num_samples=1,
                   temperature=0.0, batch_size=32, device=None) -> dict:
    """Flat metrics {"<task>/accuracy": .., "<task>/centered": .., generative tasks' "/stop_rate",
    "/mean_answer_tokens" (and "/pass@k" with k samples), "/multi_turn_accuracy", "/problems", and "chatcore"}.

    See fastsft.eval's docstring for the contract; the model is put in eval mode and back.
    """
    if num_samples < 1 or max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"evaluate_model: num_samples, max_new_tokens and batch_size must be >= 1, got "
                         f"{num_samples}, {max_new_tokens}, {batch_size}")
    if max_problems is not None and max_problems < 1:
        raise ValueError(f"evaluate_model: max_problems must be None or >= 1, got {max_problems}")
    if num_samples > 1 and temperature == 0.0:
        logger.warning("evaluate_model: %d samples at temperature 0 are identical; pass@%d equals pass@1",
                       num_samples, num_samples)
    tasks = resolve_tasks(tasks)
    # The eager module under DDP / torch.compile wrappers: ranks run different numbers of forwards here (no DDP
    # buffer sync may wait for the others), and prompt shapes change every call (a compiled graph would recompile).
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "_orig_mod", None) or model.module
    device = torch.device(device) if device is not None else next(model.parameters()).device
    rank, world = _rank_world()
    engine = Engine(model, tokenizer)
    # fp32 weights on a GPU (a training model outside its autocast) decode in bf16, as training computes.
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16)
                if device.type == "cuda" and next(model.parameters()).dtype == torch.float32
                else contextlib.nullcontext())
    was_training = model.training
    model.eval()
    metrics, centered = {}, []
    try:
        for name, task in tasks.items():
            if task.eval_type not in ("categorical", "generative"):
                raise ValueError(f"{name}: eval_type {task.eval_type!r} is neither categorical nor generative")
            start = time.perf_counter()
            selected = select_problems(len(task), max_problems)
            indices, mt_indices = selected[rank::world], selected[:MULTI_TURN_PROBLEMS][rank::world]
            with autocast:
                sums = _evaluate_task(model, tokenizer, engine, task, name, indices, mt_indices, batch_size=batch_size,
                                      max_new_tokens=max_new_tokens, num_samples=num_samples,
                                      temperature=temperature, device=device)
            values = torch.tensor([sums[k] for k in COUNTS], dtype=torch.float64, device=device)
            if world > 1:
                dist.all_reduce(values)
            totals = dict(zip(COUNTS, values.tolist()))
            task_metrics = _metrics(name, task.eval_type, totals, num_samples)
            task_metrics[f"{name}/seconds"] = time.perf_counter() - start
            metrics.update(task_metrics)
            centered.append(task_metrics[f"{name}/centered"])
            logger.info("eval %s: accuracy %.4f over %d problems", name, task_metrics[f"{name}/accuracy"],
                        int(totals["problems"]))
    finally:
        model.train(was_training)
    if centered:
        metrics["chatcore"] = sum(centered) / len(centered)
    return metrics


def format_metrics(metrics: dict) -> str:
    """A small table: one line per task (accuracy, centered, stop rate, answer tokens, 3-turn), then ChatCORE."""
    names = list(dict.fromkeys(key.split("/")[0] for key in metrics if "/" in key))
    columns = [("accuracy", "accuracy"), ("centered", "centered"), ("stop_rate", "stop rate"),
               ("mean_answer_tokens", "answer tok"), ("multi_turn_accuracy", "3-turn acc"), ("problems", "problems")]
    lines = [f"{'task':<16}" + "".join(f"{title:>12}" for _, title in columns)]
    for name in names:
        cells = []
        for key, _ in columns:
            value = metrics.get(f"{name}/{key}")
            cells.append(f"{'-':>12}" if value is None else
                         f"{int(value):>12d}" if key == "problems" else f"{value:>12.4f}")
        lines.append(f"{name:<16}" + "".join(cells))
    if "chatcore" in metrics:
        lines.append(f"{'ChatCORE':<16}{metrics['chatcore']:>12.4f}")
    return "\n".join(lines)
