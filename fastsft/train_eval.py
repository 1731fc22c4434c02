"""What the driver measures on held-out data while it trains: validation loss per task, and answer accuracy.

- `validation_loss`: mean loss over the supervised targets of the first `steps` packed micro-batches of each
  held-out task (the same packing as training, so the numbers compare with the training loss), summed over ranks.
  Per task, because forgetting shows as one task of a mixture degrading while the mixture's mean still falls.
- `answer_accuracy`: teacher-forced exact match: a held-out conversation counts as right when the model's argmax
  at every supervised position equals the target (the whole answer, tool calls and `<|assistant_end|>` included).
  It needs no generation engine, so the embedded default run can show chance before and most answers right after.
  `answer_samples` decodes those argmax answers of a few conversations for the report.
"""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import torch

from fastsft.batches import IGNORE_INDEX, PackedStream, TaskRenderer, to_device
from fastsft.distributed import Dist, all_reduce_sum
from fastsft.packing import pack_rows, render_batch


def _unwrapped(model):
    return getattr(model, "module", model)


@torch.no_grad()
def validation_loss(model, streams: dict[str, PackedStream], steps: int, d: Dist, vocab_size: int,
                    autocast=nullcontext) -> dict[str, float]:
    """{task name: mean loss per supervised target} over `steps` micro-batches of each stream (from its start)."""
    was_training = model.training
    model.eval()
    out = {}
    try:
        for name, stream in streams.items():
            state = stream.state_dict()
            total = torch.zeros(2, dtype=torch.float64, device=d.device)
            for _ in range(steps):
                batch = to_device(stream.next_batch(), torch.device("cpu"), vocab_size)
                args, kw = batch.model_inputs()
                with autocast():
                    loss_sum, count = model(*(a.to(d.device) for a in args),
                                            **{k: v.to(d.device) if torch.is_tensor(v) else v for k, v in kw.items()})
                total[0] += loss_sum.double()
                total[1] += count
                if stream.epoch > 0:  # a short held-out set: one pass is enough
                    break
            stream.load_state_dict(state)  # the next validation reads the same batches
            total = all_reduce_sum(total, d).tolist()
            out[name] = total[0] / max(total[1], 1.0)
    finally:
        model.train(was_training)
    return out


def _exact_matches(model, tokenizer, conversations, seq_len: int, device, autocast, rows_per_forward: int = 8):
    """(per conversation: all supervised argmax right, argmax ids per conversation) for conversations that fit."""
    rendered = render_batch(tokenizer, conversations, max_tokens=seq_len)
    packed = pack_rows(rendered, seq_len, num_rows=None, pad_id=tokenizer.bos_id, max_seqs=len(rendered) * 2 + 8)
    rows = packed.rows
    predictions = np.zeros_like(packed.input_ids)
    for start in range(0, rows, rows_per_forward):
        stop = min(rows, start + rows_per_forward)
        # A sub-batch of rows keeps its own segments: rebuild cu_seqlens from the positions (restart = new segment).
        pos = packed.position_ids[start:stop]
        starts = np.flatnonzero(pos.reshape(-1) == 0)
        cu = np.concatenate([starts, [pos.size]]).astype(np.int32)
        with autocast():
            logits = model(torch.from_numpy(packed.input_ids[start:stop]).to(device),
                           position_ids=torch.from_numpy(pos).to(device), cu_seqlens=torch.from_numpy(cu).to(device),
                           max_seqlen=seq_len)
        predictions[start:stop] = logits.argmax(-1).cpu().numpy()
    wrong = (packed.targets != IGNORE_INDEX) & (predictions != packed.targets)
    exact, answers = [], []
    for (row, offset, length), (ids, mask) in zip(packed.placement, rendered):
        span = slice(offset, offset + length)
        exact.append(not wrong[row, span].any())
        supervised = packed.targets[row, span] != IGNORE_INDEX
        answers.append(predictions[row, span][supervised])
    return exact, answers


@torch.no_grad()
def answer_accuracy(model, tokenizer, tasks: dict, problems: int, seq_len: int, d: Dist,
                    autocast=nullcontext) -> dict[str, float]:
    """{"answer_accuracy/<task>": share exactly right, ..., "answer_accuracy": over all} on the first `problems`
    conversations of each held-out task, strided over ranks."""
    was_training = model.training
    model.eval()
    out, right_all, total_all = {}, 0.0, 0.0
    try:
        for name, task in tasks.items():
            indices = list(range(d.rank, min(problems, len(task)), d.world))
            exact, _ = _exact_matches(model, tokenizer, [task[i] for i in indices], seq_len, d.device, autocast) \
                if indices else ([], [])
            counts = all_reduce_sum(torch.tensor([float(sum(exact)), float(len(exact))], dtype=torch.float64,
                                                 device=d.device), d).tolist()
            out[f"answer_accuracy/{name}"] = counts[0] / max(counts[1], 1.0)
            right_all += counts[0]
            total_all += counts[1]
    finally:
        model.train(was_training)
    out["answer_accuracy"] = right_all / max(total_all, 1.0)
    return out


@torch.no_grad()
def answer_samples(model, tokenizer, tasks: dict, count: int, seq_len: int, device,
                   autocast=nullcontext) -> list[dict]:
    """A few held-out questions with the model's teacher-forced answer beside the reference."""
    was_training = model.training
    model.eval()
    samples = []
    try:
        names = list(tasks)
        for k in range(count):
            if not names:
                break
            name = names[k % len(names)]
            task = tasks[name]
            index = k // len(names)
            if index >= len(task):
                continue
            conversation = task[index]
            exact, answers = _exact_matches(model, tokenizer, [conversation], seq_len, device, autocast)
            question = next(m["content"] for m in conversation["messages"] if m["role"] in ("user", "system"))
            rendered = render_batch(tokenizer, [conversation], max_tokens=seq_len)[0]
            reference = rendered[0][1:][rendered[1][1:] == 1]
            samples.append({"task": name, "question": question, "right": bool(exact[0]),
                            "answer": tokenizer.decode(answers[0].tolist()),
                            "reference": tokenizer.decode(reference.tolist())})
    finally:
        model.train(was_training)
    return samples


def held_out_streams(tasks: dict, tokenizer, rows: int, seq_len: int, max_seqs: int, d: Dist) -> dict:
    return {name: PackedStream(TaskRenderer(task, tokenizer, seq_len), rows, seq_len, max_seqs, tokenizer.bos_id,
                               rank=d.rank, world=d.world) for name, task in tasks.items() if len(task) >= d.world}
