"""Graders for notebook 00 (setup)."""

import random
from collections.abc import Callable

from course.checks._grader import _Grader, _run


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


def check_field_accuracy(fn: Callable) -> None:
    """fn(predictions, references) -> {field: share of predictions with that field right}, JSON answers."""
    import json

    from course.data import field_accuracy

    grader = _Grader("field_accuracy")
    rng = random.Random(1)
    ref = {"person": "Ines", "day": "Friday", "time": "20:40", "place": "the clinic"}
    wrong_time = dict(ref, time="08:40")
    no_place = {k: v for k, v in ref.items() if k != "place"}
    cases = [
        ([json.dumps(ref)], [json.dumps(ref)]),
        ([json.dumps(wrong_time), json.dumps(ref)], [json.dumps(ref)] * 2),
        (["Ines: Friday 20:40 at the clinic", json.dumps(ref)], [json.dumps(ref)] * 2),  # not JSON
        ([json.dumps(no_place)], [json.dumps(ref)]),  # a missing field is a wrong field
        (['["Ines", "Friday"]', json.dumps(ref)], [json.dumps(ref)] * 2),  # JSON, but not an object
        ([json.dumps(ref, indent=2)], [json.dumps(ref)]),  # the same object, other whitespace
    ]
    people, days, places = ["Ines", "Noah", "Zara"], ["Monday", "Friday"], ["the gym", "room 204"]
    for _ in range(12):
        refs, preds = [], []
        for _ in range(rng.randint(1, 5)):
            r = {
                "person": rng.choice(people),
                "day": rng.choice(days),
                "time": "14:30",
                "place": rng.choice(places),
            }
            p = {k: (v if rng.random() < 0.7 else rng.choice(people + days + places)) for k, v in r.items()}
            refs.append(json.dumps(r))
            preds.append(rng.choice([json.dumps(p), json.dumps(p)[:-1], "no JSON here", json.dumps(r)]))
        cases.append((preds, refs))
    for preds, refs in cases:
        got = _run(grader, fn, (list(preds), list(refs)), f"fn({preds!r}, {refs!r})")
        want = field_accuracy(preds, refs)
        grader.expect(
            isinstance(got, dict) and set(got) == set(want),
            f"for predictions {preds!r}: expected a dict with the fields {sorted(want)}, got {got!r}.",
        )
        grader.expect(
            all(abs(got[k] - want[k]) < 1e-12 for k in want),
            f"for predictions {preds!r} and references {refs!r}: expected {want}, got {got}. "
            "Hint: every example counts in the denominator, also one whose prediction is not a JSON object; "
            "a field the prediction lacks is wrong; compare parsed values, not text.",
        )
    grader.passed(len(cases))
