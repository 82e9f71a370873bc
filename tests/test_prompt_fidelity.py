"""The rendered judge prompts say what the paper says, word for word.

The paper's texts are copied below as this test's own fixture, from "Learning to Reason in
LLMs by Expectation Maximization" (arXiv:2512.20169): Figure 1 as the PDF's text gives it
(with the figure's line wraps), the system prompt and the nine rubrics of Appendix B, and
the hint variants of Appendix C. They are neither read from the paper's file nor imported
from fem_jax/tasks/prompts/judge.yaml, so a changed or paraphrased prompt fails here.

For each of the 9 metrics, hint-free and with each hint wording (pps, pps2, pps3):
- the system message is Appendix B's system prompt, exactly;
- the user message equals Figure 1, whitespace aside (the figure's wraps are layout; its
  two hyphenated wraps are joined), with only the task's own score-range sentence, the
  "### Hint" section only with a hint (its sentence replaced by Appendix C's for pps2 /
  pps3), and the placeholders filled: the metric's name, its rubric, the instruction, the
  response, the gold score;
- the user message keeps the figure's lines: one per "###" heading and numbered step;
- the rubric section holds the metric's "Score N: ..." lines of Appendix B, one per line.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from fem_jax.tasks import get_task
from fem_jax.tasks.base import Example

# ---- the paper's texts (fixture)

# Section 3, Figure 1 ("Our prompt and its posterior sampling variant"), as printed.
FIGURE_1 = """\
### Task description
An instruction (may include conversation history),
a response to evaluate, and a score rubric are given.
Follow these steps:
1. Evaluate the {judged score} of the response in
   detail strictly based on the score rubric.
2. Predict the score of the response from its evalua-
   tion. The score is an integer between 0 and 4. The
   score is an integer between 1 and 7.
3. The output format should look as follows: "Evalua-
   tion: (detailed evaluation) Score: (predicted score)"
4. Do not generate any opening or closing statements.

### Instruction
{task}

### Response to evaluate
{response}

### Score rubric
{score rubrics}

### Hint
Evaluate the response as if its score was
{conditioning}. Do not output the hint.

### Output
"""
BLUE = "The score is an integer between 0 and 4."  # Figure 1: only in the HelpSteer2 prompt
RED = "The score is an integer between 1 and 7."  # Figure 1: only in the Summarize from Feedback prompt
# Figure 1's cyan text (prompt posterior sampling only), as printed
CYAN = "### Hint\nEvaluate the response as if its score was\n{conditioning}. Do not output the hint."
# Appendix C: "The first is ... (PPS2, STaR2) ... The second is ... (PPS3, STaR3)"
PPS2 = "The score of the response should be {conditioning}. Do not output the hint."
PPS3 = "The score of the response should be {conditioning}."

# Appendix B, "System prompt"
SYSTEM = ("You are a fair judge assistant tasked with providing clear objective feedback based on specific criteria, "
          "ensuring each assessment reflects the absolute standards set for performance.")

# Appendix B, "Score rubrics for HelpSteer2 dataset are:" / "... for Summarize from Feedback dataset are:"
RUBRICS = {
    "helpsteer2": {
        "helpfulness": [
            ('Score 0: The response is not useful or helpful at all. The response completely missed the '
             'essence of what the user wanted.'),
            ('Score 1: The response is borderline unhelpful and mostly does not capture what the user was '
             'looking for, but it is still usable and helpful in a small way.'),
            ('Score 2: The response is partially helpful but misses the overall goal of the user’s '
             'query/input in some way. The response did not fully satisfy what the user was looking for.'),
            ('Score 3: The response is mostly helpful and mainly aligned with what the user was looking for, '
             'but there is still some room for improvement.'),
            ('Score 4: The response is extremely helpful and completely aligned with the spirit of what the '
             'prompt was asking for.'),
        ],
        "correctness": [
            ('Score 0: The response is completely incorrect. All information provided is wrong, false or '
             'hallucinated. If the prompt asks the assistant to do a task, the task is not at all attempted, '
             'or the wrong task was attempted in the response. The response is completely irrelevant to the '
             'prompt.'),
            ('Score 1: The response has some correct elements but is mostly wrong or incomplete. The '
             'response may contain multiple instances of hallucinations, false information, misleading '
             'information, or irrelevant information. If the prompt asks the assistant to do a task, the '
             'task was attempted with a small amount of success.'),
            ('Score 2: The response contains a mix of correct and incorrect information. The response may '
             'miss some details, contain misleading information, or minor hallucinations, but is more or '
             'less aligned with what the prompt asks for. If the prompt asks the assistant to perform a '
             'task, the task is attempted with moderate success but still has clear room for improvement.'),
            ('Score 3: The response is mostly accurate and correct with a small amount of missing '
             'information. It contains no misleading information or hallucinations. If the prompt asks the '
             'assistant to perform a task, the task is mostly successfully attempted.'),
            ('Score 4: The response is completely correct and accurate to what is requested by the prompt '
             'with no necessary details missing and without false, misleading, or hallucinated information. '
             'If the prompt asks the assistant to do a task, the task is completely done and addressed in '
             'the response.'),
        ],
        "coherence": [
            ('Score 0: (Completely Incoherent and/or Unclear) – The response is completely incomprehensible '
             'and no clear meaning or sensible message can be discerned from it.'),
            ('Score 1: (Mostly Incoherent and/or Unclear) – The response is mostly hard to follow, with '
             'inconsistencies, contradictions, confusing logic flow, or unclear language used throughout, '
             'but there are some coherent/clear parts.'),
            ('Score 2: (A Little Unclear and/or Incoherent) – The response is a little unclear. There are '
             'some inconsistencies or contradictions, run on sentences, confusing statements, or hard to '
             'follow sections of the response.'),
            ('Score 3: (Mostly Coherent and Clear) – The response is mostly clear and coherent, but there '
             'may be one or two places where the wording is confusing or the flow of the response is a '
             'little hard to follow. Over all, the response can mostly be followed with a little room for '
             'improvement.'),
            ('Score 4: (Perfectly Coherent and Clear) – The response is perfectly clear and self-consistent '
             'throughout. There are no contradictory assertions or statements, the writing flows logically '
             'and following the train of thought/story is not challenging.'),
        ],
        "complexity": [
            ('Score 0: (Basic) – The response uses very easy to understand language that is clear and '
             'completely interpretable by children, adults, and anyone with a functional command of the '
             'language.'),
            ('Score 1: (Simple) – The response uses relatively straightforward language and wording, but '
             'some schooling through elementary or a middle school in the language might be required to '
             'understand the response.'),
            ('Score 2: (Intermediate) – People who have completed up through a high school education will '
             'probably be able to understand the vocabulary and sentence structure used, but those at the '
             'basic level or children might struggle to understand the response.'),
            ('Score 3: (Advanced) – The response uses a fairly sophisticated vocabulary and terminology. '
             'Someone majoring in this subject at a college or university could have written it and would '
             'understand the response. An average adult who does not work or study in this area could not '
             'have written the response.'),
            ('Score 4: (Expert) – An expert in the field or area could have written the response. It uses '
             'specific and technically relevant vocabulary. Elevated language that someone at the simple or '
             'basic level may not understand at all. The professional language of a lawyer, scientist, '
             'engineer, or doctor falls into this category.'),
        ],
        "verbosity": [
            ('Score 0: (Succinct) – The response is short, to the point, and the most concise it can be. No '
             'additional information is provided outside of what is requested by the prompt (regardless of '
             'if the information or response itself is incorrect, hallucinated, or misleading. A response '
             'that gives an incorrect answer can still be succinct.).'),
            ('Score 1: (Pretty Short) – The response is on the shorter side but could still have words, '
             "details, and/or text removed before it's at a bare minimum of what the response is trying to "
             'convey.'),
            ("Score 2: (Average Length) – The response isn't especially long or short given what the prompt "
             "is asking of the model. The length is adequate for conveying a full response but isn't "
             'particularly wordy nor particularly concise.'),
            ('Score 3: (Moderately Long) – The response is on the longer side but could still have more '
             'added to it before it is considered fully detailed or rambling.'),
            ('Score 4: (Verbose) – The response is particularly lengthy, wordy, and/or extensive with extra '
             'details given what the prompt requested from the assistant model. The response can be verbose '
             'regardless of if the length is due to repetition and incoherency or if it is due to rich and '
             'insightful detail.'),
        ],
    },
    "summarize_feedback": {
        "helpfulness": [
            'Score 1: The response is terrible.',
            ('Score 4: The response is an okay representation of the post, but could be significantly '
             'improved.'),
            'Score 7: The response is an excellent representation of the post.',
        ],
        "accuracy": [
            ('Score 1: The response is completely wrong, made up, or exactly contradicts what is written in '
             'the post.'),
            ('Score 4: The response says at least one substantial thing that is not mentioned in the post, '
             'or that contradicts something in the post.'),
            'Score 7: The response has no incorrect statements or misleading implications.',
        ],
        "coverage": [
            'Score 1: The response contains no information relevant to the post.',
            ('Score 4: The response is missing at least 1 important piece of information required to '
             'understand the situation.'),
            ('Score 7: The response covers all of the important information required to understand the '
             'situation.'),
        ],
        "coherence": [
            'Score 1: The response is impossible to understand.',
            ('Score 4: The response has mistakes or confusing phrasing that make it a bit hard to '
             'understand.'),
            'Score 7: The response is perfectly clear.',
        ],
    },
}

HINTS = {"pps": None, "pps2": PPS2, "pps3": PPS3}  # None: Figure 1's own hint sentence
FAMILY_OF = {"helpsteer2": (BLUE, RED), "summarize_feedback": (RED, BLUE)}  # (own sentence, the other's)
CASES = [(family, metric) for family, rubrics in RUBRICS.items() for metric in rubrics]
INSTRUCTION = "Name a fruit that is yellow.\n\nAnswer in one word."
RESPONSE = "Banana."


def _ws(text: str) -> str:
    return " ".join(text.split())


def expected_user(family: str, metric: str, hint: str | None, gold: int) -> str:
    """Figure 1 as the paper prints it, turned into one task's prompt (whitespace collapsed)."""
    own, other = FAMILY_OF[family]
    text = FIGURE_1.replace("evalua-\n   tion", "evaluation").replace('"Evalua-\n   tion', '"Evaluation')
    text = _ws(text)
    assert _ws(own) in text and _ws(other) in text  # the fixture holds both coloured sentences
    text = text.replace(" " + other, "")
    cyan = _ws(CYAN)
    assert cyan in text
    if hint is None:
        text = text.replace(cyan + " ", "")
    elif HINTS[hint] is not None:
        text = text.replace(cyan, "### Hint " + HINTS[hint])
    for slot, value in (("{judged score}", metric), ("{score rubrics}", "\n".join(RUBRICS[family][metric])),
                        ("{task}", INSTRUCTION), ("{response}", RESPONSE), ("{conditioning}", str(gold))):
        text = text.replace(slot, value)
    return _ws(text)


def _render(family, metric, hint):
    task = get_task(family, metric=metric, path="unused")
    gold = 3 if family == "helpsteer2" else 7
    ex = Example(f"{family}/test/0", gold, {"instruction": INSTRUCTION, "response": RESPONSE})
    return task.messages(ex, hint=hint), gold


@pytest.mark.parametrize("hint", [None, "pps", "pps2", "pps3"])
@pytest.mark.parametrize("family,metric", CASES, ids=[f"{f}-{m}" for f, m in CASES])
def test_rendered_prompt_is_the_papers(family, metric, hint):
    messages, gold = _render(family, metric, hint)
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[0]["content"] == SYSTEM
    user = messages[1]["content"]
    assert _ws(user) == expected_user(family, metric, hint, gold)

    # the figure's line structure: headings and numbered steps each start a line
    headings = re.findall(r"^### .*$", user, re.M)
    assert headings == ["### Task description", "### Instruction", "### Response to evaluate", "### Score rubric",
                        *(["### Hint"] if hint else []), "### Output"]
    assert re.findall(r"^(\d)\. ", user, re.M) == ["1", "2", "3", "4"]
    assert user.endswith("### Output")
    assert f"\n1. Evaluate the {metric} of the response in detail strictly based on the score rubric.\n" in user
    assert FAMILY_OF[family][0] in user and FAMILY_OF[family][1] not in user

    # the rubric section: Appendix B's lines for this metric, one per line, nothing else
    section = user.split("### Score rubric\n", 1)[1].split("\n\n###", 1)[0]
    assert section.splitlines() == RUBRICS[family][metric]

    # the hint, as Figure 1 (pps) or Appendix C (pps2, pps3) words it, with the gold score
    if hint is None:
        assert "### Hint" not in user and "Do not output the hint" not in user
    else:
        sentence = (_ws(CYAN.split("\n", 1)[1]) if HINTS[hint] is None else HINTS[hint]).replace(
            "{conditioning}", str(gold))
        assert f"\n### Hint\n{sentence}\n\n### Output" in user


def test_the_fixture_is_the_paper_as_printed():
    """Guards the fixture itself: the nine rubrics, the figure's placeholders and colours."""
    assert {f: sorted(r) for f, r in RUBRICS.items()} == {
        "helpsteer2": ["coherence", "complexity", "correctness", "helpfulness", "verbosity"],
        "summarize_feedback": ["accuracy", "coherence", "coverage", "helpfulness"]}
    for family, scores in (("helpsteer2", [0, 1, 2, 3, 4]), ("summarize_feedback", [1, 4, 7])):
        for metric, rubric in RUBRICS[family].items():
            assert [int(line.split(":")[0].split()[1]) for line in rubric] == scores, metric
    for slot in ("{judged score}", "{task}", "{response}", "{score rubrics}", "{conditioning}"):
        assert slot in FIGURE_1


def test_every_prompt_text_cites_the_paper():
    data = yaml.safe_load((Path(__file__).resolve().parents[1] / "fem_jax" / "tasks" / "prompts" /
                           "judge.yaml").read_text(encoding="utf-8"))
    entries = [data["system"], data["main"], *data["score_range"].values(), *data["hints"].values(),
               *(e for fam in data["rubrics"].values() for e in fam.values())]
    assert len(entries) == 2 + 2 + 3 + 9
    for e in entries:
        assert re.search(r"(Figure 1|Appendix [BC])", e["source"]), e
