"""The E-step: draw rationales and decide each draw's fate, once.

Proposals of "Learning to Reason in LLMs by Expectation Maximization" (Section 3):
- `rs`: rejection sampling with budget M (Algorithm 2): draw from π(·|x) until correct, at
  most M tries;
- `pps` (`pps2`, `pps3`: the hint wordings of Appendix C): one draw from π(·|x + hint(y*)),
  the paper's PPS; with budget M > 1 (ours, an ablation: README "Why STaR beats PPS here"),
  up to M hinted draws, each round only for the examples still without an accepted draw;
- `star` (`star2`, `star3`): one `rs` try, then one `pps` try for the misses
  (rationalization; Algorithm 3).
Policy-gradient objectives (EMPG's Algorithm 1) draw N = `samples_per_prompt` samples per
prompt from π(·|x) in one `rs` round.

Every draw becomes a typed `Draw` whose fate is decided here and carried to the M-step,
the metrics and iter_k/rollouts.jsonl: `accepted` (correct, and not a hint leak when
`reject_hint_leaks` is on), `leaked` (a hinted draw that repeats the hint), `trained` (the
objective trains on it: FEM on the accepted draws, policy gradients on every draw with a
completion). The M-step trains on a trained draw with the *hint-free* prompt as context:
the hint never reaches the batch. Draws run round by round over all still-unsolved
examples, so each engine call is one large batch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Sequence

from .rollout.engine import Engine

SCHEMES = ("rs", "star", "pps", "pps2", "pps3", "star2", "star3")


@dataclasses.dataclass
class Draw:
    example_id: str
    scheme: str
    round: int  # the proposal's round: rs try index, or star's stage (0 hint-free, 1 hinted)
    hinted: bool
    completion: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    answer: Any
    reward: float
    leaked: bool
    accepted: bool
    trained: bool
    prompt: int = -1  # the prompt row of the round it answers (its draw batch); -1: written before we kept it

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["answer"] = None if self.answer is None else (
            self.answer if isinstance(self.answer, (int, float, str)) else str(self.answer))
        return d

    @classmethod
    def from_json(cls, row: dict, where: str) -> "Draw":
        fields = dataclasses.fields(cls)
        missing = [f.name for f in fields if f.name not in row and f.default is dataclasses.MISSING]
        if missing:
            raise ValueError(f"{where}: a draw lacks field(s) {', '.join(missing)}")
        return cls(**{f.name: row[f.name] for f in fields if f.name in row})

    @property
    def batch(self) -> str:
        """Its draw batch: the prompt row it answers (a prompt twice in a round is two batches)."""
        return f"#{self.prompt}" if self.prompt >= 0 else self.example_id


def plan(scheme: str, budget: int) -> list[str | None]:
    """The hint of each round: None for a hint-free try, a wording name for a hinted one."""
    if scheme not in SCHEMES:
        raise ValueError(f"estep.scheme: unknown scheme {scheme!r}; expected one of {', '.join(SCHEMES)}")
    base = scheme.rstrip("23")
    variant = "pps" + scheme[len(base):]
    if base == "rs":
        return [None] * budget
    if base == "pps":
        return [variant] * budget
    return [None, variant]


def run_estep(task, engine: Engine, examples: Sequence, *, scheme: str, budget: int, samples_per_prompt: int,
              temperature: float, top_p: float, top_k: int, max_new_tokens: int, seed: int,
              trains: Callable[[bool, bool], bool], reject_hint_leaks: bool = False,
              progress: Callable[[int], None] | None = None) -> list[Draw]:
    """Draw rationales for `examples`; returns every draw, its fate decided.

    `trains(accepted, has_completion)` is the objective's rule (Objective.trains).
    `progress(n)` is called with the number of samples finished since the last call."""
    draws: list[Draw] = []
    solved: set[int] = set()  # prompt rows with an accepted draw
    for r, hint in enumerate(plan(scheme, budget)):
        todo = [(row, ex) for row, ex in enumerate(examples) if row not in solved]
        if not todo:
            break
        prompts = [task.messages(ex, hint=hint) for _, ex in todo]
        outs = engine.generate(prompts, n=samples_per_prompt, temperature=temperature, top_p=top_p, top_k=top_k,
                               max_new_tokens=max_new_tokens, seed=seed * 1000 + r, progress=progress)
        for (row, ex), samples in zip(todo, outs):
            for s in samples:
                answer = task.parse(s.text)
                reward = float(task.reward(answer, ex.gold)) if answer is not None else 0.0
                leaked = hint is not None and _leaked(task, s.text, hint, ex.gold)
                accepted = reward > 0 and not (leaked and reject_hint_leaks)
                draws.append(Draw(ex.id, scheme, r, hint is not None, s.text, list(s.token_ids),
                                  [float(x) for x in s.logprobs], s.finish_reason, answer, reward, leaked,
                                  accepted, trains(accepted, bool(s.token_ids)), row))
                if accepted:
                    solved.add(row)
    return draws


def _leaked(task, text: str, hint: str, gold) -> bool:
    """task.hint_leaked with the wording and gold when the task takes them."""
    import inspect

    params = inspect.signature(task.hint_leaked).parameters
    if "hint" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return bool(task.hint_leaked(text, hint=hint, gold=gold))
    return bool(task.hint_leaked(text))


def draw_metrics(draws: Sequence[Draw]) -> dict:
    """A round's E-step numbers from its draws: data utilization (the FEM paper's: the share of
    examples with an accepted draw), acceptance per draw, mean reward, counts, the trained
    rationales' length in words (as fem_jax.evaluate.words counts them) and the draws' length in tokens."""
    import numpy as np

    accepted = [d for d in draws if d.accepted]
    trained = [d for d in draws if d.trained]
    n_examples = len({d.example_id for d in draws}) or 1
    return {
        "data_utilization": len({d.example_id for d in accepted}) / n_examples,
        "acceptance_rate": len(accepted) / max(1, len(draws)),
        "reward_mean": float(np.mean([d.reward for d in draws])) if draws else None,
        "draws": len(draws), "accepted": len(accepted), "trained": len(trained),
        "hint_leaks": sum(d.leaked for d in draws),
        "reasoning_length_trained": float(np.mean([len(d.completion.split()) for d in trained])) if trained else None,
        "response_length": float(np.mean([len(d.token_ids) for d in draws])) if draws else None,
        "tokens_estep": sum(len(d.token_ids) for d in draws),
    }


# ----------------------------------------------------------------------------- rollouts.jsonl

_TRAILER = "_rollouts"


def write_draws(path: Path, draws: Sequence[Draw], round_index: int, write: Callable[[Path, str], None]) -> None:
    """Every draw as one JSON line, then a trailer line with the count and a sha256 of the
    lines above it, so a file cut short (even on a line boundary) or altered is detected.
    `write(path, text)` is an atomic writer (fem_jax.io.atomic_write_text)."""
    body = "".join(json.dumps({"iteration": round_index, **d.to_json()}) + "\n" for d in draws)
    trailer = {_TRAILER: {"draws": len(draws), "sha256": hashlib.sha256(body.encode()).hexdigest()}}
    write(path, body + json.dumps(trailer) + "\n")


class IncompleteRollouts(ValueError):
    """A rollouts.jsonl that is cut short, altered or unreadable."""


def read_draws(path: Path) -> list[Draw]:
    """The draws of a rollouts.jsonl written by `write_draws`; IncompleteRollouts naming the
    file when its trailer is missing or does not match the lines above it."""
    text = Path(path).read_text()
    lines = text.splitlines(keepends=True)
    if not lines:
        raise IncompleteRollouts(f"{path}: empty")
    try:
        trailer = json.loads(lines[-1]).get(_TRAILER)
    except (json.JSONDecodeError, AttributeError):
        trailer = None
    if not isinstance(trailer, dict):
        raise IncompleteRollouts(f"{path}: no trailer line (cut short?)")
    body = "".join(lines[:-1])
    if len(lines) - 1 != trailer.get("draws") or hashlib.sha256(body.encode()).hexdigest() != trailer.get("sha256"):
        raise IncompleteRollouts(f"{path}: {len(lines) - 1} draw lines do not match its trailer "
                                 f"({trailer.get('draws')} draws and their checksum)")
    out = []
    for n, line in enumerate(lines[:-1], 1):
        row = json.loads(line)
        row.pop("iteration", None)
        out.append(Draw.from_json(row, f"{path}:{n}"))
    return out
