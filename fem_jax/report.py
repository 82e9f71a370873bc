"""metrics.jsonl -> summary.md (markdown table) and PNG plots, per run and across runs."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

from .io import atomic_write_text

COLUMNS = [
    ("iteration", "iter", "{}"),
    ("test_accuracy", "test acc", "{:.3f}"),
    ("data_utilization", "utilization", "{:.3f}"),
    ("acceptance_rate", "accept/draw", "{:.3f}"),
    ("reasoning_length_kept", "len kept", "{:.1f}"),
    ("reasoning_length_test", "len test", "{:.1f}"),
    ("train_loss", "train loss", "{:.4f}"),
    ("lr", "lr", "{:.2e}"),
    ("seconds_estep", "E s", "{:.0f}"),
    ("seconds_mstep", "M s", "{:.0f}"),
    ("seconds_eval", "eval s", "{:.0f}"),
]


def _fmt(value, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return fmt.format(value)


def table(rows: Sequence[Mapping]) -> str:
    head = "| " + " | ".join(c[1] for c in COLUMNS) + " |"
    sep = "|" + "|".join("---:" for _ in COLUMNS) + "|"
    body = ["| " + " | ".join(_fmt(r.get(k), f) for k, _, f in COLUMNS) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def write_summary(rows: Sequence[Mapping], out: Path, title: str = "") -> None:
    out = Path(out)
    text = f"# {title or out.name}\n\n{table(rows)}\n"
    atomic_write_text(out / "summary.md", text)
    plot_run(rows, out / "curves.png", title or out.name)


def plot_run(rows: Sequence[Mapping], path: Path, title: str) -> None:
    """Accuracy, utilization and reasoning length against the iteration (the paper's Figure 2)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    panels = [("test_accuracy", "test accuracy"), ("data_utilization", "data utilization"),
              ("reasoning_length_test", "reasoning length (words)")]
    for ax, (key, label) in zip(axes, panels):
        pts = [(r["iteration"], r[key]) for r in rows if r.get(key) is not None]
        if key == "reasoning_length_test":
            kept = [(r["iteration"], r["reasoning_length_kept"]) for r in rows if r.get("reasoning_length_kept")]
            if kept:
                ax.plot(*zip(*kept), "s--", label="kept rationales")
        if pts:
            ax.plot(*zip(*pts), "o-", label="test" if key == "reasoning_length_test" else None)
        ax.set_xlabel("EM iteration")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(label)
        ax.grid(alpha=0.3)
        if key == "reasoning_length_test":
            ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def compare(results: Mapping[str, Mapping[int, Sequence[Mapping]]], out: Path) -> str:
    """results[scheme][seed] = metric rows. Writes comparison.md (best test accuracy per
    scheme, mean ± standard error over seeds) and comparison.png; returns the table."""
    lines = ["| scheme | best test acc (mean ± s.e.) | seeds | per seed |", "|---|---:|---:|---|"]
    for scheme, by_seed in results.items():
        best = [max(r["test_accuracy"] for r in rows if r.get("test_accuracy") is not None)
                for rows in by_seed.values()]
        n = len(best)
        mean = sum(best) / n
        per = ", ".join(f"{s}: {b:.3f}" for s, b in zip(by_seed, best))
        if n > 1:  # one seed has no spread to report
            se = math.sqrt(sum((b - mean) ** 2 for b in best) / (n - 1) / n)
            lines.append(f"| {scheme} | {mean:.3f} ± {se:.3f} | {n} | {per} |")
        else:
            lines.append(f"| {scheme} | {mean:.3f} | {n} | {per} |")
    text = "\n".join(lines)
    atomic_write_text(Path(out) / "comparison.md", "# Scheme comparison\n\n" + text + "\n")
    _plot_compare(results, Path(out) / "comparison.png")
    return text


def _plot_compare(results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for scheme, by_seed in results.items():
        its = sorted({r["iteration"] for rows in by_seed.values() for r in rows if r.get("test_accuracy") is not None})
        means, ses = [], []
        for it in its:
            vals = [r["test_accuracy"] for rows in by_seed.values() for r in rows
                    if r["iteration"] == it and r.get("test_accuracy") is not None]
            means.append(np.mean(vals))
            ses.append(np.std(vals, ddof=1) / np.sqrt(len(vals)) if len(vals) > 1 else 0.0)
        means, ses = np.array(means), np.array(ses)
        ax.plot(its, means, "o-", label=scheme)
        ax.fill_between(its, means - ses, means + ses, alpha=0.2)
    ax.set_xlabel("EM iteration")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
