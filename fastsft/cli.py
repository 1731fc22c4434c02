"""The `fastsft` command line: one argparse subcommand per job (`inspect` now; `train` joins later).

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastsft", description="Fast supervised fine-tuning of GPT chat models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_inspect(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, ImportError, IndexError) as e:
        # Data and usage problems: one clear line, not a traceback.
        print(f"fastsft {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
