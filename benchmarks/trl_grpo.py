"""Our grpo objective against TRL's GRPOTrainer, optimizer step by optimizer step.

    python benchmarks/trl_grpo.py [--steps 4] [--lr 1e-3] [--beta 0.04] [--json F]

GRPO is the EMPG paper's baseline and the objective most of our users run elsewhere. This
script holds fem_jax's `grpo` to an independent implementation: one tiny random float32
Llama (benchmarks/trl_sft.py's, saved once as a Hugging Face folder and loaded by both
sides) trained on the **same completions and rewards** by trl.GRPOTrainer (PyTorch) and by
fem_jax.mstep.Trainer (JAX). TRL's generation is replaced by its own `rollout_func` hook,
which hands out our fixed completions, and its reward function looks the rewards up: no
sampling difference. One generation batch of 4 prompts x 4 completions is trained on for
`--steps` optimizer steps (TRL's num_iterations; ours: θ_old's log-probs filled once, then
one step per iteration), each step 2 micro-batches of 8 (gradient accumulation), with the
k3 KL to the initial model (β) and a learning rate high enough that the ratio to θ_old
leaves [1 - ε, 1 + ε] after the first step, so that clipping is exercised. It prints both
loss and gradient-norm curves, TRL's share of clipped tokens per step, and the largest
difference of the final parameters.

Loss aggregations, TRL's `loss_type` against ours (`mstep.loss_agg` + `mstep.loss_norm`):

    TRL grpo    each sequence's token mean, averaged over sequences   seq-mean-token-mean (micro or step)
    TRL bnpo    each micro-batch's token mean, / micro-batches        token-mean + loss_norm=micro (verl 04-2025)
    TRL dapo    the token sum over the whole update / its tokens      token-mean + loss_norm=step
    TRL dr_grpo token sum / (sequences x max_completion_length)       no counterpart (a fixed denominator)
    TRL cispo, sapo, vespo, luspo                                     no counterpart (other objectives)
    ours seq-mean-token-sum (EMPG's trajectory log-likelihood)        no TRL counterpart

Where TRL and verl (which our paper configs follow) differ, and what is set here so that
the two sides compute the same thing:
- advantage: (r - group mean) / (group std + ε), std with Bessel's correction on both; TRL's
  ε is 1e-4, verl's (and our default's) 1e-6: the advantages here use TRL's 1e-4;
- dual clip: verl (and our grpo) bounds the loss of a negative advantage at -A·c (c = 3),
  TRL has no such bound: our clip_ratio_c is set to 1e9 (off) here;
- KL: both use the k3 estimate exp(ref - logp) - (ref - logp) - 1 per token, added to the
  per-token loss before aggregation; verl clamps it to [-10, 10] (and the log ratio to
  [-20, 20]), TRL does not: the clamps do not bind at these values;
- TRL shuffles a generation batch before splitting it into micro-batches; the script
  records the micro-batches TRL trained on and builds ours from them, row for row (this
  matters only for `bnpo` / loss_norm=micro, where a micro-batch's own token count divides).

Settings that make the two sides comparable, as in trl_sft.py: float32 on both, no
gradient checkpointing, constant learning rate without warmup, dropout 0, AdamW with the
same betas and eps, max_grad_norm = grad_clip, weight decay 0, the same temperature (--temperature, default 1).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

_spec = importlib.util.spec_from_file_location("trl_sft_bench", Path(__file__).with_name("trl_sft.py"))
sft = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = sft  # dataclasses look their module up there
_spec.loader.exec_module(sft)

SPECIAL, VOCAB = sft.SPECIAL, sft.VOCAB
PROMPTS, GENERATIONS, ACCUM, MICRO = 4, 4, 2, 8  # one generation batch = ACCUM x MICRO = PROMPTS x GENERATIONS
PROMPT_LEN = 5  # every prompt as long: no left padding, whose positions the two sides would number apart
TRL_EPS = 1e-4  # TRL's advantage epsilon
# case: (TRL loss_type, our loss_agg, our loss_norm)
CASES = {"grpo": ("grpo", "seq-mean-token-mean", "micro"), "bnpo": ("bnpo", "token-mean", "micro"),
         "dapo": ("dapo", "token-mean", "step")}


@dataclasses.dataclass(frozen=True)
class Hyper:
    steps: int = 4
    lr: float = 1e-3
    beta: float = 0.04
    clip_eps: float = 0.2
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    grad_clip: float = 1.0
    seed: int = 0
    temperature: float = 1.0  # divides the logits of both sides' log-probs (the sampling temperature)


@dataclasses.dataclass
class Data:
    prompts: list[list[int]]  # word ids, PROMPT_LEN each
    completions: list[list[list[int]]]  # [prompt][generation] word ids, some ending with <eos>
    rewards: list[list[float]]

    @property
    def max_completion(self) -> int:
        return max(len(c) for cs in self.completions for c in cs)

    def reward_of(self) -> dict[tuple[int, ...], float]:
        return {tuple(c): r for cs, rs in zip(self.completions, self.rewards) for c, r in zip(cs, rs)}


def make_data(seed: int = 0) -> Data:
    """4 prompts x 4 distinct completions of 1-10 words (half end with <eos>), 0/1 rewards;
    the first prompt's draws all score 1, a group without contrast (advantage 0)."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(len(SPECIAL), VOCAB, PROMPT_LEN).tolist() for _ in range(PROMPTS)]
    seen, completions, rewards = set(), [], []
    for g in range(PROMPTS):
        cs = []
        while len(cs) < GENERATIONS:
            c = rng.integers(len(SPECIAL), VOCAB, int(rng.integers(1, 11))).tolist()
            if rng.random() < 0.5:
                c.append(SPECIAL["<eos>"])
            if tuple(c) not in seen:
                seen.add(tuple(c))
                cs.append(c)
        completions.append(cs)
        rs = [1.0] * GENERATIONS if g == 0 else rng.integers(0, 2, GENERATIONS).astype(float).tolist()
        if g > 0 and len(set(rs)) == 1:
            rs[0] = 1.0 - rs[0]
        rewards.append(rs)
    return Data(prompts, completions, rewards)


def _text(ids: list[int]) -> str:
    return " ".join(f"w{i}" for i in ids)


def run_trl(folder: Path, data: Data, loss_type: str, hp: Hyper, out: Path) -> dict:
    """Train with trl.GRPOTrainer on the fixed completions; returns the logged loss, grad norm
    and clipped share per step, the micro-batches it trained on (numpy) and its final weights."""
    import torch
    import trl
    from datasets import Dataset
    from transformers import PrinterCallback

    torch.set_num_threads(1)  # see trl_sft.run_trl
    torch.manual_seed(hp.seed)
    by_text = {_text(p): g for g, p in enumerate(data.prompts)}
    reward_of = data.reward_of()

    def rollout(prompts, trainer):
        """TRL's rollout hook: the k-th request for prompt g gets our k-th completion of g."""
        taken = [0] * PROMPTS
        prompt_ids, completion_ids = [], []
        for p in prompts:
            g = by_text[p]
            prompt_ids.append(list(data.prompts[g]))
            completion_ids.append(list(data.completions[g][taken[g] % GENERATIONS]))
            taken[g] += 1
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids,
                "logprobs": [[0.0] * len(c) for c in completion_ids]}

    def reward(completions, completion_ids, **kwargs):
        return [reward_of[tuple(int(t) for t in ids)] for ids in completion_ids]

    fields = {f.name for f in dataclasses.fields(trl.GRPOConfig)}
    ckpt = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    args = trl.GRPOConfig(
        output_dir=str(out), report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, seed=hp.seed,
        per_device_train_batch_size=MICRO, gradient_accumulation_steps=ACCUM, steps_per_generation=ACCUM,
        num_generations=GENERATIONS, num_iterations=hp.steps, max_steps=hp.steps, learning_rate=hp.lr,
        lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch", adam_beta1=hp.b1, adam_beta2=hp.b2,
        adam_epsilon=hp.eps, weight_decay=0.0, max_grad_norm=hp.grad_clip, logging_steps=1, bf16=False,
        fp16=False, **{ckpt: False}, beta=hp.beta, epsilon=hp.clip_eps, loss_type=loss_type,
        scale_rewards="group", temperature=hp.temperature, max_completion_length=data.max_completion,
        mask_truncated_completions=False, shuffle_dataset=False, dataloader_num_workers=0, log_completions=False,
        model_init_kwargs={"dtype": torch.float32},
        # TRL >= 1.x multiplies the KL by the ratio by default (DeepSeek-V3.2's unbiased estimator);
        # GRPO as DeepSeekMath and verl define it, and ours, does not
        **({"use_bias_correction_kl": False} if "use_bias_correction_kl" in fields else {}),
    )
    ds = Dataset.from_list([{"prompt": _text(p)} for p in data.prompts])
    trainer = trl.GRPOTrainer(model=str(folder), reward_funcs=reward, args=args, train_dataset=ds,
                              rollout_func=rollout)
    trainer.remove_callback(PrinterCallback)
    seen: list[dict[str, np.ndarray]] = []
    compute = trainer._compute_loss

    def recording(model, inputs):
        if len(seen) < ACCUM:  # the first step's micro-batches: every step trains on the same ones
            seen.append({k: inputs[k].detach().cpu().numpy() for k in
                         ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "advantages")})
        return compute(model, inputs)

    trainer._compute_loss = recording
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    if len(logs) != hp.steps:
        raise RuntimeError(f"TRL logged {len(logs)} training losses, expected {hp.steps}")
    final = out / "final"
    trainer.save_model(str(final))
    clip = [float(h.get("clip_ratio/region_mean", float("nan"))) for h in logs]
    return {"loss": [float(h["loss"]) for h in logs], "grad_norm": [float(h["grad_norm"]) for h in logs],
            "clipped": clip, "micro_batches": seen, "final": final}


def our_batch(data: Data, micro_batches: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The fem_jax.mstep batch (ACCUM, MICRO, t) holding TRL's micro-batches row for row, with
    our own group-normalized advantages (checked against TRL's)."""
    from fem_jax.objectives import ObjectiveConfig, grpo_advantages

    group_of = {tuple(c): g for g, cs in enumerate(data.completions) for c in cs}
    reward_of = data.reward_of()
    t = PROMPT_LEN + data.max_completion
    b = {"input_ids": np.zeros((ACCUM, MICRO, t), np.int32), "attention_mask": np.zeros((ACCUM, MICRO, t), bool),
         "loss_mask": np.zeros((ACCUM, MICRO, t), np.float32), "rewards": np.zeros((ACCUM, MICRO), np.float32),
         "advantages": np.zeros((ACCUM, MICRO), np.float32), "old_logps": np.zeros((ACCUM, MICRO, t), np.float32)}
    rows = []
    for a, mb in enumerate(micro_batches):
        if not mb["prompt_mask"].all():
            raise AssertionError("TRL left-padded a prompt: the prompts must be equally long")
        for r in range(MICRO):
            comp = [int(x) for x, m in zip(mb["completion_ids"][r], mb["completion_mask"][r]) if m]
            seq = [int(x) for x in mb["prompt_ids"][r]] + comp
            b["input_ids"][a, r, :len(seq)] = seq
            b["attention_mask"][a, r, :len(seq)] = True
            b["loss_mask"][a, r, PROMPT_LEN - 1:len(seq) - 1] = 1.0  # target of position j is token j + 1
            b["rewards"][a, r] = reward_of[tuple(comp)]
            rows.append((a, r, group_of[tuple(comp)]))
    rewards = np.array([b["rewards"][a, r] for a, r, _ in rows], np.float32)
    adv = grpo_advantages(rewards, np.array([g for *_, g in rows]), ObjectiveConfig(name="grpo", eps=TRL_EPS))
    for (a, r, _), x in zip(rows, adv):
        b["advantages"][a, r] = x
    trl_adv = np.stack([mb["advantages"] for mb in micro_batches])
    if not np.allclose(b["advantages"], trl_adv, rtol=1e-5, atol=1e-6):
        raise AssertionError(f"advantages differ:\nTRL  {trl_adv}\nours {b['advantages']}")
    return b


def run_ours(folder: Path, batch: dict[str, np.ndarray], loss_agg: str, loss_norm: str, hp: Hyper) -> dict:
    import jax

    from fem_jax.config import MStepCfg
    from fem_jax.models import from_pretrained
    from fem_jax.mstep import Trainer

    model = from_pretrained(folder, dtype="float32")
    params = model.param_dict()
    cfg = MStepCfg(objective="grpo", loss_agg=loss_agg, loss_norm=loss_norm, beta=hp.beta, clip_eps=hp.clip_eps,
                   clip_ratio_c=1e9, lr_start=hp.lr, lr_end=hp.lr, b1=hp.b1, b2=hp.b2, weight_decay=0.0,
                   grad_clip=hp.grad_clip, batch_size=ACCUM * MICRO, micro_batch_size=MICRO, reset_optimizer=False)
    ref = jax.tree.map(lambda x: x.copy(), params) if hp.beta > 0 else None
    tr = Trainer(model.cfg, params, cfg, ref_params=ref, temperature=hp.temperature)
    dev = jax.devices()[0]  # committed like the step's outputs: one compilation (see trl_sft.run_ours)
    tr.params, tr.opt_state = jax.device_put((tr.params, tr.opt_state), dev)
    batch = {k: v.copy() for k, v in batch.items()}
    tr.fill_old_logps([batch])  # θ_old = the weights the completions were "sampled" from
    ms = [tr.step(batch) for _ in range(hp.steps)]
    return {"loss": [m["loss"] for m in ms], "grad_norm": [m["grad_norm"] for m in ms],
            "params": {k: np.asarray(jax.device_get(v)) for k, v in tr.params.items()}}


def compare(folder: Path, data: Data, case: str, hp: Hyper, out: Path, also: tuple[str, str] | None = None) -> dict:
    """Both runs of one case: curves, the largest relative differences of loss and gradient
    norm per step, max |Δ| of the final parameters with max |θ_final − θ_0| for scale.
    `also` = (loss_agg, loss_norm): one more run of ours on the same data with other
    settings, whose largest loss difference to TRL is `also_loss_abs` (a pair that should not
    match, to show the comparison can fail)."""
    loss_type, loss_agg, loss_norm = CASES[case]
    ref = run_trl(folder, data, loss_type, hp, out)
    batch = our_batch(data, ref["micro_batches"])
    ours = run_ours(folder, batch, loss_agg, loss_norm, hp)
    extra = {}
    if also:
        other = run_ours(folder, batch, *also, hp)
        extra["also_loss_abs"] = float(np.max(np.abs(np.subtract(other["loss"], ref["loss"]))))
    return {"trl_loss": ref["loss"], "our_loss": ours["loss"], "trl_grad_norm": ref["grad_norm"],
            "our_grad_norm": ours["grad_norm"], "trl_clipped": ref["clipped"],
            "loss_abs": float(np.max(np.abs(np.subtract(ours["loss"], ref["loss"])))),
            "grad_norm_rel": sft._rel(ours["grad_norm"], ref["grad_norm"]),
            **sft.param_diffs(ours["params"], ref["final"], folder), **extra}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    d = Hyper()
    ap.add_argument("--steps", type=int, default=d.steps, help="optimizer steps on the one generation batch")
    ap.add_argument("--lr", type=float, default=d.lr, help="constant learning rate (no warmup)")
    ap.add_argument("--beta", type=float, default=d.beta, help="k3 KL coefficient (0: no reference model)")
    ap.add_argument("--grad-clip", type=float, default=d.grad_clip, help="max global gradient norm (0: off)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the model and the data")
    ap.add_argument("--temperature", type=float, default=d.temperature,
                    help="the sampling temperature both sides divide the logits by (our embedded runs: 0.7)")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    ap.add_argument("--json", help="also write the results to this file")
    a = ap.parse_args(argv)
    hp = Hyper(steps=a.steps, lr=a.lr, beta=a.beta, grad_clip=a.grad_clip, seed=a.seed, temperature=a.temperature)
    sft.quiet_libraries()
    data = make_data(a.seed)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = sft.build_folder(Path(tmp) / "model", a.seed)
        for case in a.cases.split(","):
            r = results[case] = compare(folder, data, case, hp, Path(tmp) / case)
            loss_type, agg, norm = CASES[case]
            print(f"\nTRL loss_type={loss_type} vs ours loss_agg={agg}, loss_norm={norm}: {ACCUM} x {MICRO} "
                  f"sequences per step, lr {hp.lr}, beta {hp.beta}, clip eps {hp.clip_eps}, grad_clip {hp.grad_clip}, "
                  f"temperature {hp.temperature}")
            print(f"{'step':>4} {'TRL loss':>12} {'fem_jax loss':>12} {'|diff|':>9}   {'TRL |g|':>10} "
                  f"{'fem_jax |g|':>11}   {'TRL clipped':>11}")
            for s in range(hp.steps):
                lt, lo, gt, go = r["trl_loss"][s], r["our_loss"][s], r["trl_grad_norm"][s], r["our_grad_norm"][s]
                print(f"{s + 1:>4} {lt:>12.7f} {lo:>12.7f} {abs(lo - lt):>9.2e}   {gt:>10.6f} {go:>11.6f}   "
                      f"{r['trl_clipped'][s]:>11.3f}")
            print(f"max |loss diff| {r['loss_abs']:.2e}, grad norm relative {r['grad_norm_rel']:.2e}; final "
                  f"parameters max |diff| {r['param_max_abs']:.2e} ({r['param_worst']}), moved up to "
                  f"{r['param_moved']:.2e}")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
