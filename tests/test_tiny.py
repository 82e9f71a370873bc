"""`tiny-arith-llama` and the smoke run of configs/tiny.yaml: the model is built once,
deterministically, into the cache; its pre-training never saw the tiny config's test
problems; its first E-step on the tiny config's task accepts draws where the random model
accepts none; and the whole smoke run trains every iteration."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fem_jax.config import load_config
from fem_jax.io import sha256_file
from fem_jax.models import tiny

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny.yaml"
NAME = "tiny-arith-llama"


def _cfg():
    return load_config(CONFIG)


def _task(cfg, seed: int):
    from fem_jax.tasks import get_task

    return get_task(cfg.task.name, **{"seed": seed, **cfg.task.options})


def test_arith_model_is_built_once_into_the_cache(tiny_cache, monkeypatch):
    from fem_jax import models

    folder = models.resolve(NAME)
    assert folder == tiny_cache / NAME
    for f in ("config.json", "model.safetensors", "tokenizer.json", tiny.MARKER):
        assert (folder / f).is_file(), f
    assert not [p.name for p in tiny_cache.iterdir() if p.name.startswith(f".{NAME}.") and not p.name.endswith(".lock")]
    meta = json.loads((folder / tiny.MARKER).read_text())
    assert meta["optimizer_steps"] == tiny.ARITH.steps and meta["last_loss"] < meta["first_loss"] / 4
    # resolved again: found in the cache, not rebuilt
    monkeypatch.setattr(tiny, "build_arith", lambda *a, **k: pytest.fail("rebuilt a complete cached model"))
    assert models.resolve(NAME) == folder


@pytest.mark.slow
def test_arith_model_builds_deterministically(tiny_cache, tmp_path):
    from fem_jax import models

    folder = models.resolve(NAME)  # the session's build
    again = tiny.build_arith(tmp_path / NAME)  # a second one, from scratch
    for f in ("model.safetensors", "tokenizer.json", "config.json", tiny.MARKER):
        assert sha256_file(again / f) == sha256_file(folder / f), f"{f} differs between two builds"


def test_a_cached_build_of_another_recipe_or_version_is_rebuilt(tmp_path, monkeypatch):
    builds = []

    def fake_build(folder, recipe=tiny.ARITH):
        builds.append(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "model.safetensors").write_bytes(b"")
        (folder / tiny.MARKER).write_text(json.dumps({"version": tiny.ARITH_VERSION,
                                                       "recipe": tiny._recipe_json(recipe)}))
        return folder

    monkeypatch.setattr(tiny, "build_arith", fake_build)
    folder = tiny.materialize(NAME, tmp_path)
    assert builds == [folder] and tiny.materialize(NAME, tmp_path) == folder and len(builds) == 1
    meta = json.loads((folder / tiny.MARKER).read_text())
    for stale in ({**meta, "version": tiny.ARITH_VERSION - 1},
                  {**meta, "recipe": {**meta["recipe"], "steps": tiny.ARITH.steps + 1}}):
        (folder / tiny.MARKER).write_text(json.dumps(stale))
        tiny.materialize(NAME, tmp_path)
    assert len(builds) == 3


def test_pretraining_never_sees_the_tiny_configs_test_problems(tmp_path):
    cfg = _cfg()
    assert cfg.model.path == NAME and cfg.run.seed in tiny.ARITH.held_out_seeds
    problems = {ex.fields["question"] for ex in tiny.arith_problems()}
    train = {ex.fields["question"] for ex in _task(cfg, cfg.run.seed).load("train")}
    assert train & problems, "the pre-training shares no problem with the tiny config's task at all"
    for seed in tiny.ARITH.held_out_seeds:
        test = {ex.fields["question"] for ex in _task(cfg, seed).load("test")}
        assert len(test) == cfg.task.options["n_test"]
        assert not test & problems, f"seed {seed}: test problems {sorted(test & problems)} are pre-trained on"
    # and the transcripts themselves, as the tokenizer reads them
    tok = tiny._tokenizer(tmp_path, tiny.ARITH.vocab_size, tiny._arith_corpus(tiny.ARITH), split_digits=True)
    examples = tiny._transcripts(tok, tiny.ARITH)
    assert len(examples) == tiny.ARITH.steps * tiny.ARITH.batch_size
    texts = {tok.decode(p) for p in {tuple(e.prompt_ids) for e in examples}}
    seen = {q for q in problems | train | {q for s in tiny.ARITH.held_out_seeds
                                           for q in (ex.fields["question"] for ex in _task(cfg, s).load("test"))}
            if any(f"Compute {q}." in t for t in texts)}
    assert seen == problems


def _first_estep_share(cfg, model: str, samples_per_prompt: int) -> tuple[int, int]:
    """(accepted, draws) of the loop's first E-step on the tiny config's task, with `model`."""
    from transformers import AutoTokenizer

    from fem_jax.estep import run_estep
    from fem_jax.models import from_pretrained, resolve
    from fem_jax.rollout.jax_engine import JaxEngine

    e = cfg.estep
    folder = resolve(model)
    engine = JaxEngine(from_pretrained(folder), AutoTokenizer.from_pretrained(folder), max_batch=cfg.rollout.max_batch)
    draws = run_estep(_task(cfg, cfg.run.seed), engine, _task(cfg, cfg.run.seed).load("train"), scheme=e.scheme,
                      budget=e.budget, samples_per_prompt=samples_per_prompt, temperature=e.temperature,
                      top_p=e.top_p, top_k=e.top_k, max_new_tokens=e.max_new_tokens,
                      seed=cfg.run.seed * 100 + 1, trains=cfg.objective.trains)  # the loop's seed of round 1
    return sum(d.accepted for d in draws), len(draws)


def test_first_estep_accepts_draws_and_the_random_model_does_not(tiny_cache):
    cfg = _cfg()
    assert cfg.estep.scheme in ("pps", "star") and cfg.estep.temperature == 1.0
    # four draws per prompt (the smoke run draws one): a share that does not hang on one draw
    accepted, draws = _first_estep_share(cfg, NAME, 4)
    assert 0.1 <= accepted / draws <= 0.6, f"{NAME}: {accepted} of {draws} draws accepted"
    accepted, draws = _first_estep_share(cfg, "tiny-random-llama", 4)
    assert accepted / draws < 0.05, f"tiny-random-llama: {accepted} of {draws} draws accepted"


@pytest.mark.slow
def test_the_smoke_run_trains_every_iteration(tiny_cache_dir, tmp_path):
    """`python launch/run.py --config configs/tiny.yaml` as the README runs it."""
    env = {**os.environ, "FEM_JAX_CACHE": str(tiny_cache_dir)}
    r = subprocess.run([sys.executable, str(ROOT / "launch" / "run.py"), "--config", str(CONFIG),
                        "--out", str(tmp_path / "run")], env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["iteration"] for row in rows] == list(range(_cfg().run.iterations + 1))
    for row in rows[1:]:
        assert row["trained"] > 0 and row["optimizer_steps"] > 0, row
