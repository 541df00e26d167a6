"""Graders for notebook 08 (full fine-tuning vs LoRA vs QLoRA): reading measurements with their noise."""

import random
from collections.abc import Callable

from course.checks._grader import _Grader, _run
from course.compare import METHODS

MAX_EXAMPLES = 100_000


def _examples_needed(pct1: int, pct2: int) -> int | None:
    """The reference: the fewest test examples, in hundreds, at which pct1% vs pct2% is no longer a tie."""
    from course.stats import difference_interval

    for n in range(100, MAX_EXAMPLES + 1, 100):
        low, high = difference_interval(pct1 * n // 100, n, pct2 * n // 100, n)
        if not low <= 0.0 <= high:
            return n
    return None


def check_examples_needed(fn: Callable) -> None:
    """fn(pct1, pct2) -> smallest n in 100, 200, ... (<= 100,000) where the 95% interval of the difference excludes 0."""
    grader = _Grader("examples_needed")
    cases = [
        (97, 99),
        (99, 97),
        (94, 99),
        (90, 99),
        (50, 60),
        (80, 85),
        (97, 98),
        (0, 5),
        (100, 96),
        (70, 70),
    ]
    for pct1, pct2 in cases:
        got = _run(grader, fn, (pct1, pct2), f"fn({pct1}, {pct2})")
        want = _examples_needed(pct1, pct2)
        grader.expect(
            got == want,
            f"fn({pct1}, {pct2}): expected {want!r}, got {got!r}. Hint: for each n = 100, 200, ... the two "
            "methods score pct1 * n / 100 and pct2 * n / 100 of n examples; course.stats has the 95% interval "
            "of the difference of two rates. Two non-overlapping Wilson intervals is a stricter test than "
            "the one asked for. Equal rates never separate: None.",
        )
    grader.passed(len(cases))


def _best_within_memory(rows: list[dict], n: int, max_memory_bytes: int) -> set[str]:
    """The reference: the best exact match that fits the memory, and every fitting method that ties with it."""
    from course.stats import rate_from, tie

    fitting = [row for row in rows if row["peak_memory_bytes"] <= max_memory_bytes]
    if not fitting:
        return set()
    best = max(fitting, key=lambda row: row["exact_match"])
    best_rate = rate_from(best["exact_match"], n)
    return {row["method"] for row in fitting if tie(rate_from(row["exact_match"], n), best_rate)}


def _random_rows(rng: random.Random, n: int) -> list[dict]:
    methods = rng.sample(METHODS, rng.randint(2, len(METHODS)))
    return [
        {
            "method": m,
            "peak_memory_bytes": rng.randint(10**8, 4 * 10**9),
            "exact_match": rng.randint(0, n) / n,
        }
        for m in methods
    ]


def check_best_within_memory(fn: Callable) -> None:
    """fn(rows, n, max_memory_bytes) -> set of methods: the best exact match that fits, with its ties."""
    grader = _Grader("best_within_memory")
    rng = random.Random(8)
    fixed = [
        {"method": "full", "peak_memory_bytes": 3_000, "exact_match": 0.97},
        {"method": "lora", "peak_memory_bytes": 1_000, "exact_match": 0.99},
        {"method": "qlora_nf4", "peak_memory_bytes": 600, "exact_match": 0.97},
        {"method": "qlora_fp4", "peak_memory_bytes": 590, "exact_match": 0.80},
    ]
    cases = [(fixed, 100, 10_000), (fixed, 100, 700), (fixed, 100, 100), (fixed, 1000, 10_000)]
    for _ in range(12):
        n = rng.choice([20, 100, 1000])
        rows = _random_rows(rng, n)
        cases.append((rows, n, rng.choice([10**8, 10**9, 2 * 10**9, 5 * 10**9])))
    for rows, n, budget in cases:
        summary = ", ".join(
            f"{r['method']} {r['exact_match']:.0%} {r['peak_memory_bytes']:,} B" for r in rows
        )
        call = f"fn([{summary}], n={n}, max_memory_bytes={budget:,})"
        got = _run(grader, fn, ([dict(r) for r in rows], n, budget), call)
        want = _best_within_memory(rows, n, budget)
        grader.expect(
            isinstance(got, (set, frozenset, list, tuple)) and set(got) == want,
            f"{call}: expected {sorted(want)}, got {got!r}. Hint: first keep the methods that fit the memory; "
            "the best of them is not alone if another one's exact match is within the noise of it on n "
            "examples (course.stats can tell a tie). Nothing fits: an empty set.",
        )
    grader.passed(len(cases))
