"""Parsers, rewards and hint-leak checks on the shapes of text models really write,
failures included; `math` equivalence through math-verify."""

from __future__ import annotations

import pytest

from fem_jax.tasks import get_task
from fem_jax.tasks.base import Example
from fem_jax.tasks.math import last_boxed

HS2 = get_task("helpsteer2", path="unused")
SF = get_task("summarize_feedback", path="unused")
ARITH = get_task("arithmetic")
GSM = get_task("gsm8k", path="unused")
MATH = get_task("math", path="unused")


@pytest.mark.parametrize("text,want", [
    ("Evaluation: The response is accurate and concise.\nScore: 3", 3),
    ("Evaluation: Clear.\n**Score: 4**", 4),
    ("Evaluation: Clear.\n**Score:** 2", 2),
    # the paper's Figure 3, before and after training (Qwen 3B, correctness)
    ("Evaluation: The response is incorrect because it states that Jay's brother is John, while the instruction "
     "clearly indicates that Bob has two sons named John and Jay. Therefore, Jay's brother cannot be John. The "
     "response does not correctly address the question posed. **Score:** 0", 0),
    ("Evaluation: ... Therefore, the response meets the criteria for a score of 4. **Score:** 4", 4),
    ("**Score**: 1", 1),
    ("Evaluation: Clear.\nScore: **3**", 3),
    ("Evaluation: Clear.\n\n**Score:**\n\n**3**", 3),
    ("evaluation: ok\nscore: 3.", 3),
    ("Evaluation: fine\nSCORE : 1", 1),
    ("Evaluation: fine\nScore: [0]", 0),
    ("Evaluation: fine\nScore: (4)", 4),
    ("Evaluation: fine\nScore = 2", 2),
    ("Evaluation: fine\nscore: 4/4", 4),
    ("Evaluation: fine\nScore: 3 / 4.", 3),
    ("Evaluation: fine\nScore: 4 out of 4.", 4),
    ("Evaluation: fine\nScore: 3.0", 3),
    ("Evaluation: fine\nPredicted score: 2", 2),
    ("Evaluation: fine\nScore: 3 (mostly helpful)", 3),
    ("Evaluation: fine\nScore: 2\n- The response could be longer.", 2),
    ("Evaluation: I first thought Score: 1, but on reflection it is better.\nScore: 3", 3),  # the last one wins
    ("Score: 3\nEvaluation: on reflection, worse.\nScore: 1.", 1),
    ("Score: 4\nEvaluation: wait, the scale is larger.\nScore: 5", None),  # the last one decides, even when bad
    ("Evaluation: wonderful\nScore: 5", None),  # out of 0-4
    ("Evaluation: wonderful\nScore: -1", None),
    ("Evaluation: between two levels\nScore: 2.5", None),
    ("Evaluation: between two levels\nScore: 2-3", None),
    ("Evaluation: between two levels\nScore: 2 or 3", None),
    ("Evaluation: another scale\nScore: 3/5", None),
    ("Evaluation: another scale\nScore: 3 out of 10", None),
    ("Evaluation: The response deserves a 3 out of 4.", None),  # no "Score:" at all
    ("Evaluation: (detailed evaluation) Score: (predicted score)", None),  # the format echoed, no score
    ("Score 3: The response is mostly helpful ...", None),  # a rubric line echoed is not an answer
    ("", None),
])
def test_helpsteer2_parse(text, want):
    assert HS2.parse(text) == want


@pytest.mark.parametrize("text,want", [("Evaluation: good\nScore: 7", 7), ("Evaluation: bad\nScore: 0", None),
                                       ("Evaluation: x\nScore: 1", 1), ("Evaluation: x\nScore: 8", None),
                                       ("Evaluation: x\n**Score:** 5", 5), ("Evaluation: x\nScore: 6/7", 6),
                                       ("Evaluation: x\nScore: 4 out of 4", None)])
def test_summarize_parse_uses_its_range(text, want):
    assert SF.parse(text) == want


def test_judge_reward_is_exact_match():
    assert HS2.reward(3, 3) == 1.0 and HS2.reward(2, 3) == 0.0 and HS2.reward(None, 0) == 0.0


@pytest.mark.parametrize("text,want", [
    ("First, 23 + 7 = 30. Then 30 + 41 = 71.", 71),
    ("The sum is 1,234.", 1234),
    ("Step 1: 5-3 gives 2", 2),
    ("We get x = -5", -5),
    ("So the answer is 71.0", 71),
    ("Half of it: 35.5", None),  # not an integer
    ("I am not sure how to add these numbers.", None),
    ("**Answer: 98**", 98),
])
def test_arithmetic_parse_last_integer(text, want):
    assert ARITH.parse(text) == want


@pytest.mark.parametrize("text,want", [
    ("She reads 12*5 = 60 pages. The answer is \\boxed{60}.", 60),
    ("Total: \\boxed{\\$1{,}500}", 1500),
    ("It costs \\boxed{18 \\text{ dollars}} in all", 18),
    ("12 * 5 = 60\n#### 60", 60),
    ("So the final answer is $1,500. Done", 1500),
    ("so 5 - 8 = -3 degrees", -3),
    ("I cannot solve this.", None),
])
def test_gsm8k_parse(text, want):
    assert GSM.parse(text) == want


def test_gsm8k_reward_numeric():
    assert GSM.reward(GSM.parse("\\boxed{60.00}"), 60) == 1.0 and GSM.reward(59, 60) == 0.0


@pytest.mark.parametrize("text,want", [
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("first \\boxed{1} then \\boxed{\\left(1, {2}\\right)} end", "\\left(1, {2}\\right)"),
    ("$\\boxed 5$", "5"),
    ("\\fbox{x^{2}}", "x^{2}"),
    ("\\boxed{unclosed", None),
    ("no box", None),
])
def test_last_boxed(text, want):
    assert last_boxed(text) == want


@pytest.mark.parametrize("text,want", [
    ("We simplify. The final answer is $\\boxed{\\dfrac{1}{2}}$.", "\\dfrac{1}{2}"),
    ("Thus the answer is $5\\sqrt{2}$.", "5\\sqrt{2}"),
    ("... which gives 42", "42"),
    ("I give up.", None),
])
def test_math_parse(text, want):
    assert MATH.parse(text) == want


@pytest.mark.parametrize("answer,gold,want", [
    ("0.5", "\\frac{1}{2}", 1.0),
    ("\\dfrac12", "\\frac{1}{2}", 1.0),
    ("\\frac{2}{4}", "\\frac{1}{2}", 1.0),
    ("5\\sqrt{2}", "5\\sqrt{2}", 1.0),
    ("\\sqrt{50}", "5\\sqrt{2}", 1.0),
    ("(1,2)", "\\left(1, {2}\\right)", 1.0),
    ("x^2+1", "1+x^2", 1.0),
    ("0.25", "\\frac{1}{2}", 0.0),
    ("(2,1)", "(1,2)", 0.0),
    ("7", "3", 0.0),
    (None, "3", 0.0),
])
def test_math_equivalence(answer, gold, want):
    assert MATH.reward(answer, gold) == want


# ---- hint leaks: the hint itself, never a rationale's own conclusion


@pytest.mark.parametrize("task", [HS2, SF])
@pytest.mark.parametrize("hint,gold", [(None, None), ("pps", 3), ("pps2", 3), ("pps3", 3)])
@pytest.mark.parametrize("text", [
    "Evaluation: Evaluating the response as if its score was 3, I find it helpful.\nScore: 3",
    "Evaluation: As the hint says, this is good.\nScore: 3",
    "Evaluation: The response is clear. Do not output the hint.\nScore: 3",
    "Evaluation: the HINT\nsays 3.",
])
def test_judge_hint_only_phrases_leak_under_every_wording(task, hint, gold, text):
    assert task.hint_leaked(text, hint, gold)


@pytest.mark.parametrize("task", [HS2, SF])
@pytest.mark.parametrize("hint", ["pps2", "pps3"])
@pytest.mark.parametrize("text", [
    "Evaluation: The score of the response should be 3. The response is clear.\nScore: 3",
    "The score of the response should be 3.",
    "The score of the response should be 3",  # the end of the text ends the sentence
    "Evaluation: the score of   the\nresponse should be 3.\nScore: 3",  # case and whitespace do not hide it
    "Evaluation: The score of the response should be **3**.\nScore: 3",
    "Hint: The score of the response should be 3.\nEvaluation: good.\nScore: 3",
    "Evaluation: good.\n- The score of the response should be 3\nScore: 3",
])
def test_judge_hint_sentence_with_the_gold_leaks(task, hint, text):
    assert task.hint_leaked(text, hint, 3)
    assert task.hint_leaked(text, hint)  # gold unknown: any value
    assert not task.hint_leaked(text, hint, 2)  # not the hint that was given
    assert not task.hint_leaked(text, "pps", 3)  # the pps hint never said this
    assert not task.hint_leaked(text)  # the old call checks the hint-only phrases only


@pytest.mark.parametrize("task", [HS2, SF])
@pytest.mark.parametrize("hint", [None, "pps", "pps2", "pps3"])
@pytest.mark.parametrize("text", [
    "Evaluation: The response is clear and accurate.\nScore: 3",
    "Evaluation: The response is clear. Therefore, the score should be 3.\nScore: 3",
    "Evaluation: The score of the response should be 3 because it is mostly helpful.\nScore: 3",
    "Evaluation: So the score of the response should be 3.\nScore: 3",
    "Evaluation: I think the score of the response should be 3, as it is mostly helpful.\nScore: 3",
    "Evaluation: The score of the response should be 3.5 at most.\nScore: 3",
    "Evaluation: The response gives hints about the answer but evaluates as if it was a score of 3.\nScore: 3",
])
def test_judge_conclusions_are_not_leaks(task, hint, text):
    assert not task.hint_leaked(text, hint, None if hint is None else 3)


@pytest.mark.parametrize("task", [ARITH, GSM])
def test_answer_hint_leaks(task):
    for hint in (None, "pps", "pps2", "pps3"):
        gold = None if hint is None else 71
        assert task.hint_leaked("Solving it as if its answer was 71, 23 + 48 = 71.", hint, gold)
        assert task.hint_leaked("Using the hint, 71.", hint, gold)
        assert task.hint_leaked("23 + 48 = 71. Do not output the hint.", hint, gold)
        assert not task.hint_leaked("23 + 48 = 71. The answer is 71.", hint, gold)
        assert not task.hint_leaked("23 + 48 = 71, so the answer should be 71.", hint, gold)
        assert not task.hint_leaked("The answer should be 71, since 23 + 48 = 71.", hint, gold)
    for hint in ("pps2", "pps3"):
        assert task.hint_leaked("The answer should be 71. Let me check: 23 + 48 = 71.", hint, 71)
        assert task.hint_leaked("The answer should be 71. Let me check: 23 + 48 = 71.", hint)
        assert not task.hint_leaked("The answer should be 71. Let me check: 23 + 48 = 71.", hint, 70)
        assert not task.hint_leaked("The answer should be 71. Let me check: 23 + 48 = 71.")


def test_math_hint_sentence_carries_its_latex_gold():
    assert MATH.hint_text("pps3", "\\frac{1}{2}") == "The answer should be $\\frac{1}{2}$."
    assert MATH.hint_leaked("The answer should be $\\frac{1}{2}$.\nSo x = 1/2.", "pps3", "\\frac{1}{2}")
    assert not MATH.hint_leaked("The answer should be $\\frac{1}{3}$.\nSo x = 1/3.", "pps3", "\\frac{1}{2}")
    assert not MATH.hint_leaked("Thus the answer should be $\\frac{1}{2}$.", "pps3", "\\frac{1}{2}")


def test_unknown_hint_wording_is_named():
    with pytest.raises(ValueError, match="unknown hint wording 'pps4'"):
        HS2.hint_leaked("text", "pps4", 3)


def test_hinted_messages_carry_the_gold_and_hint_free_do_not():
    ex = Example("helpsteer2/train/0", 3, {"instruction": "Say hi.", "response": "Hi!"})
    free = HS2.messages(ex)[1]["content"]
    assert "### Hint" not in free and "3." not in free.split("### Score rubric")[0].split("### Instruction")[1]
    for scheme, sentence in (("pps", "Evaluate the response as if its score was 3. Do not output the hint."),
                             ("pps2", "The score of the response should be 3. Do not output the hint."),
                             ("pps3", "The score of the response should be 3.")):
        hinted = HS2.messages(ex, hint=scheme)[1]["content"]
        assert sentence in hinted and sentence not in free
        # the hint section, before "### Output", is the only difference
        assert hinted.replace("### Hint\n" + sentence + "\n\n", "") == free
        assert hinted.endswith(f"### Hint\n{sentence}\n\n### Output")
        assert HS2.messages(ex, hint=scheme)[0] == HS2.messages(ex)[0]  # the system prompt never changes
    with pytest.raises(ValueError, match="unknown hint wording 'pps4'"):
        HS2.messages(ex, hint="pps4")
    a = Example("arithmetic/test/0", 71, {"question": "23 + 48"})
    assert "71" in ARITH.messages(a, "pps3")[0]["content"] and "71" not in ARITH.messages(a)[0]["content"]


def test_placeholders_inside_the_data_are_not_filled():
    ex = Example("helpsteer2/train/0", 3, {"instruction": "Print '{response}' and {conditioning}.",
                                           "response": "{task} {score rubrics}"})
    user = HS2.messages(ex, hint="pps")[1]["content"]
    assert "### Instruction\nPrint '{response}' and {conditioning}.\n" in user
    assert "### Response to evaluate\n{task} {score rubrics}\n" in user
