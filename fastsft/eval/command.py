"""`fastsft eval`: load a checkpoint, evaluate, print a table, write JSON; alone or under torchrun."""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

from fastsft.eval.harness import evaluate_model, format_metrics
from fastsft.eval.loading import load_for_inference
from fastsft.eval.tasks import resolve_tasks


def _setup_distributed(device: str | None) -> tuple[int, torch.device, bool]:
    """(rank, device, started here). Under torchrun (WORLD_SIZE > 1) joins the process group: NCCL on GPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")), False
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available() and device in (None, "cuda"):
        torch.cuda.set_device(local_rank)
        chosen, backend = torch.device("cuda", local_rank), "nccl"
    else:
        chosen, backend = torch.device(device or "cpu"), "gloo"
    started = not dist.is_initialized()
    if started:
        dist.init_process_group(backend=backend)
    return dist.get_rank(), chosen, started


def run(checkpoint, tasks, *, data_dir=None, out=None, device=None, max_problems=None, max_new_tokens=256,
        num_samples=1, temperature=0.0, batch_size=32, stream=sys.stdout) -> dict:
    rank, device, started = _setup_distributed(device)
    try:
        model, tokenizer, directory = load_for_inference(checkpoint, device=device)
        resolved = resolve_tasks(tasks, data_dir=data_dir)
        metrics = evaluate_model(model, tokenizer, resolved, max_problems=max_problems,
                                 max_new_tokens=max_new_tokens, num_samples=num_samples, temperature=temperature,
                                 batch_size=batch_size, device=device)
    finally:
        if started:
            dist.destroy_process_group()
    if rank == 0:
        print(f"checkpoint {directory}", file=stream)
        print(format_metrics(metrics), file=stream)
        if out:
            record = {"checkpoint": str(directory), "tasks": {name: task.name for name, task in resolved.items()},
                      "settings": dict(max_problems=max_problems, max_new_tokens=max_new_tokens,
                                       num_samples=num_samples, temperature=temperature),
                      "metrics": metrics}
            with open(out, "w", encoding="utf-8") as f:
                json.dump(record, f, indent=2)
                f.write("\n")
            print(f"wrote {out}", file=stream)
    return metrics
