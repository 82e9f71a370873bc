"""Per-phase wall time, compile time and peak memory of the embedded default's rounds.

    python benchmarks/phases.py                                 # configs/default.yaml, 1 iteration
    python benchmarks/phases.py --iterations 2 --set mstep.batch_size=16
    python benchmarks/phases.py --config configs/tiny.yaml --iterations 2

Runs the real loop (fem_jax.loop.run) in a scratch run folder and times each phase as the
loop calls it: setup (model, task, engine, trainer), evaluation, E-step, M-step, checkpoint,
engine sync, reports. For each phase it prints the seconds, the seconds XLA spent compiling
(jax.monitoring's backend-compile events) and the process's peak resident memory during the
phase (VmHWM, reset at each phase's start through /proc/self/clear_refs; Linux only), then
the run folder's size on disk. The persistent compilation cache is the CLI's
(`FEM_JAX_CACHE`/xla), so a second invocation shows a warm start; `--cold` uses an empty one.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _hwm_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak resident set size
    except OSError:
        pass


class Phases:
    def __init__(self):
        self.rows: list[dict] = []
        self.compile_s = 0.0

    def on_event(self, event: str, seconds: float, **_) -> None:
        if "backend_compile" in event:
            self.compile_s += seconds

    def wrap(self, owner, name: str, label):
        orig = getattr(owner, name)
        phases = self

        def timed(*args, **kwargs):
            what = label(*args) if callable(label) else label
            _reset_peak()
            c0, t0 = phases.compile_s, time.perf_counter()
            try:
                return orig(*args, **kwargs)
            finally:
                phases.rows.append({"phase": what, "seconds": time.perf_counter() - t0,
                                    "compile_s": phases.compile_s - c0, "peak_mb": _hwm_mb(), "rss_mb": _rss_mb()})

        setattr(owner, name, timed)
        return orig


def _folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"))
    ap.add_argument("--iterations", type=int, default=1, help="rounds to run (run.iterations)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--cold", action="store_true", help="an empty persistent compilation cache")
    ap.add_argument("--keep", default=None, help="keep the run folder here instead of a scratch folder")
    a = ap.parse_args(argv)

    import jax
    import jax.monitoring

    from fem_jax import checkpoint, experiment, loop
    from fem_jax.config import load_config
    from fem_jax.models import cache_dir

    xla = Path(tempfile.mkdtemp(prefix="xla-")) if a.cold else cache_dir() / "xla"
    jax.config.update("jax_compilation_cache_dir", str(xla))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    phases = Phases()
    jax.monitoring.register_event_duration_secs_listener(phases.on_event)

    cfg = load_config(a.config, [*a.set, f"run.iterations={a.iterations}"])
    out = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="fem-phases-")) / "run"
    name = lambda self, k, *_: f"{'iteration' if self.spec.loop == 'iterations' else 'step'} {k}"  # noqa: E731
    phases.wrap(loop.Experiment, "__init__", "setup (load model, task, engine, trainer)")
    phases.wrap(loop.Experiment, "evaluate", lambda self, k: f"{name(self, k)}: evaluate")
    phases.wrap(loop.Experiment, "estep", lambda self, k: f"{name(self, k)}: E-step")
    phases.wrap(loop.Experiment, "mstep", lambda self, k, *_: f"{name(self, k)}: M-step")
    phases.wrap(loop.Experiment, "_write_reports", "reports (metrics.jsonl, summary, plots)")
    phases.wrap(checkpoint.Checkpointer, "save", lambda self, k, *_: f"iteration {k}: checkpoint")
    phases.wrap(experiment, "release_memory", "release freed memory to the OS (malloc_trim)")
    orig_round = loop.Experiment.round

    def round_with_sync(self, k, ckpt):
        if not getattr(self.engine, "_timed", False):
            phases.wrap(self.engine, "sync", lambda w: f"iteration {w.round}: engine sync")
            self.engine._timed = True
        return orig_round(self, k, ckpt)

    loop.Experiment.round = round_with_sync
    t0 = time.perf_counter()
    rows = loop.run(cfg, out, log=lambda s: None)
    wall = time.perf_counter() - t0

    print(f"# {a.config} · {cfg.model.path} · {cfg.task.name} · {cfg.estep.scheme}/{cfg.mstep.objective} · "
          f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPUs "
          f"({'cold' if a.cold else 'warm'} compile cache)")
    print("| phase | seconds | of which compiling | peak RSS MB | RSS after MB |")
    print("|---|---:|---:|---:|---:|")
    merged: list[dict] = []
    for r in phases.rows:  # reports run after every round: one line per round is enough
        if merged and r["phase"] == merged[-1]["phase"]:
            merged[-1]["seconds"] += r["seconds"]
            continue
        merged.append(dict(r))
    for r in merged:
        print(f"| {r['phase']} | {r['seconds']:.1f} | {r['compile_s']:.1f} | {r['peak_mb']:.0f} | {r['rss_mb']:.0f} |")
    peak = max(r["peak_mb"] for r in phases.rows)
    print(f"\nwall {wall:.0f} s · peak RSS {peak:.0f} MB · run folder {_folder_mb(out):.0f} MB · "
          f"model cache {_folder_mb(cache_dir()) if cache_dir().exists() else 0:.0f} MB")
    last = rows[-1]
    print(f"last round: test accuracy {last.get('test_accuracy')}, trained {last.get('trained')}, "
          f"train loss {last.get('train_loss')}")
    if not a.keep:
        shutil.rmtree(out.parent, ignore_errors=True)
    if a.cold:
        shutil.rmtree(xla, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
