"""vLLM against our own engine and forward pass, for tests/test_vllm.py, run in a process of
its own (vLLM runs its engine core in the calling process here and binds its threads).

    python tests/vllm_check.py MODEL OUT.json [--n-test N] [--max-new-tokens L] [--quick]

MODEL is a builtin name (tiny-arith-llama, smollm2-135m-instruct) or a folder. The prompts
are the arithmetic task's test problems as the embedded default builds them (seed 257,
`--n-test` of them). Both engines serve the same float32 weights. Nothing is asserted
here: the test reads the report, so a failure shows the numbers.

Report:
- greedy: per prompt, whether vLLM's greedy tokens equal JaxEngine's, and for the first
  that differ: the position, both tokens, and the gap between their logits under our
  forward pass (a near tie decided by float rounding shows as a gap near 0);
- logprob_err: the largest |vLLM's sampled-token log-prob - ours| (our forward pass on
  prompt + sampled completion, raw distribution) for the base weights, after an in-memory
  sync of perturbed weights, and after a folder sync of other weights;
- same_draws: the same seeded call twice gives the same tokens; resumed_draws: a new
  engine synced to the same weights draws them again; sync: each SyncReport.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_default_matmul_precision", "highest")

from fem_jax.models import from_pretrained, resolve  # noqa: E402
from fem_jax.models.transformer import token_logps  # noqa: E402
from fem_jax.rollout import JaxEngine, Weights  # noqa: E402
from fem_jax.rollout.engine import encode_prompt  # noqa: E402
from fem_jax.rollout.vllm_engine import VllmEngine  # noqa: E402
from fem_jax.tasks import get_task  # noqa: E402


def our_logps(model_cfg, params, prompt_ids: list[int], completion: list[int]) -> np.ndarray:
    """log p(completion[j] | prompt, completion[:j]) under the raw distribution, ours."""
    ids = jnp.asarray([prompt_ids + completion], jnp.int32)
    lp = token_logps(model_cfg, params, ids)[0]
    return np.asarray(lp[len(prompt_ids) - 1: len(prompt_ids) - 1 + len(completion)])


def our_logits(model, prompt_ids: list[int], prefix: list[int]) -> np.ndarray:
    ids = jnp.asarray([prompt_ids + prefix], jnp.int32)
    return np.asarray(model(ids)[0, -1])


def logprob_err(engine, model_cfg, params, tok, prompts, seed: int) -> tuple[float, list]:
    outs = engine.generate(prompts, n=2, temperature=0.7, max_new_tokens=12, seed=seed)
    err = 0.0
    for p, row in zip(prompts, outs):
        pid = encode_prompt(tok, p)
        for s in row:
            if s.token_ids:
                err = max(err, float(np.max(np.abs(np.asarray(s.logprobs) - our_logps(model_cfg, params, pid,
                                                                                         s.token_ids)))))
    return err, [[s.token_ids for s in row] for row in outs]


def greedy_report(vllm_engine, jax_engine, model, tok, prompts, max_new: int) -> list[dict]:
    got = vllm_engine.generate(prompts, temperature=0.0, max_new_tokens=max_new)
    want = jax_engine.generate(prompts, temperature=0.0, max_new_tokens=max_new)
    rows = []
    for p, g, w in zip(prompts, got, want):
        a, b = g[0].token_ids, w[0].token_ids
        row = {"equal": a == b, "vllm": a, "jax": b}
        if a != b:
            j = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            logits = our_logits(model, encode_prompt(tok, p), b[:j])
            ta = a[j] if j < len(a) else None
            tb = b[j] if j < len(b) else None
            row.update(position=j, vllm_token=ta, jax_token=tb,
                       logit_gap=None if ta is None or tb is None else float(logits[tb] - logits[ta]))
        rows.append(row)
    return rows


def perturbed(params: dict, seed: int, scale: float) -> dict:
    keys = jax.random.split(jax.random.PRNGKey(seed), len(params))
    return {k: v + scale * jnp.std(v) * jax.random.normal(kk, v.shape, v.dtype)
            for kk, (k, v) in zip(keys, sorted(params.items()))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--n-test", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=12)
    ap.add_argument("--quick", action="store_true", help="greedy parity only")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    folder = resolve(args.model)
    tok = AutoTokenizer.from_pretrained(folder)
    model = from_pretrained(folder, dtype="float32")
    cfg = model.cfg
    options = {"n_train": 0, "n_test": args.n_test}
    if args.model == "tiny-arith-llama":
        options.update(operands="2", min_value=0, max_value=9)
    task = get_task("arithmetic", seed=257, **options)
    prompts = [task.messages(ex, hint=None) for ex in task.load("test")]
    report: dict = {"model": args.model, "prompts": len(prompts)}
    engine = VllmEngine(folder, tok, dtype="float32", seed=0, kv_cache_gb=0.5, max_model_len=1024, verify=False)
    report["in_process"] = engine.in_process
    ours = JaxEngine(model, tok)
    report["greedy"] = greedy_report(engine, ours, model, tok, prompts, args.max_new_tokens)
    if args.quick:
        Path(args.out).write_text(json.dumps(report))
        return
    base = model.param_dict()
    few = prompts[:4]
    report["logprob_err"] = {"base": logprob_err(engine, cfg, base, tok, few, seed=3)[0]}
    a = engine.generate(few, n=3, temperature=1.0, max_new_tokens=10, seed=11)
    b = engine.generate(few, n=3, temperature=1.0, max_new_tokens=10, seed=11)
    c = engine.generate(few, n=3, temperature=1.0, max_new_tokens=10, seed=12)
    toks = lambda outs: [[s.token_ids for s in row] for row in outs]  # noqa: E731
    report["same_draws"] = toks(a) == toks(b)
    report["other_seed_differs"] = toks(a) != toks(c)
    report["prompts_differ_in_stream"] = len({tuple(r[0]) for r in toks(a)}) > 1

    tmp = Path(tempfile.mkdtemp())
    hf = cfg.to_hf_config("float32")
    p1 = perturbed(base, 1, 0.05)
    w1 = Weights(round=1, params=p1, checkpoints=None, saved=False, export_dir=tmp / "r1", model_config=hf,
                 tokenizer_from=folder)
    report["sync"] = {"memory": dataclasses.asdict(engine.sync(w1))}
    report["logprob_err"]["memory"], draws1 = logprob_err(engine, cfg, p1, tok, few, seed=5)
    model.set_params(p1)
    ours.update(p1)
    report["greedy_memory"] = [r["equal"] for r in greedy_report(engine, ours, model, tok, few, args.max_new_tokens)]

    p2 = perturbed(base, 2, 0.05)
    engine.sync_method = "folder"
    w2 = dataclasses.replace(w1, round=2, params=p2, export_dir=tmp / "r2")
    report["sync"]["folder"] = dataclasses.asdict(engine.sync(w2))
    report["logprob_err"]["folder"] = logprob_err(engine, cfg, p2, tok, few, seed=5)[0]
    engine.sync_method = "auto"
    engine.sync(w1)  # back to p1: the same draws as before
    report["back_draws"] = logprob_err(engine, cfg, p1, tok, few, seed=5)[1] == draws1
    engine.shutdown()
    del engine
    fresh = VllmEngine(folder, tok, dtype="float32", seed=0, kv_cache_gb=0.5, max_model_len=1024, verify=False)  # a resumed run's
    fresh.sync(w1)
    report["resumed_draws"] = logprob_err(fresh, cfg, p1, tok, few, seed=5)[1] == draws1
    Path(args.out).write_text(json.dumps(report))


if __name__ == "__main__":
    sys.exit(main())
