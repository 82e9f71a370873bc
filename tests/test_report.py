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
