"""The end-of-run report: report.md with PNG plots of loss and throughput, from the run's own metrics.

matplotlib (Agg, no display) draws the plots; without it the report is written without them and says so.
"""

from __future__ import annotations

from pathlib import Path


def _plots(out: Path, history: list[dict], evals: list[dict]) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    made = []
    steps = [r["step"] for r in history if r["loss"] is not None]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["loss"] for r in history if r["loss"] is not None], label="train loss", lw=1)
    val = [(e["step"], e["val_loss"]) for e in evals if "val_loss" in e]
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per supervised token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=110)
    plt.close(fig)
    made.append("loss.png")
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in history], [r["tokens_per_s"] for r in history], label="real tokens/s", lw=1)
    ax.plot([r["step"] for r in history], [r["supervised_tokens_per_s"] for r in history], label="supervised tokens/s",
            lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("tokens per second")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=110)
    plt.close(fig)
    made.append("throughput.png")
    return made


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def write_report(out: Path, summary: dict, history: list[dict], evals: list[dict]) -> Path:
    plots = _plots(out, history, evals)
    lines = ["# fastsft run report", ""]
    keys = ("steps", "final_loss", "tokens_per_s", "supervised_tokens_per_s", "mfu", "peak_memory_gib",
            "skipped_nonfinite", "skipped_oom", "recompiles", "truncated_conversations", "wall_time_s")
    lines += ["| | |", "| --- | --- |"] + [f"| {k} | {_fmt(summary.get(k))} |" for k in keys]
    before, after = summary.get("eval_before", {}), summary.get("eval_after", {})
    if after:
        lines += ["", "## Evaluation", "", "| metric | before | after |", "| --- | --- | --- |"]
        lines += [f"| {k} | {_fmt(before.get(k, ''))} | {_fmt(v)} |" for k, v in sorted(after.items())]
    lines += ["", "## Diagnostics", ""]
    lines += [f"- {w}" for w in summary.get("warnings", [])] or ["- nothing to report: no overfitting, forgetting, "
                                                                 "low supervised ratio or stopping problem seen"]
    if summary.get("samples"):
        lines += ["", "## Sample answers (teacher-forced, held out)", ""]
        for s in summary["samples"]:
            lines += [f"- **{s['task']}** ({'right' if s['right'] else 'wrong'}): {s['question']!r}",
                      f"  - model: `{s['answer']!r}`", f"  - reference: `{s['reference']!r}`"]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    else:
        lines += ["", "(plots need matplotlib)"]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
