"""How fast XLA runs the model's matmuls here, by dtype: is bfloat16 worth it on this machine?

    python benchmarks/cpu_dots.py                     # SmolLM2-135M's MLP shapes (576 -> 1536 -> 576)
    python benchmarks/cpu_dots.py --rows 6144,64 --d 896 --f 4864   # Qwen2.5-0.5B's

Times one MLP block (gate, up, down projections and SiLU) written three ways, each jitted,
at each row count (6,144 rows: a prefill of 128 prompts of 48 tokens or a training batch;
64: one decode step of a 64-row batch):
- `float32`: float32 in, float32 out, as the model computes in float32;
- `bfloat16`: bfloat16 in, bfloat16 out, a plain einsum (the model's weight matmuls on
  other backends, and on a CPU before `transformer.project`);
- `bfloat16, float32 out`: bfloat16 in, each product accumulated into float32
  (`preferred_element_type`) and rounded to bfloat16 after, as GPUs' bfloat16 matmuls do
  and as `transformer.project` computes on a CPU.
Prints GFLOP/s and each way's speed as a ratio to float32 in the same run. On a CPU whose
bfloat16 dot instructions XLA uses (AVX-512 BF16, AMX), the third way is the fast one;
the second may be no faster than float32.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def _mlp(out_dtype):
    import jax
    import jax.numpy as jnp

    def mm(spec, a, b):
        if out_dtype is None:
            return jnp.einsum(spec, a, b)
        return jnp.einsum(spec, a, b, preferred_element_type=out_dtype).astype(a.dtype)

    def f(h, wg, wu, wd):
        g, u = mm("btd,df->btf", h, wg), mm("btd,df->btf", h, wu)
        return mm("btf,fd->btd", jax.nn.silu(g) * u, wd)

    return jax.jit(f)


def _bf16_flags() -> str:
    """The CPU's bfloat16 instruction sets, from /proc/cpuinfo (Linux; else "unknown")."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return "unknown"
    have = [x for x in ("avx512_bf16", "amx_bf16") if x in flags]
    return ", ".join(have) or "none"


def _seconds(f, args, repeat: int) -> float:
    f(*args).block_until_ready()  # compile and warm up
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        f(*args).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="6144,64", help="comma-separated row counts (batch x tokens)")
    ap.add_argument("--d", type=int, default=576, help="hidden size")
    ap.add_argument("--f", type=int, default=1536, help="MLP size")
    ap.add_argument("--repeat", type=int, default=10, help="timed calls per case (the best is kept)")
    a = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp

    ways = [("float32", jnp.float32, None), ("bfloat16", jnp.bfloat16, None),
            ("bfloat16, float32 out", jnp.bfloat16, jnp.float32)]
    print(f"# MLP {a.d} -> {a.f} -> {a.d} · jax {jax.__version__} on {jax.devices()[0].platform}, "
          f"{os.cpu_count()} CPUs (bfloat16 instructions: {_bf16_flags()}) · best of {a.repeat}")
    print("| rows | way | ms | GFLOP/s | speed vs float32 |")
    print("|---:|---|---:|---:|---:|")
    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(0), 4)  # the same numbers in every case
    for rows in (int(r) for r in a.rows.split(",")):
        flops = 2 * rows * a.d * a.f * 3
        base = None
        for name, dtype, out in ways:
            args = (jax.random.normal(k1, (1, rows, a.d), dtype),
                    (jax.random.normal(k2, (a.d, a.f)) * 0.02).astype(dtype),
                    (jax.random.normal(k3, (a.d, a.f)) * 0.02).astype(dtype),
                    (jax.random.normal(k4, (a.f, a.d)) * 0.02).astype(dtype))
            s = _seconds(_mlp(out), args, a.repeat)
            base = base or s
            print(f"| {rows} | {name} | {s * 1e3:.2f} | {flops / s / 1e9:.0f} | {base / s:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
