"""Final-number extraction from generated math solutions (multiple choice and `judge`: tests/test_suites.py)."""

import pytest

from milora.model.scoring import extract_number


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
