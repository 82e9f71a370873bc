"""Multi-device checks for tests/test_mesh.py, run in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (set before jax is first imported).

    python tests/mesh_check.py OUT_DIR

Writes OUT_DIR/report.json. Nothing is asserted here: the test reads the report, so a
failure names the mesh and the parameter.

A tiny Qwen2-layout model (qkv bias, untied lm_head) is saved as a Hugging Face folder,
loaded unsharded and on each mesh; one M-step (2 micro-batches of accumulation) runs on
each mesh from the same weights and batch.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fem_jax.config import MStepCfg
from fem_jax.models import from_pretrained
from fem_jax.models.hf import save_pretrained
from fem_jax.models.transformer import ModelConfig, Transformer, param_shapes
from fem_jax.mstep import TrainExample, Trainer, make_batches
from fem_jax.sharding import constrainer, logical_to_spec, make_mesh

MESHES = ["data=1", "data=8", "fsdp=8", "fsdp=4,tensor=2", "data=2,fsdp=2,tensor=2"]
CFG = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, qkv_bias=True,
                  tie_word_embeddings=False, model_type="qwen2", max_position_embeddings=256,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
MCFG = MStepCfg(lr_start=1e-4, batch_size=16, micro_batch_size=8, max_seq_len=64, weight_decay=0.01)


def spec_list(x) -> list:
    """An array's PartitionSpec as JSON: one entry per dimension (None, an axis, or a list
    of axes); trailing unsharded dimensions, which jit's outputs leave out, filled in."""
    spec = list(x.sharding.spec) + [None] * (x.ndim - len(x.sharding.spec))
    return [list(e) if isinstance(e, tuple) else e for e in spec]


def examples(n: int = 16, seed: int = 0) -> list[TrainExample]:
    rng = np.random.RandomState(seed)
    out = []
    for _ in range(n):
        p = rng.randint(3, CFG.vocab_size, rng.randint(4, 12)).tolist()
        c = rng.randint(3, CFG.vocab_size, rng.randint(3, 16)).tolist()
        out.append(TrainExample(p, c, reward=1.0))
    return out


def opt_leaves(opt_state) -> dict[str, jax.Array]:
    """Adam moments by 'mu/<param>' and 'nu/<param>'."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(opt_state):
        names = [getattr(p, "name", getattr(p, "key", None)) for p in path]
        if len(names) >= 2 and names[-2] in ("mu", "nu"):
            out[f"{names[-2]}/{names[-1]}"] = leaf
    return out


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def sharding_report(tr: Trainer) -> dict:
    """Specs of parameters and Adam moments, whether they are the table's layout, and the
    shapes of their per-device pieces."""
    want_opt = {k: v for k, v in opt_leaves(tr._opt_shardings(tr.params)).items()}
    if tr.opt_state is None:  # created lazily by the first step
        tr.reset_optimizer()
    mom = opt_leaves(tr.opt_state)
    r = {"param_specs": {k: spec_list(v) for k, v in tr.params.items()},
         "opt_specs": {k: spec_list(v) for k, v in mom.items()},
         "opt_shard_shapes": {k: sorted({tuple(s.data.shape) for s in v.addressable_shards}) for k, v in mom.items()}}
    if tr.param_shardings is not None:
        r["params_as_table"] = all(v.sharding.is_equivalent_to(tr.param_shardings[k], v.ndim)
                                   for k, v in tr.params.items())
        r["opt_as_planned"] = bool(mom) and all(v.sharding.is_equivalent_to(want_opt[k], v.ndim)
                                                for k, v in mom.items())
    return r


def main(out: Path) -> None:
    rep: dict = {"devices": len(jax.devices())}
    shapes = param_shapes(CFG)
    model = Transformer(CFG, dtype=jnp.float32, rngs=nnx.Rngs(0), init_std=0.1)
    save_pretrained(model, out / "hf")
    base = {k: np.asarray(v) for k, v in from_pretrained(out / "hf").param_dict().items()}
    batches = make_batches(examples(), MCFG, pad_id=0, seed=0)
    assert len(batches) == 1, len(batches)
    batch = batches[0]
    rep["batch_shape"] = list(batch["input_ids"].shape)
    rep["lr"] = MCFG.lr_start

    results, state, trainers = {}, {}, {}
    for spec in MESHES:
        mesh = make_mesh(spec)
        r: dict = {"mesh": dict(mesh.shape)}
        # ---- from_pretrained straight into shards
        loaded = from_pretrained(out / "hf", mesh=mesh).param_dict()
        r["load_values_equal"] = {k: bool(np.array_equal(np.asarray(v), base[k])) for k, v in loaded.items()}
        r["load_specs"] = {k: spec_list(v) for k, v in loaded.items()}
        r["table_specs"] = {k: [list(e) if isinstance(e, tuple) else e
                                for e in logical_to_spec(mesh, shapes[k][1], shapes[k][0])] for k in shapes}
        r["load_shard_shapes"] = {k: sorted({tuple(s.data.shape) for s in v.addressable_shards})
                                  for k, v in loaded.items()}
        r["load_n_devices"] = {k: len(v.sharding.device_set) for k, v in loaded.items()}
        # ---- one M-step
        tr = Trainer(CFG, loaded, MCFG, mesh=mesh)
        r["before"] = sharding_report(tr)
        r["metrics"] = tr.step(batch)
        r["after"] = sharding_report(tr)
        bs = jax.device_put(batch["input_ids"], tr.batch_sharding)
        r["batch_spec"] = spec_list(bs)
        r["batch_shard_shapes"] = sorted({tuple(s.data.shape) for s in bs.addressable_shards})
        pin = constrainer(mesh)
        x = jax.jit(lambda x: pin(x, ("batch", "seq", "act_embed")))(jnp.zeros((8, 32, CFG.hidden_size)))
        r["activation_spec"] = spec_list(x)
        state[spec] = ({k: np.asarray(v) for k, v in tr.params.items()},
                       {k: np.asarray(v) for k, v in opt_leaves(tr.opt_state).items()})
        results[spec] = r
        trainers[spec] = tr
    rep["meshes"] = results

    # ---- every mesh against data=1 (one device)
    ref_p, ref_o = state["data=1"]
    ref_m = results["data=1"]["metrics"]
    rep["compare"] = {spec: {
        "loss": rel(results[spec]["metrics"]["loss"], ref_m["loss"]),
        "grad_norm": rel(results[spec]["metrics"]["grad_norm"], ref_m["grad_norm"]),
        "params": {k: rel(p[k], ref_p[k]) for k in ref_p},
        "params_abs": {k: float(np.abs(p[k] - ref_p[k]).max()) for k in ref_p},
        "moments": {k: rel(o[k], ref_o[k]) for k in ref_o},
    } for spec, (p, o) in state.items()}
    rep["update_size"] = {k: float(np.abs(ref_p[k] - base[k]).max()) for k in ref_p}
    rep["param_size"] = {k: float(np.abs(ref_p[k]).max()) for k in ref_p}

    # ---- remat: same loss, moments (= clipped gradients) and parameters on a sharded mesh
    a = "fsdp=4,tensor=2"
    tr = Trainer(CFG, {k: jnp.asarray(v) for k, v in base.items()}, MCFG, mesh=make_mesh(a), remat=True)
    m = tr.step(batch)
    rep["remat"] = {"loss": rel(m["loss"], results[a]["metrics"]["loss"]),
                    "grad_norm": rel(m["grad_norm"], results[a]["metrics"]["grad_norm"]),
                    "moments": {k: rel(v, state[a][1][k]) for k, v in opt_leaves(tr.opt_state).items()},
                    "params": {k: rel(v, state[a][0][k]) for k, v in tr.params.items()},
                    "params_abs": {k: float(np.abs(np.asarray(v) - state[a][0][k]).max())
                                   for k, v in tr.params.items()}}

    # ---- a Trainer's state saved on one mesh, restored onto another Trainer's mesh
    try:
        from fem_jax.checkpoint import Checkpointer
    except ImportError as e:
        rep["checkpoint"] = f"skipped: {e}"
    else:
        b = "data=2,fsdp=2,tensor=2"
        src, dst = trainers[a], trainers[b]
        ck = Checkpointer(out / "ck")
        ck.save(1, src.params, src.opt_state)
        like = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=dst.param_shardings[k])
                for k, v in dst.params.items()}
        opt_like = dst.opt_state_like()
        params, opt_state, _ = Checkpointer(out / "ck").restore(1, like, opt_like)
        same_tree = jax.tree.structure(opt_state) == jax.tree.structure(dst.opt_state)
        src_o = jax.tree.leaves(src.opt_state)
        dst.params, dst.opt_state = params, opt_state
        rc = {"values": all(np.array_equal(np.asarray(params[k]), np.asarray(v)) for k, v in src.params.items()),
              "opt_values": same_tree and all(np.array_equal(np.asarray(x), np.asarray(y))
                                               for x, y in zip(jax.tree.leaves(opt_state), src_o)),
              "opt_tree": same_tree, **sharding_report(dst)}
        # the next step continues identically from the restored state (a second batch order)
        nxt = make_batches(examples(seed=1), MCFG, pad_id=0, seed=1)[0]
        rc["next_loss"] = [src.step(nxt)["loss"], dst.step(nxt)["loss"]]
        rep["checkpoint"] = rc

    # ---- a micro-batch the mesh cannot split: a clear error naming the config field
    try:
        Trainer(CFG, {k: jnp.asarray(v) for k, v in base.items()},
                dataclasses.replace(MCFG, batch_size=12, micro_batch_size=6), mesh=make_mesh("data=2,fsdp=4"))
        rep["indivisible_error"] = None
    except ValueError as e:
        rep["indivisible_error"] = str(e)

    (out / "report.json").write_text(json.dumps(rep, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
