"""The `fastsft` command line: one argparse subcommand per job (`inspect`; `train`, which is a dry run for now).

Each subcommand registers its own arguments in an `add_*` function and runs through `args.run(args)`, so adding
a command touches only its own two functions and the list in `build_parser`.
"""

from __future__ import annotations

import argparse
import sys


def add_inspect(sub) -> None:
    p = sub.add_parser(
        "inspect",
        help="show a rendered conversation with its supervision mask, and dataset statistics at a row length",
        description="Render conversation N of a task or mixture with its mask in colour, then report tokens, "
        "supervised share, length percentiles, truncation and packing efficiency at --seq-len, and each task's "
        "share for a mixture. SPEC: KIND:SOURCE[?opts][*N], comma-separated for a mixture, KIND one of "
        "smoltalk, arc-easy, arc-challenge, mmlu, gsm8k, humaneval, jsonl, sharegpt, alpaca, synthetic "
        "(e.g. gsm8k:data/gsm8k_train.jsonl, synthetic:arithmetic,synthetic:spell*2).",
    )
    p.add_argument("--data", required=True, metavar="SPEC", help="task or mixture spec")
    p.add_argument("--index", type=int, default=0, help="conversation to show (mixture order for a mixture)")
    p.add_argument("--seq-len", type=int, default=2048, metavar="T", help="row length for truncation/packing")
    p.add_argument("--tokenizer", metavar="PATH", default=None,
                   help="tokenizer.json, or a directory with GPT-2 vocab.json + merges.txt (default: "
                   "$FASTSFT_TOKENIZER, else a small BPE trained on the data, with a note)")
    p.add_argument("--limit", type=int, default=20_000, metavar="M",
                   help="statistics over at most M conversations (default 20000; 0 = all)")
    p.add_argument("--seed", type=int, default=42, help="mixture shuffle seed")
    p.add_argument("--skip-bad-rows", action="store_true",
                   help="leave out rows that break the conversation rules (counted) instead of stopping")
    p.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                   help="ANSI colours for the mask (auto: only on a terminal)")
    p.set_defaults(run=run_inspect)


def run_inspect(args) -> int:
    from fastsft.inspect import inspect_data

    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    inspect_data(args.data, index=args.index, seq_len=args.seq_len, tokenizer=args.tokenizer,
                 limit=args.limit or None, seed=args.seed, on_error="skip" if args.skip_bad_rows else "error",
                 color=color)
    return 0


def add_train(sub) -> None:
    # Registered for the command list; `main` hands `fastsft train ...` to fastsft.train.main, whose settings come
    # from a TOML config and --key=value overrides that argparse cannot know in advance.
    sub.add_parser(
        "train", add_help=False,
        help="supervised fine-tuning: fastsft train [--config FILE] [--resume] [--dry-run] [--key=value ...] "
        "(no arguments: the built-in embedded default run)",
    )


def add_eval(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate a checkpoint: per-task accuracy, stop rate, answer length, 3-turn check, ChatCORE",
        description="Evaluate a fastsft checkpoint dir (or a run dir with DIR/checkpoint) on tasks by name "
        "(ARC-Easy, ARC-Challenge, MMLU, GSM8K, HumanEval, arithmetic, letter-count, spell) or data spec. "
        "Alone or under torchrun (problems strided over ranks).",
    )
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="checkpoint dir or training run dir")
    p.add_argument("-a", "--tasks", default="ARC-Easy,MMLU,GSM8K,HumanEval", metavar="NAMES",
                   help="comma list of task names or specs (default ARC-Easy,MMLU,GSM8K,HumanEval)")
    p.add_argument("--data-dir", metavar="DIR", default=None,
                   help="read named tasks from local files there (e.g. arc_easy_test.jsonl) instead of the hub")
    p.add_argument("--max-problems", type=int, default=None, metavar="N", help="at most N problems per task")
    p.add_argument("--max-new-tokens", type=int, default=256, help="generation budget per answer")
    p.add_argument("--num-samples", type=int, default=1, help="samples per generative problem (pass@k)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--batch-size", type=int, default=32, help="categorical prompts per forward")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--out", metavar="FILE.json", default=None, help="write the metrics as JSON")
    p.set_defaults(run=run_eval)


def run_eval(args) -> int:
    from fastsft.eval.command import run

    run(args.checkpoint, args.tasks, data_dir=args.data_dir, out=args.out, device=args.device,
        max_problems=args.max_problems, max_new_tokens=args.max_new_tokens, num_samples=args.num_samples,
        temperature=args.temperature, batch_size=args.batch_size)
    return 0


def add_chat(sub) -> None:
    p = sub.add_parser("chat", help="talk to a checkpoint (streamed, calculator calls shown); -p answers once",
                       description="Interactive multi-turn chat with a fastsft checkpoint dir or run dir.")
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="checkpoint dir or training run dir")
    p.add_argument("-p", "--prompt", default=None, help="answer this one question and exit")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.6, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50, help="sample among the k likeliest tokens (0 = all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.set_defaults(run=run_chat)


def run_chat(args) -> int:
    from fastsft.chat_cli import chat

    return chat(args.checkpoint, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                top_k=args.top_k, seed=args.seed, device=args.device)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastsft", description="Fast supervised fine-tuning of GPT chat models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_inspect(sub)
    add_train(sub)
    add_eval(sub)
    add_chat(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:
        return run_train(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, OSError, ImportError, IndexError) as e:
        # Data and usage problems (a file that cannot be read included): one clear line, not a traceback.
        print(f"fastsft {args.command}: error: {e}", file=sys.stderr)
        return 2


def run_train(argv: list[str]) -> int:
    from fastsft.data.base import DataError
    from fastsft.train import main as train_main
    from fastsft.train_config import ConfigError

    try:
        return train_main(argv)
    except (ConfigError, DataError, ValueError, FileNotFoundError) as e:
        print(f"fastsft train: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
