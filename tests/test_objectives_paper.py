"""EMPG and GRPO on three hand-written sequences, against the papers' equations written out
here in numpy (no code shared with fem_jax.objectives):

- EMPG (Xu 2025, Eqs. 10-12, 14): R̃ = sigmoid((R - μ)/σ) over the mini-batch, b = mean R̃,
  loss = -(1/n) Σ_i (R̃_i - b) Σ_t log π(τ_it) + β · (1/n) Σ_i Σ_t KL3_it;
- GRPO as verl computes it: A_i group-normalized, ratio ρ = exp(logp - old_logp), PPO clip on
  both sides, dual clip c = 3 for A < 0, token mean, + β · token-mean k3 KL.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fem_jax import objectives as obj
from fem_jax.objectives import ObjectiveConfig

# three sequences with 2, 3 and 1 completion tokens (position 0 is a prompt token)
MASK = np.array([[0, 1, 1, 0], [0, 1, 1, 1], [0, 1, 0, 0]], np.float32)
LOGPS = np.array([[-9.0, -0.5, -1.25, 0.0], [-9.0, -2.0, -0.25, -1.0], [-9.0, -3.0, 0.0, 0.0]], np.float32)
REWARDS = np.array([1.0, 0.0, 1.0], np.float32)
GROUP = np.array([0, 0, 1], np.int32)  # sequences 0 and 1 answer one prompt, 2 another


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def k3(lp, ref):
    return np.exp(ref - lp) - (ref - lp) - 1.0


def empg_by_hand(rewards, beta=0.0, ref=None):
    """(loss, dloss/dlogps) of Eqs. 10-12 (+ β KL, Eq. 14) with the sequence-sum log P(τ)."""
    mu, sigma = rewards.mean(), rewards.std()
    smooth = np.full_like(rewards, 0.5) if sigma == 0 else sigmoid((rewards - mu) / sigma)
    w = smooth - smooth.mean()
    n = len(rewards)
    loss, grad = 0.0, np.zeros_like(LOGPS)
    for i in range(n):
        for t in range(LOGPS.shape[1]):
            if MASK[i, t]:
                loss += -w[i] * LOGPS[i, t] / n
                grad[i, t] += -w[i] / n
                if beta:
                    loss += beta * k3(LOGPS[i, t], ref[i, t]) / n
                    grad[i, t] += beta * (1.0 - np.exp(ref[i, t] - LOGPS[i, t])) / n
    return loss, grad


def run(cfg, batch, logps=LOGPS):
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    loss, metrics = obj.loss(cfg, jnp.asarray(logps), batch)
    grad = jax.grad(lambda lp: obj.loss(cfg, lp, batch)[0])(jnp.asarray(logps))
    return float(loss), np.asarray(grad), metrics


def test_empg_is_the_papers_sequence_sum_by_default():
    assert obj.get("empg").default_loss_agg == "seq-mean-token-sum"
    cfg = ObjectiveConfig("empg", loss_agg="seq-mean-token-sum")
    loss, grad, _ = run(cfg, {"loss_mask": MASK, "rewards": REWARDS, "group": GROUP})
    want_loss, want_grad = empg_by_hand(REWARDS)
    # μ = 2/3, σ = sqrt(2)/3: R̃ = sigmoid(±...) and weights R̃ - b written out once more
    w = sigmoid(np.array([1, -2, 1]) / np.sqrt(2))
    np.testing.assert_allclose(want_grad[0, 1], -(w[0] - w.mean()) / 3, rtol=1e-6)
    assert loss == pytest.approx(want_loss, rel=1e-5)
    np.testing.assert_allclose(grad, want_grad, atol=1e-6)
    # the sum, not the mean, over a trajectory: sequence 1 (3 tokens) gets 3 times a token's weight
    assert grad[1, 1:].sum() == pytest.approx(3 * grad[1, 1], rel=1e-5)


def test_empg_token_mean_is_a_named_option_that_differs():
    cfg = ObjectiveConfig("empg", loss_agg="token-mean")
    loss, _, _ = run(cfg, {"loss_mask": MASK, "rewards": REWARDS, "group": GROUP})
    seq_sum, _ = empg_by_hand(REWARDS)
    assert loss == pytest.approx(seq_sum * 3 / MASK.sum(), rel=1e-5)  # same weights, divided by 6 tokens
    assert loss != pytest.approx(seq_sum)


@pytest.mark.parametrize("rewards", [np.ones(3, np.float32), np.zeros(3, np.float32)])
def test_empg_sigma_zero_gives_no_policy_gradient(rewards):
    cfg = ObjectiveConfig("empg", loss_agg="seq-mean-token-sum")
    loss, grad, _ = run(cfg, {"loss_mask": MASK, "rewards": rewards, "group": GROUP})
    assert loss == 0.0 and np.all(grad == 0)
    np.testing.assert_array_equal(obj.empg_advantages(rewards, GROUP, cfg), np.zeros(3))
    # with β > 0 only the KL term remains
    ref = LOGPS - 0.3
    cfg = ObjectiveConfig("empg", loss_agg="seq-mean-token-sum", beta=0.1)
    loss, grad, _ = run(cfg, {"loss_mask": MASK, "rewards": rewards, "group": GROUP, "ref_logps": ref})
    want_loss, want_grad = empg_by_hand(rewards, beta=0.1, ref=ref)
    assert loss == pytest.approx(want_loss, rel=1e-5) and loss > 0
    np.testing.assert_allclose(grad, want_grad, atol=1e-6)


def test_empg_kl_term_by_hand():
    ref = LOGPS + np.array([[0, 0.4, -0.2, 0], [0, 0.1, 0.3, -0.5], [0, -0.7, 0, 0]], np.float32)
    cfg = ObjectiveConfig("empg", loss_agg="seq-mean-token-sum", beta=0.25)
    loss, grad, m = run(cfg, {"loss_mask": MASK, "rewards": REWARDS, "group": GROUP, "ref_logps": ref})
    want_loss, want_grad = empg_by_hand(REWARDS, beta=0.25, ref=ref)
    assert loss == pytest.approx(want_loss, rel=1e-5)
    np.testing.assert_allclose(grad, want_grad, atol=1e-6)
    kl_by_hand = sum(k3(LOGPS[i, t], ref[i, t]) for i in range(3) for t in range(4) if MASK[i, t]) / 3
    assert float(m["kl"]) == pytest.approx(kl_by_hand, rel=1e-5)


# --------------------------------------------------------------------------- grpo

# per-token ratios ρ = exp(logp - old): sequence 0 has A > 0, sequence 1 A < 0, sequence 2 A = r = 1
RATIOS = np.array([[1, 1.5, 0.9, 1], [1, 0.5, 1.1, 4.0], [1, 1.0, 1, 1]], np.float32)


def grpo_by_hand(eps=0.2, c=3.0, beta=0.0, ref=None):
    a = (1.0 - 0.5) / (np.std([1.0, 0.0], ddof=1) + 1e-6)  # group 0: rewards 1, 0: mean 0.5, std sqrt(.5)
    adv = np.array([a, -a, 1.0 / (1.0 + 1e-6)])  # group 1 has one draw: verl's mean 0, std 1
    n_tok = MASK.sum()
    loss, grad = 0.0, np.zeros_like(LOGPS)
    for i in range(3):
        for t in range(4):
            if not MASK[i, t]:
                continue
            rho, A = float(RATIOS[i, t]), adv[i]
            unclipped, clipped = -A * rho, -A * min(max(rho, 1 - eps), 1 + eps)
            term, g = (clipped, 0.0) if clipped > unclipped else (unclipped, -A * rho)
            if A < 0 and term > -A * c:  # dual clip
                term, g = -A * c, 0.0
            loss += term / n_tok
            grad[i, t] += g / n_tok
            if beta:
                loss += beta * k3(LOGPS[i, t], ref[i, t]) / n_tok
                grad[i, t] += beta * (1.0 - np.exp(ref[i, t] - LOGPS[i, t])) / n_tok
    return loss, grad


def test_grpo_clips_both_sides_and_dual_clips_by_hand():
    cfg = ObjectiveConfig("grpo")
    assert cfg.loss_agg == "token-mean" and obj.get("grpo").default_loss_agg == "token-mean"
    old = LOGPS - np.log(RATIOS)
    loss, grad, m = run(cfg, {"loss_mask": MASK, "rewards": REWARDS, "group": GROUP, "old_logps": old})
    want_loss, want_grad = grpo_by_hand()
    assert loss == pytest.approx(want_loss, rel=1e-5)
    np.testing.assert_allclose(grad, want_grad, atol=1e-6)
    # clipped above (ρ = 1.5, A > 0), below (ρ = 0.5, A < 0) and dual-clipped (ρ = 4, A < 0): no gradient
    assert grad[0, 1] == 0 and grad[1, 1] == 0 and grad[1, 3] == 0
    assert grad[0, 2] != 0 and grad[1, 2] != 0 and grad[2, 1] != 0
    assert float(m["clip_frac"]) == pytest.approx(2 / 6)  # ρ = 1.5 (A > 0) and 0.5 (A < 0): verl's pg_clipfrac
    assert float(m["clip_frac_lower"]) == pytest.approx(1 / 6)  # ρ = 4.0 with A < 0


def test_grpo_kl_by_hand():
    ref = LOGPS + 0.2
    old = LOGPS - np.log(RATIOS)
    cfg = ObjectiveConfig("grpo", beta=0.5)
    loss, grad, _ = run(cfg, {"loss_mask": MASK, "rewards": REWARDS, "group": GROUP, "old_logps": old,
                              "ref_logps": ref})
    want_loss, want_grad = grpo_by_hand(beta=0.5, ref=ref)
    assert loss == pytest.approx(want_loss, rel=1e-5)
    np.testing.assert_allclose(grad, want_grad, atol=1e-6)
