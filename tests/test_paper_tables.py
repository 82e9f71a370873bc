"""`python -m fem_jax.report paper-table`: the FEM paper's Tables 1-2 and the EMPG paper's
Tables 1-2 over fake run folders with known numbers; the win count and its p-value against
the paper's own tables; the plots' axes; the CLI's one-line errors."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fem_jax import report

ROOT = Path(__file__).resolve().parents[1]
SEEDS = {257: 0.0, 521: 0.01, 1031: 0.02}  # each seed's offset: mean +0.01, s.e. 0.01 / sqrt(3)
SE = 0.01 / math.sqrt(3)
BASE = 0.55  # above every trained score: a best that counted iteration 0 would be 0.55+
BEST = {  # (model, metric) -> scheme -> best test accuracy of seed 257
    ("Model-A", "helpfulness"): {"rs": 0.20, "star": 0.40, "pps": 0.45},  # PPS wins
    ("Model-A", "correctness"): {"rs": 0.21, "star": 0.50, "pps": 0.50},  # tie
    ("Model-B", "helpfulness"): {"rs": 0.22, "star": 0.35, "pps": 0.30},  # STaR wins
    ("Model-B", "correctness"): {"rs": 0.23, "star": 0.30, "pps": 0.38},  # PPS wins
}


def write_run(folder: Path, rows, model="org/Model-A", task="helpsteer2", metric="helpfulness", scheme="pps",
              seed=257, objective="fem", budget=1, iterations=3, options=None, reject_hint_leaks=False):
    folder.mkdir(parents=True)
    options = {**({"metric": metric} if metric else {}), **(options or {})}
    cfg = {"model": {"path": model}, "task": {"name": task, "options": options},
           "estep": {"scheme": scheme, "budget": budget, "reject_hint_leaks": reject_hint_leaks},
           "mstep": {"objective": objective},
           "run": {"iterations": iterations, "seed": seed}}
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def fem_rows(base, best):
    return [{"iteration": 0, "test_accuracy": base, "n_test": 100},
            {"iteration": 1, "test_accuracy": best - 0.05, "data_utilization": 0.5},
            {"iteration": 2, "test_accuracy": best, "data_utilization": 0.6},
            {"iteration": 3, "test_accuracy": best - 0.02, "data_utilization": 0.7}]


@pytest.fixture
def sweep(tmp_path):
    """2 models x 2 metrics x 3 schemes x 3 seeds of FEM runs, in nested folders."""
    root = tmp_path / "sweep"
    for (model, metric), by_scheme in BEST.items():
        path = "org/Model-A" if model == "Model-A" else "/models/Model-B"
        for scheme, best in by_scheme.items():
            for seed, d in SEEDS.items():
                base = BASE + d + {"rs": -0.01, "star": 0.0, "pps": 0.01}[scheme]  # per seed, mean BASE + d
                write_run(root / model / metric / f"{scheme}_seed{seed}", fem_rows(base, best + d),
                          model=path, metric=metric, scheme=scheme, seed=seed)
    return root


def test_paper_table_means_standard_errors_base_and_win_count(sweep, tmp_path):
    text, data = report.paper_table([sweep], tmp_path / "out", plots=False)
    (t,) = data["tables"]
    assert t["kind"] == "iterations" and t["task"] == "helpsteer2" and t["columns"] == ["rs", "star", "pps"]
    assert t["seeds"] == [257, 521, 1031] and not data["warnings"]
    got = {(r["model"], r["metric"]): r for r in t["rows"]}
    assert [(r["model"], r["metric"]) for r in t["rows"]] == list(BEST)  # HelpSteer2's metric order
    for key, by_scheme in BEST.items():
        row = got[key]
        assert row["base"]["mean"] == pytest.approx(BASE + 0.01) and row["base"]["se"] == pytest.approx(SE)
        for scheme, best in by_scheme.items():
            cell = row["cells"][scheme]
            assert cell["mean"] == pytest.approx(best + 0.01), (key, scheme)  # iteration 0 (0.55+) not the best
            assert cell["se"] == pytest.approx(SE) and cell["n"] == 3 and cell["seeds"] == [257, 521, 1031]
    assert "| Model | Metric | Base | RS | STaR | PPS |" in text
    assert "| Model-A | helpfulness | 56.00 ± 0.58 | 21.00 ± 0.58 | 41.00 ± 0.58 | 46.00 ± 0.58 |" in text
    (c,) = t["comparisons"]
    assert (c["a"], c["b"], c["wins"], c["losses"], c["ties"], c["n"]) == ("pps", "star", 2, 1, 1, 4)
    assert c["p_value"] == pytest.approx(11 / 16)  # P(X >= 2 | 4, 1/2)
    assert "PPS higher in 2 of 4 rows, STaR in 1, tied in 1" in text and "= 0.69" in text
    assert (tmp_path / "out" / "table.md").read_text().endswith(text)
    assert json.loads((tmp_path / "out" / "table.json").read_text())["tables"][0]["comparisons"][0]["wins"] == 2


def test_missing_seed_is_marked_and_warned(sweep):
    import shutil

    shutil.rmtree(sweep / "Model-B" / "correctness" / "pps_seed1031")
    text, data = report.paper_table([sweep], plots=False)
    cell = data["tables"][0]["rows"][3]["cells"]["pps"]
    assert cell["n"] == 2 and cell["mean"] == pytest.approx(0.38 + 0.005)
    assert "(n=2)" in text
    assert any("Model-B · helpsteer2 correctness · PPS: seeds 257, 521 (missing 1031)" in w for w in data["warnings"])


# The PPS (second) and STaR (first) columns of the FEM paper's Table 1 (HelpSteer2) and Table 2
# (Summarize from Feedback), row by row (Table 2's repeated last line counted once).
TABLE1 = [(37.97, 36.73), (40.50, 43.73), (55.73, 67.95), (53.03, 53.99), (61.90, 61.85),
          (36.91, 37.71), (40.51, 43.91), (62.73, 67.55), (50.98, 51.60), (58.99, 59.04),
          (29.86, 30.91), (32.78, 33.01), (60.86, 65.52), (45.48, 47.99), (55.42, 55.63),
          (36.83, 37.63), (42.14, 43.73), (67.22, 71.42), (56.78, 57.26), (64.36, 66.11),
          (32.35, 33.25), (39.71, 39.73), (69.81, 69.18), (54.40, 54.66), (61.50, 61.71)]
TABLE2 = [(22.61, 22.61), (67.32, 71.37), (19.98, 21.12), (71.32, 73.04), (19.47, 20.01),
          (26.67, 32.71), (15.40, 16.54), (69.03, 72.90), (20.18, 20.64), (58.24, 66.14),
          (23.04, 24.75), (74.51, 76.26), (20.56, 20.93), (73.26, 72.50), (22.67, 24.00),
          (71.17, 74.22), (23.73, 22.19), (69.49, 69.20), (27.15, 26.47), (71.33, 76.66)]


def _paper_rows(pairs):
    return [{"cells": {"star": {"mean": s / 100}, "pps": {"mean": p / 100}}} for s, p in pairs]


def test_win_count_and_p_values_of_the_paper():
    t1 = report.win_count(_paper_rows(TABLE1), "pps", "star")
    assert (t1["wins"], t1["losses"], t1["ties"], t1["n"]) == (22, 3, 0, 25)
    assert t1["p_value"] < 0.01  # "the p-value of winning at least 22 times is less than 0.01"
    t2 = report.win_count(_paper_rows(TABLE2), "pps", "star")
    assert (t2["wins"], t2["losses"], t2["ties"], t2["n"]) == (15, 4, 1, 20)
    assert round(t2["p_value"], 2) == 0.02  # "about 0.02": n = 20, the tie a non-win
    assert report.binomial_tail(15, 19) < 0.01  # dropping the tie would not give the paper's 0.02
    near = report.win_count([{"cells": {"star": {"mean": 0.123449}, "pps": {"mean": 0.12341}}}], "pps", "star")
    assert near["ties"] == 1  # equal at the table's precision (12.34 vs 12.34) is a tie
    assert report.binomial_tail(22, 25) == pytest.approx(sum(math.comb(25, i) for i in range(22, 26)) / 2 ** 25)


def step_rows(final, length, every=5, steps=100):
    """Evaluations every `every` steps; the last 10 are final + (0..9) / 500 (mean final + 0.009)."""
    evals = list(range(0, steps + 1, every))
    acc = {x: 0.9 - i / 100 for i, x in enumerate(evals)}  # early evaluations are higher: excluded
    acc.update({x: final + i / 500 for i, x in enumerate(evals[-10:])})
    acc[0] = 0.05
    return [{"step": s, "iteration": s, "reward_mean": 0.1, "train_loss": 0.0,
             **({"test_accuracy": acc[s], "response_length_test": length, "n_test": 50} if s in acc else {})}
            for s in range(steps + 1)]


def test_step_loop_table_is_the_mean_of_the_last_10_evaluations(tmp_path):
    for obj, final in (("empg", 0.70), ("grpo", 0.60)):
        for seed, d in SEEDS.items():
            write_run(tmp_path / f"{obj}_{seed}", step_rows(final + d, 150.0), model="Qwen/Q-1.5B", task="gsm8k",
                      metric=None, scheme="rs", seed=seed, objective=obj)
    short = step_rows(0.5, 100.0, steps=20)  # 4 evaluations after step 0
    write_run(tmp_path / "short" / "empg", short, model="Qwen/Q-7B", task="gsm8k", metric=None, objective="empg",
              iterations=100)
    text, data = report.paper_table([tmp_path], plots=False)
    (t,) = data["tables"]
    assert t["kind"] == "steps" and t["columns"] == ["empg", "grpo"]
    row = next(r for r in t["rows"] if r["model"] == "Q-1.5B")
    assert row["cells"]["empg"]["mean"] == pytest.approx(0.709 + 0.01)
    assert row["cells"]["grpo"]["mean"] == pytest.approx(0.609 + 0.01)
    assert row["cells"]["grpo"]["se"] == pytest.approx(SE)
    assert row["base"]["mean"] == pytest.approx(0.05)
    assert "| Model | Task | Base | EMPG | GRPO |" in text
    assert "| Q-1.5B | gsm8k | 0.050 ± 0.000 | 0.719 ± 0.006 |" in text
    short_row = next(r for r in t["rows"] if r["model"] == "Q-7B")
    assert short_row["cells"]["empg"]["mean"] == pytest.approx(0.505)  # the mean of the 4 it has
    assert any("4 evaluations after step 0, fewer than 10" in w for w in data["warnings"])
    assert any("short/empg: 20 of 100 steps done" in w for w in data["warnings"])


def test_compare_excludes_iteration_0_from_the_best(tmp_path):
    rows = [{"iteration": 0, "test_accuracy": 0.50}, {"iteration": 1, "test_accuracy": 0.20},
            {"iteration": 2, "test_accuracy": 0.30}]
    text = report.compare({"rs": {257: rows}}, tmp_path)
    assert "| rs | 0.500 | 0.300 | 1 | 257: 0.300 |" in text


def _line_data(ax):
    return [(tuple(line.get_xdata()), tuple(line.get_ydata()), line.get_marker()) for line in ax.get_lines()]


def test_comparison_plot_stays_above_0_and_shows_identical_curves():
    rows = [{"iteration": i, "test_accuracy": a, "data_utilization": u}
            for i, (a, u) in enumerate([(0.02, None), (0.0, 0.0), (0.07, 0.05)])]
    zeros = [{"iteration": i, "test_accuracy": a} for i, a in enumerate([0.02, 0.0, 0.0])]
    # iteration 2: mean 0.07/3 minus its s.e. is -3.5e-18 in floating point: the band must be clipped
    results = {"pps": {1: rows, 2: zeros, 3: zeros}, "star": {1: rows, 2: zeros, 3: zeros}}  # identical curves
    fig = report.comparison_figure(results)
    for ax in fig.axes:
        assert ax.get_ylim()[0] == 0, ax.get_ylabel()
        for band in ax.collections:
            assert min(v[1] for p in band.get_paths() for v in p.vertices) >= 0
    (pps, star) = _line_data(fig.axes[0])
    assert pps[1] == star[1]  # the same means ...
    assert pps[0] != star[0] and pps[2] != star[2]  # ... drawn at shifted x with another marker


def test_run_curves_every_panel_labelled_on_one_x_range():
    rows = [{"iteration": 0, "test_accuracy": 0.05, "reasoning_length_test": 40.0, "n_test": 128},
            {"iteration": 1, "test_accuracy": 0.2, "data_utilization": 0.3, "train_loss": 1.2, "n_test": 128},
            {"iteration": 2, "test_accuracy": 0.3, "data_utilization": 0.4, "train_loss": 1.0, "n_test": 128}]
    fig = report.run_figure(rows, "pps · seed 257")
    labels = [ax.get_ylabel() for ax in fig.axes]
    assert all(labels) and "train loss" in labels and "data utilization" in labels
    lims = {ax.get_xlim() for ax in fig.axes}
    assert len(lims) == 1 and next(iter(lims))[0] < 0 < 2 < next(iter(lims))[1]
    assert "test set: 128 examples" in fig.get_suptitle()
    base_only = report.run_figure(rows[:1], "base")  # the loss panel is there before any M-step
    assert [ax.get_ylabel() for ax in base_only.axes][-1] == "train loss"


def test_summary_headline_and_config(tmp_path):
    rows = fem_rows(0.055, 0.367)
    rows[3]["test_accuracy"] = 0.352
    folder = write_run(tmp_path / "run", rows, seed=521)
    report.write_summary(rows, folder, title="pps · seed 521")
    text = (folder / "summary.md").read_text()
    assert "Test accuracy 5.5% (base) → best 36.7% at iteration 2 → 35.2% at iteration 3." in text
    assert "seed 521" in text and str(folder / "config.yaml") in text and "sha256 " in text
    (folder / "summary.md").unlink()
    assert report.main(["summary", str(tmp_path)]) == 0  # the CLI rewrites it from metrics.jsonl
    assert "→ best 36.7% at iteration 2" in (folder / "summary.md").read_text() and (folder / "curves.png").exists()
    steps = report.headline(step_rows(0.70, 10.0))
    assert steps.startswith("Test score 5.0% (base) → best 89.0% at step 5 → 71.8% at step 100;")
    assert "mean of the last 10 evaluations 70.9%." in steps


def test_writers_use_unique_temporary_names(tmp_path, monkeypatch):
    """Two processes writing one run folder must not share a temporary file (one rank's
    rename used to take the other's curves.png.tmp.png away: FileNotFoundError)."""
    moved = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (moved.append((Path(a), Path(b))), real(a, b)))
    rows = fem_rows(0.1, 0.2)
    report.plot_run(rows, tmp_path / "curves.png", "a")
    report.plot_run(rows, tmp_path / "curves.png", "b")
    (a, dst), (b, _) = moved
    assert a != b and a.parent == b.parent == tmp_path and dst == tmp_path / "curves.png"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png"]


def _cli(*args, capsys):
    code = report.main(list(map(str, args)))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_errors_are_one_line_with_exit_2(tmp_path, capsys):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    r = subprocess.run([sys.executable, "-m", "fem_jax.report", "paper-table", str(tmp_path / "empty")],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "no run folders (config.yaml + metrics.jsonl) under" in r.stderr

    code, _, err = _cli("tables", tmp_path / "nope", capsys=capsys)
    assert code == 2 and err.strip().endswith("nope: no such folder") and err.count("\n") == 1

    bad = write_run(tmp_path / "bad", fem_rows(0.1, 0.2))
    with open(bad / "metrics.jsonl", "a") as f:
        f.write('{"iteration": 4, "test_accuracy": "high"}\n')
    code, _, err = _cli("paper-table", bad, capsys=capsys)
    assert code == 2 and f"{bad.resolve() / 'metrics.jsonl'}:5: 'test_accuracy' is 'high', not a number" in err
    (bad / "metrics.jsonl").write_text('{"iteration": 0}\n{oops\n')
    code, _, err = _cli("paper-table", bad, capsys=capsys)
    assert code == 2 and "metrics.jsonl:2: not valid JSON" in err and err.count("\n") == 1

    cfg = write_run(tmp_path / "cfg", fem_rows(0.1, 0.2))
    (cfg / "config.yaml").write_text("task: {name: helpsteer2}\nrun: {seed: 1}\n")
    code, _, err = _cli("paper-table", cfg, capsys=capsys)
    assert code == 2 and "config.yaml: missing model.path" in err


def test_duplicate_runs_of_one_cell_are_refused(tmp_path, capsys):
    write_run(tmp_path / "a", fem_rows(0.1, 0.2))
    write_run(tmp_path / "copy" / "a", fem_rows(0.1, 0.25))
    code, _, err = _cli("paper-table", tmp_path, capsys=capsys)
    assert code == 2 and "two runs of Model-A" in err and "give only one of them" in err


def test_cli_writes_table_and_figures(sweep, tmp_path, capsys):
    import shutil

    for d in list((sweep / "Model-B").iterdir()):
        shutil.rmtree(d)  # keep it quick: one model's figures
    code, out, _ = _cli("paper-table", sweep, "--out", tmp_path / "out", capsys=capsys)
    assert code == 0 and "| Model-A | helpfulness |" in out
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["curves-Model-A-helpsteer2-correctness.png", "curves-Model-A-helpsteer2-helpfulness.png",
                     "table.json", "table.md"]


def test_step_loop_objectives_are_compared_paired_by_seed(tmp_path):
    """EMPG − GRPO per seed: +0.10, +0.04, +0.13; mean, s.e. and the two-sided paired t-test
    with df = 2, whose p has a closed form: 1 − |t| / sqrt(2 + t²)."""
    gaps = {257: 0.10, 521: 0.04, 1031: 0.13}
    for seed, gap in gaps.items():
        for obj, final in (("empg", 0.5 + gap), ("grpo", 0.5)):
            write_run(tmp_path / f"{obj}_{seed}", step_rows(final + seed / 1e5, 50.0), model="Qwen/Q-1.5B",
                      task="gsm8k", metric=None, scheme="rs", seed=seed, objective=obj)
    text, data = report.paper_table([tmp_path], plots=False)
    (c,) = data["tables"][0]["paired"]
    d = list(gaps.values())
    mean = sum(d) / 3
    se = math.sqrt(sum((x - mean) ** 2 for x in d) / 2 / 3)
    assert (c["a"], c["b"], c["seeds"]) == ("empg", "grpo", [257, 521, 1031])
    assert c["diff_mean"] == pytest.approx(mean) and c["diff_se"] == pytest.approx(se)
    t = mean / se
    assert c["p_value"] == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-6)
    assert f"EMPG − GRPO = +{mean:.3f} ± {se:.3f} (257: +0.100, 521: +0.040, 1031: +0.130); p = " in text


def _ablation_runs(root: Path) -> None:
    """The embedded default's STaR, PPS and two ablations of PPS (M = 2; leaks rejected), and
    STaR and PPS on a harder variant of the task (operands=3), each over three seeds; a cell's
    best of seed s is its value below + 0.01 × (its seed's index)."""
    arms = {"": {("star", 1, False): 0.38, ("pps", 1, False): 0.34, ("pps", 2, False): 0.36,
                 ("pps", 1, True): 0.40},
            "3": {("star", 1, False): 0.20, ("pps", 1, False): 0.25}}
    for operands, cells in arms.items():
        for (scheme, budget, no_leaks), best in cells.items():
            for i, seed in enumerate(SEEDS):
                name = f"{operands or 'default'}/{scheme}{budget}{no_leaks}_seed{seed}"
                write_run(root / name, fem_rows(0.05, best + (0.01 * i if scheme == "pps" else 0.005 * i * i)),
                          model="Model-A", task="arithmetic", metric=None, scheme=scheme, seed=seed, budget=budget,
                          options={"n_train": 192, "n_test": 128, **({"operands": 3} if operands else {})},
                          reject_hint_leaks=no_leaks)


def test_ablations_of_pps_are_columns_and_a_task_variant_is_a_row(tmp_path):
    _ablation_runs(tmp_path)
    text, data = report.paper_table([tmp_path], plots=False)
    (t,) = data["tables"]
    assert t["columns"] == ["star", "pps", "pps+noleaks", "pps-2"] and not data["warnings"]
    # the options that differ name the rows (n_train and n_test are alike, and never a variant)
    assert [r["variant"] for r in t["rows"]] == ["operands default", "operands=3"]
    assert "| Model | Metric | Base | STaR | PPS | PPS (no leaks) | PPS (M=2) |" in text
    assert "| Model-A | operands=3 | 5.00 ± 0.00 | 20.83 ± 0.60 | 26.00 ± 0.58 | – | – |" in text
    assert "PPS higher in 1 of 2 rows, STaR in 1" in text  # the variant is a row of its own
    got = {(p["variant"], p["a"], p["b"]): p for p in t["paired"]}
    v = "operands default"
    assert set(got) == {(v, "pps", "star"), ("operands=3", "pps", "star"), (v, "pps+noleaks", "star"),
                        (v, "pps+noleaks", "pps"), (v, "pps-2", "star"), (v, "pps-2", "pps")}
    assert got[(v, "pps-2", "pps")]["diff_mean"] == pytest.approx(0.02) and got[(v, "pps-2", "pps")]["p_value"] is None
    d = [0.05 + 0.01 * i - 0.005 * i * i for i in range(3)]  # PPS − STaR on operands=3, per seed
    assert got[("operands=3", "pps", "star")]["diff_mean"] == pytest.approx(sum(d) / 3)
    assert "- Model-A · operands=3: PPS − STaR = +5.17 ± 0.17 points" in text
    assert "- Model-A · operands default: PPS (M=2) − PPS = +2.00 ± 0.00 points" in text


def test_pairs_table_is_what_each_column_trains_on(tmp_path):
    """Trained pairs, their hinted, leaked and cut-off shares and words, mean over seeds."""
    from fem_jax.estep import Draw, write_draws
    from fem_jax.io import atomic_write_text

    _ablation_runs(tmp_path)

    def draw(i, hinted, leaked, accepted=True, cut=False):
        return Draw(f"e{i}", "pps", 0, hinted, "w " * (4 if leaked else 2), [1, 2], [0.0, 0.0],
                    "length" if cut else "stop", 1, 1.0, leaked, accepted, accepted, i)

    for i, seed in enumerate(SEEDS):  # STaR on the default task: seed i trains i + 2 pairs at iteration 1
        d = [draw(0, False, False), draw(1, True, True, cut=True)] + [draw(j, True, False) for j in range(i)]
        d.append(draw(9, True, False, accepted=False))
        folder = tmp_path / f"default/star1False_seed{seed}/iter_1"
        folder.mkdir()
        write_draws(folder / "rollouts.jsonl", d, 1, atomic_write_text)
    text = report.pairs_table([tmp_path])
    n = [2, 3, 4]  # pairs per seed; hinted shares 1/2, 2/3, 3/4; one leaked and cut per seed
    row = (f"| Model-A · arithmetic · operands default | STaR | 1 | 3 | 3.0 | {(1 / 2 + 2 / 3 + 3 / 4) / 3:.2f} | "
           f"{sum(1 / k for k in n) / 3:.2f} | {sum(1 / k for k in n) / 3:.2f} | "
           f"{sum((2 * (k - 1) + 4) / k for k in n) / 3:.1f} |")
    assert row in text.splitlines(), text
    assert len(text.splitlines()) == 3  # no other run has draws
