"""The E-step samplers (with a stub engine that answers from a table), batching and prompt
masking, the learning-rate schedule, and config errors."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from fem_jax import objectives
from fem_jax.config import MStepCfg, load_config
from fem_jax.estep import plan, run_estep
from fem_jax.mstep import TrainExample, lr_for_iteration, make_batches
from fem_jax.rollout.engine import Sample


@dataclasses.dataclass(frozen=True)
class Ex:
    id: str
    gold: int
    fields: dict = dataclasses.field(default_factory=dict)


class StubTask:
    """Prompts are tagged strings; the answer is the last integer of the completion."""

    def messages(self, ex, hint=None):
        text = f"Q {ex.id}" + (f" HINT[{hint}]={ex.gold}" if hint else "")
        return [{"role": "user", "content": text}]

    def parse(self, text):
        toks = [t for t in text.split() if t.lstrip("-").isdigit()]
        return int(toks[-1]) if toks else None

    def reward(self, answer, gold):
        return float(answer == gold)

    def hint_leaked(self, text):
        return "hint" in text


class TableEngine:
    """Answers prompt -> list of texts, one per successive call for that prompt."""

    def __init__(self, table):
        self.table = {k: list(v) for k, v in table.items()}
        self.calls = []

    def generate(self, prompts, n=1, seed=0, progress=None, **kw):
        self.calls.append([p[0]["content"] for p in prompts])
        outs = []
        for p in prompts:
            key = p[0]["content"]
            outs.append([Sample(self.table[key].pop(0), [1, 2], "stop", [-0.1, -0.2]) for _ in range(n)])
        return outs


EXAMPLES = [Ex("a", 5), Ex("b", 7), Ex("c", 9)]
KW = dict(budget=3, samples_per_prompt=1, temperature=0.7, top_p=1.0, top_k=0, max_new_tokens=8, seed=0,
          trains=objectives.get("fem").trains)


def test_plan_of_each_scheme():
    assert plan("rs", 3) == [None, None, None]
    assert plan("pps", 1) == ["pps"]  # the paper's PPS: one hinted draw
    assert plan("pps", 3) == ["pps"] * 3  # ours (an ablation): up to M hinted draws
    assert plan("pps3", 1) == ["pps3"]
    assert plan("star", 3) == [None, "pps"]
    assert plan("star2", 3) == [None, "pps2"]
    with pytest.raises(ValueError, match="scheme"):
        plan("beam", 3)


def test_rejection_sampling_stops_at_first_success_within_budget():
    eng = TableEngine({"Q a": ["so 5"], "Q b": ["1", "2", "7"], "Q c": ["1", "2", "3"]})
    draws = run_estep(StubTask(), eng, EXAMPLES, scheme="rs", **KW)
    assert eng.calls == [["Q a", "Q b", "Q c"], ["Q b", "Q c"], ["Q b", "Q c"]]
    kept = [(d.example_id, d.round) for d in draws if d.accepted and d.trained]
    assert kept == [("a", 0), ("b", 2)]
    assert len(draws) == 7 and not any(d.hinted for d in draws)


def test_pps_draws_once_with_the_hint_and_star_rationalizes_misses():
    eng = TableEngine({"Q a HINT[pps]=5": ["5"], "Q b HINT[pps]=7": ["6"], "Q c HINT[pps]=9": ["9"]})
    draws = run_estep(StubTask(), eng, EXAMPLES, scheme="pps", **{**KW, "budget": 1})
    assert [d.accepted for d in draws] == [True, False, True] and all(d.hinted for d in draws)
    assert [d.trained for d in draws] == [d.accepted for d in draws]

    eng = TableEngine({"Q a": ["5"], "Q b": ["0"], "Q c": ["0"], "Q b HINT[pps2]=7": ["7"],
                       "Q c HINT[pps2]=9": ["8"]})
    draws = run_estep(StubTask(), eng, EXAMPLES, scheme="star2", **KW)
    assert eng.calls == [["Q a", "Q b", "Q c"], ["Q b HINT[pps2]=7", "Q c HINT[pps2]=9"]]
    assert [(d.example_id, d.hinted, d.accepted) for d in draws] == [
        ("a", False, True), ("b", False, False), ("c", False, False), ("b", True, True), ("c", True, False)]


def test_hint_leaks_are_kept_by_default_and_rejected_on_request():
    eng = TableEngine({"Q a HINT[pps]=5": ["the hint says 5"], "Q b HINT[pps]=7": ["7"], "Q c HINT[pps]=9": ["9"]})
    draws = run_estep(StubTask(), eng, EXAMPLES, scheme="pps", **{**KW, "budget": 1})
    assert draws[0].leaked and draws[0].accepted and draws[0].trained  # the paper keeps every correct draw
    eng = TableEngine({"Q a HINT[pps]=5": ["the hint says 5"], "Q b HINT[pps]=7": ["7"], "Q c HINT[pps]=9": ["9"]})
    draws = run_estep(StubTask(), eng, EXAMPLES, scheme="pps", reject_hint_leaks=True, **{**KW, "budget": 1})
    assert draws[0].leaked and not draws[0].accepted and not draws[0].trained and draws[0].reward == 1.0


def test_pps_with_budget_draws_again_with_the_hint_for_its_misses_only():
    """PPS with M = 2 (our ablation): a second hinted round for the examples whose first draw
    was wrong or, with reject_hint_leaks, repeated the hint; none after an accepted draw."""
    eng = TableEngine({"Q a HINT[pps]=5": ["5"], "Q b HINT[pps]=7": ["6", "7"],
                       "Q c HINT[pps]=9": ["the hint is 9", "so 9"]})
    draws = run_estep(StubTask(), eng, EXAMPLES, scheme="pps", reject_hint_leaks=True, **{**KW, "budget": 2})
    assert eng.calls == [["Q a HINT[pps]=5", "Q b HINT[pps]=7", "Q c HINT[pps]=9"],
                         ["Q b HINT[pps]=7", "Q c HINT[pps]=9"]]
    assert [(d.example_id, d.round, d.hinted, d.accepted, d.trained) for d in draws] == [
        ("a", 0, True, True, True), ("b", 0, True, False, False), ("c", 0, True, False, False),
        ("b", 1, True, True, True), ("c", 1, True, True, True)]


def test_policy_gradient_objectives_train_on_every_draw_with_its_reward():
    eng = TableEngine({"Q a": ["5"], "Q b": ["0"], "Q c": ["9"]})
    draws = run_estep(StubTask(), eng, EXAMPLES, scheme="rs", **{**KW, "budget": 1, "trains": objectives.get("empg").trains})
    assert [d.trained for d in draws] == [True, True, True]
    assert [d.accepted for d in draws] == [True, False, True]
    assert [d.reward for d in draws] == [1.0, 0.0, 1.0]


def test_batches_mask_prompt_tokens_and_drop_rejected():
    cfg = MStepCfg(batch_size=4, micro_batch_size=2, max_seq_len=64)
    exs = [TrainExample([10, 11, 12], [20, 21], 1.0), TrainExample([10, 11], [30, 31, 32], 1.0),
           TrainExample([10], [40], 0.0)]  # rejected: never trained on
    batches = make_batches([e for e in exs if e.reward > 0], cfg, pad_id=0, seed=0)
    assert len(batches) == 1
    b = {k: v.reshape((4,) + v.shape[2:]) for k, v in batches[0].items()}
    rows = {tuple(r[m].tolist()) for r, m in zip(b["input_ids"], b["attention_mask"]) if m.any()}
    assert rows == {(10, 11, 12, 20, 21), (10, 11, 30, 31, 32)}
    for ids, am, lm in zip(b["input_ids"], b["attention_mask"], b["loss_mask"]):
        if not am.any():
            assert lm.sum() == 0  # padding rows carry no loss
            continue
        targets = ids[1:][lm[:-1] > 0]
        assert set(targets.tolist()) <= {20, 21, 30, 31, 32}  # only completion tokens are targets
        assert lm.sum() in (2, 3)


def test_lr_decays_linearly_across_iterations_and_is_constant_within():
    cfg = MStepCfg(lr_start=1e-6, lr_end=1e-7)
    lrs = [lr_for_iteration(cfg, k, 5) for k in range(1, 6)]
    np.testing.assert_allclose(lrs, [1e-6, 7.75e-7, 5.5e-7, 3.25e-7, 1e-7])
    assert lr_for_iteration(cfg, 1, 1) == 1e-6


@pytest.mark.parametrize("override,match", [
    ("estep.schem=rs", "unknown key 'estep.schem'"),
    ("estep.scheme=beam", "estep.scheme"),
    ("mstep.lr_start=fast", "mstep.lr_start"),
    ("mstep.micro_batch_size=3", "micro_batch_size"),
    ("mstep.loss_norm=global", "mstep.loss_norm=.global. is invalid; expected step or micro"),
    ("mstep.stats_over=epoch", "mstep.stats_over"),
    ("nosuch.x=1", "unknown key 'nosuch'"),
    ("run.iterations", "key=value"),
])
def test_config_errors_name_the_key(override, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, [override])


def test_config_file_errors(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("mstep:\n  lr_strat: 1e-5\n")
    with pytest.raises(ValueError, match=r"x.yaml: unknown key 'mstep.lr_strat'"):
        load_config(p)
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_config_overrides_apply():
    cfg = load_config(None, ["mstep.lr_start=2e-5", "estep.scheme=star", "task.options={n_train: 5}",
                             "model.remat=true"])
    assert cfg.mstep.lr_start == 2e-5 and cfg.estep.scheme == "star"
    assert cfg.task.options == {"n_train": 5} and cfg.model.remat == "full"


def test_config_include_composes_parts(tmp_path):
    (tmp_path / "parts").mkdir()
    (tmp_path / "parts" / "model.yaml").write_text("model:\n  path: tiny-random-qwen2\nmstep:\n  lr_start: 3.0e-6\n")
    (tmp_path / "parts" / "task.yaml").write_text("task:\n  name: gsm8k\n  options: {n_train: 7}\n")
    exp = tmp_path / "exp.yaml"
    exp.write_text("include: [parts/model.yaml, parts/task.yaml]\nmstep:\n  lr_end: 1.0e-7\n")
    cfg = load_config(exp)
    assert cfg.model.path == "tiny-random-qwen2" and cfg.task.name == "gsm8k"
    assert cfg.mstep.lr_start == 3e-6 and cfg.mstep.lr_end == 1e-7 and cfg.task.options == {"n_train": 7}
    (tmp_path / "bad.yaml").write_text("include: [parts/none.yaml]\n")
    with pytest.raises(FileNotFoundError, match="none.yaml"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "cyc.yaml").write_text("include: [cyc.yaml]\n")
    with pytest.raises(ValueError, match="cycle"):
        load_config(tmp_path / "cyc.yaml")


def test_batches_are_random_mixes_padded_to_their_longest_sequence():
    """Like TRL's and verl's mini-batches: lengths mixed within a step, not sorted into
    buckets; each step is padded to its longest sequence rounded up to the bucket."""
    from fem_jax.mstep import BatchStats

    cfg = MStepCfg(batch_size=4, micro_batch_size=4, max_seq_len=40, length_bucket=8)
    rng = np.random.default_rng(0)
    exs = [TrainExample([1] * 3, [2] * int(n), 1.0) for n in rng.integers(1, 30, size=16)] + \
          [TrainExample([1] * 39, [2, 2], 1.0), TrainExample([1] * 40, [2], 1.0)]  # one cut, one dropped
    stats = BatchStats()
    batches = make_batches(exs, cfg, pad_id=0, seed=3, stats=stats)
    assert (stats.sequences, stats.truncated, stats.dropped) == (17, 1, 1)
    spreads = []
    for b in batches:
        lens = b["attention_mask"].reshape(4, -1).sum(-1)
        lens = lens[lens > 0]
        t = b["input_ids"].shape[-1]
        assert t == min(40, -(-lens.max() // 8) * 8)
        spreads.append(lens.max() - lens.min())
    assert max(spreads) > 8  # at least one step mixes a short and a long sequence
    again = make_batches(exs, cfg, pad_id=0, seed=3)
    assert all(np.array_equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, again))


def test_a_prompt_twice_in_one_step_is_two_grpo_groups():
    """A step that crosses an epoch boundary may draw for one prompt twice: each prompt row is
    its own draw batch (verl's uid per row), so GRPO normalizes within each row's N draws."""
    from fem_jax.config import MStepCfg
    from fem_jax.mstep import TrainExample, set_advantages

    eng = TableEngine({"Q a": ["5", "0", "5", "5"], "Q b": ["7", "0"]})
    rows = [Ex("a", 5), Ex("b", 7), Ex("a", 5)]  # a at the end of one epoch and again in the next
    draws = run_estep(StubTask(), eng, rows, scheme="rs", **{**KW, "budget": 1, "samples_per_prompt": 2,
                                                              "trains": objectives.get("grpo").trains})
    assert [(d.example_id, d.prompt, d.reward) for d in draws] == [
        ("a", 0, 1.0), ("a", 0, 0.0), ("b", 1, 1.0), ("b", 1, 0.0), ("a", 2, 1.0), ("a", 2, 1.0)]
    assert len({d.batch for d in draws}) == 3
    cfg = MStepCfg(objective="grpo", loss_agg="token-mean")
    exs = [TrainExample([1], [2], d.reward) for d in draws]
    set_advantages(cfg, exs, [d.batch for d in draws])
    adv = [round(e.advantage, 4) for e in exs]
    assert adv == [0.7071, -0.7071, 0.7071, -0.7071, 0.0, 0.0]  # the second row of a: all right, no signal
    set_advantages(cfg, exs, [d.example_id for d in draws])  # grouped by prompt: a's 4 draws as one group
    assert [round(e.advantage, 4) for e in exs][4:] != [0.0, 0.0]


def test_rollouts_written_before_draw_batches_were_kept_still_load():
    from fem_jax.estep import Draw

    d = Draw("a", "rs", 0, False, "5", [1], [-0.1], "stop", 5, 1.0, False, True, True, 3)
    row = d.to_json()
    assert Draw.from_json(row, "x").batch == "#3"
    del row["prompt"]
    old = Draw.from_json(row, "x")
    assert old.prompt == -1 and old.batch == "a"
    del row["reward"]
    with pytest.raises(ValueError, match="x: a draw lacks field.s. reward"):
        Draw.from_json(row, "x")
