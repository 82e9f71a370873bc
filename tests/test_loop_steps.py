"""The policy-gradient step loop (EMPG's Algorithm 1) through launch/run.py on the tiny model:
each step samples a new batch of prompts from θ(t-1), every row the M-step trains on carries
the advantage its draw gets from the paper's formula over that step's buffer, and a newly
registered objective runs through the CLI with nothing but its registration."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from launch_cli import load

ROOT = Path(__file__).resolve().parents[1]




def _args(out, *sets):
    args = ["--config", str(ROOT / "configs" / "tiny.yaml"), "--out", str(out)]
    for s in ("model.path=tiny-random-llama", "task.name=even_length", "task.options={n_train: 10, n_test: 4}",
              "estep.scheme=rs", "estep.budget=1", "estep.prompts_per_step=3", "estep.samples_per_prompt=4",
              "mstep.batch_size=4", "mstep.micro_batch_size=4", "run.iterations=3", "run.keep_checkpoints=3",
              "eval.every=2", *sets):
        args += ["--set", s]
    return args


@pytest.fixture(autouse=True)
def _toy(toy_task, tiny_cache):
    return toy_task


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def expected_advantage(objective, draws):
    """The paper's weight of each draw of one step: EMPG Section 4.2 (R̃ - b over the step's
    buffer), GRPO group-normalized over the draws of one prompt (verl)."""
    r = np.array([d.reward for d in draws], np.float64)
    if objective == "empg":
        smooth = np.full_like(r, 0.5) if r.std() == 0 else sigmoid((r - r.mean()) / r.std())
        return smooth - smooth.mean()
    out = np.zeros_like(r)
    for g in {d.example_id for d in draws}:
        idx = [i for i, d in enumerate(draws) if d.example_id == g]
        out[idx] = (r[idx] - r[idx].mean()) / (r[idx].std(ddof=1) + 1e-6)
    return out


@pytest.mark.parametrize("objective", ["empg", "grpo"])
def test_step_loop_weights_each_row_by_its_draws_advantage(objective, tmp_path, monkeypatch):
    from fem_jax.estep import read_draws
    from fem_jax.mstep import Trainer

    steps: list[list[tuple]] = []
    orig_train = Trainer.train

    def spy_train(self, batches, progress=None):
        rows = []
        for b in batches:
            ids, am, lm, adv = (b[k].reshape((-1,) + b[k].shape[2:]) for k in
                                ("input_ids", "attention_mask", "loss_mask", "advantages"))
            for i, a, m, w in zip(ids, am, lm, adv):
                if a.any():
                    start = int(np.argmax(m > 0)) + 1
                    rows.append((tuple(i[:start]), tuple(i[start:a.sum()]), float(w)))
            if objective == "grpo":  # θ_old's log-probs were filled in before the first update
                assert np.any(b["old_logps"] != 0)
        steps.append(rows)
        return orig_train(self, batches, progress)

    monkeypatch.setattr(Trainer, "train", spy_train)
    out = tmp_path / "run"
    assert load().main(_args(out, f"mstep.objective={objective}")) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert [r.get("test_accuracy") is not None for r in rows] == [True, False, True, True]  # every 2, and the last
    seen_prompts = []
    for t in (1, 2, 3):
        draws = read_draws(out / f"step_{t}" / "rollouts.jsonl")
        assert len(draws) == 3 * 4 and all(d.trained for d in draws)
        seen_prompts.append({d.example_id for d in draws})
        want = expected_advantage(objective, draws)
        by_completion = {}
        for d, w in zip(draws, want):
            by_completion.setdefault(tuple(d.token_ids), set()).add(round(float(w), 5))
        assert len(steps[t - 1]) == len(draws)
        for _, completion, w in steps[t - 1]:
            assert round(w, 5) in by_completion[completion], (t, completion, w, by_completion[completion])
    assert all(len(p) == 3 for p in seen_prompts) and seen_prompts[0] != seen_prompts[1]  # a new batch each step


@pytest.mark.parametrize("batch_size,filled", [(4, True), (12, False)])
def test_grpo_computes_old_log_probs_only_for_rounds_of_several_updates(batch_size, filled, tmp_path, monkeypatch):
    """12 draws per step: batches of 4 are three updates (θ_old's log-probs filled in before
    the first), one batch of 12 is one update (θ_old = θ: the loss reads its own, none filled)."""
    from fem_jax.mstep import Trainer

    calls, seen = [], []
    orig_fill, orig_train = Trainer.fill_old_logps, Trainer.train
    monkeypatch.setattr(Trainer, "fill_old_logps", lambda self, b: (calls.append(len(b)), orig_fill(self, b))[1])

    def spy_train(self, batches, progress=None):
        seen.append([("old_logps" in b, bool(b.get("old_logps", np.zeros(1)).any())) for b in batches])
        return orig_train(self, batches, progress)

    monkeypatch.setattr(Trainer, "train", spy_train)
    out = tmp_path / "run"
    assert load().main(_args(out, "mstep.objective=grpo", f"mstep.batch_size={batch_size}")) == 0
    assert calls == ([3, 3, 3] if filled else [])
    assert seen == ([[(True, True)] * 3] * 3 if filled else [[(False, False)]] * 3)


def test_each_step_samples_from_the_previous_steps_weights(tmp_path, monkeypatch):
    from fem_jax import rollout
    from fem_jax.checkpoint import Checkpointer
    from fem_jax.models import from_pretrained, resolve
    from fem_jax.rollout.jax_engine import JaxEngine

    seen = []

    class Recording(JaxEngine):
        def generate(self, prompts, n=1, temperature=1.0, **kw):
            seen.append(("eval" if temperature == 0 else "estep", float(np.asarray(self._layer_params["embed"],
                                                                                    np.float64).sum())))
            return super().generate(prompts, n=n, temperature=temperature, **kw)

    monkeypatch.setattr(rollout, "make_engine", lambda backend, **kw: Recording(kw["model"], kw["tokenizer"]))
    out = tmp_path / "run"
    assert load().main(_args(out, "mstep.objective=empg", "eval.every=1")) == 0
    theta = {0: float(np.asarray(from_pretrained(resolve("tiny-random-llama")).param_dict()["embed"],
                                 np.float64).sum())}
    ck = Checkpointer(out / "checkpoints", create=False)
    for k in (1, 2, 3):
        meta = ck.restore_meta(k)
        like = {p: jax.ShapeDtypeStruct(tuple(v["shape"]), jnp.dtype(v["dtype"])) for p, v in meta["_fem"]["params"].items()}
        theta[k] = float(np.asarray(ck.restore(k, like)[0]["embed"], np.float64).sum())
    want = [("eval", 0), ("estep", 0), ("eval", 1), ("estep", 1), ("eval", 2), ("estep", 2), ("eval", 3)]
    assert [kind for kind, _ in seen] == [kind for kind, _ in want]
    for (kind, fp), (_, k) in zip(seen, want):
        assert fp == pytest.approx(theta[k], rel=1e-6), (kind, k)


def test_a_registered_toy_objective_runs_through_the_cli(tmp_path, monkeypatch):
    """One registration plus its loss is all an objective needs: here, SFT on every draw
    weighted by its reward, in the step loop."""
    from fem_jax import objectives

    calls = {"loss": 0, "advantages": 0}

    def reward_weighted_sft(cfg, logps, batch):
        calls["loss"] += 1
        mask = batch["loss_mask"]
        w = batch["advantages"][:, None] * mask
        value = -(w * logps).sum() / jnp.maximum(batch["num_items"], 1.0)
        return value, {"loss": value, "tokens": mask.sum()}

    def advantages(rewards, group, cfg):
        calls["advantages"] += 1
        return np.asarray(rewards, np.float32)

    monkeypatch.setitem(objectives.OBJECTIVES, "toy_rwsft", objectives.Objective(
        name="toy_rwsft", loss=reward_weighted_sft, loop="steps", trains_on="all", advantages=advantages))
    out = tmp_path / "run"
    assert load().main(_args(out, "mstep.objective=toy_rwsft", "run.iterations=2")) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert all(r["optimizer_steps"] > 0 and r["trained"] == 12 for r in rows[1:])
    assert calls["loss"] > 0 and calls["advantages"] == 2
    assert "objective: toy_rwsft" in (out / "config.yaml").read_text()


@pytest.mark.slow
def test_a_step_loop_killed_between_checkpoints_resumes_to_the_same_metrics(tmp_path, monkeypatch):
    """Checkpoints every 2 steps keep the optimizer state; a failure at step 3 restarts from
    step 2's checkpoint, redoes step 3 (reusing its draws) and ends where an uninterrupted run
    ends."""
    from fem_jax import loop as loop_lib

    sets = ("mstep.objective=grpo", "run.iterations=4", "run.save_every=2", "eval.every=2")
    ref = tmp_path / "ref"
    assert load().main(_args(ref, *sets)) == 0
    out = tmp_path / "run"
    orig = loop_lib.Experiment.mstep

    class Killed(Exception):
        pass

    def boom(self, k, *a, **kw):
        if k == 3:
            raise Killed()
        return orig(self, k, *a, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop_lib.Experiment, "mstep", boom)
        with pytest.raises(Killed):
            load().main(_args(out, *sets))
    assert (out / "step_3" / "rollouts.jsonl").exists() and not (out / "step_3" / "metrics.json").exists()
    assert load().main(_args(out, *sets)) == 0
    strip = lambda rows: [{k: v for k, v in r.items() if k not in loop_lib.TIMING_KEYS} for r in rows]  # noqa: E731
    read = lambda d: [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert strip(read(out)) == strip(read(ref))
