"""The end-of-run report: report.md with PNG plots of loss and throughput, from the run's own metrics.

matplotlib (Agg, no display) draws the plots; without it the report is written without them and says so.
"""

from __future__ import annotations

from pathlib import Path


def _plot(out: Path, name: str, series: list[tuple], ylabel: str) -> str:
    """One PNG of (label, xs, ys, style) lines against the step."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, xs, ys, style in series:
        ax.plot(xs, ys, style, label=label, lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name


def _plots(out: Path, history: list[dict], evals: list[dict]) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
    except ImportError:
        return []
    trained = [r for r in history if r["loss"] is not None]
    loss = [("train loss", [r["step"] for r in trained], [r["loss"] for r in trained], "-")]
    val = [(e["step"], e["val_loss"]) for e in evals if "val_loss" in e]
    if val:
        loss.append(("validation loss", [s for s, _ in val], [v for _, v in val], "o-"))
    steps = [r["step"] for r in history]
    speed = [("real tokens/s", steps, [r["tokens_per_s"] for r in history], "-"),
             ("supervised tokens/s", steps, [r["supervised_tokens_per_s"] for r in history], "-")]
    return [_plot(out, "loss.png", loss, "loss (nats per supervised token)"),
            _plot(out, "throughput.png", speed, "tokens per second")]


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
