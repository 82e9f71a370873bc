"""The Task interface, and the data loading every dataset-backed task shares.

A task turns dataset rows into `Example`s, renders chat messages with or without a hint
(the gold answer, for prompt posterior sampling), parses a model's answer out of its
text, and scores it. Hint wordings follow the FEM paper (Figure 1 and Appendix C): `pps`
asks the model to act "as if" the answer were the gold one and not to output the hint,
`pps2` states the answer and asks the same, `pps3` only states it.

Data: `path` is a local file, a local folder, or a hub dataset id; everything goes
through `datasets.load_dataset` ("json" for .jsonl/.jsonl.gz/.json, "parquet" for
.parquet), so fixture files and hub data share one code path. A task reads the dataset's
own splits ("source splits": `train`, `validation`, `test`): a folder is searched
(recursively) for a source split's files, e.g. `validation.jsonl.gz` or the hub's parquet
layout `axis/validation-00000-of-00001.parquet`; a hub id is asked for the split by name.

Two ways to make the task's `train` and `test` splits (option `pool`):
- `pool: false`: each split reads one source split (`sources`, e.g. test -> validation),
  and a random subset of `n_train` / `n_test` examples of it is drawn with `seed` (all of
  them when the size is None or larger).
- `pool: true`: the examples of every source split in `sources` form one pool; a seeded
  permutation of it gives the first `n_test` examples to `test` and the next `n_train` to
  `train`: disjoint, different for each seed, and the test set does not depend on
  `n_train`. Without sizes, test gets a fifth of the pool and train the rest. A pool
  smaller than n_train + n_test is an error.
A single file has no splits: it is always one pool, whatever `pool` says.
Example ids name the source split (a single file: its name without extension) and the
row: "<task>/<source split>/<row index>", the same in both modes.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

SPLITS = ("train", "test")
DEFAULT_SEED = 257  # the paper's seeds: 257, 521, 1031
_EXTENSIONS = {".jsonl": "json", ".json": "json", ".jsonl.gz": "json", ".json.gz": "json", ".parquet": "parquet"}


@dataclasses.dataclass(frozen=True)
class Example:
    id: str  # stable across runs: "<task>/<source split>/<row index in that split>"
    gold: Any  # int for judges/arithmetic/gsm8k; str (latex) for math
    fields: Mapping[str, Any]  # the task's prompt fields (question, instruction, response, ...)


class Task:
    """Abstract base. Subclasses set `name`, `hints` (wording per scheme, with `{y}`) and
    `leak_phrases`, and implement `load`, `messages` and `parse`."""

    name: str = "task"
    hint_schemes = ("pps", "pps2", "pps3")
    hints: Mapping[str, str] = {}
    leak_phrases: Sequence[str] = ()

    def load(self, split: str) -> list[Example]:
        raise NotImplementedError

    def messages(self, example: Example, hint: str | None = None) -> list[dict]:
        raise NotImplementedError

    def parse(self, text: str) -> Any | None:
        raise NotImplementedError

    def reward(self, answer, gold) -> float:
        """Exact match: 1.0 or 0.0 (None, an unparsed answer, scores 0)."""
        return float(answer is not None and answer == gold)

    def hint_text(self, hint: str, gold) -> str:
        """The hint sentence of wording `hint` (a name in `hint_schemes`) for answer `gold`."""
        if hint not in self.hints:
            raise ValueError(f"{self.name}: unknown hint wording {hint!r}; expected one of {sorted(self.hints)}")
        return self.hints[hint].format(y=gold)

    def hint_leaked(self, text: str, hint: str | None = None, gold=None) -> bool:
        """True when the rationale `text` repeats the hint, i.e. contains
        (1) one of `leak_phrases`, phrases that only the hint itself uses ("as if its score
            was", "the hint", so also "Do not output the hint"), as whole words, in any case
            and with any whitespace between the words; or
        (2) with `hint` (the wording's name) given: one sentence of that hint, filled with
            `gold` (any number or word when gold is None), as a whole sentence of the text:
            it starts where a sentence, line or quote starts (after . ! ? : ; or a line
            break, quotes, brackets, markdown marks) and ends with the hint's own end (a
            period, !, ?, a line break or the end of the text). Case and whitespace do
            not matter, markdown emphasis around the number does not hide it.
        A rationale's own conclusion is no leak: "Therefore, the score should be 3." and
        "The score of the response should be 3 because ..." are not the hint sentence of
        `pps2`, though "The score of the response should be 3." (with the gold 3) is.
        `hint_leaked(text)` checks (1) only."""
        if any(_phrase_pattern(p).search(text) for p in self.leak_phrases):
            return True
        return hint is not None and any(rx.search(text) for rx in self._hint_sentence_patterns(hint, gold))

    def _hint_sentence_patterns(self, hint: str, gold) -> list[re.Pattern]:
        """One pattern per sentence of hint wording `hint` filled with `gold` (see hint_leaked)."""
        value = r"\S+?" if gold is None else r"[*_]*" + re.escape(str(gold)) + r"[*_]*"
        out = []
        for sentence in re.split(r"(?<=[.!?])\s+", self.hint_text(hint, _GOLD).strip()):
            words = [value.join(map(re.escape, w.split(_GOLD))) for w in sentence.rstrip(".!?").split()]
            out.append(re.compile(_SENTENCE_START + r"\s+".join(words) + _SENTENCE_END, re.IGNORECASE))
        return out


_GOLD = "\x00"  # stands for the gold answer while a hint sentence becomes a pattern
_SENTENCE_START = r"(?:^|(?<=[\n.!?:;\"'“‘(\[*_>#-]))[ \t*_>#\"'“‘-]*"
_SENTENCE_END = r"[*_]*[ \t]*(?:[.!?](?!\d)|\n|$)"


@functools.cache
def _phrase_pattern(phrase: str) -> re.Pattern:
    return re.compile(r"\b" + r"\s+".join(map(re.escape, phrase.split())) + r"\b", re.IGNORECASE)


_NUMBER = re.compile(r"(?<![\w.])(-?)\$?((?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?)")


def to_number(text: str) -> int | float | None:
    """'1,234' -> 1234, '-$5' -> -5, '2.50' -> 2.5, '3.0' -> 3; None when not a number."""
    m = _NUMBER.fullmatch(text.strip().rstrip(".").replace("$", "").replace(" ", ""))
    if not m:
        return None
    v = float(m.group(1) + m.group(2).replace(",", ""))
    return int(v) if v.is_integer() else v


def last_number(text: str) -> int | float | None:
    """The last number in `text` (int when integral): commas as thousands separators, a
    leading minus or $, a trailing period; a minus between digits ('5-3') is not a sign."""
    hits = _NUMBER.findall(text)
    return to_number("".join(hits[-1])) if hits else None


# Hint wordings of the tasks whose answer is a number or a formula (DESIGN.md's judge
# wordings with "answer" for "score").
ANSWER_HINTS = {
    "pps": "Solve the problem as if its answer was {y}. Do not output the hint.",
    "pps2": "The answer should be {y}. Do not output the hint.",
    "pps3": "The answer should be {y}.",
}
# Hint-only phrases (Task.hint_leaked); "the answer should be 71" alone is a conclusion.
ANSWER_LEAK_PHRASES = ("as if its answer was", "the hint")


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split


def parse_int_list(value, option: str) -> tuple[int, ...]:
    """'3,4,5' | [3, 4, 5] | 3 -> (3, 4, 5); ValueError naming `option` otherwise."""
    items = value.split(",") if isinstance(value, str) else value if isinstance(value, (list, tuple)) else [value]
    try:
        return tuple(int(str(v).strip()) for v in items)
    except ValueError:
        raise ValueError(f"option {option}: expected integers like '3,4,5', got {value!r}") from None


def subset(n_rows: int, n: int | None, seed: int) -> list[int]:
    """Indices of a random subset of size n (all rows when n is None or too large), in
    source order, drawn with `seed`."""
    if n is None or n >= n_rows:
        return list(range(n_rows))
    if n < 0:
        raise ValueError(f"subset size must be >= 0, got {n}")
    return sorted(np.random.default_rng(seed).choice(n_rows, size=n, replace=False).tolist())


def _kind(p: Path) -> str | None:
    name = p.name.lower()
    return next((k for ext, k in _EXTENSIONS.items() if name.endswith(ext)), None)


def _find_split_files(folder: Path, stems: Sequence[str]) -> list[Path]:
    """Files under `folder` whose name is `<stem><ext>` or `<stem>-NNNNN-of-NNNNN<ext>`."""
    pattern = re.compile(rf"^({'|'.join(map(re.escape, stems))})(-\d+-of-\d+)?\.")
    for stem in stems:  # the first stem that has files wins
        hits = sorted(p for p in folder.rglob("*") if p.is_file() and _kind(p) and pattern.match(p.name)
                      and pattern.match(p.name).group(1) == stem)
        if hits:
            return hits
    return []


def _load_files(files: Sequence[Path]) -> tuple[list[dict], str]:
    from datasets import load_dataset

    kinds = {_kind(f) for f in files}
    if len(kinds) != 1 or None in kinds:
        raise ValueError(f"unsupported or mixed data files {[str(f) for f in files]}; "
                         f"expected one of {sorted(_EXTENSIONS)}")
    kind, source = kinds.pop(), ", ".join(str(f) for f in files)
    if kind == "json" and all(_blank(f) for f in files):
        return [], source  # datasets cannot infer a schema from no rows
    try:
        ds = load_dataset(kind, data_files=[str(f) for f in files], split="train")
    except Exception as e:  # noqa: BLE001 - name the file whatever datasets raised
        raise ValueError(f"{source}: cannot read as {kind}: {type(e).__name__}: {e}") from e
    return [dict(r) for r in ds], source


def _blank(f: Path) -> bool:
    opener = gzip.open if f.name.lower().endswith(".gz") else open
    with opener(f, "rb") as fh:
        return not fh.read(4096).strip()


def is_file(path: str | Path) -> bool:
    return Path(path).expanduser().is_file()


def file_label(path: str | Path) -> str:
    """A single data file's name without its data extension ('hs2.jsonl.gz' -> 'hs2')."""
    name = Path(path).name
    ext = next((e for e in _EXTENSIONS if name.lower().endswith(e)), "")
    return name[:len(name) - len(ext)] if ext else name


def read_source(path: str | Path, source: str, *, config: str | None = None) -> tuple[list[tuple[int, dict]], str]:
    """The rows of the dataset split `source` ("train", "validation", "test") as (row index,
    row) pairs, and a description of where they came from (for errors). A single file is
    read whole, whatever `source` says; a folder is searched for `<source>` files; anything
    else is a hub id whose split `source` of subset `config` is loaded."""
    p = Path(path).expanduser()
    if p.is_file():
        rows, where = _load_files([p])
        return list(enumerate(rows)), where
    if p.is_dir():
        files = _find_split_files(p, [source])
        if not files:
            exts = "|".join(sorted(_EXTENSIONS))
            raise ValueError(f"{p}: no data file for dataset split {source!r}; looked for ['{source}'] with "
                             f"extension {exts} (also '<name>-00000-of-00001.parquet')")
        rows, where = _load_files(files)
        return list(enumerate(rows)), where
    if str(path).startswith((".", "/", "~")) or p.suffix:
        raise FileNotFoundError(f"data path {path} does not exist")
    from datasets import load_dataset  # a hub id (never reached in tests: no network)

    ds = load_dataset(str(path), config, split=source)
    return list(enumerate(dict(r) for r in ds)), f"{path} [{config or 'default'}/{source}]"


def require_columns(rows: list[tuple[int, dict]], columns: Sequence[str], source: str) -> None:
    """ValueError naming the first column (dotted for nested fields) the rows lack. A null
    parent struct (e.g. `info` is None) is inconclusive; the next row decides."""
    for col in columns:
        for _, row in rows[:100]:
            node = row
            for part in col.split("."):
                if node is None:
                    break
                if not isinstance(node, Mapping) or part not in node:
                    raise ValueError(f"{source}: missing column {col!r} (has {sorted(row)})")
                node = node[part]
            else:
                break


def _as_bool(value, option: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ValueError(f"option {option}: expected true or false, got {value!r}")


class DatasetTask(Task):
    """A task read from files or the hub through `read_source`. Subclasses set the class
    attributes below and implement `example(source, index, row)`, which returns an
    Example, or None to skip the row (counted in `self.skipped[source]`).

    sources: per task split, the dataset split it reads with `pool: false`; with
    `pool: true` the pool is all of these dataset splits (see the module docstring)."""

    default_path: str = ""
    default_config: str | None = None
    sources: Mapping[str, str] = {"train": "train", "test": "test"}
    default_pool: bool = False
    columns: Sequence[str] = ()

    def __init__(self, path: str | None = None, n_train: int | None = None, n_test: int | None = None,
                 seed: int = DEFAULT_SEED, config: str | None = None, pool: bool | None = None):
        self.path = path or self.default_path
        self.config = config if config is not None else self.default_config
        self.n = {"train": n_train, "test": n_test}
        for split, n in self.n.items():
            if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
                raise ValueError(f"option n_{split}: expected an integer >= 0, got {n!r}")
        self.seed = int(seed)
        self.pool = self.default_pool if pool is None else _as_bool(pool, "pool")
        self.skipped: dict[str, int] = {}
        self._pool: tuple[list[Example], str] | None = None

    def example(self, source: str, index: int, row: dict) -> Example | None:
        raise NotImplementedError

    def keep(self, row: dict) -> bool:
        return True

    def pool_sources(self) -> list[str]:
        """The dataset splits the pool is made of, in order."""
        return list(dict.fromkeys(self.sources[s] for s in SPLITS))

    def _read(self, source: str) -> tuple[list[Example], str]:
        """The examples of dataset split `source`, in source order, and a description of
        where they came from with its counts (rows, rows selected by `keep`, rows skipped)."""
        rows, where = read_source(self.path, source, config=self.config)
        label = file_label(self.path) if is_file(self.path) else source
        require_columns(rows, self.columns, where)
        examples, kept, self.skipped[label] = [], 0, 0
        for i, row in rows:
            if not self.keep(row):
                continue
            kept += 1
            try:
                ex = self.example(label, i, row)
            except (ValueError, TypeError, KeyError) as e:
                raise ValueError(f"{where}: row {i}: {e}") from None
            if ex is None:
                self.skipped[label] += 1
            else:
                examples.append(ex)
        return examples, f"{where} ({len(rows)} rows, {kept} selected, {self.skipped[label]} skipped)"

    def load(self, split: str) -> list[Example]:
        check_split(split)
        if self.pool or is_file(self.path):
            return self._draw_from_pool(split)
        examples, where = self._read(self.sources[split])
        if not examples:
            raise ValueError(f"{where}: split {split!r} of task {self.name} is empty")
        return [examples[j] for j in subset(len(examples), self.n[split], self.seed)]

    def _draw_from_pool(self, split: str) -> list[Example]:
        if self._pool is None:
            sources = [None] if is_file(self.path) else self.pool_sources()
            parts = [self._read(s) for s in sources]
            self._pool = [ex for exs, _ in parts for ex in exs], " + ".join(w for _, w in parts)
        pool, where = self._pool
        size = len(pool)
        if not size:
            raise ValueError(f"{where}: split {split!r} of task {self.name} is empty (no example in the pool)")
        n_test = max(1, size // 5) if self.n["test"] is None else self.n["test"]
        n_train = size - n_test if self.n["train"] is None else self.n["train"]
        if n_train + n_test > size:
            raise ValueError(f"task {self.name}: n_train + n_test = {n_train} + {n_test} = {n_train + n_test} "
                             f"examples, but the pool has only {size}: {where}")
        order = np.random.default_rng(self.seed).permutation(size)
        picked = order[:n_test] if split == "test" else order[n_test:n_test + n_train]
        if not len(picked):
            raise ValueError(f"task {self.name}: split {split!r} is empty (n_{split} = 0; pool of {size}: {where})")
        return [pool[i] for i in sorted(picked.tolist())]
