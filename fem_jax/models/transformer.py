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
(b, k, s, h), the layout the attention matmuls read without a transpose. A query at
slot q sees the key slots s <= q whose mask bit is set, so left padding and decoding
share one rule.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Array = jax.Array

_NEG = -1e30  # finite "minus infinity": a fully masked (padding) row stays NaN-free


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


def attention(q: Array, k: Array, v: Array, mask: Array) -> Array:
    """q (b, t, n, h), k/v (b, k, s, h), mask (b, t, s) bool -> (b, t, n*h).

    The output is transposed as an activation, here, and flattened for a 2-D output
    projection: left to choose, XLA on CPU transposes the (n, h, d) weight instead, at
    every call."""
    b, t, n, h = q.shape
    kv = k.shape[1]
    q = q.reshape(b, t, kv, n // kv, h)  # (b, t, kv, group, h)
    scores = jnp.einsum("btkgh,bksh->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores * (h**-0.5)
    scores = jnp.where(mask[:, None, None, :, :], scores, _NEG)
    w = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bksh->bkgth", w, v)  # the matmul's own output order
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n * h)  # (b, t, n*h): heads flattened


def decoder_layer(
    cfg: ModelConfig, lp: dict[str, Array], x: Array, cos: Array, sin: Array,
    mask: Array, kv: tuple[Array, Array, Array] | None, cache_index,
) -> tuple[Array, tuple[Array, Array, Array] | None]:
    """One pre-norm decoder layer. `lp` holds this layer's weights (no `layers` axis).
    `kv` is None, or (cache k, cache v, layer index) with the stacked (l, b, k, s, h)
    cache, or (cache k, cache v, None) with this layer's own (b, k, s, h) cache."""
    with jax.named_scope("attention"):
        h = rms_norm(x, lp["attn_norm"], cfg.rms_norm_eps)
        q = jnp.einsum("btd,dnh->btnh", h, lp["wq"])
        k = jnp.einsum("btd,dkh->btkh", h, lp["wk"])
        v = jnp.einsum("btd,dkh->btkh", h, lp["wv"])
        if cfg.qkv_bias:
            q, k, v = q + lp["bq"], k + lp["bk"], v + lp["bv"]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # (b, k, t, h)
        if kv is not None:
            ck, cv, layer = kv
            if layer is None:  # this layer's own cache
                idx = (0, 0, cache_index, 0)
                ck = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), idx)
                cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), idx)
                k, v = ck.astype(q.dtype), cv.astype(q.dtype)
            else:  # the whole stacked cache rides in the scan carry: updated in place
                idx = (layer, 0, 0, cache_index, 0)
                ck = jax.lax.dynamic_update_slice(ck, k[None].astype(ck.dtype), idx)
                cv = jax.lax.dynamic_update_slice(cv, v[None].astype(cv.dtype), idx)
                k = jax.lax.dynamic_index_in_dim(ck, layer, keepdims=False).astype(q.dtype)
                v = jax.lax.dynamic_index_in_dim(cv, layer, keepdims=False).astype(q.dtype)
            kv = (ck, cv, layer)
        wo = lp["wo"]
        o = jnp.einsum("bte,ed->btd", attention(q, k, v, mask), wo.reshape(-1, wo.shape[-1]))
        if cfg.o_bias:
            o = o + lp["bo"]
        x = x + o
    with jax.named_scope("mlp"):
        h = rms_norm(x, lp["mlp_norm"], cfg.rms_norm_eps)
        g = jnp.einsum("btd,df->btf", h, lp["w_gate"])
        u = jnp.einsum("btd,df->btf", h, lp["w_up"])
        if cfg.mlp_bias:
            g, u = g + lp["b_gate"], u + lp["b_up"]
        m = jnp.einsum("btf,fd->btd", jax.nn.silu(g) * u, lp["w_down"])
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
    remat: bool = False,
    constrain: Callable[[Array, tuple[str, ...]], Array] | None = None,
    return_hidden: bool = False,
) -> tuple[Array, dict[str, Array] | None]:
    """Pure forward pass. Returns (logits (b, t, v) float32 — or the final hidden states
    when `return_hidden` — and the updated cache, or None without one).

    Positions follow the mask: the i-th real token of a row has position i (counting the
    tokens already in the cache), so left-padded rows match their unpadded selves.
    `constrain(x, logical_axes)` may pin activation shardings (see fem_jax.sharding).
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

    if cache is None:
        kv_mask = attention_mask
        q_slot = jnp.arange(t)
        s = t
    else:
        kv_mask = jax.lax.dynamic_update_slice(cache["mask"], attention_mask, (0, cache_index))
        q_slot = cache_index + jnp.arange(t)
        s = cache["mask"].shape[1]
    mask = (jnp.arange(s)[None, None, :] <= q_slot[None, :, None]) & kv_mask[:, None, :]  # (b, t, s)

    if "layers" in params:  # per-layer weights (unstack_layers): a Python loop over layers
        ks, vs = [], []
        for i, lp in enumerate(params["layers"]):
            kv = None if cache is None else (cache["k"][i], cache["v"][i], None)
            x, kv = decoder_layer(cfg, lp, x, cos, sin, mask, kv, cache_index)
            x = pin(x, ("batch", "seq", "act_embed"))
            if kv is not None:
                ks.append(kv[0])
                vs.append(kv[1])
        kv_out = [tuple(ks), tuple(vs)]
    else:
        x, kv_out = _scan_layers(cfg, params, x, cos, sin, mask, cache, cache_index, remat, pin)

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


def _scan_layers(cfg, params, x, cos, sin, mask, cache, cache_index, remat, pin):
    stacked = _layer_stacks(params)

    def body(carry, xs):
        x, ck, cv = carry
        lp, layer = xs
        kv = None if ck is None else (ck, cv, layer)
        x, kv = decoder_layer(cfg, lp, x, cos, sin, mask, kv, cache_index)
        x = pin(x, ("batch", "seq", "act_embed"))
        return (x, None, None) if kv is None else (x, kv[0], kv[1]), None

    if remat:
        body = jax.checkpoint(body, prevent_cse=False)
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
