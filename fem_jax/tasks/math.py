"""`gsm8k` and `math`: math word problems with a verifiable final answer.

- gsm8k (`question`, `answer` ending in "#### N"): gold is the integer N (commas and a `$`
  tolerated). Splits: the dataset's train/test (`train.jsonl`, `test.jsonl` in a folder;
  hub `openai/gsm8k`, subset `main`).
- math (`problem`, `level`, `type`, `solution`): gold is the content of the last
  `\\boxed{}` of the solution (nested braces kept), as LaTeX. `levels` ("3,4,5" or
  [3, 4, 5]; the EM policy gradient paper uses 3-5) keeps those levels; a level the data
  marks "Level ?" is then dropped. Rows without a boxed answer are skipped and counted.
  Default hub copy: `DigitalLearningGmbH/MATH-lighteval` (Hendrycks MATH, train 7,500 /
  test 5,000 problems).

Both read the dataset's own train and test splits (`pool: false`, the default here; the
EM policy gradient paper uses the standard splits); `pool: true` draws both from their
union instead (see base.py).

The prompt asks for the final answer in `\\boxed{}`. `parse` reads, in order: the last
`\\boxed{...}`; else (gsm8k) a "#### N" line; else the last "answer is X"; else the last
number of the text. A model that boxes nothing is still scored on what it states last,
as graders of both datasets do. `math` rewards by `math-verify` equivalence, so
`\\frac{1}{2}`, `0.5` and `\\dfrac12` agree; `gsm8k` by numeric equality.
"""

from __future__ import annotations

import re
import threading
from functools import lru_cache

from .base import ANSWER_HINTS, ANSWER_LEAK_PHRASES, DatasetTask, Example, last_number, parse_int_list, to_number

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
_ANSWER_IS = re.compile(r"answer\s*(?:is|:)\s*:?\s*(.+?)(?:\.\s|\.?$|\n)", re.IGNORECASE | re.MULTILINE)


def last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} (or \\fbox{...}), nested braces kept;
    `\\boxed 5` (no braces) gives "5". None when there is none or it is unclosed."""
    starts = [m for m in re.finditer(r"\\(?:boxed|fbox)\b", text)]
    if not starts:
        return None
    i = starts[-1].end()
    rest = text[i:].lstrip()
    if not rest.startswith("{"):
        m = re.match(r"[^\s$]+", rest)
        return m.group(0) if m else None
    depth = 0
    for j, ch in enumerate(rest):
        depth += (ch == "{") - (ch == "}")
        if depth == 0:
            return rest[1:j].strip()
    return None


def final_answer(text: str, marker: str | None = None) -> str | None:
    """The stated final answer of a model's text, as a string (see the module docstring)."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    if marker and marker in text:
        tail = text.rsplit(marker, 1)[1].strip().splitlines()
        if tail and tail[0].strip():
            return tail[0].strip()
    hits = _ANSWER_IS.findall(text)
    if hits:
        return hits[-1].strip().strip("$").strip()
    v = last_number(text)
    return None if v is None else str(v)


def _clean_number(s: str):
    """A number from a short answer string such as '\\$1{,}234', '18 \\text{ dollars}'."""
    s = s.replace("{,}", ",").replace("\\!", "").replace("\\$", "$").replace("\\%", "")
    return last_number(s)


class GSM8K(DatasetTask):
    name = "gsm8k"
    hints = ANSWER_HINTS
    leak_phrases = ANSWER_LEAK_PHRASES
    default_path, default_config = "openai/gsm8k", "main"
    columns = ("question", "answer")

    def example(self, source, index, row):
        if "####" not in row["answer"]:
            raise ValueError("column 'answer' has no '#### N' final answer")
        gold = to_number(row["answer"].rsplit("####", 1)[1].replace(",", ""))
        if gold is None:
            raise ValueError(f"column 'answer': cannot read a number after '####' in {row['answer'][-40:]!r}")
        return Example(f"gsm8k/{source}/{index}", gold, {"question": row["question"]})

    def messages(self, example, hint=None):
        parts = [example.fields["question"]]
        if hint is not None:
            parts.append(self.hint_text(hint, example.gold))
        return [{"role": "user", "content": "\n\n".join(parts + [INSTRUCTION])}]

    def parse(self, text):
        ans = final_answer(text, marker="####")
        return None if ans is None else _clean_number(ans)


class MATH(DatasetTask):
    name = "math"
    hints = ANSWER_HINTS
    leak_phrases = ANSWER_LEAK_PHRASES
    default_path = "DigitalLearningGmbH/MATH-lighteval"
    columns = ("problem", "level", "type", "solution")

    def __init__(self, levels=None, **options):
        super().__init__(**options)
        self.levels = None if levels is None else set(parse_int_list(levels, "levels"))

    def hint_text(self, hint, gold):
        return super().hint_text(hint, f"${gold}$")  # gold is LaTeX: give it math delimiters

    def keep(self, row):
        return self.levels is None or _level(row) in self.levels

    def example(self, source, index, row):
        gold = last_boxed(row["solution"] or "")
        if not gold:
            return None  # no boxed answer: skipped and counted
        fields = {"problem": row["problem"], "level": _level(row), "type": row["type"]}
        return Example(f"math/{source}/{index}", gold, fields)

    def messages(self, example, hint=None):
        parts = [example.fields["problem"]]
        if hint is not None:
            parts.append(self.hint_text(hint, example.gold))
        return [{"role": "user", "content": "\n\n".join(parts + [INSTRUCTION])}]

    def parse(self, text):
        return final_answer(text)

    def reward(self, answer, gold) -> float:
        if answer is None:
            return 0.0
        if _norm(answer) == _norm(gold):
            return 1.0
        return float(_verify(gold, answer))


def _level(row) -> int | None:
    m = re.search(r"\d+", str(row["level"] or ""))  # "Level 3" -> 3; "Level ?" -> None
    return int(m.group(0)) if m else None


def _norm(s: str) -> str:
    return re.sub(r"\s+|\\[,;!]|\\left|\\right", "", s).replace("dfrac", "frac").replace("tfrac", "frac")


@lru_cache(maxsize=65536)
def _verify(gold: str, answer: str) -> bool:
    from math_verify import parse, verify

    # math-verify's timeouts use SIGALRM, which only the main thread may set.
    t = 5 if threading.current_thread() is threading.main_thread() else None
    g = parse(f"${gold}$", parsing_timeout=t)
    a = parse(f"${answer}$", parsing_timeout=t)
    return bool(g and a and verify(g, a, timeout_seconds=t))
