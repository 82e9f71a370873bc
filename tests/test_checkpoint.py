"""Orbax checkpoints and the orbax ⇄ Hugging Face bridge.

- A checkpoint saved on a fake 8-device mesh (fsdp=4,tensor=2) restores onto other
  meshes (fsdp=8, tensor=2, one device) into exactly the requested shardings, optimizer
  state included; exported to Hugging Face it loads in transformers and gives our model's
  logits (float32 export: tight; bfloat16 export: tight against our model with
  bf16-rounded weights, close against the float32 one). These run in one subprocess,
  because XLA_FLAGS must be set before jax is first imported.
- HF -> orbax -> HF is bit-identical, float32 and bfloat16, single file and sharded.
- verify_export refuses a truncated, corrupted or missing file, naming it; an export
  killed mid-write leaves nothing at the destination.
- Checkpoint steps are sealed with a manifest: restore / restore_meta / export_hf and the
  convert CLI refuse overwritten, truncated, missing or added files, naming them; a step
  without its manifest is reported apart (unsealed), dropped or redone; max_to_keep deletes
  an old step only once the new one is sealed.
- Exports honour the umask.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from fem_jax.checkpoint import (CheckpointCorrupt, Checkpointer, CheckpointUnsealed, ExportError, export_hf, import_hf,
                                verify_export)
from hf_models import assert_close, build_hf, save_hf, tiny_config

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def _run(script: str, tmp: Path, timeout=120) -> subprocess.CompletedProcess:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS), os.environ.get("PYTHONPATH", "")])}
    f = tmp / "script.py"
    f.write_text(textwrap.dedent(script))
    return subprocess.run([sys.executable, str(f), str(tmp)], env=env, capture_output=True, text=True,
                          timeout=timeout)


MESH_SCRIPT = """
import json, sys
from pathlib import Path
import jax, jax.numpy as jnp, numpy as np, optax
from fem_jax.checkpoint import Checkpointer, export_hf, _StoredArrays
from fem_jax.models import from_pretrained, forward, param_shapes
from fem_jax.sharding import make_mesh, param_sharding

tmp = Path(sys.argv[1])
assert len(jax.devices()) == 8, jax.devices()
mesh = make_mesh("fsdp=4,tensor=2")
model = from_pretrained(tmp / "hf", mesh=mesh)
cfg = model.cfg
# a "trained" state: weights moved away from the source folder's, sharded like the model
key = jax.random.PRNGKey(1)
params = {k: v + 0.05 * jax.random.normal(jax.random.fold_in(key, i), v.shape, v.dtype)
          for i, (k, v) in enumerate(sorted(model.param_dict().items()))}
tx = optax.adamw(1e-2)
opt = tx.init(params)
_, opt = tx.update(jax.tree.map(lambda p: 0.1 * p, params), opt, params)
report = {"save_specs": {k: str(v.sharding.spec) for k, v in params.items()}}

ck = Checkpointer(tmp / "ck")
ck.save(3, params, opt, meta={"model_config": cfg.to_hf_config(), "tokenizer_from": str(tmp / "hf"),
                             "metrics": {"acc": np.float32(0.5)}})
report["steps"] = ck.all_steps()
stored = _StoredArrays(tmp / "ck" / "3" / "params")
report["wq_chunk"] = list(stored["layers/wq"].chunk_layout.read_chunk.shape)

shapes = param_shapes(cfg)
ok = {}
for spec in ["fsdp=8", "tensor=2", "data=2,fsdp=2,tensor=2", "single"]:
    if spec == "single":
        sh = lambda k: jax.sharding.SingleDeviceSharding(jax.devices()[3])
    else:
        m2 = make_mesh(spec)
        sh = lambda k, m2=m2: param_sharding(m2, shapes[k][1], shapes[k][0])
    like = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sh(k)) for k, v in params.items()}
    opt_like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), opt)
    p2, o2, meta = Checkpointer(tmp / "ck").restore(3, like, opt_like)
    ok[spec] = {
        "values": all(bool(np.array_equal(np.asarray(p2[k]), np.asarray(params[k]))) for k in params),
        "shardings": all(p2[k].sharding == like[k].sharding for k in params),
        "opt": all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), o2, opt))),
        "meta": meta["metrics"] == {"acc": 0.5} and meta["tokenizer_from"] == str(tmp / "hf"),
    }
report["restore"] = ok

ids = np.random.RandomState(0).randint(3, cfg.vocab_size, (2, 11))
logits, _ = forward(cfg, params, jnp.asarray(ids))
np.save(tmp / "ids.npy", ids)
np.save(tmp / "logits_f32.npy", np.asarray(logits))
rounded = {k: v.astype(jnp.bfloat16).astype(jnp.float32) for k, v in params.items()}
np.save(tmp / "logits_bf16w.npy", np.asarray(forward(cfg, rounded, jnp.asarray(ids))[0]))
export_hf(tmp / "ck", tmp / "out_f32", dtype="float32")
export_hf(tmp / "ck" / "3", tmp / "out_bf16", dtype="bfloat16", max_shard_bytes=60_000)
(tmp / "report.json").write_text(json.dumps(report))
"""


@pytest.fixture(scope="module")
def mesh_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mesh")
    save_hf(build_hf(tiny_config("qwen2", tied=False)), tmp / "hf")
    r = _run(MESH_SCRIPT, tmp)
    assert r.returncode == 0, r.stderr[-4000:]
    return tmp, json.loads((tmp / "report.json").read_text())


def test_saved_sharded_and_one_layer_per_chunk(mesh_run):
    _, rep = mesh_run
    assert rep["steps"] == [3]
    assert "fsdp" in rep["save_specs"]["layers/wq"] and "tensor" in rep["save_specs"]["layers/wq"]
    assert rep["wq_chunk"][0] == 1, rep["wq_chunk"]  # export reads one layer without the others


@pytest.mark.parametrize("spec", ["fsdp=8", "tensor=2", "data=2,fsdp=2,tensor=2", "single"])
def test_restore_on_another_mesh(mesh_run, spec):
    _, rep = mesh_run
    assert rep["restore"][spec] == {"values": True, "shardings": True, "opt": True, "meta": True}


def _tf_logits(folder: Path, ids: np.ndarray) -> np.ndarray:
    m = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return m(torch.tensor(ids)).logits.float().numpy()


def test_export_float32_loads_in_transformers_with_our_logits(mesh_run):
    tmp, _ = mesh_run
    verify_export(tmp / "out_f32")
    ids = np.load(tmp / "ids.npy")
    assert_close(_tf_logits(tmp / "out_f32", ids), np.load(tmp / "logits_f32.npy"), 1e-5)


def test_export_bfloat16_sharded(mesh_run):
    tmp, _ = mesh_run
    out = tmp / "out_bf16"
    manifest = verify_export(out)
    shards = sorted(f for f in manifest["files"] if f.endswith(".safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").exists()
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    for f in ("tokenizer_config.json", "generation_config.json"):
        if (tmp / "hf" / f).exists():
            assert (out / f).exists(), f
    ids = np.load(tmp / "ids.npy")
    ref = _tf_logits(out, ids)
    assert_close(ref, np.load(tmp / "logits_bf16w.npy"), 1e-5, "logits vs bf16-rounded weights")
    assert_close(ref, np.load(tmp / "logits_f32.npy"), 3e-2, "logits vs float32 weights")


# ----------------------------------------------------------------------------- HF -> orbax -> HF


def _tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("dtype,shard", [("float32", "2GB"), ("bfloat16", "30KB")])
def test_hf_orbax_hf_bit_identical(tmp_path, dtype, shard):
    from fem_jax.convert import main

    hf = build_hf(tiny_config("llama", bias=True, tied=True))
    if dtype == "bfloat16":
        hf = hf.to(torch.bfloat16)
    src = save_hf(hf, tmp_path / "hf")
    assert main([str(src), str(tmp_path / "ck")]) == 0  # HF -> orbax (float32 master weights)
    assert main([str(tmp_path / "ck"), str(tmp_path / "out"), "--dtype", dtype, "--max-shard-size", shard]) == 0
    a, b = _tensors(src), _tensors(tmp_path / "out")
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k].view(torch.int16 if dtype == "bfloat16" else torch.int32),
                           b[k].view(torch.int16 if dtype == "bfloat16" else torch.int32)), k
    assert (len(list((tmp_path / "out").glob("*.safetensors"))) > 1) == (shard == "30KB")
    verify_export(tmp_path / "out")


def test_checkpointer_errors(tmp_path):
    import jax.numpy as jnp

    ck = Checkpointer(tmp_path / "ck")
    assert ck.latest_step() is None and ck.all_steps() == []
    p = {"embed": jnp.arange(12.0).reshape(3, 4)}
    ck.save(0, p)
    ck.save(5, p, meta={"k": 1})
    assert ck.all_steps() == [0, 5] and ck.latest_step() == 5
    with pytest.raises(ValueError, match="step 5 already exists"):
        ck.save(5, p)
    with pytest.raises(FileNotFoundError, match="no complete step 2"):
        ck.restore(2, p)
    with pytest.raises(ValueError, match="does not match"):
        ck.restore(5, {"embed": jnp.zeros((4, 4))})
    with pytest.raises(ValueError, match="without an optimizer state"):
        ck.restore(5, p, opt_state_like={"x": jnp.zeros(2)})
    params, opt, meta = ck.restore(None, p)
    assert np.array_equal(params["embed"], p["embed"]) and opt is None and meta["k"] == 1
    with pytest.raises(KeyError, match="model_config"):
        export_hf(tmp_path / "ck", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(TypeError, match="not JSON"):
        ck.save(6, p, meta={"x": object()})
    kept = Checkpointer(tmp_path / "ck2", max_to_keep=2)
    for s in range(4):
        kept.save(s, p)
    assert kept.all_steps() == [2, 3]


def test_convert_cli_errors(tmp_path, capsys):
    from fem_jax.convert import main

    (tmp_path / "junk").mkdir()
    with pytest.raises(SystemExit):
        main([str(tmp_path / "junk"), str(tmp_path / "x")])
    assert "neither a Hugging Face folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(tmp_path / "nope"), str(tmp_path / "x")])
    assert "not found" in capsys.readouterr().err


# ----------------------------------------------------------------------------- refusing bad exports


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("small")
    src = save_hf(build_hf(tiny_config("qwen2")), tmp / "hf")
    import_hf(src, tmp / "ck")
    return tmp


def test_verify_export_refuses_damage(small_ckpt, tmp_path):
    import shutil

    good = export_hf(small_ckpt / "ck", tmp_path / "good", max_shard_bytes=40_000)
    verify_export(good)
    shard = sorted(good.glob("model-*.safetensors"))[0]

    def damaged(name):
        d = tmp_path / name
        shutil.copytree(good, d)
        return d, d / shard.name

    d, f = damaged("truncated")
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(ExportError, match=f"{f.name}.*truncated"):
        verify_export(d)

    d, f = damaged("flipped")
    raw = bytearray(f.read_bytes())
    raw[-5] ^= 0xFF
    f.write_bytes(bytes(raw))
    verify_export(d, checksums=False)  # same size: only the checksum sees it
    with pytest.raises(ExportError, match=f"{f.name}.*sha256"):
        verify_export(d)

    d, f = damaged("missing")
    f.unlink()
    with pytest.raises(ExportError, match=f"{f.name}.*missing"):
        verify_export(d)

    d, _ = damaged("nomanifest")
    (d / "manifest.json").unlink()
    with pytest.raises(ExportError, match="manifest.json.*partial export"):
        verify_export(d)


KILL_SCRIPT = """
import os, signal, sys
from pathlib import Path
import fem_jax.checkpoint as C
import fem_jax.models.hf as H

tmp = Path(sys.argv[1])
real = H._write_file
def write_then_die(file, tensors, dtype):
    real(file, tensors, dtype)
    os.kill(os.getpid(), signal.SIGKILL)  # killed after the first shard is on disk
H._write_file = write_then_die
C.export_hf(tmp / "ck", tmp / "dest", max_shard_bytes=40_000)
"""


def test_killed_export_leaves_no_destination(small_ckpt):
    tmp = small_ckpt
    r = _run(KILL_SCRIPT, tmp)
    assert r.returncode == -9, (r.returncode, r.stderr[-2000:])
    assert not (tmp / "dest").exists()
    stale = list(tmp.glob(".dest.tmp-*"))
    assert stale, "the killed export should have left its temporary folder"
    export_hf(tmp / "ck", tmp / "dest", max_shard_bytes=40_000)  # a new export cleans it up
    verify_export(tmp / "dest")
    assert not any(p.exists() for p in stale)


# ----------------------------------------------------------------------------- sealed checkpoint steps


def _small_params():
    import jax
    import jax.numpy as jnp

    return {"embed": jax.random.normal(jax.random.PRNGKey(0), (64, 32)), "layers/wq": jnp.ones((2, 3, 4))}


def _largest_data_file(step_dir: Path) -> Path:
    return max((f for f in (step_dir / "params").rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)


def test_overwritten_bytes_are_refused_naming_the_file(tmp_path):
    """64 bytes overwritten inside a data file, size unchanged: without the manifest check
    orbax restores other weights without a word; restore / restore_meta / export_hf refuse."""
    ck = Checkpointer(tmp_path / "ck")
    p = _small_params()
    ck.save(0, p, meta={"model_config": {}})
    f = _largest_data_file(tmp_path / "ck" / "0")
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2: len(raw) // 2 + 64] = b"\xff" * 64
    f.write_bytes(bytes(raw))
    silent, _, _ = ck.restore(0, p, verify=False)
    assert not np.array_equal(np.asarray(silent["embed"]), np.asarray(p["embed"]))  # the damage is real
    for call in (lambda: ck.restore(0, p), lambda: ck.restore(None, p), lambda: ck.restore_meta(0),
                 lambda: export_hf(tmp_path / "ck", tmp_path / "out")):
        with pytest.raises(CheckpointCorrupt, match=rf"{f.name}: sha256 differs"):
            call()
    assert not (tmp_path / "out").exists()
    ck.verify_step(0, checksums=False)  # same size: only the checksum sees it


def test_truncated_missing_and_added_files_are_refused(tmp_path):
    ck = Checkpointer(tmp_path / "ck")
    p = _small_params()
    ck.save(0, p, meta={"k": 1})
    step = tmp_path / "ck" / "0"
    f = _largest_data_file(step)
    keep = f.read_bytes()
    f.write_bytes(keep[:-10])
    with pytest.raises(CheckpointCorrupt, match=rf"{f.name}: {len(keep) - 10} bytes.*truncated"):
        ck.restore(0, p)
    f.unlink()
    with pytest.raises(CheckpointCorrupt, match=rf"{f.name}: listed in fem_manifest.json but missing"):
        ck.restore(0, p)
    f.write_bytes(keep)
    (step / "params" / "stray.bin").write_bytes(b"x")
    with pytest.raises(CheckpointCorrupt, match="stray.bin: not listed"):
        ck.restore(0, p)
    (step / "params" / "stray.bin").unlink()
    assert ck.restore(0, p)[2]["k"] == 1
    (step / "fem_manifest.json").write_text('{"format": "fem-jax-checkpoint-st')
    with pytest.raises(CheckpointCorrupt, match="fem_manifest.json: not valid JSON") as e:
        ck.restore(0, p)
    assert not isinstance(e.value, json.JSONDecodeError)


def test_truncated_meta_json_names_the_file(tmp_path):
    """Defect 5: a truncated meta file is an error naming it (caught by the manifest's size,
    and without the manifest check, by the JSON read), never a bare JSONDecodeError."""
    ck = Checkpointer(tmp_path / "ck")
    p = _small_params()
    ck.save(0, p, meta={"k": "v" * 100})
    mf = tmp_path / "ck" / "0" / "meta" / "metadata"
    mf.write_bytes(mf.read_bytes()[:40])
    with pytest.raises(CheckpointCorrupt, match="meta/metadata: 40 bytes"):
        ck.restore_meta(0)
    for call in (lambda: ck.restore_meta(0, verify=False), lambda: ck.restore(0, p, verify=False)):
        with pytest.raises(CheckpointCorrupt, match="meta/metadata: unreadable checkpoint meta") as e:
            call()
        assert not isinstance(e.value, json.JSONDecodeError) and "\n" not in str(e.value)


def test_unsealed_step_is_reported_apart_and_dropped(tmp_path):
    """A step orbax finished but whose manifest is missing (killed between the two): not
    listed, not restorable, named by unsealed_steps(); save() of the same step redoes it;
    drop_unsealed() deletes it through orbax; seal() adopts one as it is."""
    ck = Checkpointer(tmp_path / "ck")
    p = _small_params()
    for s in (1, 2, 3):
        ck.save(s, p)
    (tmp_path / "ck" / "3" / "fem_manifest.json").unlink()
    (tmp_path / "ck" / "2" / "fem_manifest.json").unlink()
    assert ck.all_steps() == [1] and ck.latest_step() == 1 and ck.unsealed_steps() == [2, 3]
    with pytest.raises(CheckpointUnsealed, match=r"3/fem_manifest.json: missing: step 3 is unsealed"):
        ck.restore(3, p)
    assert ck.restore(None, p)[0].keys() == p.keys()  # None: the latest sealed step, 1
    with pytest.raises(CheckpointUnsealed):
        export_hf(tmp_path / "ck" / "3", tmp_path / "out")
    ck.save(2, p, meta={"redone": True})  # the loop redoes an unsealed iteration
    assert ck.all_steps() == [1, 2] and ck.restore_meta(2)["redone"] is True
    assert Checkpointer(tmp_path / "ck").drop_unsealed() == [3]
    assert not (tmp_path / "ck" / "3").exists() and ck.unsealed_steps() == []
    (tmp_path / "ck" / "1" / "fem_manifest.json").unlink()
    ck.seal(1)
    assert ck.all_steps() == [1, 2]


def test_max_to_keep_deletes_only_after_the_new_step_is_sealed(tmp_path, monkeypatch):
    """max_to_keep=1 and a process killed after orbax wrote step 1 but before its seal:
    step 0 must still be there to resume from."""
    class Killed(BaseException):
        pass

    ck = Checkpointer(tmp_path / "ck", max_to_keep=1)
    p = _small_params()
    ck.save(0, p)

    def die(self, step):
        raise Killed

    monkeypatch.setattr(Checkpointer, "seal", die)
    with pytest.raises(Killed):
        ck.save(1, p)
    monkeypatch.undo()
    ck = Checkpointer(tmp_path / "ck", max_to_keep=1)
    assert ck.latest_step() == 0 and ck.unsealed_steps() == [1]
    ck.save(1, p)
    assert ck.all_steps() == [1] and ck.unsealed_steps() == []


def test_convert_cli_refuses_a_corrupt_step(small_ckpt, tmp_path, capsys):
    import shutil

    from fem_jax.convert import main

    ck = tmp_path / "ck"
    shutil.copytree(small_ckpt / "ck", ck)
    f = _largest_data_file(ck / "0")
    raw = bytearray(f.read_bytes())
    raw[100:164] = bytes(64)
    f.write_bytes(bytes(raw))
    assert main([str(ck), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    assert err.startswith("python -m fem_jax.convert: error: ") and f"{f}: sha256 differs" in err, err
    assert not (tmp_path / "out").exists()
    (ck / "0" / "fem_manifest.json").unlink()
    assert main([str(ck / "0"), str(tmp_path / "out")]) == 2
    assert "step 0 is unsealed" in capsys.readouterr().err


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_export_honours_the_umask(small_ckpt, tmp_path, mask):
    old = os.umask(mask)
    try:
        out = export_hf(small_ckpt / "ck", tmp_path / "out")
    finally:
        os.umask(old)
    assert oct(out.stat().st_mode & 0o777) == oct(0o777 & ~mask)
    modes = {f.name: oct(f.stat().st_mode & 0o777) for f in out.iterdir()}
    assert set(modes.values()) == {oct(0o666 & ~mask)}, modes


def test_export_and_save_params_write_the_same_bytes(small_ckpt, tmp_path):
    """One writer: the streamed export (blocks from TensorStore) and save_params (blocks from
    device arrays) give byte-identical weight files and config for the same parameters."""
    import jax

    from fem_jax.models.hf import save_params

    ck = Checkpointer(small_ckpt / "ck", create=False)
    meta = ck.restore_meta(0)
    like = {k: jax.ShapeDtypeStruct(tuple(v["shape"]), v["dtype"]) for k, v in meta["_fem"]["params"].items()}
    params, _, _ = ck.restore(0, like)
    for dtype, shard in (("float32", 2**30), ("bfloat16", 30_000)):
        a = export_hf(small_ckpt / "ck", tmp_path / f"export-{dtype}", dtype=dtype, max_shard_bytes=shard)
        b = save_params(params, meta["model_config"], tmp_path / f"saved-{dtype}", dtype=dtype,
                        max_shard_bytes=shard)
        names = sorted(f.name for f in a.iterdir() if f.name.startswith(("config", "model")))
        assert len(names) > (2 if shard < 2**30 else 1), names
        for name in names:
            assert (a / name).read_bytes() == (b / name).read_bytes(), (dtype, name)


MULTIPROCESS_SCRIPT = """
import json, sys
from pathlib import Path
import jax
pid, port, tmp = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=pid)
import numpy as np, jax.numpy as jnp
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from fem_jax.checkpoint import Checkpointer

sh = NamedSharding(Mesh(np.array(jax.devices()), ("fsdp",)), P("fsdp"))
want = np.arange(32, dtype=np.float32).reshape(8, 4)
x = jax.make_array_from_callback((8, 4), sh, lambda idx: want[idx])
ck = Checkpointer(tmp / "ck", max_to_keep=1)
ck.save(1, {"embed": x}, meta={"p": 1})
ck.save(2, {"embed": x}, meta={"p": 2})
p, _, meta = ck.restore(None, {"embed": jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=sh)})
got = np.asarray(multihost_utils.process_allgather(p["embed"], tiled=True))
print("REPORT " + json.dumps({"steps": ck.all_steps(), "unsealed": ck.unsealed_steps(), "meta": meta["p"],
                              "values": bool(np.array_equal(got, want))}))
ck.close()
"""


def test_two_processes_seal_prune_and_verify(tmp_path):
    """jax.distributed over two CPU processes: both write their shards, process 0 seals
    after the barrier (the manifest lists both processes' files), both prune through orbax's
    collective delete and both verify and restore."""
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = str(s.getsockname()[1])
    f = tmp_path / "mp.py"
    f.write_text(textwrap.dedent(MULTIPROCESS_SCRIPT))
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, str(f), str(i), port, str(tmp_path)], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in (0, 1)]
    try:
        outs = [p.communicate(timeout=180) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
        rep = json.loads([ln for ln in out.splitlines() if ln.startswith("REPORT ")][-1][len("REPORT "):])
        assert rep == {"steps": [2], "unsealed": [], "meta": 2, "values": True}, rep
    files = json.loads((tmp_path / "ck" / "2" / "fem_manifest.json").read_text())["files"]
    assert {n.split("/")[1] for n in files if n.startswith("params/ocdbt.process_")} == {
        "ocdbt.process_0", "ocdbt.process_1"}


# ----------------------------------------------------------------------------- the layout codec


@pytest.mark.parametrize("layout,shape", [("copy", (5, 3)), ("T", (5, 3)), ("in_heads", (6, 2, 4)),
                                          ("out_heads", (2, 4, 6)), ("heads", (2, 4))])
def test_codec_round_trip(layout, shape):
    from fem_jax.models.hf import hf_shape, to_hf, to_ours

    a = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    h = to_hf(a, layout)
    assert h.shape == hf_shape(shape, layout)
    np.testing.assert_array_equal(to_ours(np.ascontiguousarray(h), layout, shape), a)
