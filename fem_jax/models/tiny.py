"""`tiny-random-llama` / `tiny-random-qwen2`: a random model with a small locally trained
tokenizer and a ChatML template, built in a second, for smoke runs and tests. It needs no
network and no torch; its outputs are noise, which is all a plumbing test needs."""

from __future__ import annotations

import os
import shutil
import string
from pathlib import Path

from ..io import tmp_sibling

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "What is 12 + 7? Think step by step. The answer is 19.",
    "Let's add the numbers: 3 + 45 + 8 = 56. So the answer is 56.",
    "Evaluate the response as if its score was 3. Do not output the hint. Evaluation: good. Score: 4",
    "The score of the response should be 2. Question: Natalia sold clips to 48 of her friends.",
    string.ascii_letters + string.digits + string.punctuation,
]


def _tokenizer(folder: Path, vocab_size: int = 320):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)
    return fast


def build(folder: str | os.PathLike, family: str = "llama", seed: int = 0) -> Path:
    """Write the tiny model's HF folder (atomically) and return it."""
    import jax.numpy as jnp
    from flax import nnx

    from .hf import save_pretrained
    from .transformer import ModelConfig, Transformer

    folder = Path(folder)
    tmp = tmp_sibling(folder)  # the tokenizer, read by save_pretrained
    try:
        tok = _tokenizer(tmp)
        cfg = ModelConfig(
            vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=10000.0,
            max_position_embeddings=1024, tie_word_embeddings=family == "qwen2", qkv_bias=family == "qwen2",
            model_type=family, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id)
        model = Transformer(cfg, dtype=jnp.float32, rngs=nnx.Rngs(seed), init_std=0.1)
        save_pretrained(model, folder, tokenizer_from=tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


TINY = ("tiny-random-llama", "tiny-random-qwen2")


def materialize(name: str, cache: str | os.PathLike) -> Path:
    """The tiny model's folder in `cache`, built there on first use (see models.resolve)."""
    if name not in TINY:
        raise ValueError(f"unknown tiny model {name!r}; known: {', '.join(TINY)}")
    folder = Path(cache) / name
    if not (folder / "config.json").exists():
        build(folder, family=name.rsplit("-", 1)[1])
    return folder
