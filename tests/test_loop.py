"""The training loop end to end on the tiny random model and the toy task: run folder and
metrics, training moves the weights, resume after a failure in each phase (same final
metrics as an uninterrupted run), which weights each evaluation and E-step saw (JaxEngine
and a stubbed vLLM), extending a finished run, refusing a change that would invalidate
it, and a start that fails without touching the run folder."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fem_jax import loop as loop_lib
from fem_jax import run_folder
from fem_jax.config import load_config
from fem_jax.rollout.vllm_engine import FemWorkerExtension

ROOT = Path(__file__).resolve().parents[1]

REQUIRED_KEYS = {"iteration", "test_accuracy", "data_utilization", "reasoning_length_trained", "reasoning_length_test",
                 "train_loss", "seconds_estep", "seconds_mstep", "seconds_eval", "tokens_estep", "tokens_mstep",
                 "tokens_eval", "accepted", "trained", "n_test", "sequences_truncated"}


def _cfg(*extra):
    return load_config(ROOT / "configs" / "tiny.yaml",
                       ["model.path=tiny-random-llama", "task.name=even_length",
                        "task.options={n_train: 12, n_test: 6}", "estep.scheme=star", "run.iterations=2", *extra])


def _strip(rows):
    return [{k: v for k, v in r.items() if k not in loop_lib.TIMING_KEYS} for r in rows]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    from toy_tasks import register

    with pytest.MonkeyPatch.context() as mp:
        register(mp)
        mp.setenv("FEM_JAX_CACHE", str(tmp_path_factory.getbasetemp() / "fem_jax_cache"))
        out = tmp_path_factory.mktemp("ref")
        rows = loop_lib.run(_cfg(), out, log=lambda s: None)
    return out, rows


@pytest.fixture(autouse=True)
def _toy(toy_task, tiny_cache):
    return toy_task


def test_run_folder_and_metrics(reference):
    out, rows = reference
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        assert REQUIRED_KEYS <= set(r), REQUIRED_KEYS - set(r)
        assert r["trained"] > 0 and r["train_loss"] is not None and r["tokens_mstep"] > 0
        assert 0 < r["data_utilization"] <= 1 and r["trained"] == r["accepted"]  # fem trains on the accepted
        # gradient norms before clipping (mstep.grad_clip = 1.0): the share of updates clipped
        assert r["grad_norm_max"] >= r["grad_norm"] > 0 and 0 <= r["grad_clipped_fraction"] <= 1
        assert (r["grad_clipped_fraction"] > 0) == (r["grad_norm_max"] > 1.0)
    for f in ("config.yaml", "metrics.jsonl", "summary.md", "curves.png", "iter_1/rollouts.jsonl",
              "iter_2/eval.jsonl", "iter_0/metrics.json"):
        assert (out / f).exists(), f
    from fem_jax.estep import read_draws

    draws = read_draws(out / "iter_1" / "rollouts.jsonl")
    assert any(d.hinted for d in draws) and any(not d.hinted for d in draws)  # star: rs, then pps
    assert {d.trained for d in draws} == {True, False}
    assert "test acc" in (out / "summary.md").read_text()
    assert [json.loads(x)["iteration"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]
    assert not list(out.rglob("*.tmp*")) and not list(out.rglob(".*tmp*"))


def _nll(params, cfg_model, examples, pad_id):
    from fem_jax.config import MStepCfg
    from fem_jax.mstep import make_batches
    from fem_jax.mstep import token_logps

    b = make_batches(examples, MStepCfg(batch_size=64, micro_batch_size=64, length_bucket=8), pad_id, seed=0)[0]
    ids, am, lm = (b[k].reshape((-1,) + b[k].shape[2:]) for k in ("input_ids", "attention_mask", "loss_mask"))
    lp = token_logps(cfg_model, params, jnp.asarray(ids), jnp.asarray(am))
    return float(-(lp * lm).sum() / lm.sum())


def test_training_moves_the_weights_and_lowers_the_loss_on_its_data(reference):
    """θ(1) differs from θ(0) and fits iteration 1's trained draws better than θ(0) did."""
    from transformers import AutoTokenizer

    from fem_jax.checkpoint import Checkpointer
    from fem_jax.estep import read_draws
    from fem_jax.models import from_pretrained, resolve
    from fem_jax.mstep import TrainExample
    from fem_jax.rollout.engine import encode_prompt
    from toy_tasks import EvenLengthTask

    out, _ = reference
    folder = resolve("tiny-random-llama")
    model, tok = from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    base = model.param_dict()
    like = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding) for k, v in base.items()}
    theta1, _, _ = Checkpointer(out / "checkpoints", create=False).restore(1, like)
    assert max(float(jnp.abs(theta1[k] - base[k]).max()) for k in base) > 0
    task = EvenLengthTask(n_train=12, n_test=6)
    by_id = {e.id: e for e in task.load("train")}
    examples = [TrainExample(encode_prompt(tok, task.messages(by_id[d.example_id])), d.token_ids, d.reward)
                for d in read_draws(out / "iter_1" / "rollouts.jsonl") if d.trained]
    assert _nll(theta1, model.cfg, examples, tok.pad_token_id) < _nll(base, model.cfg, examples, tok.pad_token_id)


class Killed(Exception):
    pass


@pytest.mark.parametrize("phase", ["estep", "mstep", "_sync", "evaluate", "save", "after_save"])
def test_resume_after_a_failure_in_each_phase(reference, tmp_path, phase):
    _, ref_rows = reference
    out = tmp_path / "run"
    from fem_jax.checkpoint import Checkpointer

    with pytest.MonkeyPatch.context() as mp:
        if phase in ("save", "after_save"):
            orig = Checkpointer.save

            def boom(self, step, *a, **k):
                if step == 2 and phase == "save":
                    raise Killed(phase)
                orig(self, step, *a, **k)
                if step == 2:
                    raise Killed(phase)  # the checkpoint exists, the round's metrics do not

            mp.setattr(Checkpointer, "save", boom)
        else:
            orig = getattr(loop_lib.Experiment, phase)

            def boom(self, k, *a, **kw):
                if k == 2:
                    raise Killed(phase)
                return orig(self, k, *a, **kw)

            mp.setattr(loop_lib.Experiment, phase, boom)
        with pytest.raises(Killed):
            loop_lib.run(_cfg(), out, log=lambda s: None)
    assert not (out / "iter_2" / "metrics.json").exists()
    assert (out / "iter_1" / "metrics.json").exists()
    logs = []
    rows = loop_lib.run(_cfg(), out, log=logs.append)
    assert any("resuming" in s for s in logs)
    assert _strip(rows) == _strip(ref_rows)
    assert [json.loads(x)["iteration"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]


# ----------------------------------------------------------------- which weights each phase saw


def _fingerprint(embed) -> float:
    return float(np.asarray(embed, np.float64).sum())


class _Out:
    def __init__(self, text, ids):
        self.text, self.token_ids, self.finish_reason, self.logprobs = text, ids, "stop", None


class FakeLLM(FemWorkerExtension):
    """vllm.LLM as VllmEngine uses it, worker and its extension in one; generate() reports
    the embedding it serves, which only its in-place reload (reload_weights, from an iterator
    or the extension's folder reader) changes."""

    seen: list = []

    def __init__(self, model, tokenizer=None, **kw):
        from safetensors.numpy import load_file

        self.embed = _fingerprint(load_file(str(Path(model) / "model.safetensors"))["model.embed_tokens.weight"])
        self.reload_weights = self._reload

    def _reload(self, weights_iterator, is_checkpoint_format=True):
        for name, t in weights_iterator:
            if name == "model.embed_tokens.weight":
                self.embed = _fingerprint(np.asarray(t))

    def generate(self, prompts, params, use_tqdm=False):
        FakeLLM.seen.append(("eval" if params[0].temperature == 0 else "estep", self.embed))
        return [types.SimpleNamespace(outputs=[_Out("ab" if (i + j) % 2 else "abc", [5, 6]) for j in range(p.n)])
                for i, p in enumerate(params)]

    def collective_rpc(self, method, args=(), kwargs=None):
        assert isinstance(method, str), "a callable cannot cross to a worker process"
        return [getattr(self, method)(*args, **(kwargs or {}))]

    def reset_prefix_cache(self):
        pass


def _recording_jax_engine(seen):
    from fem_jax.rollout.jax_engine import JaxEngine

    class Recording(JaxEngine):
        def generate(self, prompts, n=1, temperature=1.0, **kw):
            seen.append(("eval" if temperature == 0 else "estep", _fingerprint(self._layer_params["embed"])))
            return super().generate(prompts, n=n, temperature=temperature, **kw)

    return Recording


@pytest.mark.parametrize("backend, sync", [("jax", "auto"), ("vllm", "memory"), ("vllm", "folder")])
def test_each_evaluation_sees_the_new_weights_and_each_estep_the_previous(backend, sync, tmp_path, monkeypatch):
    from fem_jax import rollout
    from fem_jax.checkpoint import Checkpointer

    seen = []
    if backend == "jax":
        engine_cls = _recording_jax_engine(seen)
        monkeypatch.setattr(rollout, "make_engine", lambda backend, **kw: engine_cls(
            kw["model"], kw["tokenizer"], max_batch=kw["rollout_cfg"].max_batch))
    else:
        from fem_jax.rollout import vllm_engine

        FakeLLM.seen = seen
        fake_vllm = types.ModuleType("vllm")
        fake_vllm.SamplingParams = lambda **kw: types.SimpleNamespace(**kw)
        fake_vllm.LLM = FakeLLM
        fake_platforms = types.ModuleType("vllm.platforms")
        fake_platforms.current_platform = types.SimpleNamespace(device_type="cpu")
        monkeypatch.setitem(sys.modules, "vllm", fake_vllm)
        monkeypatch.setitem(sys.modules, "vllm.platforms", fake_platforms)
        monkeypatch.setattr(vllm_engine, "import_vllm", lambda: fake_vllm)
        monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    out = tmp_path / "run"
    logs = []
    loop_lib.run(_cfg(f"rollout.backend={backend}", f"rollout.sync={sync}", "estep.scheme=pps", "run.iterations=3",
                      "run.keep_checkpoints=3"), out, log=logs.append)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    method = "folder" if sync == "folder" else "memory"
    assert [r.get("sync_method") for r in rows] == [None, method, method, method]
    assert sum(f"weights synced in place ({method})" in line for line in logs) == 3
    from fem_jax.models import from_pretrained, resolve

    theta = {0: _fingerprint(from_pretrained(resolve("tiny-random-llama")).param_dict()["embed"])}
    ck = Checkpointer(out / "checkpoints", create=False)
    for k in (1, 2, 3):
        meta = ck.restore_meta(k)
        like = {p: jax.ShapeDtypeStruct(tuple(v["shape"]), jnp.dtype(v["dtype"]))
                for p, v in meta["_fem"]["params"].items()}
        theta[k] = _fingerprint(ck.restore(k, like)[0]["embed"])
    assert len(set(theta.values())) == 4  # every round moved the weights
    want = [("eval", 0), ("estep", 0), ("eval", 1), ("estep", 1), ("eval", 2), ("estep", 2), ("eval", 3)]
    assert [kind for kind, _ in seen] == [kind for kind, _ in want]
    for (kind, fp), (_, k) in zip(seen, want):
        assert fp == pytest.approx(theta[k], rel=1e-6, abs=1e-6), (kind, k, fp, theta)


# ----------------------------------------------------------------- run folders


def test_a_finished_run_extends_and_refuses_changes_that_would_invalidate_it(reference, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(reference[0], out)
    before = (out / "iter_2" / "metrics.json").read_text()
    logs = []
    rows = loop_lib.run(_cfg("run.iterations=3"), out, log=logs.append)
    assert [r["iteration"] for r in rows] == [0, 1, 2, 3]
    assert (out / "iter_2" / "metrics.json").read_text() == before
    assert any("run.iterations 2 -> 3" in s for s in logs)
    assert "iterations: 3" in (out / "config.yaml").read_text()
    with pytest.raises(ValueError, match=r"mstep.lr_start=0.001.*mstep.lr_start=0.5"):
        loop_lib.run(_cfg("run.iterations=3", "mstep.lr_start=0.5"), out, log=lambda s: None)
    with pytest.raises(ValueError, match="run.iterations=2, but .* has finished round 3"):
        loop_lib.run(_cfg("run.iterations=2"), out, log=lambda s: None)


def test_a_failed_start_leaves_the_run_folder_alone(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="mesh"):
        loop_lib.run(_cfg("run.mesh=data=64"), out, log=lambda s: None)
    assert not (out / "config.yaml").exists()
    with pytest.raises(ValueError, match="option ops"):
        loop_lib.run(_cfg("task.name=arithmetic", "task.options={ops: '*'}"), out, log=lambda s: None)
    assert not (out / "config.yaml").exists()


def test_default_run_folder_names_only_the_changes_that_make_another_experiment():
    stem = Path("configs/default.yaml")
    assert run_folder.default_out(stem, {}) == Path("runs/default")
    assert run_folder.default_out(stem, {"estep.scheme": "star", "mstep.lr_start": 1e-5}) == \
        Path("runs/default+scheme=star+lr_start=1e-05")
    assert run_folder.default_out(stem, {"run.iterations": 5, "run.report_to": ["tensorboard"]}) == Path("runs/default")
    long = run_folder.default_out(stem, {f"task.options.x{i}": "y" * 20 for i in range(5)})
    assert len(long.name) <= 80


def test_hint_never_reaches_the_m_steps_batches(tmp_path, monkeypatch):
    """Every row the M-step trains on is the hint-free prompt followed by the completion."""
    from transformers import AutoTokenizer

    from fem_jax.models import resolve
    from fem_jax.mstep import Trainer
    from fem_jax.rollout.engine import encode_prompt
    from toy_tasks import EvenLengthTask

    rows = []
    orig = Trainer.step

    def spy(self, batch):
        ids, am, lm = (batch[k].reshape((-1,) + batch[k].shape[2:]) for k in ("input_ids", "attention_mask",
                                                                               "loss_mask"))
        for i, a, m in zip(ids, am, lm):
            if a.any():
                start = int(np.argmax(m > 0)) + 1  # the first target position
                rows.append((i[:start].tolist(), i[start:a.sum()].tolist()))
        return orig(self, batch)

    monkeypatch.setattr(Trainer, "step", spy)
    out = tmp_path / "run"
    loop_lib.run(_cfg("estep.scheme=pps", "run.iterations=1"), out, log=lambda s: None)
    tok = AutoTokenizer.from_pretrained(resolve("tiny-random-llama"))
    task = EvenLengthTask(n_train=12, n_test=6)
    free = {tuple(encode_prompt(tok, task.messages(e, hint=None))) for e in task.load("train")}
    hinted = {tuple(encode_prompt(tok, task.messages(e, hint="pps"))) for e in task.load("train")}
    from fem_jax.estep import read_draws

    draws = read_draws(out / "iter_1" / "rollouts.jsonl")
    assert all(d.hinted for d in draws) and rows
    assert len(rows) == sum(d.trained for d in draws)
    for prompt, completion in rows:
        assert tuple(prompt) in free and tuple(prompt) not in hinted
        assert "should be" not in tok.decode(prompt)
        assert any(completion == d.token_ids[:len(completion)] for d in draws if d.trained)
