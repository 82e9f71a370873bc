"""Orbax checkpoints of the training state, and the orbax ⇄ Hugging Face bridge.

`Checkpointer` keeps one orbax step per EM iteration under a root folder: the
parameters (a flat {path: jax.Array} dict, sharded over any mesh), optionally the optax
state, and a JSON `meta` (model config, tokenizer folder, metrics). Saves are blocking
and atomic: orbax writes into a temporary step folder and renames it when complete.
`restore` reads straight into the shardings of the given `params_like`, so a checkpoint
saved on one mesh restores on another.

Sealed steps. Once orbax has finished a step, `save` writes `fem_manifest.json` into the
step folder (relative path, size and sha256 of every file; process 0 only, after a
barrier, with several processes), atomically. `restore`, `restore_meta` and `export_hf`
check the step against it first and raise `CheckpointCorrupt` naming the file that is
missing, truncated, overwritten or added. A step that orbax finished but that has no
manifest (the process died in between, or it predates manifests) is *unsealed*:
`all_steps()` / `latest_step()` leave it out, `unsealed_steps()` lists it, restoring it
raises `CheckpointUnsealed`, `drop_unsealed()` deletes it through orbax and `seal()`
adopts it as it is. `save(k)` over an unsealed step k replaces it. `max_to_keep` counts
sealed steps only, and the oldest is deleted only after the new step is sealed.

`export_hf` streams a step into a Hugging Face folder without ever holding the model on
the host: it opens each stored array with TensorStore and reads one layer slice (or,
for the embedding and the output head, one block of rows) at a time, converts it with
models.hf's codec and writes it with models.hf's streamed safetensors writer. Peak host
memory is one such block plus TensorStore's chunk buffers, not the model and not even a
whole shard. Parameters are saved with one layer per storage chunk
(`SaveArgs(shard_axes=(0,))`) so that reading a layer touches only that layer's bytes.
The folder is written under a temporary name and published when complete
(fem_jax.io.publish), with a `manifest.json` (size and sha256 of every file) that
`verify_export` checks: readers (VllmEngine) refuse a partial or corrupt export with an
error naming the file.

`import_hf` goes the other way (a Hugging Face folder into a checkpoint step).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np

from .io import CorruptError, atomic_folder, atomic_write_text, check_files, fsync_dir, hash_files, read_json
from .models.hf import TOKENIZER_FILES, hf_tensors, np_dtype, write_safetensors, write_side_files
from .models.transformer import ModelConfig, param_shapes

ITEMS = ("params", "opt_state", "meta")
FORMAT = "fem-jax/1"
MANIFEST = "manifest.json"  # of an HF export
MANIFEST_FORMAT = "fem-jax-hf-export/1"
STEP_MANIFEST = "fem_manifest.json"  # of a checkpoint step: present = sealed
STEP_MANIFEST_FORMAT = "fem-jax-checkpoint-step/1"
ASSETS_DIR = "hf_assets"  # tokenizer files that import_hf copies next to the steps
CHUNK_BYTES = 64 * 1024**2  # orbax storage chunks are at most this


class ExportError(CorruptError):
    """A Hugging Face export is partial, corrupt or not an export of ours."""


class CheckpointCorrupt(CorruptError):
    """A checkpoint step differs from its fem_manifest.json (a file missing, truncated,
    overwritten or added), or a file of it cannot be read. The message names the file."""


class CheckpointUnsealed(CheckpointCorrupt):
    """orbax finished the step but it has no fem_manifest.json: the process stopped between
    the two, or the step predates manifests. Checkpointer.drop_unsealed() deletes it;
    Checkpointer.seal() adopts it as it is."""


def _ocp():
    import orbax.checkpoint as ocp

    return ocp


def _jsonable(x):
    """meta must be JSON: numpy/jax scalars become Python numbers, tuples lists."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.generic, jax.Array)) and np.ndim(x) == 0:
        return np.asarray(x).item()
    if isinstance(x, Path):
        return str(x)
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    raise TypeError(f"checkpoint meta: {type(x).__name__} value {x!r} is not JSON-serializable")


def _save_args(params: dict[str, jax.Array]):
    """One layer per storage chunk for stacked parameters, chunks of at most CHUNK_BYTES."""
    ocp = _ocp()
    out = {}
    for path, a in params.items():
        stacked = path.startswith("layers/") and a.ndim >= 2
        out[path] = ocp.SaveArgs(chunk_byte_size=CHUNK_BYTES, shard_axes=(0,) if stacked else ())
    return out


def _like(x):
    """An abstract target for orbax restore: ShapeDtypeStruct with the leaf's sharding."""
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return x


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


class Checkpointer:
    """An orbax CheckpointManager under `root`: one sealed step per EM iteration.

    With several processes every method is collective (call it on every process), as
    orbax's own save and delete are."""

    def __init__(self, root: str | os.PathLike, max_to_keep: int | None = None, create: bool = True):
        ocp = _ocp()
        self.root = Path(root).absolute()
        if not create and not self.root.is_dir():
            raise FileNotFoundError(f"{self.root}: no checkpoint folder")
        self._keep = max_to_keep
        self._mgr = ocp.CheckpointManager(  # it keeps every step: _prune deletes only sealed ones
            self.root,
            options=ocp.CheckpointManagerOptions(max_to_keep=None, create=create),
            item_names=ITEMS,
        )

    def save(self, step: int, params: dict[str, jax.Array], opt_state=None, meta: dict | None = None) -> None:
        """Blocking, atomic save, then sealed. `meta` is JSON; `model_config` in it
        (cfg.to_hf_config()) is what export_hf needs. An unsealed step `step` is replaced."""
        ocp = _ocp()
        step = int(step)
        if step in self.all_steps():
            raise ValueError(f"{self.root}: step {step} already exists")
        meta = dict(_jsonable(meta or {}))
        meta["_fem"] = {
            "format": FORMAT,
            "has_opt_state": opt_state is not None,
            "params": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in params.items()},
        }
        self._delete([step] if step in self.unsealed_steps() else [], "replace")
        items = {"params": ocp.args.StandardSave(dict(params), save_args=_save_args(params)),
                 "meta": ocp.args.JsonSave(meta)}
        if opt_state is not None:
            items["opt_state"] = ocp.args.StandardSave(opt_state)
        self._mgr.save(step, args=ocp.args.Composite(**items), force=True)
        self._mgr.wait_until_finished()
        self.seal(step)
        self._prune()

    def seal(self, step: int) -> None:
        """Write step `step`'s manifest (process 0, after every process has finished
        writing), atomically. `save` does this; call it yourself only to adopt an unsealed
        step as it stands now (e.g. one saved before manifests existed)."""
        step = int(step)
        if step not in self._orbax_steps():
            raise FileNotFoundError(f"{self.root}: no step {step} to seal")
        _barrier(f"fem_jax_seal_{step}_written")
        if jax.process_index() == 0:
            d = self._dir(step)
            files = hash_files(d, skip=[STEP_MANIFEST])
            atomic_write_text(d / STEP_MANIFEST, json.dumps(
                {"format": STEP_MANIFEST_FORMAT, "step": step, "files": files}, indent=1))
            fsync_dir(d)
        _barrier(f"fem_jax_seal_{step}_sealed")

    def _prune(self) -> None:
        if self._keep:
            self._delete(self.all_steps()[:-self._keep], "prune")

    def _dir(self, step: int) -> Path:
        return self.root / str(step)

    def _orbax_steps(self) -> list[int]:
        """Every step orbax finished, sealed or not."""
        self._mgr.reload()
        return sorted(int(s) for s in self._mgr.all_steps())

    def all_steps(self) -> list[int]:
        """The sealed steps, ascending."""
        return [s for s in self._orbax_steps() if (self._dir(s) / STEP_MANIFEST).is_file()]

    def latest_step(self) -> int | None:
        """The newest sealed step (an unsealed one, even a newer one, is not reported)."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def unsealed_steps(self) -> list[int]:
        """Steps orbax finished that have no manifest: not to be trusted or restored."""
        return [s for s in self._orbax_steps() if not (self._dir(s) / STEP_MANIFEST).is_file()]

    def drop_unsealed(self) -> list[int]:
        """Delete every unsealed step (through orbax, so its bookkeeping stays right);
        return them."""
        dropped = self.unsealed_steps()
        self._delete(dropped, "drop_unsealed")
        return dropped

    def _delete(self, steps: list[int], why: str) -> None:
        """Delete `steps`, which every process listed itself, through orbax (process 0
        deletes, then all meet). Several processes meet first, so that none lists the
        steps after process 0 has deleted one (it would skip orbax's delete, and its
        barrier, that the others wait in), under a name that carries the list: processes
        that disagree fail at once (AssertionError: name mismatch) instead of hanging."""
        _barrier(f"fem_jax_{why}_{list(steps)}")
        for s in steps:
            self._mgr.delete(s)

    def verify_step(self, step: int, checksums: bool = True) -> dict:
        """Check step `step` against its manifest (every file present, of its size, with
        `checksums` its sha256, and no file added); return the manifest. Raises
        CheckpointUnsealed without a manifest, CheckpointCorrupt naming the file otherwise."""
        d = self._dir(int(step))
        mf = d / STEP_MANIFEST
        if not mf.is_file():
            raise CheckpointUnsealed(
                f"{mf}: missing: step {step} is unsealed (its process stopped after orbax wrote it, or it "
                "predates manifests); Checkpointer.drop_unsealed() removes it, Checkpointer.seal() adopts it")
        m = read_json(mf, CheckpointCorrupt)
        if not isinstance(m, dict) or m.get("format") != STEP_MANIFEST_FORMAT or m.get("step") != int(step):
            raise CheckpointCorrupt(f"{mf}: not a manifest of step {step} "
                                    f"(format {m.get('format') if isinstance(m, dict) else None!r})")
        check_files(d, m.get("files") or {}, mf, CheckpointCorrupt, checksums=checksums, extra_ok=[STEP_MANIFEST])
        return m

    def _check_step(self, step: int | None) -> int:
        steps = self.all_steps()
        if step is None:
            if not steps:
                unsealed = self.unsealed_steps()
                raise FileNotFoundError(f"{self.root}: no complete checkpoint step"
                                        + (f" (unsealed steps: {unsealed})" if unsealed else ""))
            return steps[-1]
        if int(step) not in steps:
            if int(step) in self.unsealed_steps():
                self.verify_step(step)  # raises CheckpointUnsealed, naming the missing manifest
            raise FileNotFoundError(f"{self.root}: no complete step {step} (steps: {steps})")
        return int(step)

    def restore_meta(self, step: int | None = None, verify: bool = True) -> dict:
        """Step `step`'s meta (None: the latest), after verify_step unless `verify` is False."""
        ocp = _ocp()
        step = self._check_step(step)
        if verify:
            self.verify_step(step)
        try:
            r = self._mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        except ValueError as e:  # json.JSONDecodeError and orbax's own
            f = self._dir(step) / "meta" / "metadata"
            raise CheckpointCorrupt(f"{f if f.exists() else f.parent}: unreadable checkpoint meta "
                                    f"({type(e).__name__}: {e})") from None
        return dict(r["meta"])

    def restore(self, step: int | None, params_like: dict, opt_state_like=None,
                verify: bool = True) -> tuple[dict, Any, dict]:
        """(params, opt_state, meta) at `step` (None: the latest sealed one), after
        verify_step unless `verify` is False. `params_like` holds jax.ShapeDtypeStruct with
        .sharding (or arrays): each array is read straight into that sharding, whatever mesh
        saved it."""
        ocp = _ocp()
        step = self._check_step(step)
        meta = self.restore_meta(step, verify=verify)
        saved = meta.get("_fem", {}).get("params")
        if saved is not None:
            want = {k: tuple(v.shape) for k, v in params_like.items()}
            have = {k: tuple(v["shape"]) for k, v in saved.items()}
            if want != have:
                diff = sorted(set(want.items()) ^ set(have.items()))
                raise ValueError(f"{self.root}/{step}: params_like does not match the saved parameters: {diff}")
        items = {"params": ocp.args.StandardRestore({k: _like(v) for k, v in params_like.items()})}
        if opt_state_like is not None:
            if not meta.get("_fem", {}).get("has_opt_state", False):
                raise ValueError(f"{self.root}/{step}: this step was saved without an optimizer state")
            items["opt_state"] = ocp.args.StandardRestore(jax.tree.map(_like, opt_state_like))
        r = self._mgr.restore(step, args=ocp.args.Composite(**items))
        return dict(r["params"]), (r["opt_state"] if opt_state_like is not None else None), meta

    def close(self) -> None:
        self._mgr.close()


# ----------------------------------------------------------------------------- reading stored arrays


def is_checkpoint(path: str | os.PathLike) -> bool:
    """A Checkpointer root (numeric step folders) or one step folder of it."""
    p = Path(path)
    if (p / "params").is_dir() and (p / "meta").is_dir():
        return True
    return p.is_dir() and any(c.name.isdigit() and (c / "params").is_dir() for c in p.iterdir())


def _resolve_step(src: Path, step: int | None) -> tuple[Path, int]:
    """(root, step) from a root or a step folder."""
    src = Path(src).absolute()
    if not src.exists():
        raise FileNotFoundError(f"{src}: not found")
    if (src / "params").is_dir() and src.name.isdigit():
        if step is not None and int(step) != int(src.name):
            raise ValueError(f"{src} is step {src.name}, but step={step} was asked for")
        return src.parent, int(src.name)
    if not is_checkpoint(src):
        raise FileNotFoundError(f"{src}: not an orbax checkpoint of ours (no <step>/params folders)")
    ck = Checkpointer(src, create=False)
    return src, ck._check_step(step)


class _StoredArrays:
    """TensorStore views of the arrays of one orbax PyTree item (OCDBT + zarr), opened
    lazily, read slice by slice. No orbax internals: the names and zarr version come from
    the item's `_METADATA` file."""

    def __init__(self, item_dir: Path):
        import tensorstore as ts

        self._ts = ts
        self.dir = Path(item_dir)
        meta_file = self.dir / "_METADATA"
        if not meta_file.exists():
            raise FileNotFoundError(f"{meta_file}: missing (incomplete or foreign orbax checkpoint)")
        m = read_json(meta_file, CheckpointCorrupt)
        self.zarr = "zarr3" if m.get("use_zarr3") else "zarr"
        self.ocdbt = bool(m.get("use_ocdbt", True))
        self.names = {}
        for entry in m["tree_metadata"].values():
            keys = [str(k["key"]) for k in entry["key_metadata"]]
            self.names["/".join(keys)] = ".".join(keys)
        self._ctx = ts.Context({"cache_pool": {"total_bytes_limit": 0},
                                "data_copy_concurrency": {"limit": max(1, min(4, os.cpu_count() or 1))}})
        self._open: dict[str, Any] = {}

    def __getitem__(self, path: str):
        if path not in self.names:
            raise KeyError(f"{self.dir}: parameter {path!r} is not in the checkpoint "
                           f"(has {', '.join(sorted(self.names))})")
        if path not in self._open:
            base = f"file://{self.dir.absolute()}/"
            kv = ({"driver": "ocdbt", "base": base, "path": self.names[path]} if self.ocdbt
                  else f"{base}{self.names[path]}")
            spec = {"driver": self.zarr, "kvstore": kv, "recheck_cached_data": False,
                    "recheck_cached_metadata": False}
            self._open[path] = self._ts.open(spec, open=True, read=True, context=self._ctx).result()
        return self._open[path]


# ----------------------------------------------------------------------------- export, streamed


def _plan(cfg: ModelConfig, arrays: _StoredArrays, dt: np.dtype):
    """The export's tensors (models.hf.hf_tensors), each block read from TensorStore."""
    for ours, (shape, _) in param_shapes(cfg).items():
        stored = arrays[ours]
        if tuple(stored.shape) != tuple(shape):
            raise ValueError(f"{arrays.dir}: {ours} is stored with shape {tuple(stored.shape)}, "
                             f"model_config says {tuple(shape)}")
    return hf_tensors(cfg, lambda ours, index: np.asarray(arrays[ours][index].read().result()), dt)


def parse_size(s: str | int) -> int:
    """'2GB', '500MB', '1GiB', '123' -> bytes."""
    if isinstance(s, int):
        return s
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*", str(s), re.IGNORECASE)
    if not m:
        raise ValueError(f"size {s!r}: expected e.g. 2GB, 500MB, 1GiB or a number of bytes")
    unit = m.group(2).upper().rstrip("B")
    mult = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "KI": 2**10, "MI": 2**20, "GI": 2**30,
            "TI": 2**40}[unit]
    return int(float(m.group(1)) * mult)


def _tokenizer_folder(root: Path, meta: dict, tokenizer_from) -> Path | None:
    if tokenizer_from is not None:
        p = Path(tokenizer_from)
        if not p.is_dir():
            raise FileNotFoundError(f"tokenizer_from={p}: not a folder")
        return p
    t = meta.get("tokenizer_from")
    if not t:
        return None
    p = Path(t)
    if not p.is_absolute():
        p = root / p
    if not p.is_dir():
        raise FileNotFoundError(f"{root}: meta tokenizer_from={t!r} is not a folder "
                                "(pass tokenizer_from= / --tokenizer-from to override)")
    return p


def export_hf(ckpt_root_or_step_dir: str | os.PathLike, out_dir: str | os.PathLike, step: int | None = None,
              dtype: str = "bfloat16", max_shard_bytes: int | str = 2 * 1024**3,
              tokenizer_from: str | os.PathLike | None = None) -> Path:
    """Stream checkpoint `step` (default: the latest sealed one) into a Hugging Face folder
    `out_dir`: config.json, safetensors shards (+ index when more than one),
    generation_config.json, tokenizer files, manifest.json. The step is verified against
    its manifest first (CheckpointCorrupt / CheckpointUnsealed otherwise). Atomic: written
    under a temporary name, then published."""
    np_dtype(dtype)  # an unsupported dtype fails before any work
    max_shard_bytes = parse_size(max_shard_bytes)
    root, step = _resolve_step(Path(ckpt_root_or_step_dir), step)
    meta = Checkpointer(root, create=False).restore_meta(step)
    if "model_config" not in meta:
        raise KeyError(f"{root}/{step}: meta has no 'model_config' (save it with meta={{'model_config': "
                       "cfg.to_hf_config()}})")
    cfg = ModelConfig.from_hf_config(meta["model_config"])
    tok = _tokenizer_folder(root, meta, tokenizer_from)
    plan = _plan(cfg, _StoredArrays(root / str(step) / "params"), np_dtype(dtype))
    with atomic_folder(out_dir) as tmp:
        files = write_safetensors(tmp, plan, dtype, max_shard_bytes)
        write_side_files(tmp, cfg, dtype, tok)
        files.update(hash_files(tmp, skip=files))
        manifest = {"format": MANIFEST_FORMAT, "checkpoint": str(root), "step": step, "dtype": dtype,
                    "files": dict(sorted(files.items()))}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return Path(out_dir).absolute()


def verify_export(folder: str | os.PathLike, checksums: bool = True) -> dict:
    """Check an export against its manifest.json (every file present, of the right size,
    and with `checksums` its sha256); return the manifest. Raises ExportError naming the
    file on a partial or corrupt export."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ExportError(f"{folder}: export folder not found")
    mf = folder / MANIFEST
    if not mf.exists():
        raise ExportError(f"{mf}: missing: {folder} is a partial export, or not made by fem_jax.checkpoint.export_hf")
    manifest = read_json(mf, ExportError)
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ExportError(f"{mf}: format {manifest.get('format') if isinstance(manifest, dict) else None!r}, "
                          f"expected {MANIFEST_FORMAT!r}")
    check_files(folder, manifest.get("files") or {}, mf, ExportError, checksums=checksums)
    return manifest


# ----------------------------------------------------------------------------- import


def import_hf(hf_dir: str | os.PathLike, ckpt_root: str | os.PathLike, step: int = 0, dtype: str = "float32") -> None:
    """A Hugging Face folder into checkpoint `step` under `ckpt_root` (parameters in
    `dtype`; float32 holds bfloat16/float16 weights exactly). The tokenizer and generation
    config files are copied into `ckpt_root/hf_assets` and meta's tokenizer_from points there."""
    from .models.hf import from_pretrained

    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").exists():
        raise FileNotFoundError(f"{hf_dir / 'config.json'}: not found (is {hf_dir} a Hugging Face model folder?)")
    model = from_pretrained(hf_dir, dtype=dtype)
    root = Path(ckpt_root).absolute()
    root.mkdir(parents=True, exist_ok=True)
    assets = [f for f in (*TOKENIZER_FILES, "generation_config.json") if (hf_dir / f).exists()]
    meta = {"model_config": model.cfg.to_hf_config(), "source": str(hf_dir.absolute())}
    if assets:
        with atomic_folder(root / ASSETS_DIR) as tmp:
            for f in assets:
                shutil.copy(hf_dir / f, tmp / f)
        meta["tokenizer_from"] = ASSETS_DIR
    ck = Checkpointer(root)
    ck.save(step, model.param_dict(), meta=meta)
    ck.close()
