"""Attention implementations (`attn_impl`): jax.nn.dot_product_attention ("xla"; "cudnn"
on a GPU) against our einsum attention, the reference. Same logits over GQA ratios,
head dims and biases, with left and right padding, in float32 (tight) and bfloat16
(bfloat16 tolerance); same gradients; cached decoding through each path; the prefill
at slot 0 (own keys only) equal to the prefill over the whole cache. On a GPU (marked
`gpu`, skipped elsewhere): "auto" and "cudnn" lower to cuDNN's fused attention.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fem_jax.models import transformer as T


@pytest.fixture(autouse=True)
def _highest_precision():
    with jax.default_matmul_precision("highest"):  # float32 parity on a GPU too
        yield


VARIANTS = {
    "gqa2": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=8),
    "mha": dict(num_attention_heads=4, num_key_value_heads=4, head_dim=8),
    "mqa-bias": dict(num_attention_heads=6, num_key_value_heads=1, head_dim=16, qkv_bias=True, o_bias=True),
    "gqa3-tied": dict(num_attention_heads=6, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True),
}


def _cfg(name: str) -> T.ModelConfig:
    return T.ModelConfig(**{**dict(vocab_size=89, hidden_size=32, intermediate_size=48, num_hidden_layers=2),
                            **VARIANTS[name]})


def _params(cfg, seed=0, dtype=jnp.float32):
    key = jax.random.PRNGKey(seed)
    return {k: (0.3 * jax.random.normal(jax.random.fold_in(key, i), s, jnp.float32)).astype(dtype)
            for i, (k, (s, _)) in enumerate(sorted(T.param_shapes(cfg).items()))}


def _batch(cfg, b=4, t=12, seed=1, side="left"):
    rng = np.random.RandomState(seed)
    ids = rng.randint(0, cfg.vocab_size, (b, t)).astype(np.int32)
    mask = np.ones((b, t), bool)
    pads = [5, 0, 1, t]  # a padded row, a full one, one padding slot, an all-padding row
    for r, p in enumerate(pads[:b]):
        if side == "left":
            mask[r, :p] = False
        else:
            mask[r, t - p:] = False
    ids[~mask] = 0
    return jnp.asarray(ids), jnp.asarray(mask)


def _fwd(cfg, impl, **kw):
    return jax.jit(functools.partial(T.forward, cfg, attn_impl=impl, **kw))


def _close(a, b, mask, tol, what):
    a, b, m = np.asarray(a), np.asarray(b), np.asarray(mask, bool)
    d = np.abs(a[m] - b[m])
    scale = np.abs(b[m]).max()
    assert d.max() <= tol * scale, f"{what}: max|diff| {d.max():.3g}, mean {d.mean():.3g}, max|ref| {scale:.3g}"


@pytest.mark.parametrize("name", list(VARIANTS))
def test_xla_attention_equals_einsum_float32(name):
    cfg = _cfg(name)
    params = _params(cfg)
    for side in ("left", "right"):
        ids, mask = _batch(cfg, side=side)
        ref, _ = _fwd(cfg, "einsum")(params, ids, mask)
        got, _ = _fwd(cfg, "xla")(params, ids, mask)
        _close(got, ref, mask, 1e-5, f"{name} {side} padding")


def test_xla_attention_equals_einsum_bfloat16():
    cfg = _cfg("gqa3-tied")
    bf = _params(cfg, dtype=jnp.bfloat16)
    ids, mask = _batch(cfg)
    ref, _ = _fwd(cfg, "einsum")(bf, ids, mask)
    got, _ = _fwd(cfg, "xla")(bf, ids, mask)
    _close(got, ref, mask, 2e-2, "bfloat16")


def test_gradients_equal_through_xla_attention():
    cfg = _cfg("gqa2")
    params = _params(cfg)
    ids, mask = _batch(cfg)
    w = mask.astype(jnp.float32)

    def grads(impl):
        def loss(p):
            return jnp.sum(T.token_logps(cfg, p, ids, mask, attn_impl=impl, chunk=4) * w)
        return jax.jit(jax.grad(loss))(params)

    ref, got = grads("einsum"), grads("xla")
    for k in ref:
        np.testing.assert_allclose(np.asarray(got[k]), np.asarray(ref[k]), rtol=1e-4, atol=1e-6, err_msg=k)


def _cudnn_on_xla(monkeypatch):
    """Run the "cudnn" code path (causal flag, the left-padding switch) on XLA's kernel."""
    real = jax.nn.dot_product_attention

    def fake(*a, implementation=None, **kw):
        return real(*a, implementation="xla" if implementation == "cudnn" else implementation, **kw)

    monkeypatch.setattr(jax.nn, "dot_product_attention", fake)


@pytest.mark.parametrize("side", ["left", "right"])
def test_cudnn_path_masks_only_what_it_must(monkeypatch, side):
    """The cudnn path drops the mask for rows padded on the right (the causal triangle
    already hides their padding keys from every real query) and keeps it for left
    padding: real positions equal the einsum reference either way."""
    _cudnn_on_xla(monkeypatch)
    cfg = _cfg("gqa2")
    params = _params(cfg)
    ids, mask = _batch(cfg, side=side)
    ref, _ = _fwd(cfg, "einsum")(params, ids, mask)
    got, _ = _fwd(cfg, "cudnn")(params, ids, mask)
    _close(got, ref, mask, 1e-5, f"cudnn path, {side} padding")


@pytest.mark.parametrize("impl", ["xla", "einsum", "auto"])
def test_cached_decode_through_each_implementation(impl):
    """Prefill (own keys) then one token at a time reading the (b, k, s, h) cache equals
    the einsum forward over the whole sequence."""
    cfg = _cfg("gqa3-tied")
    params = _params(cfg)
    ids, mask = _batch(cfg, b=3, t=14)
    full, _ = _fwd(cfg, "einsum")(params, ids, mask)
    prompt = 8
    cache = T.init_cache(cfg, 3, 20)
    logits, cache = _fwd(cfg, impl, cache_index=0)(params, ids[:, :prompt], mask[:, :prompt], cache=cache)
    steps = [logits]
    step = jax.jit(lambda c, tok, i: T.forward(cfg, params, tok, None, cache=c, cache_index=i, attn_impl=impl))
    for i in range(prompt, 14):
        logits, cache = step(cache, ids[:, i:i + 1], i)
        steps.append(logits)
    _close(jnp.concatenate(steps, axis=1), full, mask, 1e-5, f"{impl} cached decode")


def test_prefill_at_slot_zero_attends_to_its_own_keys_only():
    """A prefill at the static slot 0 attends over its t keys, not the s cache slots: the
    same logits and the very same cache as the prefill at a traced slot 0 (whole cache)."""
    cfg = _cfg("gqa2")
    params = _params(cfg)
    ids, mask = _batch(cfg, b=3, t=10)
    cache = T.init_cache(cfg, 3, 32)
    cache = {**cache, "k": cache["k"] + 7.0, "v": cache["v"] - 3.0}  # stale contents past t
    own = jax.jit(lambda c: T.forward(cfg, params, ids, mask, cache=c, cache_index=0))
    whole = jax.jit(lambda c, i: T.forward(cfg, params, ids, mask, cache=c, cache_index=i))
    (a, ca), (b, cb) = own(cache), whole(cache, jnp.int32(0))
    _close(a, b, mask, 1e-6, "prefill logits")
    for k in ("mask", "pos"):
        np.testing.assert_array_equal(np.asarray(ca[k]), np.asarray(cb[k]), err_msg=k)
    valid = np.asarray(ca["mask"])  # (b, s); padding slots hold garbage, masked forever
    for k in ("k", "v"):  # (l, b, k, s, h)
        a_, b_ = np.moveaxis(np.asarray(ca[k]), 3, 2), np.moveaxis(np.asarray(cb[k]), 3, 2)  # (l, b, s, k, h)
        np.testing.assert_allclose(a_[:, valid], b_[:, valid], rtol=1e-5, atol=1e-6, err_msg=k)
        np.testing.assert_array_equal(a_[:, :, 10:], b_[:, :, 10:], err_msg=f"{k}: slots past the prompt")
    # and the scores really are (b, k, g, t, t), not (b, k, g, t, s)
    scores = "f32[3,2,2,10,{}]"
    own_jaxpr, whole_jaxpr = str(jax.make_jaxpr(own)(cache)), str(jax.make_jaxpr(whole)(cache, jnp.int32(0)))
    assert scores.format(10) in own_jaxpr and scores.format(32) not in own_jaxpr
    assert scores.format(32) in whole_jaxpr


def test_unknown_attention_implementation_names_the_choices():
    cfg = _cfg("gqa2")
    with pytest.raises(ValueError, match="cudnn"):
        T.forward(cfg, _params(cfg), *_batch(cfg), attn_impl="flash")


def test_auto_is_einsum_off_gpu_and_for_the_cache():
    assert T.attn_impl_for("auto", jnp.float32, 64, False, 128) == "einsum"
    assert T.attn_impl_for("auto", jnp.bfloat16, 64, True, 1) == "einsum"
    if jax.default_backend() != "gpu":
        assert T.attn_impl_for("auto", jnp.bfloat16, 64, False, 128) == "einsum"


# ----------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (cuDNN fused attention)")
def test_cudnn_fused_attention_on_gpu():
    """"auto" picks cuDNN's fused attention for a bfloat16 training forward and backward on
    a GPU: the compiled program calls it; the logits stay within bfloat16 tolerance of the
    einsum reference, left padding included."""
    cfg = dataclasses.replace(_cfg("gqa2"), head_dim=64)  # a head dim every cuDNN release takes
    bf = _params(cfg, dtype=jnp.bfloat16)
    ids, mask = _batch(cfg, t=16)
    assert T.attn_impl_for("auto", jnp.bfloat16, cfg.head_dim, False, 16) == "cudnn"
    for impl in ("auto", "cudnn"):
        f = _fwd(cfg, impl)
        assert "__cudnn$fmha" in f.lower(bf, ids, mask).compile().as_text(), impl
        got, _ = f(bf, ids, mask)
        ref, _ = _fwd(cfg, "einsum")(bf, ids, mask)
        _close(got, ref, mask, 3e-2, f"{impl} vs einsum, bfloat16")
    w = mask.astype(jnp.float32)
    grad = jax.jit(jax.grad(lambda p: jnp.sum(T.token_logps(cfg, p, ids, mask) * w)))
    hlo = grad.lower(bf).compile().as_text()
    assert "__cudnn$fmha" in hlo and "Backward" in hlo
