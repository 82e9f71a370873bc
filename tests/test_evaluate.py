"""Evaluation: the unbiased pass@k estimator against a brute-force count over subsets, maj@k,
evaluate() on a stub engine, and `python -m fem_jax.evaluate` on a finished tiny run (it
reproduces the run's own greedy numbers for the base model and a trained round)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from fem_jax.config import EvalCfg, load_config
from fem_jax.evaluate import evaluate, maj_at_k, main, pass_at_k
from fem_jax.rollout.engine import Sample

ROOT = Path(__file__).resolve().parents[1]


def brute_pass_at_k(n, c, k):
    """The share of the k-subsets of n samples (c of them correct) holding a correct one."""
    samples = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_pass_at_k_equals_the_brute_force_count(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_rejects_impossible_counts():
    for n, c, k in [(4, 5, 1), (4, 2, 5), (4, 2, 0)]:
        with pytest.raises(ValueError, match="pass@k"):
            pass_at_k(n, c, k)


def test_maj_at_k_votes_on_parsed_answers():
    assert maj_at_k([3, 3, 4, None], [1, 1, 0, 0], 4) == 1.0
    assert maj_at_k([4, 3, 3, 4], [0, 1, 1, 0], 3) == 1.0  # first 3: 3 wins 2-1
    assert maj_at_k([4, 3, 3, 4], [0, 1, 1, 0], 4) == 0.0  # a 2-2 tie goes to the answer seen first (4)
    assert maj_at_k([None, None, 5], [0, 0, 1], 2) == 0.0  # no parsed answer among the first 2
    assert maj_at_k([None, None, 5], [0, 0, 1], 3) == 1.0


class ToyTask:
    def messages(self, ex, hint=None):
        return [{"role": "user", "content": ex}]

    def parse(self, text):
        return int(text) if text.strip().isdigit() else None

    def reward(self, answer, gold):
        return float(answer == gold)


class Ex:
    def __init__(self, i, gold):
        self.id, self.gold = f"e{i}", gold

    def __repr__(self):
        return self.id


class ScriptedEngine:
    """Greedy: answers '1'; sampled: the texts given per prompt."""

    def __init__(self, samples):
        self.samples = samples

    def generate(self, prompts, n=1, temperature=1.0, progress=None, **kw):
        if temperature == 0:
            return [[Sample("1", [1], "stop", [0.0])] for _ in prompts]
        return [[Sample(t, [1, 2], "stop", [0.0, 0.0]) for t in self.samples[i][:n]] for i in range(len(prompts))]


def test_evaluate_reports_greedy_accuracy_pass_at_k_and_maj_at_k():
    examples = [Ex(0, 1), Ex(1, 2)]
    engine = ScriptedEngine([["1", "0", "0", "1"], ["x", "2", "3", "3"]])
    metrics, records = evaluate(engine, ToyTask(), examples, EvalCfg(n_samples=4, k=(1, 2, 4)))
    assert metrics["test_accuracy"] == 0.5 and metrics["n_test"] == 2  # greedy '1': right, then wrong
    assert metrics["pass@1"] == pytest.approx((pass_at_k(4, 2, 1) + pass_at_k(4, 1, 1)) / 2)
    assert metrics["pass@2"] == pytest.approx((brute_pass_at_k(4, 2, 2) + brute_pass_at_k(4, 1, 2)) / 2)
    assert metrics["pass@4"] == 1.0
    # maj@4: example 0 ties 1-vs-0 2:2, the first seen (1) wins -> right; example 1: 3 wins -> wrong
    assert metrics["maj@4"] == 0.5 and metrics["maj@1"] == 0.5
    assert [r["reward"] for r in records] == [1.0, 0.0] and len(records[0]["samples"]) == 4


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    from fem_jax import loop as loop_lib
    from toy_tasks import register

    with pytest.MonkeyPatch.context() as mp:
        register(mp)
        mp.setenv("FEM_JAX_CACHE", str(tmp_path_factory.getbasetemp() / "fem_jax_cache"))
        out = tmp_path_factory.mktemp("run")
        cfg = load_config(ROOT / "configs" / "tiny.yaml", [
            "model.path=tiny-random-llama", "task.name=even_length", "task.options={n_train: 8, n_test: 6}",
            "estep.scheme=pps", "run.iterations=2"])
        rows = loop_lib.run(cfg, out, log=lambda s: None)
    return out, rows


@pytest.fixture(autouse=True)
def _toy(toy_task, tiny_cache):
    return toy_task


@pytest.mark.parametrize("iteration", [0, 2])
def test_evaluate_command_reproduces_the_runs_greedy_numbers(finished_run, iteration, capsys):
    out, rows = finished_run
    assert main([str(out), "--iteration", str(iteration), "--n-samples", "4", "--k", "1,4"]) == 0
    printed = capsys.readouterr().out
    written = json.loads((out / "evals" / f"iter_{iteration}_n4.json").read_text())
    for key in ("test_accuracy", "reasoning_length_test", "n_test"):
        assert written[key] == pytest.approx(rows[iteration][key])
    assert {"pass@1", "pass@4", "maj@1", "maj@4"} <= set(written) and "pass@4" in printed
    assert written["pass@4"] >= written["pass@1"]
    records = [json.loads(x) for x in (out / "evals" / f"iter_{iteration}_n4.jsonl").read_text().splitlines()]
    assert len(records) == rows[iteration]["n_test"] and all(len(r["samples"]) == 4 for r in records)


def test_evaluate_command_errors_are_one_line(finished_run, capsys, tmp_path):
    out, _ = finished_run
    assert main([str(out), "--iteration", "7"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "round 7" in err and "kept" in err
    assert main([str(tmp_path), "--iteration", "1"]) == 2
    assert "config.yaml" in capsys.readouterr().err
    assert main([str(out)]) == 2 and "--iteration" in capsys.readouterr().err
