"""The training driver: the step's gradient, DDP, resume, guards, signals, configs, and the embedded default."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fastsft import train as train_mod
from fastsft.batches import DeviceBatch, PackedStream, RenderedSource, to_device
from fastsft.distributed import Dist
from fastsft.model import GPT, GPTConfig
from fastsft.profiling import StepProfiler
from fastsft.train_config import ConfigError, load_config

TINY = ["--model.n_layer=2", "--model.n_embd=64", "--model.n_head=2", "--model.n_kv_head=2", "--seq_len=128",
        "--device_batch_size=4", "--tokenizer_vocab_size=300", "--eval_every=0", "--answer_accuracy=false",
        "--samples=0", "--init_lr_frac=1.0", "--muon_momentum_warmup_steps=0"]
DATA = "--data=synthetic:spell?size=400,synthetic:arithmetic?size=200"


@pytest.fixture(autouse=True)
def reference_kernels(monkeypatch):
    """These tests check the loop, not the kernels (their own tests do): run the CPU path users get, where the
    loss and the optimizers fall back to their PyTorch references instead of Triton's slow interpreter."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    """One tokenizer for every run of this module, so runs compared with each other share their vocabulary."""
    from fastsft.data.base import conversation_text
    from fastsft.data.spec import load_mixture
    from fastsft.tokenizer import Tokenizer

    task = load_mixture(DATA.removeprefix("--data="))
    texts = [t for i in range(len(task)) for t in conversation_text(task[i])]
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    Tokenizer.train_from_iterator(texts, 300).save(path)
    return path


class LateEvent:
    """A CUDA event's stand-in on the CPU: it passes only once waited for, as if the GPU ran steps behind."""

    waits = 0

    def __init__(self):
        self.passed = False

    def query(self):
        return self.passed

    def synchronize(self):
        LateEvent.waits += 1
        self.passed = True


@pytest.fixture
def late_readback(monkeypatch):
    """Every tensor pushed to a Readback arrives only when waited for (on the CPU it is there at once), so the
    deferred paths of the log run: rows pending across steps, signals, checkpoints and resumes."""
    from fastsft.readback import Readback

    real = Readback.push

    def push(self, tag, value):
        real(self, tag, value)
        if torch.is_tensor(value):
            self._pending[-1] = (*self._pending[-1][:2], LateEvent())

    monkeypatch.setattr(Readback, "push", push)
    monkeypatch.setattr(LateEvent, "waits", 0)


def tiny_config(tmp_path, *extra):
    return load_config(None, [f"--out_dir={tmp_path}", DATA, *TINY, *extra])


def losses_of(out_dir) -> list[float]:
    rows = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "eval" not in r]


# -- the step's gradient does not depend on packing or accumulation ---------------------------------------------------


def _conversations(n, vocab, seed):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(rng.integers(5, 40))
        ids = rng.integers(0, vocab, length).astype(np.int32)
        mask = (rng.random(length) < 0.6).astype(np.uint8)
        mask[0] = 0
        out.append((ids, mask))
    return out


def _batches(source, rows, seq_len, per_batch):
    """Micro-batches holding exactly `per_batch` conversations each (all of them, in order)."""
    out = []
    for start in range(0, len(source), per_batch):
        chunk = RenderedSource(source.pairs[start:start + per_batch])
        stream = PackedStream(chunk, rows, seq_len, max_seqs=rows * 16, pad_id=0)
        host = stream.next_batch()
        assert len(host.lengths) == len(chunk), "the packing of this test must place every conversation"
        out.append(to_device(host, torch.device("cpu"), vocab_size=97))
        # the count the loss trusts instead of reading the device: the packer's, equal to the targets' own
        assert int(out[-1].model_inputs()[1]["num_supervised"]) == int((out[-1].targets >= 0).sum()) > 0
        # the packer's rows end in a padding segment: every token is in one, and the model is told so
        assert int(out[-1].cu_seqlens[-1]) == rows * seq_len and out[-1].model_inputs()[1]["covered"] is True
    return out


def _grads_after_step(model, micro_batches):
    run = SimpleNamespace(dist=Dist(), step_model=model, autocast=train_mod.contextlib.nullcontext,
                          counters={"skipped_oom": 0}, profiler=StepProfiler(".", steps=0))
    model.zero_grad(set_to_none=True)
    total, count = train_mod.train_step(run, micro_batches)
    return {n: p.grad.clone() for n, p in model.named_parameters()}, float(total / count)


def test_accumulated_gradient_equals_one_big_batch():
    torch.manual_seed(0)
    cfg = GPTConfig(sequence_len=64, vocab_size=97, n_layer=2, n_head=2, n_kv_head=2, n_embd=32)
    model = GPT(cfg)
    model.init_weights()
    with torch.no_grad():  # break the zero-init symmetry so every parameter gets a gradient
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    source = RenderedSource(_conversations(24, 97, seed=1))
    one, loss_one = _grads_after_step(model, _batches(source, rows=12, seq_len=64, per_batch=24))
    for rows, seq_len, per_batch in ((4, 64, 8), (2, 96, 3), (1, 256, 5)):
        many, loss_many = _grads_after_step(model, _batches(source, rows, seq_len, per_batch))
        assert loss_many == pytest.approx(loss_one, rel=1e-5)
        for name, g in one.items():
            torch.testing.assert_close(many[name], g, rtol=1e-4, atol=1e-6, msg=f"{name} differs")
    assert any(g.abs().sum() > 0 for g in one.values())


def test_schedule_is_the_seeds_linear_decay_by_default(tmp_path):
    cfg = tiny_config(tmp_path, "--warmdown_ratio=1.0", "--warmup_ratio=0.0")
    assert [train_mod.schedule(cfg, s, 4)[0] for s in range(4)] == [1.0, 0.75, 0.5, 0.25]
    cfg = tiny_config(tmp_path, "--warmup_ratio=0.25", "--warmdown_ratio=0.5", "--final_lr_frac=0.1",
                      "--muon_momentum_warmup_steps=2")
    lrms = [train_mod.schedule(cfg, s, 8)[0] for s in range(8)]
    assert lrms[:2] == [0.5, 1.0] and lrms[2:4] == [1.0, 1.0]
    assert lrms[4] == pytest.approx(1.0) and lrms[7] == pytest.approx(0.25 + 0.75 * 0.1)
    assert [train_mod.schedule(cfg, s, 8)[1] for s in (0, 1, 2, 5)] == pytest.approx([0.85, 0.9, 0.95, 0.95])


# -- configs -----------------------------------------------------------------------------------------------------------


def test_bad_config_key_or_value_is_named(tmp_path):
    with pytest.raises(ConfigError, match="num_iteratons.*valid keys.*num_iterations"):
        load_config(None, ["--num_iteratons=5"])
    with pytest.raises(ConfigError, match="seq_len must be a int"):
        load_config(None, ["--seq_len=abc"])
    with pytest.raises(ConfigError, match="device_batch_size must be >= 1"):
        load_config(None, ["--device_batch_size=0"])
    with pytest.raises(ConfigError, match="loss_layout must be one of"):
        load_config(None, ["--loss_layout=huge"])
    with pytest.raises(ConfigError, match=r"activation_memory_budget must be in \(0, 1\]"):
        load_config(None, ["--activation_memory_budget=0"])
    with pytest.raises(ConfigError, match="cuda_graphs replays the compiled graphs: it needs compile = auto or true"):
        load_config(None, ["--cuda_graphs=true", "--compile=false"])
    assert load_config(None, ["--cuda_graphs=true"]).cuda_graphs
    with pytest.raises(ConfigError, match="adam_moments must be one of param, fp32"):
        load_config(None, ["--adam_moments=fp16"])
    bad = tmp_path / "bad.toml"
    bad.write_text("seq_len = 128\nlearning_rate = 3\n")
    with pytest.raises(ConfigError, match=f"{bad}.*learning_rate"):
        load_config(bad)
    from fastsft.cli import main

    assert main(["train", "--num_iteratons=5"]) == 2


@pytest.mark.parametrize("moments", ["param", "fp32"])
def test_adam_moments_reach_adamw(tmp_path, moments):
    run = train_mod.build_run(tiny_config(tmp_path, f"--adam_moments={moments}"))
    run.loader.close()
    assert run.optimizers.adamw.moments_dtype == moments
    table = torch.zeros(3, 2, dtype=torch.bfloat16)
    assert run.optimizers.adamw.moment_dtype(table) == (torch.bfloat16 if moments == "param" else torch.float32)


def test_model_keys_are_checked(tmp_path):
    cfg = tiny_config(tmp_path, "--model.n_layr=3")
    with pytest.raises(ValueError, match="n_layr"):
        train_mod.model_config(cfg, 300)


def test_resolved_config_round_trips(tmp_path):
    cfg = tiny_config(tmp_path, "--compile=false", "--data=synthetic:spell")
    path = tmp_path / "resolved.toml"
    path.write_text(cfg.to_toml())
    assert load_config(path) == cfg


# -- runs ---------------------------------------------------------------------------------------------------------------


def test_run_writes_metrics_summary_report(tmp_path):
    out = tmp_path / "run"
    summary = train_mod.run_training(tiny_config(out, "--num_iterations=4", "--eval_every=2", "--val_data="
                                                 "synthetic:spell@test?size=16", "--eval_steps=1"))
    assert summary["finished"] and summary["steps"] == 4 and summary["recompiles"] == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "eval" not in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for key in ("loss", "lr", "supervised_tokens", "tokens_per_s"):
        assert all(r[key] is not None for r in steps), key
    assert any("eval" in r and "val_loss" in r for r in rows)
    saved = json.loads((out / "summary.json").read_text())
    for key in ("steps", "final_loss", "skipped_nonfinite", "skipped_oom", "recompiles", "eval_before", "eval_after"):
        assert key in saved
    assert "val_loss" in saved["eval_before"] and "val_loss" in saved["eval_after"]
    assert (out / "report.md").is_file() and (out / "loss.png").is_file()
    assert (out / "config.toml").is_file() and (out / "checkpoint" / "model.safetensors").is_file()


def test_step_lines_wait_for_nothing_and_rows_come_in_order(tmp_path, late_readback):
    # log_every = 1 (the default) prints every step: waiting for a printed step's loss would wait for every step.
    from fastsft.run_log import RunLog

    run = train_mod.build_run(tiny_config(tmp_path, "--num_iterations=4"))
    batches = [run.loader.get()]
    run.loader.close()
    log = RunLog(run)
    log.start()
    losses = [2.0, float("nan"), 1.5, 1.25]
    for step, loss in enumerate(losses, start=1):
        log.step(step, torch.tensor(loss), 1.0, batches, 0.1)
    assert LateEvent.waits == 0 and (tmp_path / "metrics.jsonl").read_text() == ""
    log.flush()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 2.0), (2, None), (3, 1.5), (4, 1.25)]
    assert run.counters["skipped_nonfinite"] == 1


def test_nonfinite_loss_and_oom_are_skipped_and_counted(tmp_path, monkeypatch, late_readback):
    calls = {"n": 0, "opt": 0}
    real = train_mod.forward_loss

    def faulty(step_model, batch, autocast):
        calls["n"] += 1
        if calls["n"] == 2:
            loss_sum, count = real(step_model, batch, autocast)
            return loss_sum * float("nan"), count
        if calls["n"] == 4:
            raise torch.OutOfMemoryError("injected")
        return real(step_model, batch, autocast)

    monkeypatch.setattr(train_mod, "forward_loss", faulty)
    run = train_mod.build_run(tiny_config(tmp_path, "--num_iterations=5", "--target_examples_per_step=1"))
    assert run.micro_batches_per_step == 1
    step = run.optimizers.step

    def counted_step(**kw):
        calls["opt"] += 1
        step(**kw)

    run.optimizers.step = counted_step
    summary = train_mod.run_training(run.cfg, run=run)
    assert summary["skipped_nonfinite"] == 1 and summary["skipped_oom"] == 1
    saved = json.loads((tmp_path / "checkpoint" / "train_state.json").read_text())["state"]["counters"]
    assert saved["skipped_nonfinite"] == 1  # the losses were read before the checkpoint was written
    # 5 steps: the OOM step had no micro-batch left and never reached the optimizer; the NaN step did, and its
    # update was skipped inside the kernels (the parameters are finite below), counted when its loss was read
    assert calls["opt"] == 4
    assert summary["finished"]
    for p in run.model.parameters():
        assert torch.isfinite(p).all()


def _run_until_sigterm(tmp_path, monkeypatch, after_steps):
    real = train_mod.train_step
    seen = {"n": 0}

    def step_then_signal(run, micro_batches):
        out = real(run, micro_batches)
        seen["n"] += 1
        if seen["n"] == after_steps:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(train_mod, "train_step", step_then_signal)


def test_resume_gives_the_uninterrupted_losses(tmp_path, monkeypatch, tokenizer_file, late_readback):
    args = ("--num_iterations=6", "--target_examples_per_step=40", f"--tokenizer={tokenizer_file}")
    full = train_mod.run_training(tiny_config(tmp_path / "full", *args))
    assert full["finished"]
    real_step = train_mod.train_step
    _run_until_sigterm(tmp_path, monkeypatch, after_steps=3)
    part = train_mod.run_training(tiny_config(tmp_path / "part", *args))
    assert part["stopped_by_signal"] and part["steps"] == 3
    monkeypatch.setattr(train_mod, "train_step", real_step)
    resumed = train_mod.run_training(tiny_config(tmp_path / "part", *args), resume=True)
    assert resumed["finished"] and resumed["steps"] == 6
    assert losses_of(tmp_path / "part") == losses_of(tmp_path / "full")  # exactly, on the CPU


def test_resume_after_a_crash_writes_each_step_once(tmp_path, monkeypatch, tokenizer_file):
    args = ("--num_iterations=5", "--target_examples_per_step=40", f"--tokenizer={tokenizer_file}")
    _run_until_sigterm(tmp_path, monkeypatch, after_steps=2)
    assert train_mod.run_training(tiny_config(tmp_path / "run", *args))["steps"] == 2
    metrics = tmp_path / "run" / "metrics.jsonl"
    with metrics.open("a") as f:  # what a crash after the checkpoint leaves: steps the resumed run does again
        f.write(json.dumps({"step": 3, "loss": 9.0}) + "\n" + json.dumps({"step": 4, "loss": 9.0}) + "\n")
    monkeypatch.undo()
    assert train_mod.run_training(tiny_config(tmp_path / "run", *args), resume=True)["finished"]
    steps = [r["step"] for r in map(json.loads, metrics.read_text().splitlines()) if "eval" not in r]
    assert steps == [1, 2, 3, 4, 5]
    assert 9.0 not in losses_of(tmp_path / "run")


def test_sigterm_writes_a_checkpoint_that_resumes(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fastsft.train", f"--out_dir={out}", DATA, *TINY, "--num_iterations=400"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    deadline = time.time() + 180
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step     2/"):
            proc.send_signal(signal.SIGTERM)
            break
        assert time.time() < deadline, "".join(lines)
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, "".join(lines) + rest
    assert "stopped by SIGTERM" in rest
    state = json.loads((out / "checkpoint" / "train_state.json").read_text())["state"]
    stopped_at = state["step"]
    assert 2 <= stopped_at < 400
    run = train_mod.build_run(load_config(None, [f"--out_dir={out}", DATA, *TINY, "--num_iterations=400"]),
                              resume=True)
    assert run.start_step == stopped_at and run.num_steps == 400
    before = [p.detach().clone() for p in run.model.parameters()]
    batch = run.loader.get()
    run.loader.close()
    total, count = train_mod.train_step(run, [batch])
    run.optimizers.step()
    assert torch.isfinite(total) and any(not torch.equal(a, p) for a, p in zip(before, run.model.parameters()))


def test_ddp_stop_vote_is_read_a_step_late_and_sent_without_a_wait(monkeypatch):
    """Under DDP each step sums the ranks' stop flags and reads the previous step's sum, so every rank stops after
    the same step. The flag goes up from pinned memory with non_blocking: a pageable host tensor made on the GPU
    (torch.tensor(..., device=cuda)) waits for the stream every step. On this machine a stand-in CUDA device
    records how the tensors are made and copied; the all-reduce is the identity (one rank's view)."""
    made, copies = [], []
    real_tensor = torch.tensor

    def tensor(data, **kw):
        made.append(kw)
        return real_tensor(data, dtype=kw.get("dtype"))

    def to(self, device, *args, **kw):
        copies.append((torch.device(device).type, kw.get("non_blocking", False)))
        return self

    monkeypatch.setattr(torch, "tensor", tensor)
    monkeypatch.setattr(torch.Tensor, "to", to)
    monkeypatch.setattr(train_mod.distr, "all_reduce_sum", lambda t, d: t)
    d = Dist(rank=0, world=2, device=torch.device("cuda", 0))
    stop, votes = SimpleNamespace(received=None), train_mod.Readback()
    stopped = []
    for step in range(4):
        if step == 2:
            stop.received = signal.SIGTERM
        stopped.append(train_mod.stop_requested(stop, d, votes))
    assert stopped == [False, False, False, True]  # the signal before step 2's vote, read after step 3
    assert made and all(kw.get("device") is None and kw.get("pin_memory") for kw in made)
    assert copies and all(copy == ("cuda", True) for copy in copies)
@pytest.mark.slow
def test_ddp_two_processes_match_one(tmp_path, tokenizer_file):
    """torchrun with 2 gloo processes, one micro-batch each, gives the losses of one process that takes the same
    two rank shares as two micro-batches of each step."""
    args = [DATA, *TINY, "--num_iterations=3", "--target_examples_per_step=8", "--loader_thread=false", "--val_data=",
            f"--tokenizer={tokenizer_file}"]
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port",
                           str(29500 + os.getpid() % 1000), "-m", "fastsft.train", f"--out_dir={out}", *args],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 micro-batch(es)" in proc.stdout + proc.stderr
    ddp_losses = losses_of(out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2

    cfg = load_config(None, [f"--out_dir={tmp_path / 'one'}", *args])
    run = train_mod.build_run(cfg)
    streams = []
    for rank in range(2):
        s = PackedStream(run.loader.stream.render, cfg.device_batch_size, cfg.seq_len, run.max_seqs,
                         run.tokenizer.bos_id, seed=cfg.seed, rank=rank, world=2)
        streams.append(s)

    class TwoRanks:
        def __init__(self):
            self.n = 0
            self.stream = streams[0]

        def get(self) -> DeviceBatch:
            s = streams[self.n % 2]
            self.n += 1
            return to_device(s.next_batch(), torch.device("cpu"), run.model.config.vocab_size)

        def close(self):
            pass

    run.loader = TwoRanks()
    run.micro_batches_per_step = 2
    run.num_steps = 3
    train_mod.run_training(cfg, run=run)
    one_losses = losses_of(tmp_path / "one")
    assert len(ddp_losses) == len(one_losses) == 3
    np.testing.assert_allclose(ddp_losses, one_losses, rtol=2e-5)


# Run under torchrun: fastsft.train with one collective still on a gloo worker when the group is destroyed. Rank 1
# joins it 0.5 s late, so the worker surely frees the (Python) tensor then, which takes the GIL: the state the race
# reaches now and then under CPU contention (distributed.shutdown's docstring), made certain.
IN_FLIGHT_AT_DESTROY = """
import sys, threading, time, weakref
import torch, torch.distributed as dist
from fastsft.train import main

destroy = dist.destroy_process_group


def destroy_with_a_collective_in_flight(group=None):
    if dist.get_rank() == 1:
        time.sleep(0.5)
    t = torch.ones(1)
    weakref.finalize(t, lambda: print("freed on", threading.current_thread().name, flush=True))
    dist.all_reduce(t, async_op=True)
    del t
    destroy(group)


dist.destroy_process_group = destroy_with_a_collective_in_flight
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_ddp_exits_with_a_worker_still_freeing_a_tensor(tmp_path, tokenizer_file):
    """A gloo worker that frees a tensor while the rank tears the group down waits for the GIL; before the fix, DDP's
    Reducer destroyed the group (joining that worker) with the GIL held, and the rank hung."""
    script = tmp_path / "in_flight.py"
    script.write_text(IN_FLIGHT_AT_DESTROY)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port",
                           str(29500 + (os.getpid() + 500) % 1000), str(script), f"--out_dir={tmp_path / 'ddp'}", DATA,
                           *TINY, "--num_iterations=1", "--target_examples_per_step=8", "--loader_thread=false",
                           "--val_data=", f"--tokenizer={tokenizer_file}"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout + proc.stderr
    assert out.count("freed on") == 2 and "freed on MainThread" not in out  # by a gloo worker, on each rank


def test_dry_run_goes_through_the_same_config(capsys):
    from fastsft.cli import main

    assert main(["train", "--dry-run", "--data", "synthetic:spell?size=40", "--device_batch_size", "2",
                 "--seq-len", "96"]) == 0
    out = capsys.readouterr().out
    assert "(2, 96) int64" in out and "nothing was trained" in out


@pytest.mark.slow
def test_embedded_default_learns(tmp_path):
    """The README's main command, shortened (fewer steps and problems): chance before, a real gain after."""
    from fastsft.cli import main

    out = tmp_path / "default"
    assert main(["train", f"--out_dir={out}", "--num_iterations=120", "--answer_accuracy_problems=30",
                 "--eval_every=0", "--eval_max_problems=6", "--samples=1"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    before, after = summary["eval_before"], summary["eval_after"]
    assert before["answer_accuracy"] == 0.0 and before["chatcore"] == 0.0
    assert after["answer_accuracy/synthetic:arithmetic@test"] >= 0.5, after
    assert after["answer_accuracy"] >= before["answer_accuracy"] + 0.2, after
    assert after["val_loss"] < 0.3 * before["val_loss"]
    assert summary["recompiles"] == 0 and summary["skipped_nonfinite"] == 0
    assert (out / "report.md").read_text().count("| answer_accuracy |") == 1


def test_profile_writes_a_trace_and_a_table(tmp_path, capsys):
    out = tmp_path / "run"
    summary = train_mod.run_training(tiny_config(out, "--num_iterations=4", "--profile=2", "--val_data="))
    assert summary["finished"]
    assert (out / "profile_trace.json").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "matmul" in printed and "optimizer" in printed
