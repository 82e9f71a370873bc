"""The tiny config with `--mesh fsdp=4,tensor=2` end to end on a fake 8-device CPU: its train
losses equal the single-device run's (the CLI command itself is README's, run by
tests/test_readme.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}


def _rows(out: Path):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_tiny_config_on_a_mesh_matches_one_device(tmp_path, tiny_cache_dir):
    env = {**ENV, "FEM_JAX_CACHE": str(tiny_cache_dir)}
    runs = {}
    for name, mesh in (("single", None), ("mesh", "fsdp=4,tensor=2")):
        cmd = [sys.executable, str(ROOT / "tests" / "mesh_e2e.py"), str(tmp_path / name)] + ([mesh] if mesh else [])
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        runs[name] = _rows(tmp_path / name)
    single, mesh = runs["single"], runs["mesh"]
    assert [r["iteration"] for r in mesh] == [0, 1, 2]
    for a, b in zip(single[1:], mesh[1:]):
        assert a["trained"] == b["trained"] and a["trained"] > 0
        np.testing.assert_allclose(b["train_losses"], a["train_losses"], rtol=1e-5)
    # README's `--mesh fsdp=4,tensor=2 --cpu-devices 8` CLI example runs in tests/test_readme.py
