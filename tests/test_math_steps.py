"""Tests for math_steps.py, the MATH step splitter (docs/paper.md §2.2): the verified example, hand-worked cases of
each rule, and the MATH gold solutions, whose steps concatenate back to the text. tests/test_vine.py checks that
vine.split_steps uses it and that steps concatenate back for any text."""

import pytest

import math_steps
import reward
import vine


def test_math_verified_example():
    text = "\nWe have $x+2=5$, so $x=3$. Then $y = 2x = 6$.\nTherefore, the answer is $\\boxed{6}$.\n"
    assert math_steps.split_math(text) == [
        "\nWe have $x+2=5$, so $x=3$.",
        " Then $y = 2x = 6$.\nTherefore, the answer is $\\boxed{6}$.\n",
    ]


LONG_SENTENCE = (
    " Since every one of the twelve apples weighs exactly the same amount, and the basket holds forty of them in"
    " total, we find the weight."
)
LONG_FORMULA = "\\[" + " + ".join(f"a_{i}" for i in range(12)) + " = " + " + ".join(f"b_{i}" for i in range(12)) + "\\]"


# Expected steps worked out by hand from docs/paper.md §2.2 (and checked against the official splitter: the same).
@pytest.mark.parametrize(
    "steps",
    [
        # a sentence ends at ". " + capital letter
        ["\nThe first sentence is here.", " The second sentence is here."],
        # abbreviations (one- or two-letter words before the dot) and decimals do not end a sentence
        ["\nDr. Smith bought e.g. Apples at 3.5 dollars each.", " He paid seven dollars for all of them."],
        # inline and display math are never cut, not even at ". " + capital letter inside them
        ["\nWe know $a. B$ holds here.", " So \\[x. Y = 2\\] is also true here."],
        ["\nWe know $$x. Y$$ holds here.", " So \\(a. B\\) is true as well."],
        # a math span that ends with a period inside it ends the step
        ["\nHence we conclude $x = 5.$", " Then clearly the value of y is 6."],
        # every line is a step, but a line shorter than 20 characters joins the next one
        ["\nLine one is long enough.", "\nShort\nAnother line that is long enough."],
        # the 19-character " He paid 7 dollars." joins the previous step: it is the last piece
        ["\nDr. Smith bought e.g. Apples at 3.5 dollars each. He paid 7 dollars."],
        # a sentence over 100 characters is cut at the "," nearest its middle (both halves >= 40 characters)
        [LONG_SENTENCE[:69], LONG_SENTENCE[69:]],
        # newlines inside a display block cut it; a piece that is only "$$" joins the next piece
        ["\nWe compute the sum as follows:", "\n$$\nS = 1 + 2 + 3", "\n= 6", "\n$$\nSo the sum is six in total."],
        # a long formula with no prose punctuation is cut at the "=" nearest its middle (halves >= 20 characters)
        ["\n" + LONG_FORMULA[: LONG_FORMULA.index("=") + 1], LONG_FORMULA[LONG_FORMULA.index("=") + 1 :]],
    ],
)
def test_math_cases(steps):
    assert math_steps.split_math("".join(steps)) == steps


def test_math_gold_solutions(data_dir):
    for problem in reward.load_problems("math", "test", data_dir)[:300]:
        steps = math_steps.split_math(problem["solution"])
        assert "".join(steps) == problem["solution"] and all(steps)


def test_split_steps_uses_it_for_math():
    text = "\nThe first sentence is here. The second sentence is here."
    pieces = math_steps.split_math(text)
    ends = [sum(len(p) for p in pieces[: k + 1]) for k in range(len(pieces))]
    assert len(pieces) == 2 and vine.split_steps(text, "math") == ends
