"""Graders for notebook 08 (full fine-tuning vs LoRA vs QLoRA): reading a table of rows."""

import random
from collections.abc import Callable

from course.checks._grader import _Grader, _run
from course.compare import METHODS, cheapest_meeting, memory_ratio


def _random_rows(rng: random.Random) -> list[dict]:
    """Rows like comparison.json's (only the keys the exercises read), in a shuffled order."""
    methods = rng.sample(METHODS, rng.randint(2, len(METHODS)))
    return [
        {
            "method": m,
            "peak_memory_bytes": rng.randint(10**8, 4 * 10**9),
            "exact_match": rng.choice([0.5, 0.8, 0.9, 0.93, 0.95, 0.97, 0.99, 1.0]),
        }
        for m in methods
    ]


def check_memory_ratio(fn: Callable) -> None:
    """fn(rows, method, baseline) -> peak_memory_bytes of method / that of baseline."""
    grader = _Grader("memory_ratio")
    rng = random.Random(8)
    fixed = [
        {"method": "full", "peak_memory_bytes": 3_000, "exact_match": 0.9},
        {"method": "qlora_nf4", "peak_memory_bytes": 600, "exact_match": 0.9},
        {"method": "lora", "peak_memory_bytes": 1_000, "exact_match": 0.9},
    ]
    cases = [(fixed, "qlora_nf4", "lora"), (fixed, "qlora_nf4", "full"), (fixed, "full", "lora")]
    for _ in range(10):
        rows = _random_rows(rng)
        method, baseline = rng.sample([row["method"] for row in rows], 2)
        cases.append((rows, method, baseline))
    for rows, method, baseline in cases:
        call = f"memory_ratio(rows, {method!r}, {baseline!r}) with rows for {[r['method'] for r in rows]}"
        got = _run(grader, fn, ([dict(r) for r in rows], method, baseline), call)
        want = memory_ratio(rows, method, baseline)
        grader.expect(
            isinstance(got, (int, float)) and abs(got - want) < 1e-9 * want,
            f"{call}: expected {want:.4f}, got {got!r}. Hint: find each method's row by its 'method' key "
            "(the rows are not in a fixed order) and divide the method's peak_memory_bytes by the baseline's.",
        )
    grader.passed(len(cases))


def check_cheapest_method(fn: Callable) -> None:
    """fn(rows, min_exact_match) -> the method with the least peak memory among those meeting the bar, or None."""
    grader = _Grader("cheapest_method")
    rng = random.Random(9)
    cases = []
    for _ in range(30):
        rows = _random_rows(rng)
        cases.append((rows, rng.choice([0.8, 0.9, 0.95, 0.97, 0.99, 1.0])))
    # a bar nobody meets, and a bar met exactly (>=, not >)
    cases.append(([{"method": "lora", "peak_memory_bytes": 5, "exact_match": 0.9}], 0.95))
    cases.append(
        (
            [
                {"method": "lora", "peak_memory_bytes": 5, "exact_match": 0.95},
                {"method": "full", "peak_memory_bytes": 9, "exact_match": 0.99},
            ],
            0.95,
        )
    )
    for rows, bar in cases:
        summary = ", ".join(
            f"{r['method']}: {r['peak_memory_bytes']:,} B, {r['exact_match']:.0%}" for r in rows
        )
        call = f"cheapest_method(rows, {bar}) with rows [{summary}]"
        got = _run(grader, fn, ([dict(r) for r in rows], bar), call)
        want = cheapest_meeting(rows, bar)
        grader.expect(
            got == want,
            f"{call}: expected {want!r}, got {got!r}. Hint: keep the rows whose exact_match is at least the "
            "bar (>=), then take the one with the smallest peak_memory_bytes; return None when no row qualifies.",
        )
    grader.passed(len(cases))
