"""Experiment trackers: metrics where researchers look (TensorBoard, Weights & Biases, trackio).

`run.report_to` takes TRL's names: ``tensorboard``, ``wandb``, ``trackio``; ``none`` or an
empty list means no tracker. Each backend is an optional extra, imported only when named::

    with make_trackers(["tensorboard", "wandb"], run_dir, config, run_name, resume) as trackers:
        trackers.log({"em/iteration": k, "mstep/loss": 0.41}, step=global_step)
        trackers.log_table("eval/samples", ["prompt", "completion", "reward", "kept"], rows, step)

``step`` is the global step (optimizer steps so far, monotone); the EM iteration travels as a
scalar (``em/iteration``). Names pass through unchanged: the loop groups them by phase
(``estep/...``, ``mstep/loss``, ``eval/test_accuracy``, ``eval/pass@4``, ...).
The resolved ``config`` goes in once, at `make_trackers`: TensorBoard gets it as a YAML text
(``config``) plus the HParams plugin's session info, W&B and trackio as their run config.

Where each writes:
  tensorboard  ``run_dir/tensorboard/`` (event files; ``tensorboard --logdir run_dir``)
  wandb        ``run_dir/wandb/`` unless WANDB_DIR is set; project: the `project` argument,
               else WANDB_PROJECT, else "fem-jax". WANDB_MODE=offline works as usual.
  trackio      trackio's own store (TRACKIO_DIR, default ~/.cache/huggingface/trackio, or a
               Space through TRACKIO_SPACE_ID); project: `project`, else TRACKIO_PROJECT, else
               "fem-jax"; ``trackio show --project fem-jax``.

Resume and de-duplication (one rule for every backend). ``run_dir/trackers.json`` (written
atomically after every call that logged something) is a ledger: per tracker, the last step
logged and the names logged at that step, and the W&B run id / trackio run name, made once.
A value (name, step) reaches a tracker only if ``step > last_step``, or ``step == last_step``
and the name was not logged at that step yet. So after a crash the loop may replay steps
from an older checkpoint: whatever a tracker already has is never written again, and
what it never got (the names of a step cut short) still is. Steps below the ledger are also
dropped within one session (a step going backwards is a loop bug; trackers want monotone
steps). `resume=True` continues the same tracker runs: the same TensorBoard folder, the same
W&B id (``wandb.init(id=..., resume="allow")``), the same trackio run name
(``resume="allow"``, and only for a run this folder's ledger made: trackio finds runs by
name, so a fresh folder never joins another folder's namesake). `resume=False` starts over:
a new W&B id, a new trackio run, a fresh ledger, and TensorBoard readers drop whatever the
folder held before. A loop that always continues in its run folder can pass resume=True.

TensorBoard writes synchronously (tensorboardX's `EventsWriter`, flushed on every call, so
the ledger never runs ahead of the file) and each session opens a new event file that
begins with a ``SessionLog.START`` at ``last_step + 1`` -- what `SummaryWriter(purge_step=)`
writes. Readers that honor it (TensorBoard's Python loader, `EventAccumulator`) then also
hide the one call that may have reached the file but not the ledger when the process was
killed. W&B and trackio buffer in the background: a hard kill can lose their last points
(the ledger already counts them, so they are not re-sent; never twice beats always).
W&B offline runs: every session leaves its own ``offline-run-*`` folder with the same id;
their steps never overlap, so ``wandb sync --append`` them in order. (W&B's `finish()`
returns before its service has written the run file; process exit or `wandb.teardown()`
waits for it.)

Only process 0 logs: `is_main_process=False` returns a composite that does nothing and
writes nothing.
"""

from __future__ import annotations

import importlib
import json
import os
import secrets
import string
import time
from pathlib import Path
from typing import Any, Protocol, Sequence

from .io import atomic_write_text

LEDGER = "trackers.json"
DEFAULT_PROJECT = "fem-jax"


def _require(backend) -> Any:
    """Import the backend's package, or say in one line which extra installs it."""
    try:
        return importlib.import_module(backend.module)
    except ImportError:
        raise ImportError(f"run.report_to: {backend.name} needs the '{backend.extra}' extra: "
                          f'pip install -e ".[{backend.extra}]"') from None


def _names(report_to: Sequence[str] | str | None) -> list[str]:
    if report_to is None or isinstance(report_to, str):
        report_to = [] if report_to is None else [report_to]
    names = []
    for name in report_to:
        if name == "none":
            continue
        if name not in REPORT_TO:
            raise ValueError(f"run.report_to: unknown tracker {name!r}; choose from "
                             f"{', '.join(REPORT_TO)} (or none)")
        if name not in names:
            names.append(name)
    return names


def _plain(x: Any) -> Any:
    """The config as YAML/JSON-safe values (paths, tuples, enums become str / lists)."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    return str(x)


def _flat(config: dict, prefix: str = "") -> dict[str, Any]:
    """{"mstep": {"lr": 1e-5}} -> {"mstep.lr": 1e-5}; lists as their str."""
    out = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = str(v) if isinstance(v, list) else v
    return out


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-style markdown table; '|' escaped and newlines as <br> so a cell stays a cell."""
    def cell(v: Any) -> str:
        return str(v).replace("\\", "\\\\").replace("|", "\\|").replace("\r", "").replace("\n", "<br>")
    lines = ["| " + " | ".join(cell(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- the ledger

class _Ledger:
    """``run_dir/trackers.json``: {tracker: {"last_step": int, "last_keys": [...], ...ids}}."""

    def __init__(self, path: Path, resume: bool):
        self.path = path
        self.state: dict[str, dict] = {}
        if resume and path.exists():
            self.state = json.loads(path.read_text())
        self._dirty = True  # a fresh ledger replaces an old one at once

    def entry(self, tracker: str) -> dict:
        return self.state.setdefault(tracker, {"last_step": -1, "last_keys": []})

    def new_keys(self, tracker: str, step: int, keys: Sequence[str]) -> list[str]:
        e = self.entry(tracker)
        if step > e["last_step"]:
            return list(keys)
        if step == e["last_step"]:
            seen = set(e["last_keys"])
            return [k for k in keys if k not in seen]
        return []

    def mark(self, tracker: str, step: int, keys: Sequence[str]) -> None:
        e = self.entry(tracker)
        if step > e["last_step"]:
            e["last_step"], e["last_keys"] = step, sorted(keys)
        else:
            e["last_keys"] = sorted(set(e["last_keys"]) | set(keys))
        self._dirty = True

    def commit(self) -> None:
        if self._dirty:
            atomic_write_text(self.path, json.dumps(self.state, indent=1, sort_keys=True) + "\n")
            self._dirty = False


# ---------------------------------------------------------------------------- backends

class _Tracker(Protocol):
    """A backend: `name` (its run.report_to value), `module` (what it imports), `extra` (the
    pip extra that installs it), opened as cls(run_dir, config, run_name, project, entry,
    resume) where `entry` is its ledger entry (ids it makes go there)."""

    name: str
    module: str
    extra: str

    def scalars(self, values: dict[str, float], step: int) -> None: ...
    def table(self, name: str, columns: list[str], rows: list[list], step: int) -> None: ...
    def close(self) -> None: ...


class _TensorBoard:
    name, module, extra = "tensorboard", "tensorboardX", "tensorboard"

    def __init__(self, run_dir: Path, config: dict, run_name: str, project: str | None, entry: dict,
                 resume: bool):
        _require(self)
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event, SessionLog
        from tensorboardX.proto.summary_pb2 import Summary
        from tensorboardX.summary import hparams, text

        self._Event, self._Summary, self._text = Event, Summary, text
        logdir = run_dir / "tensorboard"
        logdir.mkdir(parents=True, exist_ok=True)
        # file names carry whole seconds: a sequence number keeps two sessions in the same
        # second apart and in reading order
        n = len(list(logdir.glob("events.out.tfevents.*")))
        self._w = EventsWriter(str(logdir / "events"), f".{n:04d}")
        purge = entry["last_step"] + 1  # SummaryWriter(purge_step=...) writes this marker
        self._write(Event(step=purge, session_log=SessionLog(status=SessionLog.START)))
        if purge == 0:  # a fresh run (or one that had logged nothing): the config, once
            import yaml

            self._write(Event(step=0, summary=text(
                "config", "```yaml\n" + yaml.safe_dump(config, sort_keys=False) + "```")))
            _, session_start, _ = hparams(_flat(config), {})  # metrics: inferred by the plugin
            self._write(Event(step=0, summary=session_start))
        self._w.flush()

    def _write(self, event) -> None:
        event.wall_time = time.time()
        self._w.write_event(event)

    def scalars(self, values: dict[str, float], step: int) -> None:
        summary = self._Summary(value=[self._Summary.Value(tag=k, simple_value=v) for k, v in values.items()])
        self._write(self._Event(step=step, summary=summary))
        self._w.flush()

    def table(self, name: str, columns: list[str], rows: list[list], step: int) -> None:
        self._write(self._Event(step=step, summary=self._text(name, markdown_table(columns, rows))))
        self._w.flush()

    def close(self) -> None:
        self._w.close()


class _WandB:
    name, module, extra = "wandb", "wandb", "wandb"

    def __init__(self, run_dir: Path, config: dict, run_name: str, project: str | None, entry: dict,
                 resume: bool):
        wandb = _require(self)
        self._wandb = wandb
        if "id" not in entry:
            # W&B's own form of run id: 8 characters of [a-z0-9]
            entry["id"] = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
        self._run = wandb.init(
            project=project or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT,
            name=run_name, id=entry["id"], resume="allow", config=config, reinit="create_new",
            dir=os.environ.get("WANDB_DIR") or str(run_dir))

    def scalars(self, values: dict[str, float], step: int) -> None:
        self._run.log(values, step=step)

    def table(self, name: str, columns: list[str], rows: list[list], step: int) -> None:
        self._run.log({name: self._wandb.Table(columns=list(columns), data=[list(r) for r in rows])}, step=step)

    def close(self) -> None:
        self._run.finish()


class _Trackio:
    name, module, extra = "trackio", "trackio", "trackio"

    def __init__(self, run_dir: Path, config: dict, run_name: str, project: str | None, entry: dict,
                 resume: bool):
        trackio = self._trackio = _require(self)
        self._Table = getattr(trackio, "Table", None)  # older trackio: tables are skipped
        # trackio resumes by (project, name): only a run this folder made (its ledger says so) is
        # resumed, never another folder's run that happens to share the name
        made_here = "name" in entry
        entry.setdefault("project", project or os.environ.get("TRACKIO_PROJECT") or DEFAULT_PROJECT)
        entry.setdefault("name", run_name)
        self._run = trackio.init(project=entry["project"], name=entry["name"], config=config,
                                 resume="allow" if resume and made_here else "never", embed=False)

    def scalars(self, values: dict[str, float], step: int) -> None:
        self._run.log(values, step=step)

    def table(self, name: str, columns: list[str], rows: list[list], step: int) -> None:
        if self._Table is not None:
            self._run.log({name: self._Table(columns=list(columns), data=[list(r) for r in rows])}, step=step)

    def close(self) -> None:
        if self._trackio.context_vars.current_run.get() is self._run:
            self._trackio.finish()  # also forgets it, so that trackio's atexit hook does not finish it again
        else:
            self._run.finish()


_BACKENDS: dict[str, type] = {b.name: b for b in (_TensorBoard, _WandB, _Trackio)}
REPORT_TO = tuple(_BACKENDS)  # ("tensorboard", "wandb", "trackio")


# ---------------------------------------------------------------------------- the composite

class Trackers:
    """Every tracker named in `run.report_to`, behind one ledger; see the module docstring."""

    def __init__(self, trackers: Sequence[_Tracker] = (), ledger: _Ledger | None = None):
        if trackers and ledger is None:
            raise ValueError("Trackers: trackers need a ledger (Trackers() alone is the no-op)")
        self._trackers = list(trackers)
        self._ledger = ledger
        self._closed = False

    @property
    def names(self) -> list[str]:
        return [t.name for t in self._trackers]

    def __bool__(self) -> bool:
        return bool(self._trackers)

    def log(self, scalars: dict[str, Any], step: int) -> None:
        """Scalars at the global `step`; None values are skipped, the rest go through float()."""
        step = self._step(step)
        values = {k: float(v) for k, v in scalars.items() if v is not None}
        if not values or not self._trackers:
            return
        try:
            for t in self._trackers:
                keys = self._ledger.new_keys(t.name, step, list(values))
                if keys:
                    t.scalars({k: values[k] for k in keys}, step)
                    self._ledger.mark(t.name, step, keys)
        finally:  # what reached a tracker is recorded even if the next one raised
            self._ledger.commit()

    def log_table(self, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int) -> None:
        """A small table (e.g. sampled rationales, kept and rejected, with rewards) at `step`:
        TensorBoard as a markdown table in the Text tab, W&B as a wandb.Table, trackio as a
        trackio.Table (skipped by a trackio without one)."""
        step = self._step(step)
        if not self._trackers:
            return
        columns, rows = [str(c) for c in columns], [list(r) for r in rows]
        try:
            for t in self._trackers:
                if self._ledger.new_keys(t.name, step, [name]):
                    t.table(name, columns, rows, step)
                    self._ledger.mark(t.name, step, [name])
        finally:
            self._ledger.commit()

    def _step(self, step: int) -> int:
        if self._closed:
            raise RuntimeError("Trackers: log after close()")
        step = int(step)
        if step < 0:
            raise ValueError(f"Trackers: step must be >= 0, got {step}")
        return step

    def close(self) -> None:
        """Finish every tracker run (idempotent)."""
        if self._closed:
            return
        self._closed = True
        try:
            for t in self._trackers:
                t.close()
        finally:
            if self._ledger is not None:
                self._ledger.commit()

    def __enter__(self) -> "Trackers":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def make_trackers(report_to: Sequence[str] | str | None, run_dir: str | os.PathLike, config: dict,
                  run_name: str, resume: bool, is_main_process: bool = True,
                  project: str | None = None) -> Trackers:
    """Open the trackers named in `report_to` (TRL's names; "none" or [] for none).

    `config` is the resolved config (a nested dict), logged once as hyperparameters.
    `resume=True` continues the tracker runs recorded in ``run_dir/trackers.json`` (if any);
    `resume=False` starts new ones. `project` names the W&B / trackio project (default: the
    WANDB_PROJECT / TRACKIO_PROJECT variable, else "fem-jax"). Unknown names raise ValueError,
    a named tracker whose extra is missing ImportError, both before anything is opened.
    """
    names = _names(report_to)
    if not is_main_process or not names:
        return Trackers()
    for name in names:  # every import error before any run is opened
        _require(_BACKENDS[name])
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config = _plain(config)
    ledger = _Ledger(run_dir / LEDGER, resume)
    opened: list[_Tracker] = []
    try:
        for name in names:
            opened.append(_BACKENDS[name](run_dir, config, run_name, project, ledger.entry(name), resume))
        ledger.commit()
    except BaseException:
        for t in opened:
            t.close()
        raise
    return Trackers(opened, ledger)


def round_scalars(row: dict) -> dict[str, float]:
    """A round's metrics row as tracker scalars grouped by phase (estep/, mstep/, sync/, eval/,
    round/); text fields (sync_method, a fallback's reason) are left out."""
    phase = {"data_utilization": "estep", "acceptance_rate": "estep", "reward_mean": "estep", "draws": "estep",
             "accepted": "estep", "trained": "estep", "hint_leaks": "estep", "reasoning_length_trained": "estep",
             "response_length": "estep", "tokens_estep": "estep", "seconds_estep": "estep",
             "train_loss": "mstep", "grad_norm": "mstep", "grad_norm_max": "mstep", "grad_clipped_fraction": "mstep",
             "lr": "mstep", "optimizer_steps": "mstep",
             "tokens_mstep": "mstep", "seconds_mstep": "mstep", "sequences_truncated": "mstep",
             "seconds_export": "sync", "seconds_load": "sync", "seconds_sync": "sync"}
    out = {"em/round": float(row["round"])}
    for key, v in row.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or key in ("round", "iteration", "step"):
            continue
        out[f"{phase.get(key, 'eval' if 'test' in key or '@' in key or key.endswith('_eval') else 'round')}/{key}"] = v
    return out
