"""The M-step: optax AdamW on an objective of fem_jax.objectives, one jitted sharded step.

- Sequences are the *hint-free* prompt followed by the sampled completion; only
  completion tokens carry loss (`loss_mask`), padding rows carry none. A sequence longer
  than `max_seq_len` is cut at the end (counted as truncated); one whose prompt alone
  fills `max_seq_len` keeps no completion token and is dropped (counted).
- Batches are random mini-batches of the round's sequences (shuffled with the run's seed;
  long and short mixed, as TRL and verl draw them), each padded to its longest sequence
  rounded up to a multiple of `length_bucket`: a round compiles one step per bucket length.
- One optimizer step = `batch_size` sequences = `batch_size / micro_batch_size`
  micro-batches, accumulated inside the jitted step by `lax.scan`. `loss_norm=step`: the
  loss normalized over the whole step (`num_items`, TRL's convention: micro-batching does
  not change the update); `loss_norm=micro`: each micro-batch normalized by its own count,
  then divided by the number of micro-batches (verl's dp_actor at 281ed3a, the paper
  configs' date: `loss = policy_loss / gradient_accumulation`), so with `token-mean` a
  micro-batch of short answers weighs its tokens more than one of long answers.
- The objective's spec says which per-row arrays a batch carries: `advantages` (computed
  once per round over all its trained draws, or over each step's batch with
  `stats_over=update`), `old_logps` (θ_old's log-probs, computed
  here before the round's first update, at the sampling temperature when the objective
  is `tempered`, as verl's actor does; a round of one update drops them and its loss uses
  its own detached log-probs, the same values without a forward pass).
- With a mesh, parameters and optimizer state follow fem_jax.sharding's table and the
  batch is split over (data, fsdp).
- The learning rate is a hyperparameter in the optimizer state (optax.inject_hyperparams):
  a new round's rate is set without recompiling.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import objectives
from .config import MStepCfg
from .models.transformer import ModelConfig, param_shapes, token_logps
from .sharding import RULES, constrainer, logical_to_spec


@dataclasses.dataclass
class TrainExample:
    prompt_ids: list[int]  # the hint-free prompt
    completion_ids: list[int]
    reward: float = 1.0
    advantage: float = 0.0  # the objective's sequence weight (objectives with advantages)
    group: str = ""  # the draw batch it came from (one prompt row's draws): GRPO's group


def lr_for_iteration(cfg: MStepCfg, k: int, iterations: int) -> float:
    """Linear decay across rounds k = 1..K from lr_start to lr_end, constant within one
    (FEM paper, Section 4.1); lr_end = lr_start gives a constant rate (verl's default)."""
    if iterations <= 1:
        return cfg.lr_start
    return cfg.lr_start + (cfg.lr_end - cfg.lr_start) * (k - 1) / (iterations - 1)


def objective_config(cfg: MStepCfg) -> objectives.ObjectiveConfig:
    return objectives.ObjectiveConfig(name=cfg.objective, loss_agg=cfg.loss_agg or
                                      objectives.get(cfg.objective).default_loss_agg,
                                      beta=cfg.beta, clip_eps=cfg.clip_eps, clip_ratio_c=cfg.clip_ratio_c)


def advantages(cfg: MStepCfg, examples: Sequence[TrainExample]) -> np.ndarray:
    """The objective's sequence weights of `examples` taken together (their statistics over
    these examples only; `group` says which share a draw batch)."""
    spec = objectives.get(cfg.objective)
    if spec.advantages is None or not examples:
        return np.zeros(len(examples), np.float32)
    _, gid = np.unique(np.asarray([str(e.group) for e in examples]), return_inverse=True)
    return spec.advantages(np.asarray([e.reward for e in examples], np.float32), gid, objective_config(cfg))


def set_advantages(cfg: MStepCfg, examples: Sequence[TrainExample], groups: Sequence[Any] | None = None) -> None:
    """The objective's sequence weights over the whole round (`groups`, when given, replace
    the examples' `group`: the draw batch each came from), written into each example's
    `advantage`. With `stats_over=update` make_batches computes them again per step."""
    if groups is not None:
        for e, g in zip(examples, groups, strict=True):
            e.group = str(g)
    for e, a in zip(examples, advantages(cfg, examples)):
        e.advantage = float(a)


@dataclasses.dataclass
class BatchStats:
    sequences: int = 0  # examples placed in a batch
    truncated: int = 0  # cut at max_seq_len (some completion tokens lost)
    dropped: int = 0  # no completion token left within max_seq_len


def make_batches(examples: Sequence[TrainExample], cfg: MStepCfg, pad_id: int, seed: int,
                 stats: BatchStats | None = None) -> list[dict[str, np.ndarray]]:
    """Shuffled optimizer steps of `batch_size` sequences each, as TRL and verl draw their
    mini-batches: sequences of all lengths mixed. Each step is padded to its longest
    sequence rounded up to a multiple of `length_bucket`, so a round compiles one step per
    bucket length. A dict of arrays shaped (accum, micro, t): input_ids, attention_mask,
    loss_mask (aligned with targets), rewards, and the objective's batch fields
    (advantages (accum, micro); old_logps (accum, micro, t), filled later by
    Trainer.fill_old_logps). The last step may be partial (padding rows carry no loss).
    With `stats_over=update` each step's advantages are the objective's statistics over that
    step's sequences alone (the EMPG paper's "mini-batch M", §4.2)."""
    spec = objectives.get(cfg.objective)
    stats = stats if stats is not None else BatchStats()
    keep = []
    for i, e in enumerate(examples):
        if not e.completion_ids:
            continue
        if len(e.prompt_ids) >= cfg.max_seq_len:
            stats.dropped += 1
            continue
        stats.truncated += len(e.prompt_ids) + len(e.completion_ids) > cfg.max_seq_len
        keep.append(i)
    order = [keep[j] for j in np.random.RandomState(seed).permutation(len(keep))]
    accum, micro = cfg.batch_size // cfg.micro_batch_size, cfg.micro_batch_size
    out = []
    for s in range(0, len(order), cfg.batch_size):
        idx = order[s:s + cfg.batch_size]
        longest = max(min(len(examples[i].prompt_ids) + len(examples[i].completion_ids), cfg.max_seq_len)
                      for i in idx)
        t = min(int(math.ceil(longest / cfg.length_bucket) * cfg.length_bucket), cfg.max_seq_len)
        b = {"input_ids": np.full((cfg.batch_size, t), pad_id, np.int32),
             "attention_mask": np.zeros((cfg.batch_size, t), bool),
             "loss_mask": np.zeros((cfg.batch_size, t), np.float32),
             "rewards": np.zeros((cfg.batch_size,), np.float32)}
        if "advantages" in spec.batch_fields:
            b["advantages"] = np.zeros((cfg.batch_size,), np.float32)
        if "old_logps" in spec.batch_fields:
            b["old_logps"] = np.zeros((cfg.batch_size, t), np.float32)
        own = advantages(cfg, [examples[i] for i in idx]) if cfg.stats_over == "update" else None
        for r, i in enumerate(idx):
            e = examples[i]
            seq = (list(e.prompt_ids) + list(e.completion_ids))[:t]
            p = len(e.prompt_ids)
            b["input_ids"][r, :len(seq)] = seq
            b["attention_mask"][r, :len(seq)] = True
            # target of position j is token j+1: completion tokens are targets p .. len-1
            b["loss_mask"][r, p - 1:len(seq) - 1] = 1.0
            b["rewards"][r] = e.reward
            if "advantages" in b:
                b["advantages"][r] = e.advantage if own is None else own[r]
            stats.sequences += 1
        out.append({k: v.reshape((accum, micro) + v.shape[1:]) for k, v in b.items()})
    return out


def _decay_mask(params: dict) -> dict:
    return {k: not (k.endswith("norm") or k.split("/")[-1].startswith("b")) for k in params}


def make_optimizer(cfg: MStepCfg) -> optax.GradientTransformation:
    # like transformers' Trainer: no weight decay on biases and norm weights
    # hyperparameters in float32 whatever the parameters' dtype: by default optax stores them in
    # the parameters' dtype, and b2 = 0.999 is 1.0 in bfloat16 (Adam's bias correction divides by 0)
    adamw = optax.inject_hyperparams(optax.adamw, static_args=("mask",), hyperparam_dtype=jnp.float32)(
        learning_rate=cfg.lr_start, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=_decay_mask)
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw) if cfg.grad_clip > 0 else adamw


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """Everything static about a train step. Hashable: the jitted step is module-level and
    keyed on it, so every Trainer of the same shapes in a process shares compilations."""

    model_cfg: ModelConfig
    cfg: MStepCfg
    mesh: jax.sharding.Mesh | None
    remat: str
    temperature: float = 1.0  # divides the logits of the loss's log-probs (tempered objectives)


def _compute(params, dtype: str):
    """Mixed precision: the forward and backward run in `dtype` from parameters kept in their
    own (float32) dtype; gradients flow back to the float32 masters through the cast."""
    if not dtype:
        return params
    dt = jnp.dtype(dtype)
    return jax.tree.map(lambda x: x.astype(dt) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)


def _logps(spec: StepSpec, params, mb, remat=None):
    params = _compute(params, spec.cfg.compute_dtype)
    constrain = constrainer(spec.mesh, RULES)
    return token_logps(spec.model_cfg, params, mb["input_ids"], mb["attention_mask"],
                       temperature=spec.temperature, remat=spec.remat if remat is None else remat,
                       constrain=constrain)


def _loss(spec: StepSpec, params, mb, num_items, ref_params):
    logps = _logps(spec, params, mb)
    batch = {k: mb[k] for k in ("loss_mask", "rewards", "advantages", "old_logps") if k in mb}
    batch["num_items"] = num_items
    if spec.cfg.beta > 0:
        batch["ref_logps"] = jax.lax.stop_gradient(_logps(spec, ref_params, mb, remat="none"))
    return objectives.loss(objective_config(spec.cfg), logps, batch)


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(1, 2))
def train_step(spec: StepSpec, params, opt_state, batch, ref_params=None):
    """One optimizer step over a batch shaped (accum, micro, t): gradients accumulated
    over micro-batches by lax.scan, the loss normalized over the whole step (loss_norm=step)
    or per micro-batch and averaged over them (loss_norm=micro, verl 281ed3a)."""
    flat = {k: v.reshape((-1,) + v.shape[2:]) for k, v in batch.items()}
    ocfg = objective_config(spec.cfg)
    accum = next(iter(batch.values())).shape[0]
    step_items = objectives.denominator(ocfg, {k: flat[k] for k in ("loss_mask", "rewards")})

    def num_items(mb):
        if spec.cfg.loss_norm == "micro":  # its own denominator, times the micro-batches averaged over
            return objectives.denominator(ocfg, {k: mb[k] for k in ("loss_mask", "rewards")}) * accum
        return step_items

    grad_fn = jax.value_and_grad(_loss, argnums=1, has_aux=True)

    def micro(acc, mb):
        (loss, metrics), g = grad_fn(spec, params, mb, num_items(mb), ref_params)
        acc_g, acc_l, acc_t = acc
        return (jax.tree.map(jnp.add, acc_g, g), acc_l + loss, acc_t + metrics["tokens"]), None

    if accum == 1:  # one micro-batch: no accumulator (a parameter-sized buffer)
        mb = {k: v[0] for k, v in batch.items()}
        (loss, metrics), grads = grad_fn(spec, params, mb, num_items(mb), ref_params)
        tokens = metrics["tokens"]
    else:
        zeros = jax.tree.map(jnp.zeros_like, params)
        (grads, loss, tokens), _ = jax.lax.scan(micro, (zeros, jnp.float32(0), jnp.float32(0)), batch)
    tx = make_optimizer(spec.cfg)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    if spec.mesh is not None:  # outputs keep the table's layout (and so the next step's inputs)
        ps = param_shardings(spec.model_cfg, spec.mesh)
        opt_state = jax.lax.with_sharding_constraint(opt_state, opt_shardings(tx, params, ps, spec.mesh))
        params = jax.lax.with_sharding_constraint(params, ps)
    return params, opt_state, {"loss": loss, "tokens": tokens, "grad_norm": optax.tree.norm(grads)}


@functools.partial(jax.jit, static_argnums=(0,))
def _batch_logps(spec: StepSpec, params, batch):
    """θ's log-probs of every micro-batch of a batch (accum, micro, t), no gradient."""
    return jax.lax.map(lambda mb: _logps(spec, params, mb, remat="none"), batch)


def param_shardings(model_cfg: ModelConfig, mesh: jax.sharding.Mesh) -> dict[str, jax.sharding.NamedSharding]:
    """Each parameter's sharding from fem_jax.sharding's table."""
    return {k: jax.sharding.NamedSharding(mesh, logical_to_spec(mesh, axes, shape))
            for k, (shape, axes) in param_shapes(model_cfg).items()}


def opt_shardings(tx, params, p_shardings, mesh):
    """Optimizer state sharded like the parameters (moments share their layout);
    scalars (step count, hyperparameters) replicated."""
    abstract = jax.eval_shape(tx.init, params)
    shapes = {k: v.shape for k, v in params.items()}
    repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def pick(path, leaf):
        key = path[-1].key if path and hasattr(path[-1], "key") else None
        if key in shapes and leaf.shape == shapes[key]:
            return p_shardings[key]
        return repl

    return jax.tree_util.tree_map_with_path(pick, abstract)


def _device_sharding() -> jax.sharding.SingleDeviceSharding:
    """Where a trainer without a mesh keeps its arrays (committed, as the step's outputs are)."""
    return jax.sharding.SingleDeviceSharding(jax.devices()[0])


class Trainer:
    """Holds parameters and optimizer state; runs jitted optimizer steps.

    The optimizer state can be dropped between rounds (`drop_optimizer`) when the next
    round starts a fresh one anyway: it is twice the parameters' size in float32."""

    def __init__(self, model_cfg: ModelConfig, params: dict[str, jax.Array], cfg: MStepCfg,
                 mesh: jax.sharding.Mesh | None = None, remat: str | bool = "none", ref_params=None,
                 temperature: float = 1.0):
        remat = {True: "full", False: "none"}.get(remat, remat) if isinstance(remat, bool) else remat
        self.model_cfg, self.cfg, self.mesh, self.remat = model_cfg, cfg, mesh, remat
        self.tx = make_optimizer(cfg)
        if mesh is not None:
            ns = jax.sharding.NamedSharding
            self.param_shardings = param_shardings(model_cfg, mesh)
            params = jax.device_put(params, self.param_shardings)
            self.batch_sharding = ns(mesh, jax.sharding.PartitionSpec(None, ("data", "fsdp")))
            self.batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
            if cfg.micro_batch_size % self.batch_shards:
                raise ValueError(
                    f"mstep.micro_batch_size={cfg.micro_batch_size} must be divisible by data*fsdp="
                    f"{self.batch_shards} of the mesh {dict(mesh.shape)}: each micro-batch is split over "
                    f"(data, fsdp)")
        else:
            self.param_shardings = None
            self.batch_sharding = None
        self.params = self._own(params)
        self.ref_params = ref_params
        self._init = jax.jit(self.tx.init, out_shardings=self._opt_shardings(params))
        self.opt_state = None  # created by the first step or reset_optimizer: twice the parameters' size
        spec = objectives.get(cfg.objective)
        self.spec = StepSpec(model_cfg, cfg, mesh, remat, temperature if spec.tempered else 1.0)

    def _opt_shardings(self, params):
        if self.mesh is None:  # committed to the device, as the step's outputs are
            return _device_sharding()
        return opt_shardings(self.tx, params, self.param_shardings, self.mesh)

    def _own(self, params):
        """A private copy (the step donates its buffers, which the engine or the base weights
        may share), committed to the parameters' shardings or the device as the step's
        outputs are: an argument that is uncommitted in one call and committed in the next
        compiles the step again (jit keys on the arguments' shardings)."""
        target = self.param_shardings or _device_sharding()
        return jax.device_put(jax.tree.map(jnp.copy, params), target)

    def reset_optimizer(self) -> None:
        self.opt_state = None
        self.opt_state = self._init(self.params)

    def opt_state_like(self):
        """The optimizer state's shapes, dtypes and shardings (to restore one into)."""
        abstract = jax.eval_shape(self._init, self.params)
        device = _device_sharding()
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding or device), abstract)

    def drop_optimizer(self) -> None:
        """Free the optimizer state (the next `reset_optimizer` creates a fresh one)."""
        self.opt_state = None

    def set_params(self, params) -> None:
        self.params = self._own(params)

    def set_lr(self, lr: float) -> None:
        if self.opt_state is None:
            self.reset_optimizer()
        state = self.opt_state[-1] if isinstance(self.opt_state, tuple) and self.cfg.grad_clip > 0 else self.opt_state
        old = state.hyperparams["learning_rate"]
        # placed as the old value was: a fresh uncommitted scalar would compile the step again
        state.hyperparams["learning_rate"] = jax.device_put(jnp.asarray(lr, old.dtype), old.sharding)

    def _put(self, batch: dict[str, np.ndarray]):
        if self.batch_sharding is None:
            return batch
        micro = batch["input_ids"].shape[1]
        if micro % self.batch_shards:
            raise ValueError(f"a batch of micro-batches of {micro} sequences cannot be split over "
                             f"data*fsdp={self.batch_shards}; mstep.micro_batch_size must be a multiple of it")
        return {k: jax.device_put(v, self.batch_sharding) for k, v in batch.items()}

    def fill_old_logps(self, batches: Sequence[dict[str, np.ndarray]]) -> None:
        """θ_old's log-probs (the current parameters, before any update of this round) into
        every batch's `old_logps`, for objectives whose loss reads them."""
        for b in batches:
            if "old_logps" in b:
                inputs = {k: v for k, v in b.items() if k != "old_logps"}
                b["old_logps"] = np.asarray(_batch_logps(self.spec, self.params, self._put(inputs)))

    def step(self, batch: dict[str, np.ndarray]) -> dict[str, float]:
        if self.opt_state is None:
            self.reset_optimizer()
        self.params, self.opt_state, m = train_step(self.spec, self.params, self.opt_state, self._put(batch),
                                                    self.ref_params)
        return {k: float(v) for k, v in m.items()}

    def train(self, batches: Iterable[dict[str, np.ndarray]], progress=None) -> dict[str, Any]:
        losses, norms, tokens = [], [], 0.0
        for b in batches:
            m = self.step(b)
            losses.append(m["loss"])
            norms.append(m["grad_norm"])
            tokens += m["tokens"]
            if progress is not None:
                progress(m)
        return {"train_loss": float(np.mean(losses)) if losses else None, "train_losses": losses,
                "grad_norms": norms, "tokens_mstep": int(tokens), "optimizer_steps": len(losses)}
