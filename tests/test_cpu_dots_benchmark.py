"""benchmarks/cpu_dots.py cannot rot: on tiny shapes it prints one row per (row count, way),
each way's speed against float32, and all three ways compute the same block."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import cpu_dots  # noqa: E402


def test_prints_each_way_at_each_row_count():
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "cpu_dots.py"), "--rows", "8,3", "--d", "16",
                        "--f", "32", "--repeat", "1"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [line.split("|")[1:-1] for line in r.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    got = [(c[0].strip(), c[1].strip()) for c in rows[1:]]  # the header row aside
    ways = ["float32", "bfloat16", "bfloat16, float32 out"]
    assert got == [(n, w) for n in ("8", "3") for w in ways]
    assert all(c[4].strip() == "1.00x" for c in rows[1:] if c[1].strip() == "float32")


def test_the_three_ways_compute_the_same_block():
    import jax
    import jax.numpy as jnp

    k = jax.random.split(jax.random.PRNGKey(1), 4)
    f32 = (jax.random.normal(k[0], (1, 5, 16)), jax.random.normal(k[1], (16, 32)) * 0.1,
           jax.random.normal(k[2], (16, 32)) * 0.1, jax.random.normal(k[3], (32, 16)) * 0.1)
    bf = tuple(x.astype(jnp.bfloat16) for x in f32)
    with jax.default_matmul_precision("highest"):
        ref = np.asarray(cpu_dots._mlp(None)(*f32))
    for out, args in ((None, bf), (jnp.float32, bf)):
        got = np.asarray(cpu_dots._mlp(out)(*args).astype(jnp.float32))
        np.testing.assert_allclose(got, ref, rtol=0.05, atol=0.02)
