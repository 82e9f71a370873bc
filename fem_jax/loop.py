"""One run, start to end: rounds of E-step -> M-step -> checkpoint -> engine sync -> evaluate.

`run(cfg, out)` is the one entry for one run (the CLI, comparisons and fem_jax.sweep call
it): it checks the run folder, builds the experiment and runs or resumes its rounds. What a
round is comes from the objective's spec (fem_jax.objectives), one class each:
- "iterations": FEM's Algorithm 1 (fem_jax.fem_loop.FemIterations): every training
  example each round, one epoch over the accepted draws;
- "steps": EMPG's Algorithm 1 (fem_jax.step_loop.PolicySteps): a fresh batch of prompts
  each round, the configured optimizer updates on that buffer only.
`Experiment` (fem_jax.experiment) holds what both share: building the model, task, engine and trainer,
the E-step, M-step, checkpoint, sync and evaluation of a round, and the resume.
Round 0 is the base model's evaluation. After round k's M-step the weights θ(k) are
checkpointed (every `run.save_every` rounds and the last), handed to the rollout engine
(`engine.sync`), and evaluated (every `eval.every` rounds and the last): evaluation always
measures θ(k), never θ(k-1), whatever the backend.

Run folder (`out`, fem_jax.run_folder), written by process 0 only:
  config.yaml               the resolved config (a resumed run must match it, see config.EXTENDABLE)
  log.txt                   library chatter (absl, orbax, transformers, vLLM, warnings)
  <r>_0/metrics.json        the base model's evaluation (<r> = iter or step)
  <r>_k/rollouts.jsonl      every E-step draw, its fate decided (+ a trailer: count, sha256)
  <r>_k/eval.jsonl          the test completions of an evaluated round
  <r>_k/metrics.json        the round's metrics (with how the engine was synced)
  <r>_k/hf/                 the Hugging Face export an engine that reads files was synced from
  checkpoints/<k>/          orbax checkpoint after round k (parameters, optimizer state when
                            it carries over, the round's E/M-step metrics), checksummed
  metrics.jsonl, summary.md, curves.png, and the trackers' folders (run.report_to)

Resume: the latest sealed checkpoint c is restored; a round whose checkpoint exists but
whose metrics.json does not (killed in between) is completed from the checkpoint (sync,
evaluate, metrics); rounds after c are redone, reusing complete E-step files. Everything is
seeded, so a resumed run ends with the same metrics as an uninterrupted one.
"""

from __future__ import annotations

from pathlib import Path

from . import config as config_lib
from .config import Config
from .console import Console, Log
from .experiment import TIMING_KEYS, Experiment, _process_info, release_memory
from .run_folder import check_out

__all__ = ["TIMING_KEYS", "Experiment", "experiment_class", "release_memory", "run", "run_comparison"]


# ---------------------------------------------------------------------------- entries


def experiment_class(cfg: Config) -> type[Experiment]:
    """The Experiment subclass of the objective's loop shape (its spec's `loop`)."""
    from .fem_loop import FemIterations
    from .step_loop import PolicySteps

    return {"iterations": FemIterations, "steps": PolicySteps}[cfg.objective.loop]


def run(cfg: Config, out: str | Path, log: Log | None = None, console: Console | None = None) -> list[dict]:
    """Check the run folder, build the experiment (nothing written if that fails), write the
    resolved config, then run the rounds."""
    out = Path(out)
    console = console or Console(log)
    _, changes = check_out(cfg, out)
    if cfg.run.trainer == "trl":  # TRL's GRPOTrainer samples and trains; our evaluator scores it
        from .trl_run import TrlRun

        exp = TrlRun(cfg, out, console)
    else:
        exp = experiment_class(cfg)(cfg, out, console)
    for key, a, b in changes:
        console(f"{out}: {key} {a!r} -> {b!r} (a change that keeps the finished rounds)")
    exp.folder.write_text(out / "config.yaml", config_lib.dump_yaml(cfg))
    return exp.run()


def run_comparison(cfg: Config, out: str | Path, log: Log | None = None, console: Console | None = None) -> str:
    """Every (arm, seed) of `cfg.compare` in its own run folder out/<arm>_seed<seed>, seeds
    outermost (an interrupted comparison still covers every arm), then one table and plot."""
    from .report import compare

    out = Path(out)
    console = console or Console(log)
    results: dict[str, dict[int, list[dict]]] = {}
    main = _process_info()[0] == 0
    for name, seed, c in cfg.arms():
        console(f"== {name}, seed {seed}")
        results.setdefault(name, {})[seed] = run(c, out / f"{name}_seed{seed}", console=console)
        if main:
            compare(results, out)  # the table so far
    return compare(results, out) if main else ""
