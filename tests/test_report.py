"""The scheme comparison table: best test accuracy per seed, mean and standard error."""

from __future__ import annotations

import math

from fem_jax.report import compare


def _rows(*accs):
    return [{"iteration": i, "test_accuracy": a} for i, a in enumerate(accs)]


def test_comparison_table_mean_and_standard_error(tmp_path):
    results = {
        "pps": {257: _rows(0.05, 0.30, 0.25), 521: _rows(0.04, 0.36, 0.40)},  # best 0.30 and 0.40
        "rs": {257: _rows(0.05, 0.20)},  # one seed: no spread to report
    }
    text = compare(results, tmp_path)
    pps = next(line for line in text.splitlines() if line.startswith("| pps"))
    se = math.sqrt(((0.30 - 0.35) ** 2 + (0.40 - 0.35) ** 2) / 1 / 2)  # sample sd / sqrt(n)
    assert f"0.350 ± {se:.3f}" in pps and "257: 0.300, 521: 0.400" in pps
    rs = next(line for line in text.splitlines() if line.startswith("| rs"))
    assert "| 0.200 | 1 |" in rs and "nan" not in rs
    assert (tmp_path / "comparison.md").read_text().endswith(text + "\n")
    assert (tmp_path / "comparison.png").stat().st_size > 0


def test_draw_table_splits_lengths_by_advantage_sign(tmp_path):
    """`python -m fem_jax.report draws`: per round, the mean tokens of draws above and below
    their batch's mean reward; a TRL arm's draws.jsonl is read too."""
    import json

    from fem_jax.estep import Draw, write_draws
    from fem_jax.io import atomic_write_text
    from fem_jax.report import draw_table

    def draw(prompt, reward, n, reason="stop"):
        return Draw(example_id=f"e{prompt}", scheme="rs", round=0, hinted=False, completion="x", token_ids=[5] * n,
                    logprobs=[0.0] * n, finish_reason=reason, answer=None, reward=reward, leaked=False,
                    accepted=reward > 0, trained=True, prompt=prompt)

    # batch 0: the rewarded draw is long (10), the others short (2, 4); batch 1: all equal, no sign
    draws = [draw(0, 1.0, 10), draw(0, 0.0, 2), draw(0, 0.0, 4, "length"), draw(1, 1.0, 7), draw(1, 1.0, 7)]
    (tmp_path / "step_1").mkdir()
    write_draws(tmp_path / "step_1" / "rollouts.jsonl", draws, 1, atomic_write_text)
    (tmp_path / "step_2").mkdir()
    (tmp_path / "step_2" / "draws.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"example_id": "a", "reward": 0.0, "tokens": 12}, {"example_id": "a", "reward": 1.0, "tokens": 3}]))
    rows = draw_table(tmp_path).splitlines()
    assert rows[2] == "| 1 | 5 | 0.60 | 0.20 | 6.0 | 10.0 | 3.0 | 0.40 |"
    assert rows[3] == "| 2 | 2 | 0.50 | – | 7.5 | 3.0 | 12.0 | 0.00 |"
