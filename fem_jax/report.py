"""metrics.jsonl -> summary.md (markdown table) and PNG plots, per run and across runs; the
papers' result tables over many run folders.

    python -m fem_jax.report paper-table RUN_DIR... [--out DIR] [--no-plots]   (alias: tables)
    python -m fem_jax.report draws RUN_DIR      per round: rewarded, cut-off, tokens by advantage sign
    python -m fem_jax.report pairs RUN_DIR...   FEM: what each column trains on, per iteration
    python -m fem_jax.report summary RUN_DIR...      # rewrite summary.md and curves.png

A run folder is a folder with config.yaml and metrics.jsonl (written by fem_jax.loop); the
commands look for them recursively under the folders given. Row keys read: `step` when a
row has it (the EM policy gradient / GRPO step loop), else `iteration` (FEM); row 0 is the
base model. `test_accuracy` (None where not evaluated), `data_utilization`,
`acceptance_rate`, `reasoning_length_test`/`reasoning_length_trained` (words), `response_length_test` (tokens),
`reward_mean`, `train_loss`, `n_test` (the test-set size, optional).

How a run is scored (`run_score`):
- FEM (rows keyed by `iteration`): the highest test accuracy over iterations 1..K, as in
  Tables 1-5 of "Learning to Reason in LLMs by Expectation Maximization"; iteration 0 is the
  table's Base column, not a candidate for the best (RS scores below Base in several rows
  of Table 1, which a best over 0..K could not show).
- step loop (rows keyed by `step`): the mean of the last 10 evaluations after step 0, as in
  "Training LLMs to Reason via EM Policy Gradient", Section 5.2 (note below Tables 1-2: one
  evaluation every 5 steps).

The PPS-vs-STaR count (FEM paper, Section 4.2): a row is a win, a loss or a tie at the
table's precision (percent, two decimals); p = P(X >= wins) for X ~ Binomial(n, 1/2) with n
= ALL compared rows, ties counted as non-wins. That is the reading that reproduces both of
the paper's numbers: 22 of 25 -> p = 7.8e-5 (< 0.01), and 15 of 20 with 4 losses and a tie
-> p = 0.0207 ("about 0.02"); dropping the tie (n = 19) would give 0.0096.

Every file (text and PNG) goes through fem_jax.io's atomic writers: a unique temporary name
in its folder, renamed over the target, so several processes writing one folder never
collide; the last complete write wins.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import re
import sys
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Mapping, Sequence

from .io import atomic_write_bytes, atomic_write_text

LAST_EVALS = 10  # EMPG paper, Section 5.2: a table's score is the mean of the last 10 evaluations

# (key, header, format, always shown)
COLUMNS = [
    ("test_accuracy", "test acc", "{:.3f}", True),
    ("n_test", "n test", "{}", False),
    ("data_utilization", "utilization", "{:.3f}", True),
    ("acceptance_rate", "accept/draw", "{:.3f}", True),
    ("reward_mean", "reward", "{:.3f}", False),
    ("reasoning_length_trained", "len trained", "{:.1f}", True),
    ("reasoning_length_test", "len test", "{:.1f}", True),
    ("response_length_test", "tokens test", "{:.1f}", False),
    ("train_loss", "train loss", "{:.4f}", True),
    ("lr", "lr", "{:.2e}", True),
    ("seconds_estep", "E s", "{:.0f}", True),
    ("seconds_mstep", "M s", "{:.0f}", True),
    ("seconds_eval", "eval s", "{:.0f}", True),
]


class ReportError(ValueError):
    """Bad input (not a run folder, a malformed file); the message names the file and row."""


# ---------------------------------------------------------------- rows


def is_steps(rows: Sequence[Mapping]) -> bool:
    """Rows of the step loop carry `step`; FEM rows carry `iteration`."""
    return any("step" in r for r in rows)


def x_of(row: Mapping) -> int:
    return row["step"] if "step" in row else row["iteration"]


def evaluations(rows: Sequence[Mapping]) -> list[tuple[int, float]]:
    """(x, test accuracy) of the evaluated rows, in x order."""
    return sorted((x_of(r), r["test_accuracy"]) for r in rows if r.get("test_accuracy") is not None)


def base_score(rows: Sequence[Mapping]) -> float | None:
    """The base model's test accuracy (row 0)."""
    return next((a for x, a in evaluations(rows) if x == 0), None)


def run_score(rows: Sequence[Mapping]) -> float | None:
    """A run's table score (module docstring): FEM, the best over iterations 1..K; step loop,
    the mean of the last LAST_EVALS evaluations after step 0. None when nothing after 0 was evaluated."""
    trained = [a for x, a in evaluations(rows) if x >= 1]
    if not trained:
        return None
    if is_steps(rows):
        last = trained[-LAST_EVALS:]
        return sum(last) / len(last)
    return max(trained)


def mean_se(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and standard error (sample s.d. / sqrt(n)); no s.e. for one value."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def binomial_tail(wins: int, n: int) -> float:
    """P(X >= wins) for X ~ Binomial(n, 1/2), exact."""
    return float(Fraction(sum(math.comb(n, i) for i in range(wins, n + 1)), 2 ** n))


def headline(rows: Sequence[Mapping]) -> str:
    """One sentence: base -> best -> final test accuracy (and the step loop's table score)."""
    steps = is_steps(rows)
    what, unit = ("Test score", "step") if steps else ("Test accuracy", "iteration")
    evals = evaluations(rows)
    if not evals:
        return f"{what}: not evaluated yet."
    base = base_score(rows)
    trained = [(x, a) for x, a in evals if x >= 1]
    parts = [f"{what} {_pct(base)} (base)" if base is not None else f"{what}: no base evaluation"]
    if not trained:
        return parts[0] + "; no trained model evaluated yet."
    bx, ba = max(trained, key=lambda t: (t[1], -t[0]))  # the earliest best
    fx, fa = trained[-1]
    parts.append(f"best {_pct(ba)} at {unit} {bx}")
    parts.append(f"{_pct(fa)} at {unit} {fx}")
    text = " → ".join(parts)
    last_x = max(x_of(r) for r in rows)
    if last_x > fx:
        text += f" (last evaluated; the run reached {unit} {last_x})"
    if steps:
        last = [a for _, a in trained[-LAST_EVALS:]]
        text += f"; mean of the last {len(last)} evaluations {_pct(sum(last) / len(last))}"
    return text + "."


def _pct(v: float, digits: int = 1) -> str:
    return f"{100 * v:.{digits}f}%"


def _fmt(value, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return fmt.format(value)


def table(rows: Sequence[Mapping]) -> str:
    """The per-round markdown table; optional columns appear when some row has the key."""
    cols = [("step", "step", "{}") if is_steps(rows) else ("iteration", "iter", "{}")]
    cols += [(k, h, f) for k, h, f, always in COLUMNS if always or any(r.get(k) is not None for r in rows)]
    head = "| " + " | ".join(c[1] for c in cols) + " |"
    sep = "|" + "|".join("---:" for _ in cols) + "|"
    body = ["| " + " | ".join(_fmt(x_of(r) if k in ("step", "iteration") else r.get(k), f) for k, _, f in cols) + " |"
            for r in rows]
    return "\n".join([head, sep, *body])


# ---------------------------------------------------------------- one run: summary.md, curves.png


def config_line(folder: Path) -> str:
    """The run's seed and config: the file, a digest, and the settings that name the run."""
    path = Path(folder) / "config.yaml"
    if not path.exists():
        return ""
    raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()[:12]
    try:
        import yaml

        cfg = yaml.safe_load(raw)

        def g(section: str, key: str):
            part = cfg.get(section) if isinstance(cfg, dict) else None
            return part.get(key) if isinstance(part, dict) else None

        options = g("task", "options")
        metric = options.get("metric") if isinstance(options, dict) else None
        settings = " · ".join([
            f"seed {g('run', 'seed')}", f"model {g('model', 'path')}",
            f"task {g('task', 'name')}" + (f" ({metric})" if metric else ""),
            f"scheme {g('estep', 'scheme')} (budget {g('estep', 'budget')})", f"objective {g('mstep', 'objective')}",
            f"lr {g('mstep', 'lr_start')} → {g('mstep', 'lr_end')}", f"run.iterations {g('run', 'iterations')}"])
    except Exception as e:  # a summary must not fail over a config it only quotes
        settings = f"config.yaml unreadable ({type(e).__name__})"
    return f"Config: `{path}` (sha256 {digest}) · {settings}."


def write_summary(rows: Sequence[Mapping], out: Path, title: str = "") -> None:
    """summary.md (headline, config, per-round table) and curves.png in the run folder `out`."""
    out = Path(out)
    title = title or out.name
    cfg = config_line(out)
    text = (f"# {title}\n\n{headline(rows)}\n\n" + (f"{cfg}\n\n" if cfg else "")
            + f"{table(rows)}\n\n![curves](curves.png)\n")
    atomic_write_text(out / "summary.md", text)
    plot_run(rows, out / "curves.png", title)


def save_figure(fig, path: Path) -> None:
    """The PNG through fem_jax.io.atomic_write_bytes: a unique temporary sibling, then a rename."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(path, buf.getvalue())


# (title/y label, series [(key, legend, style)], y >= 0)
RUN_PANELS = [
    ("test accuracy", [("test_accuracy", None, "o-")], True),
    ("data utilization", [("data_utilization", "pairs kept", "o-"),
                          ("acceptance_rate", "accepted per draw", "s--")], True),
    ("mean train reward", [("reward_mean", None, "o-")], False),
    ("reasoning length (words)", [("reasoning_length_test", "test", "o-"),
                                  ("reasoning_length_trained", "trained on", "s--")], True),
    ("response length (tokens)", [("response_length_test", "test", "o-")], True),
    ("train loss", [("train_loss", None, "o-")], False),
]
ALWAYS = ("test accuracy", "train loss")


def _n_test(rows: Sequence[Mapping]) -> str:
    sizes = sorted({r["n_test"] for r in rows if r.get("n_test") is not None})
    if not sizes:
        return ""
    return f"test set: {sizes[0]} examples" if len(sizes) == 1 else f"test set: {sizes[0]}–{sizes[-1]} examples"


def _xaxis(ax, xs: Sequence[int]) -> None:
    """Integer ticks over [min x, max x] (at least one unit wide), the same on every panel."""
    from matplotlib.ticker import MaxNLocator

    lo, hi = min(xs), max(max(xs), min(xs) + 1)
    pad = max(0.3, 0.03 * (hi - lo))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.set_xlim(lo - pad, hi + pad)


def _yfrom0(ax) -> None:
    """y from 0 to the data's top plus a margin (autoscaling would leave none above)."""
    top = max((y for line in ax.get_lines() for y in line.get_ydata()), default=0.0)
    top = max([top] + [p.vertices[:, 1].max() for band in ax.collections for p in band.get_paths() if len(p.vertices)])
    ax.set_ylim(0, top * 1.06 if top > 0 else 1.0)


def run_figure(rows: Sequence[Mapping], title: str):
    """One run (the FEM paper's Figure 2 panels, plus train loss): every panel on the same
    x-range, from row 0 even where a panel has no value there."""
    from matplotlib.figure import Figure

    steps = is_steps(rows)
    panels = [p for p in RUN_PANELS if p[0] in ALWAYS or any(r.get(k) is not None for r in rows for k, _, _ in p[1])]
    fig = Figure(figsize=(3.3 * len(panels), 3.5), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    xs = [x_of(r) for r in rows] or [0]
    for ax, (label, series, nonneg) in zip(axes, panels):
        if steps and label == "test accuracy":
            label = "test score"
        drawn = 0
        for key, legend, style in series:
            pts = sorted((x_of(r), r[key]) for r in rows if r.get(key) is not None)
            if pts:
                ax.plot(*zip(*pts), style if len(pts) <= 40 else style.replace("o", "").replace("s", ""),
                        ms=4, label=legend)
                drawn += 1
        if not drawn:
            ax.text(0.5, 0.5, "not recorded yet", ha="center", va="center", transform=ax.transAxes, color="0.5")
        ax.set_ylabel(label)
        ax.set_xlabel("training step" if steps else "EM iteration")
        _xaxis(ax, xs)
        if nonneg and drawn:
            _yfrom0(ax)
        ax.grid(alpha=0.3)
        if drawn > 1:
            ax.legend(fontsize=8)
    size = _n_test(rows)
    fig.suptitle(title + (f" · {size}" if size else ""))
    return fig


def plot_run(rows: Sequence[Mapping], path: Path, title: str) -> None:
    save_figure(run_figure(rows, title), path)


# ---------------------------------------------------------------- across seeds: compare


def compare(results: Mapping[str, Mapping[int, Sequence[Mapping]]], out: Path) -> str:
    """results[scheme or objective][seed] = metric rows. Writes comparison.md (base and
    `run_score` per column: mean ± standard error over seeds) and comparison.png; returns the table."""
    steps = any(is_steps(rows) for by_seed in results.values() for rows in by_seed.values())
    score = f"mean of the last {LAST_EVALS} evaluations" if steps else "best test acc, iterations ≥ 1"
    lines = [f"| {'objective' if steps else 'scheme'} | base (mean) | {score} (mean ± s.e.) | seeds | per seed "
             "| minutes per run |", "|---|---:|---:|---:|---|---:|"]
    for name, by_seed in results.items():
        bases = [b for b in (base_score(rows) for rows in by_seed.values()) if b is not None]
        scores = {seed: run_score(rows) for seed, rows in by_seed.items()}
        got = [s for s in scores.values() if s is not None]
        base = f"{sum(bases) / len(bases):.3f}" if bases else "–"
        per = ", ".join(f"{seed}: {_fmt(s, '{:.3f}')}" for seed, s in scores.items())
        if got:
            m, se = mean_se(got)
            cell = f"{m:.3f}" + (f" ± {se:.3f}" if se is not None else "")  # one seed has no spread
        else:
            cell = "–"
        minutes = [m for m in (run_minutes(rows) for rows in by_seed.values()) if m is not None]
        wall = f"{sum(minutes) / len(minutes):.1f}" if minutes else "–"
        lines.append(f"| {name} | {base} | {cell} | {len(got)} | {per} | {wall} |")
    text = "\n".join(lines)
    atomic_write_text(Path(out) / "comparison.md", "# Comparison\n\n" + text + "\n")
    save_figure(comparison_figure(results), Path(out) / "comparison.png")
    return text


def run_minutes(rows: Sequence[Mapping]) -> float | None:
    """A run's wall time in minutes from its metrics: the base evaluation and every round
    (E-step, M-step, sync, evaluation; not the process start), None if a round lacks it."""
    secs = [r.get("seconds_round") if r.get("round", r.get("iteration", r.get("step"))) else r.get("seconds_eval")
            for r in rows]
    return sum(secs) / 60 if secs and all(isinstance(x, (int, float)) for x in secs) else None


COMPARE_PANELS = [
    ("test_accuracy", "test accuracy"),
    ("data_utilization", "data utilization"),
    ("reward_mean", "mean train reward"),
    ("reasoning_length_test", "reasoning length (words)"),
    ("response_length_test", "response length (tokens)"),
]
MARKERS = "osD^v<>ph*"


def comparison_figure(results: Mapping[str, Mapping[int, Sequence[Mapping]]], title: str = ""):
    """Mean over seeds per scheme/objective with a shaded ± s.e. band, one panel per recorded
    quantity (the FEM paper's Figure 2; the EMPG paper's Figures 3-10 for step loops); a
    quantity that is never negative (accuracy, utilization, length) starts at 0 and its band
    is clipped there. Curves that coincide stay visible: each column has its own marker shape
    (hollow every other one) and, over FEM iterations, a small x offset."""
    import numpy as np
    from matplotlib.figure import Figure

    all_rows = [r for by_seed in results.values() for rows in by_seed.values() for r in rows]
    steps = is_steps(all_rows)
    panels = [(k, lab) for k, lab in COMPARE_PANELS
              if k == "test_accuracy" or any(r.get(k) is not None for r in all_rows)]
    if any(r.get("response_length_test") is not None for r in all_rows):  # tokens beat words where both exist
        panels = [p for p in panels if p[0] != "reasoning_length_test"]
    fig = Figure(figsize=(4.2 * len(panels), 3.6), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    xs_all = [x_of(r) for r in all_rows] or [0]
    span = max(xs_all) - min(xs_all)
    n = len(results)
    for ax, (key, label) in zip(axes, panels):
        if steps and key == "test_accuracy":
            label = "test score"
        # a quantity that cannot be negative is drawn from 0, its band clipped at 0
        nonneg = all(r[key] >= 0 for r in all_rows if r.get(key) is not None)
        for j, (name, by_seed) in enumerate(results.items()):
            by_x: dict[int, list[float]] = {}
            for rows in by_seed.values():
                for r in rows:
                    if r.get(key) is not None:
                        by_x.setdefault(x_of(r), []).append(r[key])
            if not by_x:
                continue
            xs = np.array(sorted(by_x), dtype=float)
            stats = [mean_se(by_x[x]) for x in sorted(by_x)]
            means = np.array([m for m, _ in stats])
            ses = np.array([s or 0.0 for _, s in stats])
            offset = 0.0 if steps else (j - (n - 1) / 2) * min(0.12, 0.45 / max(n, 1)) * max(1, span / 5)
            many = len(xs) > 40
            ax.plot(xs + offset, means, "-", marker=MARKERS[j % len(MARKERS)], ms=3 if many else 6,
                    markevery=max(1, len(xs) // 20) if many else None, mfc="none" if j % 2 else None,
                    alpha=0.85, label=name)
            low = np.clip(means - ses, 0, None) if nonneg else means - ses
            ax.fill_between(xs + offset, low, means + ses, alpha=0.15)
        ax.set_xlabel("training step" if steps else "EM iteration")
        ax.set_ylabel(label)
        _xaxis(ax, xs_all)
        if nonneg:
            _yfrom0(ax)
        ax.grid(alpha=0.3)
    if results:
        axes[0].legend(fontsize=8)
    seeds = sorted({s for by_seed in results.values() for s in by_seed})
    fig.suptitle((title + " · " if title else "") + f"mean ± s.e. over seeds {', '.join(map(str, seeds))}",
                 fontsize=10)
    return fig


# ---------------------------------------------------------------- run folders


@dataclass
class Run:
    folder: Path
    rows: list[dict]
    model: str
    task: str
    metric: str
    scheme: str
    budget: int | None
    objective: str
    restart: bool
    seed: int
    iterations: int | None
    trainer: str = "fem_jax"
    column: str = ""
    reject_leaks: bool = False  # estep.reject_hint_leaks
    options: dict | None = None  # task.options, less the split sizes and the metric
    variant: str = ""  # what sets its task apart from others of the same name in a table (_variants)

    @property
    def steps(self) -> bool:
        return is_steps(self.rows)


def find_runs(paths: Sequence[str | Path]) -> list[Path]:
    """Run folders (config.yaml + metrics.jsonl) at or below each path, sorted, without
    descending into a run (its iter_k/ and checkpoints/)."""
    found: dict[Path, None] = {}
    for p in map(Path, paths):
        if not p.exists():
            raise ReportError(f"{p}: no such folder")
        if not p.is_dir():
            raise ReportError(f"{p}: not a folder (give run folders or folders that contain them)")
        for root, dirs, files in os.walk(p):
            if "config.yaml" in files and "metrics.jsonl" in files:
                found[Path(root).resolve()] = None
                dirs[:] = []
            else:
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    return sorted(found)


def read_runs(paths: Sequence[str | Path]) -> list["Run"]:
    """Every run folder at or below `paths` (find_runs), read; an error when there is none."""
    folders = find_runs(paths)
    if not folders:
        raise ReportError(f"no run folders (config.yaml + metrics.jsonl) under {', '.join(map(str, paths))}")
    return [read_run(f) for f in folders]


def _need(cfg: Mapping, dotted: str, path: Path, types=(str,)):
    node = cfg
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise ReportError(f"{path}: missing {dotted}")
        node = node[part]
    if not isinstance(node, types) or isinstance(node, bool) and bool not in types:
        raise ReportError(f"{path}: {dotted} is {node!r}, not a {types[0].__name__}")
    return node


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl, checked row by row; an error names the file and line."""
    rows = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise ReportError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(r, dict):
            raise ReportError(f"{path}:{n}: a row must be a JSON object, got {type(r).__name__}")
        key = "step" if "step" in r else "iteration"
        if not isinstance(r.get(key), int) or isinstance(r.get(key), bool) or r[key] < 0:
            raise ReportError(f"{path}:{n}: needs an integer 'step' or 'iteration' >= 0, got {r.get(key)!r}")
        for k in ("test_accuracy", "data_utilization", "train_loss", "n_test"):
            v = r.get(k)
            if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool)):
                raise ReportError(f"{path}:{n}: {k!r} is {v!r}, not a number")
        rows.append(r)
    if not rows:
        raise ReportError(f"{path}: no rows")
    return rows


def read_run(folder: Path) -> Run:
    import yaml

    folder = Path(folder)
    cpath = folder / "config.yaml"
    try:
        cfg = yaml.safe_load(cpath.read_text())
    except yaml.YAMLError as e:
        raise ReportError(f"{cpath}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(cfg, dict):
        raise ReportError(f"{cpath}: not a mapping of config sections")

    def section(*keys) -> dict:
        node = cfg
        for k in keys:
            node = node.get(k) if isinstance(node, dict) else None
        return node if isinstance(node, dict) else {}

    budget, iterations = section("estep").get("budget"), section("run").get("iterations")
    return Run(folder=folder, rows=read_metrics(folder / "metrics.jsonl"),
               model=Path(_need(cfg, "model.path", cpath)).name, task=_need(cfg, "task.name", cpath),
               metric=str(section("task", "options").get("metric") or ""),
               scheme=_need(cfg, "estep.scheme", cpath), budget=budget if isinstance(budget, int) else None,
               objective=str(section("mstep").get("objective") or ""),
               restart=bool(section("mstep").get("restart_from_base")), seed=_need(cfg, "run.seed", cpath, (int,)),
               iterations=iterations if isinstance(iterations, int) else None,
               trainer=str(section("run").get("trainer") or "fem_jax"),
               reject_leaks=bool(section("estep").get("reject_hint_leaks")),
               options={k: v for k, v in section("task", "options").items() if k not in _SPLIT_OPTIONS})


# task options that do not make a different task: the split sizes (n_test shows in the
# tables' n) and the metric (a row of its own)
_SPLIT_OPTIONS = ("n_train", "n_test", "metric")


# ---------------------------------------------------------------- the papers' tables

NAMES = {"rs": "RS", "star": "STaR", "pps": "PPS", "empg": "EMPG", "grpo": "GRPO", "fem": "FEM"}
FAMILY = ["rs", "star", "pps", "empg", "grpo"]


def _columns(runs: list[Run]) -> None:
    """A FEM run's column is its E-step scheme (RS with its budget M when the set has several
    budgets, as in Table 3; PPS with its budget when M > 1, our ablation; `+restart` for STaR
    restarted from the base model, `+noleaks` for hinted draws that repeat the hint
    rejected); another objective's column is the objective. Then `_variants`."""
    budgets = {r.budget for r in runs if not r.steps and r.scheme == "rs"}
    for r in runs:
        if r.steps:  # a policy-gradient step loop: its column is the objective
            r.column = r.objective + ("-trl" if r.trainer == "trl" else "")  # TRL's trainer: its own column
        else:
            r.column = r.scheme + (f"-{r.budget}" if r.scheme == "rs" and len(budgets) > 1
                                   or r.scheme.startswith("pps") and (r.budget or 1) > 1 else "")
            r.column += "+restart" if r.restart else ""
            r.column += "+noleaks" if r.reject_leaks else ""
    _variants(runs)


def _variants(runs: list[Run]) -> None:
    """Runs of one model, task name and metric whose task options differ (sums of three
    numbers beside the default's two or three) are rows of their own, labelled by the
    options that differ: "operands=3" (a run without the option: "operands default")."""
    groups: dict[tuple, list[Run]] = {}
    for r in runs:
        groups.setdefault((r.steps, r.model, r.task, r.metric), []).append(r)
    for group in groups.values():
        keys = sorted({k for r in group for k in (r.options or {})})
        differ = [k for k in keys if len({json.dumps((r.options or {}).get(k), sort_keys=True) for r in group}) > 1]
        for r in group:
            opts = r.options or {}
            r.variant = ", ".join(f"{k}={opts[k]}" if k in opts else f"{k} default" for k in differ)


def _column_order(name: str):
    m = re.match(r"([a-z]+)(.*)", name)
    fam, rest = (m.group(1), m.group(2)) if m else (name, "")
    num = re.match(r"-?(\d+)", rest)
    return (FAMILY.index(fam) if fam in FAMILY else len(FAMILY), fam, int(num.group(1)) if num else -1, rest)


def column_label(name: str) -> str:
    """rs-3 -> RS-3 (Table 3), pps2 -> PPS2 (Table 4's wording), pps-2 -> PPS (M=2) (our
    ablation, apart from PPS2), star+restart -> STaR+restart, pps+noleaks -> PPS (no leaks)."""
    m = re.match(r"([a-z]+)(.*)", name)
    if not m:
        return name
    fam, rest = m.groups()
    notes = []
    if fam == "pps" and (b := re.match(r"(\d*)-(\d+)(.*)", rest)):
        rest, notes = b.group(1) + b.group(3), [f"M={b.group(2)}"]
    if rest.endswith("+noleaks"):
        rest, notes = rest[:-len("+noleaks")], notes + ["no leaks"]
    return (NAMES.get(fam, fam.upper()) + rest.upper().replace("+RESTART", "+restart").replace("-TRL", " (TRL)")
            + (f" ({', '.join(notes)})" if notes else ""))


def _metric_order(task: str, metric: str):
    try:
        from .tasks import TASKS

        known = list(getattr(TASKS.get(task), "metrics", ()))
    except Exception:  # the table does not need the task code
        known = []
    return (known.index(metric) if metric in known else len(known), metric)


def _stat(per_seed: Mapping[int, float]) -> dict:
    vals = [per_seed[s] for s in sorted(per_seed)]
    m, se = mean_se(vals)
    return {"mean": m, "se": se, "n": len(vals), "seeds": sorted(per_seed), "per_seed": dict(sorted(per_seed.items()))}


def paper_tables(runs: list[Run]) -> dict:
    """The numbers of the paper tables: one FEM table per task (rows model × metric, columns
    Base and the schemes) and one step-loop table (rows model × task, columns the objectives)."""
    _columns(runs)
    warnings: list[str] = []
    cells: dict[tuple, dict[tuple, dict[str, dict[int, float]]]] = {}  # table -> row -> column -> seed -> score
    bases: dict[tuple, dict[tuple, dict[int, list[float]]]] = {}
    owner: dict[tuple, Path] = {}
    for r in runs:
        tkey = ("steps",) if r.steps else ("iterations", r.task)
        rkey = (r.model, r.task, r.metric, r.variant)
        cell = (tkey, rkey, r.column, r.seed)
        if cell in owner:
            raise ReportError(f"{r.folder} and {owner[cell]}: two runs of {r.model} · {r.task} {r.metric} "
                              f"{r.variant} · "
                              f"{r.column} · seed {r.seed}; give only one of them")
        owner[cell] = r.folder
        b = base_score(r.rows)
        if b is not None:
            bases.setdefault(tkey, {}).setdefault(rkey, {}).setdefault(r.seed, []).append(b)
        s = run_score(r.rows)
        last = max(x_of(row) for row in r.rows)
        if s is None:
            warnings.append(f"{r.folder}: no test accuracy after {'step' if r.steps else 'iteration'} 0; left out")
            continue
        cells.setdefault(tkey, {}).setdefault(rkey, {}).setdefault(r.column, {})[r.seed] = s
        if r.iterations is not None and last < r.iterations:
            warnings.append(f"{r.folder}: {last} of {r.iterations} {'steps' if r.steps else 'iterations'} done "
                            "(the score so far)")
        n_eval = sum(1 for x, _ in evaluations(r.rows) if x >= 1)
        if r.steps and n_eval < LAST_EVALS:
            warnings.append(f"{r.folder}: {n_eval} evaluations after step 0, fewer than {LAST_EVALS}: "
                            "the score is their mean")
    tables = []
    for tkey in sorted(set(cells) | set(bases), key=lambda t: (t[0] == "steps", t[1:])):
        rows_ = cells.get(tkey, {})
        columns = sorted({c for row in rows_.values() for c in row}, key=_column_order)
        seeds = sorted({s for row in rows_.values() for col in row.values() for s in col})
        out_rows = []
        rkeys = sorted(set(rows_) | set(bases.get(tkey, {})), key=lambda k: (k[0], k[1], _metric_order(k[1], k[2]), k[3]))
        for rkey in rkeys:
            # a row of a task variant (an ablation) shows only the columns it ran: no warning for the others
            variant_rows = any(k[:3] == rkey[:3] and k != rkey for k in rkeys)
            per_seed_base = {s: sum(v) / len(v) for s, v in bases.get(tkey, {}).get(rkey, {}).items()}
            row = {"model": rkey[0], "task": rkey[1], "metric": rkey[2], "variant": rkey[3],
                   "base": _stat(per_seed_base) if per_seed_base else None,
                   "cells": {c: _stat(rows_[rkey][c]) for c in columns if c in rows_.get(rkey, {})}}
            for c in columns:
                got = row["cells"].get(c, {}).get("seeds", [])
                if got != seeds and not (variant_rows and not got):
                    missing = sorted(set(seeds) - set(got))
                    where = " ".join(x for x in rkey[1:] if x)
                    warnings.append(f"{rkey[0]} · {where} · {column_label(c)}: "
                                    f"seeds {', '.join(map(str, got)) or 'none'}"
                                    + (f" (missing {', '.join(map(str, missing))})" if missing else ""))
            out_rows.append(row)
        table_ = {"kind": tkey[0], "task": tkey[1] if len(tkey) > 1 else None, "columns": columns,
                  "seeds": seeds, "rows": out_rows, "comparisons": [], "paired": []}
        if tkey[0] == "iterations":
            for suffix in sorted({re.sub(r"^pps", "", c) for c in columns if c.startswith("pps")}):
                a, b = "pps" + suffix, "star" + suffix
                if b in columns:
                    table_["comparisons"].append(win_count(out_rows, a, b))
                    table_["paired"] += paired(out_rows, a, b)
                else:  # an ablation of PPS (more tries, leaks rejected): against STaR and the paper's PPS
                    table_["paired"] += [x for ref in ("star", "pps") if ref in columns for x in paired(out_rows, a, ref)]
        else:  # every pair of objectives, in the table's column order
            for i, a in enumerate(columns):
                for b in columns[i + 1:]:
                    table_["paired"] += paired(out_rows, a, b)
        tables.append(table_)
    return {"tables": tables, "warnings": warnings, "runs": [str(r.folder) for r in runs],
            "score": {"iterations": "highest test accuracy over iterations 1..K (iteration 0 is Base)",
                      "steps": f"mean of the last {LAST_EVALS} evaluations after step 0"},
            "scale": "fraction (the markdown shows FEM tables in percent)"}


def win_count(rows: Sequence[Mapping], a: str, b: str) -> dict:
    """Rows where column a beats b, loses, or ties at the table's precision (percent, two
    decimals), and the one-sided p-value P(X >= wins | n = compared rows, 1/2): ties count
    as non-wins, the convention that reproduces the FEM paper's p ≈ 0.02 (15 wins, 4 losses,
    1 tie; see the module docstring)."""
    wins = losses = ties = 0
    for row in rows:
        ca, cb = row["cells"].get(a), row["cells"].get(b)
        if ca is None or cb is None:
            continue
        pa, pb = round(100 * ca["mean"], 2), round(100 * cb["mean"], 2)
        wins += pa > pb
        losses += pa < pb
        ties += pa == pb
    n = wins + losses + ties
    return {"a": a, "b": b, "wins": wins, "losses": losses, "ties": ties, "n": n,
            "p_value": binomial_tail(wins, n) if n else None}


def paired(rows: Sequence[Mapping], a: str, b: str) -> list[dict]:
    """Column a against column b in each row, paired by seed (the same seed gives both arms
    the same start, data order and first draws): the per-seed differences a - b, their mean
    and standard error, and the two-sided paired t-test's p-value (df = seeds - 1; None
    below two seeds or when every difference is equal)."""
    out = []
    for row in rows:
        ca, cb = row["cells"].get(a), row["cells"].get(b)
        if ca is None or cb is None:
            continue
        seeds = sorted(set(ca["per_seed"]) & set(cb["per_seed"]))
        if not seeds:
            continue
        d = [ca["per_seed"][s] - cb["per_seed"][s] for s in seeds]
        m, se = mean_se(d)
        p = None
        if se:
            from scipy import stats  # a dependency of jax

            p = float(2 * stats.t.sf(abs(m / se), len(d) - 1))
        out.append({"model": row["model"], "task": row["task"], "metric": row["metric"],
                    "variant": row.get("variant", ""), "a": a, "b": b,
                    "seeds": seeds, "diff_per_seed": dict(zip(seeds, d)), "diff_mean": m, "diff_se": se,
                    "p_value": p})
    return out


def _scale(pct: bool) -> tuple[int, int]:
    """(factor, decimals) of a table's numbers: FEM tables in percent, step-loop tables as fractions."""
    return (100, 2) if pct else (1, 3)


def _row_label(row: Mapping, fem: bool) -> str:
    """A table row's second column: the metric (FEM), the task and its metric (step loop), and
    the task options that set the row apart from others of the same task (`_variants`)."""
    label = (row["metric"] or "") if fem else row["task"] + (f" ({row['metric']})" if row["metric"] else "")
    variant = row.get("variant") or ""
    return " · ".join(x for x in (label, variant) if x) or "–"


def _cell(stat: Mapping | None, pct: bool, common_n: int) -> str:
    if stat is None:
        return "–"
    scale, digits = _scale(pct)
    text = f"{scale * stat['mean']:.{digits}f}"
    if stat["se"] is not None:
        text += f" ± {scale * stat['se']:.{digits}f}"
    if stat["n"] != common_n:
        text += f" (n={stat['n']})"
    return text


def render_tables(data: Mapping) -> str:
    out = []
    for t in data["tables"]:
        fem = t["kind"] == "iterations"
        cols = t["columns"]
        ns = [c["n"] for row in t["rows"] for c in row["cells"].values()]
        common = max(set(ns), key=ns.count) if ns else 0
        if fem:
            out.append(f"## {t['task']}: highest test accuracy over iterations 1..K (%)\n")
            head = ["Model", "Metric", "Base", *map(column_label, cols)]
        else:
            out.append(f"## Step loop: mean of the last {LAST_EVALS} evaluations after step 0\n")
            head = ["Model", "Task", "Base", *map(column_label, cols)]
        out.append("| " + " | ".join(head) + " |")
        out.append("|---|---|" + "---:|" * (len(head) - 2))
        for row in t["rows"]:
            out.append("| " + " | ".join([row["model"], _row_label(row, fem), _cell(row["base"], fem, common),
                                          *(_cell(row["cells"].get(c), fem, common) for c in cols)]) + " |")
        seeds = ", ".join(map(str, t["seeds"]))
        out.append(f"\nMean ± standard error over seeds ({seeds}; n = {common} per cell unless marked). "
                   "Base: the base model's evaluation (row 0), averaged per seed over that seed's runs, "
                   "then over seeds.")
        for c in t["comparisons"]:
            la, lb = column_label(c["a"]), column_label(c["b"])
            out.append(f"\n{la} vs {lb}: {la} higher in {c['wins']} of {c['n']} rows, {lb} in {c['losses']}, "
                       f"tied in {c['ties']}; one-sided binomial p = P(X ≥ {c['wins']} | n = {c['n']}, 1/2) = "
                       f"{_p(c['p_value'])} (ties count as non-wins, as in the FEM paper, Section 4.2).")
        if t.get("paired"):
            (scale, digits), unit = _scale(fem), " points" if fem else ""
            out.append("\nPaired by seed (difference of the two columns' scores per seed; mean ± s.e.; "
                       "two-sided paired t-test, df = seeds - 1):\n")
            for c in t["paired"]:
                label = _row_label(c, fem)
                where = c["model"] + " · " + (c["task"] if label == "–" else label)
                se = f" ± {scale * c['diff_se']:.{digits}f}" if c["diff_se"] is not None else ""
                per = ", ".join(f"{s}: {scale * v:+.{digits}f}" for s, v in c["diff_per_seed"].items())
                out.append(f"- {where}: {column_label(c['a'])} − {column_label(c['b'])} = "
                           f"{scale * c['diff_mean']:+.{digits}f}{se}{unit} ({per}); p = {_p(c['p_value'])}")
        out.append("")
    if data["warnings"]:
        out.append("## Warnings\n")
        out += [f"- {w}" for w in data["warnings"]]
        out.append("")
    return "\n".join(out)


def _p(p: float | None) -> str:
    return "–" if p is None else f"{p:.2g}"


def paper_table(paths: Sequence[str | Path], out: Path | None = None, plots: bool = True) -> tuple[str, dict]:
    """Read the run folders under `paths`, return (markdown, numbers); with `out`, write
    table.md, table.json and one comparison figure per table row over its columns and seeds:
    curves-MODEL-TASK[-METRIC].png (FEM), steps-MODEL-TASK[-METRIC].png (step loop)."""
    runs = read_runs(paths)
    data = paper_tables(runs)
    text = render_tables(data)
    if out is not None:
        out = Path(out)
        atomic_write_text(out / "table.md", "# Paper tables\n\n" + text)
        atomic_write_text(out / "table.json", json.dumps(data, indent=1) + "\n")
        if plots:
            groups: dict[tuple, dict[str, dict[int, list[dict]]]] = {}
            for r in runs:
                groups.setdefault((r.steps, r.model, r.task, r.metric, r.variant), {}).setdefault(r.column, {})[r.seed] = r.rows
            for (steps, *what), res in groups.items():
                res = dict(sorted(res.items(), key=lambda kv: _column_order(kv[0])))
                fig = comparison_figure({column_label(k): v for k, v in res.items()},
                                        title=" · ".join(x for x in what if x))
                name = re.sub(r"[^A-Za-z0-9._-]+", "_", "-".join(x for x in what if x))
                save_figure(fig, out / f"{'steps' if steps else 'curves'}-{name}.png")
    return text, data


# ---------------------------------------------------------------- CLI


def _title(run: Run) -> str:
    what = run.column or (run.objective if run.steps else run.scheme)
    return (f"{what} · seed {run.seed} · {run.model} · {run.task}" + (f" ({run.metric})" if run.metric else "")
            + (f" [{run.variant}]" if run.variant else ""))


# ---------------------------------------------------------------- what a run's draws hold


def draw_table(folder: Path) -> str:
    """Per round of a run folder, from its rollouts.jsonl (or a TRL arm's draws.jsonl): draws,
    rewarded share, share cut at the token limit, mean tokens of all draws, of those above
    their draw batch's mean reward (a positive advantage in GRPO and EMPG) and of those below
    it (negative): where the first is longer, the update favours longer answers; and the share
    of draws in a flat batch (all its draws equally rewarded): GRPO gives them no advantage,
    a batch-wide baseline (EMPG's) does."""
    import json

    from .estep import read_draws

    folder = Path(folder)
    rounds = sorted((int(d.name.split("_")[1]), d) for d in folder.glob("*_*")
                    if d.is_dir() and d.name.split("_")[-1].isdigit() and d.name.split("_")[0] in ("iter", "step"))
    lines = ["| round | draws | rewarded | cut at limit | tokens | tokens, A > 0 | tokens, A < 0 | in a flat batch |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for k, d in rounds:
        if (d / "rollouts.jsonl").exists():
            rows = [(x.batch, x.reward, len(x.token_ids), x.finish_reason == "length")
                    for x in read_draws(d / "rollouts.jsonl")]
        elif (d / "draws.jsonl").exists():  # a TRL arm: its batches are the prompts' runs of equal ids
            raw = [json.loads(x) for x in (d / "draws.jsonl").read_text().splitlines() if x.strip()]
            rows = [(x["example_id"], x["reward"], x["tokens"], None) for x in raw]
        else:
            continue
        if not rows:
            continue
        groups: dict = {}
        for b, r, _, _ in rows:
            groups.setdefault(b, []).append(r)
        mean = {b: sum(v) / len(v) for b, v in groups.items()}
        pos = [n for b, r, n, _ in rows if r > mean[b]]
        neg = [n for b, r, n, _ in rows if r < mean[b]]
        cut = [c for *_, c in rows if c is not None]
        flat = sum(len(set(groups[b])) == 1 for b, *_ in rows) / len(rows)

        def avg(xs):
            return f"{sum(xs) / len(xs):.1f}" if xs else "–"

        lines.append(f"| {k} | {len(rows)} | {sum(r > 0 for _, r, _, _ in rows) / len(rows):.2f} | "
                     f"{f'{sum(cut) / len(cut):.2f}' if cut else '–'} | {avg([n for _, _, n, _ in rows])} | "
                     f"{avg(pos)} | {avg(neg)} | {flat:.2f} |")
    if len(lines) == 2:
        raise ReportError(f"{folder}: no rounds with draws (rollouts.jsonl or draws.jsonl)")
    return "\n".join(lines)


def pairs_table(paths: Sequence[str | Path]) -> str:
    """What FEM trains on, per table row and column (as paper-table groups the runs) and
    iteration, each a mean over the seeds' runs, from their rollouts.jsonl: the trained pairs,
    the share of them drawn with the hint, the share that repeats the hint (Task.hint_leaked),
    the share cut at the token limit, and their mean length in words."""
    from .estep import read_draws

    runs = [r for r in read_runs(paths) if not r.steps]
    if not runs:
        raise ReportError(f"no FEM run folders (config.yaml + metrics.jsonl) under {', '.join(map(str, paths))}")
    _columns(runs)
    cells: dict[tuple, dict[int, list[dict]]] = {}
    for r in runs:
        for d in sorted(r.folder.glob("iter_*/rollouts.jsonl")):
            k = int(d.parent.name.split("_")[1])
            trained = [x for x in read_draws(d) if x.trained]
            n = len(trained) or 1
            cells.setdefault((r.model, r.task, r.metric, r.variant, r.column), {}).setdefault(k, []).append({
                "pairs": len(trained), "hinted": sum(x.hinted for x in trained) / n,
                "leaked": sum(x.leaked for x in trained) / n,
                "cut": sum(x.finish_reason == "length" for x in trained) / n,
                "words": sum(len(x.completion.split()) for x in trained) / n})
    if not cells:
        raise ReportError(f"no rollouts.jsonl in the FEM runs under {', '.join(map(str, paths))}")
    lines = ["| model · task | column | iteration | seeds | pairs trained | from hinted draws | repeat the hint "
             "| cut at limit | words |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for key in sorted(cells, key=lambda k: (k[:4], _column_order(k[4]))):
        model, task, metric, variant, column = key
        where = f"{model} · " + " · ".join(x for x in (task, metric, variant) if x)
        for k, xs in sorted(cells[key].items()):
            def avg(f):
                return sum(x[f] for x in xs) / len(xs)
            lines.append(f"| {where} | {column_label(column)} | {k} | {len(xs)} | {avg('pairs'):.1f} | "
                         f"{avg('hinted'):.2f} | {avg('leaked'):.2f} | {avg('cut'):.2f} | {avg('words'):.1f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fem_jax.report", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("paper-table", aliases=["tables"], help="the FEM paper's Tables 1-2 (and the EMPG paper's) "
                       "over run folders: mean ± s.e. over seeds, PPS-vs-STaR win count and p-value")
    t.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders, or folders with run folders below them")
    t.add_argument("--out", type=Path, help="write table.md, table.json and the comparison figures here")
    t.add_argument("--no-plots", action="store_true", help="with --out: tables only")
    s = sub.add_parser("summary", help="rewrite summary.md and curves.png of each run folder from its metrics.jsonl")
    s.add_argument("runs", nargs="+", metavar="RUN_DIR")
    d = sub.add_parser("draws", help="per round of a run folder: rewarded and cut-off shares, mean tokens by "
                       "advantage sign (draws above or below their batch's mean reward)")
    d.add_argument("run", metavar="RUN_DIR")
    q = sub.add_parser("pairs", help="what FEM runs train on, per column and iteration (mean over seeds): pairs, "
                       "shares drawn with the hint, repeating it and cut at the limit, words")
    q.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders, or folders with run folders below them")
    args = p.parse_args(argv)
    try:
        if args.cmd == "draws":
            print(draw_table(Path(args.run)))
            return 0
        if args.cmd == "pairs":
            print(pairs_table(args.runs))
            return 0
        if args.cmd == "summary":
            for run in read_runs(args.runs):
                _columns([run])
                write_summary(run.rows, run.folder, title=_title(run))
                print(run.folder / "summary.md")
            return 0
        text, data = paper_table(args.runs, args.out, plots=not args.no_plots)
    except ReportError as e:
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return 2
    for w in data["warnings"]:
        print(f"warning: {w}", file=sys.stderr)
    print(text)
    if args.out:
        print(f"wrote {args.out / 'table.md'} and {args.out / 'table.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
