"""Graders for notebook 00 (setup)."""

import random
from collections.abc import Callable

from course.checks._grader import _Grader


def check_exact_match(fn: Callable) -> None:
    """fn(predictions, references) -> share of predictions equal to their reference, outer whitespace ignored."""
    from course.data import exact_match

    grader = _Grader("exact_match")
    rng = random.Random(0)
    words = ["team: billing", '{"day": "Monday"}', "yes", "no", "Yes"]
    cases = [(["a", "b"], ["a", "c"]), ([" yes\n"], ["yes"]), (["Yes"], ["yes"])]
    for _ in range(20):
        n = rng.randint(1, 6)
        refs = [rng.choice(words) for _ in range(n)]
        preds = [rng.choice([r, " " + r + "\n", rng.choice(words)]) for r in refs]
        cases.append((preds, refs))
    for preds, refs in cases:
        got = grader.call(fn, list(preds), list(refs))
        want = exact_match(preds, refs)
        grader.expect(
            isinstance(got, (int, float)) and abs(got - want) < 1e-12,
            f"for predictions {preds!r} and references {refs!r} expected {want}, got {got!r}. "
            "Hint: strip outer whitespace, compare exactly (case matters), return a share in [0, 1].",
        )
    grader.passed(len(cases))
