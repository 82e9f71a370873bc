"""Tests of fem_jax.objectives: exact values against independent numpy references, masking,
gradients, GRPO clipping, EMPG smoothing/baseline, the registry, and parity of `fem` with the
PyTorch/TRL SFT completion-only loss."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fem_jax import objectives as obj
from fem_jax.objectives import ObjectiveConfig


# ----------------------------------------------------------------------- numpy references
# Written loop by loop from the formulas, sharing no code with the module under test.


def np_fem(logps, mask, rewards, loss_agg="token-mean"):
    num = den = 0.0
    for i in range(logps.shape[0]):
        r = max(float(rewards[i]), 0.0)
        toks = [float(logps[i, t]) for t in range(logps.shape[1]) if mask[i, t] > 0]
        if r == 0 or not toks:
            continue
        if loss_agg == "token-mean":
            num += -r * sum(toks)
            den += r * len(toks)
        elif loss_agg == "seq-mean-token-sum":
            num += -r * sum(toks)
            den += r
        else:
            num += -r * sum(toks) / len(toks)
            den += r
    return num / den if den else 0.0


def np_k3(lp, ref):
    return np.exp(ref - lp) - (ref - lp) - 1.0


def np_pg_reduce(per_token, mask, loss_agg):
    """per_token: list of lists of kept-token values per row (padding rows already removed)."""
    if loss_agg == "token-mean":
        flat = [v for row in per_token for v in row]
        return sum(flat) / len(flat) if flat else 0.0
    if loss_agg == "seq-mean-token-sum":
        rows = [sum(row) for row in per_token if row]
    else:
        rows = [sum(row) / len(row) for row in per_token if row]
    return sum(rows) / len(rows) if rows else 0.0


def np_empg_weights(rewards, eps=1e-6):
    r = np.asarray(rewards, np.float64)
    z = np.zeros_like(r) if r.std() == 0 else (r - r.mean()) / r.std()
    s = 1.0 / (1.0 + np.exp(-z))
    return s - s.mean()


def np_grpo_adv(rewards, group, eps=1e-6):
    adv = np.zeros(len(rewards))
    for g in set(group):
        idx = [i for i in range(len(rewards)) if group[i] == g]
        vals = np.array([rewards[i] for i in idx], np.float64)
        mean, std = (vals.mean(), vals.std(ddof=1)) if len(idx) > 1 else (0.0, 1.0)  # verl: one draw, A = r
        for i in idx:
            adv[i] = (rewards[i] - mean) / (std + eps)
    return adv


def np_pg(kind, logps, mask, rewards, group=None, old=None, ref=None, beta=0.0, clip=0.2,
          loss_agg="token-mean", eps=1e-6, clip_c=3.0):
    rows = [i for i in range(logps.shape[0]) if mask[i].sum() > 0]
    r = [float(rewards[i]) for i in rows]
    if kind == "empg":
        w = np_empg_weights(r, eps)
    else:
        w = np_grpo_adv(r, [int(group[i]) for i in rows], eps)
    pg, kl = [], []
    for k, i in enumerate(rows):
        pg_row, kl_row = [], []
        for t in range(logps.shape[1]):
            if mask[i, t] == 0:
                continue
            lp = float(logps[i, t])
            if kind == "empg":
                pg_row.append(-w[k] * lp)
            else:
                ratio = np.exp(lp - (float(old[i, t]) if old is not None else lp))
                a = w[k]
                term = max(-ratio * a, -np.clip(ratio, 1 - clip, 1 + clip) * a)
                pg_row.append(min(term, -a * clip_c) if a < 0 else term)  # verl's dual clip
            kl_row.append(np_k3(lp, float(ref[i, t])) if beta else 0.0)
        pg.append(pg_row)
        kl.append(kl_row)
    return np_pg_reduce(pg, mask, loss_agg) + beta * np_pg_reduce(kl, mask, loss_agg)


# ----------------------------------------------------------------------- fixtures


def random_batch(seed, b=6, t=7, n_groups=3, with_pad_row=True):
    rng = np.random.default_rng(seed)
    logps = -rng.gamma(2.0, 0.7, size=(b, t)).astype(np.float32)
    prompt_len = rng.integers(1, 4, size=b)
    comp_len = rng.integers(1, t - 3, size=b)
    mask = np.zeros((b, t), np.float32)
    for i in range(b):
        mask[i, prompt_len[i]:prompt_len[i] + comp_len[i]] = 1.0
    if with_pad_row:
        mask[-1] = 0.0  # a padding row
    rewards = rng.integers(0, 2, size=b).astype(np.float32)
    rewards[0], rewards[1] = 1.0, 0.0  # at least one kept and one filtered
    group = (np.arange(b) % n_groups).astype(np.int32)
    old = (logps + rng.normal(0, 0.3, size=(b, t))).astype(np.float32)
    ref = (logps + rng.normal(0, 0.3, size=(b, t))).astype(np.float32)
    batch = {"loss_mask": mask, "rewards": rewards, "group": group, "old_logps": old, "ref_logps": ref}
    return logps, batch


def adv_of(name, rewards, group, valid):
    """The objective's advantages over the valid rows (0 on padding rows), numpy."""
    r, g, v = np.asarray(rewards, np.float32), np.asarray(group), np.asarray(valid) > 0
    out = np.zeros(r.shape, np.float32)
    out[v] = obj.get(name).advantages(r[v], g[v], ObjectiveConfig(name))
    return out


def jnp_batch(batch):
    return {k: jnp.asarray(v) for k, v in batch.items()}


def grad_logps(cfg, logps, batch):
    return jax.grad(lambda lp: obj.loss(cfg, lp, jnp_batch(batch))[0])(jnp.asarray(logps))


# ----------------------------------------------------------------------- fem


def test_fem_hand_computed():
    # row 0: kept, completion tokens at t=1,2 (logps -1, -2); row 1: filtered (r=0);
    # row 2: kept, completion at t=1..3 (-3, -3, -6); prompt tokens carry huge values.
    logps = np.array([[-9, -1, -2, -9], [-5, -5, -5, -5], [-9, -3, -3, -6]], np.float32)
    mask = np.array([[0, 1, 1, 0], [0, 1, 1, 1], [0, 1, 1, 1]], np.float32)
    batch = {"loss_mask": mask, "rewards": np.array([1.0, 0.0, 1.0], np.float32),
             "group": np.zeros(3, np.int32)}
    tok, m = obj.loss(ObjectiveConfig("fem"), jnp.asarray(logps), jnp_batch(batch))
    assert float(tok) == pytest.approx((1 + 2 + 3 + 3 + 6) / 5)  # 3.0
    assert float(m["tokens"]) == 5 and float(m["nll"]) == pytest.approx(3.0)
    seq, _ = obj.loss(ObjectiveConfig("fem", loss_agg="seq-mean-token-mean"), jnp.asarray(logps), jnp_batch(batch))
    assert float(seq) == pytest.approx((1.5 + 4.0) / 2)  # 2.75


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fem_matches_numpy(loss_agg, seed):
    logps, batch = random_batch(seed)
    batch["rewards"] = np.array([1, 0, 0.5, 1, 2, 1], np.float32)  # fractional rewards weigh rows
    got, _ = obj.loss(ObjectiveConfig("fem", loss_agg=loss_agg), jnp.asarray(logps), jnp_batch(batch))
    want = np_fem(logps, batch["loss_mask"], batch["rewards"], loss_agg)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_fem_gradient_is_mean_nll_gradient_of_kept_tokens():
    logps, batch = random_batch(3)
    kept = (batch["loss_mask"] > 0) & (batch["rewards"][:, None] > 0)

    def mean_nll(lp):
        return -jnp.sum(jnp.where(kept, lp, 0.0)) / kept.sum()

    want = jax.grad(mean_nll)(jnp.asarray(logps))
    got = grad_logps(ObjectiveConfig("fem"), logps, batch)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-7)
    assert np.all(np.asarray(got)[~kept] == 0) and np.all(np.asarray(got)[kept] < 0)


def test_fem_filtered_rows_equal_dropping_them():
    logps, batch = random_batch(4, with_pad_row=False)
    keep = batch["rewards"] > 0
    sub = {k: v[keep] for k, v in batch.items()}
    full, _ = obj.loss(ObjectiveConfig("fem"), jnp.asarray(logps), jnp_batch(batch))
    only, _ = obj.loss(ObjectiveConfig("fem"), jnp.asarray(logps[keep]), jnp_batch(sub))
    assert float(full) == pytest.approx(float(only), rel=1e-6)


def test_fem_rejects_beta():
    logps, batch = random_batch(0)
    with pytest.raises(ValueError, match="beta"):
        obj.loss(ObjectiveConfig("fem", beta=0.1), jnp.asarray(logps), jnp_batch(batch))


# ----------------------------------------------------------------------- all objectives

ALL = [
    ObjectiveConfig("fem"),
    ObjectiveConfig("fem", loss_agg="seq-mean-token-mean"),
    ObjectiveConfig("empg"),
    ObjectiveConfig("empg", loss_agg="seq-mean-token-mean", beta=0.1),
    ObjectiveConfig("empg", loss_agg="seq-mean-token-sum", beta=0.1),
    ObjectiveConfig("grpo"),
    ObjectiveConfig("grpo", loss_agg="seq-mean-token-mean", beta=0.04, clip_eps=0.1),
]


@pytest.mark.parametrize("cfg", [c for c in ALL if c.name != "fem"], ids=str)
@pytest.mark.parametrize("seed", [0, 1])
def test_pg_objectives_match_numpy(cfg, seed):
    logps, batch = random_batch(seed)
    got, metrics = obj.loss(cfg, jnp.asarray(logps), jnp_batch(batch))
    want = np_pg(cfg.name, logps, batch["loss_mask"], batch["rewards"], batch["group"],
                 batch["old_logps"], batch["ref_logps"], cfg.beta, cfg.clip_eps, cfg.loss_agg)
    np.testing.assert_allclose(float(got), want, rtol=1e-5, atol=1e-6)
    assert float(metrics["loss"]) == float(got)


@pytest.mark.parametrize("cfg", ALL, ids=str)
def test_masked_positions_change_nothing(cfg):
    logps, batch = random_batch(5)
    masked = batch["loss_mask"] == 0
    loss0, _ = obj.loss(cfg, jnp.asarray(logps), jnp_batch(batch))
    g0 = grad_logps(cfg, logps, batch)
    for junk in (123.0, -np.inf, np.nan):
        lp2 = np.where(masked, junk, logps).astype(np.float32)
        b2 = dict(batch, old_logps=np.where(masked, -junk, batch["old_logps"]).astype(np.float32),
                  ref_logps=np.where(masked, junk, batch["ref_logps"]).astype(np.float32))
        loss2, _ = obj.loss(cfg, jnp.asarray(lp2), jnp_batch(b2))
        g2 = grad_logps(cfg, lp2, b2)
        assert float(loss2) == pytest.approx(float(loss0), rel=1e-6)
        np.testing.assert_array_equal(np.asarray(g2), np.asarray(g0))
    assert np.all(np.asarray(g0)[masked] == 0)


@pytest.mark.parametrize("cfg", ALL, ids=str)
def test_padding_rows_contribute_nothing(cfg):
    logps, batch = random_batch(6, with_pad_row=False)
    # two padding rows with large rewards, in an existing group: they must not move any statistic
    pad = {"loss_mask": np.zeros((2, logps.shape[1]), np.float32), "rewards": np.array([5.0, -3.0], np.float32),
           "group": np.array([0, 1], np.int32), "old_logps": np.full((2, logps.shape[1]), -50.0, np.float32),
           "ref_logps": np.full((2, logps.shape[1]), 7.0, np.float32)}
    big = {k: np.concatenate([batch[k], pad[k]]) for k in batch}
    lp_big = np.concatenate([logps, np.full((2, logps.shape[1]), -77.0, np.float32)])
    a, ma = obj.loss(cfg, jnp.asarray(logps), jnp_batch(batch))
    b, mb = obj.loss(cfg, jnp.asarray(lp_big), jnp_batch(big))
    assert float(a) == pytest.approx(float(b), rel=1e-6)
    for k in ma:
        assert float(ma[k]) == pytest.approx(float(mb[k]), rel=1e-5, abs=1e-7), k
    ga, gb = grad_logps(cfg, logps, batch), grad_logps(cfg, lp_big, big)
    np.testing.assert_allclose(np.asarray(gb[:-2]), np.asarray(ga), atol=1e-7)
    assert np.all(np.asarray(gb[-2:]) == 0)


@pytest.mark.parametrize("cfg", ALL, ids=str)
@pytest.mark.parametrize("case", ["all_filtered", "all_masked"])
def test_nothing_kept_gives_zero_loss_and_gradient(cfg, case):
    logps, batch = random_batch(7)
    if case == "all_filtered":
        batch["rewards"] = np.zeros_like(batch["rewards"])  # also zero std for empg/grpo
    else:
        batch["loss_mask"] = np.zeros_like(batch["loss_mask"])
    # ref = logps makes the KL zero, so a policy-gradient loss has nothing left
    batch["ref_logps"] = logps.copy()
    loss, metrics = obj.loss(cfg, jnp.asarray(logps), jnp_batch(batch))
    g = grad_logps(cfg, logps, batch)
    assert float(loss) == 0.0
    assert np.all(np.asarray(g) == 0)
    assert all(np.isfinite(float(v)) for v in metrics.values())


@pytest.mark.parametrize("cfg", ALL, ids=str)
def test_jit_equals_eager(cfg):
    logps, batch = random_batch(8)
    eager, m1 = obj.loss(cfg, jnp.asarray(logps), jnp_batch(batch))
    jitted, m2 = jax.jit(obj.loss, static_argnums=0)(cfg, jnp.asarray(logps), jnp_batch(batch))
    assert float(eager) == pytest.approx(float(jitted), rel=1e-6)
    assert set(m1) == set(m2) and {"loss", "tokens", "nll"} <= set(m1)


@pytest.mark.parametrize("cfg", ALL, ids=str)
def test_gradient_accumulation_with_num_items(cfg):
    """Two micro-batches with the full step's denominator (and, for empg/grpo, advantages
    computed over the full batch) sum to the full-batch loss and gradient."""
    logps, batch = random_batch(9, b=8, n_groups=2)
    full_b = jnp_batch(batch)
    full, _ = obj.loss(cfg, jnp.asarray(logps), full_b)
    g_full = grad_logps(cfg, logps, batch)
    valid = (batch["loss_mask"].sum(-1) > 0).astype(np.float32)
    extra = {"num_items": np.asarray(obj.denominator(cfg, full_b))}
    if cfg.name == "empg":
        extra["advantages"] = adv_of("empg", batch["rewards"], batch["group"], valid)
    elif cfg.name == "grpo":
        extra["advantages"] = adv_of("grpo", batch["rewards"], batch["group"], valid)
    total, grads = 0.0, []
    for sl in (slice(0, 3), slice(3, 8)):
        mb = {k: v[sl] for k, v in batch.items()}
        mb.update({k: (v if k == "num_items" else v[sl]) for k, v in extra.items()})
        total += float(obj.loss(cfg, jnp.asarray(logps[sl]), jnp_batch(mb))[0])
        grads.append(np.asarray(grad_logps(cfg, logps[sl], mb)))
    assert total == pytest.approx(float(full), rel=1e-5)
    np.testing.assert_allclose(np.concatenate(grads), np.asarray(g_full), atol=1e-7)
    parts = [float(obj.denominator(cfg, jnp_batch({k: v[sl] for k, v in batch.items()})))
             for sl in (slice(0, 3), slice(3, 8))]
    assert sum(parts) == pytest.approx(float(extra["num_items"]))


# ----------------------------------------------------------------------- grpo


def test_grpo_advantages_hand_computed_and_degenerate_groups():
    rewards = np.array([1.0, 0.0, 0.0, 1.0, 1.0, 0.7, 0.0])
    group = np.array([0, 0, 0, 1, 1, 2, 0], np.int32)
    valid = np.array([1, 1, 1, 1, 1, 1, 0.0])
    adv = adv_of("grpo", rewards, group, valid)
    s = np.std([1, 0, 0], ddof=1)  # 0.57735
    np.testing.assert_allclose(adv[:3], [(2 / 3) / s, (-1 / 3) / s, (-1 / 3) / s], rtol=1e-5)
    assert adv[3] == adv[4] == 0.0  # zero std group
    assert adv[5] == pytest.approx(0.7 / (1 + 1e-6))  # single-sample group: verl's mean 0, std 1
    assert adv[6] == 0.0  # padding row


def test_grpo_ratio_one_is_advantage_weighted_logp_gradient():
    logps, batch = random_batch(10)
    mask = batch["loss_mask"]
    valid = (mask.sum(-1) > 0).astype(np.float32)
    adv = adv_of("grpo", batch["rewards"], batch["group"], valid)
    want = -adv[:, None] * mask / mask.sum()  # d/dlogp of -sum A m logp / N
    cfg = ObjectiveConfig("grpo")
    on_policy = dict(batch, old_logps=logps.copy())
    no_old = {k: v for k, v in batch.items() if k != "old_logps"}
    for b in (on_policy, no_old):
        np.testing.assert_allclose(np.asarray(grad_logps(cfg, logps, b)), want, atol=1e-7)
        loss, m = obj.loss(cfg, jnp.asarray(logps), jnp_batch(b))
        assert float(loss) == pytest.approx(float(-(adv[:, None] * mask).sum() / mask.sum()), abs=1e-6)
        assert float(m["clip_frac"]) == 0.0 and float(m["ratio_mean"]) == pytest.approx(1.0)


def test_grpo_clipping_engages_outside_the_trust_region():
    # one group of two: advantages +-0.5/(std+eps) = +-1/sqrt(2); 4 completion tokens each
    eps_c = 0.2
    logps = np.zeros((2, 4), np.float32)
    mask = np.ones((2, 4), np.float32)
    # ratios per token: row 0 (A > 0): 1.5 clipped, 0.5 not, 1.1 inside, 1.0
    #                   row 1 (A < 0): 0.5 clipped, 1.5 not, 0.9 inside, 1.0
    ratios = np.array([[1.5, 0.5, 1.1, 1.0], [0.5, 1.5, 0.9, 1.0]], np.float32)
    batch = {"loss_mask": mask, "rewards": np.array([1.0, 0.0], np.float32),
             "group": np.zeros(2, np.int32), "old_logps": -np.log(ratios)}
    cfg = ObjectiveConfig("grpo", clip_eps=eps_c)
    g = np.asarray(grad_logps(cfg, logps, batch))
    a = 0.5 / (np.std([1.0, 0.0], ddof=1) + cfg.eps)
    adv = np.array([a, -a])
    clipped = np.array([[1, 0, 0, 0], [1, 0, 0, 0]], bool)
    want_g = np.where(clipped, 0.0, -adv[:, None] * ratios / mask.sum())
    np.testing.assert_allclose(g, want_g, rtol=1e-5)
    loss, m = obj.loss(cfg, jnp.asarray(logps), jnp_batch(batch))
    surrogate = np.minimum(ratios * adv[:, None], np.clip(ratios, 1 - eps_c, 1 + eps_c) * adv[:, None])
    assert float(loss) == pytest.approx(-surrogate.mean(), rel=1e-5)
    assert float(m["clip_frac"]) == pytest.approx(2 / 8)


def test_grpo_kl_k3_hand_computed():
    logps = np.array([[np.log(0.5), np.log(0.25)]], np.float32)
    ref = np.array([[np.log(0.25), np.log(0.25)]], np.float32)
    batch = {"loss_mask": np.ones((1, 2), np.float32), "rewards": np.ones(1, np.float32),
             "group": np.zeros(1, np.int32), "ref_logps": ref}
    _, m = obj.loss(ObjectiveConfig("grpo", beta=0.5), jnp.asarray(logps), jnp_batch(batch))
    # token 0: exp(log .5) - log .5 - 1 = 0.5 + 0.693147 - 1; token 1: 0
    assert float(m["kl"]) == pytest.approx((0.5 + np.log(2) - 1) / 2, rel=1e-5)
    loss, _ = obj.loss(ObjectiveConfig("grpo", beta=0.5), jnp.asarray(logps), jnp_batch(batch))
    # a group of one draw: verl's mean 0, std 1 gives A = r = 1, ratio 1: pg = -1 per token
    assert float(loss) == pytest.approx(-1.0 + 0.5 * (0.5 + np.log(2) - 1) / 2, rel=1e-5)


def test_beta_without_ref_logps_is_an_error():
    logps, batch = random_batch(0)
    del batch["ref_logps"]
    for name in ("empg", "grpo"):
        with pytest.raises(ValueError, match="ref_logps"):
            obj.loss(ObjectiveConfig(name, beta=0.1), jnp.asarray(logps), jnp_batch(batch))
        obj.loss(ObjectiveConfig(name), jnp.asarray(logps), jnp_batch(batch))  # beta = 0: fine


# ----------------------------------------------------------------------- empg


def test_empg_smoothing_and_baseline_hand_computed():
    rewards = np.array([1.0, 0.0, 0.0, 1.0])
    w = adv_of("empg", rewards, np.zeros(4), np.ones(4))
    # mean 0.5, population std 0.5: sigmoid(+-0.5/0.5) = sigmoid(+-1); baseline = 0.5 by symmetry
    s1 = 1 / (1 + np.exp(-1.0))  # 0.731059
    np.testing.assert_allclose(w, [s1 - 0.5, 0.5 - s1, 0.5 - s1, s1 - 0.5], rtol=1e-5)
    # asymmetric: 1 correct of 4 -> mean .25, std sqrt(3)/4; baseline is the mean sigmoid, not 0.5
    w = adv_of("empg", np.array([1.0, 0.0, 0.0, 0.0]), np.zeros(4), np.ones(4))
    z = np.array([0.75, -0.25, -0.25, -0.25]) / (np.sqrt(3) / 4)
    s = 1 / (1 + np.exp(-z))
    np.testing.assert_allclose(w, s - s.mean(), rtol=1e-5)
    assert abs(w.sum()) < 1e-6 and w[0] > 0 > w[1]
    # equal rewards: no signal at all
    assert np.all(adv_of("empg", np.ones(5), np.zeros(5), np.ones(5)) == 0)


def test_empg_uses_no_importance_weights():
    logps, batch = random_batch(11)
    cfg = ObjectiveConfig("empg")
    g1 = grad_logps(cfg, logps, batch)
    g2 = grad_logps(cfg, logps, dict(batch, old_logps=batch["old_logps"] - 3.0))
    np.testing.assert_array_equal(np.asarray(g1), np.asarray(g2))
    mask = batch["loss_mask"]
    valid = (mask.sum(-1) > 0).astype(np.float32)
    w = adv_of("empg", batch["rewards"], batch["group"], valid)
    np.testing.assert_allclose(np.asarray(g1), -w[:, None] * mask / mask.sum(), atol=1e-7)


# ----------------------------------------------------------------------- registry and config


def test_registry():
    assert {"fem", "empg", "grpo"} <= set(obj.OBJECTIVES)
    with pytest.raises(ValueError, match=r"unknown objective 'sft'.*empg, fem, grpo"):
        obj.get("sft")
    with pytest.raises(ValueError, match="unknown objective"):
        obj.loss(ObjectiveConfig("nope"), jnp.zeros((1, 2)), {"loss_mask": jnp.ones((1, 2))})
    with pytest.raises(ValueError, match="already registered"):
        obj.register(obj.Objective("fem", lambda cfg, lp, b: (0.0, {})))

    def _neg_mean(cfg, logps, batch):
        v = -jnp.mean(logps)
        return v, {"loss": v}

    obj.register(obj.Objective("test_mean_logp", _neg_mean))
    try:
        v, _ = obj.loss(ObjectiveConfig("test_mean_logp"), -jnp.ones((2, 3)), {})
        assert float(v) == 1.0 and obj.get("test_mean_logp").loss is _neg_mean
    finally:
        del obj.OBJECTIVES["test_mean_logp"]


@pytest.mark.parametrize("field,value", [("loss_agg", "mean"), ("beta", -0.1), ("clip_eps", 0.0),
                                         ("clip_eps", 1.5), ("eps", 0.0)])
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        ObjectiveConfig(**{field: value})


def test_config_is_hashable_and_replaceable():
    cfg = ObjectiveConfig("grpo", beta=0.04)
    assert hash(cfg) == hash(dataclasses.replace(cfg))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.beta = 0.0


def test_batch_errors_name_the_field():
    logps, batch = random_batch(0)
    with pytest.raises(ValueError, match="'rewards'"):
        obj.loss(ObjectiveConfig("fem"), jnp.asarray(logps), jnp_batch(dict(batch, rewards=np.ones(3))))
    with pytest.raises(ValueError, match="'loss_mask'"):
        obj.loss(ObjectiveConfig("fem"), jnp.asarray(logps), jnp_batch(dict(batch, loss_mask=np.ones((2, 2)))))


# ----------------------------------------------------------------------- PyTorch / TRL parity


def _torch_case(seed, b=4, t=9, v=11):
    """Random logits and HF-style labels (-100 on prompt and padding), plus our inputs."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 2, size=(b, t, v)).astype(np.float32)
    input_ids = rng.integers(0, v, size=(b, t))
    labels = input_ids.copy()
    for i in range(b):
        p = int(rng.integers(1, 4))
        end = int(rng.integers(p + 1, t + 1))
        labels[i, :p] = -100  # prompt
        labels[i, end:] = -100  # right padding
    return logits, labels


def _our_fem_from_logits(logits, labels, rewards=None, num_items=None):
    """fem on the shifted targets: position t predicts labels[t + 1], as in HF causal LMs."""
    tgt = labels[:, 1:]
    mask = (tgt != -100).astype(np.float32)

    def f(lg):
        lp_all = jax.nn.log_softmax(lg[:, :-1], axis=-1)
        lp = jnp.take_along_axis(lp_all, jnp.asarray(np.maximum(tgt, 0))[..., None], -1)[..., 0]
        batch = {"loss_mask": jnp.asarray(mask),
                 "rewards": jnp.ones(lg.shape[0]) if rewards is None else jnp.asarray(rewards)}
        if num_items is not None:
            batch["num_items"] = jnp.asarray(num_items, jnp.float32)
        return obj.loss(ObjectiveConfig("fem"), lp, batch)[0]

    return jax.value_and_grad(f)(jnp.asarray(logits))


@pytest.mark.parametrize("seed", [0, 1])
def test_fem_matches_torch_completion_only_cross_entropy(seed):
    """TRL SFT completion-only: labels -100 on the prompt, cross-entropy averaged over the
    non-ignored tokens of the batch; loss and gradient w.r.t. the logits agree."""
    torch = pytest.importorskip("torch")
    logits, labels = _torch_case(seed)
    lg = torch.tensor(logits, requires_grad=True)
    ce = torch.nn.functional.cross_entropy(
        lg[:, :-1].reshape(-1, lg.shape[-1]), torch.tensor(labels[:, 1:]).reshape(-1), ignore_index=-100)
    ce.backward()
    ours, g = _our_fem_from_logits(logits, labels)
    assert float(ours) == pytest.approx(ce.item(), rel=1e-5)
    np.testing.assert_allclose(np.asarray(g), lg.grad.numpy(), atol=1e-6)


def test_fem_matches_transformers_loss_under_gradient_accumulation():
    """transformers' ForCausalLMLoss with num_items_in_batch (what Trainer passes under
    gradient accumulation) equals fem with batch['num_items'], micro-batch by micro-batch."""
    torch = pytest.importorskip("torch")
    loss_utils = pytest.importorskip("transformers.loss.loss_utils")
    logits, labels = _torch_case(2, b=6)
    n_items = int((labels[:, 1:] != -100).sum())
    total_hf, total_ours = 0.0, 0.0
    for sl in (slice(0, 2), slice(2, 6)):
        hf = loss_utils.ForCausalLMLoss(torch.tensor(logits[sl]), torch.tensor(labels[sl]),
                                        vocab_size=logits.shape[-1], num_items_in_batch=torch.tensor(n_items))
        ours, _ = _our_fem_from_logits(logits[sl], labels[sl], num_items=n_items)
        assert float(ours) == pytest.approx(hf.item(), rel=1e-5)
        total_hf += hf.item()
        total_ours += float(ours)
    full, _ = _our_fem_from_logits(logits, labels)
    assert total_ours == pytest.approx(float(full), rel=1e-5) and total_hf == pytest.approx(total_ours, rel=1e-5)


def _tiny_trl_trainer(torch, rows):
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, **{f"t{i}": i for i in range(3, 48)}}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    ds = Dataset.from_list([{"input_ids": p + c, "completion_mask": [0] * len(p) + [1] * len(c)} for p, c in rows])
    args = trl.SFTConfig(output_dir="unused-trl-out", per_device_train_batch_size=len(rows), report_to=[],
                         completion_only_loss=True, use_cpu=True, eos_token="<eos>", save_strategy="no")
    return trl.SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok), model


def test_fem_matches_trl_sft_trainer_compute_loss(tmp_path, monkeypatch):
    """The real TRL SFTTrainer (completion_only_loss=True) on a tiny random Llama: its loss on a
    collated batch equals fem on the same logits, also when filtered (r = 0) rows are added to
    our batch, and micro-batch by micro-batch with num_items_in_batch."""
    torch = pytest.importorskip("torch")
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    rows = [(rng.integers(3, 48, int(rng.integers(2, 6))).tolist(), rng.integers(3, 48, int(rng.integers(1, 6))).tolist())
            for _ in range(4)]
    trainer, model = _tiny_trl_trainer(torch, rows)
    batch = next(iter(trainer.get_train_dataloader()))
    model.train()
    trl_loss = trainer.compute_loss(model, dict(batch)).item()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.numpy()
    labels = batch["labels"].numpy()
    ours, _ = _our_fem_from_logits(logits, labels)
    assert float(ours) == pytest.approx(trl_loss, rel=1e-5)

    # rejected samples in our batch (r = 0, with their own completions) change nothing
    lab_rej = labels.copy()
    lab_rej[:, 1:][labels[:, 1:] == -100] = 5  # the rejected rows train on every position
    both_logits = np.concatenate([logits, logits * 0.3])
    both_labels = np.concatenate([labels, lab_rej])
    rewards = np.array([1.0] * len(rows) + [0.0] * len(rows), np.float32)
    filtered, _ = _our_fem_from_logits(both_logits, both_labels, rewards=rewards)
    assert float(filtered) == pytest.approx(trl_loss, rel=1e-5)

    # gradient accumulation: TRL divides each micro-batch's sum by num_items_in_batch
    n_items = int((labels[:, 1:] != -100).sum())
    acc = 0.0
    for sl in (slice(0, 1), slice(1, 4)):
        mb = {k: v[sl] for k, v in batch.items()}
        t = trainer.compute_loss(model, mb, num_items_in_batch=torch.tensor(n_items)).item()
        o, _ = _our_fem_from_logits(logits[sl], labels[sl], num_items=n_items)
        assert float(o) == pytest.approx(t, rel=1e-5, abs=1e-7)
        acc += t
    assert acc == pytest.approx(trl_loss, rel=1e-5)
