"""Fault injection on real runs: `python tests/fault_run.py OUT` (the tiny random model, the toy
task, the hinted scheme pps, 2 iterations, the optimizer state carried over) in subprocesses,
killed with SIGKILL, fed damaged bytes and bad flags. What each run must end with, whatever
happened before:

- killed at any point and started again with the same command (as often as it takes), the
  run ends with exit code 0 and the uninterrupted reference's metrics (timing fields aside:
  fem_jax.loop.TIMING_KEYS) and draws, each round once (no duplicate rows in metrics.jsonl,
  no extra round or checkpoint folder), no temporary file or folder left over, and every file
  and folder readable by group and others under umask 022 (a run folder shared on a cluster);
- a damaged file is either redone (rollouts.jsonl: its trailer counts and checksums the draws)
  or stops the run with exit code 2 and one line that names the file: never a silent wrong
  result;
- a start that fails on a bad flag or a wrong data path leaves the run folder usable.

Kill points are found by watching the run folder (os.scandir every 5 ms; the run is niced so
that the watcher wakes at once) and killing the process group; random kills come from
random.Random(SEED) (FEM_JAX_FAULT_SEED overrides it; a failure prints it). Every subprocess
shares one model cache and one XLA compilation cache ($FEM_JAX_CACHE): only the first run
compiles.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

from fem_jax.loop import TIMING_KEYS

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
RUNNER = ROOT / "tests" / "fault_run.py"
SEED = int(os.environ.get("FEM_JAX_FAULT_SEED", "20261125"))
ROUNDS = [0, 1, 2]
TEMPORARY = (".*.tmp*", "*.tmp*", "*.orbax-checkpoint-tmp*", ".*.old-*")
POLL_S = 0.005
RUN_TIMEOUT_S = 600

Snapshot = dict  # relative posix path -> inode


# ----------------------------------------------------------------------------- running and killing


def _scan(root: Path) -> Snapshot:
    """{relative path: inode} of everything below `root` (a file replaced by a rename gets a
    new inode); entries that vanish while we look are left out."""
    out: Snapshot = {}
    stack = [(str(root), "")]
    while stack:
        d, rel = stack.pop()
        try:
            with os.scandir(d) as it:
                for e in it:
                    r = rel + e.name
                    try:
                        out[r] = e.inode()
                        if e.is_dir(follow_symlinks=False):
                            stack.append((e.path, r + "/"))
                    except FileNotFoundError:
                        pass
        except (FileNotFoundError, NotADirectoryError):
            pass
    return out


@dataclasses.dataclass(frozen=True)
class KillPoint:
    """Kill as soon as `pattern` (fnmatch over relative paths) names an entry that was not
    there, or was another file, when the process started; `also` must exist then too. With
    `said`, kill as soon as the run has printed that text instead (a phase that writes no
    file while it runs: the E-step's generation, an in-memory weight sync)."""

    pattern: str = ""
    also: str | None = None
    said: str = ""

    def hit(self, start: Snapshot, now: Snapshot, stdout: str = "") -> bool:
        if self.said:
            return self.said in stdout
        if self.also is not None and self.also not in now:
            return False
        return any(start.get(r) != ino and fnmatch.fnmatchcase(r, self.pattern) for r, ino in now.items())

    def __str__(self) -> str:
        if self.said:
            return f"printed {self.said!r}"
        return self.pattern + (f" (with {self.also})" if self.also else "")


@dataclasses.dataclass
class Run:
    args: list
    rc: int
    stdout: str
    stderr: str
    killed: str | None  # what triggered the kill, None when the process ended by itself
    seconds: float
    writing_at: float | None  # when it (re)wrote config.yaml: done building, starting the rounds

    def __str__(self) -> str:
        how = f"killed at {self.killed}" if self.killed else f"exit {self.rc}"
        return f"run {' '.join(map(str, self.args))}: {how} after {self.seconds:.1f} s"


class Runner:
    """Starts tests/fault_run.py with umask 022 in its own process group; kills it with
    SIGKILL at a KillPoint or after a number of seconds. Keeps a history for failure messages."""

    def __init__(self, env: dict, logs: Path):
        self.env, self.logs, self.history = env, logs, []
        logs.mkdir(parents=True, exist_ok=True)

    def __call__(self, out: Path, *extra: str, kill_at: list[KillPoint] = (), kill_after: float | None = None) -> Run:
        """Run to the end, or kill at the first of `kill_at` that happens, or `kill_after` seconds
        after the run starts its rounds (it writes config.yaml once built)."""
        n = len(self.history)
        args = [out.name, *extra]
        with open(self.logs / f"{n}.out", "w+") as fo, open(self.logs / f"{n}.err", "w+") as fe:
            t0 = time.monotonic()
            # niced, so that the watcher wakes at once even on a busy machine
            p = subprocess.Popen(["nice", "-n", "10", sys.executable, str(RUNNER), str(out), *extra], cwd=ROOT,
                                 env=self.env, stdout=fo, stderr=fe, stdin=subprocess.DEVNULL, start_new_session=True,
                                 umask=0o022)
            killed, writing_at = None, None
            config = KillPoint("config.yaml")
            try:
                start = _scan(out)
                while p.poll() is None:
                    elapsed = time.monotonic() - t0
                    now = _scan(out)
                    if writing_at is None and config.hit(start, now):
                        writing_at = elapsed
                    if kill_after is not None and writing_at is not None and elapsed - writing_at >= kill_after:
                        killed = f"{elapsed - writing_at:.2f} s into its rounds"
                    elif kill_at:
                        said = Path(fo.name).read_text() if any(point.said for point in kill_at) else ""
                        killed = next((str(point) for point in kill_at if point.hit(start, now, said)), None)
                    if killed is None and elapsed > RUN_TIMEOUT_S:
                        killed = "timeout"
                    if killed:
                        os.killpg(p.pid, signal.SIGKILL)
                        break
                    time.sleep(POLL_S)
                rc = p.wait(timeout=60)
            finally:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
            fo.seek(0), fe.seek(0)
            run = Run(args, rc, fo.read(), fe.read(), killed, time.monotonic() - t0, writing_at)
        self.history.append(run)
        with open(self.logs / "history.txt", "a") as f:
            f.write(f"{n}: {run}\n")
        assert killed != "timeout", self.explain(f"{run}: timed out", run)
        if killed is None and (kill_at or kill_after is not None):
            assert run.rc == 0, self.explain("a start that was to be killed failed first", run)
        return run

    def explain(self, what: str, run: Run | None = None) -> str:
        lines = [f"{what} (FEM_JAX_FAULT_SEED={SEED})", "history:"] + [f"  {r}" for r in self.history]
        if run is not None:
            lines += ["stdout:", run.stdout[-3000:], "stderr:", run.stderr[-3000:]]
        return "\n".join(lines)


# ----------------------------------------------------------------------------- what a run folder must look like


def _strip(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in TIMING_KEYS}


def _rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _shape(out: Path) -> set[str]:
    """The run folder's entries, orbax's data files left out (their names and number vary from
    save to save)."""
    return {r for r in _scan(out) if not re.search(r"(^|/)d/[0-9a-f]+$", r)}


def _temporary(out: Path) -> list[str]:
    return sorted(r for r in _scan(out) if any(fnmatch.fnmatchcase(Path(r).name, p) for p in TEMPORARY))


def _unreadable(out: Path) -> list[str]:
    """Entries that group or others cannot read (folders: list and enter) under umask 022."""
    bad = []
    for r in _scan(out):
        st = (out / r).lstat()
        need = 0o055 if (out / r).is_dir() else 0o044
        if st.st_mode & need != need:
            bad.append(f"{r} {oct(st.st_mode & 0o777)}")
    return bad


@dataclasses.dataclass
class Reference:
    out: Path
    rows: list[dict]
    shape: set[str]
    files: dict[str, bytes]  # the draws and test completions of each round
    run: Run


COMPARED = ["iter_0/eval.jsonl"] + [f"iter_{k}/{f}" for k in ROUNDS[1:] for f in ("rollouts.jsonl", "eval.jsonl")]


def check_like_reference(run: Run, out: Path, ref: Reference, runner: Runner) -> None:
    """`run` finished `out` exactly as the reference finished its run folder."""
    assert run.killed is None and run.rc == 0, runner.explain(f"{out}: the last start failed", run)
    rows = _rows(out)
    assert [r["iteration"] for r in rows] == ROUNDS, runner.explain(f"{out}/metrics.jsonl: rounds "
                                                                    f"{[r['iteration'] for r in rows]}")
    assert [_strip(r) for r in rows] == [_strip(r) for r in ref.rows], runner.explain(f"{out}: other metrics")
    for k in ROUNDS:
        row = json.loads((out / f"iter_{k}" / "metrics.json").read_text())
        assert _strip(row) == _strip(ref.rows[k]), runner.explain(f"{out}/iter_{k}/metrics.json differs")
    for f in COMPARED:
        assert (out / f).read_bytes() == ref.files[f], runner.explain(f"{out}/{f}: other draws or completions")
    assert not _temporary(out), runner.explain(f"{out}: temporary files left: {_temporary(out)}")
    shape = _shape(out)
    assert shape == ref.shape, runner.explain(f"{out}: extra {sorted(shape - ref.shape)}, "
                                              f"missing {sorted(ref.shape - shape)}")
    assert not _unreadable(out), runner.explain(f"{out}: not readable by group/others: {_unreadable(out)}")


def check_one_line_error(run: Run, names: str, runner: Runner) -> None:
    """Exit code 2 and one line on stderr, naming `names`."""
    lines = [x for x in run.stderr.splitlines() if x.strip()]
    assert run.killed is None and run.rc == 2, runner.explain(f"expected exit code 2, got {run.rc}", run)
    assert len(lines) == 1 and lines[0].startswith("error: ") and names in lines[0], \
        runner.explain(f"expected one error line naming {names}", run)


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def runner(tmp_path_factory) -> Runner:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(FEM_JAX_CACHE=str(tmp_path_factory.getbasetemp() / "fem_jax_cache"), PYTHONUNBUFFERED="1")
    return Runner(env, tmp_path_factory.mktemp("fault_logs"))


@pytest.fixture(scope="module")
def reference(runner, tmp_path_factory) -> Reference:
    """Two uninterrupted runs: the first compiles (and fills the caches), the second, loading
    the compiled steps, is the reference; both end with the same numbers and draws."""
    base = tmp_path_factory.mktemp("faults")
    first = runner(base / "first")
    run = runner(base / "reference")
    out = base / "reference"
    assert first.rc == 0 and run.rc == 0, runner.explain("the uninterrupted run failed", run)
    rows = _rows(out)
    assert [r["iteration"] for r in rows] == ROUNDS
    for r in rows[1:]:  # every round draws, accepts some, trains, and the weights move
        assert 0 < r["accepted"] < r["draws"] and r["trained"] == r["accepted"] and r["optimizer_steps"] > 0
    assert rows[1]["train_loss"] != rows[2]["train_loss"]
    ref = Reference(out, rows, _shape(out), {f: (out / f).read_bytes() for f in COMPARED}, run)
    check_like_reference(first, base / "first", ref, runner)
    return ref


VLLM = ("--set", "rollout.backend=vllm")


@pytest.fixture(scope="module")
def vllm_reference(runner, tmp_path_factory) -> Reference:
    """The same run with vLLM drawing the rollouts (in-memory sync): two uninterrupted runs
    in two processes end with the same numbers and draws."""
    try:
        from fem_jax.rollout.vllm_engine import import_vllm

        import_vllm()
    except ValueError as e:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI=true but vLLM cannot be used: {e}")
        pytest.skip(str(e))
    base = tmp_path_factory.mktemp("faults_vllm")
    first = runner(base / "first", *VLLM)
    run = runner(base / "reference", *VLLM)
    out = base / "reference"
    assert first.rc == 0 and run.rc == 0, runner.explain("the uninterrupted vLLM run failed", run)
    rows = _rows(out)
    assert [r["iteration"] for r in rows] == ROUNDS
    assert all(r["sync_method"] == "memory" for r in rows[1:]), rows
    for r in rows[1:]:
        assert 0 < r["accepted"] < r["draws"] and r["optimizer_steps"] > 0
    ref = Reference(out, rows, _shape(out), {f: (out / f).read_bytes() for f in COMPARED}, run)
    check_like_reference(first, base / "first", ref, runner)
    return ref


def _copy(ref: Reference, dst: Path) -> Path:
    shutil.copytree(ref.out, dst, symlinks=True)
    return dst


# ----------------------------------------------------------------------------- the reference


def test_reference_run_folder(reference):
    """The uninterrupted run: its files, no temporary leftovers, all of it readable by others."""
    out = reference.out
    for f in ("config.yaml", "log.txt", "metrics.jsonl", "summary.md", "curves.png", "iter_0/metrics.json",
              "checkpoints/1/fem_manifest.json", "checkpoints/2/fem_manifest.json", *COMPARED):
        assert (out / f).is_file(), f
    assert (out / "checkpoints" / "2" / "opt_state").is_dir()  # the optimizer state carries over: resumes restore it
    assert not _temporary(out), _temporary(out)
    assert not _unreadable(out), _unreadable(out)


# ----------------------------------------------------------------------------- kills


# A chain starts in an empty folder and kills the run at the first of its points that happens,
# starts the same command again and kills it at the first of the points after that one, and
# so on; the last start runs to the end. A point the previous kill already went past (the
# kill lands a few milliseconds after its trigger) is passed over: it is not reached again.
CHAIN_PHASES = [
    KillPoint("metrics.jsonl"),                               # round 0's report (iter_0/metrics.json before it)
    KillPoint("iter_1/rollouts.jsonl"),                       # the E-step's draws
    KillPoint("checkpoints/1.orbax-checkpoint-tmp*"),         # orbax writing step 1
    KillPoint("checkpoints/1"),                               # orbax finished, step not sealed
    KillPoint("checkpoints/1/fem_manifest.json"),             # sealed, round 1's metrics not written
    KillPoint("iter_1/metrics.json"),                         # round 1 done, reports not rewritten
    KillPoint("iter_2/rollouts.jsonl"),
    KillPoint("checkpoints/2.orbax-checkpoint-tmp*"),
    KillPoint("checkpoints/2"),
    KillPoint("checkpoints/2/fem_manifest.json"),
    KillPoint("iter_2/metrics.json"),
    KillPoint("metrics.jsonl", also="iter_2/metrics.json"),   # the final reports
    KillPoint("curves.png", also="iter_2/metrics.json"),
]
CHAIN_REPORTS = [
    KillPoint("iter_0/metrics.json"),                         # before metrics.jsonl exists
    KillPoint("metrics.jsonl", also="iter_1/metrics.json"),   # round 1's report rewrite
    KillPoint("summary.md", also="iter_2/metrics.json"),
]


def _chain(runner: Runner, out: Path, points: list[KillPoint], after_kill: Callable[[int], None] = lambda n: None):
    """(the last start, the points killed at, the points passed over)."""
    remaining, hit, passed = list(points), [], []
    while remaining:
        run = runner(out, kill_at=remaining)
        if run.killed is None:
            passed += remaining
            return run, hit, passed
        i = [str(p) for p in remaining].index(run.killed)
        passed += remaining[:i]
        hit.append(remaining[i])
        remaining = remaining[i + 1:]
        after_kill(len(hit))
    return runner(out), hit, passed


@pytest.mark.parametrize("name, points", [("phases", CHAIN_PHASES), ("reports", CHAIN_REPORTS)])
def test_killed_after_each_file_of_each_phase_resumes_to_the_reference(reference, runner, tmp_path, name, points):
    out = tmp_path / name
    if name == "phases":  # failed starts first: they must not poison the folder
        check_one_line_error(runner(out, "--mesh", "bogus"), "bogus", runner)
        wrong = "/nonexistent/fem_jax_data/gsm8k"  # a config of its own: --set would merge tiny.yaml's options
        cfg = tmp_path / "wrong_data.yaml"
        cfg.write_text(f"task: {{name: gsm8k, options: {{path: {wrong}, n_train: 12, n_test: 6}}}}\n")
        check_one_line_error(runner(out, "--config", str(cfg), "--set", "task.name=gsm8k"), wrong, runner)

    def failed_start_in_a_half_done_folder(n_kills: int) -> None:  # it must change nothing
        if name != "phases" or n_kills != 4:
            return
        before = {r: (out / r).read_bytes() for r in _scan(out) if (out / r).is_file() and r != "log.txt"}
        check_one_line_error(runner(out, "--mesh", "bogus"), "bogus", runner)
        after = {r: (out / r).read_bytes() for r in _scan(out) if (out / r).is_file() and r != "log.txt"}
        assert before == after, runner.explain(f"{out}: a failed start changed {set(before) ^ set(after)}")

    run, hit, passed = _chain(runner, out, points, failed_start_in_a_half_done_folder)
    check_like_reference(run, out, reference, runner)
    assert len(passed) <= len(points) // 4, runner.explain(f"kills landed too late to reach {list(map(str, passed))}")


def test_killed_at_random_times_resumes_to_the_reference(reference, runner, tmp_path):
    """Three starts from an empty folder, each killed at a time drawn over one third of the
    reference's rounds (from its writing config.yaml to its end; a kill before that leaves
    nothing to resume), then the same command to the end. A start may finish before its time
    when the machine got faster: at least two kills must land."""
    rng = random.Random(SEED)
    rounds_s = reference.run.seconds - reference.run.writing_at
    kills = 0
    for third in range(3):
        out = tmp_path / f"third{third}"
        run = runner(out, kill_after=rounds_s * (third + rng.random()) / 3)
        if run.killed:
            kills += 1
            run = runner(out)
        check_like_reference(run, out, reference, runner)
    assert kills >= 2, runner.explain(f"only {kills} of 3 random kills landed before their runs ended")


# ----------------------------------------------------------------------------- damaged bytes


def _cut(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def test_damaged_metrics_json_is_named_and_never_silently_lost(reference, runner, tmp_path):
    """Truncated iter_2/ and iter_1/metrics.json: each start stops naming one of them. Deleted, as
    the error says, the latest round's is recomputed from its checkpoint; an earlier round's is
    recomputed too, or the run stops naming it (never a run that ends without that round)."""
    out = _copy(reference, tmp_path / "run")
    for k in (2, 1):
        m = out / f"iter_{k}" / "metrics.json"
        _cut(m, m.stat().st_size // 2)
    for k in (2, 1):
        m = out / f"iter_{k}" / "metrics.json"
        run = runner(out)
        check_one_line_error(run, str(m), runner)
        assert "delete it" in run.stderr
        m.unlink()
        if k == 1:  # the start before this one recomputed round 2
            assert _strip(json.loads((out / "iter_2" / "metrics.json").read_text())) == _strip(reference.rows[2])
    run = runner(out)
    if run.rc == 2:
        check_one_line_error(run, str(out / "iter_1" / "metrics.json"), runner)
    else:
        check_like_reference(run, out, reference, runner)


def test_overwritten_checkpoint_data_is_named(reference, runner, tmp_path):
    """Same-size garbage inside a data file of the checkpoint a resume restores: exit 2 naming it."""
    out = _copy(reference, tmp_path / "run")
    data = max((p for p in (out / "checkpoints" / "2" / "params").rglob("*") if p.is_file() and p.parent.name == "d"),
               key=lambda p: p.stat().st_size)
    b = bytearray(data.read_bytes())
    b[len(b) // 2: len(b) // 2 + 8] = bytes(x ^ 0xFF for x in b[len(b) // 2: len(b) // 2 + 8])
    data.write_bytes(bytes(b))
    check_one_line_error(runner(out), str(data.relative_to(out)), runner)


def test_truncated_checkpoint_meta_is_named(reference, runner, tmp_path):
    out = _copy(reference, tmp_path / "run")
    meta = out / "checkpoints" / "2" / "meta" / "metadata"
    _cut(meta, meta.stat().st_size - 10)
    check_one_line_error(runner(out), str(meta.relative_to(out)), runner)


KILL_MID_WRITE = """
import os, sys, time
from fem_jax import io

def stuck(fd):  # the data is written, the rename not yet done
    print("writing", flush=True)
    time.sleep(600)

os.fsync = stuck
io.atomic_write_bytes(sys.argv[1], b"half")
"""


def _killed_mid_write(path: Path, env: dict) -> None:
    """What a run killed while writing `path` leaves: fem_jax.io's temporary beside it."""
    p = subprocess.Popen([sys.executable, "-c", KILL_MID_WRITE, str(path)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                         text=True, start_new_session=True, umask=0o022)
    try:
        assert p.stdout.readline().strip() == "writing"
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()


def test_damaged_rollouts_are_drawn_again_and_killed_writes_cleaned_up(reference, runner, tmp_path):
    """Rounds 1 and 2 to redo (no checkpoint) with a rollouts.jsonl cut on a line boundary and
    one with a changed byte: both drawn again. Beside them, the temporaries of writes killed
    before their rename (metrics.jsonl, iter_1/metrics.json): gone after the next start. The
    run ends as the reference."""
    out = _copy(reference, tmp_path / "run")
    shutil.rmtree(out / "checkpoints")
    for k in (1, 2):
        (out / f"iter_{k}" / "metrics.json").unlink()
    cut = out / "iter_1" / "rollouts.jsonl"
    lines = cut.read_bytes().splitlines(keepends=True)
    cut.write_bytes(b"".join(lines[:len(lines) // 2]))
    changed = out / "iter_2" / "rollouts.jsonl"
    b = bytearray(changed.read_bytes())
    i = b.index(b'"token_ids": [') + len(b'"token_ids": [')
    b[i] = ord("1") if b[i] != ord("1") else ord("2")  # another token id, same size
    changed.write_bytes(bytes(b))
    for f in ("metrics.jsonl", "iter_1/metrics.json"):
        _killed_mid_write(out / f, runner.env)
    assert len(_temporary(out)) == 2, _temporary(out)
    run = runner(out)
    for k, f in ((1, cut), (2, changed)):
        assert f"{f}" in run.stdout and f"drawing round {k}'s E-step again" in run.stdout, \
            runner.explain(f"{f}: not reported as redrawn", run)
    check_like_reference(run, out, reference, runner)


# ----------------------------------------------------------------------------- with vLLM


VLLM_CHAIN_MEMORY = [
    KillPoint(said="iteration 1/2: E-step on"),               # vLLM generating round 1's draws
    KillPoint("checkpoints/1/fem_manifest.json"),             # sealed: the in-memory sync comes next
    KillPoint(said="iteration 2/2: E-step on"),
    KillPoint("checkpoints/2/fem_manifest.json"),
]
VLLM_CHAIN_FOLDER = [
    KillPoint("iter_1/.hf.tmp*"),                             # writing the export vLLM reloads
    KillPoint("iter_1/hf"),                                   # exported, vLLM reloading it
    KillPoint("iter_2/.hf.tmp*"),
]


@pytest.mark.parametrize("sync, points", [("memory", VLLM_CHAIN_MEMORY), ("folder", VLLM_CHAIN_FOLDER)])
def test_vllm_killed_during_estep_and_sync_resumes_to_the_reference(vllm_reference, runner, tmp_path, sync, points):
    """rollout.backend=vllm, killed while vLLM draws and while the weights go to it (from
    memory, or through an export): every restart creates vLLM again, syncs θ(k) and ends with
    the uninterrupted vLLM run's metrics and draws. (rollout.sync only says how the weights
    travel: the folder variant ends with the memory reference's numbers, sync_method aside.)"""
    out = tmp_path / sync
    extra = (*VLLM, "--set", f"rollout.sync={sync}")
    remaining, hit = list(points), []
    while remaining:
        run = runner(out, *extra, kill_at=remaining)
        if run.killed is None:
            break
        i = [str(p) for p in remaining].index(run.killed)
        hit.append(remaining[i])
        remaining = remaining[i + 1:]
    else:
        run = runner(out, *extra)
    assert len(hit) >= len(points) - 1, runner.explain(f"kills landed too late: hit {list(map(str, hit))}")
    if sync == "memory":
        check_like_reference(run, out, vllm_reference, runner)
        return
    rows = _rows(out)
    assert [r["sync_method"] for r in rows[1:]] == ["folder", "folder"], rows
    strip = lambda r: {k: v for k, v in _strip(r).items() if k != "sync_method"}  # noqa: E731
    assert [strip(r) for r in rows] == [strip(r) for r in vllm_reference.rows], runner.explain(f"{out}: other metrics")
    for f in COMPARED:
        assert (out / f).read_bytes() == vllm_reference.files[f], runner.explain(f"{out}/{f}: other draws")
    assert not _temporary(out), runner.explain(f"{out}: temporary files left: {_temporary(out)}")
