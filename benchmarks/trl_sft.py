"""Our fem M-step against TRL's SFTTrainer, optimizer step by optimizer step.

    python benchmarks/trl_sft.py [--steps 6] [--lr 1e-3] [--grad-clip 1.0] [--rows 12]

The paper's baseline is TRL's SFT trainer with completion-only loss: supervised fine-tuning
on the accepted completions. fem_jax's `fem` objective claims to be the same thing. This
script trains one tiny random float32 Llama (2 layers, hidden 64, vocab 64, saved once as a
Hugging Face folder and loaded by both sides) on the same prompt/completion pairs, in the
same order, with the same hyperparameters, once with trl.SFTTrainer (PyTorch) and once with
fem_jax.mstep.Trainer (JAX), and prints both loss curves, both gradient-norm curves, their
largest differences and the largest difference of the final parameters. Two cases: one
batch of 4 sequences per step, and 2 micro-batches of 2 with gradient accumulation (TRL's
`num_items_in_batch` normalization against our whole-step token mean).

What TRL does to the data, mirrored here rather than guessed (the script checks that the
batches TRL's collator built are the ones we train on, and fails otherwise):

- a non-conversational completion gets the tokenizer's EOS appended, which the model is
  trained to predict; our examples carry it too (completion_ids + [eos]);
- prompt and completion are tokenized separately (no BOS: the word-level tokenizer adds
  none), the loss covers the completion tokens only, right padding, no packing;
- the loss of a step is sum(-log p) over its completion tokens / their number, the count
  taken over all micro-batches of the step (transformers' `num_items_in_batch`).

Settings that make the two sides comparable: float32 on both (TRL defaults to bf16=True,
set False here), gradient checkpointing off (no numerical effect, only slower), constant
learning rate without warmup, sequential sampling (transformers shuffles by default),
dropout 0, AdamW with the same betas and eps, max_grad_norm = grad_clip, weight decay 0.

Known differences between the two optimizers, none exercised at the defaults here:
- transformers' Trainer exempts biases and norm weights from weight decay; optax.adamw in
  fem_jax.mstep decays every parameter. With weight_decay > 0 the norm weights drift apart
  (`--weight-decay 0.1` shows it).
- torch's clip_grad_norm_ scales by max_norm / (norm + 1e-6), optax by max_norm / norm: a
  relative difference of about 1e-6 on steps that clip.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

SPECIAL = {"<pad>": 0, "<bos>": 1, "<eos>": 2}
VOCAB = 64
MODEL = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128, "rms_norm_eps": 1e-6,
         "initializer_range": 0.1, "tie_word_embeddings": False, "pad_token_id": 0, "bos_token_id": 1,
         "eos_token_id": 2}
CASES = {"batch 4": (1, 4), "accum 2x2": (2, 2)}  # name: (gradient accumulation steps, micro-batch size)


@dataclasses.dataclass(frozen=True)
class Hyper:
    steps: int = 6
    lr: float = 1e-3
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8  # optax.adamw's default, which fem_jax.mstep keeps
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0


def make_rows(n: int = 12, seed: int = 0) -> list[tuple[str, str]]:
    """n (prompt, completion) pairs of words w3..w63, of varied lengths (so that micro-batches
    hold different numbers of completion tokens). The completion starts with a space, as a
    continuation of the prompt text."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        p = rng.integers(len(SPECIAL), VOCAB, int(rng.integers(2, 9)))
        c = rng.integers(len(SPECIAL), VOCAB, int(rng.integers(1, 11)))
        rows.append((" ".join(f"w{i}" for i in p), " " + " ".join(f"w{i}" for i in c)))
    return rows


def word_ids(text: str) -> list[int]:
    return [int(w[1:]) for w in text.split()]


def build_folder(folder: Path, seed: int = 0) -> Path:
    """A random float32 Llama and a word-level tokenizer (w<i> -> i), saved as an HF folder."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {**SPECIAL, **{f"w{i}": i for i in range(len(SPECIAL), VOCAB)}}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**MODEL)).float()
    with torch.no_grad():  # norm weights away from 1, so that a slip on them shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def run_trl(folder: Path, rows: list[tuple[str, str]], accum: int, micro: int, hp: Hyper, out: Path) -> dict:
    """Train with trl.SFTTrainer; returns the logged loss and grad-norm per step, the
    collated micro-batches of the steps (numpy) and the folder of the final weights."""
    import torch
    import trl
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback

    # one thread: the model is tiny, and torch's pool otherwise fights XLA's idle-spinning
    # threads once jax has compiled something in this process (10x slower on 2 cores)
    torch.set_num_threads(1)
    torch.manual_seed(hp.seed)
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    fields = {f.name for f in dataclasses.fields(trl.SFTConfig)}
    # transformers 5.x renamed gradient_checkpointing (TRL's default: on) to activation_checkpointing
    ckpt = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    args = trl.SFTConfig(
        output_dir=str(out), report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, seed=hp.seed,
        per_device_train_batch_size=micro, gradient_accumulation_steps=accum, max_steps=hp.steps,
        learning_rate=hp.lr, lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch",
        adam_beta1=hp.b1, adam_beta2=hp.b2, adam_epsilon=hp.eps, weight_decay=hp.weight_decay,
        max_grad_norm=hp.grad_clip, logging_steps=1, bf16=False, fp16=False, **{ckpt: False},
        completion_only_loss=True, packing=False, shuffle_dataset=False, dataloader_num_workers=0,
        **({"train_sampling_strategy": "sequential"} if "train_sampling_strategy" in fields else {}),
    )
    ds = Dataset.from_list([{"prompt": p, "completion": c} for p, c in rows])
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    trainer.remove_callback(PrinterCallback)  # the curves are printed by main()
    if "train_sampling_strategy" not in fields:  # older transformers: no option, shuffles by default
        trainer._get_train_sampler = lambda *a, **k: SequentialSampler(trainer.train_dataset)
    ckpt_on = getattr(trainer.model, "is_activation_checkpointing", None)
    if ckpt_on is None:  # transformers 4.x
        ckpt_on = getattr(trainer.model, "is_gradient_checkpointing", False)
    if ckpt_on or args.bf16:
        raise RuntimeError("TRL run is not plain float32 without checkpointing")
    # the micro-batches the training loop will see: the sampler is sequential, so a fresh
    # dataloader yields them in the same order, epoch after epoch
    batches: list[dict[str, np.ndarray]] = []
    while len(batches) < hp.steps * accum:
        for b in trainer.get_train_dataloader():
            batches.append({k: v.numpy() for k, v in b.items() if k in ("input_ids", "attention_mask", "labels")})
            if len(batches) == hp.steps * accum:
                break
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    if len(logs) != hp.steps:
        raise RuntimeError(f"TRL logged {len(logs)} training losses, expected {hp.steps}")
    final = out / "final"
    trainer.save_model(str(final))
    return {"loss": [float(h["loss"]) for h in logs], "grad_norm": [float(h["grad_norm"]) for h in logs],
            "batches": batches, "final": final}


def our_examples(rows: list[tuple[str, str]], eos_id: int):
    from fem_jax.mstep import TrainExample

    return [TrainExample(word_ids(p), word_ids(c) + [eos_id]) for p, c in rows]


def step_batches(examples, accum: int, micro: int, steps: int, pad_id: int, t: int) -> list[dict[str, np.ndarray]]:
    """The fem_jax.mstep batch dicts, (accum, micro, t), of `steps` optimizer steps that walk
    the examples in order (wrapping around, epoch after epoch), right-padded to a fixed t (one
    compilation; the loss does not depend on padding)."""
    size = accum * micro
    out = []
    for s in range(steps):
        b = {"input_ids": np.full((size, t), pad_id, np.int32), "attention_mask": np.zeros((size, t), bool),
             "loss_mask": np.zeros((size, t), np.float32), "old_logps": np.zeros((size, t), np.float32),
             "rewards": np.ones((size,), np.float32), "group": np.arange(size, dtype=np.int32),
             "advantages": np.zeros((size,), np.float32)}
        for r in range(size):
            e = examples[(s * size + r) % len(examples)]
            seq = list(e.prompt_ids) + list(e.completion_ids)
            if len(seq) > t:
                raise ValueError(f"sequence of {len(seq)} tokens does not fit t={t}")
            p = len(e.prompt_ids)
            b["input_ids"][r, :len(seq)] = seq
            b["attention_mask"][r, :len(seq)] = True
            b["loss_mask"][r, p - 1:len(seq) - 1] = 1.0  # target of position j is token j + 1
        out.append({k: v.reshape((accum, micro) + v.shape[1:]) for k, v in b.items()})
    return out


def check_same_batches(ours: list[dict[str, np.ndarray]], trl_micro: list[dict[str, np.ndarray]]) -> None:
    """Raise unless TRL's collated micro-batches hold our tokens and our loss positions:
    TRL's label at j + 1 is kept exactly where our loss_mask at j is 1."""
    accum = ours[0]["input_ids"].shape[0]
    for s, b in enumerate(ours):
        for a in range(accum):
            tb = trl_micro[s * accum + a]
            t = tb["input_ids"].shape[1]
            am = b["attention_mask"][a]
            if am[:, t:].any():
                raise AssertionError(f"step {s} micro {a}: TRL's batch is shorter ({t}) than our sequences")
            if not np.array_equal(tb["attention_mask"].astype(bool), am[:, :t]):
                raise AssertionError(f"step {s} micro {a}: attention masks differ")
            ids = np.where(am[:, :t], b["input_ids"][a][:, :t], -1)
            if not np.array_equal(np.where(am[:, :t], tb["input_ids"], -1), ids):
                raise AssertionError(f"step {s} micro {a}: token ids differ\nTRL  {tb['input_ids']}\nours {ids}")
            kept = np.zeros_like(am[:, :t])
            kept[:, :-1] = tb["labels"][:, 1:] != -100
            if not np.array_equal(kept, b["loss_mask"][a][:, :t] > 0):
                raise AssertionError(f"step {s} micro {a}: loss positions differ\nTRL labels {tb['labels']}")


def run_ours(folder: Path, batches: list[dict[str, np.ndarray]], hp: Hyper, accum: int, micro: int) -> dict:
    import jax

    from fem_jax.config import MStepCfg
    from fem_jax.models import from_pretrained
    from fem_jax.mstep import Trainer

    model = from_pretrained(folder, dtype="float32")
    cfg = MStepCfg(objective="fem", loss_agg="token-mean", lr_start=hp.lr, lr_end=hp.lr, b1=hp.b1, b2=hp.b2,
                   weight_decay=hp.weight_decay, grad_clip=hp.grad_clip, batch_size=accum * micro,
                   micro_batch_size=micro)
    tr = Trainer(model.cfg, model.param_dict(), cfg)
    # Commit the state to its device as the step's outputs are: otherwise the second step
    # compiles again (jit keys on committedness). Placement only, no numerical effect.
    dev = jax.devices()[0]
    tr.params, tr.opt_state = jax.device_put((tr.params, tr.opt_state), dev)
    ms = [tr.step(b) for b in batches]
    return {"loss": [m["loss"] for m in ms], "grad_norm": [m["grad_norm"] for m in ms],
            "params": {k: np.asarray(jax.device_get(v)) for k, v in tr.params.items()}}


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-12)))


def param_diffs(ours: dict[str, np.ndarray], final: Path, folder: Path) -> dict:
    """max |Δ| between our final parameters and those saved in `final` (over all tensors, and
    the tensor where it is largest), with max |θ_final − θ_0| (from `folder`) for scale."""
    from fem_jax.models import from_pretrained

    theirs = {k: np.asarray(v) for k, v in from_pretrained(final, dtype="float32").param_dict().items()}
    init = {k: np.asarray(v) for k, v in from_pretrained(folder, dtype="float32").param_dict().items()}
    diff = {k: float(np.abs(ours[k] - theirs[k]).max()) for k in theirs}
    return {"param_max_abs": max(diff.values()), "param_worst": max(diff, key=diff.get),
            "param_moved": max(float(np.abs(theirs[k] - init[k]).max()) for k in theirs)}


def quiet_libraries() -> None:
    """No progress bars or info chatter from datasets and transformers: main() prints the tables."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def compare(folder: Path, rows: list[tuple[str, str]], accum: int, micro: int, hp: Hyper, out: Path) -> dict:
    """Both runs of one case; curves, the largest relative differences of loss and grad norm
    per step, and max |Δ| of the final parameters (over all tensors) with max |θ_final − θ_0|
    for scale."""
    ref = run_trl(folder, rows, accum, micro, hp, out)
    examples = our_examples(rows, SPECIAL["<eos>"])
    t = max(len(e.prompt_ids) + len(e.completion_ids) for e in examples)
    batches = step_batches(examples, accum, micro, hp.steps, SPECIAL["<pad>"], t)
    check_same_batches(batches, ref["batches"])
    ours = run_ours(folder, batches, hp, accum, micro)
    return {"trl_loss": ref["loss"], "our_loss": ours["loss"], "trl_grad_norm": ref["grad_norm"],
            "our_grad_norm": ours["grad_norm"], "loss_rel": _rel(ours["loss"], ref["loss"]),
            "grad_norm_rel": _rel(ours["grad_norm"], ref["grad_norm"]),
            **param_diffs(ours["params"], ref["final"], folder)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    d = Hyper()
    ap.add_argument("--steps", type=int, default=d.steps, help="optimizer steps per case")
    ap.add_argument("--lr", type=float, default=d.lr, help="constant learning rate (no warmup)")
    ap.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay")
    ap.add_argument("--grad-clip", type=float, default=d.grad_clip, help="max global gradient norm (0: off)")
    ap.add_argument("--rows", type=int, default=12, help="prompt/completion pairs (walked in order, repeated)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the model and the data")
    ap.add_argument("--json", help="also write the results to this file")
    a = ap.parse_args(argv)
    hp = Hyper(steps=a.steps, lr=a.lr, weight_decay=a.weight_decay, grad_clip=a.grad_clip, seed=a.seed)
    quiet_libraries()
    rows = make_rows(a.rows, a.seed)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_folder(Path(tmp) / "model", a.seed)
        for name, (accum, micro) in CASES.items():
            r = compare(folder, rows, accum, micro, hp, Path(tmp) / name.replace(" ", "_"))
            results[name] = r
            print(f"\n{name}: {accum} x {micro} sequences per step, lr {hp.lr}, grad_clip {hp.grad_clip}, "
                  f"weight_decay {hp.weight_decay}")
            print(f"{'step':>4} {'TRL loss':>12} {'fem_jax loss':>12} {'rel diff':>9}   "
                  f"{'TRL |g|':>10} {'fem_jax |g|':>11}")
            for s in range(hp.steps):
                lt, lo, gt, go = r["trl_loss"][s], r["our_loss"][s], r["trl_grad_norm"][s], r["our_grad_norm"][s]
                print(f"{s + 1:>4} {lt:>12.7f} {lo:>12.7f} {abs(lo - lt) / abs(lt):>9.2e}   {gt:>10.6f} {go:>11.6f}")
            print(f"max relative difference: loss {r['loss_rel']:.2e}, grad norm {r['grad_norm_rel']:.2e}; "
                  f"final parameters max |diff| {r['param_max_abs']:.2e} ({r['param_worst']}) "
                  f"against max |change| {r['param_moved']:.2e}")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
