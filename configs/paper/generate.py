"""Write the papers' experiment files from one matrix: each is an `include:` list of parts.

    python configs/paper/generate.py           # (re)write configs/paper/experiments/
    python configs/paper/generate.py --check   # exit 1 if a file would change (nothing written)
    python launch/run.py --config configs/paper/experiments/qwen2.5-1.5b-instruct/helpsteer2-helpfulness-pps.yaml

Experiments (the values live in the parts, not here):
- "Learning to Reason in LLMs by Expectation Maximization" (arXiv:2512.20169):
  - Tables 1-2: MODELS x JUDGE_TASKS (9 metrics) x SCHEMES (rs with M = 1, star, pps)
    -> experiments/<model>/<task>-<metric>-<scheme>.yaml, including base.yaml,
    models/<model>.yaml, tasks/<task>-<metric>.yaml, schemes/<scheme>.yaml;
  - Appendix C, Tables 3-4 (the ablations, which the paper ran with Qwen2.5-3B-Instruct on
    the five HelpSteer2 metrics only): ABLATION_SCHEMES (rs-3, rs-5: budgets M = 3, 5;
    pps2, pps3, star2, star3: the hint variants) -> the same file names under
    experiments/qwen2.5-3b-instruct/. Table 3's RS-1 and Table 4's RS/STaR/PPS columns are
    the Tables 1-2 files. Table 5 (N = 1,000 / 4,000) needs no file of its own:
    --set task.options.n_train=1000 (or 4000).
- "Training Large Language Models to Reason via EM Policy Gradient" (arXiv:2504.18587),
  Tables 1-2: EMPG_MODELS (the paper's Qwen2.5 base models 1.5B, 7B, Math-7B and
  14B-Instruct, Section 5) x MATH_TASKS (GSM8K, MATH levels 3-5) x OBJECTIVES (empg, grpo)
  -> experiments/<model>/<task>-<objective>.yaml, including empg_base.yaml (this paper's
  settings and verl's defaults, which it says it follows; not base.yaml, the FEM paper's),
  models/<model>.yaml, tasks/<task>.yaml, objectives/<objective>.yaml. Two parts replace
  the task or objective part where the paper says so: tasks/math-l3-5-2048.yaml for the
  14B model on MATH (max_response_length 2048, Section 5.2) and objectives/empg-no-kl.yaml
  for EMPG with the 1.5B model (beta = 0, Section 5.1); each includes the part it amends.

Each file's header states where it departs from the paper. Running this twice changes
nothing; files of experiments no longer in the matrix are removed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

MODELS = ("qwen2.5-1.5b-instruct", "qwen2.5-3b-instruct", "qwen2.5-7b-instruct",
          "llama-3.2-3b-instruct", "llama-3.1-8b-instruct")
JUDGE_TASKS = {
    "helpsteer2": ("helpfulness", "correctness", "coherence", "complexity", "verbosity"),
    "summarize_feedback": ("helpfulness", "accuracy", "coverage", "coherence"),
}
SCHEMES = ("rs", "star", "pps")
ABLATION_MODELS = ("qwen2.5-3b-instruct",)  # Appendix C: "Qwen 3B" on HelpSteer2
ABLATION_TASKS = {"helpsteer2": JUDGE_TASKS["helpsteer2"]}
ABLATION_SCHEMES = ("rs-3", "rs-5", "pps2", "pps3", "star2", "star3")
EMPG_MODELS = ("qwen2.5-1.5b", "qwen2.5-7b", "qwen2.5-math-7b", "qwen2.5-14b-instruct")
MATH_TASKS = ("gsm8k", "math-l3-5")
OBJECTIVES = ("empg", "grpo")
# (model, task) -> the task part used instead of tasks/<task>.yaml; (model, objective) -> the
# objective part used instead of objectives/<objective>.yaml (each includes the one it amends)
EMPG_TASK_PARTS = {("qwen2.5-14b-instruct", "math-l3-5"): "math-l3-5-2048"}  # Section 5.2
EMPG_OBJECTIVE_PARTS = {("qwen2.5-1.5b", "empg"): "empg-no-kl"}  # Section 5.1

# What each FEM experiment file says about its values: every value in the parts is cited to
# the paper or marked [ours]/[TRL] there; these lines name the ones the paper does not state.
_UNSTATED = ("# - not stated by the paper, ours (marked [ours] in the parts): sampling temperature 0.7,\n"
             "#   top_p 1.0 and 512 new tokens for the E-step; greedy decoding and 512 new tokens for the\n"
             "#   evaluation; batch size 32; sequence length 2,048; bfloat16;\n"
             "# - AdamW \"with default parameters\" and SFT in TRL read as TRL's defaults (weight decay 0,\n"
             "#   betas 0.9/0.999, gradient clipping 1.0, the loss averaged over completion tokens;\n"
             "#   marked [TRL]);\n"
             "# - the train/test rows are drawn per seed from one pool of the dataset's splits (our reading\n"
             "#   of Section 4.1; see the task part);\n")
_KEEP_ALL = ("# - every correct draw is kept, hinted or not, as in the paper (estep.reject_hint_leaks: false;\n"
             "#   --set estep.reject_hint_leaks=true turns on our filter of draws that repeat the hint).\n")
_SCHEME_NOTES = {
    "rs": "# - RS budget M = 1, as in the paper's tables (Section 4.1).\n",
    "rs-3": "# - RS budget M = 3: the ablation of Appendix C (Table 3).\n",
    "rs-5": "# - RS budget M = 5: the ablation of Appendix C (Table 3).\n",
    **{s: _KEEP_ALL for s in ("star", "pps", "star2", "pps2", "star3", "pps3")},
}
_SCHEME_SOURCE = {"rs": "Tables 1-2", "star": "Tables 1-2", "pps": "Tables 1-2",
                  **{s: "Appendix C, Table 3" for s in ("rs-3", "rs-5")},
                  **{s: "Appendix C, Table 4" for s in ("star2", "pps2", "star3", "pps3")}}

# What each EMPG experiment file says about its values (every value is cited in the parts):
_MATH_TABLE = {"gsm8k": "Table 1 (GSM8K)", "math-l3-5": "Table 2 (MATH HARD)"}
_MATH_LENGTHS = {"gsm8k": "512 / 1,024", "math-l3-5": "1,024 / 3,072", "math-l3-5-2048": "1,024 / 2,048"}
_PAPER_SCORES = {  # EMPG paper, Tables 1-2: (EMPG, GRPO) test scores
    ("qwen2.5-1.5b", "gsm8k"): (0.744, 0.739), ("qwen2.5-7b", "gsm8k"): (0.888, 0.867),
    ("qwen2.5-math-7b", "gsm8k"): (0.918, 0.004), ("qwen2.5-14b-instruct", "gsm8k"): (0.952, 0.940),
    ("qwen2.5-1.5b", "math-l3-5"): (0.575, 0.568), ("qwen2.5-7b", "math-l3-5"): (0.742, 0.730),
    ("qwen2.5-math-7b", "math-l3-5"): (0.794, 0.755), ("qwen2.5-14b-instruct", "math-l3-5"): (0.808, 0.816),
}
_OBJECTIVE_NOTES = {
    "empg": "EMPG: log P(tau) summed over the trajectory (Eqs. 10-12), no clipping, no importance weight",
    "empg-no-kl": "EMPG with beta = 0, no KL term: the paper's setting for the 1.5B model (Section 5.1)",
    "grpo": ("GRPO as verl runs it: beta = 0.001 (k3), clip 0.2, dual clip 3.0, token-mean [verl];\n"
             "#   the paper states none of GRPO's values"),
}
_BETA_NOTES = {
    "qwen2.5-7b": "# - EMPG's beta = 0.001 for this model is ours (verl's KL coefficient, as GRPO's): the paper\n"
                  "#   states beta = 0 for 1.5B and a KL for 14B-Instruct only (Section 5.1);\n",
    "qwen2.5-14b-instruct": "# - EMPG's KL \"remains beneficial\" for this model (Section 5.1); its beta = 0.001 is verl's\n"
                            "#   KL coefficient (the paper gives no value);\n",
}
_BETA_NOTES["qwen2.5-math-7b"] = _BETA_NOTES["qwen2.5-7b"]


def _judge(model: str, task: str, metric: str, scheme: str) -> str:
    return (f"# Generated by configs/paper/generate.py; edit the parts or the matrix there, not this file.\n"
            f"# FEM paper (arXiv:2512.20169), {_SCHEME_SOURCE[scheme]}: {model}, {task} {metric}, "
            f"E-step scheme {scheme}.\n"
            f"# K = 5 iterations, lr 1e-6 -> 1e-7 (constant within an iteration), one SFT epoch each,\n"
            f"# 2,000 / 2,000 examples, seed 257 (--set run.seed=521 / 1031): Section 4.1.\n"
            f"# Departures from the paper and values it does not state:\n"
            + _UNSTATED + _SCHEME_NOTES[scheme] +
            f"include:\n"
            f"  - ../../base.yaml\n"
            f"  - ../../models/{model}.yaml\n"
            f"  - ../../tasks/{task}-{metric}.yaml\n"
            f"  - ../../schemes/{scheme}.yaml\n")


def _math(model: str, task: str, objective: str) -> str:
    task_part = EMPG_TASK_PARTS.get((model, task), task)
    objective_part = EMPG_OBJECTIVE_PARTS.get((model, objective), objective)
    score = _PAPER_SCORES[(model, task)][OBJECTIVES.index(objective)]
    failed = ",\n# \"GRPO failed to learn in this setting\"" if (model, task, objective) == (
        "qwen2.5-math-7b", "gsm8k", "grpo") else ""
    return (f"# Generated by configs/paper/generate.py; edit the parts or the matrix there, not this file.\n"
            f"# EM policy gradient paper (arXiv:2504.18587), {_MATH_TABLE[task]}: {model}, objective {objective};\n"
            f"# the paper's test score (the mean of its last 10 evaluations, Section 5.2): {score:.3f}{failed}.\n"
            f"# 200 steps (Section 5) of 1,024 prompts x 5 rollouts at temperature 1.0 (Section 4.1), 4 AdamW\n"
            f"# updates of 256 prompts per step, lr 1e-6 constant, an evaluation every 5 steps (Section 5.2),\n"
            f"# max prompt / response tokens {_MATH_LENGTHS[task_part]} (Section 5.2).\n"
            f"# {_OBJECTIVE_NOTES[objective_part]}.\n"
            f"# Departures from the paper and values it does not state:\n"
            f"# - learning rate, batch sizes, AdamW and clipping values are verl's defaults, which the paper\n"
            f"#   says it follows (Section 5.2) without listing them (marked [verl] in the parts);\n"
            f"# - 5 rollouts per prompt (verl's GRPO example), seed 257 and the test split as the held-out\n"
            f"#   evaluation set are ours: the paper states none of them;\n"
            + (_BETA_NOTES.get(model, "") if objective == "empg" else "") +
            f"# - no prompt-length limit of its own: prompt + response are cut at mstep.max_seq_len (counted);\n"
            f"# - float32 weights throughout (verl: float32 weights, bfloat16 compute).\n"
            f"include:\n"
            f"  - ../../empg_base.yaml\n"
            f"  - ../../models/{model}.yaml\n"
            f"  - ../../tasks/{task_part}.yaml\n"
            f"  - ../../objectives/{objective_part}.yaml\n")


def experiments() -> dict[str, str]:
    """Relative path under experiments/ -> file text, for the whole matrix."""
    out: dict[str, str] = {}
    for model in MODELS:
        for task, metrics in JUDGE_TASKS.items():
            for metric in metrics:
                for scheme in SCHEMES:
                    out[f"{model}/{task}-{metric}-{scheme}.yaml"] = _judge(model, task, metric, scheme)
        if model in ABLATION_MODELS:
            for task, metrics in ABLATION_TASKS.items():
                for metric in metrics:
                    for scheme in ABLATION_SCHEMES:
                        out[f"{model}/{task}-{metric}-{scheme}.yaml"] = _judge(model, task, metric, scheme)
    for model in EMPG_MODELS:
        for task in MATH_TASKS:
            for objective in OBJECTIVES:
                out[f"{model}/{task}-{objective}.yaml"] = _math(model, task, objective)
    return out


def missing_parts(root: Path = HERE) -> list[str]:
    """Parts the matrix names that do not exist under root."""
    need = ["base.yaml"] + [f"models/{m}.yaml" for m in MODELS]
    need += [f"schemes/{s}.yaml" for s in SCHEMES + ABLATION_SCHEMES]
    need += [f"tasks/{t}-{m}.yaml" for t, ms in JUDGE_TASKS.items() for m in ms]
    need += ["empg_base.yaml"] + [f"models/{m}.yaml" for m in EMPG_MODELS]
    need += [f"tasks/{t}.yaml" for t in (*MATH_TASKS, *EMPG_TASK_PARTS.values())]
    need += [f"objectives/{o}.yaml" for o in (*OBJECTIVES, *EMPG_OBJECTIVE_PARTS.values())]
    return [p for p in need if not (root / p).is_file()]


def write(root: Path = HERE, check: bool = False) -> list[str]:
    """Bring root/experiments in line with the matrix; returns what changed ('+', '~', '-' path).
    With check=True nothing is written."""
    missing = missing_parts(root)
    if missing:
        raise FileNotFoundError(f"{root}: the matrix names parts that do not exist: {', '.join(missing)}")
    folder = root / "experiments"
    want = experiments()
    changes = []
    for rel, text in want.items():
        p = folder / rel
        if p.exists() and p.read_text() == text:
            continue
        changes.append(("~ " if p.exists() else "+ ") + rel)
        if not check:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(text)
    if folder.exists():
        for p in sorted(folder.rglob("*")):
            rel = p.relative_to(folder).as_posix()
            if p.is_file() and rel not in want:
                changes.append("- " + rel)
                if not check:
                    p.unlink()
        if not check:
            for d in sorted((d for d in folder.rglob("*") if d.is_dir()), reverse=True):
                if not any(d.iterdir()):
                    d.rmdir()
    return changes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="only report what would change; exit 1 if anything would")
    args = ap.parse_args(argv)
    changes = write(HERE, check=args.check)
    for c in changes:
        print(c)
    print(f"{len(experiments())} experiments; {len(changes)} file(s) {'would change' if args.check else 'changed'}")
    return 1 if args.check and changes else 0


if __name__ == "__main__":
    sys.exit(main())
