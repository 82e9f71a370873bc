"""Small fixture files in the real schemas and formats of the tasks' datasets, written into
a test's tmp dir: HelpSteer2 (jsonl.gz, multi-turn prompts), summarize_from_feedback axis
(parquet with nested structs and nulls, the hub's `axis/<split>-00000-of-00001` layout),
GSM8K (jsonl) and MATH (parquet, `data/<split>-...` layout)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

HS2_MULTI_TURN = ("What is a good name for a golden retriever?\n<extra_id_1>Assistant\nHow about Sunny or Maple?\n"
                  "<extra_id_1>User\nSomething more unusual, please.")


def _hs2(prompt, response, scores):
    return {"prompt": prompt, "response": response,
            **dict(zip(("helpfulness", "correctness", "coherence", "complexity", "verbosity"), scores))}


HELPSTEER2 = {
    "train": [
        _hs2("Explain photosynthesis in one sentence.",
             "Photosynthesis is how plants turn light, water and carbon dioxide into sugar and oxygen.", (4, 4, 4, 1, 1)),
        _hs2(HS2_MULTI_TURN, "You could try Bramble, Quill or Juniper.", (3, 3, 4, 1, 0)),
        _hs2("List three prime numbers.", "2, 4, 9", (0, 0, 3, 0, 0)),
        _hs2("Write a haiku about rain.", "Soft rain on the roof\nthe garden drinks in silence\nmorning smells of earth",
             (4, 4, 4, 2, 1)),
        _hs2("Summarize the causes of World War I.", "It started because of an assassination.", (1, 2, 3, 1, 0)),
        _hs2("How do I reverse a list in Python?", "Use `my_list[::-1]` for a reversed copy, or `my_list.reverse()` "
             "to reverse it in place.", (4, 4, 4, 2, 1)),
    ],
    "validation": [
        _hs2("Translate 'good morning' to French.", "Bonjour.", (3, 4, 4, 0, 0)),
        _hs2("Give me a tip for sleeping better.\n<extra_id_1>Assistant\nKeep a regular schedule.\n<extra_id_1>User\n"
             "Another one?\n<extra_id_1>Assistant\nAvoid screens before bed.\n<extra_id_1>User\nAnd one about food?",
             "Avoid heavy meals and caffeine late in the day.", (4, 4, 4, 1, 1)),
    ],
}


def hs2_rows(n: int, tag: str) -> list[dict]:
    """n HelpSteer2 rows with distinct prompts ("<tag> question <i>") and scores cycling 0-4."""
    return [_hs2(f"{tag} question {i}", f"{tag} answer {i}", tuple((i + k) % 5 for k in range(5))) for i in range(n)]


def write_helpsteer2(folder: Path, rows: dict | None = None) -> Path:
    """`train.jsonl.gz` and `validation.jsonl.gz` as in nvidia/HelpSteer2."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, items in (rows or HELPSTEER2).items():
        with gzip.open(folder / f"{split}.jsonl.gz", "wt", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in items)
    return folder


_AXES = pa.struct([(a, pa.int64()) for a in ("overall", "accuracy", "coverage", "coherence", "compatible")])
SUMMARIZE_SCHEMA = pa.schema([
    ("info", pa.struct([(k, pa.string()) for k in ("id", "post", "title", "subreddit", "site", "article")])),
    ("summary", pa.struct([("text", pa.string()), ("policy", pa.string()), ("note", pa.string()), ("axes", _AXES)])),
    ("worker", pa.string()), ("batch", pa.string()), ("split", pa.string()),
])


def _sf(i, post, text, axes, subreddit="relationships", article=None, title="Need advice"):
    axes = dict(zip(("overall", "accuracy", "coverage", "coherence"), axes), compatible=None)
    return {"info": {"id": f"t3_{i}", "post": post, "title": title, "subreddit": subreddit if post else None,
                     "site": None if post else "dailymail", "article": article},
            "summary": {"text": text, "policy": "sup4_ppo_rm4_t.7", "note": None, "axes": axes},
            "worker": f"w{i % 3}", "batch": "batch0", "split": "valid1"}


POST = ("My roommate (24F) keeps eating my food even though we agreed to label everything. I (23F) talked to her "
        "twice and she apologized both times, but it keeps happening. Should I move out or try something else?")
SUMMARIZE = {
    "validation": [
        _sf(1, POST, " Roommate keeps eating my labeled food despite two talks. Move out or what?", (6, 7, 6, 7)),
        _sf(2, POST, " I like my roommate.", (2, 3, 1, 6)),
        _sf(3, None, " Storm hits coast.", (5, 5, 5, 5), article="A storm hit the coast on Monday ..."),  # CNN/DM
        _sf(4, POST, " Roommate eats food, should I move?", (None, 6, 5, 6)),  # overall not rated
        _sf(5, "I adopted a cat last week. She hides all day under the bed and only eats at night. Is this normal?",
            " New cat hides all day and eats at night; normal?", (7, 7, 7, 7), subreddit="cats", title="Shy cat"),
    ],
    "test": [
        _sf(6, POST, " Roommate eats my food; we talked twice; what next?", (5, 6, 5, 6)),
        _sf(7, None, " Markets fall.", (3, 3, 3, 3), article="Stocks fell sharply ..."),
    ],
}


def write_summarize(folder: Path, rows: dict | None = None, schema: pa.Schema = SUMMARIZE_SCHEMA) -> Path:
    """openai/summarize_from_feedback `axis` as the hub's parquet files."""
    for split, items in (rows or SUMMARIZE).items():
        (folder / "axis").mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(items, schema=schema), folder / "axis" / f"{split}-00000-of-00001.parquet")
    return folder


GSM8K = {
    "train": [
        {"question": "Tom has 3 apples and buys 4 more. How many apples does he have?",
         "answer": "Tom has 3 + 4 = <<3+4=7>>7 apples.\n#### 7"},
        {"question": "A car costs $1,200 and a bike costs $300. How much do both cost?",
         "answer": "Together they cost 1,200 + 300 = $<<1200+300=1500>>1,500.\n#### $1,500"},
        {"question": "The temperature was 5 degrees and fell by 8 degrees. What is it now?",
         "answer": "5 - 8 = <<5-8=-3>>-3\n#### -3"},
    ],
    "test": [
        {"question": "Sara reads 12 pages a day for 5 days. How many pages does she read?",
         "answer": "12 * 5 = <<12*5=60>>60\n#### 60"},
    ],
}


def write_gsm8k(folder: Path, rows: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split, items in (rows or GSM8K).items():
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
    return folder


MATH = {
    "train": [
        {"problem": "What is $\\frac{2}{4}$ in lowest terms?", "level": "Level 1", "type": "Prealgebra",
         "solution": "Divide by 2: $\\frac{2}{4} = \\boxed{\\frac{1}{2}}$."},
        {"problem": "Solve $x^2 = 9$ for $x > 0$.", "level": "Level 3", "type": "Algebra",
         "solution": "Since $3^2 = 9$, $x = \\boxed{3}$."},
        {"problem": "Simplify $\\sqrt{50}$.", "level": "Level 4", "type": "Algebra",
         "solution": "$\\sqrt{50} = \\sqrt{25 \\cdot 2} = \\boxed{5\\sqrt{2}}$."},
        {"problem": "Which is largest? (A) 1 (B) 2", "level": "Level ?", "type": "Prealgebra",
         "solution": "Clearly $\\boxed{\\text{(B)}}$."},
        {"problem": "Find the vertex of $y = (x-1)^2 + 2$.", "level": "Level 5", "type": "Algebra",
         "solution": "The vertex is at $\\boxed{(1, 2)}$; in fact $\\boxed{\\left(1, {2}\\right)}$."},
        {"problem": "Describe a circle.", "level": "Level 3", "type": "Geometry",
         "solution": "A circle is the set of points at a fixed distance from a center."},  # no boxed answer
    ],
    "test": [
        {"problem": "Compute $\\dbinom{4}{2}$.", "level": "Level 2", "type": "Counting & Probability",
         "solution": "$\\dbinom{4}{2} = \\boxed{6}$."},
        {"problem": "What is $0.25$ as a fraction?", "level": "Level 3", "type": "Prealgebra",
         "solution": "$0.25 = \\boxed{\\frac{1}{4}}$."},
    ],
}


def write_math(folder: Path, rows: dict | None = None) -> Path:
    (folder / "data").mkdir(parents=True, exist_ok=True)
    for split, items in (rows or MATH).items():
        pq.write_table(pa.Table.from_pylist(items), folder / "data" / f"{split}-00000-of-00001.parquet")
    return folder
