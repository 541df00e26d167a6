"""The notebook-08 graders pass a correct answer and reject plausible wrong ones."""

import pytest

from course import checks


def _ratio(rows, method, baseline):
    by = {row["method"]: row["peak_memory_bytes"] for row in rows}
    return by[method] / by[baseline]


def _cheapest(rows, bar):
    good = [row for row in rows if row["exact_match"] >= bar]
    return min(good, key=lambda row: row["peak_memory_bytes"])["method"] if good else None


def test_memory_ratio_accepts_the_reference():
    checks.check_memory_ratio(_ratio)


@pytest.mark.parametrize(
    "wrong",
    [
        lambda rows, m, b: _ratio(rows, b, m),  # upside down
        lambda rows, m, b: rows[0]["peak_memory_bytes"] / rows[1]["peak_memory_bytes"],  # by position
        lambda rows, m, b: round(_ratio(rows, m, b), 2),  # rounded
    ],
)
def test_memory_ratio_rejects_wrong_answers(wrong):
    with pytest.raises(AssertionError, match="memory_ratio"):
        checks.check_memory_ratio(wrong)


def test_cheapest_method_accepts_the_reference():
    checks.check_cheapest_method(_cheapest)


@pytest.mark.parametrize(
    "wrong",
    [
        lambda rows, bar: min(rows, key=lambda r: r["peak_memory_bytes"])["method"],  # ignores the bar
        lambda rows, bar: _cheapest([r for r in rows if r["exact_match"] > bar] or [], -1),  # > instead of >=
        lambda rows, bar: max(rows, key=lambda r: r["exact_match"])["method"],  # the best, not the cheapest
        lambda rows, bar: _cheapest(rows, bar) or "lora",  # never None
    ],
)
def test_cheapest_method_rejects_wrong_answers(wrong):
    with pytest.raises(AssertionError, match="cheapest_method"):
        checks.check_cheapest_method(wrong)


def test_stubs_say_not_implemented():
    def stub(*args):
        raise NotImplementedError

    for grader in (checks.check_memory_ratio, checks.check_cheapest_method):
        with pytest.raises(AssertionError, match="not implemented yet"):
            grader(stub)
