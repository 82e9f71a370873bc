"""Evaluation of any weights on a task's test split.

- Greedy accuracy (temperature 0, the hint-free prompt): the papers' headline metric.
- With `eval.n_samples` = n > 0, n sampled completions per example at `eval.temperature`:
  pass@k with the unbiased estimator of Chen et al. (2021, "Evaluating Large Language
  Models Trained on Code", Eq. 1), 1 - C(n - c, k) / C(n, k) for c correct of n, averaged
  over examples; and maj@k, the reward of the most frequent parsed answer among the first
  k samples (ties go to the answer seen first; an unparsed sample never wins a vote).

    python -m fem_jax.evaluate RUN_DIR --iteration K [--n-samples 16 --k 1,4,8]
    python -m fem_jax.evaluate RUN_DIR --iteration 0              # the base model
    python -m fem_jax.evaluate --model HF_DIR_OR_CHECKPOINT --config configs/X.yaml

The run's resolved config names the task, its seed (so the same test split) and the
evaluation settings; flags override the sampling ones. The metrics are printed and
written to RUN_DIR/evals/<name>.json with every completion in <name>.jsonl.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al., 2021), computed
    as 1 - prod_{i=n-c+1}^{n} (1 - k / i) for numerical stability."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def maj_at_k(answers: Sequence[Any], rewards: Sequence[float], k: int) -> float:
    """The reward of the majority answer among the first k samples (None = unparsed)."""
    votes = Counter(repr(a) for a in answers[:k] if a is not None)
    if not votes:
        return 0.0
    best = max(votes.values())
    for a, r in zip(answers[:k], rewards[:k]):
        if a is not None and votes[repr(a)] == best:
            return float(r)
    return 0.0


def words(text: str) -> int:
    return len(text.split())


def _score(task, text: str, gold) -> tuple[Any, float]:
    answer = task.parse(text)
    return answer, (float(task.reward(answer, gold)) if answer is not None else 0.0)


def evaluate(engine, task, examples: Sequence, cfg, *, seed: int = 0,
             progress: Callable[[int], None] | None = None) -> tuple[dict, list[dict]]:
    """(metrics, one record per example). `cfg` is an EvalCfg."""
    t = time.time()
    prompts = [task.messages(ex, hint=None) for ex in examples]
    greedy = engine.generate(prompts, n=1, temperature=0.0, max_new_tokens=cfg.max_new_tokens, seed=seed,
                             progress=progress)
    records, correct, lengths, tokens = [], 0.0, [], 0
    for ex, outs in zip(examples, greedy):
        s = outs[0]
        answer, r = _score(task, s.text, ex.gold)
        correct += r
        lengths.append(words(s.text))
        tokens += len(s.token_ids)
        records.append({"example_id": ex.id, "completion": s.text, "answer": None if answer is None else str(answer),
                        "gold": str(ex.gold), "reward": r, "tokens": len(s.token_ids)})
    n = len(examples)
    metrics: dict[str, Any] = {
        "test_accuracy": correct / max(1, n), "n_test": n,
        "reasoning_length_test": float(np.mean(lengths)) if lengths else None,
        "response_length_test": tokens / max(1, n), "tokens_eval": tokens}
    if cfg.n_samples > 0:
        sampled = engine.generate(prompts, n=cfg.n_samples, temperature=cfg.temperature, top_p=cfg.top_p,
                                  max_new_tokens=cfg.max_new_tokens, seed=seed + 1, progress=progress)
        passes = {k: [] for k in cfg.k}
        majs = {k: [] for k in cfg.k}
        for ex, rec, outs in zip(examples, records, sampled):
            scored = [_score(task, s.text, ex.gold) for s in outs]
            answers, rewards = [a for a, _ in scored], [r for _, r in scored]
            c = sum(r > 0 for r in rewards)
            for k in cfg.k:
                passes[k].append(pass_at_k(len(outs), c, k))
                majs[k].append(maj_at_k(answers, rewards, k))
            rec["samples"] = [{"completion": s.text, "answer": None if a is None else str(a), "reward": r}
                              for s, (a, r) in zip(outs, scored)]
            metrics["tokens_eval"] += sum(len(s.token_ids) for s in outs)
        metrics["sample_accuracy"] = float(np.mean([[x["reward"] for x in rec["samples"]] for rec in records]))
        for k in cfg.k:
            metrics[f"pass@{k}"] = float(np.mean(passes[k]))
            metrics[f"maj@{k}"] = float(np.mean(majs[k]))
    metrics["seconds_eval"] = time.time() - t
    return metrics, records


# ----------------------------------------------------------------------------- the command


def _weights_of_run(run_dir: Path, iteration: int):
    """(params, config) of a run folder's round `iteration` (0: the base model)."""
    from . import config as config_lib
    from .checkpoint import Checkpointer

    cfg_file = run_dir / "config.yaml"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{cfg_file}: not found ({run_dir} is not a fem-jax run folder)")
    import yaml

    cfg = config_lib.from_dict(yaml.safe_load(cfg_file.read_text()), str(cfg_file))
    if iteration == 0:
        return None, cfg
    ck = Checkpointer(run_dir / "checkpoints", create=False)
    steps = ck.all_steps()
    if iteration not in steps:
        raise ValueError(f"{run_dir}: no checkpoint of round {iteration} (kept: {steps or 'none'}; "
                         f"run.keep_checkpoints={cfg.run.keep_checkpoints} keeps the most recent)")
    return (ck, iteration), cfg


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fem_jax.evaluate", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("run_dir", nargs="?", type=Path, help="a fem-jax run folder")
    ap.add_argument("--iteration", type=int, default=None, help="the round whose weights to evaluate (0: base model)")
    ap.add_argument("--model", default=None, help="instead of a run: an HF folder, builtin name or orbax checkpoint")
    ap.add_argument("--config", type=Path, default=None, help="with --model: the experiment config (task, eval)")
    ap.add_argument("--n-samples", type=int, default=None, help="sampled completions per example (pass@k, maj@k)")
    ap.add_argument("--k", default=None, help="comma-separated k of pass@k / maj@k, e.g. 1,4,8")
    ap.add_argument("--temperature", type=float, default=None, help="temperature of the sampled completions")
    ap.add_argument("--limit", type=int, default=None, help="evaluate only the first N test examples")
    a = ap.parse_args(argv)
    try:
        return _run(a)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


def _run(a) -> int:
    import dataclasses

    from . import config as config_lib
    from .io import atomic_write_jsonl, atomic_write_text
    from .models import from_pretrained, resolve
    from .rollout import make_engine
    from .tasks import get_task

    if (a.run_dir is None) == (a.model is None):
        raise ValueError("give a RUN_DIR (with --iteration) or --model with --config")
    if a.run_dir is not None:
        if a.iteration is None:
            raise ValueError("--iteration: which round of the run to evaluate (0: the base model)")
        source, cfg = _weights_of_run(a.run_dir, a.iteration)
        out_dir, name = a.run_dir / "evals", f"iter_{a.iteration}"
    else:
        if a.config is None:
            raise ValueError("--model needs --config (the experiment: task, seed, evaluation settings)")
        cfg = config_lib.load_config(a.config)
        source = None
        out_dir, name = Path("evals"), Path(str(a.model)).name
    ev = cfg.eval
    if a.n_samples is not None:
        ev = dataclasses.replace(ev, n_samples=a.n_samples)
    if a.k is not None:
        ev = dataclasses.replace(ev, k=tuple(int(x) for x in a.k.split(",") if x.strip()))
    if a.temperature is not None:
        ev = dataclasses.replace(ev, temperature=a.temperature)
    cfg = dataclasses.replace(cfg, eval=ev).validate()
    if ev.n_samples:
        name += f"_n{ev.n_samples}"

    from transformers import AutoTokenizer

    model_path = a.model if a.model is not None else cfg.model.path
    from .checkpoint import is_checkpoint

    if a.model is not None and is_checkpoint(a.model):
        from .checkpoint import Checkpointer

        source = (Checkpointer(a.model, create=False), None)
        model_path = cfg.model.path
    model_dir = resolve(model_path)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = from_pretrained(model_dir, dtype=cfg.model.dtype)
    if source is not None:
        import jax

        ck, step = source
        like = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding) for k, v in model.param_dict().items()}
        params, _, _ = ck.restore(step, like)
        model.set_params(params)
    task = get_task(cfg.task.name, **{"seed": cfg.run.seed, **cfg.task.options})
    test = task.load("test")[:a.limit] if a.limit else task.load("test")
    engine = make_engine(cfg.rollout.backend, model=model, tokenizer=tokenizer, model_dir=model_dir,
                         rollout_cfg=cfg.rollout, dtype=cfg.model.dtype, seed=cfg.run.seed)
    metrics, records = evaluate(engine, task, test, ev, seed=0)
    metrics = {"source": str(a.run_dir or a.model), "iteration": a.iteration, **metrics}
    atomic_write_text(out_dir / f"{name}.json", json.dumps(metrics, indent=2) + "\n")
    atomic_write_jsonl(out_dir / f"{name}.jsonl", records)
    width = max(len(k) for k in metrics)
    for k, v in metrics.items():
        print(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) and not math.isnan(v) else f"{k:<{width}}  {v}")
    print(f"(written to {out_dir / (name + '.json')} and {name}.jsonl)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
