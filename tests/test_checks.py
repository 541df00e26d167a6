"""Graders reject plausible wrong answers, not only the stub."""

import pytest

from course import checks, data


def test_exact_match_grader_accepts_the_reference():
    checks.check_exact_match(data.exact_match)


@pytest.mark.parametrize(
    "wrong",
    [
        lambda p, r: sum(a == b for a, b in zip(p, r, strict=True)) / len(r),  # forgets to strip
        lambda p, r: sum(a.strip().lower() == b.strip().lower() for a, b in zip(p, r, strict=True)) / len(r),
        lambda p, r: sum(a.strip() == b.strip() for a, b in zip(p, r, strict=True)),  # a count, not a share
    ],
)
def test_exact_match_grader_rejects_wrong_answers(wrong):
    with pytest.raises(AssertionError, match="exact_match"):
        checks.check_exact_match(wrong)
