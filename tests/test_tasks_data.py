"""Task data: fixture files in each dataset's real schema and format load through the same
code as hub data; subsets, ids and splits are deterministic and disjoint; bad data or
options stop with an error naming the file, column, metric or option."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pytest

from fixtures_tasks import (GSM8K, HELPSTEER2, MATH, hs2_rows, write_gsm8k, write_helpsteer2, write_math,
                            write_summarize)
from fem_jax.tasks import TASKS, get_task
from fem_jax.tasks.judge import render_conversation

REAL_GSM8K = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gsm8k"


# ---- registry and options


def test_registry_and_unknown_names():
    assert set(TASKS) == {"arithmetic", "gsm8k", "math", "helpsteer2", "summarize_feedback"}
    with pytest.raises(ValueError, match="unknown task 'gsm9k'"):
        get_task("gsm9k")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['n_trian'\]"):
        get_task("arithmetic", n_trian=3)
    with pytest.raises(ValueError, match="unknown metric 'honesty'"):
        get_task("helpsteer2", metric="honesty", path="x")
    with pytest.raises(ValueError, match="unknown metric 'overall'"):  # the axis name is not a metric name
        get_task("summarize_feedback", metric="overall", path="x")


def test_every_task_accepts_the_loops_seed_option():
    for name in TASKS:  # the loop always passes run.seed
        options = {"seed": 521} if name == "arithmetic" else {"seed": 521, "path": "nowhere"}
        assert get_task(name, **options).seed == 521


# ---- arithmetic


def test_arithmetic_is_seeded_disjoint_and_correct():
    t = get_task("arithmetic", n_train=200, n_test=50, seed=257)
    train, test = t.load("train"), t.load("test")
    assert len(train) == 200 and len(test) == 50
    qs = lambda xs: {e.fields["question"] for e in xs}  # noqa: E731
    assert not qs(train) & qs(test) and len(qs(train)) == 200
    for e in train + test:
        nums = [int(x) for x in e.fields["question"].split(" + ")]
        assert 2 <= len(nums) <= 3 and all(1 <= x <= 99 for x in nums) and e.gold == sum(nums)
    again = get_task("arithmetic", n_train=10, n_test=50, seed=257)
    assert again.load("test") == test  # the test set does not depend on n_train
    assert again.load("train") == train[:10]
    assert get_task("arithmetic", n_train=10, n_test=50, seed=521).load("test") != test
    assert [e.id for e in test[:2]] == ["arithmetic/test/0", "arithmetic/test/1"]


def test_arithmetic_knobs_and_errors():
    t = get_task("arithmetic", n_train=30, n_test=5, operands="4", min_value=10, max_value=20, ops="+-")
    for e in t.load("train"):
        toks = e.fields["question"].split()
        assert len(toks) == 7 and all(10 <= int(x) <= 20 for x in toks[::2])
        total = int(toks[0])
        for s, x in zip(toks[1::2], toks[2::2]):
            total += int(x) if s == "+" else -int(x)
        assert e.gold == total
    with pytest.raises(ValueError, match="distinct problems"):
        get_task("arithmetic", n_train=10, n_test=5, operands=2, min_value=1, max_value=2).load("train")
    with pytest.raises(ValueError, match="option ops"):
        get_task("arithmetic", ops="*")
    with pytest.raises(ValueError, match="option operands"):
        get_task("arithmetic", operands="a,b")
    with pytest.raises(ValueError, match="split must be one of"):
        get_task("arithmetic").load("validation")


# ---- helpsteer2


def test_helpsteer2_fixture_loads_with_multi_turn(tmp_path):
    write_helpsteer2(tmp_path)
    t = get_task("helpsteer2", path=str(tmp_path), metric="verbosity", pool=False)  # the dataset's own splits
    train, test = t.load("train"), t.load("test")
    assert len(train) == len(HELPSTEER2["train"]) and len(test) == len(HELPSTEER2["validation"])
    assert [e.gold for e in train] == [r["verbosity"] for r in HELPSTEER2["train"]]
    multi = train[1]
    assert multi.id == "helpsteer2/train/1" and multi.fields["turns"] == 2
    assert "<extra_id_1>" not in multi.fields["instruction"]
    assert multi.fields["instruction"] == ("User: What is a good name for a golden retriever?\n\n"
                                           "Assistant: How about Sunny or Maple?\n\nUser: Something more unusual, please.")
    assert test[1].fields["turns"] == 3
    assert [e.id for e in test] == ["helpsteer2/validation/0", "helpsteer2/validation/1"]  # ids name the source
    assert train[0].fields["instruction"] == "Explain photosynthesis in one sentence."


def test_render_conversation_single_turn_is_unchanged():
    assert render_conversation("  Hello there\n") == ("Hello there", 1)


def test_unpooled_subset_is_seeded_and_ids_follow_source_rows(tmp_path):
    write_helpsteer2(tmp_path)
    pick = lambda seed: [e.id for e in get_task("helpsteer2", path=str(tmp_path), n_train=3, seed=seed,  # noqa: E731
                                                pool=False).load("train")]
    a, b = pick(257), pick(257)
    assert a == b and len(set(a)) == 3
    assert any(pick(s) != a for s in (521, 1031, 7))
    assert all(i.startswith("helpsteer2/train/") and 0 <= int(i.rsplit("/", 1)[1]) < 6 for i in a)


# ---- the pool (Section 4.1: 2,000 train + 2,000 test drawn per run)


def test_judge_tasks_pool_by_default_and_math_tasks_do_not():
    assert get_task("helpsteer2", path="x").pool is True
    assert get_task("summarize_feedback", path="x").pool is True
    assert get_task("gsm8k", path="x").pool is False and get_task("math", path="x").pool is False
    assert get_task("helpsteer2", path="x", pool="false").pool is False  # as --set writes it
    assert get_task("helpsteer2", path="x").pool_sources() == ["train", "validation"]
    assert get_task("summarize_feedback", path="x").pool_sources() == ["validation", "test"]
    with pytest.raises(ValueError, match="option pool: expected true or false, got 'maybe'"):
        get_task("helpsteer2", path="x", pool="maybe")
    with pytest.raises(ValueError, match="option n_train: expected an integer >= 0, got -1"):
        get_task("helpsteer2", path="x", n_train=-1)


@pytest.fixture
def big_hs2(tmp_path):
    """60 train + 40 validation rows: a pool of 100 with distinct prompts."""
    return write_helpsteer2(tmp_path, {"train": hs2_rows(60, "train"), "validation": hs2_rows(40, "validation")})


def _ids(task, split):
    return [e.id for e in task.load(split)]


def test_pool_draws_disjoint_seeded_splits_from_train_and_validation(big_hs2):
    t = get_task("helpsteer2", path=str(big_hs2), n_train=30, n_test=20, seed=257)
    train, test = _ids(t, "train"), _ids(t, "test")
    assert len(train) == 30 and len(test) == 20 and len(set(train)) == 30 and len(set(test)) == 20
    assert not set(train) & set(test)
    # both splits draw from both source splits (a test split from validation alone would fail this)
    for ids in (train, test):
        assert {i.split("/")[1] for i in ids} == {"train", "validation"}, ids
    # the same seed gives the same draw; the paper's other seeds give other ones
    again = get_task("helpsteer2", path=str(big_hs2), n_train=30, n_test=20, seed=257)
    assert (_ids(again, "train"), _ids(again, "test")) == (train, test)
    others = [get_task("helpsteer2", path=str(big_hs2), n_train=30, n_test=20, seed=s) for s in (521, 1031)]
    assert all(set(_ids(o, "test")) != set(test) for o in others)
    assert set(_ids(others[0], "test")) != set(_ids(others[1], "test"))
    # the test set does not depend on n_train, and a larger n_train extends the train set
    more = get_task("helpsteer2", path=str(big_hs2), n_train=80, n_test=20, seed=257)
    assert _ids(more, "test") == test and set(train) < set(_ids(more, "train"))
    # ids name the source split and row, and the examples are those rows
    rows = {"train": hs2_rows(60, "train"), "validation": hs2_rows(40, "validation")}
    for e in t.load("test"):
        _, source, row = e.id.split("/")
        assert e.fields["instruction"] == rows[source][int(row)]["prompt"]
        assert e.gold == rows[source][int(row)]["helpfulness"]
    # every metric draws the same rows for a seed (no row lacks a score here)
    coh = get_task("helpsteer2", path=str(big_hs2), n_train=30, n_test=20, seed=257, metric="coherence")
    assert _ids(coh, "test") == test


def test_pool_defaults_and_size_errors(big_hs2):
    t = get_task("helpsteer2", path=str(big_hs2))  # no sizes: a fifth of the pool for test, the rest for train
    assert len(t.load("test")) == 20 and len(t.load("train")) == 80
    full = get_task("helpsteer2", path=str(big_hs2), n_train=70, n_test=30)
    assert len(full.load("train")) == 70 and len(full.load("test")) == 30  # the whole pool
    with pytest.raises(ValueError, match=r"^task helpsteer2: n_train \+ n_test = 2000 \+ 2000 = 4000 examples, "
                                         r"but the pool has only 100: .*train.jsonl.gz.* \+ .*validation.jsonl.gz"):
        get_task("helpsteer2", path=str(big_hs2), n_train=2000, n_test=2000).load("train")
    with pytest.raises(ValueError, match=r"n_train \+ n_test = 71 \+ 30 = 101 examples, but the pool has only 100"):
        get_task("helpsteer2", path=str(big_hs2), n_train=71, n_test=30).load("test")
    with pytest.raises(ValueError, match=r"split 'test' is empty \(n_test = 0"):
        get_task("helpsteer2", path=str(big_hs2), n_train=10, n_test=0).load("test")
    msg = str(pytest.raises(ValueError, get_task("helpsteer2", path=str(big_hs2), n_train=99, n_test=2).load,
                            "train").value)
    assert "\n" not in msg  # one line


def test_hub_ids_load_each_pooled_split_by_name(monkeypatch):
    """A hub id goes through datasets.load_dataset(id, subset, split=<dataset split>), once
    per split of the pool (stubbed here: no network in tests)."""
    import datasets

    calls = []

    def fake_load_dataset(path, config=None, split=None):
        calls.append((path, config, split))
        return hs2_rows(30, split)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    t = get_task("helpsteer2", n_train=20, n_test=10)  # the default path: the hub id
    test = t.load("test")
    t.load("train")
    assert calls == [("nvidia/HelpSteer2", None, "train"), ("nvidia/HelpSteer2", None, "validation")]  # read once
    assert {e.id.split("/")[1] for e in test} <= {"train", "validation"}
    calls.clear()
    get_task("helpsteer2", pool=False, n_test=5).load("test")  # the old mapping: test -> validation
    assert calls == [("nvidia/HelpSteer2", None, "validation")]


def test_helpsteer2_errors_name_the_problem(tmp_path):
    rows = {"train": [{"prompt": "p", "response": "r", "helpfulness": 3}], "validation": []}
    write_helpsteer2(tmp_path, rows)
    with pytest.raises(ValueError, match=r"train.jsonl.gz.*missing column 'correctness'"):
        get_task("helpsteer2", path=str(tmp_path), metric="correctness").load("train")
    with pytest.raises(ValueError, match=r"validation.jsonl.gz \(0 rows.*: split 'test' of task helpsteer2 is empty"):
        get_task("helpsteer2", path=str(tmp_path), pool=False).load("test")
    (tmp_path / "validation.jsonl.gz").unlink()
    with pytest.raises(ValueError, match=r"no data file for dataset split 'validation'; looked for \['validation'\]"):
        get_task("helpsteer2", path=str(tmp_path)).load("train")  # the pool needs validation too
    write_helpsteer2(tmp_path, {"train": [{"prompt": "p", "response": "r", "helpfulness": 9}]})
    with pytest.raises(ValueError, match=r"row 0: column 'helpfulness': score 9"):
        get_task("helpsteer2", path=str(tmp_path), pool=False).load("train")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        get_task("helpsteer2", path=str(tmp_path / "missing")).load("train")


def test_single_file_serves_both_splits_disjointly(tmp_path):
    f = tmp_path / "hs2.jsonl.gz"
    with gzip.open(f, "wt") as out:
        for i in range(20):
            out.write(json.dumps({"prompt": f"q{i}", "response": "r", "helpfulness": i % 5}) + "\n")
    for pool in (True, False):  # one file is one pool either way
        t = get_task("helpsteer2", path=str(f), n_test=5, pool=pool)
        train, test = t.load("train"), t.load("test")
        assert len(test) == 5 and len(train) == 15
        assert not {e.fields["instruction"] for e in train} & {e.fields["instruction"] for e in test}
        assert all(e.id.startswith("helpsteer2/hs2/") for e in train + test)


# ---- summarize_feedback


def test_summarize_fixture_parquet_with_nested_nulls(tmp_path):
    write_summarize(tmp_path)
    t = get_task("summarize_feedback", path=str(tmp_path), pool=False)  # helpfulness = the overall axis
    train = t.load("train")
    # 5 validation rows: one CNN/DM article (post null) left out, one with overall null skipped
    assert [e.gold for e in train] == [6, 2, 7] and t.skipped["validation"] == 1
    assert [e.id for e in train] == ["summarize_feedback/validation/0", "summarize_feedback/validation/1",
                                     "summarize_feedback/validation/4"]
    instruction = train[2].fields["instruction"]
    assert instruction.startswith("Summarize the following Reddit post.\n\nSUBREDDIT: r/cats\nTITLE: Shy cat\nPOST: ")
    assert train[0].fields["response"].startswith("Roommate keeps")
    acc = get_task("summarize_feedback", path=str(tmp_path), metric="accuracy", pool=False)
    assert [e.gold for e in acc.load("train")] == [7, 3, 6, 7] and acc.skipped["validation"] == 0
    test = acc.load("test")
    assert [e.gold for e in test] == [6] and [e.id for e in test] == ["summarize_feedback/test/0"]


def test_summarize_pool_is_validation_and_test_reddit_posts_only(tmp_path):
    write_summarize(tmp_path)
    t = get_task("summarize_feedback", path=str(tmp_path), metric="accuracy", n_train=3, n_test=2, seed=521)
    train, test = t.load("train"), t.load("test")
    ids = {e.id for e in train + test}
    # 7 rows: 2 CNN/DM articles left out -> a pool of 5 Reddit posts, all of them drawn
    assert len(ids) == 5 and not {e.id for e in train} & {e.id for e in test}
    assert ids == {"summarize_feedback/validation/0", "summarize_feedback/validation/1",
                   "summarize_feedback/validation/3", "summarize_feedback/validation/4", "summarize_feedback/test/0"}
    with pytest.raises(ValueError, match=r"n_train \+ n_test = 4 \+ 2 = 6 examples, but the pool has only 5"):
        get_task("summarize_feedback", path=str(tmp_path), metric="accuracy", n_train=4, n_test=2).load("train")
    ov = get_task("summarize_feedback", path=str(tmp_path), n_train=2, n_test=2)  # overall: one row unrated
    ov.load("train")
    assert ov.skipped == {"validation": 1, "test": 0}


def test_summarize_missing_axis_and_empty_split(tmp_path):
    axes = pa.struct([("overall", pa.int64())])
    schema = pa.schema([("info", pa.struct([("post", pa.string()), ("title", pa.string()),
                                            ("subreddit", pa.string())])),
                        ("summary", pa.struct([("text", pa.string()), ("axes", axes)]))])
    rows = {"validation": [{"info": {"post": "p", "title": "t", "subreddit": "s"},
                            "summary": {"text": "x", "axes": {"overall": 3}}}],
            "test": [{"info": {"post": None, "title": "t", "subreddit": None},
                      "summary": {"text": "x", "axes": {"overall": 3}}}]}
    write_summarize(tmp_path, rows, schema)
    with pytest.raises(ValueError, match=r"validation-00000-of-00001.parquet: missing column 'summary.axes.coverage'"):
        get_task("summarize_feedback", path=str(tmp_path), metric="coverage").load("train")
    with pytest.raises(ValueError, match=r"test-00000-of-00001.parquet \(1 rows, 0 selected, 0 skipped\): "
                                         r"split 'test' of task summarize_feedback is empty"):
        get_task("summarize_feedback", path=str(tmp_path), pool=False).load("test")


# ---- gsm8k and math


def test_gsm8k_fixture_golds(tmp_path):
    write_gsm8k(tmp_path)
    t = get_task("gsm8k", path=str(tmp_path))
    assert [e.gold for e in t.load("train")] == [7, 1500, -3]
    assert [e.gold for e in t.load("test")] == [60]
    assert t.load("test")[0].fields["question"] == GSM8K["test"][0]["question"]
    write_gsm8k(tmp_path, {"train": [{"question": "q", "answer": "no final line"}]})
    with pytest.raises(ValueError, match=r"train.jsonl: row 0: column 'answer' has no '#### N'"):
        t.load("train")


@pytest.mark.skipif(not REAL_GSM8K.exists(), reason="shared GSM8K copy not present")
def test_gsm8k_real_rows_all_parse():
    t = get_task("gsm8k", path=str(REAL_GSM8K), n_test=50, seed=1031)
    test = t.load("test")
    assert len(test) == 50 and all(isinstance(e.gold, int) for e in test)
    train = get_task("gsm8k", path=str(REAL_GSM8K)).load("train")
    assert len(train) == 7473 and train[0].gold == 72  # Natalia's clips


def test_math_fixture_golds_levels_and_skips(tmp_path):
    write_math(tmp_path)
    t = get_task("math", path=str(tmp_path))
    train = t.load("train")
    assert [e.gold for e in train] == ["\\frac{1}{2}", "3", "5\\sqrt{2}", "\\text{(B)}", "\\left(1, {2}\\right)"]
    assert t.skipped["train"] == 1  # the solution without a boxed answer
    assert train[0].fields["level"] == 1 and train[3].fields["level"] is None
    hard = get_task("math", path=str(tmp_path), levels="3,4,5")
    assert [e.fields["level"] for e in hard.load("train")] == [3, 4, 5] and hard.skipped["train"] == 1
    assert [e.gold for e in get_task("math", path=str(tmp_path), levels=[3]).load("test")] == ["\\frac{1}{4}"]
    with pytest.raises(ValueError, match="option levels"):
        get_task("math", levels="three")
    with pytest.raises(ValueError, match="split 'test' of task math is empty"):
        get_task("math", path=str(tmp_path), levels=[5]).load("test")
    assert MATH["train"][0]["level"] == "Level 1"


def test_unreadable_file_is_named(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train-00000-of-00001.parquet").write_bytes(b"not a parquet file")
    with pytest.raises(ValueError, match=r"train-00000-of-00001.parquet: cannot read as parquet"):
        get_task("math", path=str(tmp_path)).load("train")
