"""Experiment configuration: frozen dataclasses, YAML files, `--set a.b=c` overrides.

An unknown key or a value of the wrong type stops with an error that names it (and the
file it came from). Values an objective decides by default (`mstep.loss_agg`,
`mstep.reset_optimizer`) are filled in from its spec (fem_jax.objectives) when left empty,
so the resolved config written into the run folder states every value the run used.

A run folder may be *extended*: the fields in `EXTENDABLE` cannot change finished work
(more iterations, other trackers, extra evaluation metrics, how rollouts are batched, the
mesh), so a resumed run accepts new values for them; any other change is refused.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, Mapping

import yaml

TRAINERS = ("fem_jax", "trl")  # who samples and trains a run (run.trainer)
REMAT_NAMES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable", "nothing_saveable")


@dataclasses.dataclass(frozen=True)
class ModelCfg:
    path: str = "smollm2-135m-instruct"  # HF folder, or a builtin name (fem_jax.models.resolve)
    dtype: str = "float32"  # float32 | bfloat16
    remat: str = "none"  # M-step rematerialization of decoder layers: none | full | a jax.checkpoint policy name


@dataclasses.dataclass(frozen=True)
class TaskCfg:
    name: str = "arithmetic"
    options: dict = dataclasses.field(default_factory=dict)  # passed to fem_jax.tasks.get_task


@dataclasses.dataclass(frozen=True)
class EStepCfg:
    scheme: str = "rs"  # rs | star | pps, and hint wordings pps2 pps3 star2 star3
    budget: int = 1  # M: tries per example, hint-free (rs) or hinted (pps; M > 1 is ours); the paper's tables use M = 1
    samples_per_prompt: int = 1  # N draws per prompt (policy-gradient objectives want several)
    prompts_per_step: int = 0  # prompts per policy-gradient step (objectives whose loop is "steps")
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 48
    reject_hint_leaks: bool = False  # ours: drop hinted draws that repeat the hint (the paper keeps them)


@dataclasses.dataclass(frozen=True)
class MStepCfg:
    objective: str = "fem"  # a name registered in fem_jax.objectives: fem | empg | grpo
    loss_agg: str = ""  # token-mean | seq-mean-token-sum | seq-mean-token-mean; empty: the objective's
    loss_norm: str = "step"  # step: one denominator for the whole optimizer update (TRL); micro: each
    #   micro-batch's own, the micro-batch losses then averaged (verl at 281ed3a, dp_actor)
    stats_over: str = "buffer"  # the objective's advantage statistics (EMPG's μ, σ, b; GRPO's groups) over
    #   the round's whole buffer of draws, or over each optimizer update's batch ("update")
    beta: float = 0.0  # KL(pi || pi_ref) coefficient (policy-gradient objectives)
    clip_eps: float = 0.2  # grpo's clip range
    clip_ratio_c: float = 3.0  # grpo's dual-clip bound (verl)
    lr_start: float = 1e-6  # round 1; decays linearly to lr_end at round K, constant within one
    lr_end: float = 1e-7
    compute_dtype: str = ""  # bfloat16: forward/backward in bf16 from float32 master weights; empty: model.dtype
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    grad_clip: float = 1.0  # 0: off
    batch_size: int = 8  # sequences per optimizer step
    micro_batch_size: int = 8  # sequences per forward/backward (gradient accumulation)
    epochs: int = 1  # passes over a round's trained draws
    max_seq_len: int = 512  # longer prompt+completion sequences are cut (and counted)
    length_bucket: int = 64  # sequences padded to a multiple: each length compiles one train step
    reset_optimizer: bool | None = None  # fresh AdamW each round; empty: the objective's default
    restart_from_base: bool = False  # original STaR: fine-tune from the base model every iteration


@dataclasses.dataclass(frozen=True)
class EvalCfg:
    max_new_tokens: int = 48
    every: int = 1  # evaluate every this many rounds (and always the last)
    n_samples: int = 0  # sampled completions per test example for pass@k / maj@k (0: greedy only)
    k: tuple = ()  # the k of pass@k and maj@k, each <= n_samples
    temperature: float = 1.0  # of the sampled completions
    top_p: float = 1.0


@dataclasses.dataclass(frozen=True)
class RolloutCfg:
    backend: str = "jax"  # jax | vllm
    max_batch: int = 64  # jax: rows per batch
    chunk: int = 16  # jax: decode tokens per jitted call
    tensor_parallel_size: int = 1  # vllm
    gpu_memory_utilization: float = 0.5  # vllm on a GPU: its share of the device (weights, KV cache)
    kv_cache_gb: float = 1.0  # vllm: its KV cache in GB (RAM on a CPU); 0: sized by gpu_memory_utilization (GPU)
    max_model_len: int = 0  # vllm: longest prompt + completion; 0: the model's own limit
    sync: str = "auto"  # vllm: how trained weights reach it: auto | memory | folder (fem_jax.rollout.vllm_engine)


@dataclasses.dataclass(frozen=True)
class RunCfg:
    iterations: int = 5  # K: FEM iterations, or policy-gradient steps
    seed: int = 257
    mesh: str = ""  # e.g. "data=1,fsdp=-1,tensor=1"; empty: one device
    keep_checkpoints: int = 2  # orbax keeps this many most recent checkpoints
    save_every: int = 1  # checkpoint every this many rounds (and always the last)
    report_to: tuple = ()  # experiment trackers: tensorboard, wandb, trackio
    trainer: str = "fem_jax"  # fem_jax | trl: TRL's GRPOTrainer samples and trains the run (fem_jax.trl_run; grpo)


@dataclasses.dataclass(frozen=True)
class CompareCfg:
    """Several runs side by side, one per (arm, seed), each in its own run folder under the
    comparison's folder, with one table and plot for all (launch/run.py --schemes/--seeds)."""

    schemes: tuple = ()  # E-step schemes to compare (FEM)
    objectives: tuple = ()  # objectives to compare (e.g. empg, grpo)
    trl: tuple = ()  # objectives TRL's trainer also runs, as arms "<objective>-trl" (grpo: GRPOTrainer)
    seeds: tuple = ()  # seeds of every arm (default: run.seed)


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelCfg = ModelCfg()
    task: TaskCfg = TaskCfg()
    estep: EStepCfg = EStepCfg()
    mstep: MStepCfg = MStepCfg()
    eval: EvalCfg = EvalCfg()
    rollout: RolloutCfg = RolloutCfg()
    run: RunCfg = RunCfg()
    compare: CompareCfg = CompareCfg()

    @property
    def objective(self):
        from . import objectives

        return objectives.get(self.mstep.objective)

    def resolve(self) -> "Config":
        """Fill the fields left to the objective's defaults, then validate."""
        from . import objectives

        _check(self.mstep.objective in objectives.OBJECTIVES, "mstep.objective", self.mstep.objective,
               f"one of {', '.join(sorted(objectives.OBJECTIVES))}")
        spec = self.objective
        m = self.mstep
        m = dataclasses.replace(m, loss_agg=m.loss_agg or spec.default_loss_agg,
                                reset_optimizer=spec.default_reset_optimizer if m.reset_optimizer is None
                                else m.reset_optimizer)
        return dataclasses.replace(self, mstep=m).validate()

    def validate(self) -> "Config":
        from . import objectives
        from .estep import SCHEMES
        from .rollout import BACKENDS

        e, m, ev = self.estep, self.mstep, self.eval
        _check(e.scheme in SCHEMES, "estep.scheme", e.scheme, f"one of {', '.join(SCHEMES)}")
        _check(e.budget >= 1, "estep.budget", e.budget, ">= 1")
        _check(e.samples_per_prompt >= 1, "estep.samples_per_prompt", e.samples_per_prompt, ">= 1")
        _check(e.prompts_per_step >= 0, "estep.prompts_per_step", e.prompts_per_step, ">= 0")
        _check(e.temperature >= 0, "estep.temperature", e.temperature, ">= 0")
        _check(0 < e.top_p <= 1, "estep.top_p", e.top_p, "in (0, 1]")
        _check(e.max_new_tokens >= 1, "estep.max_new_tokens", e.max_new_tokens, ">= 1")
        _check(m.objective in objectives.OBJECTIVES, "mstep.objective", m.objective,
               f"one of {', '.join(sorted(objectives.OBJECTIVES))}")
        spec = objectives.get(m.objective)
        _check(m.loss_agg in objectives.LOSS_AGGS, "mstep.loss_agg", m.loss_agg,
               f"one of {', '.join(objectives.LOSS_AGGS)}")
        _check(m.loss_norm in ("step", "micro"), "mstep.loss_norm", m.loss_norm, "step or micro")
        _check(m.stats_over in ("buffer", "update"), "mstep.stats_over", m.stats_over, "buffer or update")
        _check(m.beta >= 0, "mstep.beta", m.beta, ">= 0")
        _check(0 < m.clip_eps < 1, "mstep.clip_eps", m.clip_eps, "in (0, 1)")
        _check(m.clip_ratio_c > 1, "mstep.clip_ratio_c", m.clip_ratio_c, "> 1")
        for field, value, want in spec.check(m):
            _check(False, field, value, want)
        if spec.loop == "steps":
            _check(e.prompts_per_step >= 1, "estep.prompts_per_step", e.prompts_per_step,
                   f">= 1: objective {m.objective!r} trains step by step on a batch of prompts")
            _check(e.scheme == "rs" and e.budget == 1, "estep.scheme", f"{e.scheme} (budget {e.budget})",
                   f"rs with estep.budget=1: objective {m.objective!r} samples each step's prompts from θ(t-1)")
        _check(m.lr_start >= 0 and m.lr_end >= 0, "mstep.lr_start/lr_end", (m.lr_start, m.lr_end), ">= 0")
        _check(m.batch_size >= 1, "mstep.batch_size", m.batch_size, ">= 1")
        _check(m.micro_batch_size >= 1 and m.batch_size % m.micro_batch_size == 0, "mstep.micro_batch_size",
               m.micro_batch_size, f"a divisor of mstep.batch_size={m.batch_size}")
        _check(m.epochs >= 1, "mstep.epochs", m.epochs, ">= 1")
        _check(m.max_seq_len >= 2, "mstep.max_seq_len", m.max_seq_len, ">= 2")
        _check(m.length_bucket >= 1, "mstep.length_bucket", m.length_bucket, ">= 1")
        _check(self.model.dtype in ("float32", "bfloat16"), "model.dtype", self.model.dtype, "float32 or bfloat16")
        _check(m.compute_dtype in ("", "float32", "bfloat16"), "mstep.compute_dtype", m.compute_dtype,
               "empty (model.dtype), float32 or bfloat16")
        _check(self.model.remat in REMAT_NAMES, "model.remat", self.model.remat, f"one of {', '.join(REMAT_NAMES)}")
        _check(self.rollout.backend in BACKENDS, "rollout.backend", self.rollout.backend,
               f"one of {', '.join(BACKENDS)}")
        from .rollout.vllm_engine import SYNC_METHODS

        r = self.rollout
        _check(r.sync in SYNC_METHODS, "rollout.sync", r.sync, f"one of {', '.join(SYNC_METHODS)}")
        _check(r.kv_cache_gb >= 0, "rollout.kv_cache_gb", r.kv_cache_gb, ">= 0")
        _check(r.max_model_len >= 0, "rollout.max_model_len", r.max_model_len, ">= 0 (0: the model's own)")
        _check(0 < r.gpu_memory_utilization <= 1, "rollout.gpu_memory_utilization", r.gpu_memory_utilization,
               "in (0, 1]")
        _check(self.run.iterations >= 1, "run.iterations", self.run.iterations, ">= 1")
        _check(self.run.save_every >= 1, "run.save_every", self.run.save_every, ">= 1")
        _check(self.run.keep_checkpoints >= 1, "run.keep_checkpoints", self.run.keep_checkpoints, ">= 1")
        _check(ev.every >= 1, "eval.every", ev.every, ">= 1")
        _check(ev.n_samples >= 0, "eval.n_samples", ev.n_samples, ">= 0")
        _check(all(isinstance(k, int) and 1 <= k <= max(ev.n_samples, 1) for k in ev.k) and (ev.n_samples > 0 or not ev.k),
               "eval.k", list(ev.k), f"integers in [1, eval.n_samples={ev.n_samples}]")
        _check(ev.temperature > 0, "eval.temperature", ev.temperature, "> 0 (sampled pass@k completions)")
        _check(self.run.trainer in TRAINERS, "run.trainer", self.run.trainer, f"one of {', '.join(TRAINERS)}")
        if self.run.trainer == "trl":  # TRL's trainer samples and trains the run (fem_jax.trl_run)
            self._check_trl()
        from .trackers import REPORT_TO

        bad = [t for t in self.run.report_to if t not in REPORT_TO]
        _check(not bad, "run.report_to", list(self.run.report_to), f"a list of {', '.join(REPORT_TO)}")
        cmp = self.compare
        _check(not (cmp.schemes and cmp.objectives), "compare", "schemes and objectives",
               "one of compare.schemes or compare.objectives")
        bad = [s for s in cmp.schemes if s not in SCHEMES]
        _check(not bad, "compare.schemes", list(cmp.schemes), f"a list of {', '.join(SCHEMES)}")
        _check(not (cmp.schemes and cmp.trl), "compare", "schemes and trl",
               "compare.trl beside compare.objectives (policy-gradient arms), not compare.schemes")
        trl = [o for o, spec in objectives.OBJECTIVES.items() if spec.trl_trainer]
        _check(all(o in trl for o in cmp.trl), "compare.trl", list(cmp.trl),
               f"a list of objectives TRL implements ({', '.join(trl)})")
        bad = [o for o in cmp.objectives if o not in objectives.OBJECTIVES]
        _check(not bad, "compare.objectives", list(cmp.objectives),
               f"a list of {', '.join(sorted(objectives.OBJECTIVES))}")
        _check(all(isinstance(x, int) for x in cmp.seeds), "compare.seeds", list(cmp.seeds), "a list of integers")
        return self

    def _check_trl(self) -> None:
        """The settings a run trained by TRL (run.trainer=trl) cannot honour, named."""
        import importlib.util

        from . import objectives

        m, e, why = self.mstep, self.estep, " with run.trainer=trl"
        _check(importlib.util.find_spec("trl") is not None and importlib.util.find_spec("torch") is not None,
               "run.trainer", "trl", "fem_jax with this install: TRL and torch are in the test extra "
               "(pip install -e \".[test]\")")
        _check(bool(self.objective.trl_trainer), "mstep.objective", m.objective,
               "an objective TRL implements (grpo: GRPOTrainer)" + why)
        _check((m.loss_agg, m.loss_norm) in objectives.TRL_LOSS_TYPES, "mstep.loss_agg",
               f"{m.loss_agg} (loss_norm {m.loss_norm})", "token-mean or seq-mean-token-mean (TRL's dapo, bnpo, "
               "grpo)" + why)
        _check(m.lr_start == m.lr_end, "mstep.lr_end", m.lr_end, f"mstep.lr_start={m.lr_start} (constant)" + why)
        n = e.prompts_per_step * e.samples_per_prompt
        _check(n % m.batch_size == 0, "mstep.batch_size", m.batch_size,
               f"a divisor of estep.prompts_per_step x samples_per_prompt = {n}" + why)
        _check(not m.restart_from_base, "mstep.restart_from_base", m.restart_from_base, "false" + why)
        _check(m.compute_dtype in ("", self.model.dtype), "mstep.compute_dtype", m.compute_dtype, "empty" + why)
        _check(not self.run.mesh, "run.mesh", self.run.mesh, "empty (TRL places the model itself)" + why)
        _check(not self.run.report_to, "run.report_to", list(self.run.report_to), "empty" + why)

    def arms(self) -> list[tuple[str, int, "Config"]]:
        """The comparison's runs: (arm name, seed, that run's config), seeds outermost."""
        cmp = self.compare
        seeds = list(cmp.seeds) or [self.run.seed]
        if cmp.objectives or cmp.trl:
            arms = [(o, {"mstep": dataclasses.replace(self.mstep, objective=o, loss_agg="", reset_optimizer=None)})
                    for o in cmp.objectives]
            arms += [(f"{o}-trl", {"mstep": dataclasses.replace(self.mstep, objective=o, loss_agg="",
                                                                reset_optimizer=None),
                                   "run": dataclasses.replace(self.run, trainer="trl")}) for o in cmp.trl]
        else:
            arms = [(s, {"estep": dataclasses.replace(self.estep, scheme=s)})
                    for s in (cmp.schemes or [self.estep.scheme])]
        out = []
        for seed in seeds:
            for name, parts in arms:
                c = dataclasses.replace(self, **parts, compare=CompareCfg())
                c = dataclasses.replace(c, run=dataclasses.replace(c.run, seed=seed))
                out.append((name, seed, c.resolve()))
        return out


# Fields whose change cannot invalidate finished rounds: a resumed run accepts new values.
EXTENDABLE = frozenset({
    "run.iterations", "run.keep_checkpoints", "run.save_every", "run.report_to", "run.mesh",
    "eval.n_samples", "eval.k", "eval.temperature", "eval.top_p", "eval.every",
    "rollout.backend", "rollout.max_batch", "rollout.chunk", "rollout.tensor_parallel_size",
    "rollout.gpu_memory_utilization", "rollout.kv_cache_gb", "rollout.max_model_len", "rollout.sync", "model.remat",
})


def _check(ok: bool, key: str, value, want: str) -> None:
    if not ok:
        raise ValueError(f"config: {key}={value!r} is invalid; expected {want}")


def _coerce(value: Any, tp, key: str, source: str):
    if key == "model.remat" and isinstance(value, bool):  # the old boolean switch
        return "full" if value else "none"
    if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "null", "none")):
            return None
        return _coerce(value, args[0], key, source)
    origin = typing.get_origin(tp)
    if tp is bool:
        if isinstance(value, str):
            low = value.lower()
            if low in ("true", "1", "yes"):
                return True
            if low in ("false", "0", "no"):
                return False
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, bool):
            pass
        elif isinstance(value, int):
            return value
        elif isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif tp is dict or origin is dict:
        if isinstance(value, Mapping):
            return dict(value)
    elif tp is tuple or origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()] if value.strip() not in ("none", "[]") else []
        if isinstance(value, (list, tuple)):
            return tuple(_parse_scalar(v) if isinstance(v, str) else v for v in value)
        if isinstance(value, (int, float)):  # --set compare.seeds=1: YAML read a list of one as its item
            return (value,)
    raise ValueError(f"{source}: {key}={value!r} is not a valid {getattr(tp, '__name__', tp)}")


def _merge(obj, data: Mapping[str, Any], prefix: str, source: str):
    if not isinstance(data, Mapping):
        raise ValueError(f"{source}: {prefix.rstrip('.') or 'top level'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(type(obj))
    fields = {f.name for f in dataclasses.fields(obj)}
    changes = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if k not in fields:
            raise ValueError(f"{source}: unknown key {key!r}; known: {', '.join(sorted(fields))}")
        cur = getattr(obj, k)
        if dataclasses.is_dataclass(cur):
            changes[k] = _merge(cur, v, key + ".", source)
        elif hints[k] is dict and isinstance(cur, dict) and isinstance(v, Mapping):
            changes[k] = {**cur, **v}
        else:
            changes[k] = _coerce(v, hints[k], key, source)
    return dataclasses.replace(obj, **changes)


def _parse_scalar(text: str):
    return yaml.safe_load(text) if text.strip() else ""


def _apply_file(cfg: Config, p: Path, seen: tuple[Path, ...]) -> Config:
    """Merge a YAML file into cfg. `include: [part.yaml, ...]` (paths relative to the file)
    merges those parts first, in order, so experiments compose from shared pieces."""
    if not p.exists():
        raise FileNotFoundError(f"--config: {p} does not exist" if not seen else
                                f"{seen[-1]}: included file {p} does not exist")
    if p.resolve() in seen:
        raise ValueError(f"{p}: include cycle through {', '.join(str(x) for x in seen)}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{p}: not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(data, Mapping):
        raise ValueError(f"{p}: top level must be a mapping")
    data = dict(data)
    includes = data.pop("include", [])
    if isinstance(includes, str):
        includes = [includes]
    for inc in includes:
        cfg = _apply_file(cfg, p.parent / inc, seen + (p.resolve(),))
    return _merge(cfg, data, "", str(p))


def override_dict(overrides: list[str]) -> dict[str, Any]:
    """`a.b=c` strings -> {"a.b": parsed value}; ValueError naming a malformed one."""
    out = {}
    for ov in overrides:
        if "=" not in ov:
            raise ValueError(f"--set {ov!r}: expected key=value, e.g. mstep.lr_start=1e-5")
        key, text = ov.split("=", 1)
        value: Any = _parse_scalar(text)
        if key.strip().split(".")[-1] == "path" and not isinstance(value, str):
            value = text
        out[key.strip()] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults <- YAML file <- `a.b=c` overrides, then the objective's defaults and validation."""
    cfg = Config()
    if path is not None:
        cfg = _apply_file(cfg, Path(path), ())
    for ov in overrides:
        (key, value), = override_dict([ov]).items()
        nested: Any = value
        for part in reversed(key.split(".")):
            nested = {part: nested}
        cfg = _merge(cfg, nested, "", f"--set {ov}")
    return cfg.resolve()


def to_dict(cfg: Config) -> dict:
    def plain(x):
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x

    return plain(dataclasses.asdict(cfg))


def from_dict(data: Mapping[str, Any], source: str) -> Config:
    """A Config from a resolved dict (a run folder's config.yaml)."""
    return _merge(Config(), data, "", source).resolve()


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; task.options stays one value."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and key != "task.options":
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def differences(old: Config, new: Config) -> list[tuple[str, Any, Any]]:
    """(field, old value, new value) for every field that differs."""
    a, b = flatten(to_dict(old)), flatten(to_dict(new))
    return [(k, a.get(k), b.get(k)) for k in b if a.get(k) != b.get(k)]
