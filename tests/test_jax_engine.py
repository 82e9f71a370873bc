"""JaxEngine: token-exact greedy parity with transformers' generate, sampling statistics,
determinism, stop handling, and weight swaps without recompilation."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from fem_jax.models import from_pretrained
from fem_jax.rollout import JaxEngine
from hf_models import build_hf, save_hf, tiny_config

torch = pytest.importorskip("torch")


@pytest.fixture(autouse=True, scope="module")
def _highest_matmul_precision():
    """Float32 parity needs float32 matmuls: a GPU's default precision is lower (TF32 or
    bfloat16 passes), the CPU's is not. Set here, so the module passes on both."""
    with jax.default_matmul_precision("highest"):
        yield


class IdTokenizer:
    """Whitespace-separated token ids in and out: lets tests pick exact ids."""

    eos_token_id = 2
    pad_token_id = 0

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [int(x) for x in text.split()]}

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids)

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return " ".join(m["content"] for m in messages) + " 1"


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def pair(request, tmp_path_factory):
    hf = build_hf(tiny_config(request.param, vocab=160, tied=request.param == "qwen2"), seed=3)
    folder = save_hf(hf, tmp_path_factory.mktemp(request.param))
    return hf, from_pretrained(folder)


def _hf_greedy(hf, prompt_ids, max_new):
    ids = torch.tensor([prompt_ids])
    out = hf.generate(ids, do_sample=False, max_new_tokens=max_new, eos_token_id=2, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


def test_greedy_matches_transformers_token_for_token(pair):
    hf, model = pair
    rng = np.random.RandomState(0)
    prompts = [rng.randint(3, 160, size=L).tolist() for L in (3, 17, 9, 30, 1)]
    engine = JaxEngine(model, IdTokenizer(), chunk=8)
    outs = engine.generate([" ".join(map(str, p)) for p in prompts], n=2, temperature=0, max_new_tokens=24)
    for p, o in zip(prompts, outs):
        ref = _hf_greedy(hf, p, 24)
        for s in o:  # both samples of a greedy prompt are the argmax path
            assert s.token_ids == ref, (p, s.token_ids, ref)
            assert s.finish_reason == ("stop" if ref[-1] == 2 else "length")
            assert len(s.logprobs) == len(s.token_ids) and all(lp <= 0 for lp in s.logprobs)


def test_sampled_logprobs_are_transformers_log_softmax(pair):
    """Each sampled token's logprob is log_softmax of transformers' logits (the raw, T = 1
    distribution, as engine.Sample says), at the position that produced it."""
    hf, model = pair
    rng = np.random.RandomState(1)
    prompts = [rng.randint(3, 160, size=L).tolist() for L in (4, 11)]
    engine = JaxEngine(model, IdTokenizer(), chunk=8)
    outs = engine.generate([" ".join(map(str, p)) for p in prompts], n=2, temperature=0.7, max_new_tokens=10, seed=5)
    checked = 0
    for p, o in zip(prompts, outs):
        for s in o:
            ids = torch.tensor([p + s.token_ids])
            with torch.no_grad():
                logp = torch.log_softmax(hf(ids).logits[0].double(), dim=-1).numpy()
            want = [logp[len(p) - 1 + i, t] for i, t in enumerate(s.token_ids)]
            np.testing.assert_allclose(s.logprobs, want, rtol=1e-4, atol=1e-4)
            checked += len(want)
    assert checked >= 20


def test_greedy_stops_at_eos(pair):
    hf, model = pair
    # find a prompt whose greedy continuation hits some token; make it the EOS
    p = [5, 9, 33, 71]
    ref = _hf_greedy(hf, p, 12)
    eos = ref[4]
    engine = JaxEngine(model, IdTokenizer(), chunk=4, eos_token_ids=[eos])
    s = engine.generate([" ".join(map(str, p))], temperature=0, max_new_tokens=12)[0][0]
    first = ref.index(eos)
    assert s.token_ids == ref[:first + 1] and s.finish_reason == "stop"
    assert s.text == " ".join(map(str, ref[:first]))  # EOS kept in ids, not in text


def test_stop_string_truncates(pair):
    _, model = pair
    engine = JaxEngine(model, IdTokenizer(), chunk=4)
    full = engine.generate(["7 8 9"], temperature=0, max_new_tokens=16)[0][0]
    stop = " ".join(map(str, full.token_ids[3:5]))
    s = engine.generate(["7 8 9"], temperature=0, max_new_tokens=16, stop=[stop])[0][0]
    assert s.finish_reason == "stop" and stop not in s.text
    first = next(k for k in range(1, 17) if stop in " ".join(map(str, full.token_ids[:k])))
    assert s.token_ids == full.token_ids[:first]
    assert s.text == " ".join(map(str, full.token_ids[:first]))[:s.text.__len__()]


def test_seeded_sampling_is_deterministic_and_batch_independent(pair):
    _, model = pair
    prompts = ["3 4 5", "6 7 8 9 10 11", "12"]
    a = JaxEngine(model, IdTokenizer(), max_batch=64).generate(prompts, n=3, temperature=1.0, max_new_tokens=10, seed=7)
    b = JaxEngine(model, IdTokenizer(), max_batch=2).generate(prompts, n=3, temperature=1.0, max_new_tokens=10, seed=7)
    c = JaxEngine(model, IdTokenizer()).generate(prompts, n=3, temperature=1.0, max_new_tokens=10, seed=8)
    ids = lambda outs: [[s.token_ids for s in o] for o in outs]  # noqa: E731
    assert ids(a) == ids(b)
    assert ids(a) != ids(c)
    assert len({tuple(t) for t in ids(a)[0]}) > 1  # the n samples of one prompt differ


def test_chat_messages_use_the_template(pair):
    _, model = pair
    engine = JaxEngine(model, IdTokenizer())
    msgs = [{"role": "user", "content": "4 5 6"}]
    a = engine.generate([msgs], temperature=0, max_new_tokens=6)[0][0]
    b = engine.generate(["4 5 6 1"], temperature=0, max_new_tokens=6)[0][0]
    assert a.token_ids == b.token_ids


def test_update_swaps_weights_without_recompiling(pair):
    _, model = pair
    engine = JaxEngine(model, IdTokenizer())
    before = engine.generate(["5 6 7"], temperature=0, max_new_tokens=8)[0][0].token_ids
    from fem_jax.rollout import jax_engine
    n_before = jax_engine._decode._cache_size()
    params = model.param_dict()
    noisy = {k: v + 0.5 * jax.random.normal(jax.random.PRNGKey(1), v.shape, v.dtype) if k == "layers/w_up" else v
             for k, v in params.items()}
    engine.update(noisy)
    after = engine.generate(["5 6 7"], temperature=0, max_new_tokens=8)[0][0].token_ids
    assert after != before
    assert jax_engine._decode._cache_size() == n_before
    with pytest.raises(ValueError, match="layers/wq"):
        engine.update({**params, "layers/wq": params["layers/wq"][:1]})


@pytest.mark.parametrize("temperature,top_p,top_k", [(0.7, 1.0, 0), (1.3, 0.8, 0), (1.0, 1.0, 5)])
def test_sampling_distribution_matches_softmax(tmp_path, temperature, top_p, top_k):
    """Empirical first-token frequencies vs softmax(logits / T) truncated by top-p/top-k."""
    hf = build_hf(tiny_config("llama", vocab=24, hidden=32, inter=48, layers=1), seed=11)
    with torch.no_grad():  # a peaked but not degenerate distribution
        hf.lm_head.weight.mul_(8.0)
    model = from_pretrained(save_hf(hf, tmp_path / "m"))
    prompt = [4, 7, 9]
    logits = np.asarray(model(np.array([prompt])))[0, -1].astype(np.float64) / temperature
    p = np.exp(logits - logits.max())
    p /= p.sum()
    order = np.argsort(-p)
    keep = np.zeros_like(p, bool)
    mass = 0.0
    for rank, tok in enumerate(order):
        if (top_p < 1.0 and mass >= top_p) or (top_k and rank >= top_k):
            break
        keep[tok] = True
        mass += p[tok]
    q = np.where(keep, p, 0.0)
    q /= q.sum()
    N = 4096
    engine = JaxEngine(model, IdTokenizer(), max_batch=1024, eos_token_ids=[-1])
    outs = engine.generate(["4 7 9"], n=N, temperature=temperature, top_p=top_p, top_k=top_k,
                           max_new_tokens=1, seed=0)[0]
    counts = np.bincount([s.token_ids[0] for s in outs], minlength=24) / N
    assert np.all(counts[~keep] == 0), "a truncated token was sampled"
    bound = 4.5 * np.sqrt(q * (1 - q) / N) + 2e-3
    assert np.all(np.abs(counts - q) <= bound), np.c_[counts, q]
    assert keep.sum() < 24 or (top_p == 1.0 and not top_k)  # the truncation cases do truncate


def _nucleus_by_sorting(x: np.ndarray, top_p: float) -> np.ndarray:
    """The textbook definition: sort, keep while the mass strictly above is < top_p."""
    keep = np.zeros_like(x, bool)
    for r, row in enumerate(x):
        p = np.exp(row - row.max())
        p /= p.sum()
        order = np.argsort(-row, kind="stable")
        before = np.cumsum(p[order]) - p[order]
        cut = row[order][before < top_p].min()
        keep[r] = row >= cut  # ties with the cutoff stay
    return keep


@pytest.mark.parametrize("scale", [0.3, 3.0, 12.0])
def test_top_p_mask_equals_sorting(scale):
    """The sort-free nucleus (top-64 fast path, bisection fallback) keeps exactly the
    tokens the sort-and-cumsum definition keeps: flat rows (hundreds of tokens in the
    nucleus, fallback) and peaked rows (fast path), ties and -inf entries included."""
    from fem_jax.rollout.jax_engine import _top_p_keep

    rng = np.random.default_rng(int(scale * 10))
    x = (rng.standard_normal((6, 500)) * scale).astype(np.float32)
    x[0, :40] = x[0, 0]  # a tie straddling the cutoff
    x[1, ::3] = -np.inf  # top-k leftovers
    x = np.round(x, 2)  # more ties
    for top_p in (0.5, 0.9, 0.99):
        got = np.asarray(jax.jit(_top_p_keep)(x, np.float32(top_p)))
        want = _nucleus_by_sorting(x.astype(np.float64), top_p)
        assert (got == want).all(), (top_p, got.sum(1), want.sum(1))
    sizes = _nucleus_by_sorting(x.astype(np.float64), 0.9).sum(1)
    if scale == 0.3:
        assert (sizes > 64).any()  # the bisection fallback ran
    if scale == 12.0:
        assert (sizes <= 64).all()  # the top-64 fast path alone


def test_compacting_finished_rows_changes_nothing(pair):
    """Rows that stop early are dropped from the batch mid-generation; the samples are the
    same as when every row runs to the end of the batch."""
    _, model = pair
    eos = list(range(3, 40))  # about a quarter of the vocabulary ends a row: staggered stops
    prompts = [" ".join(str(5 + i + j) for j in range(3 + i % 4)) for i in range(6)]
    kw = dict(n=4, temperature=1.0, max_new_tokens=24, seed=3)
    small = JaxEngine(model, IdTokenizer(), chunk=2, eos_token_ids=eos, min_compact_batch=1)
    never = JaxEngine(model, IdTokenizer(), chunk=2, eos_token_ids=eos, min_compact_batch=10**6)
    a, b = small.generate(prompts, **kw), never.generate(prompts, **kw)
    assert any(k[0] == "compact" for k in small.shapes_compiled)
    assert not any(k[0] == "compact" for k in never.shapes_compiled)
    for oa, ob in zip(a, b):
        for sa, sb in zip(oa, ob):
            assert sa.token_ids == sb.token_ids and sa.finish_reason == sb.finish_reason
            np.testing.assert_allclose(sa.logprobs, sb.logprobs, rtol=1e-5, atol=1e-6)
    lengths = {len(s.token_ids) for o in a for s in o}
    assert len(lengths) > 3  # the stops really were staggered


def test_kv_buckets_change_nothing(pair):
    """Decoding over the filled part of the cache only (power-of-two buckets of slots, the
    GPU default) gives the samples of decoding over the whole cache; forced on here, on
    CPU, over a generation that crosses two buckets."""
    _, model = pair
    prompts = ["3 4 5", "6 7 8 9 10 11 12 13 14 15 16 17 18", "12"]
    kw = dict(n=2, temperature=1.0, max_new_tokens=300, seed=5)
    on = JaxEngine(model, IdTokenizer(), chunk=32, eos_token_ids=[-1], kv_buckets=True)
    off = JaxEngine(model, IdTokenizer(), chunk=32, eos_token_ids=[-1], kv_buckets=False)
    a, b = on.generate(prompts, **kw), off.generate(prompts, **kw)
    assert {k[-1] for k in on.shapes_compiled if k[0] == "decode"} == {128, 256, None}
    assert {k[-1] for k in off.shapes_compiled if k[0] == "decode"} == {None}
    for oa, ob in zip(a, b):
        for sa, sb in zip(oa, ob):
            assert sa.token_ids == sb.token_ids and len(sa.token_ids) == 300
            np.testing.assert_allclose(sa.logprobs, sb.logprobs, rtol=1e-5, atol=1e-5)
    greedy = on.generate(["5 9 33 71"], temperature=0, max_new_tokens=200)[0][0].token_ids
    assert greedy == off.generate(["5 9 33 71"], temperature=0, max_new_tokens=200)[0][0].token_ids


def test_default_decode_chunk_follows_the_backend(pair):
    _, model = pair
    engine = JaxEngine(model, IdTokenizer())
    assert engine.chunk == (64 if jax.default_backend() == "gpu" else 16)
    assert engine.kv_buckets == (jax.default_backend() == "gpu")
