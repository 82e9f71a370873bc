"""Many runs as one sweep on Ray: configs x seeds (x the arms a config compares), resumable.

    python -m fem_jax.sweep CONFIG_OR_FOLDER [...] --seeds 257,521,1031 --out runs/table1
        [--schemes rs,star,pps | --objectives empg,grpo] [--set a.b=c ...]
        [--address HOST:PORT] [--gpus-per-run N] [--cpus-per-run N] [--memory-per-run GB]
        [--max-retries 3] [--dry-run]

A folder stands for every *.yaml below it (configs/paper/experiments/qwen2.5-1.5b: the EMPG
paper's four runs of that model). Each config x seed (x scheme or objective, from --schemes /
--objectives or the config's own `compare` section) is one run, in its usual run folder
`OUT/<config path>/<arm>_seed<seed>` (the config's path below the folder given, without
.yaml; the arm is the E-step scheme or the objective), made by `fem_jax.loop.run`, the entry
launch/run.py calls too. Each run is one Ray task in a fresh worker process (JAX's device
state and memory are the run's own), asking for the resources its config needs: GPUs (the
mesh's device count when it names every axis, else --gpus-per-run, default 1 where the
cluster has GPUs), CPUs (--cpus-per-run, default 1) and host memory (estimated from the
model's size, or --memory-per-run). Without --address a local Ray cluster is started on this
machine; with it the runs go to that cluster (`ray start --head` on one node, `ray start
--address` on the others, or Ray on SLURM), whose nodes must all see OUT (a shared file
system) and the model and data paths of the configs.

Resumable: a run whose folder already holds all its rounds is not submitted again; the others
are, and continue from their folders (launch/run.py's resume). A worker that dies (kill -9,
a lost node) is retried by Ray (--max-retries) and its run resumes from its last checkpoint,
ending with the metrics of an uninterrupted run. A run that fails for a reason of its own
(bad data, a config error) is reported with its one-line error; the others go on, and the
sweep exits with code 1.

While it runs: a line of done / running / queued / failed with an ETA when the counts change
(else once a minute), and after each
finished run the papers' tables (fem_jax.report.paper_table: FEM's Table 1 with Base, mean ±
s.e. over seeds and the PPS-vs-STaR binomial p-value; EMPG's Table 1, the mean of the last 10
evaluations) rewritten in OUT/tables/ (table.md, table.json, one figure per table row).
--dry-run prints the runs, their resources and an estimate of their time from the configs'
sizes (tokens to generate and to train) and runs nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Sequence

from . import config as config_lib
from .config import Config

# Rough throughputs, in parameter-tokens per second (tokens x model parameters): what the
# dry run's time estimate divides by, until finished runs of the sweep give their own. CPU:
# the embedded default on 2 cores (SmolLM2-135M, float32: ~120 tokens/s generated in its
# E-step, ~300 trained per second); GPU: one H100-class GPU per run, at a guessed 3,000
# generated tokens/s and 20,000 trained tokens/s for a 1.5B model. Estimates, not promises.
RATES = {"cpu": {"generate": 1.6e10, "train": 4.0e10}, "gpu": {"generate": 4.5e12, "train": 3.0e13}}


@dataclasses.dataclass
class RunSpec:
    """One run of the sweep."""

    name: str  # its folder below --out
    source: str  # the config file it came from
    cfg: Config
    out: Path
    gpus: float
    cpus: float
    memory: int  # bytes of host memory asked of Ray
    params: int  # the model's parameter count (0: unknown)
    tokens_generate: int
    tokens_train: int
    state: str = "new"  # new | partial | done | invalid
    error: str = ""

    @property
    def estimate_s(self) -> float:
        rate = RATES["gpu" if self.gpus else "cpu"]
        p = self.params or 1e9
        return (self.tokens_generate * p / rate["generate"] + self.tokens_train * p / rate["train"]) / max(
            1.0, self.gpus)


# ----------------------------------------------------------------------------- expanding configs into runs


def config_files(paths: Sequence[str]) -> list[tuple[Path, str]]:
    """(config file, its name: its path below the folder given, without .yaml) for every
    argument: a file as it is, a folder as every *.yaml below it (sorted)."""
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            files = sorted(f for f in p.rglob("*.yaml") if not any(part.startswith(".") for part in f.parts))
            if not files:
                raise ValueError(f"{p}: no *.yaml below it")
            out += [(f, f.relative_to(p).with_suffix("").as_posix()) for f in files]
        elif p.is_file():
            out.append((p, p.stem))
        else:
            raise ValueError(f"{p}: no such config file or folder")
    names = [n for _, n in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"two configs would share the run folders of {dup[0]}; give them from one folder")
    return out


def expand(paths: Sequence[str], out: Path, *, seeds: Sequence[int] = (), schemes: Sequence[str] = (),
           objectives: Sequence[str] = (), overrides: Sequence[str] = (), gpus_per_run: float | None = None,
           cpus_per_run: float = 1.0, memory_per_run_gb: float | None = None,
           cluster_has_gpus: bool = False) -> list[RunSpec]:
    """Every run of the sweep, its state read from its folder (done runs are not run again)."""
    extra = list(overrides)
    if seeds:
        extra.append(f"compare.seeds={','.join(map(str, seeds))}")
    if schemes:
        extra.append(f"compare.schemes={','.join(schemes)}")
    if objectives:
        extra.append(f"compare.objectives={','.join(objectives)}")
    runs = []
    for file, name in config_files(paths):
        try:
            cfg = config_lib.load_config(file, extra)
        except ValueError as e:
            raise ValueError(f"{file}: {' '.join(str(e).split())}") from None
        for arm, seed, c in cfg.arms():
            if c.objective.loop == "steps":  # a policy-gradient run is named after its objective (and trainer)
                arm = c.mstep.objective + ("-trl" if c.run.trainer == "trl" else "")
            gpus = _gpus(c, gpus_per_run, cluster_has_gpus)
            params = model_params(c.model.path)
            memory = int((memory_per_run_gb or _memory_gb(params, gpus)) * 2**30)
            gen, train = work_tokens(c)
            run_out = out / name / f"{arm}_seed{seed}"
            spec = RunSpec(f"{name}/{arm}_seed{seed}", str(file), c, run_out, gpus, cpus_per_run, memory, params,
                           gen, train)
            spec.state, spec.error = run_state(c, run_out)
            runs.append(spec)
    return runs


def _gpus(cfg: Config, gpus_per_run: float | None, cluster_has_gpus: bool) -> float:
    """The mesh's device count when it names every axis; else --gpus-per-run; else one GPU
    where the cluster has GPUs (a -1 axis then spans the GPUs Ray gives the run), none on CPUs."""
    if gpus_per_run is not None:
        return gpus_per_run
    sizes = [int(x.split("=")[1]) for x in cfg.run.mesh.split(",") if "=" in x] if cfg.run.mesh else []
    if sizes and all(n > 0 for n in sizes) and cluster_has_gpus:
        return float(math.prod(sizes))
    return 1.0 if cluster_has_gpus else 0.0


def _memory_gb(params: int, gpus: float) -> float:
    """Host memory a run needs, roughly: on CPUs the float32 weights, gradients and Adam's two
    moments plus a step's temporaries (~24 bytes a parameter; the default measured 3.9 GB for
    135M parameters), on GPUs the weights staged through the host once (~6 bytes a parameter)."""
    per_param = 6 if gpus else 24
    return max(2.0, (per_param * params) / 2**30 + 1.5)


def model_params(path: str) -> int:
    """The model's parameter count from its config.json (a local folder or a builtin model
    already in the cache), else from a size in its name (1.5B, 135M), else 0."""
    from .models.builtin import cache_dir

    for folder in (Path(path), cache_dir() / path):
        cfg_file = folder / "config.json"
        if cfg_file.is_file():
            from .models.transformer import ModelConfig, param_shapes

            cfg = ModelConfig.from_hf_config(json.loads(cfg_file.read_text()))
            return sum(math.prod(shape) for shape, _ in param_shapes(cfg).values())
    m = re.search(r"(\d+(?:\.\d+)?)\s*([bBmM])(?![a-zA-Z])", Path(path).name)
    if m:
        return int(float(m.group(1)) * (1e9 if m.group(2).lower() == "b" else 1e6))
    return 0


def work_tokens(cfg: Config) -> tuple[int, int]:
    """(tokens to generate, tokens to train) over the whole run, upper bounds from the config:
    every draw and evaluation at its max_new_tokens, every trained sequence at a prompt of ~100
    tokens plus its completion, every draw trained on (FEM trains on fewer)."""
    e, ev, spec = cfg.estep, cfg.eval, cfg.objective
    opts = cfg.task.options
    n_train = int(opts.get("n_train", 0) or 0)
    n_test = int(opts.get("n_test", 0) or 0)
    k = cfg.run.iterations
    from .estep import plan

    tries = len(plan(e.scheme, e.budget))
    draws = (e.prompts_per_step if spec.loop == "steps" else n_train) * e.samples_per_prompt * tries
    evals = len({j for j in range(0, k + 1) if j % ev.every == 0 or j == k})
    generate = k * draws * e.max_new_tokens + evals * n_test * (1 + ev.n_samples) * ev.max_new_tokens
    train = k * draws * (100 + e.max_new_tokens) * cfg.mstep.epochs
    return generate, train


def run_state(cfg: Config, out: Path) -> tuple[str, str]:
    """("done" | "partial" | "new" | "invalid", error): done when the folder holds every round
    of the config; invalid when it was made with settings this config would change."""
    from .run_folder import check_out

    try:
        check_out(cfg, out)
    except ValueError as e:
        return "invalid", " ".join(str(e).split())
    if not (out / "config.yaml").exists():
        return "new", ""
    try:
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    except (OSError, ValueError):  # not written yet, or damaged: the run's own resume sorts it out
        return "partial", ""
    done = {r.get("round") for r in rows}
    return ("done" if done >= set(range(cfg.run.iterations + 1)) else "partial"), ""


# ----------------------------------------------------------------------------- one run, in a Ray worker


def run_one(config: dict, out: str) -> dict:
    """One run, start to end or from where its folder stopped (fem_jax.loop.run), its console
    lines and library logs into the run folder's log.txt. A run's own error (bad input: a
    ValueError, a missing file or key) comes back as {"error": one line}; anything else is
    raised (and a dead worker retried by Ray)."""
    import logging

    from .console import Console, quiet_libraries, route_library_logs
    from .loop import run

    buffer = quiet_libraries()
    cfg = config_lib.from_dict(config, "the sweep's config")
    out_path = Path(out)
    t = time.time()
    try:
        route_library_logs(buffer, out_path, True)
        rows = run(cfg, out_path, console=Console(logging.getLogger("fem_jax.run").info))
    except (ValueError, FileNotFoundError, KeyError) as e:
        return {"error": " ".join(str(e).split()) or type(e).__name__, "seconds": time.time() - t}
    return {"rounds": len(rows), "seconds": time.time() - t, "pid": os.getpid()}


# ----------------------------------------------------------------------------- the sweep


def dry_run(runs: list[RunSpec]) -> str:
    lines = ["| run | state | GPUs | CPUs | memory GB | parameters | tokens to generate | tokens to train | "
             "estimate h |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        lines.append(f"| {r.name} | {r.state}{' (' + r.error + ')' if r.error else ''} | {r.gpus:g} | {r.cpus:g} | "
                     f"{r.memory / 2**30:.1f} | {_si(r.params)} | {_si(r.tokens_generate)} | {_si(r.tokens_train)} | "
                     f"{r.estimate_s / 3600:.2f} |")
    todo = [r for r in runs if r.state in ("new", "partial")]
    lines.append(f"\n{len(runs)} runs: {sum(r.state == 'done' for r in runs)} done, {len(todo)} to run "
                 f"(estimated {sum(r.estimate_s for r in todo) / 3600:.1f} h one after another; tokens are upper "
                 "bounds: every draw at max_new_tokens)")
    return "\n".join(lines)


def _si(n: float) -> str:
    for unit, v in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= v:
            return f"{n / v:.1f}{unit}"
    return f"{n:.0f}"


class Sweep:
    """Submits the runs to Ray, follows them, keeps the tables current."""

    def __init__(self, runs: list[RunSpec], out: Path, max_retries: int, say=print, interval: float = 2.0,
                 heartbeat: float = 60.0):
        self.runs, self.out, self.max_retries, self.say, self.interval = runs, out, max_retries, say, interval
        self.heartbeat = heartbeat  # seconds between two status lines that say the same counts
        self.failed: dict[str, str] = {}
        self.seconds: dict[str, float] = {}

    def run(self) -> int:
        import ray

        todo = [r for r in self.runs if r.state in ("new", "partial")]
        for r in self.runs:
            if r.state == "invalid":
                self.failed[r.name] = r.error
        done = sum(r.state == "done" for r in self.runs)
        self.say(f"sweep: {len(self.runs)} runs, {done} already done, {len(self.failed)} invalid, {len(todo)} to run; "
                 f"Ray {ray.__version__} at {ray.get_runtime_context().gcs_address}")
        if done:
            self.tables()
        if not todo:
            return self.finish()
        progress = ray.remote(num_cpus=0)(Started).remote()
        # max_calls=1: a fresh worker process per run (JAX and vLLM keep memory a process never returns)
        task = ray.remote(max_calls=1)(_task)
        pending = {}
        for r in todo:
            ref = task.options(num_cpus=r.cpus, num_gpus=r.gpus, memory=r.memory, name=f"fem_jax:{r.name}",
                               max_retries=self.max_retries, retry_exceptions=False).remote(
                progress, r.name, config_lib.to_dict(r.cfg), str(r.out))
            pending[ref] = r
        t0 = time.time()
        finished = 0
        last, said = "", 0.0
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=self.interval)
            for ref in ready:
                r = pending.pop(ref)
                try:
                    res = ray.get(ref)
                except Exception as e:  # noqa: BLE001  a bug, or retries exhausted: this run fails, the others go on
                    res = {"error": _one_line(e)}
                finished += 1
                if "error" in res:
                    self.failed[r.name] = res["error"]
                    self.say(f"sweep: {r.name} failed: {res['error']}")
                else:
                    self.seconds[r.name] = res["seconds"]
                    self.say(f"sweep: {r.name} done in {res['seconds'] / 60:.1f} min")
                    self.tables()
            started = ray.get(progress.started.remote())
            line = self.status(pending, started, finished, time.time() - t0)
            counts = line.split(";")[0]
            if counts != last or time.time() - said >= self.heartbeat:  # a change, else once a minute
                self.say(line)
                last, said = counts, time.time()
        return self.finish()

    def status(self, pending: dict, started: dict, finished: int, elapsed: float) -> str:
        running = [r for r in pending.values() if r.name in started]
        queued = len(pending) - len(running)
        done = sum(r.state == "done" for r in self.runs) + len(self.seconds)
        left = sum(r.estimate_s for r in pending.values())
        ran = [r for r in self.runs if r.name in self.seconds]
        scale = (sum(self.seconds[r.name] for r in ran) / max(1e-9, sum(r.estimate_s for r in ran))) if ran else 1.0
        slots = max(1, len(running))
        eta = left * scale / slots - sum(time.time() - started[r.name] for r in running) / slots
        return (f"sweep: {done} done, {len(running)} running, {queued} queued, {len(self.failed)} failed; "
                f"ETA {_duration(max(0.0, eta))}" + ("" if ran else " (from the configs' sizes)"))

    def tables(self) -> None:
        from .report import ReportError, paper_table

        try:
            paper_table([self.out], self.out / "tables")
        except ReportError as e:
            self.say(f"sweep: tables not written: {e}")

    def finish(self) -> int:
        if self.failed:
            self.say(f"sweep: {len(self.failed)} run(s) failed:")
            for name, err in self.failed.items():
                self.say(f"  {name}: {err}")
        table = self.out / "tables" / "table.md"
        if table.exists():
            self.say(f"sweep: tables in {table} (and {self.out / 'tables'}/*.png)")
        return 1 if self.failed else 0


def _task(progress, name: str, config: dict, out: str, body=None) -> dict:
    """The Ray task of one run: say it started (a retried task says so again), then run it
    (`body`, run_one unless a test gives another). The start is told without waiting for the
    answer: a task blocked in ray.get lends its CPUs back to Ray meanwhile, and Ray would start
    a queued run in them (three runs at once on a 2-CPU cluster)."""
    progress.start.remote(name)
    return (body or run_one)(config, out)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    last = [x for x in text if x.strip()]
    return (last[-1] if last else type(e).__name__)[:500]


def _duration(s: float) -> str:
    return f"{s / 3600:.1f} h" if s >= 3600 else f"{s / 60:.0f} min" if s >= 60 else f"{s:.0f} s"


class Started:
    """A Ray actor (ray.remote(Started)): which runs a worker has picked up, and when (a
    retried run reports itself again)."""

    def __init__(self):
        self._started: dict[str, float] = {}

    def start(self, name: str) -> None:
        self._started[name] = time.time()

    def started(self) -> dict[str, float]:
        return dict(self._started)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fem_jax.sweep", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("configs", nargs="+", metavar="CONFIG_OR_FOLDER")
    p.add_argument("--out", required=True, type=Path, help="the sweep's folder: one run folder per run below it")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default: each config's compare.seeds or "
                   "run.seed)")
    p.add_argument("--schemes", default=None, help="comma-separated E-step schemes, one run each")
    p.add_argument("--objectives", default=None, help="comma-separated objectives, one run each")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field of every config")
    p.add_argument("--address", default=None, help="an existing Ray cluster (HOST:PORT, or 'auto'); default: a "
                   "local one on this machine")
    p.add_argument("--gpus-per-run", type=float, default=None, help="GPUs per run (default: the mesh's devices, "
                   "else 1 where the cluster has GPUs)")
    p.add_argument("--cpus-per-run", type=float, default=1.0, help="CPUs per run (default 1)")
    p.add_argument("--memory-per-run", type=float, default=None, metavar="GB",
                   help="host memory per run (default: estimated from the model's size)")
    p.add_argument("--max-retries", type=int, default=3, help="Ray's retries of a run whose worker died (default 3)")
    p.add_argument("--dry-run", action="store_true", help="print the runs, their resources and time estimates; "
                   "run nothing")
    a = p.parse_args(argv)
    split = lambda s: [x for x in (s or "").split(",") if x]  # noqa: E731
    try:
        seeds = [int(x) for x in split(a.seeds)]
    except ValueError:
        print(f"{p.prog}: error: --seeds {a.seeds!r}: not a comma-separated list of integers", file=sys.stderr)
        return 2
    try:
        kw = dict(seeds=seeds, schemes=split(a.schemes), objectives=split(a.objectives), overrides=a.set,
                  gpus_per_run=a.gpus_per_run, cpus_per_run=a.cpus_per_run, memory_per_run_gb=a.memory_per_run)
        if a.dry_run:
            print(dry_run(expand(a.configs, a.out, cluster_has_gpus=_local_gpus() > 0, **kw)))
            return 0
        try:
            import ray
        except ImportError as e:
            raise ValueError(f"Ray is not installed ({e}): pip install -e \".[ray]\"") from None
        _connect(ray, a.address)
        runs = expand(a.configs, a.out, cluster_has_gpus=ray.cluster_resources().get("GPU", 0) > 0, **kw)
    except ValueError as e:
        print(f"{p.prog}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    a.out.mkdir(parents=True, exist_ok=True)
    from .console import say  # the run's own line format; Console itself would start JAX in this driver

    return Sweep(runs, a.out, a.max_retries, say).run()


def _connect(ray, address: str | None) -> None:
    """ray.init: a new local cluster, or the one at `address`; a failure to connect is one
    line. Ray's token authentication trips users up: `ray start` turns it on where
    ~/.ray/auth_token exists (a local ray.init writes one), while a client connecting to it
    sends the token only with RAY_AUTH_MODE=token, so the line says so."""
    kw = dict(log_to_driver=False, include_dashboard=False, configure_logging=False)
    if not address:
        ray.init(**kw)
        return
    try:
        ray.init(address=address, **kw)
    except Exception as e:  # noqa: BLE001  ConnectionError, or a RuntimeError around an AuthenticationError
        hint = ("" if os.environ.get("RAY_AUTH_MODE", "").lower() == "token" else
                "; if the cluster uses token authentication, set RAY_AUTH_MODE=token here, with its token in "
                "RAY_AUTH_TOKEN or ~/.ray/auth_token")
        raise ValueError(f"--address {address}: cannot connect to a Ray cluster there ({_one_line(e)}){hint}") from None


def _local_gpus() -> int:
    import shutil
    import subprocess

    if not shutil.which("nvidia-smi"):
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


if __name__ == "__main__":
    sys.exit(main())
