"""Flax nnx ports of Llama 3.x and Qwen2/2.5, with Hugging Face load and save.

`resolve(name_or_path)` turns a model name into a Hugging Face folder, once for the whole
package: a folder as it is, a builtin name (`smollm2-135m-instruct`, `tiny-random-llama`,
`tiny-random-qwen2`, `tiny-arith-llama`) built into `cache_dir()` on first use. `from_pretrained` here takes
either; `hf.from_pretrained` takes folders only.
"""

from __future__ import annotations

import os

from . import hf
from .builtin import cache_dir, resolve
from .hf import save_pretrained
from .transformer import ModelConfig, Transformer, forward, init_cache, param_shapes

__all__ = ["ModelConfig", "Transformer", "cache_dir", "forward", "from_pretrained", "init_cache", "param_shapes",
           "resolve", "save_pretrained"]


def from_pretrained(name_or_path: str | os.PathLike, dtype="float32", mesh=None) -> Transformer:
    """A Hugging Face folder or a builtin model name (see `resolve`) loaded into a Transformer;
    with `mesh`, each tensor lands directly in its shards (fem_jax.sharding's table)."""
    return hf.from_pretrained(resolve(name_or_path), dtype=dtype, mesh=mesh)
