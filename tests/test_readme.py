"""README's examples run as written, in README order: every `python ...` line of its bash
blocks that works on the tiny smoke model (it names configs/tiny.yaml or a runs/tiny*
folder) is executed from a fresh working folder, one after the other, and must exit 0.
The other examples (the default model, GPUs, several hosts) are too long for a test; their
commands are still checked to name only files and flags that exist."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    """The shell commands of README's ```bash blocks (comments and continuations joined)."""
    text = (ROOT / "README.md").read_text()
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        lines, cur = [], ""
        for raw in block.splitlines():
            line = raw.split("  #")[0].rstrip() if not raw.lstrip().startswith("#") else ""
            if line.endswith("\\"):
                cur += line[:-1] + " "
                continue
            cur += line
            if cur.strip():
                lines.append(" ".join(cur.split()))
            cur = ""
        out += lines
    return out


def is_cheap(cmd: str) -> bool:
    return cmd.startswith("python ") and ("configs/tiny.yaml" in cmd or re.search(r"runs/tiny\b", cmd) is not None)


def test_readme_has_cheap_examples_and_its_commands_name_real_files_and_flags():
    cmds = readme_commands()
    cheap = [c for c in cmds if is_cheap(c)]
    assert len(cheap) >= 4, cheap
    help_text = subprocess.run([sys.executable, str(ROOT / "launch" / "run.py"), "--help"], capture_output=True,
                               text=True, check=True).stdout
    run_flags = set(re.findall(r"--[a-z][a-z-]*", help_text))
    for c in cmds:
        words = shlex.split(c)
        if "launch/run.py" in words:  # its flags (a launcher before it, as srun, has its own)
            for w in words[words.index("launch/run.py") + 1:]:
                if w.startswith("--"):
                    assert w.split("=")[0] in run_flags, (c, w)
        for w in words:
            if w.startswith("configs/") and "X.yaml" not in w:
                assert (ROOT / w).exists(), (c, w)


@pytest.mark.slow
def test_readme_examples_run_in_order(tmp_path, tiny_cache_dir):
    for name in ("launch", "configs"):
        (tmp_path / name).symlink_to(ROOT / name)
    env = {**os.environ, "FEM_JAX_CACHE": str(tiny_cache_dir)}
    for cmd in [c for c in readme_commands() if is_cheap(c)]:
        args = shlex.split(cmd)
        args[0] = sys.executable
        r = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, f"{cmd}\n--- stdout\n{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-3000:]}"
