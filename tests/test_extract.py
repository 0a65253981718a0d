"""Answer extraction for math (final number) and multiple choice (option index)."""

import pytest

from milora.model.scoring import extract_choice, extract_number, gold_choice


@pytest.mark.parametrize(
    "text,expected",
    [
        ("Tom has 3 apples and buys 4 more. 3 + 4 = 7\n#### 7", 7.0),
        ("#### 1,000", 1000.0),
        ("The answer is 1,000.", 1000.0),
        ("It costs $3.50 in total.", 3.5),
        ("The answer is $3.50", 3.5),
        ("The temperature fell to -7 degrees.", -7.0),
        ("The answer is −12", -12.0),
        ("She ate 3/4 of the pie.", 0.75),
        ("The answer is 12 apples, not 14.", 12.0),
        ("First 5 + 6 = 11, then 11 * 2 = 22. #### 22", 22.0),
        ("5 + 6 = 11 and then 22", 22.0),
        ("Result: 2.5", 2.5),
        ("#### 0", 0.0),
        ("1,234,567 people", 1234567.0),
        ("I don't know.", None),
        ("", None),
        ("#### ", None),
    ],
)
def test_extract_number(text, expected):
    assert extract_number(text) == expected


def test_extract_number_ignores_dates_after_the_answer():
    assert extract_number("On 12/25/2020 she had 4 cats. #### 4") == 4.0


@pytest.mark.parametrize(
    "text,n,expected",
    [
        ("the correct answer is option2", 3, 2),
        ("the correct answer is option 3", 3, 3),
        ("The correct answer is answer4", 5, 4),
        ("solution1", 2, 1),
        ("ending3 is right", 4, 3),
        ("true", 2, 1),
        ("the correct answer is false", 2, 2),
        ("the correct answer is option7", 3, None),  # out of range
        ("I am not sure", 4, None),
        ("", 4, None),
        ("option1 seems plausible but the correct answer is option2", 2, 2),
        ("Answer: C", 4, 3),
    ],
)
def test_extract_choice(text, n, expected):
    assert extract_choice(text, n) == expected


def test_gold_choice_labels():
    assert gold_choice("option2") == 2
    assert gold_choice("answer5") == 5
    assert gold_choice("true") == 1
    assert gold_choice("false") == 2
