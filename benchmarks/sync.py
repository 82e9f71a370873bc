"""Trained weights into a running vLLM: through a Hugging Face export vs from memory, in one run.

    python benchmarks/sync.py [--dtypes float32,bfloat16] [--repeats 3] [--threads N]

SmolLM2-135M-Instruct's float32 weights (the trainer's master weights, as JAX arrays)
go into one VllmEngine (vLLM's engine core and worker in this process), serving in each of
`--dtypes`, by the two ways the loop has (fem_jax.rollout.vllm_engine):
- folder: the round's orbax checkpoint is exported to a Hugging Face folder (export_hf,
  streamed, checksummed: what the loop does when the round was saved), verified against
  its manifest, and streamed into vLLM's in-place reload;
- memory: the same arrays streamed into the same reload as zero-copy torch views (dlpack),
  no file written.
Each is timed `--repeats` times (median; the seconds the loop records: seconds_export,
seconds_load). After each, vLLM's greedy tokens on 4 test prompts are checked to equal those
after the first sync (the same weights every time), so a fast but wrong load cannot pass.
The loop records the same seconds in every round's metrics (sync_method, seconds_export,
seconds_load, seconds_sync): a run's share of a round is seconds_sync / seconds_round there.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SCRIPT = str(Path(__file__).resolve())


def child(spec: dict) -> None:
    common.pin_threads(spec["threads"])
    import dataclasses

    from transformers import AutoTokenizer

    from fem_jax.checkpoint import Checkpointer
    from fem_jax.models import from_pretrained
    from fem_jax.rollout import Weights
    from fem_jax.rollout.vllm_engine import VllmEngine
    from fem_jax.tasks import get_task

    folder = spec["folder"]
    tok = AutoTokenizer.from_pretrained(folder)
    model = from_pretrained(folder, dtype="float32")
    params = model.param_dict()
    hf = model.cfg.to_hf_config("float32")
    tmp = Path(tempfile.mkdtemp(prefix="fem_jax_sync_"))
    ck = Checkpointer(tmp / "checkpoints")
    ck.save(1, params, meta={"model_config": hf, "tokenizer_from": folder})
    ck.close()
    task = get_task("arithmetic", seed=257, n_train=0, n_test=4)
    prompts = [task.messages(ex, hint=None) for ex in task.load("test")]
    t = time.perf_counter()
    eng = VllmEngine(folder, tok, dtype=spec["dtype"], seed=0, kv_cache_gb=0.5, max_model_len=1024, verify=False)
    start_s = time.perf_counter() - t
    weights = Weights(round=1, params=params, checkpoints=tmp / "checkpoints", saved=True, export_dir=tmp / "hf",
                      model_config=hf, tokenizer_from=folder)
    greedy = lambda: [o[0].token_ids for o in eng.generate(prompts, temperature=0.0, max_new_tokens=16)]  # noqa: E731
    want = None
    out = {"start_s": start_s, "memory": [], "folder": []}
    for _ in range(spec["repeats"]):
        for how in ("folder", "memory"):
            eng.sync_method = how
            report = eng.sync(dataclasses.replace(weights, export_dir=tmp / f"hf-{len(out[how])}"))
            assert report.method == how and not report.fallback, report
            got = greedy()
            want = want or got
            assert got == want, f"{how}: other greedy tokens after a sync of the same weights"
            out[how].append(report.metrics())
    common.report(**out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtypes", default="float32,bfloat16", help="vLLM's dtypes, comma-separated")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="CPUs (default: all)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child is not None:
        return child(json.loads(a.child))
    threads = a.threads or len(os.sched_getaffinity(0))
    try:
        folder = common.run_child(str(Path(__file__).resolve().parent / "rollout.py"),
                                  {"kind": "smollm2", "work": ".", "allow_random": False})["folder"]
    except RuntimeError as e:
        raise SystemExit(f"the sync benchmark needs the real SmolLM2-135M-Instruct: {e}")
    print(f"\n## Weights into vLLM: SmolLM2-135M-Instruct, float32 trainer weights\n\n{common.machine_line(threads)}; "
          f"median of {a.repeats} syncs each, greedy tokens checked after every one.\n")
    print("| vLLM dtype | way | export s | load s | total s | vs memory |")
    print("|---|---|---:|---:|---:|---:|")
    for dtype in a.dtypes.split(","):
        r = common.run_child(SCRIPT, {"folder": folder, "dtype": dtype, "threads": threads, "repeats": a.repeats},
                             timeout=3600)
        med = {how: {k: common.median([m[k] for m in r[how]]) for k in ("seconds_export", "seconds_load",
                                                                         "seconds_sync")} for how in ("folder", "memory")}
        for how in ("folder", "memory"):
            m = med[how]
            print(f"| {dtype} | {how} | {m['seconds_export']:.2f} | {m['seconds_load']:.2f} | {m['seconds_sync']:.2f} | "
                  f"{m['seconds_sync'] / med['memory']['seconds_sync']:.1f}x |")
    note = common.load_note()
    if note:
        print("\n" + note)


if __name__ == "__main__":
    main()
