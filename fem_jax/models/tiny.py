"""The tiny builtin models, built locally for smoke runs and tests (the random ones in a
second, `tiny-arith-llama` in under a minute on two CPU cores); no network, no torch. Each
has a small locally trained byte-level BPE tokenizer and a ChatML template.

- `tiny-random-llama` / `tiny-random-qwen2`: random weights. Their outputs are noise, which
  is all a plumbing test needs (many parity tests rely on them: they stay as they are).
- `tiny-arith-llama`: the random Llama's shape, pre-trained for `ARITH.steps` optimizer
  steps (fem_jax.mstep.Trainer, objective `fem`: SFT on the completions) on seeded chat
  transcripts of the arithmetic task's prompts (the task's own `messages`, rendered by the
  chat template through `encode_prompt`, exactly as the loop feeds them) answered by a
  short "3 + 4 = 7". It is meant to be weak, not perfect: a transcript's answer is right
  with probability `ARITH.p_correct` and otherwise off by 1 or 2, and the model does not
  fit even that: sampled at temperature 1 it is right on roughly a quarter to a third of
  its draws, so filtered EM keeps some and has something to improve. Half the transcripts
  carry one of the task's hints (the gold answer) after the question, answered from the
  same noisy distribution: a hinted prompt does not throw the model off, and helps it a
  little (the hinted number is there to copy), as the hint helps SmolLM2. Numbers
  tokenize digit by digit (SmolLM2's pre-tokenizer does the same).

  The problems are two numbers in 0..9 (configs/tiny.yaml's task). Every problem of the
  tiny config's test split for the seeds `ARITH.held_out_seeds` (the run seed 257 and the
  papers' 521, 1031) is left out of the pre-training: the model never saw a test problem of
  those runs (tests/test_tiny.py checks this against configs/tiny.yaml). With another seed,
  or other task options, the test split may hold problems it was pre-trained on.

A model appears in the cache by one rename once complete (fem_jax.io.publish); a build is
seeded and deterministic on one machine. `tiny-arith-llama`'s folder carries
`fem_jax_tiny.json` (its recipe, `ARITH_VERSION` and the pre-training loss); a folder of
another recipe or version is rebuilt, under a lock (two processes do not both build it).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import string
from pathlib import Path

from ..io import file_lock, publish, tmp_sibling

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


def _tokenizer(folder: Path, vocab_size: int = 320, corpus: list[str] = _CORPUS, split_digits: bool = False):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if split_digits else byte_level)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)
    return fast


def _config(tok, family: str):
    from .transformer import ModelConfig

    return ModelConfig(
        # head_dim 32, the least that vLLM's CPU attention takes (32, 64, 80, ...), and
        # hidden_size = heads x head_dim, as vLLM's Qwen2 assumes: the tiny models run on both
        # engines; 4 query heads over 2 key/value heads keep GQA and --mesh tensor=2
        vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, rope_theta=10000.0,
        max_position_embeddings=1024, tie_word_embeddings=family == "qwen2", qkv_bias=family == "qwen2",
        model_type=family, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id)


def build(folder: str | os.PathLike, family: str = "llama", seed: int = 0) -> Path:
    """Write the tiny random model's HF folder (atomically) and return it."""
    import jax.numpy as jnp
    from flax import nnx

    from .hf import save_pretrained
    from .transformer import Transformer

    folder = Path(folder)
    tmp = tmp_sibling(folder)  # the tokenizer, read by save_pretrained
    try:
        tok = _tokenizer(tmp)
        model = Transformer(_config(tok, family), dtype=jnp.float32, rngs=nnx.Rngs(seed), init_std=0.1)
        save_pretrained(model, tmp / "model", tokenizer_from=tmp)
        (tmp / "model" / MARKER).write_text(json.dumps({"name": f"tiny-random-{family}", "version": RANDOM_VERSION,
                                                         "seed": seed}) + "\n")
        publish(tmp / "model", folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


# ----------------------------------------------------------------------------- tiny-arith-llama

ARITH_VERSION = 2  # bump when the code changes what a build writes (a recipe change is seen by itself)
RANDOM_VERSION = 2  # likewise for the random models (2: head_dim 16 -> 32, hidden 64 -> 128)
MARKER = "fem_jax_tiny.json"


@dataclasses.dataclass(frozen=True)
class ArithRecipe:
    task: tuple = (("operands", "2"), ("min_value", 0), ("max_value", 9))  # configs/tiny.yaml's task options
    n_test: int = 8  # configs/tiny.yaml's task.options.n_test: the test split left out, per seed
    held_out_seeds: tuple = (257, 521, 1031)
    p_correct: float = 0.5  # the share of right answers in the transcripts; the rest off by 1 or 2
    hinted: float = 0.5  # the share of transcripts whose prompt carries a hint
    steps: int = 200
    batch_size: int = 32
    lr: float = 3e-3
    vocab_size: int = 512
    seed: int = 0


ARITH = ArithRecipe()


def arith_problems(recipe: ArithRecipe = ARITH) -> list:
    """The arithmetic problems (fem_jax.tasks Examples) of the pre-training: every problem of
    the recipe's task but those of its test split for the held-out seeds."""
    from ..tasks.arithmetic import Arithmetic

    options = dict(recipe.task)
    held_out = {ex.fields["question"] for s in recipe.held_out_seeds
                for ex in Arithmetic(n_train=0, n_test=recipe.n_test, seed=s, **options).load("test")}
    # every distinct problem of the range, in the task's own format
    everything = Arithmetic(n_train=_count(options), n_test=0, seed=recipe.seed, **options).load("train")
    kept = [ex for ex in everything if ex.fields["question"] not in held_out]
    return sorted(kept, key=lambda ex: ex.fields["question"])


def _count(options: dict) -> int:
    lo, hi, ops = options["min_value"], options["max_value"], str(options["operands"])
    if "," in ops:
        raise ValueError(f"tiny-arith-llama's recipe: task operands {ops!r}, expected one count")
    return (hi - lo + 1) ** int(ops)


def _transcripts(tok, recipe: ArithRecipe) -> list:
    """Seeded TrainExamples (prompt ids, completion ids): `steps * batch_size` draws of a
    problem, a hint or none, and a noisy answer."""
    import numpy as np

    from ..mstep import TrainExample
    from ..rollout.engine import encode_prompt
    from ..tasks.arithmetic import Arithmetic

    task = Arithmetic(**dict(recipe.task))
    problems = arith_problems(recipe)
    hints = [None, *task.hint_schemes]
    rng = np.random.default_rng(recipe.seed)
    prompts, completions, out = {}, {}, []
    for _ in range(recipe.steps * recipe.batch_size):
        ex = problems[int(rng.integers(len(problems)))]
        hint = hints[int(rng.integers(1, len(hints)))] if rng.random() < recipe.hinted else None
        answer = ex.gold
        if rng.random() >= recipe.p_correct:
            delta = int(rng.choice([-2, -1, 1, 2]))
            answer = ex.gold + (delta if ex.gold + delta >= 0 else -delta)
        if (ex.id, hint) not in prompts:
            prompts[ex.id, hint] = encode_prompt(tok, task.messages(ex, hint=hint))
        text = f"{ex.fields['question']} = {answer}"
        if text not in completions:
            completions[text] = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        out.append(TrainExample(prompts[ex.id, hint], completions[text]))
    return out


def _arith_corpus(recipe: ArithRecipe) -> list[str]:
    """The tokenizer's corpus: the random models' plus the task's prompts in the chat
    template, with each hint wording, and an answer."""
    from ..tasks.arithmetic import Arithmetic
    from ..tasks.base import Example

    task = Arithmetic(**dict(recipe.task))
    ex = Example("corpus", 7, {"question": "3 + 4"})
    turns = [f"<|im_start|>user\n{task.messages(ex, hint=h)[0]['content']}<|im_end|>\n<|im_start|>assistant\n"
             f"3 + 4 = 7<|im_end|>\n" for h in (None, *task.hint_schemes)]
    return _CORPUS + turns


def build_arith(folder: str | os.PathLike, recipe: ArithRecipe = ARITH) -> Path:
    """Pre-train `tiny-arith-llama` (see the module docstring) and publish its HF folder."""
    import jax.numpy as jnp
    from flax import nnx

    from ..config import MStepCfg
    from ..mstep import Trainer, make_batches
    from .hf import save_params
    from .transformer import Transformer

    folder = Path(folder)
    stage = tmp_sibling(folder)
    try:
        tok = _tokenizer(stage / "tokenizer", recipe.vocab_size, _arith_corpus(recipe), split_digits=True)
        cfg = _config(tok, "llama")
        model = Transformer(cfg, dtype=jnp.float32, rngs=nnx.Rngs(recipe.seed), init_std=0.1)
        examples = _transcripts(tok, recipe)
        longest = max(len(e.prompt_ids) + len(e.completion_ids) for e in examples)
        # one length bucket: the train step compiles once
        mcfg = MStepCfg(objective="fem", lr_start=recipe.lr, lr_end=recipe.lr, batch_size=recipe.batch_size,
                        micro_batch_size=recipe.batch_size, max_seq_len=longest, length_bucket=longest,
                        grad_clip=1.0)
        trainer = Trainer(cfg, model.param_dict(), mcfg)
        del model
        stats = trainer.train(make_batches(examples, mcfg, tok.pad_token_id, seed=recipe.seed))
        out = save_params(trainer.params, cfg, stage / "model", tokenizer_from=stage / "tokenizer")
        losses = stats["train_losses"]
        (out / MARKER).write_text(json.dumps(
            {"name": "tiny-arith-llama", "version": ARITH_VERSION, "recipe": _recipe_json(recipe),
             "optimizer_steps": stats["optimizer_steps"], "first_loss": losses[0], "last_loss": losses[-1]},
            indent=2) + "\n")
        publish(out, folder)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return folder


def _arith_complete(folder: Path) -> bool:
    try:
        meta = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return (meta.get("version") == ARITH_VERSION and meta.get("recipe") == _recipe_json(ARITH)
            and (folder / "model.safetensors").exists())


def _random_complete(folder: Path) -> bool:
    try:
        return json.loads((folder / MARKER).read_text()).get("version") == RANDOM_VERSION
    except (OSError, ValueError):
        return False


def _recipe_json(recipe: ArithRecipe) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(recipe)))


TINY = ("tiny-random-llama", "tiny-random-qwen2", "tiny-arith-llama")


def materialize(name: str, cache: str | os.PathLike) -> Path:
    """The tiny model's folder in `cache`, built there on first use (see models.resolve)."""
    if name not in TINY:
        raise ValueError(f"unknown tiny model {name!r}; known: {', '.join(TINY)}")
    folder = Path(cache) / name
    if name == "tiny-arith-llama":
        complete, make = _arith_complete, build_arith
    else:
        complete, make = _random_complete, (lambda f: build(f, family=name.rsplit("-", 1)[1]))
    if not complete(folder):
        folder.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(folder.parent / f".{name}.lock"):  # several processes may start on a fresh cache
            if not complete(folder):  # another process may have built it meanwhile
                make(folder)
    return folder
