"""TRL's GRPOTrainer as one arm of a comparison: the PyTorch baseline our users know, on the
same task, data, seeds and evaluation as fem_jax's own arms.

    compare: {objectives: [empg, grpo], trl: [grpo]}      # configs/empg_vs_grpo_trl.yaml

A run with `run.trainer: trl` is sampled and trained by trl.GRPOTrainer end to end (its
generation with transformers, its loss, its AdamW); fem_jax feeds it and scores it:
- prompts: step k's batch is fem_jax.step_loop.step_examples, the prompts our step loop draws
  for at that seed, laid out in one dataset in step order and read unshuffled; TRL renders
  the same chat messages with the tokenizer's template;
- rewards: the task's own parser and reward, which our E-step scores with;
- evaluation: every `eval.every` steps and the last, TRL's weights are saved as a Hugging
  Face folder (step_k/hf; the previous one is deleted), loaded by fem_jax's HF bridge
  (fem_jax.models.from_pretrained) into a JaxEngine and scored by fem_jax.evaluate, as our
  arms are. Step 0 is the base model, evaluated the same way;
- the run folder holds what our step loop writes (step_k/metrics.json, eval.jsonl,
  metrics.jsonl, summary.md, curves.png), so fem_jax.report and fem_jax.sweep read it as any
  run; step_k/draws.jsonl holds TRL's completions and rewards; trl/checkpoint-N holds TRL's
  own checkpoints (model, optimizer, RNG states) every `run.save_every` steps.
- resume: from the latest TRL checkpoint that we sealed after TRL finished writing it (one
  without our seal was cut short and is deleted). Steps after it are redone; TRL's sampling
  after a resume is not promised to repeat the uninterrupted run's draws (ours is).

The config, read as GRPOConfig (anything TRL cannot do is refused by fem_jax.config, naming the field):
    estep.samples_per_prompt -> num_generations       estep.temperature, top_p, top_k -> the same
    estep.max_new_tokens -> max_completion_length    estep.prompts_per_step x N = one generation batch
    mstep.micro_batch_size -> per_device_train_batch_size
    mstep.batch_size / micro_batch_size -> gradient_accumulation_steps
    mstep.epochs -> num_iterations                   mstep.lr_start (= lr_end) -> constant learning_rate
    mstep.b1, b2, weight_decay, grad_clip -> adam_beta1, adam_beta2, weight_decay, max_grad_norm
    mstep.beta -> beta (k3 KL, no bias correction)   mstep.clip_eps -> epsilon
    mstep.loss_agg + loss_norm -> loss_type: token-mean + step = dapo, token-mean + micro = bnpo,
                                  seq-mean-token-mean = grpo (benchmarks/trl_grpo.py checks each pair)
Differences TRL keeps: no dual clip (mstep.clip_ratio_c; it binds only off-policy, never with
one update per generation), advantage ε 1e-4 (ours 1e-6: the same for 0/1 rewards).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np

from .console import Console

SEAL = "fem_sealed"  # written into trl/checkpoint-N once TRL has finished saving it


class TrlRun:
    """One run trained by trl.GRPOTrainer, in a fem_jax run folder (the module docstring)."""

    prefix = noun = "step"

    def __init__(self, cfg, out: Path, console: Console | None = None):
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # loading and saving bars between our own lines

        from .models import from_pretrained, resolve
        from .rollout.jax_engine import JaxEngine
        from .run_folder import RunFolder
        from .tasks import get_task

        self.cfg, self.console = cfg, console or Console()
        self.folder = RunFolder(out, self.prefix, True)
        self.out = self.folder.path
        self.task = get_task(cfg.task.name, **{"seed": cfg.run.seed, **cfg.task.options})
        self.train = self.task.load("train")
        self.test = self.task.load("test")
        self.model_dir = resolve(cfg.model.path)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        model = from_pretrained(self.model_dir, dtype=cfg.model.dtype)
        self.model_cfg = model.cfg
        # our evaluator's engine, whatever rollout.backend says (TRL samples for training itself)
        self.engine = JaxEngine(model, self.tokenizer, max_batch=cfg.rollout.max_batch, chunk=cfg.rollout.chunk)
        m, e = cfg.mstep, cfg.estep
        self.updates = e.prompts_per_step * e.samples_per_prompt // m.batch_size * m.epochs  # per step
        self._draws: list[dict] = []
        self._logs: list[dict] = []
        self._t = time.time()

    # ------------------------------------------------------------------ the run

    def run(self) -> list[dict]:
        c = self.cfg
        k_max = c.run.iterations
        if self.folder.read_metrics(0) is None:
            self.console(f"step 0/{k_max}: evaluating the base model on {len(self.test)} test examples")
            self._finish(0, {"round": 0, "step": 0, **self._evaluate(0, None)})
        if all(self.folder.read_metrics(k) is not None for k in range(k_max + 1)):
            return self.folder.rows(k_max)
        resume = self._latest_sealed()
        trainer = self._trainer()
        if resume is not None:
            self.console(f"resuming {self.out} from TRL's {resume.name}")
        self._t = time.time()
        trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
        rows = self.folder.rows(k_max)
        missing = sorted(set(range(k_max + 1)) - {r["round"] for r in rows})
        if missing:
            raise RuntimeError(f"{self.out}: TRL finished without the metrics of steps {missing}")
        return rows

    def _trainer(self):
        import torch
        import trl
        from datasets import Dataset
        from transformers import PrinterCallback, TrainerCallback

        from .objectives import TRL_LOSS_TYPES
        from .step_loop import step_examples

        c, m, e = self.cfg, self.cfg.mstep, self.cfg.estep
        rows, self._examples = [], []
        for k in range(1, c.run.iterations + 1):
            for ex in step_examples(self.train, e.prompts_per_step, c.run.seed, k):
                rows.append({"prompt": self.task.messages(ex, hint=None), "row": len(self._examples)})
                self._examples.append(ex)
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[c.model.dtype]
        args = trl.GRPOConfig(
            output_dir=str(self.out / "trl"), report_to=[], disable_tqdm=True, seed=c.run.seed,
            use_cpu=not torch.cuda.is_available(), logging_steps=1,
            save_strategy="steps", save_steps=c.run.save_every * self.updates, save_total_limit=None,
            per_device_train_batch_size=m.micro_batch_size, gradient_accumulation_steps=m.batch_size // m.micro_batch_size,
            steps_per_generation=e.prompts_per_step * e.samples_per_prompt // m.micro_batch_size,
            num_generations=e.samples_per_prompt, num_iterations=m.epochs, max_steps=c.run.iterations * self.updates,
            learning_rate=m.lr_start, lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch",
            adam_beta1=m.b1, adam_beta2=m.b2, weight_decay=m.weight_decay, max_grad_norm=m.grad_clip,
            bf16=c.model.dtype == "bfloat16", fp16=False, beta=m.beta, epsilon=m.clip_eps,
            loss_type=TRL_LOSS_TYPES[(m.loss_agg, m.loss_norm)], scale_rewards="group",
            temperature=e.temperature, top_p=e.top_p, top_k=e.top_k, max_completion_length=e.max_new_tokens,
            mask_truncated_completions=False, shuffle_dataset=False, dataloader_num_workers=0,
            log_completions=False, model_init_kwargs={"dtype": dtype}, use_bias_correction_kl=False)

        run = self

        class Rounds(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "loss" in logs:
                    run._optimizer_step(state.global_step, logs)

            def on_save(self, args, state, control, **kwargs):
                run._seal(state.global_step)

        trainer = trl.GRPOTrainer(model=str(self.model_dir), reward_funcs=self._reward, args=args,
                                  train_dataset=Dataset.from_list(rows), processing_class=self.tokenizer,
                                  callbacks=[Rounds()])
        trainer.remove_callback(PrinterCallback)
        self.trainer = trainer
        return trainer

    def _reward(self, prompts, completions, completion_ids, row, **kwargs) -> list[float]:
        """The task's reward of each completion, recorded for the step's draws.jsonl."""
        out = []
        for comp, ids, r in zip(completions, completion_ids, row):
            text = comp[-1]["content"] if isinstance(comp, list) else comp
            ex = self._examples[r]
            answer = self.task.parse(text)
            reward = float(self.task.reward(answer, ex.gold)) if answer is not None else 0.0
            out.append(reward)
            self._draws.append({"example_id": ex.id, "completion": text, "reward": reward, "tokens": len(ids)})
        return out

    # ------------------------------------------------------------------ per step

    def _optimizer_step(self, global_step: int, logs: dict) -> None:
        self._logs.append(dict(logs))
        if global_step % self.updates:
            return
        k, c = global_step // self.updates, self.cfg
        draws, self._draws = self._draws, []
        logs, self._logs = self._logs, []
        self.folder.write_jsonl(self.folder.round_dir(k) / "draws.jsonl", draws)
        norms = [float(x["grad_norm"]) for x in logs if x.get("grad_norm") is not None]
        row = {"round": k, "step": k, "draws": len(draws),
               "reward_mean": float(np.mean([d["reward"] for d in draws])) if draws else None,
               "response_length": float(np.mean([d["tokens"] for d in draws])) if draws else None,
               "tokens_estep": sum(d["tokens"] for d in draws),
               "train_loss": float(np.mean([x["loss"] for x in logs])), "train_losses": [x["loss"] for x in logs],
               "grad_norm": float(np.mean(norms)) if norms else None, "grad_norm_max": max(norms) if norms else None,
               "grad_clipped_fraction": (float(np.mean(np.asarray(norms) > c.mstep.grad_clip))
                                         if norms and c.mstep.grad_clip > 0 else 0.0),
               "clip_ratio": float(np.mean([x.get("clip_ratio/region_mean", 0.0) for x in logs])),
               "lr": c.mstep.lr_start, "optimizer_steps": len(logs)}
        if k % c.eval.every == 0 or k == c.run.iterations:
            self.console(f"step {k}/{c.run.iterations}: evaluating on {len(self.test)} test examples")
            row.update(self._evaluate(k, self.trainer))
        row["seconds_round"] = time.time() - self._t
        self._finish(k, row)
        self._t = time.time()

    def _evaluate(self, k: int, trainer) -> dict:
        """θ(k) as a Hugging Face folder (TRL's save), read by our HF bridge into the engine,
        scored by fem_jax.evaluate; the base model (k = 0) straight from its folder."""
        from .evaluate import evaluate
        from .io import atomic_folder
        from .models import from_pretrained
        from .rollout.engine import Weights

        t = time.time()
        hf = self.model_dir
        if trainer is not None:
            hf = self.folder.round_dir(k) / "hf"
            with atomic_folder(hf) as tmp:
                trainer.save_model(str(tmp))
            for old in self.out.glob("step_*/hf"):
                if old != hf:
                    shutil.rmtree(old, ignore_errors=True)
        params = from_pretrained(hf, dtype=self.cfg.model.dtype).param_dict()
        self.engine.sync(Weights(round=k, params=params, checkpoints=None, saved=False, export_dir=Path(hf),
                                 model_config=self.model_cfg.to_hf_config(self.cfg.model.dtype),
                                 tokenizer_from=self.model_dir))
        seconds_load = time.time() - t
        bar = self.console.bar(len(self.test), f"step {k}/{self.cfg.run.iterations} eval")
        metrics, records = evaluate(self.engine, self.task, self.test, self.cfg.eval, seed=0, progress=bar)
        bar.close()
        self.engine.release()
        self.folder.write_jsonl(self.folder.round_dir(k) / "eval.jsonl", records)
        return {**metrics, "sync_method": "folder", "seconds_load": seconds_load}

    def _finish(self, k: int, row: dict) -> None:
        from .experiment import _line

        self.folder.write_text(self.folder.metrics_file(k), json.dumps(row) + "\n")
        self.console(_line(row, f"step {k}/{self.cfg.run.iterations}", self.cfg))
        c = self.cfg
        self.folder.write_reports(self.folder.rows(c.run.iterations),
                                  f"{c.mstep.objective} (TRL) · seed {c.run.seed} · {c.model.path} · {c.task.name}")

    # ------------------------------------------------------------------ TRL's checkpoints

    def _checkpoints(self) -> list[tuple[int, Path]]:
        root = self.out / "trl"
        found = [(int(p.name.split("-")[1]), p) for p in root.glob("checkpoint-*")
                 if p.is_dir() and p.name.split("-")[1].isdigit()] if root.exists() else []
        return sorted(found)

    def _seal(self, global_step: int) -> None:
        """TRL finished writing checkpoint-<global_step>: seal it, keep the newest
        `run.keep_checkpoints` sealed ones."""
        from .io import atomic_write_text

        path = self.out / "trl" / f"checkpoint-{global_step}"
        if path.is_dir():
            atomic_write_text(path / SEAL, f"{global_step}\n")
        sealed = [p for _, p in self._checkpoints() if (p / SEAL).exists()]
        for p in sealed[:-self.cfg.run.keep_checkpoints]:
            shutil.rmtree(p, ignore_errors=True)

    def _latest_sealed(self) -> Path | None:
        latest = None
        for step, p in self._checkpoints():
            if (p / SEAL).exists():
                latest = p
            else:
                self.console(f"warning: TRL's {p.name} was not sealed (killed while saving): deleted, its steps are redone")
                shutil.rmtree(p, ignore_errors=True)
        return latest
