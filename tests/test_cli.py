"""The command line as a user meets it: `--help` once, one timestamped line per phase in a
log (stdout not a terminal), no library chatter on the console (it goes to the run
folder's log.txt), one-line errors with exit code 2, and a hint for meshes on a CPU."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAMP = re.compile(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] ")


def run_cli(*args, env=None, timeout=900):
    return subprocess.run([sys.executable, str(ROOT / "launch" / "run.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout, env={**os.environ, **(env or {})})


def test_help_prints_its_description_once():
    r = run_cli("--help")
    assert r.returncode == 0
    first = r.stdout.splitlines()
    head = "Train a model to reason"
    assert r.stdout.count(head) == 1 and "--cpu-devices" in r.stdout and "--report-to" in r.stdout
    assert any(line.startswith("usage:") for line in first)


@pytest.mark.parametrize("args,needle", [
    (["--set", "estep.budgt=3"], "unknown key 'estep.budgt'"),
    (["--config", "no/such.yaml"], "no/such.yaml"),
    (["--mesh", "bogus"], "--mesh"),
    (["--mesh", "fsdp=64"], "--cpu-devices"),
    (["--config", str(ROOT / "configs" / "default.yaml"), "--set", "task.options={path: /no/such/data}",
      "--set", "task.name=gsm8k"], "/no/such/data"),
])
def test_user_errors_are_one_line_with_exit_code_2(args, needle, tmp_path, tiny_cache_dir):
    r = run_cli("--config", str(ROOT / "configs" / "tiny.yaml"), "--out", str(tmp_path / "run"), *args,
                env={"FEM_JAX_CACHE": str(tiny_cache_dir)})
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.stderr
    assert not (tmp_path / "run" / "config.yaml").exists()  # a failed start leaves no config behind


@pytest.mark.slow
def test_a_run_in_a_log_file_prints_timestamped_phase_lines_and_no_library_chatter(tmp_path, tiny_cache_dir):
    out = tmp_path / "run"
    r = run_cli("--config", str(ROOT / "configs" / "tiny.yaml"), "--out", str(out),
                env={"FEM_JAX_CACHE": str(tiny_cache_dir)})
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.strip() == "", r.stderr  # nothing from absl, orbax, jax or transformers
    log_lines = r.stdout.split("\n\n| ")[0].strip().splitlines()  # the lines before the final table
    assert log_lines and all(STAMP.match(x) for x in log_lines), log_lines
    text = "\n".join(log_lines)
    for phase in ("iteration 0/2: evaluating the base model", "iteration 1/2: E-step", "iteration 1/2: M-step",
                  "iteration 2/2: evaluating"):
        assert phase in text, phase
    assert "| iter | test acc |" in r.stdout
    chatter = (out / "log.txt").read_text()
    assert "absl" in chatter or "orbax" in chatter or "jax" in chatter  # the chatter went to the run folder
    for noise in ("PyTorch was not found", "Waiting for previous save"):
        assert noise not in r.stdout + r.stderr
