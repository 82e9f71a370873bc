"""transformer.token_logps: chunked vocabulary projection with recomputation in the
backward pass. Same values and gradients as the whole-sequence log-softmax (tied and
untied embeddings, left padding, chunk sizes that do and do not divide the length, a
temperature, whose own gradient too), 0 at the last position; in bfloat16 gradients as
accurate as the whole-sequence version's; and a compiled value_and_grad whose temporary
buffers stay far below the (b, t, v) float32 logits that the whole-sequence version
holds. Remat policy names: every name gives the same gradients, the names change what
is saved, an unknown one is refused with the choices.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fem_jax.models import transformer as T


@pytest.fixture(autouse=True)
def _highest_precision():
    with jax.default_matmul_precision("highest"):  # float32 parity on a GPU too
        yield


def _cfg(tied: bool, vocab: int = 97, **kw) -> T.ModelConfig:
    return T.ModelConfig(**{**dict(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                   tie_word_embeddings=tied, qkv_bias=True), **kw})


def _params(cfg: T.ModelConfig, seed: int = 0, dtype=jnp.float32) -> dict:
    key = jax.random.PRNGKey(seed)
    return {k: (0.3 * jax.random.normal(jax.random.fold_in(key, i), s, jnp.float32)).astype(dtype)
            for i, (k, (s, _)) in enumerate(sorted(T.param_shapes(cfg).items()))}


def _batch(cfg: T.ModelConfig, b: int = 3, t: int = 13, seed: int = 1):
    rng = np.random.RandomState(seed)
    ids = rng.randint(0, cfg.vocab_size, (b, t)).astype(np.int32)
    mask = np.ones((b, t), bool)
    mask[0, :4] = False  # left padding
    mask[2, :1] = False
    ids[~mask] = 0
    return jnp.asarray(ids), jnp.asarray(mask)


def full_logps(cfg, params, ids, mask, temperature=1.0):
    """The reference: whole-sequence float32 logits, log-softmax, gather; 0 at the end."""
    logits, _ = T.forward(cfg, params, ids, mask)
    logits = logits / temperature
    lp = jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1], -1), ids[:, 1:, None], -1)[..., 0]
    return jnp.concatenate([lp, jnp.zeros_like(lp[:, :1])], axis=1)  # the last position: 0


def _weighted(fn):
    """value_and_grad of a loss that weights the per-position log-probs (a loss mask's
    role); returns ((loss, log-probs), gradients)."""
    def loss(params, ids, mask, w):
        lp = fn(params, ids, mask)
        return jnp.sum(lp * w), lp
    return jax.value_and_grad(loss, has_aux=True)


def _compare(got, want, what):
    (lc, vc), gc = got
    (lf, vf), gf = want
    np.testing.assert_allclose(np.asarray(vc), np.asarray(vf), rtol=1e-5, atol=1e-5, err_msg=f"{what}: values")
    np.testing.assert_allclose(float(lc), float(lf), rtol=1e-5, err_msg=f"{what}: loss")
    for k in gf:
        np.testing.assert_allclose(np.asarray(gc[k]), np.asarray(gf[k]), rtol=1e-4, atol=1e-6,
                                   err_msg=f"{what}: gradient of {k}")


CHUNKS = (1, 4, 5, 13, 64, None)  # t = 13: chunks that divide it, that do not, longer, the default


@pytest.mark.parametrize("tied", [False, True])
def test_values_and_gradients_equal_full_logits(tied):
    cfg = _cfg(tied)
    params = _params(cfg)
    ids, mask = _batch(cfg)
    w = jnp.asarray(np.random.RandomState(2).rand(*ids.shape), jnp.float32) * mask

    @jax.jit  # one program for all the variants: one compilation
    def run(params, ids, mask, w):
        ref = _weighted(lambda p, i, m: full_logps(cfg, p, i, m))(params, ids, mask, w)
        return ref, [_weighted(lambda p, i, m, c=c: T.token_logps(cfg, p, i, m, chunk=c))(params, ids, mask, w)
                     for c in CHUNKS]

    ref, outs = run(params, ids, mask, w)
    for c, out in zip(CHUNKS, outs):
        _compare(out, ref, f"chunk {c}")


def test_last_position_is_zero_and_carries_no_gradient():
    """No next token at the last position: its log-prob is 0 (as fem_jax.mstep's contract
    says), whatever the weight a loss gives it."""
    cfg = _cfg(False)
    params = _params(cfg)
    ids, mask = _batch(cfg)
    w = jnp.zeros(ids.shape, jnp.float32).at[:, -1].set(1.0)
    (loss, lp), g = jax.jit(_weighted(lambda p, i, m: T.token_logps(cfg, p, i, m, chunk=3)))(params, ids, mask, w)
    assert np.all(np.asarray(lp[:, -1]) == 0.0) and float(loss) == 0.0
    assert all(not np.any(np.asarray(v)) for v in g.values())


def test_temperature_divides_the_logits():
    cfg = _cfg(True)
    params = _params(cfg)
    ids, mask = _batch(cfg)
    w = mask.astype(jnp.float32)

    @jax.jit
    def run(params, temp):  # the temperature traced (a jit argument) and a Python float
        return [(_weighted(lambda p, i, m: T.token_logps(cfg, p, i, m, temperature=t, chunk=5))(params, ids, mask, w),
                 _weighted(lambda p, i, m: full_logps(cfg, p, i, m, t))(params, ids, mask, w))
                for t in (temp, 0.7)]

    (traced, ref), (static, ref07) = run(params, jnp.float32(1.6))
    # the temperature's own gradient (the chunked backward carries it)
    d_temp = jax.jit(jax.grad(lambda temp, fn: jnp.sum(fn(temp) * w)), static_argnums=1)
    got = d_temp(jnp.float32(1.6), lambda temp: T.token_logps(cfg, params, ids, mask, temperature=temp, chunk=5))
    want = d_temp(jnp.float32(1.6), lambda temp: full_logps(cfg, params, ids, mask, temp))
    np.testing.assert_allclose(float(got), float(want), rtol=1e-4)
    assert abs(float(want)) > 1e-3
    _compare(traced, ref, "temperature 1.6 (traced)")
    _compare(static, ref07, "temperature 0.7")
    untempered = jax.jit(lambda p: full_logps(cfg, p, ids, mask))(params)
    assert not np.allclose(np.asarray(static[0][1]), np.asarray(untempered), atol=1e-3)


def test_bfloat16_as_accurate_as_the_whole_sequence():
    """bfloat16 weights: the values stay close to float32, and the gradients are as
    accurate as the whole-sequence version's, also with many chunks (the vocabulary
    projection's gradient is summed over the chunks in float32, not in bfloat16)."""
    cfg = _cfg(False)
    params = _params(cfg)
    ids, mask = _batch(cfg, b=4, t=64)
    w = mask.astype(jnp.float32)
    bf = {k: v.astype(jnp.bfloat16) for k, v in params.items()}

    @jax.jit
    def run(params, bf):
        ref = _weighted(lambda p, i, m: full_logps(cfg, p, i, m))(params, ids, mask, w)
        whole = _weighted(lambda p, i, m: full_logps(cfg, p, i, m))(bf, ids, mask, w)
        chunked = _weighted(lambda p, i, m: T.token_logps(cfg, p, i, m, chunk=1))(bf, ids, mask, w)
        return ref, whole, chunked

    ((_, ref_lp), ref_g), (_, whole_g), ((_, lp), g) = run(params, bf)
    assert lp.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(lp - ref_lp) * mask)) < 0.15
    for k in ("lm_head", "layers/wq", "embed"):
        err = lambda grads: float(jnp.linalg.norm(grads[k].astype(jnp.float32) - ref_g[k]) /  # noqa: E731
                                  jnp.linalg.norm(ref_g[k]))
        assert err(g) <= 1.2 * err(whole_g) + 1e-4, (k, err(g), err(whole_g))


def test_default_chunk_respects_the_budget():
    assert T.default_logps_chunk(151936, 8, 1024, budget=1 << 28) == 32  # 8 x 32 x 152k x 4 B <= 256 MiB
    assert T.default_logps_chunk(32, 1, 10) == 16  # never much longer than the sequence
    assert T.default_logps_chunk(10**9, 64, 1024) == 1
    with pytest.raises(ValueError, match="chunk"):
        T.token_logps(_cfg(False), _params(_cfg(False)), *_batch(_cfg(False)), chunk=-1)


def test_chunked_value_and_grad_never_holds_the_logits():
    """XLA's own accounting of the compiled step (temporary buffers): the whole-sequence
    version holds more than b*t*v float32 logits; the chunked one far less."""
    cfg = _cfg(False, vocab=32768, hidden_size=32, intermediate_size=64, head_dim=8)
    b, t = 8, 256
    params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s[0], jnp.float32), T.param_shapes(cfg),
                          is_leaf=lambda x: isinstance(x, tuple) and isinstance(x[0], tuple))
    ids = jax.ShapeDtypeStruct((b, t), jnp.int32)
    mask = jax.ShapeDtypeStruct((b, t), jnp.bool_)
    w = jax.ShapeDtypeStruct((b, t), jnp.float32)
    logits_bytes = b * t * cfg.vocab_size * 4

    def temp(fn):
        compiled = jax.jit(_weighted(fn)).lower(params, ids, mask, w).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    full = temp(lambda p, i, m: full_logps(cfg, p, i, m))
    chunked = temp(lambda p, i, m: T.token_logps(cfg, p, i, m, chunk=8))
    assert full > logits_bytes, (full, logits_bytes)
    assert chunked < logits_bytes / 3, (chunked, logits_bytes)


# ----------------------------------------------------------------------------- remat policies


def test_remat_policies_give_the_same_gradients():
    cfg = _cfg(False)
    params = _params(cfg)
    ids, mask = _batch(cfg)
    w = mask.astype(jnp.float32)
    names = list(T.REMAT_POLICIES) + [True, False]

    @jax.jit
    def run(params):
        return [_weighted(lambda p, i, m, r=r: T.token_logps(cfg, p, i, m, remat=r, chunk=8))(params, ids, mask, w)
                for r in names]

    outs = run(params)
    for name, out in zip(names, outs):
        _compare(out, outs[0], f"remat {name}")


def test_remat_policies_change_what_is_saved():
    """The names reach jax.checkpoint: 'full' keeps the fewest temporaries, 'none' the
    most, and the policies that save matmul outputs sit between them (all matmuls
    more than the weight matmuls alone)."""
    cfg = _cfg(False)
    params = _params(cfg)
    ids, mask = _batch(cfg, b=4, t=32)
    w = mask.astype(jnp.float32)

    def temp(name):
        f = jax.jit(_weighted(lambda p, i, m: T.token_logps(cfg, p, i, m, remat=name, chunk=16)))
        return f.lower(params, ids, mask, w).compile().memory_analysis().temp_size_in_bytes

    t = {name: temp(name) for name in ("none", "full", "dots_with_no_batch_dims_saveable", "dots_saveable")}
    assert t["full"] < t["dots_with_no_batch_dims_saveable"] < t["dots_saveable"] < t["none"], t


def test_unknown_remat_policy_names_the_choices():
    cfg = _cfg(False)
    with pytest.raises(ValueError, match="dots_with_no_batch_dims_saveable"):
        T.token_logps(cfg, _params(cfg), *_batch(cfg), remat="dots")
    with pytest.raises(ValueError, match="einsum"):
        T.forward(cfg, _params(cfg), *_batch(cfg), attn_impl="flash")
