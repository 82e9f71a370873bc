"""The M-step's numerics: mixed precision keeps float32 master weights (a bfloat16 weight
swallows a 1e-6 update), tempered log-probs are log softmax(logits / T), and θ_old's
log-probs filled in before a round's first update are the current parameters'."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fem_jax.config import MStepCfg
from fem_jax.models.transformer import ModelConfig, Transformer, forward
from fem_jax.mstep import StepSpec, TrainExample, Trainer, _logps, make_batches

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8)


def params(dtype=jnp.float32):
    return Transformer(CFG, dtype=dtype, rngs=nnx.Rngs(0), init_std=0.02).param_dict()


def batch(cfg: MStepCfg, seed=0):
    rng = np.random.default_rng(seed)
    exs = [TrainExample(rng.integers(1, 64, 5).tolist(), rng.integers(1, 64, int(rng.integers(2, 9))).tolist(), 1.0)
           for _ in range(cfg.batch_size)]
    return make_batches(exs, cfg, pad_id=0, seed=seed)[0]


def share_changed(before, after):
    n = sum(v.size for v in before.values())
    return sum(int(jnp.sum(before[k] != after[k])) for k in before) / n


@pytest.mark.parametrize("compute,store,want_most", [("bfloat16", jnp.float32, True), ("", jnp.bfloat16, False)])
def test_a_small_update_survives_only_in_float32_master_weights(compute, store, want_most):
    cfg = MStepCfg(lr_start=1e-6, lr_end=1e-6, batch_size=4, micro_batch_size=4, grad_clip=0.0,
                   compute_dtype=compute, length_bucket=8)
    p0 = params(store)
    tr = Trainer(CFG, p0, cfg)
    before = jax.tree.map(jnp.copy, tr.params)
    m = tr.step(batch(cfg))
    assert np.isfinite(m["loss"]) and all(bool(jnp.isfinite(v.astype(jnp.float32)).all()) for v in tr.params.values())
    changed = share_changed(before, tr.params)
    assert (changed > 0.9) if want_most else (changed < 0.2), changed
    assert all(v.dtype == jnp.dtype(store) for v in tr.params.values())


def test_bfloat16_compute_gives_the_float32_loss_within_bf16_tolerance():
    f32 = MStepCfg(batch_size=4, micro_batch_size=2, length_bucket=8)
    bf16 = dataclasses.replace(f32, compute_dtype="bfloat16")
    b = batch(f32)
    with jax.default_matmul_precision("highest"):
        l32 = Trainer(CFG, params(), f32).step(b)["loss"]
    l16 = Trainer(CFG, params(), bf16).step(b)["loss"]
    assert l16 == pytest.approx(l32, rel=2e-2) and l16 != l32


def test_tempered_log_probs_are_the_log_softmax_of_logits_over_t():
    p = params()
    cfg = MStepCfg(batch_size=2, micro_batch_size=2, length_bucket=8)
    b = batch(cfg)
    mb = {k: jnp.asarray(v[0]) for k, v in b.items()}
    with jax.default_matmul_precision("highest"):
        got = np.asarray(_logps(StepSpec(CFG, cfg, None, "none", temperature=0.7), p, mb))
        logits = np.asarray(forward(CFG, p, mb["input_ids"], mb["attention_mask"])[0], np.float64) / 0.7
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    ids = np.asarray(mb["input_ids"])
    want = np.take_along_axis(logits[:, :-1], ids[:, 1:, None], -1)[..., 0] - logz[:, :-1]
    mask = np.asarray(mb["loss_mask"])[:, :-1] > 0
    np.testing.assert_allclose(got[:, :-1][mask], want[mask], rtol=1e-5, atol=1e-5)


def test_old_log_probs_are_the_current_parameters_at_the_sampling_temperature():
    cfg = MStepCfg(objective="grpo", loss_agg="token-mean", reset_optimizer=False, batch_size=4, micro_batch_size=2,
                   length_bucket=8)
    tr = Trainer(CFG, params(), cfg, temperature=0.5)
    b = batch(cfg)
    assert "old_logps" in b and np.all(b["old_logps"] == 0)
    tr.fill_old_logps([b])
    flat = {k: jnp.asarray(v.reshape((-1,) + v.shape[2:])) for k, v in b.items()}
    want = np.asarray(_logps(StepSpec(CFG, cfg, None, "none", temperature=0.5), tr.params, flat))
    np.testing.assert_allclose(b["old_logps"].reshape(want.shape), want, rtol=1e-6, atol=1e-6)
    m = tr.step(b)  # on-policy first update: the ratio is 1, nothing clipped
    assert np.isfinite(m["loss"])


def _uneven_batch(cfg: MStepCfg):
    """One step of 4 sequences in 2 micro-batches: 2 short completions and 2 long ones, so the
    micro-batches' token counts differ whatever the shuffle puts together (unless it pairs
    one of each, which seed 0 does not)."""
    rng = np.random.default_rng(1)
    exs = [TrainExample(rng.integers(1, 64, 4).tolist(), rng.integers(1, 64, n).tolist(), 1.0) for n in (2, 2, 12, 12)]
    b = make_batches(exs, cfg, pad_id=0, seed=0)[0]
    counts = b["loss_mask"].sum(axis=(1, 2))
    assert counts[0] != counts[1], counts
    return b


def test_micro_normalization_is_the_mean_of_micro_batch_token_means_as_verl_took_it():
    """loss_norm=micro (verl's dp_actor at 281ed3a): each micro-batch's token-mean, divided by
    the number of micro-batches; loss_norm=step: the token-mean of the whole update (TRL).
    They differ when the micro-batches hold different numbers of tokens."""
    step = MStepCfg(batch_size=4, micro_batch_size=2, length_bucket=8, grad_clip=0.0)
    micro = dataclasses.replace(step, loss_norm="micro")
    b = _uneven_batch(step)
    p = params()
    with jax.default_matmul_precision("highest"):
        nll = [-np.asarray(_logps(StepSpec(CFG, step, None, "none"), p, {k: jnp.asarray(v[i]) for k, v in b.items()}))
               for i in range(2)]
        got_step = Trainer(CFG, params(), step).step(b)["loss"]
        got_micro = Trainer(CFG, params(), micro).step(b)["loss"]
    m = [b["loss_mask"][i] > 0 for i in range(2)]
    want_micro = np.mean([nll[i][m[i]].mean() for i in range(2)])
    want_step = np.concatenate([nll[i][m[i]] for i in range(2)]).mean()
    assert got_micro == pytest.approx(want_micro, rel=1e-5) and got_step == pytest.approx(want_step, rel=1e-5)
    assert abs(want_micro - want_step) > 1e-3 * abs(want_step)
    one = dataclasses.replace(step, micro_batch_size=4)  # one micro-batch: the two are one thing
    with jax.default_matmul_precision("highest"):
        a = Trainer(CFG, params(), one).step(batch(one))["loss"]
        c = Trainer(CFG, params(), dataclasses.replace(one, loss_norm="micro")).step(batch(one))["loss"]
    assert a == pytest.approx(c, rel=1e-6)


def test_update_statistics_are_each_steps_own():
    """stats_over=update: EMPG's μ, σ and b over each optimizer update's batch (the paper's
    "mini-batch M"); buffer: over the whole round's draws."""
    from fem_jax.mstep import set_advantages
    from fem_jax.objectives import empg_advantages, ObjectiveConfig

    rewards = [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    exs = [TrainExample([1, 2], [3, 4, 5], r) for r in rewards]
    for over in ("buffer", "update"):
        cfg = MStepCfg(objective="empg", batch_size=4, micro_batch_size=2, length_bucket=8, stats_over=over)
        set_advantages(cfg, exs, [str(i) for i in range(len(exs))])
        batches = make_batches(exs, cfg, pad_id=0, seed=3)
        for bt in batches:
            r, adv = bt["rewards"].reshape(-1), bt["advantages"].reshape(-1)
            own = empg_advantages(r, np.zeros(len(r), int), ObjectiveConfig(name="empg"))
            whole = {e.reward: e.advantage for e in exs}  # over the buffer: one weight per reward value
            if over == "update":
                np.testing.assert_allclose(adv, own, atol=1e-6)
            else:
                np.testing.assert_allclose(adv, [whole[x] for x in r], atol=1e-6)
        assert any(not np.allclose(bt["advantages"].reshape(-1), [whole[x] for x in bt["rewards"].reshape(-1)])
                   for bt in batches) == (over == "update")


def test_one_update_without_old_log_probs_is_the_update_with_them():
    """A round of one update drops `old_logps` (fem_jax.experiment): the loss then reads its
    own detached log-probs, which must give the update θ_old's filled-in log-probs give."""
    cfg = MStepCfg(objective="grpo", loss_agg="token-mean", reset_optimizer=False, batch_size=4, micro_batch_size=2,
                   length_bucket=8, grad_clip=0.0)
    b = batch(cfg)
    b["advantages"] = np.random.default_rng(1).normal(size=b["advantages"].shape).astype(np.float32)
    with jax.default_matmul_precision("highest"):
        filled = Trainer(CFG, params(), cfg, temperature=0.7)
        fb = {k: v.copy() for k, v in b.items()}
        filled.fill_old_logps([fb])
        m_filled = filled.step(fb)
        dropped = Trainer(CFG, params(), cfg, temperature=0.7)
        m_dropped = dropped.step({k: v for k, v in b.items() if k != "old_logps"})
    assert m_dropped["grad_norm"] > 0
    assert m_dropped["grad_norm"] == pytest.approx(m_filled["grad_norm"], rel=1e-4)
    for k in filled.params:
        np.testing.assert_allclose(dropped.params[k], filled.params[k], rtol=1e-5, atol=1e-7)


def test_a_step_of_a_shape_seen_before_does_not_compile_again():
    """The learning rate of a new iteration, a new Trainer (the next run of a sweep, a
    restart from the base model) and a reset optimizer reuse the compiled step: only a new
    padded length (or micro-batch layout) compiles."""
    from fem_jax.mstep import train_step

    cfg = MStepCfg(objective="fem", batch_size=4, micro_batch_size=2, length_bucket=16, lr_start=1e-3, lr_end=1e-4)
    tr = Trainer(CFG, params(), cfg)
    tr.train([batch(cfg, seed=0)])
    seen = train_step._cache_size()
    tr.set_lr(5e-4)
    tr.train([batch(cfg, seed=1), batch(cfg, seed=2)])
    tr.reset_optimizer()
    tr.train([batch(cfg, seed=3)])
    Trainer(CFG, params(), cfg).train([batch(cfg, seed=4)])
    assert train_step._cache_size() == seen
    tr.train([batch(dataclasses.replace(cfg, length_bucket=32), seed=5)])  # a longer padded length
    assert train_step._cache_size() == seen + 1
