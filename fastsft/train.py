"""`fastsft train`: supervised fine-tuning of a GPT on packed chat conversations, one process or DDP.

Read top to bottom: `build_run` makes everything a run needs from its config (data, tokenizer, model, optimizers,
loaders), `train_step` is the step, `schedule` the learning rates, `run` the loop with its guards, evaluations,
logging and checkpoints. `python -m fastsft.train` is the same program as `fastsft train`; under
`torchrun --nproc_per_node=N -m fastsft.train ...` every rank reads its own share of the data and DDP averages
the gradients.

The loss of a step is the sum of the token losses over every supervised target of all its micro-batches on all
ranks, divided by their count. The count is known on the host from the packer before the backward (summed over
ranks with one all-reduce), so each micro-batch's backward is scaled by `world / count` and the gradient equals
that of one big batch however the data was packed, accumulated or spread over ranks. The loop never waits for
the step it has launched (under DDP the stop vote waits for the one before): a non-finite loss skips the update
inside the optimizer kernels (a device flag), and the loss reaches the log through pinned memory a step or two
later (fastsft/readback.py); only evaluations, checkpoints and the end of the run wait for it.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fastsft import checkpoint as ckpt
from fastsft import distributed as distr
from fastsft import fp8 as fp8_matmul
from fastsft.batches import BatchLoader, PackedStream, TaskRenderer
from fastsft.data.base import DataError
from fastsft.data.spec import load_mixture
from fastsft.model import GPT, GPTConfig
from fastsft.optim import build_optimizers
from fastsft.profiling import StepProfiler
from fastsft.readback import Readback
from fastsft.train_config import TrainConfig, load_config
from fastsft.train_eval import answer_accuracy, answer_samples, held_out_streams, validation_loss

logger = logging.getLogger("fastsft.train")

CHECKPOINT_DIR = "checkpoint"  # out_dir/checkpoint: the latest checkpoint of the run (replaced atomically)
PLAN_SAMPLE_BATCHES = 8  # micro-batches packed at start to size a step in conversations or tokens
MUON_MOMENTUM_START, MUON_MOMENTUM_END = 0.85, 0.95


# ----------------------------------------------------------------------------------------------------------------
# Building a run


@dataclass
class Run:
    cfg: TrainConfig
    dist: distr.Dist
    tokenizer: object
    model: GPT  # the plain module (checkpoints, eval)
    step_model: torch.nn.Module  # what the step calls: compiled and/or DDP-wrapped
    optimizers: object
    loader: BatchLoader
    train_task: object
    val_tasks: dict
    micro_batches_per_step: int
    num_steps: int
    max_seqs: int
    autocast: object
    source: str
    compiled: bool = False
    start_step: int = 0
    counters: dict = field(default_factory=dict)
    profiler: StepProfiler = field(default_factory=lambda: StepProfiler(".", steps=0))  # NVTX ranges; --profile
    tok_desc: str = ""
    per_micro_batch: dict = field(default_factory=dict)  # measured conversations / tokens / supervised per micro-batch
    last_data_state: dict = field(default_factory=dict)  # data position after the last consumed micro-batch


def build_tokenizer(cfg: TrainConfig, task, d: distr.Dist, source_tokenizer=None):
    """The source checkpoint's tokenizer, a given file, or one trained on the data (by rank 0, shared via out_dir)."""
    from fastsft.inspect import load_tokenizer
    from fastsft.tokenizer import Tokenizer

    if cfg.tokenizer:
        return load_tokenizer(cfg.tokenizer, [])
    if source_tokenizer is not None:
        return source_tokenizer, f"from the source checkpoint ({source_tokenizer.vocab_size:,} tokens)"
    path = Path(cfg.out_dir) / "tokenizer.json"
    if d.main:
        from fastsft.data.base import conversation_text

        sample = [task[i] for i in range(min(len(task), 2000))]
        texts = [t for conv in sample for t in conversation_text(conv)]
        Tokenizer.train_from_iterator(texts, cfg.tokenizer_vocab_size).save(path)
    distr.barrier(d)
    tok = Tokenizer.from_file(path)
    return tok, f"trained on {min(len(task), 2000):,} conversations of the data ({tok.vocab_size:,} tokens)"


def model_config(cfg: TrainConfig, vocab_size: int) -> GPTConfig:
    fields = dict(cfg.model)
    name = fields.pop("name", None)
    fields.setdefault("sequence_len", cfg.seq_len)
    fields.setdefault("vocab_size", vocab_size)
    if name is not None:
        return GPTConfig.from_name(name, **fields)
    return GPTConfig.from_dict(fields)


def load_source(cfg: TrainConfig, d: distr.Dist):
    """(model or None, its tokenizer or None, description) for cfg.source."""
    if not cfg.source:
        return None, None, "random init"
    if cfg.source.startswith("nanochat:"):
        directory = Path(cfg.source.removeprefix("nanochat:"))
        model = ckpt.load_nanochat(directory, device="cpu")
        tokenizer = None
        pkl = directory / "tokenizer.pkl"
        if not cfg.tokenizer and pkl.is_file():
            tokenizer = ckpt.import_nanochat_tokenizer(pkl, trust_pickle=cfg.trust_pickle)
        return model, tokenizer, f"nanochat checkpoint {directory}"
    model, extras = ckpt.load(cfg.source, device="cpu")
    return model, extras["tokenizer"], f"fastsft checkpoint {cfg.source}"


def plan_steps(cfg: TrainConfig, render, max_seqs: int, pad_id: int, d: distr.Dist) -> tuple[int, int, dict]:
    """(micro-batches per step, number of steps, measured averages) from a few micro-batches packed up front."""
    probe = PackedStream(render, cfg.device_batch_size, cfg.seq_len, max_seqs, pad_id, seed=cfg.seed)
    convs, tokens, supervised = [], [], []
    for _ in range(PLAN_SAMPLE_BATCHES):
        b = probe.next_batch()
        convs.append(len(b.lengths))
        tokens.append(b.packed.num_tokens)
        supervised.append(b.packed.num_supervised)
        if b.epoch > 0:
            break
    per_mb = dict(conversations=float(np.mean(convs)), tokens=float(np.mean(tokens)),
                  supervised=float(np.mean(supervised)))
    if sum(supervised) == 0:
        raise DataError(f"{cfg.data}: the first {len(convs)} packed micro-batches hold no supervised target "
                        f"(is every conversation cut before its answer at seq_len={cfg.seq_len}?); nothing to train")
    if cfg.target_tokens_per_step > 0:
        mbs = max(1, round(cfg.target_tokens_per_step / (d.world * per_mb["tokens"])))
    else:
        mbs = max(1, round(cfg.target_examples_per_step / (d.world * per_mb["conversations"])))
    if cfg.num_iterations > 0:
        steps = cfg.num_iterations
    else:
        per_step = mbs * d.world * per_mb["conversations"]
        steps = max(1, math.ceil(cfg.num_epochs * len(render) / per_step))
    return mbs, steps, per_mb


def segment_budget_for(cfg: TrainConfig, render) -> int:
    from fastsft import packing

    if cfg.max_seqs_per_row > 0:
        return cfg.device_batch_size * cfg.max_seqs_per_row
    sample = render(list(range(min(len(render), 2048))))
    return packing.segment_budget(np.array([len(ids) for ids, _ in sample]), cfg.device_batch_size, cfg.seq_len)


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> str:
    return cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")


def embeddings_to_bf16(model: GPT) -> None:
    """Token and value embeddings in bf16 (their AdamW moments: `adam_moments`): the residual stream then starts in
    bf16 and stays there under autocast, instead of an fp32 stream whose every elementwise op and saved
    activation costs twice the bytes; the tables' weights and gradients take half the memory. Matrices stay fp32
    masters (autocast casts them per forward); lm_head too (the loss casts it)."""
    model.transformer.wte.to(torch.bfloat16)
    if model.config.value_embeds:
        model.value_embeds.to(torch.bfloat16)


def autocast_for(cfg: TrainConfig, device: torch.device):
    dtype = autocast_dtype(cfg, device)
    if dtype == "float32":
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


def should_compile(cfg: TrainConfig, device: torch.device) -> bool:
    return cfg.compile == "true" or (cfg.compile == "auto" and device.type == "cuda")


def build_run(cfg: TrainConfig, resume: bool = False, rendered=None) -> Run:
    """Everything the loop needs. `rendered` = (source of rendered conversations, tokenizer-like object with
    vocab_size and bos_id) replaces cfg.data, for benchmarks on pre-tokenized streams."""
    d = distr.init(cfg.device)
    torch.manual_seed(cfg.seed + d.rank)
    out_dir = Path(cfg.out_dir)
    if d.main:
        out_dir.mkdir(parents=True, exist_ok=True)
    distr.barrier(d)
    from fastsft.attention import select_backend, set_backend

    if cfg.attention:
        set_backend(cfg.attention)
    select_backend(d.device.type)  # chosen (and logged) once, before compiling: tracing then only reads it

    train_task = None if rendered else load_mixture(cfg.data, seed=cfg.seed,
                                                   on_error="skip" if cfg.skip_bad_rows else "error")
    val_tasks = {}
    if cfg.val_data:
        val_mix = load_mixture(cfg.val_data, seed=cfg.seed, on_error="skip" if cfg.skip_bad_rows else "error")
        val_tasks = {t.name: t for t in val_mix.leaves()}

    resume_state = None
    if resume:
        source_model, extras = ckpt.load(out_dir / CHECKPOINT_DIR, device="cpu")
        source_tok, source_desc = extras["tokenizer"], f"resumed from {out_dir / CHECKPOINT_DIR}"
        resume_state = extras["train_state"]
    else:
        source_model, source_tok, source_desc = load_source(cfg, d)
    if rendered:
        tokenizer, tok_desc = rendered[1], "none (pre-tokenized conversations)"
    else:
        tokenizer, tok_desc = build_tokenizer(cfg, train_task, d, source_tok)
    if d.main and not rendered and (resume or cfg.source or cfg.tokenizer):
        tokenizer.save(out_dir / "tokenizer.json")

    if source_model is None:
        mcfg = model_config(cfg, tokenizer.vocab_size)
        with torch.device("meta"):
            model = GPT(mcfg, loss_layout=cfg.loss_layout)
        model.to_empty(device=d.device)
        model.init_weights()
    else:
        model = source_model.to(d.device)
        model.loss_layout = cfg.loss_layout
        model.init_rotary()
    model.set_recompute(mlp=cfg.recompute_mlp)
    if cfg.fp8:
        fp8_matmul.check_supported(d.device, cfg.device_batch_size * cfg.seq_len, model)
    model.set_fp8(cfg.fp8)
    if d.device.type == "cuda" and autocast_dtype(cfg, d.device) == "bfloat16":
        embeddings_to_bf16(model)
    mcfg = model.config
    if tokenizer.vocab_size > mcfg.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size:,} tokens but the model's vocabulary is "
                         f"{mcfg.vocab_size:,}: ids past it would have no embedding")
    if cfg.seq_len > mcfg.sequence_len:
        raise ValueError(f"seq_len = {cfg.seq_len} exceeds the model's sequence_len = {mcfg.sequence_len}")

    render = rendered[0] if rendered else TaskRenderer(train_task, tokenizer, cfg.seq_len)
    max_seqs = segment_budget_for(cfg, render)
    mbs, num_steps, per_mb = plan_steps(cfg, render, max_seqs, tokenizer.bos_id, d)
    stream = PackedStream(render, cfg.device_batch_size, cfg.seq_len, max_seqs, tokenizer.bos_id, seed=cfg.seed,
                          rank=d.rank, world=d.world)
    optimizers = build_optimizers(model, embedding_lr=cfg.embedding_lr, unembedding_lr=cfg.unembedding_lr,
                                  matrix_lr=cfg.matrix_lr, scalar_lr=cfg.scalar_lr, weight_decay=cfg.weight_decay,
                                  adam_moments_dtype=cfg.adam_moments)
    for group in optimizers.param_groups:  # the seed's schedule starts every group at init_lr_frac of its rate
        group["initial_lr"] = group["lr"] = group["lr"] * cfg.init_lr_frac

    start_step, counters = 0, {}
    if resume_state is not None:
        optimizers.load_state_dict(resume_state["optimizers"])
        states = resume_state["data"]
        if len(states) != d.world:
            raise ValueError(f"the checkpoint was written by {len(states)} processes; resume with as many "
                             f"(got {d.world})")
        stream.load_state_dict(states[d.rank])
        ckpt.restore_rng_state(resume_state["rng"])
        start_step, counters = int(resume_state["step"]), dict(resume_state["counters"])
        num_steps = int(resume_state["num_steps"])
        mbs = int(resume_state["micro_batches_per_step"])

    step_model = model
    compiled = should_compile(cfg, d.device)
    if compiled:
        # torch.compile's partitioner: 1.0 saves what its min-cut picks; lower recomputes cheap ops, then matmuls.
        import torch._functorch.config as partitioner

        partitioner.activation_memory_budget = cfg.activation_memory_budget
        graphs = cfg.cuda_graphs and d.device.type == "cuda"
        step_model = torch.compile(model, dynamic=False, options={"triton.cudagraphs": True} if graphs else None)
    if d.active:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # device_ids=None: the inputs are on the device already, and with ids DDP would also move the host's
        # supervised count (a CPU scalar, DeviceBatch.model_inputs) to the GPU, for the loss to read it back.
        step_model = DDP(step_model, device_ids=None, gradient_as_bucket_view=True)
    loader = BatchLoader(stream, d.device, mcfg.vocab_size, thread=cfg.loader_thread)
    run = Run(cfg, d, tokenizer, model, step_model, optimizers, loader, train_task or render, val_tasks, mbs, num_steps,
              max_seqs, autocast_for(cfg, d.device), source_desc, compiled, start_step, counters)
    run.counters.setdefault("skipped_nonfinite", 0)
    run.counters.setdefault("skipped_oom", 0)
    run.counters.setdefault("truncated", 0)
    run.counters.setdefault("conversations", 0)
    run.tok_desc, run.per_micro_batch = tok_desc, per_mb
    run.profiler = StepProfiler(out_dir, steps=cfg.profile)
    return run


# ----------------------------------------------------------------------------------------------------------------
# The step


def forward_loss(step_model, batch, autocast):
    """(loss_sum, n_supervised) of one micro-batch; a module function so tests can inject faults."""
    args, kw = batch.model_inputs()
    with autocast():
        return step_model(*args, **kw)


class SkipStep(Exception):
    """The step's gradients are incomplete or missing (out of memory in a backward, or in every micro-batch).

    A micro-batch whose forward runs out of memory is left out of its step (counted); its targets stay in the
    step's count, so that step's gradient is a little smaller, never wrong in direction."""


def train_step(run: Run, micro_batches: list) -> tuple[torch.Tensor, torch.Tensor | float]:
    """Forward and backward of every micro-batch of one step; returns (this rank's summed loss, a device scalar;
    the step's supervised targets on all ranks: a number, or under DDP a device scalar).

    Scales each backward by world / (supervised targets of the step on all ranks), so DDP's mean over ranks
    yields sum-of-losses / global count. Gradients accumulate locally; DDP all-reduces on the last micro-batch.
    """
    d = run.dist
    count = float(sum(b.num_supervised for b in micro_batches))
    if d.active:  # the step's count on all ranks
        count = distr.sum_over_ranks(count, d).clamp(min=1.0)
    else:
        count = max(count, 1.0)
    scale = d.world / count  # a number, or a device tensor under DDP: never read on the host
    total = torch.zeros((), device=d.device)
    ran = 0
    for i, batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        sync = contextlib.nullcontext() if (last or not d.active) else run.step_model.no_sync()
        with sync:
            try:
                with run.profiler.range("forward"):
                    loss_sum, _ = forward_loss(run.step_model, batch, run.autocast)
            except torch.OutOfMemoryError:
                if d.active:
                    raise  # ranks would fall out of step; a multi-process OOM ends the run
                run.counters["skipped_oom"] += 1
                release_memory()
                logger.warning("out of memory in the forward of a micro-batch: skipped it")
                continue
            try:
                with run.profiler.range("backward"):
                    (loss_sum * scale).backward()
            except torch.OutOfMemoryError:
                if d.active:
                    raise
                run.counters["skipped_oom"] += 1
                release_memory()
                raise SkipStep("out of memory in a backward") from None
        total = total + loss_sum.detach()
        ran += 1
    if ran == 0:
        raise SkipStep("out of memory in every micro-batch")
    return total, count


def release_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def schedule(cfg: TrainConfig, step: int, num_steps: int) -> tuple[float, float]:
    """(learning-rate multiplier, Muon momentum) at `step`: warmup, constant, linear warmdown to final_lr_frac."""
    warmup = round(cfg.warmup_ratio * num_steps)
    warmdown = round(cfg.warmdown_ratio * num_steps)
    if step < warmup:
        lrm = (step + 1) / warmup
    elif step < num_steps - warmdown:
        lrm = 1.0
    else:
        progress = (num_steps - step) / max(warmdown, 1)
        lrm = progress + (1 - progress) * cfg.final_lr_frac
    frac = 1.0 if cfg.muon_momentum_warmup_steps == 0 else min(step / cfg.muon_momentum_warmup_steps, 1.0)
    momentum = (1 - frac) * MUON_MOMENTUM_START + frac * MUON_MOMENTUM_END
    return lrm, momentum


def apply_schedule(run: Run, step: int) -> float:
    lrm, momentum = schedule(run.cfg, step, run.num_steps)
    for group in run.optimizers.param_groups:
        group["lr"] = group["initial_lr"] * lrm
    for group in run.optimizers.muon.param_groups:
        group["momentum"] = momentum
    return lrm


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(run: Run, step: int) -> Path | None:
    """Model, optimizers, schedule position, every rank's data position and the RNG states, in out_dir/checkpoint."""
    states = distr.all_gather_objects(run.last_data_state, run.dist)
    if not run.dist.main:
        distr.barrier(run.dist)
        return None
    train_state = {"step": step, "num_steps": run.num_steps, "micro_batches_per_step": run.micro_batches_per_step,
                   "optimizers": run.optimizers.state_dict(), "data": states, "rng": ckpt.capture_rng_state(),
                   "counters": dict(run.counters)}
    path = ckpt.save(run.model, Path(run.cfg.out_dir) / CHECKPOINT_DIR, tokenizer=run.tokenizer,
                     train_state=train_state, meta={"step": step, "config": run.cfg.to_dict()})
    distr.barrier(run.dist)
    return path


class StopSignal:
    """SIGTERM / SIGINT set a flag; the loop checkpoints at the end of the step and exits cleanly."""

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.received is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.received = signum
        logger.warning("received %s: finishing the step, then writing a checkpoint", signal.Signals(signum).name)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


# ----------------------------------------------------------------------------------------------------------------
# The loop


def evaluate(run: Run, val_streams: dict, full: bool) -> dict:
    """Validation loss per held-out task, and (full) answer accuracy and the task metrics of fastsft.eval."""
    out = {}
    cfg, d = run.cfg, run.dist
    if val_streams:
        losses = validation_loss(run.model, val_streams, cfg.eval_steps, d, run.model.config.vocab_size,
                                 run.autocast)
        out.update({f"val_loss/{k}": v for k, v in losses.items()})
        out["val_loss"] = float(np.mean(list(losses.values())))
    if full and cfg.answer_accuracy and run.val_tasks:
        out.update(answer_accuracy(run.model, run.tokenizer, run.val_tasks, cfg.answer_accuracy_problems,
                                   cfg.seq_len, d, run.autocast))
    if full and cfg.eval_metrics:
        out.update(task_metrics(run))
    return out


def task_metrics(run: Run) -> dict:
    from fastsft.eval import evaluate_model

    with run.autocast():
        return evaluate_model(run.model, run.tokenizer, run.cfg.eval_metrics, max_problems=run.cfg.eval_max_problems,
                              device=run.dist.device)


def optimizer_step(run: Run, step: int, warn=logger.warning) -> tuple[torch.Tensor | float, float, list]:
    """One step of the run: schedule, micro-batches, forward and backward, the update. Reads nothing back from the
    device: a non-finite loss skips the update inside the optimizer kernels (parameters, moments and momentum are
    left as they were; AdamW's step count advances), and whoever reads the loss later counts the skip (`RunLog`).

    Returns (the step's mean loss as a device scalar, or nan when the step was dropped on the host: out of memory;
    the learning-rate multiplier; its micro-batches)."""
    lrm = apply_schedule(run, step)
    with run.profiler.range("data"):
        micro_batches = [run.loader.get() for _ in range(run.micro_batches_per_step)]
    try:
        total, count = train_step(run, micro_batches)
        loss = (distr.all_reduce_sum(total.reshape(1), run.dist) / count)[0]
        with run.profiler.range("optimizer"):
            clip(run)
            run.optimizers.step(skip=~torch.isfinite(loss))
    except SkipStep as e:
        loss = float("nan")
        warn(f"step {step + 1}: {e}; step skipped (gradients dropped)")
    run.optimizers.zero_grad(set_to_none=True)
    run.last_data_state = micro_batches[-1].state
    return loss, lrm, micro_batches


@contextlib.contextmanager
def frozen_heap():
    """Keep what exists now (tasks, tokenizer, model; call again after the first step for the compiled code) out
    of the garbage collector's full passes: such a pass walks every container of the process (0.15-0.33 s with
    torch imported and a task loaded, measured on our CPU) and stalls whichever step it lands in. Unfrozen on exit,
    so a finished run's reference cycles can still be freed."""
    gc.collect()
    gc.freeze()
    try:
        yield gc.freeze
    finally:
        gc.unfreeze()


def run_training(cfg: TrainConfig, resume: bool = False, run: Run | None = None) -> dict:
    """Train as configured (or a run built by build_run); returns the summary (also in out_dir/summary.json)."""
    from fastsft.run_log import RunLog

    run = run or build_run(cfg, resume)
    cfg, d = run.cfg, run.dist
    log = RunLog(run, enabled=d.main)
    log.start()
    val_streams = held_out_streams(run.val_tasks, run.tokenizer, cfg.device_batch_size, cfg.seq_len, run.max_seqs, d)
    if run.start_step == 0 and (val_streams or cfg.eval_metrics):
        log.eval(0, evaluate(run, val_streams, full=True), before=True)
    run.last_data_state = run.loader.stream.state_dict()
    step = run.start_step
    recompiles_at_first = None
    votes = Readback()
    try:
        with StopSignal() as stop, run.profiler, frozen_heap() as freeze:
            while step < run.num_steps:
                t0 = time.perf_counter()
                loss, lrm, micro_batches = optimizer_step(run, step, log.warn)
                step += 1
                run.profiler.step()
                run.counters["conversations"] += sum(b.num_conversations for b in micro_batches)
                run.counters["truncated"] += sum(b.num_truncated for b in micro_batches)
                if recompiles_at_first is None:
                    recompiles_at_first = compiled_graphs()
                    freeze()  # the first step's compiled graphs and kernels
                log.step(step, loss, lrm, micro_batches, time.perf_counter() - t0)
                last = step == run.num_steps
                if cfg.eval_every and step % cfg.eval_every == 0 and not last and val_streams:
                    full = bool(cfg.eval_metrics_every) and step % cfg.eval_metrics_every == 0
                    log.eval(step, evaluate(run, val_streams, full=full))
                stopping = stop_requested(stop, d, votes)
                if stopping or last or (cfg.save_every and step % cfg.save_every == 0):
                    log.flush()  # the steps' losses and skip counts, before the counters are saved
                    save_checkpoint(run, step)
                if stopping:
                    name = signal.Signals(stop.received).name if stop.received else "a signal to another rank"
                    log.warn(f"stopped by {name} after step {step}; checkpoint in "
                             f"{Path(cfg.out_dir) / CHECKPOINT_DIR}, continue with --resume")
                    break
    finally:
        run.loader.close()
    run.counters["recompiles"] = compiled_graphs() - recompiles_at_first if recompiles_at_first is not None else 0
    finished = step == run.num_steps
    after = evaluate(run, val_streams, full=True) if finished and (val_streams or cfg.eval_metrics) else {}
    samples = []
    if finished and d.main and cfg.samples and run.val_tasks:
        samples = answer_samples(run.model, run.tokenizer, run.val_tasks, cfg.samples, cfg.seq_len, d.device,
                                 run.autocast)
    summary = log.finish(step, after, samples, finished)
    if d.active:
        run.step_model = run.model  # frees the DDP wrapper: its Reducer must not outlive the process group (shutdown)
    distr.shutdown(d)
    return summary


def stop_requested(stop: StopSignal, d: distr.Dist, votes: Readback) -> bool:
    """Whether any rank received a stop signal: ranks must checkpoint after the same step (the save gathers every
    rank's data position), so under DDP the flag is summed over ranks, one tiny all-reduce per step, and read one
    step late (reading it at once would make the host wait for the step): every rank reads the same sum after the
    same step."""
    if not d.active:
        return stop.received is not None
    votes.push(None, distr.sum_over_ranks(stop.received is not None, d))
    return any(total > 0 for _, total in votes.ready(wait=True, leave=1))


def clip(run: Run) -> None:
    if run.cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.cfg.grad_clip, foreach=True)


def compiled_graphs() -> int:
    """Graphs dynamo has compiled so far in this process (each recompile adds one)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


# ----------------------------------------------------------------------------------------------------------------
# Entry point


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="fastsft train", description="Supervised fine-tuning on packed chat conversations. Settings come from "
        "a TOML config (default: the built-in embedded run) and --key=value overrides (dotted for model.*).",
        allow_abbrev=False)
    parser.add_argument("--config", default=None, help="TOML file, or the name of a built-in config")
    parser.add_argument("--resume", action="store_true", help="continue the run in out_dir from its checkpoint")
    parser.add_argument("--dry-run", action="store_true", help="stream the data only (no model), and report")
    args, overrides = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = load_config(args.config, overrides)
    if args.dry_run:
        from fastsft.dry_run import dry_run

        dry_run(cfg.data, rows=cfg.device_batch_size, seq_len=cfg.seq_len, tokenizer=cfg.tokenizer or None,
                seed=cfg.seed, on_error="skip" if cfg.skip_bad_rows else "error")
        return 0
    summary = run_training(cfg, resume=args.resume)
    return 0 if summary.get("finished", False) or summary.get("stopped_by_signal", False) else 1


if __name__ == "__main__":
    sys.exit(main())
