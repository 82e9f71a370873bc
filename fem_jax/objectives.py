"""M-step objectives: each one is ONE spec (`Objective`) registered here, read by the loop,
the M-step and config validation. Nothing else in fem_jax branches on an objective's name.

An `Objective` says:
- `loss(cfg, logps, batch) -> (loss, metrics)`: a pure JAX loss over per-token log-probs;
- `loop`: "iterations" (FEM's Algorithm 1: the whole training set per E-step, one epoch
  per M-step) or "steps" (EMPG's Algorithm 1: a batch of prompts per step, N samples each
  from θ(t-1), the configured optimizer updates on that buffer only, then a new batch);
- `trains_on`: which draws reach the M-step: "accepted" (reward > 0 and not a rejected
  hint leak; FEM's filter) or "all" (every draw with a completion; policy gradients);
- `advantages`: how a round's trained draws get their sequence weights (None: the reward
  itself weighs each row, as FEM's r · ∇log π);
- `old_logps`: the loss reads θ_old's log-probs, which the trainer computes (at the
  sampling temperature) before the round's first update;
- `tempered`: the loss's log-probs are those of logits / sampling temperature (verl's
  actor computes every policy log-prob this way);
- defaults for `mstep.loss_agg` and `mstep.reset_optimizer`, and `check(cfg)` for the
  objective's own config rules.

Adding an objective = writing its loss and calling `register(Objective(...))`.

Every loss has the signature ``fn(cfg, logps, batch) -> (loss, metrics)``:

- ``logps`` [B, T] float32: log pi_theta(target_t | prefix) of the batch's target tokens.
- ``batch``: a dict of arrays: ``loss_mask`` [B, T] (1.0 on completion tokens), ``rewards``
  [B], and as the spec asks: ``advantages`` [B], ``old_logps`` [B, T], ``ref_logps`` [B, T]
  (when ``cfg.beta > 0``), ``num_items`` [] (the loss denominator of the whole optimizer
  step under gradient accumulation, see below).

A row whose ``loss_mask`` is all zero is a padding row: it contributes nothing to the loss,
the gradient or any statistic. Values at masked positions are never read (replaced by 0
before any arithmetic), so -inf or NaN there is harmless.

Aggregation (``cfg.loss_agg``; verl's `loss_agg_mode` names):

- ``"token-mean"``: sum over the kept completion tokens of the batch / their count. TRL's
  ``SFTTrainer`` (see :func:`fem`) and verl's GRPO default.
- ``"seq-mean-token-sum"``: each sequence's token *sum*, averaged over sequences: the
  sequence log-likelihood log P_θ(τ) = Σ_t log π(τ_t | τ_<t) of the EMPG paper (Eqs. 10-12).
- ``"seq-mean-token-mean"``: each sequence's token mean, averaged over sequences (the
  original GRPO of DeepSeekMath).

Gradient accumulation: each micro-batch's loss is its *sum* divided by the denominator of
the whole optimizer step (``batch["num_items"]``; transformers' ``num_items_in_batch``), so
summing micro-batch losses and gradients gives the full-batch value exactly. Statistics
over the whole round (EMPG's mean/std, GRPO's groups) are computed once per round by
``Objective.advantages`` and passed as ``batch["advantages"]``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
LossFn = Callable[["ObjectiveConfig", jax.Array, Batch], tuple[jax.Array, Metrics]]
# (rewards [n], group [n] int ids of the prompt each draw answers, cfg) -> weights [n], numpy
AdvantagesFn = Callable[[np.ndarray, np.ndarray, "ObjectiveConfig"], np.ndarray]

LOSS_AGGS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean")
LOOPS = ("iterations", "steps")


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    """The loss's knobs (static under jit: hashable).

    loss_agg: one of LOSS_AGGS (module docstring).
    beta: coefficient of the k3 estimate of KL(pi || pi_ref) per token, aggregated like the
        policy term (verl's `low_var_kl`, clamped as verl clamps it).
    clip_eps: PPO clip range: ratio clipped to [1 - clip_eps, 1 + clip_eps].
    clip_ratio_c: dual-clip bound for negative advantages (verl's `clip_ratio_c`, 3.0).
    eps: added to standard deviations before dividing.
    """

    name: str = "fem"
    loss_agg: str = "token-mean"
    beta: float = 0.0
    clip_eps: float = 0.2
    clip_ratio_c: float = 3.0
    eps: float = 1e-6

    def __post_init__(self):
        if self.loss_agg not in LOSS_AGGS:
            raise ValueError(f"mstep.loss_agg must be one of {', '.join(LOSS_AGGS)}, got {self.loss_agg!r}")
        if not self.beta >= 0.0:
            raise ValueError(f"mstep.beta must be >= 0, got {self.beta!r}")
        if not 0.0 < self.clip_eps < 1.0:
            raise ValueError(f"mstep.clip_eps must be in (0, 1), got {self.clip_eps!r}")
        if not self.clip_ratio_c > 1.0:
            raise ValueError(f"mstep.clip_ratio_c must be > 1, got {self.clip_ratio_c!r}")
        if not self.eps > 0.0:
            raise ValueError(f"objective eps must be > 0, got {self.eps!r}")


@dataclasses.dataclass(frozen=True)
class Objective:
    """Everything fem_jax needs to know about an objective (module docstring)."""

    name: str
    loss: LossFn
    loop: str = "iterations"
    trains_on: str = "accepted"  # "accepted" | "all"
    advantages: AdvantagesFn | None = None
    old_logps: bool = False
    tempered: bool = False
    default_loss_agg: str = "token-mean"
    default_reset_optimizer: bool = True
    allows_kl: bool = True
    trl_trainer: str = ""  # the TRL trainer that implements it (run.trainer=trl, fem_jax.trl_run); "" for none
    doc: str = ""

    def __post_init__(self):
        if self.loop not in LOOPS:
            raise ValueError(f"objective {self.name!r}: loop must be one of {LOOPS}, got {self.loop!r}")
        if self.trains_on not in ("accepted", "all"):
            raise ValueError(f"objective {self.name!r}: trains_on must be 'accepted' or 'all'")
        if self.default_loss_agg not in LOSS_AGGS:
            raise ValueError(f"objective {self.name!r}: default_loss_agg must be one of {LOSS_AGGS}")

    @property
    def batch_fields(self) -> tuple[str, ...]:
        """The per-row arrays a batch carries for this objective besides loss_mask/rewards."""
        return (("advantages",) if self.advantages else ()) + (("old_logps",) if self.old_logps else ())

    def trains(self, accepted: bool, has_completion: bool) -> bool:
        """Does the M-step train on a draw? (decided once, in the E-step)"""
        if not has_completion:
            return False
        return accepted if self.trains_on == "accepted" else True

    def check(self, mstep) -> list[tuple[str, object, str]]:
        """(field, value, what is expected) for each config value this objective refuses."""
        bad = []
        if mstep.beta > 0 and not self.allows_kl:
            bad.append(("mstep.beta", mstep.beta, f"0: objective {self.name!r} has no KL term"))
        return bad


# TRL's GRPOTrainer loss_type of our (loss_agg, loss_norm), for a run TRL trains (run.trainer=trl);
# benchmarks/trl_grpo.py holds each pair to float32 agreement
TRL_LOSS_TYPES = {("token-mean", "step"): "dapo", ("token-mean", "micro"): "bnpo",
                  ("seq-mean-token-mean", "step"): "grpo", ("seq-mean-token-mean", "micro"): "grpo"}

OBJECTIVES: dict[str, Objective] = {}


def register(spec: Objective) -> Objective:
    """Add an objective; its name must be new."""
    if spec.name in OBJECTIVES:
        raise ValueError(f"objective {spec.name!r} is already registered")
    OBJECTIVES[spec.name] = spec
    return spec


def get(name: str) -> Objective:
    """The objective registered under ``name``; unknown names raise ValueError listing the known."""
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise ValueError(f"unknown objective {name!r}; known objectives: {', '.join(sorted(OBJECTIVES))}") from None


def loss(cfg: ObjectiveConfig, logps: jax.Array, batch: Batch) -> tuple[jax.Array, Metrics]:
    """The loss (to minimize) and metrics of objective ``cfg.name`` on one batch."""
    return get(cfg.name).loss(cfg, logps, batch)


def denominator(cfg: ObjectiveConfig, batch: Batch) -> jax.Array:
    """This batch's loss denominator under ``cfg.loss_agg``: kept tokens, or kept sequences.
    Rows count with the weights the loss gives them (`_row_weights`). Sum it over the
    micro-batches of one optimizer step and pass it as ``batch["num_items"]``."""
    mask = _mask(batch)
    return _denominator(cfg, mask, _row_weights(cfg, batch, mask))


# --------------------------------------------------------------------------- helpers


def _check(logps: jax.Array, batch: Batch, required: tuple[str, ...]) -> None:
    """Shape checks at trace time (static), with errors naming the field."""
    for key in ("loss_mask", *required):
        if key not in batch:
            raise ValueError(f"batch is missing {key!r} (has: {', '.join(sorted(batch))})")
    if logps.ndim != 2:
        raise ValueError(f"logps must be [B, T], got shape {logps.shape}")
    for key in ("loss_mask", "old_logps", "ref_logps"):
        if key in batch and batch[key].shape != logps.shape:
            raise ValueError(f"batch[{key!r}] has shape {batch[key].shape}, logps {logps.shape}")
    for key in ("rewards", "advantages"):
        if key in batch and batch[key].shape != logps.shape[:1]:
            raise ValueError(f"batch[{key!r}] has shape {batch[key].shape}, expected ({logps.shape[0]},)")


def _mask(batch: Batch) -> jax.Array:
    return (batch["loss_mask"] > 0).astype(jnp.float32)


def _clean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """x where mask, 0 elsewhere; a select, so inf/NaN at masked positions never propagate."""
    return jnp.where(mask > 0, x.astype(jnp.float32), 0.0)


def _safe_div(num, den):
    return num / jnp.where(den > 0, den, 1.0)


def _row_valid(mask: jax.Array) -> jax.Array:
    """[B] 1.0 for rows with at least one completion token (not padding)."""
    return (mask.sum(-1) > 0).astype(jnp.float32)


def _row_weights(cfg: ObjectiveConfig, batch: Batch, mask: jax.Array) -> jax.Array:
    """[B] how much each row counts in the loss and its denominator: FEM's filter weighs
    rows by max(r, 0); every other objective counts each non-padding row once."""
    if get(cfg.name).advantages is None:
        r = batch["rewards"].astype(jnp.float32)
        return jnp.where(r > 0, r, 0.0) * _row_valid(mask)
    return _row_valid(mask)


def _reduce(cfg: ObjectiveConfig, per_token: jax.Array, mask: jax.Array, rows: jax.Array, batch: Batch) -> jax.Array:
    """Aggregate ``per_token`` [B, T] over kept tokens (``cfg.loss_agg``).

    ``rows`` [B] >= 0 weighs each row in numerator and denominator (0 drops the row).
    token-mean:          sum_{i,t} w_i m_it x_it / sum_{i,t} w_i m_it
    seq-mean-token-sum:  sum_i w_i sum_t m_it x_it / sum_i w_i [n_i > 0]
    seq-mean-token-mean: sum_i w_i (sum_t m_it x_it / n_i) / sum_i w_i [n_i > 0]
    ``batch["num_items"]`` replaces the denominator when present (gradient accumulation).
    """
    per_row = (per_token * mask).sum(-1)
    if cfg.loss_agg == "token-mean" or cfg.loss_agg == "seq-mean-token-sum":
        num = (rows * per_row).sum()
    else:
        num = (rows * _safe_div(per_row, mask.sum(-1))).sum()
    den = batch["num_items"] if "num_items" in batch else _denominator(cfg, mask, rows)
    return _safe_div(num, jnp.asarray(den, jnp.float32))


def _denominator(cfg: ObjectiveConfig, mask: jax.Array, rows: jax.Array) -> jax.Array:
    if cfg.loss_agg == "token-mean":
        return (mask * rows[:, None]).sum()
    return (rows * _row_valid(mask)).sum()


def k3_kl(logps: jax.Array, ref_logps: jax.Array) -> jax.Array:
    """Per-token k3 estimate of KL(pi || pi_ref): exp(ref - logp) - (ref - logp) - 1 >= 0
    (Schulman, "Approximating KL divergence"), with verl's `low_var_kl` clamps: the log
    ratio to [-20, 20] and the estimate to [-10, 10]."""
    d = jnp.clip(ref_logps - logps, -20.0, 20.0)
    return jnp.clip(jnp.exp(d) - d - 1.0, -10.0, 10.0)


def _kl_term(cfg: ObjectiveConfig, logps: jax.Array, mask: jax.Array, batch: Batch) -> jax.Array:
    if cfg.beta == 0.0:
        return jnp.zeros_like(logps)
    if "ref_logps" not in batch:
        raise ValueError(f"objective {cfg.name!r} with beta={cfg.beta} needs batch['ref_logps']")
    return k3_kl(logps, _clean(batch["ref_logps"], mask))


def _common_metrics(logps: jax.Array, mask: jax.Array, rows: jax.Array) -> Metrics:
    kept = mask * (rows > 0)[:, None]
    tokens = kept.sum()
    return {"tokens": tokens, "sequences": ((rows > 0) * _row_valid(mask)).sum(),
            "nll": _safe_div(-(logps * kept).sum(), tokens)}


def _advantages_of(cfg: ObjectiveConfig, batch: Batch, valid: jax.Array) -> jax.Array:
    """[B] the rows' sequence weights: ``batch["advantages"]`` (the M-step computes them
    once per round), else the spec's statistics over this batch alone (a host callback, so
    a standalone call works under jit too)."""
    if "advantages" in batch:
        return jax.lax.stop_gradient(batch["advantages"].astype(jnp.float32) * valid)
    spec = get(cfg.name)

    def host(r, g, v):
        keep = np.asarray(v) > 0
        out = np.zeros(np.shape(r), np.float32)
        out[keep] = spec.advantages(np.asarray(r, np.float32)[keep], np.asarray(g)[keep], cfg)
        return out

    group = batch.get("group", jnp.zeros(valid.shape, jnp.int32))
    w = jax.pure_callback(host, jax.ShapeDtypeStruct(valid.shape, jnp.float32), batch["rewards"], group, valid)
    return jax.lax.stop_gradient(w)


# --------------------------------------------------------------------------- fem


def fem_loss(cfg: ObjectiveConfig, logps: jax.Array, batch: Batch) -> tuple[jax.Array, Metrics]:
    """Filtered EM M-step (FEM paper, Algorithm 1 line 5 and Eq. 5): maximize
    Σ_i r(ŷ_i, y*_i) log π(ẑ_i, ŷ_i | x_i; θ), i.e. minimize the negative log-likelihood of
    the completion tokens of the accepted draws.

    token-mean: loss = -sum_{i,t} r_i m_it logp_it / sum_{i,t} r_i m_it

    The reward is the filter: r in {0, 1}; rows with r = 0 are dropped exactly as if
    absent. Fractional rewards give a reward-weighted token mean; r <= 0 counts as 0.

    The paper's M-step is SFT in TRL (Section 4.1). Convention checked against TRL
    (trl 1.16, transformers 5.2x): ``SFTTrainer`` with ``completion_only_loss=True`` labels
    prompt tokens and padding -100; ``compute_loss`` divides the summed per-token NLL by
    ``num_items_in_batch``, the non-ignored shifted labels over all micro-batches of one
    optimizer step: the token mean over the whole accumulated batch, which
    ``batch["num_items"]`` reproduces. An all-filtered batch gives 0, as TRL's clamp does.
    """
    _check(logps, batch, ("rewards",))
    if cfg.beta != 0.0:
        raise ValueError("objective 'fem' has no KL term: mstep.beta must be 0")
    mask = _mask(batch)
    lp = _clean(logps, mask)
    rows = _row_weights(cfg, batch, mask)
    value = _reduce(cfg, -lp, mask, rows, batch)
    return value, {"loss": value, **_common_metrics(lp, mask, rows)}


register(Objective(
    name="fem", loss=fem_loss, loop="iterations", trains_on="accepted", advantages=None,
    default_loss_agg="token-mean", default_reset_optimizer=True, allows_kl=False,
    doc="filtered EM: SFT on the accepted draws (FEM paper, Algorithm 1)"))


# --------------------------------------------------------------------------- empg


def empg_advantages(rewards: np.ndarray, group: np.ndarray, cfg: ObjectiveConfig) -> np.ndarray:
    """EMPG's sequence weights R̃(τ) - b (EMPG paper, Section 4.2):

        R̃(τ) = sigmoid((R(τ) - μ) / σ),   b = mean of R̃ over the batch,

    μ and σ the mean and (population) standard deviation of the rewards over the given
    trajectories (all prompts together; `group` is not used): the step's buffer or one
    update's batch (`mstep.stats_over`).

    σ = 0 (every reward equal; e.g. no draw or every draw correct): (R - μ)/σ is 0/0. We
    define R̃ = sigmoid(0) = 1/2 for every trajectory, so every weight R̃ - b is exactly 0:
    a batch with no reward contrast carries no policy-gradient signal (only β·KL, if any).
    """
    r = np.asarray(rewards, np.float64)
    if r.size == 0:
        return np.zeros(0, np.float32)
    sd = r.std()
    z = np.zeros_like(r) if sd == 0 else (r - r.mean()) / sd
    smooth = 1.0 / (1.0 + np.exp(-z))
    return (smooth - smooth.mean()).astype(np.float32)


def empg_loss(cfg: ObjectiveConfig, logps: jax.Array, batch: Batch) -> tuple[jax.Array, Metrics]:
    """EM Policy Gradient (Xu, 2025; EMPG paper Eqs. 10-12, 14): ascend

        E_{τ~D}[ (R̃(τ) - b) · log P_θ(τ) ] - β · KL(P_θ || P_ref)

    with log P_θ(τ) = Σ_t log π_θ(τ_t | τ_<t), the sum over the trajectory's tokens (the
    `seq-mean-token-sum` aggregation, this objective's default), D the buffer of the step's
    draws from θ(t-1) used as off-policy data: no importance weight, no clipping (Section
    4.3). The weights R̃ - b come from :func:`empg_advantages` over the whole step
    (``batch["advantages"]``). The KL is the per-token k3 estimate summed over the
    trajectory like log P_θ(τ) (β = 0 for the 1.5B model, Section 5.1).

    `token-mean` stays available as a named option, as TRL/verl losses aggregate: it divides
    the update's loss by its token count instead of its trajectory count. Within one update
    that is one constant factor (every trajectory keeps its weight relative to the others;
    with `mstep.loss_norm=micro` the factor is per micro-batch); across updates it scales the
    step by 1 / (mean response length), so the effective learning rate falls as answers grow
    — not the paper's Eq. 12. With grad_clip the two differ in practice too: the sum's
    gradient is about L times the mean's (L tokens per answer), so it is clipped far more
    often (metrics: grad_norm, grad_norm_max, grad_clipped_fraction, all before clipping).

    μ, σ and b are taken over the round's whole buffer of draws (`mstep.stats_over=buffer`)
    or over each optimizer update's batch (`update`: the paper's "mini-batch M", §4.2).
    """
    _check(logps, batch, ("rewards",))
    mask = _mask(batch)
    lp = _clean(logps, mask)
    valid = _row_valid(mask)
    w = _advantages_of(cfg, batch, valid)
    pg = _reduce(cfg, -w[:, None] * lp, mask, valid, batch)
    kl = _reduce(cfg, _kl_term(cfg, lp, mask, batch), mask, valid, batch)
    value = pg + cfg.beta * kl
    metrics = {"loss": value, "pg_loss": pg, "kl": kl,
               "weight_abs_mean": _safe_div((jnp.abs(w) * valid).sum(), valid.sum()),
               "reward_mean": _safe_div((batch["rewards"] * valid).sum(), valid.sum()),
               **_common_metrics(lp, mask, valid)}
    return value, metrics


register(Objective(
    name="empg", loss=empg_loss, loop="steps", trains_on="all", advantages=empg_advantages,
    old_logps=False, tempered=True, default_loss_agg="seq-mean-token-sum", default_reset_optimizer=False,
    doc="EM policy gradient: one-step off-policy REINFORCE with smoothed rewards (EMPG paper, Algorithm 1)"))


# --------------------------------------------------------------------------- grpo


def grpo_advantages(rewards: np.ndarray, group: np.ndarray, cfg: ObjectiveConfig) -> np.ndarray:
    """Group-normalized advantages as verl's `compute_grpo_outcome_advantage`:
    A_i = (r_i - mean_g) / (std_g + eps) over the draws of the same group g, std with
    Bessel's correction (torch.std); a group of one draw gets mean 0 and std 1 (A = r),
    as verl does. Equal rewards in a group give A = 0. A group is one draw batch: the N
    draws of one prompt row of the step (verl gives each row a fresh uid), so a prompt
    drawn twice in one step (an epoch boundary) makes two groups, not one of 2N."""
    r = np.asarray(rewards, np.float64)
    out = np.zeros_like(r)
    for g in np.unique(group):
        idx = np.nonzero(group == g)[0]
        vals = r[idx]
        mean, std = (0.0, 1.0) if len(idx) == 1 else (vals.mean(), vals.std(ddof=1))
        out[idx] = (vals - mean) / (std + cfg.eps)
    return out.astype(np.float32)


def grpo_loss(cfg: ObjectiveConfig, logps: jax.Array, batch: Batch) -> tuple[jax.Array, Metrics]:
    """GRPO (DeepSeekMath, Shao et al. 2024) as verl computes it (`compute_policy_loss_vanilla`,
    the EMPG paper's baseline):

        ρ_it = exp(clip(logp_it - old_logp_it, -20, 20))
        l_it = max(-A_i ρ_it, -A_i clip(ρ_it, 1 - ε, 1 + ε))           (PPO clip)
        l_it = min(l_it, -A_i c)  where A_i < 0                         (dual clip, c = 3)
        loss = agg(l) + β · agg(k3 KL to π_ref)

    with θ_old's log-probs ``old_logps`` computed by the trainer before the step's first
    update, at the sampling temperature, like the current log-probs; A_i from
    :func:`grpo_advantages` over the step (``batch["advantages"]``); aggregation
    `token-mean` (verl's default).
    """
    _check(logps, batch, ("rewards",))
    mask = _mask(batch)
    lp = _clean(logps, mask)
    valid = _row_valid(mask)
    adv = _advantages_of(cfg, batch, valid)[:, None]
    old = jax.lax.stop_gradient(_clean(batch["old_logps"], mask) if "old_logps" in batch else lp)
    log_ratio = jnp.clip(lp - old, -20.0, 20.0)
    ratio = jnp.exp(log_ratio)
    l1 = -adv * ratio
    l2 = -adv * jnp.clip(ratio, 1.0 - cfg.clip_eps, 1.0 + cfg.clip_eps)
    clipped = jnp.maximum(l1, l2)
    l3 = -adv * cfg.clip_ratio_c
    per_token = jnp.where(adv < 0, jnp.minimum(l3, clipped), clipped)
    pg = _reduce(cfg, per_token, mask, valid, batch)
    kl = _reduce(cfg, _kl_term(cfg, lp, mask, batch), mask, valid, batch)
    value = pg + cfg.beta * kl
    ntok = mask.sum()
    metrics = {"loss": value, "pg_loss": pg, "kl": kl,
               "clip_frac": _safe_div(((l2 > l1) * mask).sum(), ntok),
               "clip_frac_lower": _safe_div(((clipped > l3) * (adv < 0) * mask).sum(), ntok),
               "ratio_mean": _safe_div((ratio * mask).sum(), ntok),
               "ppo_kl": _safe_div((-log_ratio * mask).sum(), ntok),
               "adv_abs_mean": _safe_div((jnp.abs(adv[:, 0]) * valid).sum(), valid.sum()),
               "reward_mean": _safe_div((batch["rewards"] * valid).sum(), valid.sum()),
               **_common_metrics(lp, mask, valid)}
    return value, metrics


register(Objective(
    name="grpo", loss=grpo_loss, loop="steps", trains_on="all", advantages=grpo_advantages,
    old_logps=True, tempered=True, default_loss_agg="token-mean", default_reset_optimizer=False,
    trl_trainer="GRPOTrainer",
    doc="GRPO as verl defines it: group-normalized advantages, clipped ratio to θ_old, k3 KL"))
