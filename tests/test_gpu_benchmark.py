"""benchmarks/gpu.py cannot rot where CI has no GPU: its --dry-run drives a tiny model
through every code path (M-step per remat policy, JaxEngine, transformers' generate, the
tables), and without a GPU the real run says so and exits cleanly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu.py"


def _run(*args, timeout=900):
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_dry_run_executes_every_code_path(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "gpu.json"
    r = _run("--dry-run", "--json", str(out))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    data = json.loads(out.read_text())
    assert [row["remat"] for row in data["mstep"]] == ["none", "full", "dots_saveable"]
    for row in data["mstep"]:
        assert not row.get("error") and row["tokens_per_s"] > 0 and row["params"] > 0, row
    assert [row["rows"] for row in data["rollout"]] == [4]
    for row in data["rollout"]:
        assert not row.get("error") and not row.get("hf_error"), row
        assert row["tok_s"] > 0 and row["hf_tok_s"] > 0 and row["ratio"] > 0, row
    for text in ("Device:", "jaxlib", "flax", "transformers", "torch", "## M-step", "## Rollout", "| tiny | 4 |"):
        assert text in r.stdout, text


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the message shown where there is no GPU")
def test_without_a_gpu_it_says_so_and_exits_cleanly():
    r = _run("--skip", "rollout", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "No GPU" in r.stdout and "--dry-run" in r.stdout
