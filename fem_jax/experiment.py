"""What every run shares, whatever its rounds are: `Experiment` builds the model, task,
engine and trainer once, and runs a round's E-step, M-step, checkpoint, sync and evaluation,
and the resume (fem_jax.loop's docstring tells the whole story; fem_jax.fem_loop and
fem_jax.step_loop say what a round is)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from . import config as config_lib
from .config import Config
from .console import Console
from .estep import Draw, IncompleteRollouts, draw_metrics, read_draws, run_estep, write_draws
from .evaluate import evaluate
from .io import atomic_write_text
from .run_folder import RunFolder



# metrics whose values depend on the machine's speed, not on the run's numbers
TIMING_KEYS = ("seconds_estep", "seconds_mstep", "seconds_eval", "seconds_sync", "seconds_export", "seconds_load",
               "seconds_round", "tokens_per_second_mstep")


def _process_info() -> tuple[int, int]:
    import jax

    return jax.process_index(), jax.process_count()


def release_memory() -> None:
    """Hand memory freed by the last phase back to the OS: glibc keeps freed blocks in its
    arenas, so a phase's peak would otherwise stay resident through the next (Linux). With
    the persistent compilation cache on (the CLI), compiled programs are dropped too: the
    next phase reloads its own from disk in a fraction of a second, and the E-step's and
    M-step's programs (about 0.4 GB for the default) never sit in memory together."""
    import gc

    import jax

    if jax.config.jax_compilation_cache_dir:
        jax.clear_caches()
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _barrier(name: str) -> None:
    """All processes meet here (several hosts): a decision read from the run folder before
    it is taken the same everywhere, because process 0 writes only after the barrier. The
    name carries what each process read: processes that read different states (a run
    folder that is not one shared folder for all hosts) fail here at once, naming it."""
    if _process_info()[1] > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"fem_jax:{name}")


class Experiment:
    """Everything one run needs, built once: model, tokenizer, task data, engine, trainer.
    Building writes nothing: a failed start leaves the run folder as it was. A subclass says
    what a round is: its prompts (`round_examples`), its name and its folder prefix."""

    prefix = "round"  # the round folders' prefix: <prefix>_<k>
    noun = "round"  # what the console and metrics call a round


    def __init__(self, cfg: Config, out: Path, console: Console | None = None):
        import jax
        from transformers import AutoTokenizer

        from .models import from_pretrained, resolve
        from .mstep import Trainer
        from .rollout import make_engine
        from .sharding import make_mesh
        from .tasks import get_task

        self.cfg, self.console = cfg, console or Console()
        self.spec = cfg.objective
        rank, _ = _process_info()
        self.folder = RunFolder(out, self.prefix, rank == 0)
        self.out = self.folder.path
        self.mesh = make_mesh(cfg.run.mesh) if cfg.run.mesh else None
        self.task = get_task(cfg.task.name, **{"seed": cfg.run.seed, **cfg.task.options})
        self.train = self.task.load("train")
        self.test = self.task.load("test")
        self.model_dir = resolve(cfg.model.path)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        model = from_pretrained(self.model_dir, dtype=cfg.model.dtype, mesh=self.mesh)
        self.model_cfg = model.cfg
        params = model.param_dict()
        keep_base = cfg.mstep.beta > 0 or cfg.mstep.restart_from_base
        self.base_params = jax.tree.map(lambda x: x.copy(), params) if keep_base else None
        self.engine = make_engine(cfg.rollout.backend, model=model, tokenizer=self.tokenizer,
                                  model_dir=self.model_dir, rollout_cfg=cfg.rollout,
                                  dtype=cfg.mstep.compute_dtype or cfg.model.dtype, seed=cfg.run.seed)
        self.trainer = Trainer(self.model_cfg, params, cfg.mstep, self.mesh, cfg.model.remat,
                               self.base_params if cfg.mstep.beta > 0 else None, temperature=cfg.estep.temperature)
        del model, params
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self._prompt_ids: dict[str, list[int]] = {}
        self._warned_truncation = False
        self.trackers = None

    # ------------------------------------------------------------------ phases

    def round_examples(self, k: int) -> list:
        """The training examples whose prompts round k's E-step draws for."""
        raise NotImplementedError

    def title(self) -> str:
        """What the run's summary is titled after (besides seed, model and task)."""
        raise NotImplementedError

    def estep(self, k: int) -> list[Draw]:
        path = self.folder.round_dir(k) / "rollouts.jsonl"
        exists = path.exists()
        _barrier(f"estep-{k}-{exists}")  # process 0 writes the file only after every process looked
        if exists:
            try:
                draws = read_draws(path)
                self.console(f"{self._name(k)}: reusing the E-step's {len(draws)} draws from {path}")
                return draws
            except (IncompleteRollouts, ValueError) as e:
                self.console(f"warning: {e}; drawing round {k}'s E-step again")
        e = self.cfg.estep
        examples = self.round_examples(k)
        bar = self.console.bar(len(examples) * e.samples_per_prompt, f"{self._name(k)} E-step")
        draws = run_estep(self.task, self.engine, examples, scheme=e.scheme, budget=e.budget,
                          samples_per_prompt=e.samples_per_prompt, temperature=e.temperature, top_p=e.top_p,
                          top_k=e.top_k, max_new_tokens=e.max_new_tokens, seed=self.cfg.run.seed * 100 + k,
                          trains=self.spec.trains, reject_hint_leaks=e.reject_hint_leaks, progress=bar)
        bar.close()
        if self.folder.is_main:
            write_draws(path, draws, k, atomic_write_text)
        return draws

    def _prompt(self, example_id: str) -> list[int]:
        from .rollout.engine import encode_prompt

        if example_id not in self._prompt_ids:  # the hint-free prompt: the hint never reaches training
            ex = self._examples_by_id[example_id]
            self._prompt_ids[example_id] = encode_prompt(self.tokenizer, self.task.messages(ex, hint=None))
        return self._prompt_ids[example_id]

    @property
    def _examples_by_id(self) -> dict:
        if not hasattr(self, "_by_id"):
            self._by_id = {ex.id: ex for ex in self.train}
        return self._by_id

    def training_examples(self, draws: list[Draw]):
        """The M-step's examples: each trained draw's completion after its hint-free prompt."""
        from .mstep import TrainExample, set_advantages

        trained = [d for d in draws if d.trained]
        examples = [TrainExample(self._prompt(d.example_id), list(d.token_ids), d.reward) for d in trained]
        set_advantages(self.cfg.mstep, examples, [d.batch for d in trained])  # GRPO: groups are draw batches
        return examples

    def mstep(self, k: int, draws: list[Draw]) -> dict:
        from .mstep import BatchStats, lr_for_iteration, make_batches

        c = self.cfg
        examples = self.training_examples(draws)
        if c.mstep.restart_from_base:
            self.trainer.set_params(self.base_params)
        if c.mstep.reset_optimizer or c.mstep.restart_from_base or self.trainer.opt_state is None:
            self.trainer.reset_optimizer()
        lr = lr_for_iteration(c.mstep, k, c.run.iterations)
        self.trainer.set_lr(lr)
        t = time.time()
        bstats = BatchStats()
        batches = [b for epoch in range(c.mstep.epochs)
                   for b in make_batches(examples, c.mstep, self.pad_id, seed=c.run.seed * 1000 + k * 10 + epoch,
                                         stats=bstats)]
        if bstats.truncated or bstats.dropped:
            msg = (f"warning: {self._name(k)}: {bstats.truncated} of {len(examples) * c.mstep.epochs} training "
                   f"sequences exceed mstep.max_seq_len={c.mstep.max_seq_len} and were cut"
                   + (f", {bstats.dropped} dropped (the prompt alone is that long)" if bstats.dropped else ""))
            if not self._warned_truncation:
                self.console(msg + " (counted in metrics: sequences_truncated, sequences_dropped)")
                self._warned_truncation = True
        if not batches:
            self.console(f"warning: {self._name(k)}: nothing to train on ({len(draws)} draws, none trained on); "
                         "the M-step is skipped")
        if self.spec.old_logps and len(batches) == 1:
            # one update: θ_old is the θ it differentiates at, so the loss reads its own log-probs
            # (detached; ratio 1) and no forward pass is spent on them (TRL's num_iterations=1)
            del batches[0]["old_logps"]
        elif self.spec.old_logps:
            self.trainer.fill_old_logps(batches)
        bar = self.console.bar(len(batches), f"{self._name(k)} M-step")
        log_step = self._log_optimizer_step(k)

        def progress(m):
            bar(1)
            log_step(m)

        s = self.trainer.train(batches, progress=progress)
        bar.close()
        seconds = time.time() - t
        return {"train_loss": s["train_loss"], "train_losses": s["train_losses"],
                "grad_norm": float(np.mean(s["grad_norms"])) if s["grad_norms"] else None,  # before clipping
                "grad_norm_max": float(np.max(s["grad_norms"])) if s["grad_norms"] else None,
                "grad_clipped_fraction": (float(np.mean(np.asarray(s["grad_norms"]) > c.mstep.grad_clip))
                                          if s["grad_norms"] and c.mstep.grad_clip > 0 else 0.0),
                "lr": lr, "optimizer_steps": s["optimizer_steps"], "tokens_mstep": s["tokens_mstep"],
                "sequences_trained": bstats.sequences, "sequences_truncated": bstats.truncated,
                "sequences_dropped": bstats.dropped, "seconds_mstep": seconds,
                "tokens_per_second_mstep": s["tokens_mstep"] / seconds if seconds > 0 else None}

    def _log_optimizer_step(self, k: int):
        """Per optimizer step scalars for the trackers, at the global optimizer step."""
        start = self._global_step(k - 1)
        state = {"n": 0, "t": time.time()}

        def log(m):
            state["n"] += 1
            now = time.time()
            if self.trackers is not None:
                self.trackers.log({"mstep/loss": m["loss"], "mstep/grad_norm": m["grad_norm"],
                                   "mstep/learning_rate": float(self.trainer_lr),
                                   "mstep/tokens_per_second": m["tokens"] / max(now - state["t"], 1e-9),
                                   "em/round": k}, step=start + state["n"])
            state["t"] = now

        return log

    @property
    def trainer_lr(self) -> float:
        from .mstep import lr_for_iteration

        return lr_for_iteration(self.cfg.mstep, self._current, self.cfg.run.iterations)

    def _global_step(self, k: int) -> int:
        """Optimizer steps taken by the end of round k (from the rounds' metrics)."""
        total = 0
        for j in range(1, k + 1):
            row = self.folder.read_metrics(j)
            total += (row or {}).get("optimizer_steps", 0) or 0
        return total

    def evaluate(self, k: int) -> dict:
        bar = self.console.bar(len(self.test) * (1 + self.cfg.eval.n_samples), f"{self._name(k)} eval")
        metrics, records = evaluate(self.engine, self.task, self.test, self.cfg.eval, seed=0, progress=bar)
        bar.close()
        self.folder.write_jsonl(self.folder.round_dir(k) / "eval.jsonl", records)
        self._eval_records = records
        return metrics

    def weights(self, k: int, saved: bool):
        from .rollout.engine import Weights

        return Weights(round=k, params=self.trainer.params, checkpoints=self.out / "checkpoints", saved=saved,
                       export_dir=self.folder.round_dir(k) / "hf", model_config=self.model_cfg.to_hf_config(
                           self.cfg.model.dtype), tokenizer_from=self.model_dir)

    def _name(self, k: int) -> str:
        return f"{self.noun} {k}/{self.cfg.run.iterations}"

    # ------------------------------------------------------------------ the loop

    def run(self) -> list[dict]:
        from .checkpoint import Checkpointer

        c, out = self.cfg, self.out
        ckpt = Checkpointer(out / "checkpoints", max_to_keep=c.run.keep_checkpoints)
        for step in ckpt.drop_unsealed():
            self.console(f"warning: checkpoint {step} was not sealed (killed while saving): dropped, round {step} "
                         "is redone")
        done = ckpt.latest_step() or 0
        if done > c.run.iterations:
            raise ValueError(f"run.iterations={c.run.iterations}, but {out} has finished round {done}; "
                             "ask for at least that many")
        base_done = self.folder.read_metrics(0) is not None
        round_done = done == 0 or self.folder.read_metrics(done) is not None
        # an earlier round whose metrics.json was deleted (damaged) while its checkpoint is kept; a
        # damaged earlier one is named when the rows are read, after the latest round is complete
        redo = [j for j in ckpt.all_steps() if j < done and not self.folder.metrics_file(j).exists()]
        _barrier(f"resume-state-{done}-{base_done}-{round_done}-{redo}")  # every process decides from the same state
        self._open_trackers()
        self._current = 0
        if not base_done:
            self.console(f"{self._name(0)}: evaluating the base model on {len(self.test)} test examples")
            row = {"round": 0, self._key: 0, **self.evaluate(0)}
            self._finish_round(0, row)
        for j in redo:
            params, _, meta = ckpt.restore(j, _like(self.trainer.params))
            self.trainer.set_params(params)
            self.console(f"recomputing {self._name(j)}'s metrics from its checkpoint")
            self._complete_round(j, meta)
        if done:
            params, opt_state, meta = ckpt.restore(done, _like(self.trainer.params),
                                                   None if c.mstep.reset_optimizer else self.trainer.opt_state_like())
            self.trainer.set_params(params)
            if opt_state is not None:
                self.trainer.opt_state = opt_state
            elif c.mstep.reset_optimizer:
                self.trainer.drop_optimizer()
            self.console(f"resuming {out} after {self._name(done)}")
            if round_done:
                self._sync(done, saved=True)
            else:  # killed between the checkpoint and the metrics
                self._complete_round(done, meta)
        for k in range(done + 1, c.run.iterations + 1):
            self.round(k, ckpt)
        ckpt.close()
        _barrier("rows")  # process 0 has written every round's metrics.json: all read the same rows
        rows = self.rows()
        lost = [k for k in range(c.run.iterations + 1) if k not in {r["round"] for r in rows}]
        if lost:  # a metrics.json deleted before the latest checkpoint's round: never end without it
            raise ValueError(f"{self.folder.metrics_file(lost[0])}: missing, and only the latest checkpoint's "
                             "round is recomputed; restore the file or use a new --out")
        self._write_reports(rows)
        if self.trackers is not None:
            self.trackers.close()
        return rows

    def _complete_round(self, k: int, meta: dict) -> None:
        """Round k's metrics from its checkpoint: its E/M-step numbers kept in the checkpoint,
        then θ(k) synced and evaluated (the trainer holds θ(k))."""
        row = dict(meta.get("round_metrics") or {})
        if not row:
            raise ValueError(f"{self.out}/checkpoints/{k}: has no metrics of round {k} to complete")
        row.update(self._sync(k, saved=True))
        if self._eval_due(k):
            row.update(self.evaluate(k))
        self._finish_round(k, row)

    @property
    def _key(self) -> str:
        return self.noun

    def _eval_due(self, k: int) -> bool:
        return k % self.cfg.eval.every == 0 or k == self.cfg.run.iterations

    def round(self, k: int, ckpt) -> dict:
        c = self.cfg
        self._current = k
        t0 = time.time()
        n_prompts = len(self.round_examples(k))
        self.console(f"{self._name(k)}: E-step on {n_prompts} prompts ({c.estep.scheme}, "
                     f"{c.estep.samples_per_prompt} per prompt)")
        t = time.time()
        draws = self.estep(k)
        row: dict[str, Any] = {"round": k, self._key: k, **draw_metrics(draws),
                               "seconds_estep": time.time() - t}
        self.console(f"{self._name(k)}: E-step done in {row['seconds_estep']:.0f} s: {row['accepted']} of "
                     f"{row['draws']} draws accepted, {row['trained']} to train on")
        self.engine.release()
        release_memory()
        self.console(f"{self._name(k)}: M-step on {row['trained']} sequences")
        stats = self.mstep(k, draws)
        row.update(stats)
        loss = "–" if stats["train_loss"] is None else f"{stats['train_loss']:.4f}"
        self.console(f"{self._name(k)}: M-step done in {stats['seconds_mstep']:.0f} s: {stats['optimizer_steps']} "
                     f"optimizer steps, train loss {loss}")
        saved = k % c.run.save_every == 0 or k == c.run.iterations
        if saved:
            opt = None if c.mstep.reset_optimizer else self.trainer.opt_state
            ckpt.save(k, self.trainer.params, opt, meta={
                "round_metrics": {key: v for key, v in row.items()},
                "model_config": self.model_cfg.to_hf_config(c.model.dtype), "tokenizer_from": str(self.model_dir)})
        if c.mstep.reset_optimizer:
            self.trainer.drop_optimizer()  # the next round starts a fresh one: free its memory now
        release_memory()
        row.update(self._sync(k, saved))
        if self._eval_due(k):
            self.console(f"{self._name(k)}: evaluating on {len(self.test)} test examples")
            row.update(self.evaluate(k))
        row["seconds_round"] = time.time() - t0
        self._finish_round(k, row)
        return row

    def _sync(self, k: int, saved: bool) -> dict:
        """Hand θ(k) to the rollout engine; its report becomes part of the round's metrics
        (sync_method, seconds_export, seconds_load, seconds_sync) and a fallback a warning."""
        report = self.engine.sync(self.weights(k, saved))
        if report.fallback:
            self.console(f"warning: {self._name(k)}: {report.fallback}")
        m = report.metrics()
        export = f", export {m['seconds_export']:.1f} s" if report.method == "folder" else ""
        self.console(f"{self._name(k)}: weights synced in place ({report.method}) in {m['seconds_sync']:.1f} s{export}")
        return m

    def _finish_round(self, k: int, row: dict) -> None:
        self.folder.write_text(self.folder.metrics_file(k), json.dumps(row) + "\n")
        self.console(_line(row, self._name(k), self.cfg))
        if self.trackers is not None:
            step = self._global_step(k)
            from .trackers import round_scalars

            self.trackers.log(round_scalars(row), step=step)
            records, self._eval_records = getattr(self, "_eval_records", None), None
            if records:
                cols = ["example_id", "completion", "answer", "gold", "reward"]
                self.trackers.log_table("eval/samples", cols, [[r[c] for c in cols] for r in records[:8]], step=step)
        self._write_reports(self.rows())

    def rows(self) -> list[dict]:
        return self.folder.rows(self.cfg.run.iterations)

    def _write_reports(self, rows: list[dict]) -> None:
        c = self.cfg
        self.folder.write_reports(rows, f"{self.title()} · seed {c.run.seed} · {c.model.path} · {c.task.name}")

    def _open_trackers(self) -> None:
        if not self.cfg.run.report_to:
            return
        from .trackers import make_trackers

        # resume=True: a fresh folder has no tracker ledger yet, a resumed one continues its runs
        self.trackers = make_trackers(list(self.cfg.run.report_to), self.out, config_lib.to_dict(self.cfg),
                                      run_name=self.out.name, resume=True, is_main_process=self.folder.is_main)


def _like(tree):
    import jax

    return jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding), tree)


def _line(row: dict, name: str, cfg: Config) -> str:
    parts = [name]
    acc = row.get("test_accuracy")
    if acc is not None:
        parts.append(f"test accuracy {acc:.3f}" + "".join(f", {k} {row[k]:.3f}" for k in row if "@" in k))
    if row["round"] > 0:
        if row.get("data_utilization") is not None:
            parts.append(f"utilization {row['data_utilization']:.3f}")
        parts.append(f"reward {row['reward_mean']:.3f}" if row.get("reward_mean") is not None else "no draws")
        loss = row.get("train_loss")
        parts.append(f"train loss {'–' if loss is None else f'{loss:.4f}'}")
    return " · ".join(parts)
