"""The GPU path in one run: M-step MFU per remat policy, and JaxEngine against
transformers' generate on the same GPU.

    python benchmarks/gpu.py [--models Qwen2.5-0.5B,Qwen2.5-1.5B] [--remat none,full,dots_saveable]
                             [--batch 16] [--micro 8] [--seq 1024] [--steps 3]
                             [--rows 64,256] [--new-tokens 256] [--peak-tflops X] [--json FILE]
    python benchmarks/gpu.py --dry-run     # a tiny model on whatever jax sees (CPU): every code path

Prints a header (device, jax/jaxlib/flax/transformers/torch versions), then:

- M-step: Qwen2.5-0.5B and 1.5B shapes with random weights in bfloat16, one optimizer step
  = `--batch` sequences of `--seq` tokens in micro-batches of `--micro`, through the public
  M-step (fem_jax.mstep.Trainer, via benchmarks/mesh.py's setup, `fsdp=<all GPUs>`), for
  each remat policy: compile s (first step), step s (median of `--steps`), tokens/s, MFU =
  6·N·tokens/s / peak bf16 FLOP/s (mesh.py's formula: N the matmul parameters, attention
  scores left out) and the device's peak memory (`memory_stats()['peak_bytes_in_use']`);
  each policy runs in its own process, so each peak is its own.
- Rollout: JaxEngine on the same shapes (random bfloat16 weights), `--rows` rows of
  random-token prompts (32 to 128 tokens) in one batch, `--new-tokens` tokens each, EOS off,
  sampling at temperature 0.7 (top-p off: random weights give a flat distribution, which
  would time the rare nucleus fallback instead of the usual path): tokens/s of a steady
  call, the first call's compile seconds (first call minus a steady one), against
  transformers' `generate` (bfloat16, the same prompts left-padded, min_new_tokens = max)
  on the same GPU; ratio = ours / transformers.

Without a GPU (CI) it says so and exits 0; `--dry-run` runs a tiny model on the CPU
through every code path above (tests/test_gpu_benchmark.py runs it), so the script
cannot rot unnoticed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import mesh  # noqa: E402

SCRIPT = str(Path(__file__).resolve())

MODELS = {name: {**common.QWEN25_05B_SHAPE, **shape, "tie_word_embeddings": True}
          for name, shape in mesh.QWEN.items()}
TINY = {**common.QWEN25_05B_SHAPE, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}
MODEL_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "model_type", "tie_word_embeddings")


def _ours_shape(hf: dict) -> dict:
    return {k: hf[k] for k in MODEL_FIELDS}


def _prompts(rows: int, vocab: int, lo: int, hi: int, seed: int = 0) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(rows)]


class IdTokenizer:
    """Prompts are whitespace-separated token ids: no tokenizer files needed."""

    eos_token_id = None
    pad_token_id = 0

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [int(x) for x in text.split()]}

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


# --------------------------------------------------------------------------- children

def _device_info() -> dict:
    import jax

    d = jax.devices()[0]
    return {"platform": d.platform, "device": getattr(d, "device_kind", d.platform), "count": len(jax.devices())}


def _peak_gb(device) -> float | None:
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    return None if not stats else round(stats.get("peak_bytes_in_use", 0) / 2**30, 2)


def child_mstep(spec: dict) -> None:
    import jax

    info = _device_info()
    if info["platform"] != "gpu" and not spec["dry"]:
        return common.report(info=info, rows=[])
    rows = []
    peak = mesh._peak_tflops(info["device"], spec["peak_tflops"]) if info["platform"] == "gpu" else None
    for remat in spec["remats"]:
        row = {"model": spec["model"], "remat": remat, "batch": spec["batch"], "micro": spec["micro"],
               "seq": spec["seq"]}
        try:
            _, tr, b, n = mesh._setup(_ours_shape(spec["shape"]), spec["batch"], spec["micro"], spec["seq"],
                                      "bfloat16", f"fsdp={info['count']}", remat=remat)
            first, times = mesh._time_steps(tr, b, spec["steps"])
        except Exception as e:  # out of memory, or a policy the M-step refuses: keep the other rows
            rows.append({**row, "error": f"{type(e).__name__}: {str(e)[:300]}"})
            continue
        step = statistics.median(times)
        tokens = spec["batch"] * spec["seq"]
        flops = 6 * n * tokens / step / info["count"]
        rows.append({**row, "params": n, "compile_s": round(first - step, 1), "step_s": round(step, 4),
                     "tokens_per_s": round(tokens / step), "tflops_per_device": round(flops / 1e12, 2),
                     "mfu": None if peak is None else round(flops / (peak * 1e12), 3),
                     "peak_gb": _peak_gb(jax.devices()[0])})
        del tr
    common.report(info=info, rows=rows)


def child_ours(spec: dict) -> None:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from fem_jax.models.transformer import ModelConfig, Transformer
    from fem_jax.rollout import JaxEngine

    cfg = ModelConfig(**{"qkv_bias": True, **_ours_shape(spec["shape"])})
    model = Transformer(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    rows = []
    for n_rows in spec["rows"]:
        prompts = [" ".join(map(str, p)) for p in _prompts(n_rows, cfg.vocab_size, *spec["prompt_len"])]
        engine = JaxEngine(model, IdTokenizer(), max_batch=n_rows, eos_token_ids=[])
        kw = dict(n=1, temperature=spec["temperature"], top_p=1.0, max_new_tokens=spec["new_tokens"])
        times, counts = [], []
        for seed in range(1 + spec["runs"]):
            t = time.perf_counter()
            outs = engine.generate(prompts, seed=seed, **kw)
            times.append(time.perf_counter() - t)
            counts.append(sum(len(s.token_ids) for o in outs for s in o))
        assert all(c == n_rows * spec["new_tokens"] for c in counts), counts
        steady = statistics.median(times[1:])
        rows.append({"rows": n_rows, "tok_s": round(n_rows * spec["new_tokens"] / steady, 1),
                     "first_s": round(times[0], 1), "compile_s": round(times[0] - steady, 1),
                     "compilations": engine.compilations, "chunk": engine.chunk, "kv_buckets": engine.kv_buckets,
                     "peak_gb": _peak_gb(jax.devices()[0])})
    common.report(rows=rows)


def child_hf(spec: dict) -> None:
    import torch
    import transformers

    gpu = torch.cuda.is_available()
    if not gpu and not spec["dry"]:
        return common.report(rows=[], error="torch sees no CUDA device")
    dev = torch.device("cuda" if gpu else "cpu")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(common.hf_config(spec["shape"]), dtype=torch.bfloat16)
    model = model.to(dev).eval()
    rows = []
    for n_rows in spec["rows"]:
        ids = _prompts(n_rows, spec["shape"]["vocab_size"], *spec["prompt_len"])
        width = max(map(len, ids))
        input_ids = torch.zeros((n_rows, width), dtype=torch.long)
        mask = torch.zeros((n_rows, width), dtype=torch.long)
        for r, x in enumerate(ids):  # left padding
            input_ids[r, width - len(x):] = torch.tensor(x)
            mask[r, width - len(x):] = 1
        input_ids, mask = input_ids.to(dev), mask.to(dev)
        n = spec["new_tokens"]

        def call(seed, new):
            torch.manual_seed(seed)
            if gpu:
                torch.cuda.synchronize()
            t = time.perf_counter()
            with torch.no_grad():
                out = model.generate(input_ids=input_ids, attention_mask=mask, do_sample=True,
                                     temperature=spec["temperature"], top_p=1.0, top_k=0, max_new_tokens=new,
                                     min_new_tokens=new, pad_token_id=0, eos_token_id=1)
            if gpu:
                torch.cuda.synchronize()
            assert out.shape[1] - width == new, (out.shape, width, new)
            return time.perf_counter() - t

        call(0, 4)  # warm-up
        times = [call(1 + r, n) for r in range(spec["runs"])]
        rows.append({"rows": n_rows, "tok_s": round(n_rows * n / statistics.median(times), 1),
                     "peak_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if gpu else None})
    common.report(rows=rows)


def child(spec: dict) -> None:
    {"mstep": child_mstep, "ours": child_ours, "hf": child_hf}[spec["kind"]](spec)


# --------------------------------------------------------------------------- parent

def _versions() -> str:
    out = []
    for pkg in ("jax", "jaxlib", "flax", "transformers", "torch"):
        try:
            out.append(f"{pkg} {version(pkg)}")
        except PackageNotFoundError:
            out.append(f"{pkg} -")
    return ", ".join(out)


def _run(spec: dict, timeout: float) -> dict:
    try:
        return common.run_child(SCRIPT, spec, timeout=timeout, platforms=None)
    except Exception as e:  # a child that died (e.g. out of memory): one error row, the rest goes on
        return {"rows": [], "error": f"{type(e).__name__}: {str(e)[-300:]}"}


def _cell(v) -> str:
    return "n/a" if v is None else str(v)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated, from " + ", ".join(MODELS))
    ap.add_argument("--remat", default="none,full,dots_saveable", help="M-step remat policies (comma-separated)")
    ap.add_argument("--batch", type=int, default=16, help="M-step: sequences per optimizer step")
    ap.add_argument("--micro", type=int, default=8, help="M-step: sequences per micro-batch")
    ap.add_argument("--seq", type=int, default=1024, help="M-step: tokens per sequence")
    ap.add_argument("--steps", type=int, default=3, help="M-step: timed steps after the compiling one")
    ap.add_argument("--rows", default="64,256", help="rollout: rows per generate call (comma-separated)")
    ap.add_argument("--new-tokens", type=int, default=256, help="rollout: tokens generated per row")
    ap.add_argument("--runs", type=int, default=1, help="rollout: timed calls per side after the first")
    ap.add_argument("--peak-tflops", type=float, default=None, help="peak bf16 TFLOP/s per device (MFU)")
    ap.add_argument("--skip", choices=["mstep", "rollout"], action="append", default=[], help="leave a table out")
    ap.add_argument("--dry-run", action="store_true",
                    help="a tiny model on any backend (CPU): every code path, seconds, numbers meaningless")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per child process")
    ap.add_argument("--json", type=Path, default=None, help="also write the raw rows here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child is not None:
        child(json.loads(a.child))
        return 0
    remats = [r for r in a.remat.split(",") if r]
    rows = [int(x) for x in a.rows.split(",") if x]
    if a.dry_run:
        models = {"tiny": TINY}
        a.batch, a.micro, a.seq, a.steps, a.new_tokens = 4, 2, 32, 1, 8
        rows, prompt_len = [4], (3, 9)
    else:
        unknown = [m for m in a.models.split(",") if m not in MODELS]
        if unknown:
            raise SystemExit(f"--models: unknown {unknown}; choose from {', '.join(MODELS)}")
        models = {m: MODELS[m] for m in a.models.split(",")}
        prompt_len = (32, 128)
    base = {"dry": a.dry_run, "batch": a.batch, "micro": a.micro, "seq": a.seq, "steps": a.steps,
            "peak_tflops": a.peak_tflops, "new_tokens": a.new_tokens, "runs": a.runs, "temperature": 0.7,
            "prompt_len": prompt_len}
    out: dict = {"mstep": [], "rollout": []}

    # M-step: one process per policy on a GPU (each peak its own); the dry run groups them
    groups = [remats] if a.dry_run else [[r] for r in remats]
    info = None
    for name, shape in models.items():
        for g in groups if "mstep" not in a.skip else []:
            res = _run({**base, "kind": "mstep", "model": name, "shape": shape, "remats": g}, a.timeout)
            info = info or res.get("info")
            if info and info["platform"] != "gpu" and not a.dry_run:
                print(f"No GPU: jax sees {info['platform']} x{info['count']}; nothing measured "
                      f"(--dry-run runs a tiny model through every code path). {_versions()}")
                return 0
            out["mstep"] += res.get("rows") or [{"model": name, "remat": ",".join(g), "error": res.get("error")}]
    if info is None:  # the M-step was skipped: ask a child what it sees
        info = _run({**base, "kind": "mstep", "model": "-", "shape": TINY, "remats": []}, a.timeout).get("info")
        if info and info["platform"] != "gpu" and not a.dry_run:
            print(f"No GPU: jax sees {info['platform']}; nothing measured (--dry-run for a tiny run). {_versions()}")
            return 0

    if "rollout" not in a.skip:
        for name, shape in models.items():
            for g in [rows] if a.dry_run else [[r] for r in rows]:
                ours = _run({**base, "kind": "ours", "shape": shape, "rows": g}, a.timeout)
                hf = _run({**base, "kind": "hf", "shape": shape, "rows": g}, a.timeout)
                hf_by = {r["rows"]: r for r in hf.get("rows", [])}
                for r in ours.get("rows") or [{"rows": ",".join(map(str, g)), "error": ours.get("error")}]:
                    h = hf_by.get(r["rows"], {})
                    ratio = round(r["tok_s"] / h["tok_s"], 2) if "tok_s" in r and h.get("tok_s") else None
                    out["rollout"].append({"model": name, **r, "hf_tok_s": h.get("tok_s"), "ratio": ratio,
                                           "hf_peak_gb": h.get("peak_gb"), "hf_error": hf.get("error")})

    dev = "?" if info is None else f"{info['device']} x{info['count']} ({info['platform']})"
    print(f"# GPU benchmark{' (DRY RUN: tiny model, numbers meaningless)' if a.dry_run else ''}\n")
    print(f"Device: {dev}; {_versions()}\n")
    if out["mstep"]:
        print(f"## M-step: bfloat16, {a.batch} x {a.seq} tokens per step, micro-batch {a.micro}, "
              f"median of {a.steps} step(s)\n")
        print("| model | remat | compile s | step s | tokens/s | TFLOP/s/dev | MFU | peak GB | error |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---|")
        for r in out["mstep"]:
            print(f"| {r['model']} | {r['remat']} | {_cell(r.get('compile_s'))} | {_cell(r.get('step_s'))} | "
                  f"{_cell(r.get('tokens_per_s'))} | {_cell(r.get('tflops_per_device'))} | {_cell(r.get('mfu'))} | "
                  f"{_cell(r.get('peak_gb'))} | {r.get('error') or ''} |")
        print()
    if out["rollout"]:
        print(f"## Rollout: bfloat16, {a.new_tokens} new tokens per row, EOS off, temperature 0.7, top-p off; "
              f"ours vs transformers generate on the same device\n")
        print("| model | rows | ours tok/s | transformers tok/s | ratio | ours first call s | ours compile s "
              "| compilations | decode chunk | kv buckets | ours peak GB | transformers peak GB | error |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---|")
        for r in out["rollout"]:
            err = "; ".join(e for e in (r.get("error"), r.get("hf_error")) if e)
            print(f"| {r['model']} | {r['rows']} | {_cell(r.get('tok_s'))} | {_cell(r.get('hf_tok_s'))} | "
                  f"{_cell(r.get('ratio'))} | {_cell(r.get('first_s'))} | {_cell(r.get('compile_s'))} | "
                  f"{_cell(r.get('compilations'))} | {_cell(r.get('chunk'))} | {_cell(r.get('kv_buckets'))} | "
                  f"{_cell(r.get('peak_gb'))} | {_cell(r.get('hf_peak_gb'))} | {err} |")
        print()
    if a.json:
        a.json.write_text(json.dumps({"info": info, **out}, indent=1))
    failed = [r for r in out["mstep"] + out["rollout"] if r.get("error")]
    return 1 if a.dry_run and failed else 0


if __name__ == "__main__":
    sys.exit(main())
