"""GPU throughput of evaluation: MMLU and ARC-Easy problems/s of a d20-size model, plus engine decode speed.

What is timed is what `fastsft eval` runs: fastsft.eval.categorical.choose_letters (every prompt of a batch in ONE
packed varlen forward, answer read from the allowed letters' logits) and the whole evaluate_model per task (main
pass + the 3-turn check on 50 problems). Weights are random (throughput does not depend on them): d20 from
GPTConfig.from_name, bf16. The tokenizer is a byte-level BPE of at most 32768 tokens trained here on text that is
not evaluated (GSM8K train, Alpaca, MMLU dev, HumanEval prompts), so prompt lengths are those of a general
tokenizer, not one fitted to the questions; the mean prompt length is printed per task.

Sections (all by default):
  categorical  problems/s and prompt tokens/s of choose_letters per task and batch size, peak memory
  harness      evaluate_model seconds per task (all problems)
  decode       Engine greedy decode tokens/s on GSM8K prompts (one row, a random model never stops)

Usage: python bench/gpu_eval.py [--data-dir DIR] [--json FILE] [--batch-sizes 32,128] [--quick]
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import write_rows  # noqa: E402

from fastsft.chat import render_for_completion  # noqa: E402
from fastsft.data import load_task  # noqa: E402
from fastsft.engine import Engine  # noqa: E402
from fastsft.eval import evaluate_model  # noqa: E402
from fastsft.eval.categorical import choose_letters  # noqa: E402
from fastsft.model import GPT, GPTConfig  # noqa: E402
from fastsft.tokenizer import Tokenizer  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TASKS = {"ARC-Easy": "arc-easy:{dir}/arc_easy_test.jsonl", "MMLU": "mmlu:{dir}/mmlu_validation.jsonl"}


def training_text(data_dir: Path):
    """Text that the benchmark does not evaluate, to train its tokenizer on."""
    with open(data_dir / "gsm8k_train.jsonl") as f:
        for line in f:
            row = json.loads(line)
            yield row["question"] + "\n" + row["answer"]
    for row in json.loads((data_dir / "alpaca_en_demo.json").read_text()):
        yield "\n".join(row.values())
    with open(data_dir / "mmlu_dev.jsonl") as f:
        for line in f:
            row = json.loads(line)
            yield row["question"] + "\n" + "\n".join(row["choices"])
    with gzip.open(data_dir / "humaneval.jsonl.gz", "rt") as f:
        for line in f:
            yield json.loads(line)["prompt"]


def random_model(name: str, device) -> GPT:
    model = GPT(GPTConfig.from_name(name)).to(device)
    model.init_weights()
    model = model.to(torch.bfloat16)
    model.init_rotary()  # the rotary tables stay fp32 (the cast above made them bf16)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--json", default=None, help="write the rows here")
    parser.add_argument("--batch-sizes", default="32,128")
    parser.add_argument("--quick", action="store_true", help="400 problems per task, 8 decode prompts")
    parser.add_argument("--model", default="d20", help="GPTConfig.from_name shape (a smaller one for a CPU check)")
    parser.add_argument("--problems", type=int, default=None, help="at most this many problems per task")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []

    start = time.perf_counter()
    tokenizer = Tokenizer.train_from_iterator(training_text(args.data_dir), vocab_size=32768)
    print(f"tokenizer: {tokenizer.vocab_size} tokens, trained in {time.perf_counter() - start:.1f} s")
    model = random_model(args.model, device)
    print(f"model: {args.model}, {model.num_params() / 1e6:.0f}M parameters, bf16, {device}")

    limit = args.problems or (400 if args.quick else None)
    for name, spec in TASKS.items():
        task = load_task(spec.format(dir=args.data_dir))
        count = min(len(task), limit or len(task))
        conversations = [task[i] for i in range(count)]
        tokens = sum(len(render_for_completion(tokenizer, c)) for c in conversations)
        choose_letters(model, tokenizer, conversations[:64], batch_size=32)  # warm-up: kernels, allocator
        for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            picked = choose_letters(model, tokenizer, conversations, batch_size=batch_size)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            accuracy = sum(task.evaluate(c, p) for c, p in zip(conversations, picked)) / count
            peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
            rows.append(dict(section="categorical", task=name, batch_size=batch_size, problems=count,
                             mean_prompt_tokens=round(tokens / count, 1), seconds=round(seconds, 3),
                             problems_per_s=round(count / seconds, 1), tokens_per_s=round(tokens / seconds),
                             peak_gib=round(peak, 2), accuracy=round(accuracy, 4)))

    for name, spec in TASKS.items():
        task = load_task(spec.format(dir=args.data_dir))
        start = time.perf_counter()
        metrics = evaluate_model(model, tokenizer, {name: task}, max_problems=limit,
                                 batch_size=128)
        seconds = time.perf_counter() - start
        problems = metrics[f"{name}/problems"]
        rows.append(dict(section="harness", task=name, batch_size=128, problems=int(problems),
                         seconds=round(seconds, 3), problems_per_s=round(problems / seconds, 1),
                         accuracy=round(metrics[f"{name}/accuracy"], 4)))

    engine = Engine(model, tokenizer)
    decode_prompts = min(limit or 32, 8 if args.quick else 32)
    gsm8k = load_task(f"gsm8k:{args.data_dir}/gsm8k_train.jsonl?stop={decode_prompts}")
    prompts = [render_for_completion(tokenizer, gsm8k[i]) for i in range(len(gsm8k))]
    engine.generate_batch(prompts[0], max_new_tokens=16)  # warm-up
    for num_samples in (1, 8):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        generated = sum(g.num_tokens for p in prompts
                        for g in engine.generate_batch(p, num_samples=num_samples, max_new_tokens=128))
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        rows.append(dict(section="decode", task="GSM8K", num_samples=num_samples, problems=len(prompts),
                         seconds=round(seconds, 3), tokens_per_s=round(generated / seconds, 1),
                         problems_per_s=round(len(prompts) / seconds, 2)))

    rows = write_rows(args.json, rows)
    print(f"\n{'section':<12}{'task':<10}{'batch':>6}{'problems':>9}{'prompt tok':>11}{'problems/s':>11}"
          f"{'tokens/s':>10}{'peak GiB':>9}{'seconds':>9}")
    for r in rows:
        batch = r.get("batch_size", r.get("num_samples", ""))
        print(f"{r['section']:<12}{r['task']:<10}{batch:>6}{r['problems']:>9}{r.get('mean_prompt_tokens', ''):>11}"
              f"{r['problems_per_s']:>11}{r.get('tokens_per_s', ''):>10}{r.get('peak_gib', ''):>9}"
              f"{r['seconds']:>9}")


if __name__ == "__main__":
    main()
