"""Hugging Face checkpoints in and out: one name table, read tensor by tensor.

`from_pretrained` builds the module abstractly (no random init), then fills each
parameter one Hugging Face tensor at a time. On one device, each parameter starts as
zeros on the device and every layer (or block of embedding rows) is written into it in
place (a donated update): host memory holds one block beyond the model. With a mesh,
`jax.make_array_from_callback` reads each device's shard straight from the files. Each
read opens the safetensors file and closes it again, so the file's pages do not stay
mapped into the process.

`save_params` (and `save_pretrained`, its form for a model) walks the same table
backwards, one layer tensor at a time, into safetensors shards of bounded size, in a
temporary folder published when complete (fem_jax.io.atomic_folder).

The one codec between the two layouts (`hf_shape`, `to_hf`, `to_ours`, keyed by the
table's layout strings) and the one streamed safetensors writer (`hf_tensors` +
`write_safetensors`: block by block, each file's size and sha256 returned) live here;
checkpoint.export_hf uses them with blocks read from TensorStore instead of device arrays.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import shutil
import struct
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors import safe_open

from ..io import atomic_folder, read_json
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
_ST_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}  # safetensors' names


def np_dtype(dtype) -> np.dtype:
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype {dtype!r} is not supported ({', '.join(_DTYPES)})")
        return np.dtype(_DTYPES[dtype])
    return np.dtype(dtype)


# ----------------------------------------------------------------------------- the layout codec


def hf_shape(shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
    """The Hugging Face shape of a tensor of our `shape` stored with `layout`."""
    if layout == "copy":
        return tuple(shape)
    if layout == "T":
        return tuple(reversed(shape))
    if layout == "in_heads":  # (d, n, h) -> (n*h, d)
        return (shape[1] * shape[2], shape[0])
    if layout == "out_heads":  # (n, h, d) -> (d, n*h)
        return (shape[2], shape[0] * shape[1])
    if layout == "heads":  # (n, h) -> (n*h,)
        return (shape[0] * shape[1],)
    raise AssertionError(layout)


def to_hf(a: np.ndarray, layout: str) -> np.ndarray:
    """Our layout -> Hugging Face's (a view where it can be: writers copy it contiguously)."""
    if layout == "copy":
        return a
    if layout == "T":
        return a.T
    if layout == "in_heads":
        return a.reshape(a.shape[0], -1).T
    if layout == "out_heads":
        return a.reshape(-1, a.shape[-1]).T
    if layout == "heads":
        return a.reshape(-1)
    raise AssertionError(layout)


def to_ours(a: np.ndarray, layout: str, shape: tuple[int, ...]) -> np.ndarray:
    """Hugging Face's layout -> ours, `shape` being our shape (the inverse of to_hf)."""
    if layout == "copy":
        return a
    if layout == "T":
        return a.T
    if layout in ("in_heads", "out_heads"):
        return a.T.reshape(shape)
    if layout == "heads":
        return a.reshape(shape)
    raise AssertionError(layout)


class SafetensorsReader:
    """Lazy access to the tensors of a single or sharded safetensors checkpoint."""

    def __init__(self, path: Path):
        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            m = read_json(index)
            weight_map = m.get("weight_map") if isinstance(m, dict) else None
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index}: no 'weight_map' object")
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
                a = to_ours(reader.get(hf_name.format(i=i)), layout, want)
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
    stored = reader.shape(hf_name)
    if stored != hf_shape(shape, layout):
        raise ValueError(f"{path}: {hf_name} has shape {stored}, expected {hf_shape(shape, layout)}")
    step = max(1, _BLOCK_BYTES // (stored[1] * dt.itemsize))
    for a in range(0, stored[0], step):
        block = reader.get(hf_name, slice(a, min(a + step, stored[0]))).astype(dt, copy=False)
        if layout == "T":
            out = _place(out, block.T, (zero, np.int32(a)))
        else:
            out = _place(out, block, (np.int32(a), zero))
    return out


def _read_config(path: Path) -> dict:
    file = path / "config.json"
    if not file.exists():
        raise FileNotFoundError(f"{file}: not found (is {path} a Hugging Face model folder?)")
    return read_json(file)


def from_pretrained(path: str | os.PathLike, dtype="float32", mesh=None) -> Transformer:
    """Load a Llama/Qwen2 Hugging Face folder into a Transformer (builtin model names go
    through `fem_jax.models.from_pretrained`, which resolves them to a folder first).

    With `mesh`, each tensor lands directly in its shards per fem_jax.sharding's table.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a folder (for a builtin model name use "
                                "fem_jax.models.from_pretrained or fem_jax.models.resolve)")
    cfg = ModelConfig.from_hf_config(_read_config(path))
    if mesh is None:
        dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        sharding_for = lambda name: dev  # noqa: E731
    else:
        from ..sharding import param_sharding

        shapes = param_shapes(cfg)
        sharding_for = lambda name: param_sharding(mesh, shapes[name][1], shapes[name][0])  # noqa: E731
    params = load_params(path, cfg, dtype, sharding_for)
    jdt = jnp.dtype(np_dtype(dtype))
    model = nnx.eval_shape(lambda: Transformer(cfg, dtype=jdt, rngs=nnx.Rngs(0)))
    model.set_params(params)
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


# ----------------------------------------------------------------------------- writing safetensors


class HFTensor:
    """One Hugging Face tensor to write: its name, shape and a producer of its blocks (in
    order, in the HF layout, whose bytes concatenate to the tensor's)."""

    def __init__(self, name: str, shape: tuple[int, ...], blocks: Callable[[], Iterator[np.ndarray]]):
        self.name, self.shape, self.blocks = name, tuple(shape), blocks


def hf_tensors(cfg: ModelConfig, read: Callable[[str, tuple], np.ndarray], dt: np.dtype) -> list[HFTensor]:
    """The model's tensors in NAME_TABLE order, each read lazily through `read(ours, index)`
    (our parameter `ours` indexed by a tuple of ints/slices, as a numpy array): one layer
    of a stacked parameter, or one block of at most _BLOCK_BYTES rows of a `copy`/`T`
    matrix (the embedding, the output head), at a time."""
    shapes = param_shapes(cfg)
    out = []
    for hf_name, ours, layout in _table_for(cfg):
        shape = shapes[ours][0]
        if "{i}" in hf_name:
            for i in range(shape[0]):
                def blocks(ours=ours, i=i, layout=layout):
                    yield to_hf(read(ours, (i,)).astype(dt, copy=False), layout)

                out.append(HFTensor(hf_name.format(i=i), hf_shape(shape[1:], layout), blocks))
            continue
        hfs = hf_shape(shape, layout)

        def blocks(ours=ours, layout=layout, hfs=hfs):
            if len(hfs) != 2 or layout not in ("copy", "T"):
                yield to_hf(read(ours, ()).astype(dt, copy=False), layout)
                return
            rows = max(1, _BLOCK_BYTES // (hfs[1] * max(dt.itemsize, 4)))
            for r0 in range(0, hfs[0], rows):
                r = slice(r0, min(hfs[0], r0 + rows))
                if layout == "copy":
                    yield read(ours, (r,)).astype(dt, copy=False)
                else:  # ours (d, v) -> hf (v, d): columns r transposed
                    yield read(ours, (slice(None), r)).astype(dt, copy=False).T

        out.append(HFTensor(hf_name, hfs, blocks))
    return out


def hf_views(params: dict[str, Any], cfg: ModelConfig, host: Callable[[Any], Any]) -> Iterator[tuple[str, Any]]:
    """(Hugging Face name, tensor) for every tensor of the model without writing a file:
    the unstacked tensors, then layer by layer (a reader that processes a layer once all its
    tensors arrived, as vLLM's reload does, holds one layer at a time). `host(array)` turns
    each of our parameters into a host-side array once (a zero-copy view where the platform
    allows, e.g. torch.from_dlpack), and each tensor is a view of it in Hugging Face's
    layout (to_hf works on numpy and torch alike). No dtype cast happens here: the reader
    casts while it copies."""
    table = _table_for(cfg)
    stacked = [(name, ours, layout) for name, ours, layout in table if "{i}" in name]
    for name, ours, layout in table:
        if "{i}" not in name:
            yield name, to_hf(host(params[ours]), layout)
    whole = {ours: host(params[ours]) for _, ours, _ in stacked}
    for i in range(cfg.num_hidden_layers):
        for name, ours, layout in stacked:
            yield name.format(i=i), to_hf(whole[ours][i], layout)


def _write_file(file: Path, tensors: list[HFTensor], dtype: str) -> dict:
    """One safetensors file, written block by block; {"bytes", "sha256"} of it."""
    dt = np_dtype(dtype)
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    off = 0
    for t in tensors:
        n = math.prod(t.shape) * dt.itemsize
        header[t.name] = {"dtype": _ST_DTYPES[dtype], "shape": list(t.shape), "data_offsets": [off, off + n]}
        off += n
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    h = hashlib.sha256()
    with open(file, "wb") as f:
        for chunk in (struct.pack("<Q", len(hb)), hb):
            f.write(chunk)
            h.update(chunk)
        for t in tensors:
            want = header[t.name]["data_offsets"][1] - header[t.name]["data_offsets"][0]
            got = 0
            for block in t.blocks():
                b = np.ascontiguousarray(block, dtype=dt).reshape(-1).view(np.uint8)  # no extra copy
                f.write(b)
                h.update(b)
                got += b.size
            if got != want:
                raise AssertionError(f"{t.name}: wrote {got} bytes, expected {want}")
        f.flush()
        os.fsync(f.fileno())
    return {"bytes": 8 + len(hb) + off, "sha256": h.hexdigest()}


def write_safetensors(folder: str | os.PathLike, tensors: list[HFTensor], dtype: str,
                      max_shard_bytes: int) -> dict[str, dict]:
    """`tensors` into `folder` as model.safetensors, or as model-0000j-of-0000n.safetensors
    shards of at most `max_shard_bytes` of tensor data each (a bigger tensor gets a shard of
    its own) with model.safetensors.index.json. Streamed: one block in memory at a time.
    Returns {file name: {"bytes", "sha256"}} of the shards written."""
    if dtype not in _ST_DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported ({', '.join(_ST_DTYPES)})")
    folder, dt = Path(folder), np_dtype(dtype)
    nbytes = {t.name: math.prod(t.shape) * dt.itemsize for t in tensors}
    shards: list[list[HFTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + nbytes[t.name] > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += nbytes[t.name]
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors" for j in range(len(shards))])
    files = {name: _write_file(folder / name, shard, dtype) for name, shard in zip(names, shards)}
    if len(shards) > 1:
        wm = {t.name: name for name, shard in zip(names, shards) for t in shard}
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": sum(nbytes.values())}, "weight_map": dict(sorted(wm.items()))}, indent=2))
    return files


def dtype_name(dtype) -> str:
    """'float32' | 'bfloat16' | 'float16' for a numpy/jax dtype."""
    names = {np.dtype(v): k for k, v in _DTYPES.items()}
    if np.dtype(dtype) not in names:
        raise ValueError(f"dtype {dtype} is not supported ({', '.join(_DTYPES)})")
    return names[np.dtype(dtype)]


def save_params(
    params: dict[str, jax.Array],
    model_config: ModelConfig | dict,
    out_dir: str | os.PathLike,
    tokenizer_from: str | os.PathLike | None = None,
    dtype: str | None = None,
    max_shard_bytes: int = 2 * 1024**3,
) -> Path:
    """Write parameters (our flat {path: array} dict, on any devices or mesh) as a Hugging
    Face folder: config, safetensors shards with an index above `max_shard_bytes`,
    generation config, tokenizer files from `tokenizer_from`. `model_config` is a
    ModelConfig or its Hugging Face dict (cfg.to_hf_config()); `dtype` defaults to the
    embedding's. Streamed: one layer (or block of embedding rows) on the host at a time.
    Written into a temporary sibling folder and published when complete (fem_jax.io)."""
    cfg = model_config if isinstance(model_config, ModelConfig) else ModelConfig.from_hf_config(model_config)
    dtype = dtype or dtype_name(params["embed"].dtype)
    read = lambda ours, index: np.asarray(jax.device_get(params[ours][index]))  # noqa: E731
    with atomic_folder(out_dir) as tmp:
        write_safetensors(tmp, hf_tensors(cfg, read, np_dtype(dtype)), dtype, max_shard_bytes)
        write_side_files(tmp, cfg, dtype, tokenizer_from)
    return Path(out_dir).absolute()


def save_pretrained(
    model: Transformer,
    out_dir: str | os.PathLike,
    tokenizer_from: str | os.PathLike | None = None,
    dtype: str | None = None,
    max_shard_bytes: int = 2 * 1024**3,
    params: dict[str, jax.Array] | None = None,
) -> Path:
    """Write a Hugging Face folder (config, safetensors shards with an index above
    `max_shard_bytes`, generation config, tokenizer files) that transformers and vLLM load:
    save_params of the model's parameters (or of `params`, in the model's config)."""
    return save_params(params if params is not None else model.param_dict(), model.cfg, out_dir,
                       tokenizer_from=tokenizer_from, dtype=dtype, max_shard_bytes=max_shard_bytes)
