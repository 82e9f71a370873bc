"""Trackers (fem_jax/trackers.py): TensorBoard, W&B (offline) and trackio (local store), each
read back with its own reader; kill-and-resume leaves every (name, step) once; no network.

The ledger rule is checked on a recording fake. The crash: for TensorBoard a child process
killed by os._exit (it writes synchronously, so nothing may be lost); for trackio a child
that exits without close() (its atexit hook flushes; a hard kill would lose its buffered
tail, as it would W&B's); W&B stops and resumes in this process (a second wandb service
start costs seconds).
"""

from __future__ import annotations

import importlib.util
import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fem_jax.trackers import REPORT_TO, Trackers, _Ledger, make_trackers, markdown_table

ROOT = Path(__file__).parents[1]
CONFIG = {"mstep": {"lr": 1e-5, "batch": [4, 8]}, "run": {"seed": 257, "out": Path("/x/y")}}
PLAIN = {"mstep": {"lr": 1e-5, "batch": [4, 8]}, "run": {"seed": 257, "out": "/x/y"}}  # for a child's code


def _needs(module: str):
    return pytest.mark.skipif(importlib.util.find_spec(module) is None,
                              reason=f"{module} is not installed (the test extra installs it)")


def _child(code: str, env: dict[str, str]) -> str:
    """Run `code` in a fresh interpreter (the crashed session); returns its stdout."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, **env}, timeout=120)
    assert proc.returncode in (0, 9), proc.stderr[-3000:]  # 9: the simulated kill
    return proc.stdout


def _offline_env(tmp_path: Path) -> dict[str, str]:
    """W&B offline and trackio local, every file of theirs under tmp_path."""
    wandb_home = tmp_path / "wandb_home"
    return {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wandb_dir"), "WANDB_SILENT": "true",
            "WANDB_CONSOLE": "off", "WANDB_CACHE_DIR": str(wandb_home / "cache"),
            "WANDB_DATA_DIR": str(wandb_home / "data"), "WANDB_CONFIG_DIR": str(wandb_home / "config"),
            "TRACKIO_DIR": str(tmp_path / "trackio_store")}


# ------------------------------------------------------------------------ names and extras

def test_unknown_tracker_name_is_an_error_naming_the_setting(tmp_path):
    with pytest.raises(ValueError, match=r"run\.report_to.*'mlflow'.*tensorboard, wandb, trackio"):
        make_trackers(["tensorboard", "mlflow"], tmp_path, CONFIG, "r", resume=False)
    assert not any(tmp_path.iterdir())  # nothing opened before the check


@pytest.mark.parametrize("report_to", ["none", [], ["none"], None])
def test_none_opens_nothing(tmp_path, report_to):
    t = make_trackers(report_to, tmp_path, CONFIG, "r", resume=False)
    assert not t and t.names == []
    t.log({"mstep/loss": 1.0}, step=1)
    t.log_table("eval/samples", ["a"], [[1]], step=1)
    t.close()
    t.close()
    assert not any(tmp_path.iterdir())


def test_not_main_process_is_a_noop(tmp_path, monkeypatch):
    for module in ("tensorboardX", "wandb", "trackio"):  # not even imported
        monkeypatch.setitem(sys.modules, module, None)
    with make_trackers(list(REPORT_TO), tmp_path, CONFIG, "r", resume=True, is_main_process=False) as t:
        assert not t
        t.log({"mstep/loss": 1.0}, step=1)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("tracker,module,extra", [("tensorboard", "tensorboardX", "tensorboard"),
                                                  ("wandb", "wandb", "wandb"), ("trackio", "trackio", "trackio")])
def test_missing_extra_is_a_one_line_error(tmp_path, monkeypatch, tracker, module, extra):
    monkeypatch.setitem(sys.modules, module, None)  # what `import module` sees when it is absent
    # TensorBoard named first: the failing import must stop it from being opened
    first = ["tensorboard"] if tracker != "tensorboard" and importlib.util.find_spec("tensorboardX") else []
    with pytest.raises(ImportError) as e:
        make_trackers(first + [tracker], tmp_path, CONFIG, "r", resume=False)
    assert str(e.value) == f"run.report_to: {tracker} needs the '{extra}' extra: pip install -e \".[{extra}]\""
    assert e.value.__cause__ is None and e.value.__suppress_context__
    assert not any(tmp_path.iterdir())  # TensorBoard was not opened before wandb/trackio failed


# ------------------------------------------------------------------------ the ledger rule

class _Recorder:
    """A tracker that records what reaches it."""

    def __init__(self, name="fake"):
        self.name, self.got, self.closed = name, [], 0

    def scalars(self, values, step):
        self.got += [(step, k, v) for k, v in values.items()]

    def table(self, name, columns, rows, step):
        self.got.append((step, name, rows))

    def close(self):
        self.closed += 1


def test_replayed_steps_reach_a_tracker_once(tmp_path):
    ledger = tmp_path / "trackers.json"
    first = _Recorder()
    t = Trackers([first], _Ledger(ledger, resume=False))
    for s in range(1, 5):
        t.log({"mstep/loss": s, "em/iteration": 1}, step=s)
    t.log({"mstep/loss": 5}, step=5)  # killed halfway through step 5: em/iteration not sent
    t.log_table("eval/samples", ["z"], [["a"]], step=5)
    assert json.loads(ledger.read_text())["fake"] == {"last_step": 5, "last_keys": ["eval/samples", "mstep/loss"]}
    # no close(): the crash. The loop resumes from an older checkpoint and replays steps 3..7.
    second = _Recorder()
    t = Trackers([second], _Ledger(ledger, resume=True))
    for s in range(3, 8):
        t.log({"mstep/loss": 10 * s, "em/iteration": 1, "eval/pass@4": None}, step=s)
        t.log_table("eval/samples", ["z"], [["b"]], step=s)
    t.close()
    t.close()
    assert second.closed == 1
    assert second.got == [(5, "em/iteration", 1.0),
                          (6, "mstep/loss", 60.0), (6, "em/iteration", 1.0), (6, "eval/samples", [["b"]]),
                          (7, "mstep/loss", 70.0), (7, "em/iteration", 1.0), (7, "eval/samples", [["b"]])]
    # within a session too: a step going backwards, or a name twice at one step, is dropped
    t = Trackers([third := _Recorder()], _Ledger(ledger, resume=True))
    t.log({"mstep/loss": 1}, step=8)
    t.log({"mstep/loss": 2}, step=8)
    t.log({"mstep/loss": 3}, step=6)
    assert third.got == [(8, "mstep/loss", 1.0)]
    # resume=False starts a new tracker run: everything goes through again
    t = Trackers([fourth := _Recorder()], _Ledger(ledger, resume=False))
    t.log({"mstep/loss": 1}, step=1)
    assert fourth.got == [(1, "mstep/loss", 1.0)]


def test_what_reached_a_tracker_is_recorded_when_the_next_one_raises(tmp_path):
    class Broken(_Recorder):
        def scalars(self, values, step):
            raise OSError("disk full")

    t = Trackers([ok := _Recorder("ok"), Broken("broken")], _Ledger(tmp_path / "trackers.json", resume=False))
    with pytest.raises(OSError):
        t.log({"mstep/loss": 1}, step=1)
    ledger = json.loads((tmp_path / "trackers.json").read_text())
    assert ok.got == [(1, "mstep/loss", 1.0)] and ledger["ok"]["last_step"] == 1
    assert "broken" not in ledger or ledger["broken"]["last_step"] == -1


def test_markdown_table_keeps_cells_whole():
    text = markdown_table(["completion", "reward"], [["a | b\nc", 1.0]])
    assert text.splitlines() == ["| completion | reward |", "|---|---|", "| a \\| b<br>c | 1.0 |"]


# ------------------------------------------------------------------------ TensorBoard

def _tb(logdir: Path):
    """What TensorBoard's Python loader shows (plugin_event_accumulator, the --load_fast=false path)."""
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator

    ea = EventAccumulator(str(logdir), size_guidance={"tensors": 0})
    ea.Reload()
    return ea


def _tb_scalars(ea, tag: str) -> list[tuple[int, float]]:
    from tensorboard.util import tensor_util

    return [(e.step, round(float(tensor_util.make_ndarray(e.tensor_proto)), 4)) for e in ea.Tensors(tag)]


def _tb_text(ea, tag: str) -> list[tuple[int, str]]:
    return [(e.step, e.tensor_proto.string_val[0].decode()) for e in ea.Tensors(f"{tag}/text_summary")]


@_needs("tensorboardX")
@_needs("tensorboard")
def test_tensorboard_scalars_tables_and_config(tmp_path):
    with make_trackers(["tensorboard"], tmp_path, CONFIG, "r", resume=False) as t:
        for s in (1, 2, 3):
            t.log({"mstep/loss": 1.0 / s, "em/iteration": 1, "eval/pass@4": 0.5}, step=s)
        t.log_table("eval/samples", ["prompt", "completion", "reward", "kept"],
                    [["2+2", "4 | four\nso 4", 1.0, True], ["3+3", "7", 0.0, False]], step=3)
    ea = _tb(tmp_path / "tensorboard")
    assert set(ea.PluginTagToContent("scalars")) == {"mstep/loss", "em/iteration", "eval/pass@4"}  # names kept
    assert _tb_scalars(ea, "mstep/loss") == [(1, 1.0), (2, 0.5), (3, 0.3333)]
    [(step, table)] = _tb_text(ea, "eval/samples")
    assert step == 3 and "| 4 \\| four<br>so 4 | 1.0 | True |" in table and "| 3+3 | 7 | 0.0 | False |" in table
    [(step, config)] = _tb_text(ea, "config")
    assert step == 0 and "lr: 1.0e-05" in config and "out: /x/y" in config
    from tensorboard.plugins.hparams import plugin_data_pb2

    [content] = ea.PluginTagToContent("hparams").values()  # the HParams tab's session for this run
    hp = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert hp["mstep.lr"].number_value == 1e-5 and hp["mstep.batch"].string_value == "[4, 8]"
    assert json.loads((tmp_path / "trackers.json").read_text())["tensorboard"]["last_step"] == 3


@_needs("tensorboardX")
@_needs("tensorboard")
def test_tensorboard_kill_and_resume_each_step_once(tmp_path):
    _child(f"""
        import os, json, sys
        sys.modules["torch"] = None  # tensorboardX imports torch if it can (3 s), for type checks only
        from fem_jax.trackers import make_trackers
        t = make_trackers(["tensorboard"], {str(tmp_path)!r}, {{"a": 1}}, "r", resume=False)
        for s in range(1, 6):
            t.log({{"mstep/loss": s, "em/iteration": 1}}, step=s)
        # killed while logging step 6: it reached the event file, not the ledger
        ledger = json.load(open({str(tmp_path / "trackers.json")!r}))
        t.log({{"mstep/loss": 6}}, step=6)
        json.dump(ledger, open({str(tmp_path / "trackers.json")!r}, "w"))
        os._exit(9)
    """, {})
    with make_trackers(["tensorboard"], tmp_path, {"a": 1}, "r", resume=True) as t:
        for s in range(3, 9):  # the loop replays from its step-2 checkpoint
            t.log({"mstep/loss": 100 * s, "em/iteration": 2}, step=s)
    ea = _tb(tmp_path / "tensorboard")
    assert _tb_scalars(ea, "mstep/loss") == [(1, 1), (2, 2), (3, 3), (4, 4), (5, 5), (6, 600), (7, 700), (8, 800)]
    assert [s for s, _ in _tb_scalars(ea, "em/iteration")] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert [s for s, _ in _tb_text(ea, "config")] == [0]  # the config once, not again on resume
    assert len(list((tmp_path / "tensorboard").iterdir())) == 2  # one event file per session

    # a run started afresh in the same folder hides what the folder held
    with make_trackers(["tensorboard"], tmp_path, {"a": 2}, "r", resume=False) as t:
        t.log({"mstep/loss": -1}, step=1)
    ea = _tb(tmp_path / "tensorboard")
    assert _tb_scalars(ea, "mstep/loss") == [(1, -1)]
    assert [("a: 2" in text) for _, text in _tb_text(ea, "config")] == [True]


@_needs("tensorboardX")
@_needs("tensorboard")
def test_tensorboard_sessions_within_one_second_keep_their_files(tmp_path, monkeypatch):
    import types

    import tensorboardX.event_file_writer as efw

    # event file names carry whole seconds: freeze the writer's clock so two sessions share one
    monkeypatch.setattr(efw, "time", types.SimpleNamespace(time=lambda: 1_700_000_000.25))
    for steps in ((1, 2), (3,)):
        with make_trackers(["tensorboard"], tmp_path, {"a": 1}, "r", resume=True) as t:
            for s in steps:
                t.log({"mstep/loss": s}, step=s)
    assert len(list((tmp_path / "tensorboard").iterdir())) == 2
    assert _tb_scalars(_tb(tmp_path / "tensorboard"), "mstep/loss") == [(1, 1), (2, 2), (3, 3)]


# ------------------------------------------------------------------------ Weights & Biases

def _wandb_records(path: Path) -> list:
    """The records of a .wandb file: W&B's LevelDB-style log (7-byte header ':W&B' magic
    version, 32 KiB blocks of chunks each with a 7-byte header crc32/length/type) of
    `wandb_internal_pb2.Record` protos. wandb offers no reader in Python any more."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32 * 1024
    assert data[:4] == b":W&B", path
    records, off, chunk = [], 7, b""
    while off + 7 <= len(data):
        left = block - off % block
        if left < 7:  # the block's tail is padding
            off += left
            continue
        _, length, kind = struct.unpack("<IHB", data[off:off + 7])
        off += 7
        if kind == 0 and length == 0:
            off += left - 7
            continue
        chunk += data[off:off + length]
        off += length
        if kind in (1, 4):  # FULL, LAST
            records.append(wandb_internal_pb2.Record.FromString(chunk))
            chunk = b""
    return records


def _wandb_sessions(root: Path) -> list[dict]:
    sessions = []
    for f in sorted(root.glob("wandb/offline-run-*/run-*.wandb")):
        records = _wandb_records(f)
        [run] = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        history = [{(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
                   for r in records if r.WhichOneof("record_type") == "history"]
        config = {i.key: json.loads(i.value_json) for i in run.config.update}
        sessions.append({"id": run.run_id, "name": run.display_name, "project": run.project,
                         "config": config, "history": history})
    return sessions


@_needs("wandb")
def test_wandb_offline_resume_reuses_the_id_and_no_step_twice(tmp_path, monkeypatch):
    import wandb

    for k, v in _offline_env(tmp_path).items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("WANDB_DIR")  # the first session writes into the run folder
    wandb.teardown()  # wandb reads the environment once per process, at its first init
    run_dir = tmp_path / "run"
    t = make_trackers(["wandb"], run_dir, CONFIG, "fem-r", resume=False)
    for s in range(1, 6):
        t.log({"mstep/loss": s, "em/iteration": 1}, step=s)
    t.log_table("eval/samples", ["completion", "reward"], [["4", 1.0], ["5", 0.0]], step=5)
    t.close()  # (a kill: see the TensorBoard test; W&B's buffered tail is its own business)
    run_id = json.loads((run_dir / "trackers.json").read_text())["wandb"]["id"]
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))  # the second where WANDB_DIR says
    with make_trackers(["wandb"], run_dir, CONFIG, "fem-r", resume=True) as t:
        for s in range(3, 8):
            t.log({"mstep/loss": 10 * s, "em/iteration": 2}, step=s)
        t.log_table("eval/samples", ["completion", "reward"], [["6", 1.0]], step=7)
    wandb.teardown()  # finish() returns before wandb's service has written the file; exit (or this) waits
    in_run_dir, in_wandb_dir = _wandb_sessions(run_dir), _wandb_sessions(tmp_path / "wandb_dir")
    assert len(in_run_dir) == 1 and len(in_wandb_dir) == 1
    sessions = in_run_dir + in_wandb_dir
    assert {s["id"] for s in sessions} == {run_id}
    assert {s["name"] for s in sessions} == {"fem-r"} and {s["project"] for s in sessions} == {"fem-jax"}
    assert sessions[0]["config"]["mstep"] == {"lr": 1e-5, "batch": [4, 8]}
    steps = [h["_step"] for s in sessions for h in s["history"]]
    assert steps == [1, 2, 3, 4, 5, 6, 7]  # disjoint sessions: `wandb sync --append` in order
    loss = [h["mstep/loss"] for s in sessions for h in s["history"]]
    assert loss == [1, 2, 3, 4, 5, 60, 70]
    tables = [(h["_step"], h["eval/samples/nrows"]) for s in sessions for h in s["history"] if "eval/samples/nrows" in h]
    assert tables == [(5, 2), (7, 1)]


# ------------------------------------------------------------------------ trackio

@_needs("trackio")
def test_trackio_local_store_resume_no_step_twice(tmp_path):
    env = _offline_env(tmp_path)
    run_dir = tmp_path / "run"
    _child(f"""
        from fem_jax.trackers import make_trackers
        t = make_trackers(["trackio"], {str(run_dir)!r}, {PLAIN!r}, "fem-r", resume=False, project="fem-test")
        for s in range(1, 6):
            t.log({{"mstep/loss": s, "em/iteration": 1}}, step=s)
        t.log_table("eval/samples", ["completion", "reward"], [["4", 1.0]], step=5)
        # exits without close(): trackio's atexit hook finishes the run
    """, env)
    out = _child(f"""
        import json
        from trackio.sqlite_storage import SQLiteStorage
        from fem_jax.trackers import make_trackers
        with make_trackers(["trackio"], {str(run_dir)!r}, {PLAIN!r}, "fem-r", resume=True) as t:
            for s in range(3, 8):
                t.log({{"mstep/loss": 10 * s, "em/iteration": 2}}, step=s)
            t.log_table("eval/samples", ["completion", "reward"], [["6", 1.0]], step=7)
        result = {{"runs": SQLiteStorage.get_runs("fem-test"), "logs": SQLiteStorage.get_logs("fem-test", "fem-r")}}
        # another run folder whose run has the same name: a new trackio run, not this one resumed
        with make_trackers(["trackio"], {str(tmp_path / "other")!r}, {{}}, "fem-r", resume=True, project="fem-test") as t:
            t.log({{"mstep/loss": -1}}, step=1)
        result["runs_after"] = SQLiteStorage.get_runs("fem-test")
        print("RESULT", json.dumps(result))
    """, env)
    result = json.loads(out.split("RESULT ", 1)[1].splitlines()[0])
    assert result["runs"] == ["fem-r"]  # resumed, not a second run; the project kept from the ledger
    assert result["runs_after"] == ["fem-r", "fem-r"]
    loss = [(r["step"], r["mstep/loss"]) for r in result["logs"] if "mstep/loss" in r]
    assert loss == [(1, 1), (2, 2), (3, 3), (4, 4), (5, 5), (6, 60), (7, 70)]
    tables = [(r["step"], r["eval/samples"]["_value"]) for r in result["logs"] if "eval/samples" in r]
    assert tables == [(5, [{"completion": "4", "reward": 1.0}]), (7, [{"completion": "6", "reward": 1.0}])]
    assert (tmp_path / "trackio_store" / "fem-test.db").exists()
