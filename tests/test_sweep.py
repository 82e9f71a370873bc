"""fem_jax.sweep: configs x seeds x arms into runs, their resources and states, the dry run;
then for real on a local Ray cluster (127.0.0.1, 2 CPUs, started by the test): the tiny
config x 2 schemes x 2 seeds plus a run with a wrong data path, one Ray worker killed with
SIGKILL mid-run. The sweep must end with every good run's metrics equal to the same runs
made one by one (fem_jax.loop.run, the entry the sweep calls), the bad run reported with its
one-line error, the tables written; a second invocation submits nothing.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fem_jax import sweep
from fem_jax.loop import TIMING_KEYS

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


def _ray_or_skip():
    try:
        importlib.import_module("ray")
    except ImportError as e:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI=true but Ray cannot be imported: {e}")
        pytest.skip(f"Ray is not installed: {e}")


def test_expand_names_each_run_and_its_resources(tmp_path):
    runs = sweep.expand([str(TINY)], tmp_path, seeds=[257, 521], schemes=["rs", "pps"])
    assert [r.name for r in runs] == ["tiny/rs_seed257", "tiny/pps_seed257", "tiny/rs_seed521", "tiny/pps_seed521"]
    assert [(r.cfg.estep.scheme, r.cfg.run.seed) for r in runs] == [("rs", 257), ("pps", 257), ("rs", 521),
                                                                    ("pps", 521)]
    assert all(r.out == tmp_path / r.name and r.state == "new" and r.gpus == 0 and r.cpus == 1 for r in runs)
    assert all(r.memory >= 2 * 2**30 for r in runs)
    gen, train = runs[0].tokens_generate, runs[0].tokens_train
    assert gen == 2 * 16 * 12 + 3 * 8 * 12  # 2 iterations x 16 prompts x budget 1 x 12 tokens + 3 evaluations
    assert train == 2 * 16 * (100 + 12)
    two = sweep.expand([str(TINY)], tmp_path, seeds=[257], schemes=["pps"], overrides=["estep.budget=2"])
    assert two[0].tokens_generate == 2 * (16 * 2) * 12 + 3 * 8 * 12  # PPS with M = 2: up to two hinted draws each
    gpu = sweep.expand([str(TINY)], tmp_path, seeds=[1], overrides=["run.mesh=data=2,fsdp=2"], cluster_has_gpus=True)
    assert gpu[0].gpus == 4  # the mesh names every axis: its device count
    assert sweep.expand([str(TINY)], tmp_path, cluster_has_gpus=True)[0].gpus == 1
    steps = sweep.expand([str(ROOT / "configs" / "empg_vs_grpo.yaml")], tmp_path, seeds=[3])
    assert [r.name for r in steps] == ["empg_vs_grpo/empg_seed3", "empg_vs_grpo/grpo_seed3"]


def test_a_folder_is_every_config_below_it_and_names_are_unique(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.yaml").write_text(TINY.read_text())
    (tmp_path / "a" / "sub").mkdir()
    (tmp_path / "a" / "sub" / "y.yaml").write_text(TINY.read_text())
    assert [n for _, n in sweep.config_files([str(tmp_path / "a")])] == ["sub/y", "x"]
    with pytest.raises(ValueError, match="share the run folders of x"):
        sweep.config_files([str(tmp_path / "a" / "x.yaml"), str(tmp_path / "a" / "x.yaml")])
    with pytest.raises(ValueError, match="no such config"):
        sweep.config_files([str(tmp_path / "nope.yaml")])


def test_run_states_from_their_folders(tmp_path):
    run = sweep.expand([str(TINY)], tmp_path, seeds=[257])[0]
    run.out.mkdir(parents=True)
    from fem_jax.config import dump_yaml

    (run.out / "config.yaml").write_text(dump_yaml(run.cfg))
    assert sweep.run_state(run.cfg, run.out) == ("partial", "")
    rows = [{"round": k, "iteration": k} for k in range(3)]
    (run.out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert sweep.run_state(run.cfg, run.out) == ("done", "")
    other = sweep.expand([str(TINY)], tmp_path, seeds=[257], overrides=["mstep.lr_start=0.5"])[0]
    state, error = sweep.run_state(other.cfg, run.out)
    assert state == "invalid" and "mstep.lr_start" in error


def test_dry_run_prints_runs_resources_and_estimates(tmp_path, capsys):
    assert sweep.main([str(TINY), "--schemes", "rs,pps", "--seeds", "257,521", "--out", str(tmp_path / "s"),
                       "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("| tiny/") == 4 and "4 runs: 0 done, 4 to run" in out and "tokens to generate" in out
    assert not (tmp_path / "s").exists()  # nothing run, nothing written
    assert sweep.main([str(TINY), "--seeds", "x", "--out", str(tmp_path / "s"), "--dry-run"]) == 2


def test_status_line_counts_runs_and_its_eta_learns_from_finished_ones(tmp_path):
    runs = sweep.expand([str(TINY)], tmp_path, seeds=[257, 521], schemes=["rs", "pps"])
    assert all(r.estimate_s > 0 for r in runs)
    s = sweep.Sweep(runs, tmp_path, max_retries=0, say=lambda line: None)
    pending = dict(enumerate(runs))
    line = s.status(pending, {runs[0].name: time.time()}, 0, 0.0)
    assert line.startswith("sweep: 0 done, 1 running, 3 queued, 0 failed; ETA ") and "configs' sizes" in line
    s.seconds[runs[0].name] = 100 * runs[0].estimate_s  # it took 100 times its estimate: the rest will too
    del pending[0]
    line = s.status(pending, {runs[1].name: time.time()}, 1, 0.0)
    assert line.startswith("sweep: 1 done, 1 running, 2 queued, 0 failed; ETA ") and "configs' sizes" not in line
    left = 100 * sum(r.estimate_s for r in runs[1:])  # one running: one slot
    assert line.split("ETA ")[1] in {sweep._duration(left - d) for d in (0, 1)}


# ----------------------------------------------------------------------------- on Ray


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _workers_running(name: str) -> list[int]:
    """Pids of Ray worker processes whose title names the task `name` (Ray titles a worker
    'ray::<task name>' while it runs a task)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if cmd.startswith("ray::") and name in cmd:
            pids.append(int(d.name))
    return pids


def test_a_run_keeps_its_cpu_until_it_ends(tmp_path, monkeypatch):
    """On a 1-CPU local cluster, three runs (each a 2-second body here) go one after another:
    a run must not hand its CPU back to Ray while it works (a ray.get inside the task would,
    letting a queued run start beside it)."""
    _ray_or_skip()
    import ray

    # the driver, its raylet and the workers must agree on authentication: with the mode set
    # for the workers alone, a driver that enables tokens (Ray's default) never sees a worker start
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    try:
        def body(config, out):
            import time as t

            t0 = t.time()
            t.sleep(2)
            return {"span": (t0, t.time())}

        progress = ray.remote(num_cpus=0)(sweep.Started).remote()
        task = ray.remote(max_calls=1)(sweep._task)
        refs = [task.options(num_cpus=1).remote(progress, f"run{i}", {}, str(tmp_path), body=body) for i in range(3)]
        spans = sorted(ray.get(r)["span"] for r in refs)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), spans  # no two at once
        assert sorted(ray.get(progress.started.remote())) == ["run0", "run1", "run2"]
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_sweep_on_a_local_ray_cluster_survives_a_killed_worker(tiny_cache, tmp_path):
    _ray_or_skip()
    from fem_jax.loop import run

    out = tmp_path / "sweep"
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {path: tiny-random-llama}\nrun: {iterations: 1}\n"
                   "task: {name: gsm8k, options: {path: /nonexistent/gsm8k, n_train: 4, n_test: 2}}\n")
    runs = sweep.expand([str(TINY)], out, seeds=[257, 521], schemes=["rs", "pps"])
    reference = {}
    for r in runs:  # the same runs, one by one, through the one entry for a run
        rows = run(r.cfg, tmp_path / "one_by_one" / r.name, log=lambda s: None)
        reference[r.name] = [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows]

    port = _free_port()
    # without token authentication on either side: `ray start` would turn it on wherever an
    # earlier local ray.init left ~/.ray/auth_token (README's sweep example does)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
           "PYTHONPATH": os.pathsep.join([str(ROOT)])}
    env.pop("XLA_FLAGS", None)
    ray_bin = Path(sys.executable).with_name("ray")
    subprocess.run([str(ray_bin), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
                    "--include-dashboard=false", "--disable-usage-stats"], env=env, check=True, capture_output=True,
                   timeout=300)
    try:
        cmd = [sys.executable, "-m", "fem_jax.sweep", str(TINY), str(bad), "--schemes", "rs,pps", "--seeds",
               "257,521", "--out", str(out), "--address", f"127.0.0.1:{port}"]
        log = tmp_path / "sweep.log"
        with open(log, "w") as f:
            p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
            victim, killed = "tiny/pps_seed257", None
            deadline = time.monotonic() + 900
            while p.poll() is None and time.monotonic() < deadline:
                if killed is None and (out / victim / "iter_1" / "rollouts.jsonl").exists():
                    pids = _workers_running(f"fem_jax:{victim}")
                    if pids:
                        os.kill(pids[0], signal.SIGKILL)  # mid-run: round 1's draws are in, its M-step runs
                        killed = pids[0]
                time.sleep(0.05)
            if p.poll() is None:
                p.kill()
        text = log.read_text()
        assert killed is not None, "no worker of the victim run was found to kill\n" + text[-3000:]
        assert p.returncode == 1, text[-3000:]  # the bad run failed; the others finished
        assert "bad/" in text and "failed: " in text and "/nonexistent/gsm8k" in text, text[-3000:]
        for r in runs:
            rows = [json.loads(x) for x in (out / r.name / "metrics.jsonl").read_text().splitlines()]
            assert [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows] == reference[r.name], r.name
        table = (out / "tables" / "table.md").read_text()
        assert "RS" in table and "PPS" in table and "257, 521" in table
        assert list((out / "tables").glob("curves-*.png"))

        again = subprocess.run([*cmd[:4], *cmd[5:]], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
        assert "4 runs, 4 already done, 0 invalid, 0 to run" in again.stdout, again.stdout
        assert "running" not in again.stdout.split("0 to run")[1]
    finally:
        subprocess.run([str(ray_bin), "stop", "--force"], env=env, capture_output=True, timeout=300)


def test_a_cluster_it_cannot_reach_is_one_line_naming_the_address_and_token_auth(tmp_path, capsys, monkeypatch):
    """ray.init(address=...) failing (here: a fake Ray whose init raises what Ray 2.60 raises
    for a token-auth cluster) is exit 2 and one line naming --address and RAY_AUTH_MODE."""
    import types

    def init(address=None, **kw):
        raise ConnectionError(f"Failed to connect to Ray cluster at {address}")

    monkeypatch.setitem(sys.modules, "ray", types.SimpleNamespace(init=init))
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    assert sweep.main([str(TINY), "--seeds", "1", "--out", str(tmp_path / "s"), "--address", "10.0.0.1:6379"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--address 10.0.0.1:6379: cannot connect" in err[0] and "RAY_AUTH_MODE=token" in err[0]
    assert not (tmp_path / "s").exists()
