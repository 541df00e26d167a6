"""Graders for notebook 13 (from the course to your own task)."""

import random
from collections.abc import Callable

from course.checks._grader import _Grader, _run


def _normalized(prompt: str) -> str:
    return " ".join(prompt.lower().split())  # as course.userdata.prompt_key: case and spacing do not count


def _reference_leaks(train: list[str], test: list[str]) -> list[int]:
    seen = {_normalized(p) for p in train}
    return [i for i, p in enumerate(test) if _normalized(p) in seen]


def check_find_leaks(fn: Callable) -> None:
    """fn(train_prompts, test_prompts) -> sorted indices of the test prompts that also occur in train,
    ignoring case and runs of whitespace ("Lights  OFF" is "lights off")."""
    grader = _Grader("find_leaks")
    rng = random.Random(13)
    words = ["lights", "off", "on", "kitchen", "timer", "5", "min", "heat", "office", "21"]
    cases = [
        (["lights off", "timer 5 min"], ["Lights  off", "heat office 21"]),
        (["a b"], ["a b", "a b", "b a"]),
        (["kitchen on"], ["office on"]),
        (["Timer 5 min "], ["timer 5 min"]),
    ]
    for _ in range(10):
        train = [" ".join(rng.choices(words, k=rng.randint(1, 3))) for _ in range(rng.randint(1, 8))]
        test = [
            rng.choice(train).upper() if rng.random() < 0.4 else " ".join(rng.choices(words, k=2))
            for _ in range(rng.randint(1, 8))
        ]
        cases.append((train, test))
    for train, test in cases:
        call = f"fn({train}, {test})"
        got = _run(grader, fn, (list(train), list(test)), call)
        want = _reference_leaks(train, test)
        grader.expect(
            isinstance(got, list | tuple) and all(isinstance(i, int) for i in got),
            f"{call}: expected a list of test indices (integers), got {got!r}.",
        )
        grader.expect(
            list(got) == want,
            f"{call}: expected {want}, got {list(got)}. Hint: positions in the *test* list, in order, each once; "
            "two prompts are the same question when they differ only in upper/lower case or spacing.",
        )
    grader.passed(len(cases))


def check_early_stop(fn: Callable) -> None:
    """fn(val_losses, patience) -> (best, stop): 0-based indices of the checkpoint to keep and of the
    evaluation after which training stops (patience evaluations in a row without a new best)."""
    from course.sft import early_stop

    grader = _Grader("early_stop")
    rng = random.Random(17)
    cases = [
        ([3.0, 2.0, 2.5, 1.9, 2.0, 2.1], 2),
        ([1.0, 0.9, 0.8, 0.7], 1),
        ([1.0, 1.1, 1.2, 0.5], 2),
        ([1.0, 1.1, 1.2, 0.5], 3),
        ([2.0], 3),
        ([1.0, 1.0, 1.0], 1),
    ]
    for _ in range(12):
        loss, losses = 3.0, []
        for _ in range(rng.randint(2, 12)):
            loss *= rng.uniform(0.8, 1.15)
            losses.append(round(loss, 3))
        cases.append((losses, rng.randint(1, 3)))
    for losses, patience in cases:
        call = f"fn({losses}, patience={patience})"
        got = _run(grader, fn, (list(losses), patience), call)
        want = early_stop(losses, patience)
        grader.expect(
            isinstance(got, tuple) and len(got) == 2 and all(isinstance(i, int) for i in got),
            f"{call}: expected a tuple (best, stop) of two indices, got {got!r}.",
        )
        grader.expect(
            got[1] == want[1],
            f"{call}: training should stop after evaluation {want[1]}, you stop after {got[1]}. Hint: count the "
            "evaluations since the last new best (a tie is no improvement); stop when that count reaches "
            "patience, or at the last evaluation.",
        )
        grader.expect(
            got[0] == want[0],
            f"{call}: keep checkpoint {want[0]}, not {got[0]}. Hint: the best validation loss among the "
            "evaluations that actually ran (none after the stop), not the last one.",
        )
    grader.passed(len(cases))
