"""Layered parity of our Flax decoder against transformers' PyTorch models (float32).

Per op (RMSNorm, RoPE frequencies incl. llama3 scaling, rotary application), per
decoder layer (hidden states), then full logits over the variants: both families, tied
and untied, several GQA ratios, biases, rope_theta, llama3 scaling beyond the original
context, left padding, KV-cache decode, both config layouts, and the save round trip.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fem_jax.models import ModelConfig, forward, from_pretrained, init_cache, save_pretrained
from fem_jax.models import transformer as T
from hf_models import assert_close, build_hf, hf_logits, save_hf, tiny_config

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True, scope="module")
def _highest_matmul_precision():
    """Float32 parity needs float32 matmuls: a GPU's default precision is lower (TF32 or
    bfloat16 passes), the CPU's is not. Set here, so the module passes on both."""
    with jax.default_matmul_precision("highest"):
        yield


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}

VARIANTS = {
    "llama-gqa2-untied": dict(family="llama"),
    "llama-mha-tied": dict(family="llama", tied=True, heads=4, kv_heads=4),
    "llama-mqa-bias": dict(family="llama", heads=4, kv_heads=1, bias=True),
    "llama-gqa4-headdim-theta": dict(family="llama", heads=8, kv_heads=2, head_dim=12, theta=500000.0),
    "llama3-scaling": dict(family="llama", rope=LLAMA3_ROPE, theta=500000.0, tied=True),
    "qwen2-gqa2": dict(family="qwen2", theta=1000000.0),
    "qwen2-tied-gqa3": dict(family="qwen2", tied=True, heads=6, kv_heads=2, hidden=96),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache = {}

    def get(name, legacy=False):
        key = (name, legacy)
        if key not in cache:
            hf = build_hf(tiny_config(**VARIANTS[name]))
            folder = save_hf(hf, tmp_path_factory.mktemp(name.replace("-", "_")), legacy_config=legacy)
            cache[key] = (hf, folder, from_pretrained(folder))
        return cache[key]

    return get


def _ids(b, t, vocab=160, seed=0):
    return np.random.RandomState(seed).randint(3, vocab, (b, t))


def test_parity_runs_at_highest_matmul_precision():
    """The module fixture is in force (on a CPU it changes nothing; on a GPU, without it,
    the float32 parity tests below fail)."""
    assert jax.config.jax_default_matmul_precision == "highest"


# ----------------------------------------------------------------------------- per op


def test_rms_norm_matches_transformers():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(64, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64))
    x = np.random.RandomState(0).randn(2, 5, 64).astype(np.float32) * 3
    ref = norm(torch.tensor(x)).detach().numpy()
    ours = T.rms_norm(jnp.asarray(x), jnp.asarray(norm.weight.detach().numpy()), 1e-6)
    assert_close(ours, ref, 1e-6, "rms_norm")


@pytest.mark.parametrize("rope,theta", [(None, 10000.0), (LLAMA3_ROPE, 500000.0),
                                        ({"rope_type": "linear", "factor": 4.0}, 10000.0)])
def test_rope_frequencies_match_transformers(rope, theta):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    hf_cfg = tiny_config("llama", rope=rope, theta=theta)
    cfg = ModelConfig.from_hf_config(hf_cfg.to_dict())
    rot = LlamaRotaryEmbedding(hf_cfg)
    np.testing.assert_allclose(T.rope_inv_freq(cfg), rot.inv_freq.numpy(), rtol=1e-6)
    pos = np.array([[0, 1, 7, 40, 200, 511]])  # beyond original_max_position_embeddings=32
    x = np.random.RandomState(1).randn(1, 6, 4, cfg.head_dim).astype(np.float32)
    cos, sin = rot(torch.zeros(1), torch.tensor(pos))
    ref_q, _ = apply_rotary_pos_emb(torch.tensor(x).transpose(1, 2), torch.tensor(x).transpose(1, 2), cos, sin)
    ocos, osin = T.rope_cos_sin(cfg, jnp.asarray(pos), jnp.float32)
    ours = T.apply_rope(jnp.asarray(x), ocos, osin)
    assert_close(ours, ref_q.transpose(1, 2).numpy(), 1e-5, "rope")


# ----------------------------------------------------------------------------- per layer


@pytest.mark.parametrize("name", ["llama-mqa-bias", "qwen2-gqa2"])
def test_each_decoder_layer_matches(built, name):
    hf, _, model = built(name)
    ids = _ids(2, 9)
    with torch.no_grad():
        hs = hf(torch.tensor(ids), output_hidden_states=True).hidden_states
    p = model.param_dict()
    cfg = model.cfg
    x = jnp.take(p["embed"], jnp.asarray(ids), axis=0)
    assert_close(x, hs[0].numpy(), 1e-6, "embeddings")
    pos = jnp.broadcast_to(jnp.arange(9), (2, 9))
    cos, sin = T.rope_cos_sin(cfg, pos, jnp.float32)
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((9, 9), bool)), (2, 9, 9))
    for i in range(cfg.num_hidden_layers - 1):  # the last entry of hidden_states is normed
        lp = {k.split("/", 1)[1]: v[i] for k, v in p.items() if k.startswith("layers/")}
        x, _ = T.decoder_layer(cfg, lp, x, cos, sin, mask, None, 0)
        assert_close(x, hs[i + 1].numpy(), 1e-5, f"layer {i}")


# ----------------------------------------------------------------------------- full logits


@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_match(built, name):
    hf, _, model = built(name)
    t = 48 if "llama3" in name else 13  # llama3: beyond original_max_position_embeddings (32)
    ids = _ids(2, t)
    assert_close(model(ids), hf_logits(hf, ids))


@pytest.mark.parametrize("name", ["llama-gqa2-untied", "qwen2-gqa2"])
def test_left_padding_matches_unpadded(built, name):
    hf, _, model = built(name)
    ids = _ids(3, 12, seed=3)
    mask = np.ones_like(ids)
    mask[0, :5] = 0
    mask[2, :1] = 0
    ids[mask == 0] = 0
    ours = np.asarray(model(ids, attention_mask=mask))
    ref = hf_logits(hf, ids, mask)
    keep = mask.astype(bool)
    assert_close(ours[keep], ref[keep])
    # and each padded row equals the same prompt run alone, unpadded
    alone = np.asarray(model(ids[0:1, 5:]))
    assert_close(ours[0, 5:], alone[0], 1e-5, "padded vs alone")


@pytest.mark.parametrize("name", ["llama-gqa2-untied", "qwen2-tied-gqa3", "llama3-scaling"])
def test_kv_cache_decode_equals_full_forward(built, name):
    _, _, model = built(name)
    cfg = model.cfg
    p = model.param_dict()
    ids = _ids(2, 20, seed=5)
    mask = np.ones_like(ids)
    mask[1, :4] = 0  # a left-padded row
    full, _ = forward(cfg, p, jnp.asarray(ids), jnp.asarray(mask))
    cache = init_cache(cfg, 2, 32)
    prompt = 12
    logits, cache = forward(cfg, p, jnp.asarray(ids[:, :prompt]), jnp.asarray(mask[:, :prompt]),
                            cache=cache, cache_index=0)
    steps = [logits]
    step = jax.jit(lambda c, tok, i: forward(cfg, p, tok, None, cache=c, cache_index=i))
    for i in range(prompt, 20):
        logits, cache = step(cache, jnp.asarray(ids[:, i:i + 1]), i)
        steps.append(logits)
    dec = np.concatenate([np.asarray(s) for s in steps], axis=1)
    keep = mask.astype(bool)
    assert_close(dec[keep], np.asarray(full)[keep], 1e-5, "cached decode")


def test_legacy_config_layout_loads_the_same(built):
    hf, folder, model = built("llama3-scaling")
    _, legacy_folder, legacy = built("llama3-scaling", legacy=True)
    assert json.loads((legacy_folder / "config.json").read_text())["rope_scaling"]["rope_type"] == "llama3"
    assert legacy.cfg == model.cfg
    ids = _ids(1, 40)
    assert_close(legacy(ids), hf_logits(hf, ids))


def test_loading_in_row_blocks_is_exact(built, monkeypatch):
    """One device: the embedding and an untied lm_head (transposed) are written into the
    device array in blocks of rows, each layer in place; blocks of 7 rows give the very
    same parameters as the whole tensors, and the weights equal transformers' own."""
    from fem_jax.models import hf as hf_io

    hf, folder, model = built("llama-gqa2-untied")
    monkeypatch.setattr(hf_io, "_BLOCK_BYTES", 7 * model.cfg.hidden_size * 4)
    blocked = from_pretrained(folder).param_dict()
    for k, v in model.param_dict().items():
        assert np.array_equal(np.asarray(v), np.asarray(blocked[k])), k
    sd = hf.state_dict()
    assert np.array_equal(np.asarray(blocked["embed"]), sd["model.embed_tokens.weight"].numpy())
    assert np.array_equal(np.asarray(blocked["lm_head"]), sd["lm_head.weight"].numpy().T)
    assert np.array_equal(np.asarray(blocked["layers/w_up"][1]), sd["model.layers.1.mlp.up_proj.weight"].numpy().T)


def test_bfloat16_close_to_float32(built):
    hf, folder, model = built("qwen2-gqa2")
    bf = from_pretrained(folder, dtype="bfloat16")
    assert bf.param_dict()["layers/wq"].dtype == jnp.bfloat16
    ids = _ids(2, 10)
    out = bf(ids)
    assert out.dtype == jnp.float32
    assert_close(out, hf_logits(hf, ids), 5e-2, "bf16 logits")


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the float32-accumulated form is the CPU's")
def test_bfloat16_weight_matmuls_accumulate_in_float32_on_cpu(built):
    """XLA's CPU backend runs bfloat16 products on the CPU's bfloat16 instructions only in the
    float32-output form (benchmarks/cpu_dots.py), so every weight matmul of a bfloat16 forward
    is written that way: the one bfloat16-output product left is attention's weights x values."""
    import re

    _, folder, _ = built("qwen2-gqa2")
    bf = from_pretrained(folder, dtype="bfloat16")
    ids = _ids(2, 10)
    text = jax.jit(lambda p, i: forward(bf.cfg, p, i)[0]).lower(bf.param_dict(), ids).as_text()
    dots = re.findall(r"stablehlo\.dot_general .*: \((tensor<[^)]*)\) -> tensor<[0-9x]*x(\w+)>", text)
    assert len(dots) >= 9  # q, k, v, o, gate, up, down, attention's two, the vocabulary projection
    assert all("bf16" in operands for operands, _ in dots)
    assert [out for _, out in dots].count("bf16") == 1, dots


# ----------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("name,shard", [("qwen2-gqa2", None), ("llama-mqa-bias", 40_000)])
def test_save_pretrained_round_trip(built, tmp_path, name, shard):
    hf, folder, model = built(name)
    kw = {} if shard is None else {"max_shard_bytes": shard}
    out = save_pretrained(model, tmp_path / "export", tokenizer_from=folder, **kw)
    assert (out / "config.json").exists() and (out / "generation_config.json").exists()
    if shard is None:
        assert (out / "model.safetensors").exists()
    else:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1
    assert not list(tmp_path.glob(".export.tmp-*")), "temporary folder left behind"
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = _ids(2, 11)
    assert_close(hf_logits(reloaded, ids), hf_logits(hf, ids), 1e-6, "re-exported logits")
    ours_again = from_pretrained(out)
    for k, v in model.param_dict().items():
        np.testing.assert_array_equal(np.asarray(ours_again.param_dict()[k]), np.asarray(v), err_msg=k)


def test_from_pretrained_errors(tmp_path):
    with pytest.raises((FileNotFoundError, ValueError)) as e:
        from_pretrained(tmp_path)
    assert "config.json" in str(e.value)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        from_pretrained(tmp_path)
