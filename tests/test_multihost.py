"""Several hosts as a tested path: two processes on 127.0.0.1 (`--distributed`, two fake CPU
devices each, `--mesh data=2,fsdp=-1`) train the tiny random model on the toy task, are
killed and resumed, and end as one process on the same four-device mesh does.

The run (tests/multihost_run.py: 3 iterations of the hinted scheme pps, so every round
trains) is made first by one process on four devices (the reference; the two processes then
find its compilations in the XLA cache: the same programs on the same global mesh), then
by both processes in three launches:
  A  until round 1's checkpoint is sealed; then process 1 is SIGKILLed. The checkpoint's
     manifest is then removed: the state a kill between orbax's commit and the seal leaves
     (an unsealed step);
  B  resumes: every process drops the unsealed step and redoes round 1, reusing its E-step
     file; when round 2's checkpoint is sealed process 0 (the writer, and the coordinator) is
     SIGKILLed; round 2's metrics.json is removed if it was written already: the state a kill
     between the checkpoint and the metrics leaves;
  C  resumes: round 2 is completed from its checkpoint, round 3 runs (the oldest checkpoint
     is pruned), both processes exit 0.
The process that is not killed fails too: it never exits 0 once its peer is gone. When
process 0 (the coordinator) dies, the others abort at once; when another dies, process 0's
next collective fails, then JAX's shutdown barrier waits for the coordination service's
heartbeat timeout (100 s by default) and aborts. Until its next collective a survivor may go
on alone (with data=2 across the processes each holds a whole replica of the weights: the
E-step and evaluation need no other process), writing what the run would have written. A
cluster scheduler ends the job when one task fails; the test kills the survivor after
SURVIVOR_WAIT_S.

Throughout, process 0 writes late and process 1 lists checkpoints late (multihost_run.py's
FEM_JAX_TEST_LAG): every decision read from the run folder must hold however far apart the
processes run. Checked at the end: both processes exit 0; metrics.jsonl, every round's
draws and evaluation records equal the single-process run's (timing fields aside, floats
within 1e-5); the run folder holds the same files as that run's (each once: no per-rank
copy), the same sealed checkpoint steps, one TensorBoard event file per launch, and no
temporary file or folder; process 1 wrote nothing in the run folder outside checkpoints/.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from fnmatch import fnmatch
from pathlib import Path

import pytest

from fem_jax.loop import TIMING_KEYS

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
RUNNER = ROOT / "tests" / "multihost_run.py"
TEMPORARY = ("*.tmp*", ".*tmp*", "*orbax-checkpoint-tmp*", ".*.old-*")
LAG_S = 0.3
SURVIVOR_WAIT_S = 5
RUN_TIMEOUT_S = 480
POLL_S = 0.01


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Launch:
    """Both processes of one launch, each in its own process group, logs in `logs`."""

    def __init__(self, name: str, out: Path, logs: Path, env: dict):
        self.name, self.out, self.logs = name, out, logs
        port = _free_port()
        self.procs = []
        for i in range(2):
            with open(self.log(i), "w") as f:
                self.procs.append(subprocess.Popen(
                    [sys.executable, str(RUNNER), str(out), "--cpu-devices", "2", "--report-to", "tensorboard",
                     "--distributed", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                     "--process-id", str(i)],
                    env=env, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True))

    def log(self, i: int) -> Path:
        return self.logs / f"{self.name}.rank{i}.log"

    def tails(self) -> str:
        return "\n".join(f"--- {self.log(i).name} (exit {p.poll()}):\n{self.log(i).read_text()[-3000:]}"
                         for i, p in enumerate(self.procs))

    def kill(self, i: int) -> None:
        if self.procs[i].poll() is None:
            os.killpg(self.procs[i].pid, signal.SIGKILL)
        self.procs[i].wait()

    def wait_for(self, rel: str) -> None:
        """Until OUT/rel exists; fails if a process ends first."""
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not (self.out / rel).exists():
            if any(p.poll() is not None for p in self.procs) or time.monotonic() > deadline:
                self.close()
                pytest.fail(f"launch {self.name}: {rel} never appeared\n{self.tails()}")
            time.sleep(POLL_S)

    def kill_one(self, i: int) -> int:
        """SIGKILL process i; give the other SURVIVOR_WAIT_S to end by itself, then kill it.
        Returns the survivor's exit code (negative: killed by a signal)."""
        self.kill(i)
        other = self.procs[1 - i]
        try:
            other.wait(SURVIVOR_WAIT_S)
        except subprocess.TimeoutExpired:
            self.kill(1 - i)
        return other.returncode

    def finish(self) -> list[int]:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        for p in self.procs:
            try:
                p.wait(max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.close()
                pytest.fail(f"launch {self.name}: still running after {RUN_TIMEOUT_S} s\n{self.tails()}")
        return [p.returncode for p in self.procs]

    def close(self) -> None:
        for i in range(2):
            self.kill(i)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _same(a, b, where: str) -> None:
    """Equal, floats within 1e-5 (the two meshes sum in other orders)."""
    if isinstance(a, dict) and isinstance(b, dict):
        assert sorted(a) == sorted(b), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), f"{where}: {len(a)} != {len(b)} items"
        for n, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{n}]")
    elif isinstance(a, float) or isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-7), f"{where}: {a} != {b}"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _untimed(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in TIMING_KEYS}


def _files(out: Path) -> list[str]:
    """The run folder's own files (checkpoints and TensorBoard's event files apart)."""
    rel = (p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    return sorted(r for r in rel if not r.startswith(("checkpoints/", "tensorboard/")))


def test_two_processes_train_resume_and_match_one_process(tmp_path, tiny_cache):
    from fem_jax.checkpoint import Checkpointer
    from fem_jax.models import resolve

    resolve("tiny-random-llama")  # built once, before any process looks for it
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "PYTHONUNBUFFERED": "1"}
    env.pop("FEM_JAX_DISTRIBUTED", None)

    ref, out, logs = tmp_path / "ref", tmp_path / "multi", tmp_path / "logs"
    logs.mkdir()
    # one process, four devices first: the two processes run the same programs on the same global
    # mesh, so they find its compilations in the XLA cache
    r = subprocess.run([sys.executable, str(RUNNER), str(ref), "--cpu-devices", "4", "--report-to", "tensorboard"],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    menv = {**env, "FEM_JAX_TEST_LAG": str(LAG_S), "FEM_JAX_TEST_WRITES": str(logs / "writes")}
    launches = []
    try:
        a = Launch("A", out, logs, menv)
        launches.append(a)
        a.wait_for("checkpoints/1/fem_manifest.json")
        survivor = a.kill_one(1)
        assert survivor != 0, f"process 0 exited 0 after process 1 was killed\n{a.tails()}"
        (out / "checkpoints" / "1" / "fem_manifest.json").unlink()  # as if killed before the seal
        rollouts_1 = (out / "iter_1" / "rollouts.jsonl").stat().st_ino

        b = Launch("B", out, logs, menv)
        launches.append(b)
        b.wait_for("checkpoints/2/fem_manifest.json")
        survivor = b.kill_one(0)
        assert survivor != 0, f"process 1 exited 0 after process 0 was killed\n{b.tails()}"
        (out / "iter_2" / "metrics.json").unlink(missing_ok=True)  # as if killed before the metrics
        sealed_2 = (out / "checkpoints" / "2" / "fem_manifest.json").stat().st_ino
        for i in range(2):  # every process dropped the unsealed step and reused the E-step's draws
            text = b.log(i).read_text()
            assert "checkpoint 1 was not sealed" in text and "reusing the E-step's 12 draws" in text, b.tails()

        c = Launch("C", out, logs, menv)
        launches.append(c)
        codes = c.finish()
        assert codes == [0, 0], f"launch C exit codes {codes}\n{c.tails()}"
        for i in range(2):  # every process completed round 2 from its checkpoint
            assert "resuming" in c.log(i).read_text() and "after iteration 2/3" in c.log(i).read_text(), c.tails()
    finally:
        for launch in launches:
            launch.close()

    # round 1's draws were reused, round 2 completed (its checkpoint not saved again)
    assert (out / "iter_1" / "rollouts.jsonl").stat().st_ino == rollouts_1
    assert (out / "checkpoints" / "2" / "fem_manifest.json").stat().st_ino == sealed_2

    # the numbers: the single-process run's
    want, got = _rows(ref / "metrics.jsonl"), _rows(out / "metrics.jsonl")
    assert [r["round"] for r in got] == [0, 1, 2, 3]
    assert all(r["trained"] > 0 for r in got[1:]), "the M-step must train every round"
    for w, g in zip(want, got):
        _same(_untimed(g), _untimed(w), f"metrics round {w['round']}")
    for k in range(4):
        for name in ("rollouts.jsonl", "eval.jsonl") if k else ("eval.jsonl",):
            _same(_rows(out / f"iter_{k}" / name), _rows(ref / f"iter_{k}" / name), f"iter_{k}/{name}")

    # the run folder: each file once, sealed checkpoints, no leftovers, written by process 0 only
    written = {i: (logs / f"writes.rank{i}").read_text().splitlines() for i in range(2)}
    assert any(line.endswith(" metrics.jsonl") for line in written[0]), "the write recorder saw nothing"
    assert not written[1], f"process 1 wrote in the run folder: {sorted(set(written[1]))[:20]}"
    assert _files(out) == _files(ref)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["2", "3"]
    assert sorted(p.name for p in (ref / "checkpoints").iterdir()) == ["2", "3"]
    ck = Checkpointer(out / "checkpoints", create=False)
    for step in (2, 3):
        ck.verify_step(step)  # every file the manifest lists, none added
    ck.close()
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 3  # one per launch, process 0's
    left = [p.relative_to(out).as_posix() for p in out.rglob("*") if any(fnmatch(p.name, t) for t in TEMPORARY)]
    assert not left, f"temporary files left: {left}"
