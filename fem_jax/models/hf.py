"""Hugging Face checkpoints in and out: one name table, read tensor by tensor.

`from_pretrained` builds the module abstractly (no random init), then fills each
parameter one Hugging Face tensor at a time. On one device, each parameter starts as
zeros on the device and every layer (or block of embedding rows) is written into it in
place (a donated update): host memory holds one block beyond the model. With a mesh,
`jax.make_array_from_callback` reads each device's shard straight from the files. Each
read opens the safetensors file and closes it again, so the file's pages do not stay
mapped into the process.

`save_pretrained` walks the same table backwards, one layer tensor at a time, into
safetensors shards of bounded size, writes into a temporary folder and renames it.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from .transformer import ModelConfig, Transformer, param_shapes

# (Hugging Face name, our path, layout). `{i}` marks a per-layer tensor, stacked on our
# leading `layers` axis. Layouts: copy; T (transpose); in_heads: HF (n*h, d) -> ours
# (d, n, h); out_heads: HF (d, n*h) -> ours (n, h, d); heads: HF (n*h,) -> ours (n, h).
NAME_TABLE: tuple[tuple[str, str, str], ...] = (
    ("model.embed_tokens.weight", "embed", "copy"),
    ("model.norm.weight", "final_norm", "copy"),
    ("lm_head.weight", "lm_head", "T"),
    ("model.layers.{i}.input_layernorm.weight", "layers/attn_norm", "copy"),
    ("model.layers.{i}.self_attn.q_proj.weight", "layers/wq", "in_heads"),
    ("model.layers.{i}.self_attn.k_proj.weight", "layers/wk", "in_heads"),
    ("model.layers.{i}.self_attn.v_proj.weight", "layers/wv", "in_heads"),
    ("model.layers.{i}.self_attn.q_proj.bias", "layers/bq", "heads"),
    ("model.layers.{i}.self_attn.k_proj.bias", "layers/bk", "heads"),
    ("model.layers.{i}.self_attn.v_proj.bias", "layers/bv", "heads"),
    ("model.layers.{i}.self_attn.o_proj.weight", "layers/wo", "out_heads"),
    ("model.layers.{i}.self_attn.o_proj.bias", "layers/bo", "copy"),
    ("model.layers.{i}.post_attention_layernorm.weight", "layers/mlp_norm", "copy"),
    ("model.layers.{i}.mlp.gate_proj.weight", "layers/w_gate", "T"),
    ("model.layers.{i}.mlp.up_proj.weight", "layers/w_up", "T"),
    ("model.layers.{i}.mlp.down_proj.weight", "layers/w_down", "T"),
    ("model.layers.{i}.mlp.gate_proj.bias", "layers/b_gate", "copy"),
    ("model.layers.{i}.mlp.up_proj.bias", "layers/b_up", "copy"),
    ("model.layers.{i}.mlp.down_proj.bias", "layers/b_down", "copy"),
)

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
    "chat_template.json", "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json",
)

_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def np_dtype(dtype) -> np.dtype:
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype {dtype!r} is not supported ({', '.join(_DTYPES)})")
        return np.dtype(_DTYPES[dtype])
    return np.dtype(dtype)


def _to_ours(a: np.ndarray, layout: str, shape: tuple[int, ...]) -> np.ndarray:
    if layout == "copy":
        return a
    if layout == "T":
        return a.T
    if layout == "in_heads":
        return a.T.reshape(shape)
    if layout == "out_heads":
        return a.T.reshape(shape)
    if layout == "heads":
        return a.reshape(shape)
    raise AssertionError(layout)


def _to_hf(a: np.ndarray, layout: str) -> np.ndarray:
    if layout == "copy":
        return a
    if layout == "T":
        return np.ascontiguousarray(a.T)
    if layout == "in_heads":  # (d, n, h) -> (n*h, d)
        return np.ascontiguousarray(a.reshape(a.shape[0], -1).T)
    if layout == "out_heads":  # (n, h, d) -> (d, n*h)
        return np.ascontiguousarray(a.reshape(-1, a.shape[-1]).T)
    if layout == "heads":
        return a.reshape(-1)
    raise AssertionError(layout)


class SafetensorsReader:
    """Lazy access to the tensors of a single or sharded safetensors checkpoint."""

    def __init__(self, path: Path):
        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (self.path / "model.safetensors").exists():
            with safe_open(self.path / "model.safetensors", "numpy") as f:
                weight_map = {k: "model.safetensors" for k in f.keys()}
        else:
            raise FileNotFoundError(f"{self.path}: no model.safetensors or model.safetensors.index.json")
        self.weight_map = weight_map

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def _file(self, name: str) -> Path:
        if name not in self.weight_map:
            raise KeyError(f"{self.path}: tensor {name!r} is missing from the checkpoint")
        file = self.path / self.weight_map[name]
        if not file.exists():
            raise FileNotFoundError(f"{file}: shard named in the index is missing")
        return file

    def get(self, name: str, rows: slice | None = None) -> np.ndarray:
        """The tensor (or rows `rows` of it), read from a freshly opened file: closing
        it unmaps the pages read, which would otherwise count in the process's memory
        until the whole load ends."""
        with safe_open(self._file(name), "numpy") as f:
            return f.get_tensor(name) if rows is None else f.get_slice(name)[rows]

    def shape(self, name: str) -> tuple[int, ...]:
        with safe_open(self._file(name), "numpy") as f:
            return tuple(f.get_slice(name).get_shape())


def _table_for(cfg: ModelConfig) -> list[tuple[str, str, str]]:
    shapes = param_shapes(cfg)
    return [row for row in NAME_TABLE if row[1] in shapes]


# Host bytes read at once for an unstacked tensor (the embedding): rows in blocks.
_BLOCK_BYTES = 64 << 20


@functools.partial(jax.jit, donate_argnums=0)
def _place(out: jax.Array, block: jax.Array, start: tuple) -> jax.Array:
    """Write `block` into `out` at `start`, in place (`out` is donated)."""
    return jax.lax.dynamic_update_slice(out, block.astype(out.dtype), start)


def load_params(
    path: str | os.PathLike, cfg: ModelConfig, dtype, sharding_for: Callable[[str], jax.sharding.Sharding]
) -> dict[str, jax.Array]:
    """Read every parameter into a jax.Array placed by `sharding_for(path)`."""
    reader = SafetensorsReader(Path(path))
    shapes = param_shapes(cfg)
    dt = np_dtype(dtype)
    out = {}
    for hf_name, ours, layout in _table_for(cfg):
        shape, _ = shapes[ours]
        if ours == "lm_head" and hf_name not in reader:
            raise KeyError(f"{path}: lm_head.weight missing and tie_word_embeddings is false")
        stacked = "{i}" in hf_name
        want = shape[1:] if stacked else shape
        cache: dict[int, np.ndarray] = {}

        def layer(i: int, hf_name=hf_name, layout=layout, want=want) -> np.ndarray:
            """This layer's tensor in our layout and dtype (i = -1: the unstacked one)."""
            if i not in cache:  # several shards of one device callback may ask for one layer
                cache.clear()
                a = _to_ours(reader.get(hf_name.format(i=i)), layout, want)
                if a.shape != tuple(want):
                    raise ValueError(f"{path}: {hf_name.format(i=i)} has shape {a.shape} after "
                                     f"layout {layout}, expected {tuple(want)}")
                cache[i] = a.astype(dt, copy=False)
            return cache[i]

        sharding = sharding_for(ours)
        if len(sharding.device_set) == 1:
            out[ours] = _fill_in_place(reader, hf_name, layout, shape, stacked, layer, sharding, dt, path)
            continue

        def fetch(index, stacked=stacked, layer=layer, shape=shape) -> np.ndarray:
            if not stacked:
                return layer(-1)[index]
            rows = range(*index[0].indices(shape[0]))
            block = np.empty((len(rows), *layer(rows[0])[index[1:]].shape), dt)
            for j, i in enumerate(rows):
                block[j] = layer(i)[index[1:]]
            return block

        out[ours] = jax.make_array_from_callback(shape, sharding, fetch)
    return out


def _fill_in_place(reader, hf_name, layout, shape, stacked, layer, sharding, dt, path) -> jax.Array:
    """One device: zeros on the device, then each layer (stacked) or block of rows
    (unstacked `copy`/`T` tensors, e.g. the embedding) written in place."""
    out = jax.jit(lambda: jnp.zeros(shape, dt), out_shardings=sharding)()
    zero = np.int32(0)
    if stacked:
        for i in range(shape[0]):
            out = _place(out, layer(i)[None], (np.int32(i),) + (zero,) * (len(shape) - 1))
        return out
    if layout not in ("copy", "T") or len(shape) != 2:
        return _place(out, layer(-1), (zero,) * len(shape))
    hf_shape = reader.shape(hf_name)
    if tuple(hf_shape[::-1] if layout == "T" else hf_shape) != tuple(shape):
        raise ValueError(f"{path}: {hf_name} has shape {tuple(hf_shape)}, expected "
                         f"{tuple(shape[::-1] if layout == 'T' else shape)}")
    step = max(1, _BLOCK_BYTES // (hf_shape[1] * dt.itemsize))
    for a in range(0, hf_shape[0], step):
        block = reader.get(hf_name, slice(a, min(a + step, hf_shape[0]))).astype(dt, copy=False)
        if layout == "T":
            out = _place(out, block.T, (zero, np.int32(a)))
        else:
            out = _place(out, block, (np.int32(a), zero))
    return out


def _read_config(path: Path) -> dict:
    file = path / "config.json"
    if not file.exists():
        raise FileNotFoundError(f"{file}: not found (is {path} a Hugging Face model folder?)")
    return json.loads(file.read_text())


def from_pretrained(path: str | os.PathLike, dtype="float32", mesh=None, rules=None) -> Transformer:
    """Load a Llama/Qwen2 Hugging Face folder (or a builtin model name) into a Transformer.

    With `mesh`, each tensor lands directly in its shards per fem_jax.sharding's table.
    """
    path = Path(path)
    if not path.is_dir():
        from .builtin import resolve_model_path

        path = Path(resolve_model_path(str(path)))
    cfg = ModelConfig.from_hf_config(_read_config(path))
    if mesh is None:
        dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        sharding_for = lambda name: dev  # noqa: E731
    else:
        from ..sharding import param_sharding

        shapes = param_shapes(cfg)
        sharding_for = lambda name: param_sharding(mesh, shapes[name][1], shapes[name][0], rules)  # noqa: E731
    params = load_params(path, cfg, dtype, sharding_for)
    jdt = jnp.dtype(np_dtype(dtype))
    model = nnx.eval_shape(lambda: Transformer(cfg, dtype=jdt, rngs=nnx.Rngs(0)))
    model.set_params(params)
    model.source_path = str(path)
    return model


def write_side_files(folder: Path, cfg: ModelConfig, dtype: str, tokenizer_from=None) -> None:
    """config.json, generation_config.json (copied from `tokenizer_from` when it has one)
    and the tokenizer files: everything of an HF folder but the weights."""
    (folder / "config.json").write_text(json.dumps(cfg.to_hf_config(dtype), indent=2))
    src = Path(tokenizer_from) if tokenizer_from else None
    gen = src / "generation_config.json" if src else None
    if gen is not None and gen.exists():
        shutil.copy(gen, folder / "generation_config.json")
    else:
        eos = list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id
        (folder / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": cfg.bos_token_id, "eos_token_id": eos, "pad_token_id": cfg.pad_token_id}, indent=2))
    if src is not None:
        for f in TOKENIZER_FILES:
            if (src / f).exists():
                shutil.copy(src / f, folder / f)


def save_pretrained(
    model: Transformer,
    out_dir: str | os.PathLike,
    tokenizer_from: str | os.PathLike | None = None,
    dtype: str | None = None,
    max_shard_bytes: int = 2 * 1024**3,
    params: dict[str, jax.Array] | None = None,
) -> Path:
    """Write a Hugging Face folder (config, safetensors shards with an index above
    `max_shard_bytes`, generation config, tokenizer files) that transformers and vLLM load.

    Written into a temporary sibling folder and renamed when complete.
    """
    cfg = model.cfg
    params = params if params is not None else model.param_dict()
    if dtype is None:
        dtype = {np.dtype(np.float32): "float32", np.dtype(ml_dtypes.bfloat16): "bfloat16",
                 np.dtype(np.float16): "float16"}[np.dtype(params["embed"].dtype)]
    dt = np_dtype(dtype)
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        L = cfg.num_hidden_layers
        shards: list[dict[str, np.ndarray]] = [{}]
        size = 0
        files: list[str] = []
        weight_map: dict[str, str] = {}

        def flush():
            nonlocal size
            if not shards[-1]:
                return
            name = f"model-{len(files) + 1:05d}.safetensors"
            save_file(shards[-1], tmp / name, metadata={"format": "pt"})
            files.append(name)
            for k in shards[-1]:
                weight_map[k] = name
            shards[-1] = {}
            size = 0

        for hf_name, ours, layout in _table_for(cfg):
            arr = params[ours]
            for i in range(L) if "{i}" in hf_name else [None]:
                host = np.asarray(jax.device_get(arr[i] if i is not None else arr))
                t = _to_hf(host.astype(dt), layout)
                if size and size + t.nbytes > max_shard_bytes:
                    flush()
                shards[-1][hf_name.format(i=i)] = t
                size += t.nbytes
        flush()
        if len(files) == 1:
            os.replace(tmp / files[0], tmp / "model.safetensors")
        else:
            n = len(files)
            total = 0
            for j, f in enumerate(files):
                new = f"model-{j + 1:05d}-of-{n:05d}.safetensors"
                os.replace(tmp / f, tmp / new)
                total += (tmp / new).stat().st_size
                for k, v in list(weight_map.items()):
                    if v == f:
                        weight_map[k] = new
            (tmp / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
        write_side_files(tmp, cfg, dtype, tokenizer_from)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
