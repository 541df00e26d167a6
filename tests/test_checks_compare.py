"""The notebook-08 graders pass a correct answer and reject the stub and plausible wrong ones."""

import pytest

from course import checks
from course.stats import difference_interval, rate_from, tie, wilson_interval


def _needed(pct1, pct2):
    for n in range(100, 100_001, 100):
        low, high = difference_interval(pct1 * n // 100, n, pct2 * n // 100, n)
        if not low <= 0.0 <= high:
            return n
    return None


def _needed_by_overlap(pct1, pct2):  # stricter: waits until the two Wilson intervals no longer overlap
    for n in range(100, 100_001, 100):
        a, b = wilson_interval(pct1 * n // 100, n), wilson_interval(pct2 * n // 100, n)
        if a[1] < b[0] or b[1] < a[0]:
            return n
    return None


def test_examples_needed_accepts_the_reference():
    checks.check_examples_needed(_needed)


@pytest.mark.parametrize(
    "wrong",
    [
        _needed_by_overlap,
        lambda p1, p2: (_needed(p1, p2) or 100) - 100 or None,  # the last n that still ties
        lambda p1, p2: _needed(p1, p2) or 100_000,  # equal rates "separate" at the end of the range
    ],
)
def test_examples_needed_rejects_wrong_answers(wrong):
    with pytest.raises(AssertionError, match="examples_needed"):
        checks.check_examples_needed(wrong)


def _best(rows, n, max_memory_bytes):
    fitting = [r for r in rows if r["peak_memory_bytes"] <= max_memory_bytes]
    if not fitting:
        return set()
    best = rate_from(max(r["exact_match"] for r in fitting), n)
    return {r["method"] for r in fitting if tie(rate_from(r["exact_match"], n), best)}


def test_best_within_memory_accepts_the_reference():
    checks.check_best_within_memory(_best)


@pytest.mark.parametrize(
    "wrong",
    [
        # the single best, no ties
        lambda rows, n, m: (
            {max((r for r in rows if r["peak_memory_bytes"] <= m), key=lambda r: r["exact_match"])["method"]}
            if any(r["peak_memory_bytes"] <= m for r in rows)
            else set()
        ),
        lambda rows, n, m: _best(rows, n, 10**12),  # ignores the memory budget
        # ties only on exactly equal scores
        lambda rows, n, m: {
            r["method"]
            for r in rows
            if r["peak_memory_bytes"] <= m
            and r["exact_match"] == max(x["exact_match"] for x in rows if x["peak_memory_bytes"] <= m)
        },
    ],
)
def test_best_within_memory_rejects_wrong_answers(wrong):
    with pytest.raises(AssertionError, match="best_within_memory"):
        checks.check_best_within_memory(wrong)


def test_stubs_fail_with_a_reminder():
    def stub(*args):
        raise NotImplementedError("Your turn")

    for grader in (checks.check_examples_needed, checks.check_best_within_memory):
        with pytest.raises(AssertionError, match="not implemented yet"):
            grader(stub)
