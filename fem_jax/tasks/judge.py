"""LLM-as-a-judge tasks of "Learning to Reason in LLMs by Expectation Maximization"
(arXiv:2512.20169, Section 4): the model reads an instruction and a response, evaluates one
quality of the response, and predicts the human score.

Prompt. The paper's own texts, verbatim, from `prompts/judge.yaml` (each with its source):
the system prompt of Appendix B goes into the system message; the main prompt of Figure 1,
filled in, into the user message. Each task keeps only its own score-range sentence of
Figure 1 ("between 0 and 4" for HelpSteer2, "between 1 and 7" for Summarize from
Feedback). The placeholders are filled as follows:
- {judged score}: the metric's name in lower case, as Section 4.1 lists them
  ("helpfulness", "accuracy", ...);
- {score rubrics}: the metric's rubric of Appendix B, one "Score N: ..." line per score;
- {task}: HelpSteer2's prompt; a multi-turn prompt (turns joined by `<extra_id_1>User` /
  `<extra_id_1>Assistant`) becomes a "User: ... / Assistant: ..." conversation, which
  Figure 1's "An instruction (may include conversation history)" allows for.
  Summarize from Feedback has no instruction, only a Reddit post, and the paper does not
  say what it put there. We write one sentence, "Summarize the following Reddit post.",
  and then the post's fields as "SUBREDDIT: / TITLE: / POST:" lines: the rubrics
  judge "the response" against "the post", so the model must know that the response is
  meant as a summary of that post, and nothing more is added, to stay close to the paper.
- {response}: the evaluated response (HelpSteer2) or summary (Summarize from Feedback);
- the "### Hint" section (Figure 1's cyan text) only with a hint wording: `pps` (Figure 1),
  `pps2` and `pps3` (Appendix C), {conditioning} = the human score.

Parser: the prompt asks for "Evaluation: (detailed evaluation) Score: (predicted score)";
see `JudgeTask.parse` for the shapes of "Score:" it reads.

Data (Section 4.1: "We sample a random subset of 4 000 data points (2 000 train and
2 000 test) in each run", seeds 257, 521, 1031). With `pool: true` (the default) both
splits of a run are drawn, disjoint, from one pool with the run's seed:
- `helpsteer2`: NVIDIA HelpSteer2 (`prompt`, `response`, and the scores helpfulness,
  correctness, coherence, complexity, verbosity, 0-4). Pool: its `train` and `validation`
  splits (the hub has no test split).
- `summarize_feedback`: OpenAI's summarize_from_feedback, subset `axis` (nested
  `info{post, title, subreddit, article, ...}`, `summary{text, axes{overall, accuracy,
  coverage, coherence}}`; scores 1-7). Pool: its `validation` and `test` splits (it has no
  train split), Reddit posts only: rows without a post (`info.post` null: the CNN/Daily Mail
  articles) are left out. Metric `helpfulness` reads the `overall` axis (the data has no
  helpfulness axis; Appendix B's helpfulness rubric, "an okay / an excellent representation
  of the post", grades the summary as a whole). Rows whose chosen axis is null are skipped
  and counted in `task.skipped[<source split>]`.
The pools are our reading of Section 4.1: it draws 2,000 test points per run, and the
rows differ between runs, which HelpSteer2's own held-out split (about a thousand rows,
the same in every run) could not give. Rows are drawn one by one, as the paper's "data points": the
same prompt or post can appear in both splits with different responses. `pool: false`
keeps the dataset's split mapping instead (helpsteer2: train -> train, test -> validation;
summarize_feedback: train -> validation, test -> test). Example ids name the source split
and row: "helpsteer2/validation/17".
"""

from __future__ import annotations

import functools
import re
from importlib import resources

import yaml

from .base import DatasetTask, Example

PROMPT_FILE = "prompts/judge.yaml"
_WHERE = f"fem_jax/tasks/{PROMPT_FILE}"
# per task family: the scores its rubrics anchor (Appendix B) and its metrics (Section 4.1)
FAMILIES = {"helpsteer2": ((0, 1, 2, 3, 4), ("helpfulness", "correctness", "coherence", "complexity", "verbosity")),
            "summarize_feedback": ((1, 4, 7), ("helpfulness", "accuracy", "coverage", "coherence"))}
_SLOT = re.compile(r"\{(task|response|judged score|score rubrics|conditioning)\}")


def _text(data, *keys) -> str:
    node = data
    for k in keys:
        if not isinstance(node, dict) or k not in node:
            raise ValueError(f"{_WHERE}: missing {'.'.join(keys)}")
        node = node[k]
    if not isinstance(node, dict) or not isinstance(node.get("text"), str) or not node.get("source"):
        raise ValueError(f"{_WHERE}: {'.'.join(keys)} needs a `text` string and its `source` in the paper")
    return node["text"]


@functools.cache
def judge_prompts() -> dict:
    """The texts of prompts/judge.yaml: {"system", "main", "score_range": {family},
    "hints": {wording}, "rubrics": {family: {metric}}}, checked to fit together (each
    failure names the file and the key)."""
    try:
        data = yaml.safe_load(resources.files(__package__).joinpath(PROMPT_FILE).read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ValueError(f"{_WHERE}: not valid YAML: {' '.join(str(e).split())}") from None
    out = {"system": _text(data, "system"), "main": _text(data, "main"),
           "score_range": {f: _text(data, "score_range", f) for f in FAMILIES},
           "hints": {h: _text(data, "hints", h) for h in ("pps", "pps2", "pps3")},
           "rubrics": {f: {m: _text(data, "rubrics", f, m) for m in metrics} for f, (_, metrics) in FAMILIES.items()}}
    main = out["main"]
    for fam, sentence in out["score_range"].items():
        if main.count(" " + sentence) != 1:
            raise ValueError(f"{_WHERE}: main.text must hold score_range.{fam} ({sentence!r}) once")
    if main.count(_hint_section(out["hints"]["pps"])) != 1:
        raise ValueError(f"{_WHERE}: main.text must hold the '### Hint' section with hints.pps once")
    for slot in ("{task}", "{response}", "{judged score}", "{score rubrics}", "{conditioning}"):
        if slot not in main:
            raise ValueError(f"{_WHERE}: main.text lacks the placeholder {slot}")
    for name, hint in out["hints"].items():
        if "{conditioning}" not in hint:
            raise ValueError(f"{_WHERE}: hints.{name} lacks the placeholder {{conditioning}}")
    for fam, (scores, metrics) in FAMILIES.items():
        for m in metrics:
            got = [int(s) for s in re.findall(r"^Score (\d+):", out["rubrics"][fam][m], re.M)]
            if got != list(scores):
                raise ValueError(f"{_WHERE}: rubrics.{fam}.{m} has scores {got}; expected {list(scores)}")
    return out


def _hint_section(sentence: str) -> str:
    return f"### Hint\n{sentence}\n\n"


def render_user_prompt(family: str, *, task: str, response: str, judged_score: str, score_rubrics: str,
                       hint_sentence: str | None = None) -> str:
    """Figure 1 filled in for `family`: its own score-range sentence only, the "### Hint"
    section only when `hint_sentence` (already filled with the score) is given."""
    p = judge_prompts()
    text = p["main"]
    for fam, sentence in p["score_range"].items():
        if fam != family:
            text = text.replace(" " + sentence, "", 1)
    pps = p["hints"]["pps"]
    text = (text.replace(_hint_section(pps), "", 1) if hint_sentence is None else
            text.replace(_hint_section(pps), _hint_section(hint_sentence), 1))
    values = {"task": task, "response": response, "judged score": judged_score, "score rubrics": score_rubrics}
    # one pass: text inside the values is never read as a placeholder
    return _SLOT.sub(lambda m: values.get(m.group(1), m.group(0)), text)


# "Score: N" as models write it: any case; markdown emphasis, spaces or a line break around
# the label and the number ("**Score:** 4", "Score: **4**"); ":" or "="; the number in
# brackets ("(4)", "[4]"); "N/D" or "N out of D". A trailing period is not a decimal point.
_SCORE = re.compile(
    r"score[\s*_]*[:=][\s*_]*[(\[]?[\s*_]*(?P<num>-?\d+(?:\.\d+)?)(?:[\s*_]*[)\]])?"
    r"(?:[\s*_]*(?:/|out\s+of)\s*(?P<den>\d+))?(?P<range>\s*(?:-|–|to|or)\s*\d)?", re.IGNORECASE)
_TURN = re.compile(r"\s*<extra_id_1>(User|Assistant)\s*")


def render_conversation(prompt: str) -> tuple[str, int]:
    """A HelpSteer2 prompt as readable text, and its number of user turns. A single-turn
    prompt is returned as is."""
    parts = _TURN.split(prompt.strip())
    if len(parts) == 1:
        return parts[0], 1
    turns = [("User", parts[0])] + list(zip(parts[1::2], parts[2::2]))
    text = "\n\n".join(f"{role}: {content.strip()}" for role, content in turns)
    return text, sum(role == "User" for role, _ in turns)


class JudgeTask(DatasetTask):
    """Shared prompt, parser and reward of the judge tasks."""

    default_pool = True
    # Phrases that only the hint puts in a text (see Task.hint_leaked); "the score should
    # be 3" is a rationale's own conclusion and is not among them.
    leak_phrases = ("as if its score was", "the hint")
    family = ""
    lo, hi = 0, 4  # the dataset's score range (the rubric anchors may be fewer: 1, 4, 7)
    metrics: tuple[str, ...] = ()

    def __init__(self, metric: str = "helpfulness", **options):
        if metric not in self.metrics:
            raise ValueError(f"{self.name}: unknown metric {metric!r}; expected one of {list(self.metrics)}")
        self.metric = metric
        super().__init__(**options)

    @property
    def hints(self) -> dict[str, str]:
        return {k: v.replace("{conditioning}", "{y}") for k, v in judge_prompts()["hints"].items()}

    def rubric(self) -> str:
        """The Appendix B rubric of `self.metric`, one "Score N: ..." line per score."""
        return judge_prompts()["rubrics"][self.family][self.metric]

    def gold(self, value, column: str) -> int | None:
        if value is None:
            return None
        score = float(value)
        if not score.is_integer() or not self.lo <= score <= self.hi:
            raise ValueError(f"column {column!r}: score {value!r} is not an integer in [{self.lo}, {self.hi}]")
        return int(score)

    def messages(self, example, hint=None):
        f = example.fields
        user = render_user_prompt(self.family, task=f["instruction"], response=f["response"], judged_score=self.metric,
                                  score_rubrics=self.rubric(),
                                  hint_sentence=None if hint is None else self.hint_text(hint, example.gold))
        return [{"role": "system", "content": judge_prompts()["system"]}, {"role": "user", "content": user}]

    def parse(self, text: str) -> int | None:
        """The score of the last "Score: N" of `text` (see `_SCORE` for the shapes read);
        None when there is none, or the last one is not an integer in [lo, hi], gives a
        range ("2-3"), or a scale other than the task's ("3/5", "3 out of 5" on 0-4)."""
        hits = list(_SCORE.finditer(text))
        if not hits:
            return None
        m = hits[-1]
        if m.group("range") or (m.group("den") is not None and int(m.group("den")) != self.hi):
            return None
        v = float(m.group("num"))
        return int(v) if v.is_integer() and self.lo <= v <= self.hi else None


class HelpSteer2(JudgeTask):
    name = "helpsteer2"
    family = "helpsteer2"
    lo, hi = 0, 4
    metrics = FAMILIES["helpsteer2"][1]
    default_path = "nvidia/HelpSteer2"
    sources = {"train": "train", "test": "validation"}

    @property
    def columns(self):
        return ("prompt", "response", self.metric)

    def example(self, source, index, row):
        gold = self.gold(row[self.metric], self.metric)
        if gold is None:
            return None
        instruction, turns = render_conversation(row["prompt"])
        fields = {"instruction": instruction, "response": row["response"].strip(), "turns": turns}
        return Example(f"helpsteer2/{source}/{index}", gold, fields)


class SummarizeFeedback(JudgeTask):
    name = "summarize_feedback"
    family = "summarize_feedback"
    lo, hi = 1, 7
    metrics = FAMILIES["summarize_feedback"][1]
    # metric -> the data's axis column ("helpfulness" is the overall axis; see the module docstring)
    axes = {"helpfulness": "overall", "accuracy": "accuracy", "coverage": "coverage", "coherence": "coherence"}
    default_path, default_config = "openai/summarize_from_feedback", "axis"
    sources = {"train": "validation", "test": "test"}

    @property
    def columns(self):
        return ("info.post", "info.title", "info.subreddit", "summary.text", f"summary.axes.{self.axis}")

    @property
    def axis(self) -> str:
        return self.axes[self.metric]

    def keep(self, row):
        return (row.get("info") or {}).get("post") is not None

    def example(self, source, index, row):
        gold = self.gold((row["summary"].get("axes") or {}).get(self.axis), f"summary.axes.{self.axis}")
        if gold is None:
            return None  # this row was not rated on the chosen axis: skipped and counted
        info = row["info"]
        head = [f"{key}: {value}" for key, value in (("SUBREDDIT", info.get("subreddit") and f"r/{info['subreddit']}"),
                                                     ("TITLE", info.get("title"))) if value]
        instruction = "\n".join(["Summarize the following Reddit post.", "", *head, f"POST: {info['post'].strip()}"])
        fields = {"instruction": instruction, "response": row["summary"]["text"].strip()}
        return Example(f"summarize_feedback/{source}/{index}", gold, fields)
