"""JaxEngine: an in-process batched sampler over a static KV cache.

How a call runs:
- every prompt is tokenized once (`encode_prompt`) and repeated `n` times; rows are
  sorted by prompt length and cut into batches of at most `max_batch` rows, so rows of
  similar length share a batch and short prompts do not pay for long ones;
- batch size is rounded up to a power of two, prompt length to a power of two or the
  midpoint below it (left padding; padded rows are born finished), so a run compiles a
  handful of shapes, not one per batch;
- one jitted prefill fills the cache (the prompt attends to its own keys; cuDNN's fused
  attention on a GPU in half precision), then jitted decode chunks of `chunk` tokens (16
  on CPU, 64 on a GPU) run a `lax.while_loop` that exits as soon as every row has
  finished; on a GPU a chunk attends to the filled part of the cache only (`kv_buckets`);
  between chunks the host checks stop strings, and once at most half the rows are still
  running it gathers them into a batch half the size (down to `min_compact_batch`):
  finished rows stop costing work;
- every row draws from its own key, fold_in(seed, prompt index, sample index, step): the
  samples do not depend on how rows were batched. Same seed, same samples.

Weights are a jit argument, not a constant: `update(params)` swaps them without a
recompile. The engine keeps its own per-layer copy of them (`unstack_layers`), the form
that decodes fastest on CPU; the sampler's nucleus (top-p) cut avoids sorting the
vocabulary, the slowest op of a CPU decode step otherwise. Returned log-probabilities
are those of the model's own distribution (the raw logits' log-softmax), as vLLM's
default; temperature, top-k and top-p shape only the draw.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..models.transformer import forward, init_cache, lm_logits, unstack_layers
from .engine import Prompt, Sample, SamplingParams, SyncReport, encode_prompt


def _bucket(x: int, minimum: int) -> int:
    """The least power of two >= x (and >= minimum)."""
    return max(minimum, 1 << max(0, math.ceil(math.log2(max(x, 1)))))


def _length_bucket(x: int, minimum: int) -> int:
    """Prompt lengths: powers of two and their midpoints (16, 24, 32, 48, 64, 96, ...), so
    padding wastes at most a third of a prefill, for two shapes per doubling."""
    p = _bucket(x, minimum)
    return p * 3 // 4 if p * 3 // 4 >= max(x, minimum) and p >= 4 else p


_TOP_P_FAST_K = 64


def _ordered_key(x):
    """float32 -> uint32 with the same order (so a bisection over it is exact)."""
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))


def _top_p_keep(x, top_p):
    """Nucleus mask (b, v): keep the smallest set of highest-probability tokens whose mass
    reaches `top_p` (ties at the cutoff kept), as the sort-and-cumsum definition would.

    Sorting the vocabulary was the slowest op of a CPU decode step (a profile of
    SmolLM2 at batch 16 put it above the whole forward pass), so the cutoff is found among the top 64 tokens when they hold `top_p` of the mass (the
    usual case), and otherwise by a bisection over the ordered bit pattern of the logits
    (32 passes, exact).
    """
    lse = jax.nn.logsumexp(x, axis=-1, keepdims=True)
    k = min(_TOP_P_FAST_K, x.shape[-1])
    vals = jax.lax.top_k(x, k)[0]  # (b, k) descending
    probs = jnp.exp(vals - lse)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each of the top k
    fast_cut = jnp.min(jnp.where(before < top_p, vals, jnp.inf), axis=-1, keepdims=True)
    fast_ok = before[:, -1] + probs[:, -1] >= top_p  # the cutoff lies within the top k

    def bisect(_):
        p = jnp.exp(x - lse)
        key = _ordered_key(x)
        # invariant: mass above lo >= top_p > mass above hi; the answer is the least such hi
        lo = jnp.min(key, axis=-1) - 1
        hi = jnp.max(key, axis=-1)

        def step(_, c):
            lo, hi = c
            mid = lo + (hi - lo) // 2
            above = jnp.sum(jnp.where(key > mid[:, None], p, 0.0), axis=-1)
            ok = above < top_p
            return jnp.where(ok, lo, mid), jnp.where(ok, mid, hi)

        lo, hi = jax.lax.fori_loop(0, 32, step, (lo, hi))
        return key >= hi[:, None]

    return jax.lax.cond(jnp.all(fast_ok), lambda _: x >= fast_cut, bisect, None)


def _sample(logits, key, temperature, top_p, greedy: bool, use_top_p: bool, top_k: int):
    """logits (b, v) float32 -> token (b,). Per-row keys (b, 2); top_k 0 is off."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    x = logits / temperature
    if top_k > 0:
        kth = jax.lax.top_k(x, top_k)[0][:, -1:]
        x = jnp.where(x < kth, -jnp.inf, x)
    if use_top_p:
        x = jnp.where(_top_p_keep(x, top_p), x, -jnp.inf)
    return _inverse_cdf_draw(x, key)


def _inverse_cdf_draw(x, key):
    """One token per row from softmax(x) by inverting the cumulative distribution with
    one uniform per row: a few passes over the vocabulary, where Gumbel-max
    (`jax.random.categorical`) draws a random number per token, several times slower on
    CPU. Each token's interval [c_{j-1}, c_j) has its probability up to one float32
    rounding of the running sum; tokens of zero probability have empty intervals."""
    w = jnp.exp(x - jnp.max(x, axis=-1, keepdims=True))
    c = jnp.cumsum(w, axis=-1)
    total = c[:, -1:]
    u = jax.vmap(jax.random.uniform)(key)[:, None] * total
    u = jnp.minimum(u, jnp.nextafter(total, 0.0))  # u < total: the last interval is a real one
    return jnp.sum(c <= u, axis=-1).astype(jnp.int32)


# Module-level jitted functions keyed on static (hashable) model config and options: every
# engine of the same model shapes in a process shares their compilations.


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(4,))
def _prefill(static, params, ids, mask, cache):
    # only the last position's logits are needed: the vocabulary projection of the whole
    # prompt would cost more than the rest of the prefill (49k x 576 per token for SmolLM2).
    # At the static slot 0 the prompt attends to its own keys, not the whole cache.
    cfg, attn_impl = static
    x, cache = forward(cfg, params, ids, mask, cache=cache, cache_index=0, return_hidden=True,
                       attn_impl=attn_impl)
    return lm_logits(cfg, params, x[:, -1:])[:, 0], cache


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(2,))
def _decode(static, params, cache, logits, done, keys, step0, slot0, limit, sp):
    """Up to `chunk` tokens: sample from `logits`, feed the token, repeat; exits early
    when all rows are done. Returns tokens/logprobs (b, chunk) (-1 where none). Attention
    reads the first `kv_len` cache slots (None: all), which hold every slot this chunk
    writes."""
    cfg, eos, pad_id, (greedy, use_top_p, top_k), chunk, kv_len, attn_impl = static
    eos = jnp.asarray(eos, jnp.int32)
    temperature, top_p = sp
    b = done.shape[0]

    def cond(c):
        i, _, _, done, _, _ = c
        return (i < chunk) & (step0 + i < limit) & ~jnp.all(done)

    def body(c):
        i, cache, logits, done, toks, lps = c
        step_keys = jax.vmap(lambda k: jax.random.fold_in(k, step0 + i))(keys)
        tok = _sample(logits, step_keys, temperature, top_p, greedy, use_top_p, top_k)
        lp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tok[:, None], axis=-1)[:, 0]
        tok = jnp.where(done, -1, tok)
        toks = toks.at[:, i].set(tok)
        lps = lps.at[:, i].set(jnp.where(done, 0.0, lp))
        done = done | jnp.any(tok[:, None] == eos[None, :], axis=-1) | (step0 + i + 1 >= limit)
        feed = jnp.where(tok < 0, pad_id, tok)[:, None]
        logits, cache = forward(cfg, params, feed, None, cache=cache, cache_index=slot0 + i, kv_len=kv_len,
                                attn_impl=attn_impl)
        return i + 1, cache, logits[:, -1], done, toks, lps

    init = (jnp.int32(0), cache, logits, done, jnp.full((b, chunk), -1, jnp.int32),
            jnp.zeros((b, chunk), jnp.float32))
    _, cache, logits, done, toks, lps = jax.lax.while_loop(cond, body, init)
    return cache, logits, done, toks, lps


@jax.jit
def _take_rows(cache, logits, done, keys, idx):
    """Gather batch rows `idx` of the decoding state (cache k/v: one (b, ...) per layer)."""
    return ({"k": tuple(c[idx] for c in cache["k"]), "v": tuple(c[idx] for c in cache["v"]),
             "mask": cache["mask"][idx], "pos": cache["pos"][idx]}, logits[idx], done[idx], keys[idx])


# The engine's own copy of the weights, one dict per layer: decoding runs the layers with
# a Python loop over these instead of a scan over the stacked weights, whose per-layer
# slice copies cost as much as the matmuls of a decode step on CPU.
_unstack = jax.jit(unstack_layers)


def _default_chunk() -> int:
    """Decode tokens per jitted call: each call returns to the host (stop strings, compaction);
    on a GPU a step is short, so more of them share one host round trip."""
    return 64 if jax.default_backend() == "gpu" else 16


class JaxEngine:
    """`chunk`: tokens per decode call (default by backend, `_default_chunk`).
    `kv_buckets`: decode attends to the filled part of the cache only, rounded up to a
    power of two (>= 128 slots; one compilation per bucket). Default on a GPU, where a
    large batch reads more cache than weights per step (256 rows of Qwen2.5-0.5B over
    1024 bfloat16 slots: about 3 GB of keys and values against 1 GB of weights); off on
    CPU, whose decode program then stays as it was. `attn_impl`: see
    fem_jax.models.transformer."""

    def __init__(self, model, tokenizer, *, max_batch: int = 64, chunk: int | None = None,
                 eos_token_ids: Sequence[int] | None = None, min_prompt_bucket: int = 16,
                 min_compact_batch: int = 8, kv_buckets: bool | None = None, attn_impl: str = "auto"):
        self.cfg = model.cfg
        params = model.param_dict()
        # only the shapes and dtypes of the stacked weights are kept (to check updates): the
        # engine decodes from its own per-layer copy and holds no reference to the caller's
        self._spec = {k: (v.shape, v.dtype) for k, v in params.items()}
        self._layer_params = _unstack(params)
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.chunk = chunk or _default_chunk()
        self.kv_buckets = jax.default_backend() == "gpu" if kv_buckets is None else kv_buckets
        self.attn_impl = attn_impl
        self.min_prompt_bucket = min_prompt_bucket
        self.min_compact_batch = min_compact_batch
        if eos_token_ids is None:
            eos = set()
            for e in (self.cfg.eos_token_id, tokenizer.eos_token_id):
                if e is not None:
                    eos.update(e if isinstance(e, (tuple, list)) else [e])
            eos_token_ids = sorted(eos)
        self.eos = jnp.asarray(list(eos_token_ids) or [-1], jnp.int32)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.shapes_compiled: set[tuple] = set()
        self._eos_static = tuple(int(e) for e in np.asarray(self.eos))

    # ------------------------------------------------------------------ public API

    def update(self, params) -> None:
        """New weights of the same shapes, dtypes and shardings: no recompilation."""
        new = dict(params)
        for k, (shape, dtype) in self._spec.items():
            if new[k].shape != shape or new[k].dtype != dtype:
                raise ValueError(f"update: parameter {k} changed from {shape}/{dtype} "
                                 f"to {new[k].shape}/{new[k].dtype}")
        self._layer_params = _unstack(new)

    def sync(self, weights) -> SyncReport:
        """The Engine protocol: serve the trainer's weights, copied in memory (no recompile)."""
        import time

        t = time.perf_counter()
        self.update(weights.params)
        jax.block_until_ready(self._layer_params)
        return SyncReport("memory", seconds_load=time.perf_counter() - t)

    def release(self) -> None:
        """Drop the engine's weight copy until the next sync (frees memory during the M-step)."""
        self._layer_params = None

    @property
    def compilations(self) -> int:
        return len(self.shapes_compiled)

    def generate(self, prompts: Sequence[Prompt], n: int = 1, temperature: float = 1.0, top_p: float = 1.0,
                 top_k: int = 0, max_new_tokens: int = 128, seed: int = 0, stop: Sequence[str] = (),
                 progress=None) -> list[list[Sample]]:
        if self._layer_params is None:
            raise RuntimeError("JaxEngine: weights released; call sync() before generate()")
        sp = SamplingParams(n=n, temperature=temperature, top_p=top_p, top_k=top_k,
                            max_new_tokens=max_new_tokens, seed=seed, stop=tuple(stop))
        encoded = [encode_prompt(self.tokenizer, p) for p in prompts]
        rows = [(i, j) for i in range(len(prompts)) for j in range(n)]
        rows.sort(key=lambda r: -len(encoded[r[0]]))
        out: list[list[Sample | None]] = [[None] * n for _ in prompts]
        for start in range(0, len(rows), self.max_batch):
            batch = rows[start:start + self.max_batch]
            for (i, j), sample in zip(batch, self._run_batch([encoded[i] for i, _ in batch], batch, sp)):
                out[i][j] = sample
            if progress is not None:
                progress(len(batch))
        return out  # type: ignore[return-value]

    def _run_batch(self, prompt_ids: list[list[int]], rows: list[tuple[int, int]], sp: SamplingParams):
        real = len(rows)
        b = _bucket(real, 1)
        p = _length_bucket(max(len(x) for x in prompt_ids), self.min_prompt_bucket)
        s = p + sp.max_new_tokens
        ids = np.full((b, p), self.pad_id, np.int32)
        mask = np.zeros((b, p), bool)
        for r, x in enumerate(prompt_ids):
            ids[r, p - len(x):] = x
            mask[r, p - len(x):] = True
        base = jax.random.PRNGKey(sp.seed)
        keys = jnp.stack([jax.random.fold_in(jax.random.fold_in(base, i), j) for i, j in rows]
                         + [base] * (b - real))
        greedy = sp.temperature == 0
        flags = (greedy, not greedy and sp.top_p < 1.0, 0 if greedy else sp.top_k)  # static
        samp = (jnp.float32(max(sp.temperature, 1e-6)), jnp.float32(sp.top_p))
        self.shapes_compiled.add(("prefill", b, p, s))

        cache = init_cache(self.cfg, b, s, self._spec["embed"][1], per_layer=True)
        logits, cache = _prefill((self.cfg, self.attn_impl), self._layer_params, jnp.asarray(ids),
                                 jnp.asarray(mask), cache)
        done = jnp.asarray(np.arange(b) >= real)
        n_chunks = -(-sp.max_new_tokens // self.chunk)
        gen = np.full((b, n_chunks * self.chunk), -1, np.int32)
        lps = np.zeros((b, n_chunks * self.chunk), np.float32)
        where = np.arange(b)  # batch position -> original row
        step = 0
        while step < sp.max_new_tokens:
            kv_len = self._kv_len(p + step + self.chunk, s)
            self.shapes_compiled.add(("decode", len(where), s, flags, kv_len))
            cache, logits, done, toks, lp = _decode(
                (self.cfg, self._eos_static, self.pad_id, flags, self.chunk, kv_len, self.attn_impl),
                self._layer_params, cache, logits, done, keys, jnp.int32(step), jnp.int32(p + step),
                jnp.int32(sp.max_new_tokens), samp)
            gen[where, step:step + self.chunk] = np.asarray(toks)
            lps[where, step:step + self.chunk] = np.asarray(lp)
            step += self.chunk
            done_h = np.array(done)
            if sp.stop:
                for pos in np.nonzero(~done_h)[0]:
                    r = where[pos]
                    text = self.tokenizer.decode([t for t in gen[r] if t >= 0], skip_special_tokens=True)
                    if any(st in text for st in sp.stop):
                        done_h[pos] = True
                done = jnp.asarray(done_h)
            if done_h.all():
                break
            # finished rows stop costing work: move the live ones into a smaller batch
            live = np.nonzero(~done_h)[0]
            nb = _bucket(len(live), self.min_compact_batch)
            if nb <= len(where) // 2:
                keep = np.concatenate([live, np.nonzero(done_h)[0][:nb - len(live)]])
                self.shapes_compiled.add(("compact", len(where), nb))
                cache, logits, done, keys = _take_rows(cache, logits, done, keys, jnp.asarray(keep))
                where = where[keep]
        return [self._finish(gen[r], lps[r], sp) for r in range(real)]

    def _kv_len(self, needed: int, s: int) -> int | None:
        """The cache slots a decode chunk attends to: all (None), or with `kv_buckets` the
        least power of two >= max(needed, 128) below the cache length `s`."""
        if not self.kv_buckets:
            return None
        n = _bucket(needed, 128)
        return n if n < s else None

    def _finish(self, toks: np.ndarray, lps: np.ndarray, sp: SamplingParams) -> Sample:
        eos = set(np.asarray(self.eos).tolist())
        ids = [int(t) for t in toks if t >= 0]
        logps = [float(x) for x, t in zip(lps, toks) if t >= 0]
        reason = "stop" if ids and ids[-1] in eos else "length"
        body = ids[:-1] if reason == "stop" else ids
        text = self.tokenizer.decode(body, skip_special_tokens=True)
        if sp.stop:
            cut = [text.find(s_) for s_ in sp.stop if s_ in text]
            if cut:
                text = text[:min(cut)]
                reason = "stop"
                # keep the tokens up to the one that completed the stop string
                for k in range(1, len(body) + 1):
                    if any(s_ in self.tokenizer.decode(body[:k], skip_special_tokens=True) for s_ in sp.stop):
                        ids, logps = body[:k], logps[:k]
                        break
        return Sample(text=text, token_ids=ids, finish_reason=reason, logprobs=logps)
