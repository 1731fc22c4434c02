"""Everything a run tells its user: the step line, a progress bar, metrics.jsonl, summary.json, report.md with plots.

Only rank 0 writes. The step line keeps the seed's spirit (`step | loss | lrm | supervised tokens | tok/s | MFU |
memory`); metrics.jsonl holds one JSON object per step (at least step, loss, lr, supervised_tokens, tokens_per_s)
and one per evaluation; W&B and TensorBoard receive the same when asked for and installed. The progress bar
(tqdm) shows only on a terminal. Warnings of fastsft.diagnostics go to the log as they happen and into the report.
"""

from __future__ import annotations

import json
import logging
import math
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

from fastsft.diagnostics import Diagnostics
from fastsft.readback import Readback

logger = logging.getLogger("fastsft.train")

# Dense bf16 peak of the GPUs MFU is reported against (spec sheet figures).
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "GH200": 989e12, "B200": 2250e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_FLOPS.items():
        if key in name:
            return value
    return None


def memory_gib(device: torch.device) -> float:
    """Peak GPU memory allocated, or the process's peak resident memory on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def keep_rows_until(path: Path, step: int) -> str:
    """The lines of metrics.jsonl at `path` up to and including `step`, where a resumed run continues: a run that
    crashed after its last checkpoint wrote rows the resumed run writes again. Unreadable lines are kept (never
    lose a user's log); the rows after them are cut as well."""
    if not path.exists():
        return ""
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        try:
            row_step = json.loads(line).get("step")
        except (ValueError, AttributeError):
            row_step = None
        if isinstance(row_step, int) and row_step > step:
            break
        kept.append(line if line.endswith("\n") else line + "\n")
    return "".join(kept)


class RunLog:
    def __init__(self, run, enabled: bool = True):
        self.run, self.enabled = run, enabled
        self.out = Path(run.cfg.out_dir)
        self.diagnostics = Diagnostics()
        self.history: list[dict] = []
        self.evals: list[dict] = []
        self.eval_before: dict = {}
        self.bar = None
        self._metrics = None
        self._wandb = self._tb = None
        self._peak = peak_flops(run.dist.device)
        self._start = time.perf_counter()
        self._losses = Readback()  # (row, updated on the device, flops) -> the step's loss
        self._window = [0.0, 0, 0.0]  # flops, tokens, seconds since the last printed step line

    # -- start ---------------------------------------------------------------------------------------------------
    def start(self) -> None:
        if not self.enabled:
            return
        run, cfg = self.run, self.run.cfg
        (self.out / "config.toml").write_text(cfg.to_toml(), encoding="utf-8")
        path = self.out / "metrics.jsonl"
        kept = keep_rows_until(path, run.start_step) if run.start_step else ""
        self._metrics = open(path, "w", encoding="utf-8")
        self._metrics.write(kept)
        m = run.model.config
        per = run.per_micro_batch
        lines = [
            "resolved config (also in " + str(self.out / "config.toml") + "):",
            *("  " + line for line in cfg.to_toml().splitlines() if line),
            f"data: {cfg.data}: {len(run.train_task):,} conversations; held out: "
            f"{', '.join(run.val_tasks) or 'none'}",
            f"tokenizer: {run.tok_desc}",
            f"model: {run.source}; {run.model.num_params() / 1e6:.2f}M parameters, {m.n_layer} layers, width "
            f"{m.n_embd}, vocab {m.vocab_size:,}, sequence_len {m.sequence_len}",
            f"device: {run.dist.device} x {run.dist.world} process(es); compile: "
            f"{'on' if run.compiled else 'off'}; autocast: "
            f"{'bf16' if run.autocast().__class__.__name__ == 'autocast' else 'off (fp32)'}",
            f"step: {run.micro_batches_per_step} micro-batch(es) of {cfg.device_batch_size} x {cfg.seq_len} per rank "
            f"(~{per['conversations'] * run.micro_batches_per_step * run.dist.world:.0f} conversations, "
            f"~{per['supervised'] / max(per['tokens'], 1) * 100:.0f}% of tokens supervised), "
            f"{run.max_seqs} cu_seqlens segments per micro-batch; {run.num_steps} steps"
            + (f", resuming after step {run.start_step}" if run.start_step else ""),
        ]
        for line in lines:
            logger.info(line)
        if cfg.wandb:
            try:
                import wandb

                self._wandb = wandb.init(project=cfg.wandb, config=cfg.to_dict(), dir=str(self.out))
            except ImportError:
                logger.warning("wandb is set but the wandb package is not installed: skipped")
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.out / "tensorboard"))
            except ImportError:
                logger.warning("tensorboard is set but the tensorboard package is not installed: skipped")
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=run.num_steps, initial=run.start_step, unit="step", dynamic_ncols=True)

    # -- during --------------------------------------------------------------------------------------------------
    def _say(self, text: str, level=logging.INFO) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            logger.log(level, text)

    def warn(self, text: str) -> None:
        if self.enabled:
            self._say("warning: " + text, logging.WARNING)

    def _emit(self, row: dict) -> None:
        self._metrics.write(json.dumps(row) + "\n")
        self._metrics.flush()
        scalars = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
        if self._wandb is not None:
            self._wandb.log(scalars, step=row["step"])
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, row["step"])

    def step(self, step: int, loss, lrm: float, micro_batches: list, seconds: float) -> None:
        """Record a step. `loss` is a device scalar on its way to the host (or a float): its row is written and its
        line printed when it arrives, a step or two later (metrics.jsonl stays in step order); never waited for
        here, even on a printed step (every step by default), or the host would wait for every step; `flush()`
        waits. `seconds` is the host's time for the step; with the device a step or two behind, single steps are
        noisy, sums over many are exact."""
        if not self.enabled:
            return
        run = self.run
        world = run.dist.world
        tokens = sum(b.num_tokens for b in micro_batches)
        supervised = sum(b.num_supervised for b in micro_batches)
        flops = sum(run.model.training_flops(b.lengths, b.num_supervised) for b in micro_batches)
        mfu = flops / seconds / self._peak if self._peak else None
        lr = run.optimizers.param_groups[0]["lr"]
        row = dict(step=step, loss=None, lrm=lrm, lr=lr,
                   supervised_tokens=supervised * world, tokens=tokens * world,
                   conversations=sum(b.num_conversations for b in micro_batches) * world,
                   supervised_ratio=supervised / max(tokens, 1), step_time_s=seconds,
                   tokens_per_s=tokens * world / seconds, supervised_tokens_per_s=supervised * world / seconds,
                   mfu=mfu, memory_gib=memory_gib(run.dist.device))
        self._losses.push((row, torch.is_tensor(loss), flops), loss)
        self._drain(wait=False)

    def flush(self) -> None:
        """Write every step recorded so far (waits for their losses)."""
        if self.enabled:
            self._drain(wait=True)

    def _drain(self, wait: bool) -> None:
        for (row, updated, flops), loss in self._losses.ready(wait):
            self._write_step(row, float(loss), updated, flops)

    def _write_step(self, row: dict, loss: float, updated: bool, flops: float) -> None:
        run, step = self.run, row["step"]
        if not math.isfinite(loss) and updated:  # the optimizer kernels skipped this update on the device
            run.counters["skipped_nonfinite"] += 1
            self.warn(f"step {step}: non-finite loss, step skipped (gradients dropped)")
        row["loss"] = loss if math.isfinite(loss) else None
        self.history.append(row)
        self._emit(row)
        for w in self.diagnostics.step(step, loss, row["supervised_tokens"], row["tokens"]):
            self.warn(w)
        self._window = [a + b for a, b in zip(self._window, (flops, row["tokens"], row["step_time_s"]))]
        if step % run.cfg.log_every == 0 or step == run.num_steps:
            # rates over the steps since the last line: single steps' host times are noisy (see step())
            rate = self._window[1] / self._window[2]
            mfu = self._window[0] / self._window[2] / self._peak if self._peak else None
            mfu_text = f"{100 * mfu:.1f}%" if mfu is not None else "n/a"
            self._window = [0.0, 0, 0.0]
            self._say(f"step {step:5d}/{run.num_steps} | loss {loss:.4f} | lrm {row['lrm']:.3f} | supervised "
                      f"{row['supervised_tokens']:,} ({100 * row['supervised_ratio']:.0f}%) | {rate:,.0f} tok/s | "
                      f"MFU {mfu_text} | mem {row['memory_gib']:.2f} GiB")
        if self.bar is not None:
            self.bar.update(1)

    def eval(self, step: int, metrics: dict, before: bool = False) -> None:
        if not self.enabled or not metrics:
            return
        self.flush()  # the training rows before the evaluation's, and the recent losses the diagnostics compare
        if before:
            self.eval_before = dict(metrics)
        row = {"step": step, "eval": True, **metrics}
        self.evals.append(row)
        self._emit(row)
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
        self._say(f"eval at step {step}{' (before training)' if before else ''}: {shown}")
        for w in self.diagnostics.evaluation(step, metrics):
            self.warn(w)

    # -- end -----------------------------------------------------------------------------------------------------
    def finish(self, step: int, after: dict, samples: list, finished: bool) -> dict:
        if not self.enabled:
            return {"finished": finished}
        run = self.run
        self.flush()
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if after:
            self.eval(step, after)
        for w in self.diagnostics.final(after):
            self.warn(w)
        losses = [r["loss"] for r in self.history if r["loss"] is not None]
        steady = self.history[1:] or self.history  # the first step compiles

        def total(key):
            return float(sum(r[key] for r in steady))

        seconds = total("step_time_s")  # rates are totals over time: steps' host times are noisy one by one
        summary = dict(
            steps=step, num_steps=run.num_steps, finished=finished,
            stopped_by_signal=not finished and step < run.num_steps,
            final_loss=losses[-1] if losses else None,
            skipped_nonfinite=run.counters["skipped_nonfinite"], skipped_oom=run.counters["skipped_oom"],
            recompiles=run.counters.get("recompiles", 0), truncated_conversations=run.counters["truncated"],
            conversations=run.counters["conversations"],
            tokens_per_s=total("tokens") / seconds if seconds else None,
            supervised_tokens_per_s=total("supervised_tokens") / seconds if seconds else None,
            mfu=float(np.sum([r["mfu"] * r["step_time_s"] for r in steady])) / seconds
            if seconds and steady[0]["mfu"] is not None else None,
            peak_memory_gib=memory_gib(run.dist.device), wall_time_s=time.perf_counter() - self._start,
            eval_before=self.eval_before, eval_after=dict(after), warnings=self.diagnostics.warnings,
            samples=samples, device=str(run.dist.device), world_size=run.dist.world,
        )
        if run.dist.device.type == "cuda":
            summary["device_name"] = torch.cuda.get_device_name(run.dist.device)
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        self._report(summary)
        for k, v in sorted(after.items()):
            before = self.eval_before.get(k)
            if isinstance(v, float):
                self._say(f"  {k}: {'' if before is None else f'{before:.4f} -> '}{v:.4f}")
        for s in samples:
            self._say(f"sample ({s['task']}, {'right' if s['right'] else 'wrong'}): {s['question']!r}\n"
                      f"  model: {s['answer']!r}")
        self._say(f"summary: {self.out / 'summary.json'}; report: {self.out / 'report.md'}")
        if self._metrics is not None:
            self._metrics.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._tb is not None:
            self._tb.close()
        return summary

    def _report(self, summary: dict) -> None:
        from fastsft.report import write_report

        try:
            write_report(self.out, summary, self.history, self.evals)
        except Exception as e:  # a report must never cost the run its summary
            logger.warning("could not write the report: %s", e)
