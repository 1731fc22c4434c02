"""Copy the generated source of a profiled step's slowest compiled kernels out of inductor's cache.

    python bench/kernel_sources.py STEP.jsonl OUT_DIR [--top 12] [--family elementwise]

The profile names inductor's kernels (triton_per_fused_..._25) but not what they compute or how they index; the
code lives only in the cache of the machine that compiled it, which is given back with its /tmp. This reads the
last row of STEP.jsonl (bench/step.py --json with --profile), takes the `top` kernels of `family` by time per
step, and copies each cache file that defines one into OUT_DIR as NAME.py, with a line of its time on top.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def cache_root() -> Path:
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return Path(cache_dir())


def slowest(row: dict, family: str, top: int) -> list[dict]:
    kernels = [k for k in row.get("kernels") or [] if family in ("all", k["family"])]
    return sorted(kernels, key=lambda k: -k["ms_per_step"])[:top]


def find_sources(names: list[str], root: Path) -> dict[str, Path]:
    """name -> the newest cache file defining `def name(` (its own kernel file, else an output code file)."""
    wanted = {f"def {name}(": name for name in names}
    found: dict[str, Path] = {}
    for path in sorted(root.rglob("*.py"), key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        for marker, name in wanted.items():
            if name not in found and marker in text:
                found[name] = path
        if len(found) == len(wanted):
            break
    return found


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("rows")
    ap.add_argument("out")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--family", default="elementwise", help="a kernel family of fastsft.profiling, or all")
    ap.add_argument("--cache", default=None, help="inductor's cache directory (default: torch's)")
    args = ap.parse_args(argv)
    lines = [line for line in Path(args.rows).read_text().splitlines() if line.strip()]
    rows = [json.loads(line) for line in lines]
    profiled = [r for r in rows if r.get("kernels")]
    if not profiled:
        raise SystemExit(f"{args.rows}: no row with a kernel list (run bench/step.py with --profile)")
    kernels = slowest(profiled[-1], args.family, args.top)
    sources = find_sources([k["name"] for k in kernels], Path(args.cache) if args.cache else cache_root())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for k in kernels:
        path = sources.get(k["name"])
        where = path.name if path else "not in the cache (not an inductor kernel, or compiled elsewhere)"
        print(f"{k['ms_per_step']:8.3f} ms  x{k['calls_per_step']:<5g} {k['name'][:90]}  <- {where}")
        if path:
            head = f"# {k['ms_per_step']:.3f} ms per step, {k['calls_per_step']:g} calls, from {path.name}\n"
            (out / f"{k['name'][:120]}.py").write_text(head + path.read_text(errors="replace"))


if __name__ == "__main__":
    main()
