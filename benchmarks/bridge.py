"""The orbax -> Hugging Face bridge: export speed and peak host memory.

    python benchmarks/bridge.py [--out DIR] [--param-dtype float32] [--layers 24] [--keep]

A random model of Qwen2.5-0.5B's shape (hidden 896, MLP 4864, 24 layers, 14 heads, 2 KV
heads, vocab 151936, tied embeddings, qkv bias) is saved as an orbax checkpoint (float32
master weights by default, as the M-step keeps them), then each operation runs in a fresh
subprocess that reports its own wall time and peak RSS (resource.getrusage ru_maxrss)
and its RSS before the operation (imports done), so that "over base" is what the
operation itself cost:

- export_hf -> bfloat16 safetensors (2 GB shards), streamed from TensorStore;
- verify_export (sizes + sha256 of every file, what VllmEngine does before loading one);
- a non-streaming baseline: restore the whole checkpoint, then models.hf.save_pretrained;
- import_hf (HF -> orbax; loads the model whole by design).

Loading an export into vLLM, against the in-memory sync that needs no export:
benchmarks/sync.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import QWEN25_05B_SHAPE as QWEN25_05B  # noqa: E402

PRELUDE = """
import json, os, resource, sys, time
from pathlib import Path
def rss_mb():  # current RSS
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
def report(**kw):
    kw["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(kw))
args = json.loads(sys.argv[1])
"""

SAVE = """
import jax, jax.numpy as jnp, numpy as np
from fem_jax.checkpoint import Checkpointer
from fem_jax.models import ModelConfig, param_shapes
cfg = ModelConfig.from_hf_config(args["config"])
dt = jnp.dtype(args["param_dtype"])
key = jax.random.PRNGKey(0)
params = {k: (0.02 * jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32)).astype(dt)
          for i, (k, (shape, _)) in enumerate(sorted(param_shapes(cfg).items()))}
nbytes = sum(v.nbytes for v in params.values())
base = rss_mb(); t = time.perf_counter()
Checkpointer(args["ckpt"]).save(0, params, meta={"model_config": cfg.to_hf_config()})
report(op="orbax save", seconds=time.perf_counter() - t, base_mb=base, gb=nbytes / 1e9)
"""

EXPORT = """
from fem_jax.checkpoint import export_hf
import tensorstore
base = rss_mb(); t = time.perf_counter()
out = export_hf(args["ckpt"], args["dst"], dtype="bfloat16", max_shard_bytes=2 * 10**9)
gb = sum(f.stat().st_size for f in Path(out).glob("*.safetensors")) / 1e9
report(op="export_hf (streamed, bf16)", seconds=time.perf_counter() - t, base_mb=base, gb=gb)
"""

VERIFY = """
from fem_jax.checkpoint import verify_export
base = rss_mb(); t = time.perf_counter()
verify_export(args["dst"])
gb = sum(f.stat().st_size for f in Path(args["dst"]).iterdir()) / 1e9
report(op="verify_export (sha256)", seconds=time.perf_counter() - t, base_mb=base, gb=gb)
"""

BASELINE = """
import jax
from fem_jax.checkpoint import Checkpointer
from fem_jax.models import ModelConfig, param_shapes, Transformer
from fem_jax.models.hf import save_pretrained
from flax import nnx
ck = Checkpointer(args["ckpt"], create=False)
cfg = ModelConfig.from_hf_config(ck.restore_meta(0)["model_config"])
dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
meta = ck.restore_meta(0)["_fem"]["params"]
like = {k: jax.ShapeDtypeStruct(tuple(v["shape"]), v["dtype"], sharding=dev) for k, v in meta.items()}
base = rss_mb(); t = time.perf_counter()
params, _, _ = ck.restore(0, like)
model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
save_pretrained(model, args["dst2"], dtype="bfloat16", max_shard_bytes=2 * 10**9, params=params)
gb = sum(f.stat().st_size for f in Path(args["dst2"]).glob("*.safetensors")) / 1e9
report(op="restore + save_pretrained (whole model)", seconds=time.perf_counter() - t, base_mb=base, gb=gb)
"""

IMPORT = """
from fem_jax.checkpoint import import_hf
base = rss_mb(); t = time.perf_counter()
import_hf(args["dst"], args["ckpt2"], dtype="float32")
report(op="import_hf (HF -> orbax f32)", seconds=time.perf_counter() - t, base_mb=base,
       gb=sum(f.stat().st_size for f in Path(args["dst"]).glob("*.safetensors")) / 1e9)
"""


def run(code: str, args: dict) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(PRELUDE) + textwrap.dedent(code), json.dumps(args)],
                       capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"benchmark step failed:\n{r.stderr[-4000:]}")
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--param-dtype", default="float32", help="dtype of the saved training weights")
    ap.add_argument("--layers", type=int, default=24, help="number of layers (24: Qwen2.5-0.5B)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    a = ap.parse_args(argv)
    work = a.out or Path(tempfile.mkdtemp(prefix="fem_bridge_"))
    work.mkdir(parents=True, exist_ok=True)
    cfg = dict(QWEN25_05B, num_hidden_layers=a.layers)
    args = {"config": cfg, "param_dtype": a.param_dtype, "ckpt": str(work / "ck"), "dst": str(work / "hf"),
            "dst2": str(work / "hf_baseline"), "ckpt2": str(work / "ck_import")}
    for k in ("ckpt", "dst", "dst2", "ckpt2"):
        shutil.rmtree(args[k], ignore_errors=True)
    rows = []
    try:
        for code in (SAVE, EXPORT, VERIFY, BASELINE, IMPORT):
            rows.append(run(code, args))
            print(f"  done: {rows[-1]['op']}", file=sys.stderr)
    finally:
        if not a.keep and a.out is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\nQwen2.5-0.5B shape ({a.layers} layers), {a.param_dtype} checkpoint, CPU only "
          f"({os.cpu_count()} cores)\n")
    print("| operation | seconds | GB | s/GB | peak RSS MB | base RSS MB | peak over base MB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['op']} | {r['seconds']:.2f} | {r['gb']:.3f} | {r['seconds'] / r['gb']:.2f} | "
              f"{r['peak_mb']:.0f} | {r['base_mb']:.0f} | {r['peak_mb'] - r['base_mb']:.0f} |")
    print("\nInto a running vLLM (export + reload against the in-memory sync, SmolLM2-135M): "
          "python benchmarks/sync.py; each round's share is in its metrics (seconds_sync / seconds_round).")

if __name__ == "__main__":
    main()
