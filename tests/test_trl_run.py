"""TRL's GRPOTrainer as an arm of our comparisons (fem_jax.trl_run): the config refuses what
TRL cannot do, naming the field; end to end (slow), the TRL arm draws for the prompts our
grpo arm draws for, its weights reach our evaluator through the Hugging Face bridge (its
greedy answers are transformers' greedy answers on TRL's saved folder), the tables show it
as its own column, and a longer run resumes from TRL's last sealed checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from launch_cli import load

from fem_jax import config as config_lib

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
SETS = ["model.path=tiny-random-llama", "task.name=even_length", "task.options={n_train: 10, n_test: 4}",
        "estep.scheme=rs", "estep.budget=1", "estep.prompts_per_step=2", "estep.samples_per_prompt=4",
        "mstep.batch_size=8", "mstep.micro_batch_size=4", "mstep.lr_end=1e-3", "run.iterations=2",
        "eval.every=2", "compare.objectives=grpo", "compare.trl=grpo"]


def _config(*sets):
    return config_lib.load_config(TINY, [*SETS, *sets])


@pytest.mark.parametrize("setting, field", [
    ("mstep.lr_end=1e-4", "mstep.lr_end"),
    ("mstep.loss_agg=seq-mean-token-sum", "mstep.loss_agg"),
    ("mstep.batch_size=16", "mstep.batch_size"),
    ("run.mesh=fsdp=1", "run.mesh"),
])
def test_settings_trl_cannot_honour_are_refused_by_name(setting, field):
    one_run = [s for s in SETS if not s.startswith("compare.")] + ["mstep.objective=grpo", "run.trainer=trl"]
    config_lib.load_config(TINY, one_run)  # as it stands: fine
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        config_lib.load_config(TINY, [*one_run, setting])
    with pytest.raises(ValueError, match=r"compare\.trl"):
        _config("compare.trl=empg")


def test_trl_arm_is_its_own_arm_and_sweep_run():
    from fem_jax.sweep import expand

    arms = _config().arms()
    assert [(n, c.run.trainer, c.mstep.objective) for n, _, c in arms] == [
        ("grpo", "fem_jax", "grpo"), ("grpo-trl", "trl", "grpo")]
    with pytest.raises(ValueError, match="run.trainer"):
        config_lib.load_config(TINY, ["run.trainer=torch"])
    with pytest.raises(ValueError, match=r"mstep\.objective"):  # the FEM loop is ours only
        config_lib.load_config(TINY, ["run.trainer=trl"])
    runs = expand([str(TINY)], Path("/nonexistent/out"), overrides=SETS)
    assert [r.name for r in runs] == ["tiny/grpo_seed257", "tiny/grpo-trl_seed257"]




def _args(out, *sets):
    args = ["--config", str(TINY), "--out", str(out)]
    for s in (*SETS, *sets):
        args += ["--set", s]
    return args


@pytest.mark.slow
def test_trl_arm_beside_ours_same_prompts_our_evaluator_resumes(tmp_path, toy_task, tiny_cache, capsys):
    import jax
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fem_jax.models import resolve
    from fem_jax.report import main as report_main
    from fem_jax.rollout.engine import encode_prompt

    jax.config.update("jax_default_matmul_precision", "highest")  # greedy parity in float32
    out = tmp_path / "cmp"
    assert load().main(_args(out)) == 0
    ours, trl = out / "grpo_seed257", out / "grpo-trl_seed257"
    rows = [json.loads(x) for x in (trl / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert rows[0].get("test_accuracy") is not None and rows[2].get("test_accuracy") is not None
    assert rows[1].get("test_accuracy") is None and rows[1]["draws"] == 8 and rows[1]["optimizer_steps"] == 1

    # the same prompts, step by step, as our grpo arm drew for
    for k in (1, 2):
        theirs = [json.loads(x)["example_id"] for x in (trl / f"step_{k}/draws.jsonl").read_text().splitlines()]
        mine = [json.loads(x)["example_id"] for x in (ours / f"step_{k}/rollouts.jsonl").read_text().splitlines()
                if '"example_id"' in x]
        assert theirs == mine, k

    # our evaluator scored TRL's trained weights: transformers' greedy answers on its saved folder
    hf = trl / "step_2" / "hf"
    task = toy_task(n_train=10, n_test=4)
    tok = AutoTokenizer.from_pretrained(hf)
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(resolve("tiny-random-llama"), dtype=torch.float32)
    moved = max(float((a - b).abs().max()) for a, b in zip(model.state_dict().values(), base.state_dict().values()))
    assert moved > 1e-4  # TRL trained it
    records = [json.loads(x) for x in (trl / "step_2/eval.jsonl").read_text().splitlines()]
    for ex, rec in zip(task.load("test"), records):
        ids = torch.tensor([encode_prompt(tok, task.messages(ex))])
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12,
                             pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
        eos = tok.eos_token_id
        gen = gen[:gen.index(eos)] if eos in gen else gen
        assert rec["completion"] == tok.decode(gen, skip_special_tokens=True), ex.id

    # its own column in the comparison and in the papers' table
    assert "| grpo-trl |" in (out / "comparison.md").read_text()
    capsys.readouterr()
    assert report_main(["paper-table", str(out), "--out", str(tmp_path / "table")]) == 0
    assert "GRPO (TRL)" in (tmp_path / "table" / "table.md").read_text()

    # resume: one more step continues from TRL's last sealed checkpoint; a checkpoint cut short is dropped
    step1 = (trl / "step_1" / "metrics.json").read_text()
    (trl / "trl" / "checkpoint-7").mkdir()
    assert load().main(_args(out, "run.iterations=3")) == 0
    log = capsys.readouterr().out
    assert "resuming" in log and "checkpoint-2" in log and not (trl / "trl" / "checkpoint-7").exists()
    assert (trl / "step_1" / "metrics.json").read_text() == step1
    rows = [json.loads(x) for x in (trl / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3] and rows[3]["test_accuracy"] is not None
    assert np.isfinite(rows[3]["train_loss"])
