"""Convert between our orbax checkpoints and Hugging Face folders.

    python -m fem_jax.convert SRC DST [--dtype bfloat16] [--step N] [--max-shard-size 2GB]

The direction follows from what SRC holds:
- a Hugging Face folder (config.json + safetensors) -> an orbax checkpoint root DST
  (step --step, default 0; parameters kept in float32 unless --dtype says otherwise);
- an orbax checkpoint root or one step folder of it -> a Hugging Face folder DST
  (--dtype, default bfloat16; the latest step unless --step), streamed shard by shard,
  with a manifest.json that readers verify. The step is checked against its own manifest
  (fem_manifest.json) first: a corrupt or unsealed step is refused.

User errors (a corrupt or unsealed step, a missing file, a bad config) end with one line,
`python -m fem_jax.convert: error: ...` naming the file, and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .checkpoint import export_hf, import_hf, is_checkpoint, parse_size
from .io import CorruptError


def _is_hf(p: Path) -> bool:
    return (p / "config.json").exists() and (
        (p / "model.safetensors").exists() or (p / "model.safetensors.index.json").exists())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fem_jax.convert", description=__doc__.split("\n\n")[0])
    ap.add_argument("src", type=Path, help="a Hugging Face folder, or an orbax checkpoint root / step folder")
    ap.add_argument("dst", type=Path, help="output: an orbax root (from HF) or a Hugging Face folder (from orbax)")
    ap.add_argument("--dtype", default=None,
                    help="orbax->HF: float32|bfloat16|float16 (default bfloat16); HF->orbax: default float32")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (orbax->HF: default latest; "
                                                          "HF->orbax: default 0)")
    ap.add_argument("--max-shard-size", default="2GB", help="orbax->HF: safetensors shard size, e.g. 2GB, 500MB")
    ap.add_argument("--tokenizer-from", default=None, type=Path,
                    help="orbax->HF: copy tokenizer files from this folder instead of the checkpoint meta's")
    a = ap.parse_args(argv)
    if not a.src.exists():
        ap.error(f"SRC {a.src}: not found")
    try:
        shard = parse_size(a.max_shard_size)
    except ValueError as e:
        ap.error(f"--max-shard-size: {e}")
    try:
        return _convert(ap, a, shard)
    except (CorruptError, FileNotFoundError, KeyError, ValueError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"{ap.prog}: error: {' '.join(str(msg).split())}", file=sys.stderr)
        return 2


def _convert(ap: argparse.ArgumentParser, a: argparse.Namespace, shard: int) -> int:
    t0 = time.perf_counter()
    if _is_hf(a.src):
        if a.dst.exists() and any(a.dst.iterdir()) and not is_checkpoint(a.dst):
            ap.error(f"DST {a.dst}: exists and is not an orbax checkpoint root")
        import_hf(a.src, a.dst, step=0 if a.step is None else a.step, dtype=a.dtype or "float32")
        print(f"{a.src} -> orbax {a.dst} step {0 if a.step is None else a.step} "
              f"({time.perf_counter() - t0:.1f} s)")
    elif is_checkpoint(a.src):
        out = export_hf(a.src, a.dst, step=a.step, dtype=a.dtype or "bfloat16", max_shard_bytes=shard,
                        tokenizer_from=a.tokenizer_from)
        print(f"orbax {a.src} -> {out} ({time.perf_counter() - t0:.1f} s)")
    else:
        ap.error(f"SRC {a.src}: neither a Hugging Face folder (config.json + model.safetensors[.index.json]) "
                 "nor an orbax checkpoint (<step>/params)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
