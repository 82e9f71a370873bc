"""Golden renderings of the prompts: one example per task and metric, hint-free and with
each hint wording, compared with the files under tests/golden/. A prompt change then
shows as a diff in review.

To regenerate after an intended change:  FEM_JAX_UPDATE_GOLDEN=1 pytest tests/test_tasks_golden.py
(and read the diff before committing it)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fixtures_tasks import write_gsm8k, write_helpsteer2, write_math, write_summarize
from fem_jax.tasks import get_task
from fem_jax.tasks.judge import HelpSteer2, SummarizeFeedback

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("FEM_JAX_UPDATE_GOLDEN") == "1"

# judge tasks read the fixture's own splits (pool=False) so that each case is a known row
CASES = ([("arithmetic", {}, "test", 0, "arithmetic"), ("gsm8k", {}, "test", 0, "gsm8k"),
          ("math", {}, "train", 0, "math"), ("helpsteer2", {"metric": "helpfulness", "pool": False}, "train", 1,
                                             "helpsteer2_multiturn")]
         + [("helpsteer2", {"metric": m, "pool": False}, "train", 0, f"helpsteer2_{m}") for m in HelpSteer2.metrics]
         + [("summarize_feedback", {"metric": m, "pool": False}, "train", 0, f"summarize_feedback_{m}")
            for m in SummarizeFeedback.metrics])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("task_data")
    return {"gsm8k": write_gsm8k(root / "gsm8k"), "math": write_math(root / "math"),
            "helpsteer2": write_helpsteer2(root / "hs2"), "summarize_feedback": write_summarize(root / "sf")}


def render(task, example) -> str:
    out = [f"# task={task.name} id={example.id} gold={example.gold}"]
    for hint in (None, *task.hint_schemes):
        out.append(f"==== hint={hint} ====")
        out += [f"[{m['role']}]\n{m['content']}" for m in task.messages(example, hint=hint)]
    return "\n".join(out) + "\n"


@pytest.mark.parametrize("name,options,split,index,golden", CASES, ids=[c[-1] for c in CASES])
def test_prompt_matches_golden(data, name, options, split, index, golden):
    if name in data:
        options = {**options, "path": str(data[name])}
    task = get_task(name, n_test=4, **options)
    text = render(task, task.load(split)[index])
    path = GOLDEN / f"{golden}.txt"
    if UPDATE:
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"{path} missing: run with FEM_JAX_UPDATE_GOLDEN=1 to create it"
    assert text == path.read_text(), f"prompt of {golden} changed; diff against {path} (FEM_JAX_UPDATE_GOLDEN=1 updates)"


def test_every_golden_file_is_checked():
    assert {p.stem for p in GOLDEN.glob("*.txt")} == {c[-1] for c in CASES}
