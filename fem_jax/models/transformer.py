"""One flax.nnx decoder for Llama 3.x (incl. SmolLM2) and Qwen2/2.5.

The two families differ in a few flags (q/k/v bias, o/mlp bias, tied embeddings, rope
scaling), so one module covers both, the way levanter's Qwen reuses its Llama.

Layers are stacked: every per-layer weight has a leading `layers` axis and the decoder
runs them with `jax.lax.scan`. That keeps compile time flat in depth (SmolLM2 has 30
layers) and lets one sharding table place whole stacks. On CPU the scan copies each
layer's weight slice before its matmul, which costs as much as the matmul itself when
a decode step has few tokens; `unstack_layers` gives the per-layer form (`layers`: a
tuple of per-layer dicts) that `forward` runs with a Python loop instead. The rollout
engine keeps its weights that way.

Shapes, with letters: b batch, t query tokens, s key slots, d model width, n query
heads, k kv heads, g query heads per kv head, h head dim, f mlp width, v vocab, l layers.

The KV cache is an explicit fixed-shape pytree (`init_cache`) that `__call__` takes and
returns; slot `cache_index + j` receives the j-th input token. Keys and values are kept
(b, k, s, h), the layout the einsum attention reads without a transpose. A query at
slot q sees the key slots s <= q whose mask bit is set, so left padding and decoding
share one rule. A prefill at the static `cache_index=0` attends over its own t keys, not
the s slots of the cache (the slots past t are in its causal future anyway).

Attention (`attn_impl`, static): "einsum" (our own two matmuls and a float32 softmax),
"xla" or "cudnn" (`jax.nn.dot_product_attention` with that implementation; cudnn is
the fused flash-attention kernel, bfloat16/float16 on a GPU only), or "auto": cudnn
where the backend is a GPU, the dtype half precision and the call has no cache to read
(training, prefill); einsum otherwise (CPU, float32, decoding from the cache layout).
Left padding rides in a boolean mask on every path; on the cudnn path, where the mask
becomes a bias, a batch with no left-padded row (training batches are padded on the
right) runs on the causal flag alone.

Rematerialization (`remat`, static): a name of REMAT_POLICIES — "none", "full" (save
nothing inside a layer), or one of jax.checkpoint_policies' names; True/False mean
"full"/"none".

`token_logps` scores each next token from the final hidden states with the vocabulary
projection cut into chunks of the sequence, each chunk's logits recomputed in the
backward pass (a custom VJP): a training step never holds (b, t, v) float32 logits.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Array = jax.Array

_NEG = -1e30  # finite "minus infinity": a fully masked (padding) row stays NaN-free

ATTN_IMPLS = ("auto", "einsum", "xla", "cudnn")
# remat names: "none", "full", and jax.checkpoint_policies' policies that take no argument
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable", "nothing_saveable")
LOGITS_CHUNK_BYTES = 1 << 28  # token_logps' default chunk: float32 logits of at most this size


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_type: str = "default"  # default | linear | llama3
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position: int = 8192
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    model_type: str = "llama"  # llama | qwen2
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None

    @classmethod
    def from_hf_config(cls, c: dict[str, Any]) -> "ModelConfig":
        """Read a transformers config.json dict, 4.x (`rope_theta`, `rope_scaling`) or
        5.x (`rope_parameters`) layout."""
        mt = c.get("model_type")
        if mt not in ("llama", "qwen2"):
            raise ValueError(f"config.json: model_type {mt!r} is not supported (llama, qwen2)")
        act = c.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"config.json: hidden_act {act!r} is not supported (silu)")
        if mt == "qwen2" and c.get("use_sliding_window", False):
            raise ValueError("config.json: use_sliding_window=true is not supported")
        rope = dict(c.get("rope_parameters") or {})
        if not rope:
            rope = dict(c.get("rope_scaling") or {})
        theta = rope.get("rope_theta", c.get("rope_theta", 10000.0))
        rtype = rope.get("rope_type", rope.get("type", "default")) or "default"
        if rtype not in ("default", "linear", "llama3"):
            raise ValueError(f"config.json: rope type {rtype!r} is not supported (default, linear, llama3)")
        heads = c["num_attention_heads"]
        eos = c.get("eos_token_id")
        if isinstance(eos, list):
            eos = tuple(eos)
        attention_bias = bool(c.get("attention_bias", False))
        return cls(
            vocab_size=c["vocab_size"],
            hidden_size=c["hidden_size"],
            intermediate_size=c["intermediate_size"],
            num_hidden_layers=c["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=c.get("num_key_value_heads") or heads,
            head_dim=c.get("head_dim") or c["hidden_size"] // heads,
            rms_norm_eps=c.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_type=rtype,
            rope_factor=float(rope.get("factor", 1.0)),
            rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
            rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
            rope_original_max_position=int(rope.get("original_max_position_embeddings", 8192)),
            max_position_embeddings=c.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
            qkv_bias=True if mt == "qwen2" else attention_bias,
            o_bias=False if mt == "qwen2" else attention_bias,
            mlp_bias=bool(c.get("mlp_bias", False)) if mt == "llama" else False,
            model_type=mt,
            bos_token_id=c.get("bos_token_id"),
            eos_token_id=eos,
            pad_token_id=c.get("pad_token_id"),
        )

    def to_hf_config(self, dtype: str = "float32") -> dict[str, Any]:
        """A config.json dict that transformers (4.x and 5.x) and vLLM load."""
        arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[self.model_type]
        scaling = None
        if self.rope_type == "linear":
            scaling = {"rope_type": "linear", "factor": self.rope_factor}
        elif self.rope_type == "llama3":
            scaling = {
                "rope_type": "llama3",
                "factor": self.rope_factor,
                "low_freq_factor": self.rope_low_freq_factor,
                "high_freq_factor": self.rope_high_freq_factor,
                "original_max_position_embeddings": self.rope_original_max_position,
            }
        eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        c = {
            "architectures": [arch],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": dtype,
            "use_cache": True,
        }
        if self.model_type == "llama":
            c["attention_bias"] = self.qkv_bias
            c["mlp_bias"] = self.mlp_bias
        else:
            c["use_sliding_window"] = False
        return c


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
    """Every parameter: path -> (shape, logical axes). The one source of truth that the
    module, the Hugging Face name table and the sharding table all read."""
    L, D, F, V = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    N, K, H = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    s = {
        "embed": ((V, D), ("vocab", "embed")),
        "layers/attn_norm": ((L, D), ("layers", "norm")),
        "layers/wq": ((L, D, N, H), ("layers", "embed", "q_heads", "head_dim")),
        "layers/wk": ((L, D, K, H), ("layers", "embed", "kv_heads", "head_dim")),
        "layers/wv": ((L, D, K, H), ("layers", "embed", "kv_heads", "head_dim")),
        "layers/wo": ((L, N, H, D), ("layers", "q_heads", "head_dim", "embed")),
        "layers/mlp_norm": ((L, D), ("layers", "norm")),
        "layers/w_gate": ((L, D, F), ("layers", "embed", "mlp")),
        "layers/w_up": ((L, D, F), ("layers", "embed", "mlp")),
        "layers/w_down": ((L, F, D), ("layers", "mlp", "embed")),
        "final_norm": ((D,), ("norm",)),
    }
    if cfg.qkv_bias:
        s["layers/bq"] = ((L, N, H), ("layers", "q_heads", "head_dim"))
        s["layers/bk"] = ((L, K, H), ("layers", "kv_heads", "head_dim"))
        s["layers/bv"] = ((L, K, H), ("layers", "kv_heads", "head_dim"))
    if cfg.o_bias:
        s["layers/bo"] = ((L, D), ("layers", "norm"))
    if cfg.mlp_bias:
        s["layers/b_gate"] = ((L, F), ("layers", "mlp"))
        s["layers/b_up"] = ((L, F), ("layers", "mlp"))
        s["layers/b_down"] = ((L, D), ("layers", "norm"))
    if not cfg.tie_word_embeddings:
        s["lm_head"] = ((D, V), ("embed", "vocab"))
    return s


# ----------------------------------------------------------------------------- ops


def rms_norm(x: Array, w: Array, eps: float) -> Array:
    """transformers' RMSNorm: statistics in float32, cast back, then scale."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return w * xf.astype(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies [h/2] in float32, with linear or llama3 scaling."""
    H = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, H, 2, dtype=np.int64).astype(np.float32) / H))
    if cfg.rope_type == "linear":
        inv = inv / cfg.rope_factor
    elif cfg.rope_type == "llama3":
        f, lo, hi = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        old = cfg.rope_original_max_position
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old / lo, inv / f, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / f + smooth * scaled
        medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
        inv = np.where(medium, smoothed, scaled)
    return inv.astype(np.float32)


def rope_cos_sin(cfg: ModelConfig, positions: Array, dtype) -> tuple[Array, Array]:
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(rope_inv_freq(cfg))  # (b, t, h/2)
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # (b, t, h): half-split layout
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """x (b, t, n, h); transformers' rotate_half convention."""
    h = x.shape[-1] // 2
    rot = jnp.concatenate([-x[..., h:], x[..., :h]], axis=-1)
    return x * cos[:, :, None, :] + rot * sin[:, :, None, :]


def project(spec: str, x: Array, w: Array) -> Array:
    """A weight matmul (einsum `spec`) in x's dtype. On a CPU, bfloat16 products are
    accumulated into float32 and rounded after, as a GPU's bfloat16 matmul does: XLA's CPU
    backend runs that form on the CPU's bfloat16 instructions, where a bfloat16-output
    einsum ran no faster than float32 (`python benchmarks/cpu_dots.py`: 1.76x against
    0.97x float32's speed on an MLP block). Float32, and every dtype on other backends, is
    the plain einsum."""
    if x.dtype == jnp.bfloat16 and jax.default_backend() == "cpu":
        return jnp.einsum(spec, x, w, preferred_element_type=jnp.float32).astype(x.dtype)
    return jnp.einsum(spec, x, w)


def attention(q: Array, k: Array, v: Array, mask: Array, impl: str = "einsum", *,
              kv_heads_first: bool = True, causal: bool = False) -> Array:
    """q (b, t, n, h), k/v (b, k, s, h) — or (b, s, k, h) when not `kv_heads_first` —,
    mask (b, t, s) bool -> (b, t, n*h). `impl`: "einsum", "xla" or "cudnn" (resolved, see
    `attn_impl_for`); `causal` tells the fused kernel that mask includes the causal
    triangle of t == s slots (it may then skip the blocks above the diagonal).

    The output is transposed as an activation, here, and flattened for a 2-D output
    projection: left to choose, XLA on CPU transposes the (n, h, d) weight instead, at
    every call."""
    b, t, n, h = q.shape
    if impl == "einsum":
        kv = k.shape[1] if kv_heads_first else k.shape[2]
        sk = "bksh" if kv_heads_first else "bskh"
        q = q.reshape(b, t, kv, n // kv, h)  # (b, t, kv, group, h)
        scores = jnp.einsum(f"btkgh,{sk}->bkgts", q, k, preferred_element_type=jnp.float32)
        scores = scores * (h**-0.5)
        scores = jnp.where(mask[:, None, None, :, :], scores, _NEG)
        w = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum(f"bkgts,{sk}->bkgth", w, v)  # the matmul's own output order
        return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n * h)  # (b, t, n*h): heads flattened
    if impl not in ("xla", "cudnn"):
        raise ValueError(f"attention: unknown implementation {impl!r}; choose from {ATTN_IMPLS}")
    if kv_heads_first:
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # (b, s, k, h)
    dpa = functools.partial(jax.nn.dot_product_attention, implementation=impl)
    if impl == "cudnn" and causal:
        # Under the causal triangle, rows padded on the right (training batches) need no
        # mask: their padding keys lie right of every real query. Only left padding (a
        # padding slot before a real one) needs the mask, which cuDNN reads as a bias.
        valid = mask[:, -1, :]  # (b, s): the last query's row is the key mask
        left_padded = jnp.any(~valid[:, :-1] & valid[:, 1:])
        out = jax.lax.cond(left_padded, lambda: dpa(q, k, v, mask=mask[:, None], is_causal=True),
                           lambda: dpa(q, k, v, is_causal=True))
    else:
        out = dpa(q, k, v, mask=mask[:, None])  # (b, t, n, h)
    return out.reshape(b, t, n * h)


def attn_impl_for(impl: str, dtype, head_dim: int, reads_cache: bool, length: int = 2) -> str:
    """Resolve "auto" (see the module docstring) for a call with `length` query tokens;
    check the other names."""
    if impl not in ATTN_IMPLS:
        raise ValueError(f"attn_impl {impl!r} is unknown; choose from {', '.join(ATTN_IMPLS)}")
    if impl != "auto":
        return impl
    # cuDNN's flash attention: half precision, head dim a multiple of 8 up to 128 (256 on
    # Hopper), even lengths with a bias (the left-padding mask) in training
    fused = (jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
             and head_dim % 8 == 0 and head_dim <= 128 and length % 2 == 0 and not reads_cache)
    return "cudnn" if fused else "einsum"


def remat_policy(remat: str | bool | None):
    """A REMAT_POLICIES name (or True/False) -> (enabled, jax.checkpoint policy)."""
    name = "full" if remat is True else "none" if remat is False or remat is None else remat
    if name not in REMAT_POLICIES:
        raise ValueError(f"remat {remat!r} is unknown; choose from {', '.join(REMAT_POLICIES)} (or True/False)")
    if name in ("none", "full"):
        return name == "full", None
    return True, getattr(jax.checkpoint_policies, name)


def _rematted(fn, remat):
    on, policy = remat_policy(remat)
    return jax.checkpoint(fn, policy=policy, prevent_cse=False) if on else fn


def decoder_layer(
    cfg: ModelConfig, lp: dict[str, Array], x: Array, cos: Array, sin: Array,
    mask: Array, kv: tuple[Array, Array, Array] | None, cache_index,
    attn_impl: str = "einsum", fresh: bool = False,
) -> tuple[Array, tuple[Array, Array, Array] | None]:
    """One pre-norm decoder layer. `lp` holds this layer's weights (no `layers` axis).
    `kv` is None, or (cache k, cache v, layer index) with the stacked (l, b, k, s, h)
    cache, or (cache k, cache v, None) with this layer's own (b, k, s, h) cache. `fresh`:
    the queries attend to their own keys only (no cache, or a prefill at slot 0; `mask`
    is then (b, t, t)), else to the cache's first mask.shape[-1] slots (`mask` (b, t, s))."""
    with jax.named_scope("attention"):
        h = rms_norm(x, lp["attn_norm"], cfg.rms_norm_eps)
        q = project("btd,dnh->btnh", h, lp["wq"])
        k = project("btd,dkh->btkh", h, lp["wk"])
        v = project("btd,dkh->btkh", h, lp["wv"])
        if cfg.qkv_bias:
            q, k, v = q + lp["bq"], k + lp["bk"], v + lp["bv"]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        fresh = fresh or kv is None
        impl = attn_impl_for(attn_impl, q.dtype, cfg.head_dim, not fresh, q.shape[1])
        kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # (b, k, t, h)
        heads_first = impl == "einsum" or not fresh  # the layout attention reads
        ak, av = (kt, vt) if heads_first else (k, v)
        if kv is not None:
            ck, cv, layer = kv
            if layer is None:  # this layer's own cache
                idx = (0, 0, cache_index, 0)
                ck = jax.lax.dynamic_update_slice(ck, kt.astype(ck.dtype), idx)
                cv = jax.lax.dynamic_update_slice(cv, vt.astype(cv.dtype), idx)
                if not fresh:
                    ak, av = ck.astype(q.dtype), cv.astype(q.dtype)
            else:  # the whole stacked cache rides in the scan carry: updated in place
                idx = (layer, 0, 0, cache_index, 0)
                ck = jax.lax.dynamic_update_slice(ck, kt[None].astype(ck.dtype), idx)
                cv = jax.lax.dynamic_update_slice(cv, vt[None].astype(cv.dtype), idx)
                if not fresh:
                    ak = jax.lax.dynamic_index_in_dim(ck, layer, keepdims=False).astype(q.dtype)
                    av = jax.lax.dynamic_index_in_dim(cv, layer, keepdims=False).astype(q.dtype)
            kv = (ck, cv, layer)
            if not fresh and mask.shape[-1] < ak.shape[2]:  # `kv_len`: the filled slots only
                ak, av = ak[:, :, :mask.shape[-1]], av[:, :, :mask.shape[-1]]
        a = attention(q, ak, av, mask, impl, kv_heads_first=heads_first, causal=fresh)
        wo = lp["wo"]
        o = project("bte,ed->btd", a, wo.reshape(-1, wo.shape[-1]))
        if cfg.o_bias:
            o = o + lp["bo"]
        x = x + o
    with jax.named_scope("mlp"):
        h = rms_norm(x, lp["mlp_norm"], cfg.rms_norm_eps)
        g = project("btd,df->btf", h, lp["w_gate"])
        u = project("btd,df->btf", h, lp["w_up"])
        if cfg.mlp_bias:
            g, u = g + lp["b_gate"], u + lp["b_up"]
        m = project("btf,fd->btd", jax.nn.silu(g) * u, lp["w_down"])
        if cfg.mlp_bias:
            m = m + lp["b_down"]
        x = x + m
    return x, kv


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.float32, *,
               per_layer: bool = False) -> dict[str, Any]:
    """A static KV cache: k/v (l, b, k, s, h) — or, with `per_layer` (for per-layer
    weights, see `unstack_layers`), tuples of l arrays (b, k, s, h) — the per-slot
    validity mask (b, s) and the next position of each row (b,)."""
    shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
    if per_layer:
        k = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_hidden_layers))
        v = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_hidden_layers))
    else:
        k = v = jnp.zeros((cfg.num_hidden_layers, *shape), dtype)
    return {
        "k": k,
        "v": v,
        "mask": jnp.zeros((batch, max_len), jnp.bool_),
        "pos": jnp.zeros((batch,), jnp.int32),
    }


def forward(
    cfg: ModelConfig,
    params: dict[str, Array],
    input_ids: Array,
    attention_mask: Array | None = None,
    positions: Array | None = None,
    cache: dict[str, Array] | None = None,
    cache_index: Array | int = 0,
    *,
    remat: str | bool = "none",
    constrain: Callable[[Array, tuple[str, ...]], Array] | None = None,
    return_hidden: bool = False,
    attn_impl: str = "auto",
    kv_len: int | None = None,
) -> tuple[Array, dict[str, Array] | None]:
    """Pure forward pass. Returns (logits (b, t, v) float32 — or the final hidden states
    when `return_hidden` — and the updated cache, or None without one).

    Positions follow the mask: the i-th real token of a row has position i (counting the
    tokens already in the cache), so left-padded rows match their unpadded selves.
    `constrain(x, logical_axes)` may pin activation shardings (see fem_jax.sharding).
    `remat` (a REMAT_POLICIES name) and `attn_impl` (ATTN_IMPLS) are static options.
    `kv_len` (static): decoding attends to the first kv_len cache slots only, which must
    hold every slot written so far and by this call (shorter attention for a long cache).
    """
    b, t = input_ids.shape
    dtype = params["embed"].dtype
    if attention_mask is None:
        attention_mask = jnp.ones((b, t), jnp.bool_)
    attention_mask = attention_mask.astype(jnp.bool_)
    start = cache["pos"] if cache is not None else jnp.zeros((b,), jnp.int32)
    if positions is None:
        positions = start[:, None] + jnp.cumsum(attention_mask, axis=1, dtype=jnp.int32) - 1
        positions = jnp.maximum(positions, 0)
    pin = constrain or (lambda x, axes: x)

    with jax.named_scope("embed"):
        x = pin(jnp.take(params["embed"], input_ids, axis=0), ("batch", "seq", "act_embed"))
    cos, sin = rope_cos_sin(cfg, positions, dtype)

    remat_policy(remat)  # unknown names fail here, with or without layers to remat
    attn_impl_for(attn_impl, dtype, cfg.head_dim, False)
    # a prefill at the static slot 0 attends to its own t keys: the slots past t are in the
    # causal future of every query, whatever the cache holds there
    fresh = cache is None or (isinstance(cache_index, (int, np.integer)) and int(cache_index) == 0)
    kv_mask = attention_mask
    if cache is not None:
        kv_mask = jax.lax.dynamic_update_slice(cache["mask"], attention_mask, (0, cache_index))
    q_slot = (0 if fresh else cache_index) + jnp.arange(t)
    s = t if fresh else cache["mask"].shape[1] if kv_len is None else kv_len
    if cache is not None and not 0 < s <= cache["mask"].shape[1]:
        raise ValueError(f"kv_len {kv_len} must be in [1, {cache['mask'].shape[1]}] (the cache length)")
    mask = (jnp.arange(s)[None, None, :] <= q_slot[None, :, None]) & kv_mask[:, None, :s]  # (b, t, s)
    layer_fn = _rematted(functools.partial(decoder_layer, cfg, attn_impl=attn_impl, fresh=fresh), remat)

    if "layers" in params:  # per-layer weights (unstack_layers): a Python loop over layers
        ks, vs = [], []
        for i, lp in enumerate(params["layers"]):
            kv = None if cache is None else (cache["k"][i], cache["v"][i], None)
            x, kv = layer_fn(lp, x, cos, sin, mask, kv, cache_index)
            x = pin(x, ("batch", "seq", "act_embed"))
            if kv is not None:
                ks.append(kv[0])
                vs.append(kv[1])
        kv_out = [tuple(ks), tuple(vs)]
    else:
        x, kv_out = _scan_layers(cfg, params, x, cos, sin, mask, cache, cache_index, layer_fn, pin)

    x = rms_norm(x, params["final_norm"], cfg.rms_norm_eps)
    new_cache = None
    if cache is not None:
        new_cache = {
            "k": kv_out[0], "v": kv_out[1], "mask": kv_mask,
            "pos": start + jnp.sum(attention_mask, axis=1, dtype=jnp.int32),
        }
    if return_hidden:
        return x, new_cache
    with jax.named_scope("lm_head"):
        logits = lm_logits(cfg, params, x)
    return logits, new_cache


def _layer_stacks(params: dict[str, Array]) -> dict[str, Array]:
    """The stacked per-layer weights, by name without the `layers/` prefix."""
    return {k.split("/", 1)[1]: v for k, v in params.items() if k.startswith("layers/")}


def _scan_layers(cfg, params, x, cos, sin, mask, cache, cache_index, layer_fn, pin):
    stacked = _layer_stacks(params)

    def body(carry, xs):
        x, ck, cv = carry
        lp, layer = xs
        kv = None if ck is None else (ck, cv, layer)
        x, kv = layer_fn(lp, x, cos, sin, mask, kv, cache_index)
        x = pin(x, ("batch", "seq", "act_embed"))
        return (x, None, None) if kv is None else (x, kv[0], kv[1]), None

    carry = (x, None, None) if cache is None else (x, cache["k"], cache["v"])
    with jax.named_scope("layers"):
        (x, *kv_out), _ = jax.lax.scan(body, carry, (stacked, jnp.arange(cfg.num_hidden_layers)))
    return x, kv_out


def unstack_layers(params: dict[str, Array]) -> dict[str, Any]:
    """Stacked parameters -> the per-layer form `forward` also takes: the non-layer
    entries as they are, plus `layers`, a tuple of dicts of this layer's weights. A copy
    of the layer weights (call it under jit to make it one program)."""
    out = {k: v for k, v in params.items() if not k.startswith("layers/")}
    stacked = _layer_stacks(params)
    n = next(iter(stacked.values())).shape[0]
    out["layers"] = tuple({k: v[i] for k, v in stacked.items()} for i in range(n))
    return out


def lm_logits(cfg: ModelConfig, params: dict[str, Array], x: Array) -> Array:
    """Final hidden states (b, t, d) -> float32 logits (b, t, v)."""
    if cfg.tie_word_embeddings:
        return jnp.einsum("btd,vd->btv", x, params["embed"], preferred_element_type=jnp.float32)
    return jnp.einsum("btd,dv->btv", x, params["lm_head"], preferred_element_type=jnp.float32)


def _lm_weight(cfg: ModelConfig, params: dict[str, Array]) -> tuple[Array, str]:
    """The vocabulary projection and the einsum that applies it to (b, t, d)."""
    if cfg.tie_word_embeddings:
        return params["embed"], "btd,vd->btv"
    return params["lm_head"], "btd,dv->btv"


def default_logps_chunk(vocab: int, batch: int, length: int, budget: int = LOGITS_CHUNK_BYTES) -> int:
    """Sequence positions per chunk: a power of two whose float32 logits (batch x chunk x
    vocab) fit `budget` bytes, at least 1 and no more than the length needs."""
    c = max(1, budget // max(1, 4 * vocab * batch))
    c = 1 << (c.bit_length() - 1)
    return min(c, 1 << max(0, (length - 1).bit_length()))


def token_logps(cfg: ModelConfig, params: dict[str, Array], input_ids: Array, attention_mask: Array | None = None,
                *, temperature: float | Array = 1.0, remat: str | bool = "none",
                constrain: Callable[[Array, tuple[str, ...]], Array] | None = None, chunk: int | None = None,
                attn_impl: str = "auto") -> Array:
    """Per-token log-probabilities (b, t) float32: position j scores the next token,
    log softmax(logits_j / temperature)[input_ids[:, j+1]]; the last position (no next
    token) is 0. The policy's log-probs at the sampling temperature, as verl and TRL
    compute them.

    The final hidden states go through the vocabulary projection `chunk` positions at a
    time (default: `default_logps_chunk`) with a custom backward pass: the forward keeps
    each position's log-prob and logsumexp only, the backward recomputes one chunk's
    logits at a time, so neither holds (b, t, v) float32 logits. Same values and
    gradients as the whole-sequence log-softmax (the projection's gradient summed over
    the chunks in float32)."""
    x, _ = forward(cfg, params, input_ids, attention_mask, remat=remat, constrain=constrain,
                   return_hidden=True, attn_impl=attn_impl)
    targets = jnp.concatenate([input_ids[:, 1:], jnp.zeros_like(input_ids[:, :1])], axis=1)
    lp = hidden_logps(cfg, params, x, targets, temperature=temperature, chunk=chunk, constrain=constrain)
    return lp.at[:, -1].set(0.0)  # no next token


def hidden_logps(cfg: ModelConfig, params: dict[str, Array], x: Array, targets: Array, *,
                 temperature: float | Array = 1.0, chunk: int | None = None,
                 constrain: Callable[[Array, tuple[str, ...]], Array] | None = None) -> Array:
    """Final hidden states x (b, t, d), targets (b, t) -> log softmax(x W / temperature)
    at the targets, (b, t) float32, computed `chunk` sequence positions at a time."""
    b, t, d = x.shape
    c = chunk or default_logps_chunk(cfg.vocab_size, b, t)
    if c < 1:
        raise ValueError(f"token_logps: chunk must be >= 1, got {c}")
    c = min(c, t)
    n = -(-t // c)
    if n * c > t:  # a last, partial chunk: pad it (its positions are dropped below)
        x = jnp.pad(x, ((0, 0), (0, n * c - t), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, n * c - t)))
    xs = x.reshape(b, n, c, d).swapaxes(0, 1)  # (n, b, c, d): chunks of the sequence, batch kept whole
    ts = targets.reshape(b, n, c).swapaxes(0, 1)  # (n, b, c)
    w, spec = _lm_weight(cfg, params)
    w_axes = param_shapes(cfg)["embed" if cfg.tie_word_embeddings else "lm_head"][1]
    scaled = not (isinstance(temperature, (int, float)) and temperature == 1.0)
    inv_t = (1.0 / jnp.asarray(temperature, jnp.float32)) if scaled else jnp.float32(1.0)
    with jax.named_scope("lm_head_logps"):
        out = _chunked_logps(spec, w_axes, scaled, constrain, xs, ts, w, inv_t)  # (n, b, c)
    return out.swapaxes(0, 1).reshape(b, n * c)[:, :t]


def _chunk_logits(spec, pin, xc, w, inv_t, scaled):
    """(raw float32 logits, tempered logits) of one chunk (b, c, v)."""
    raw = jnp.einsum(spec, pin(xc, ("batch", "seq", "act_embed")), w, preferred_element_type=jnp.float32)
    return raw, (raw * inv_t if scaled else raw)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _chunked_logps(spec, w_axes, scaled, constrain, xs, ts, w, inv_t):
    return _chunked_logps_fwd(spec, w_axes, scaled, constrain, xs, ts, w, inv_t)[0]


def _chunked_logps_fwd(spec, w_axes, scaled, constrain, xs, ts, w, inv_t):
    pin = constrain or (lambda a, axes: a)

    def one(a):
        xc, tc = a
        _, z = _chunk_logits(spec, pin, xc, w, inv_t, scaled)
        lse = jax.nn.logsumexp(z, axis=-1)
        return jnp.take_along_axis(z, tc[..., None], axis=-1)[..., 0] - lse, lse

    out, lse = jax.lax.map(one, (xs, ts))  # (n, b, c) each: only these are kept
    return out, (xs, ts, w, inv_t, lse)


def _chunked_logps_bwd(spec, w_axes, scaled, constrain, res, g):
    """Per chunk: recompute the logits, d logp[target] / d z = onehot - softmax(z); the
    vocabulary projection's gradient is summed over the chunks in float32 (a bfloat16 sum
    of many chunks would lose what one whole-sequence matmul keeps)."""
    xs, ts, w, inv_t, lse = res
    pin = constrain or (lambda a, axes: a)
    w_sub = spec.split(",")[1].split("->")[0]  # "dv" (lm_head) or "vd" (tied embedding)

    def one(carry, a):
        dw, dinv = carry
        xc, tc, lc, gc = a
        raw, z = _chunk_logits(spec, pin, xc, w, inv_t, scaled)
        p = jnp.exp(z - lc[..., None])
        onehot = jnp.arange(z.shape[-1]) == tc[..., None]
        dz = gc[..., None] * (onehot.astype(jnp.float32) - p)  # (b, c, v)
        if scaled:
            dinv = dinv + jnp.sum(dz * raw)
            dz = dz * inv_t
        dx = jnp.einsum(f"btv,{w_sub}->btd", dz.astype(w.dtype), w, preferred_element_type=jnp.float32)
        dw = pin(dw + jnp.einsum(f"btd,btv->{w_sub}", xc, dz.astype(xc.dtype), preferred_element_type=jnp.float32),
                 w_axes)
        return (dw, dinv), dx.astype(xc.dtype)

    dw0 = pin(jnp.zeros(w.shape, jnp.float32), w_axes)
    (dw, dinv), dxs = jax.lax.scan(one, (dw0, jnp.float32(0)), (xs, ts, lse, g))
    return dxs, None, dw.astype(w.dtype), dinv.astype(inv_t.dtype)


_chunked_logps.defvjp(_chunked_logps_fwd, _chunked_logps_bwd)


def _get(var: nnx.Variable):
    return var.get_value() if hasattr(var, "get_value") else var.value


def _set(var: nnx.Variable, value) -> None:
    if hasattr(var, "set_value"):
        var.set_value(value)
    else:
        var.value = value


class _Group(nnx.Module):
    """A namespace for the stacked layer parameters."""


class Transformer(nnx.Module):
    """The decoder as an nnx module. Parameters live at the paths of `param_shapes`
    (`embed`, `layers/wq`, ...), each an nnx.Param whose `logical_axes` metadata names
    its axes for the sharding table."""

    def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs, init_std: float = 0.02):
        self.cfg = cfg
        self.layers = _Group()
        for path, (shape, axes) in param_shapes(cfg).items():
            if path.endswith("norm"):
                value = jnp.ones(shape, dtype)
            elif "/b" in path:
                value = jnp.zeros(shape, dtype)
            else:
                value = (init_std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
            owner, name = (self.layers, path.split("/")[1]) if "/" in path else (self, path)
            setattr(owner, name, nnx.Param(value, logical_axes=axes))

    @property
    def dtype(self):
        return self.param_dict()["embed"].dtype

    def param_dict(self) -> dict[str, Array]:
        out = {}
        for path in param_shapes(self.cfg):
            owner, name = (self.layers, path.split("/")[1]) if "/" in path else (self, path)
            out[path] = _get(getattr(owner, name))
        return out

    def param_var(self, path: str) -> nnx.Param:
        owner, name = (self.layers, path.split("/")[1]) if "/" in path else (self, path)
        return getattr(owner, name)

    def set_params(self, params: dict[str, Array]) -> None:
        """Swap in new weights (same shapes), e.g. after an M-step or a restore."""
        for path, value in params.items():
            _set(self.param_var(path), value)

    def __call__(self, input_ids, attention_mask=None, positions=None, cache=None, cache_index=0,
                 **kw):
        logits, new_cache = forward(self.cfg, self.param_dict(), jnp.asarray(input_ids),
                                    None if attention_mask is None else jnp.asarray(attention_mask),
                                    positions, cache, cache_index, **kw)
        return logits if cache is None else (logits, new_cache)
