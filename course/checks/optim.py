"""Graders for notebook 06 (8-bit and paged optimizers)."""

import math
import random
from collections.abc import Callable

from course.checks._grader import _Grader, _run

OPTIMIZERS = ("adam", "adam8bit", "sgd_momentum")


def _state_bytes(optimizer: str, numel: int) -> int:
    """The reference: bytes of optimizer state for one tensor of `numel` elements (codes not counted)."""
    from course.optim import BLOCKSIZE, MIN_8BIT_SIZE

    if optimizer == "adam" or (optimizer == "adam8bit" and numel < MIN_8BIT_SIZE):
        return 8 * numel  # m and v in fp32
    if optimizer == "adam8bit":
        return 2 * numel + 2 * 4 * math.ceil(
            numel / BLOCKSIZE
        )  # m, v in uint8 + one fp32 absmax per block each
    return 4 * numel  # one fp32 momentum buffer


def check_state_bytes(fn: Callable) -> None:
    """fn(optimizer, numel) -> bytes of state for one tensor; optimizer in "adam", "adam8bit", "sgd_momentum"."""
    grader = _Grader("state_bytes")
    rng = random.Random(6)
    sizes = [1, 255, 4095, 4096, 4097, 9216, 2**20, 576 * 1536] + [rng.randint(1, 10**7) for _ in range(4)]
    cases = [(opt, n) for opt in OPTIMIZERS for n in sizes]
    for optimizer, numel in cases:
        got = _run(grader, fn, (optimizer, numel), f"fn({optimizer!r}, {numel:,})")
        want = _state_bytes(optimizer, numel)
        hints = {
            "adam": "two fp32 moments, m and v: 4 + 4 bytes per element.",
            "adam8bit": "m and v in one byte each, plus one fp32 absmax per block of 256 for each "
            "(a short last block still needs its absmax: ceil). Tensors under 4,096 elements keep fp32 states.",
            "sgd_momentum": "one fp32 momentum buffer per element.",
        }
        grader.expect(
            isinstance(got, (int, float)) and abs(got - want) < 0.5,
            f"fn({optimizer!r}, {numel:,}): expected {want:,} bytes, got {got!r}. Hint: {hints[optimizer]}",
        )
    grader.passed(len(cases))


def _pages_to_evict(
    budget: int, resident: int, activations: int, n_pages: int, page_bytes: int
) -> int | None:
    """The reference: fewest whole state pages to evict so that a step's activations fit, None if impossible."""
    overflow = resident + n_pages * page_bytes + activations - budget
    if overflow <= 0:
        return 0
    pages = math.ceil(overflow / page_bytes)
    return pages if pages <= n_pages else None


def check_pages_to_evict(fn: Callable) -> None:
    """fn(budget, resident, activations, n_pages, page_bytes) -> pages to move to the host, or None."""
    grader = _Grader("pages_to_evict")
    rng = random.Random(6)
    page = 2 * 2**20
    cases = [
        (100 * page, 50 * page, 10 * page, 40, page),  # fits exactly: nothing moves
        (100 * page, 50 * page, 10 * page + 1, 40, page),  # one byte over: a whole page
        (100 * page, 50 * page, 50 * page, 40, page),  # all 40 pages must go
        (100 * page, 50 * page, 50 * page + 1, 40, page),  # more than the whole state: impossible
        (100 * page, 99 * page, 2 * page, 3, page),  # activations alone exceed the free memory
    ]
    for _ in range(10):
        page_bytes = rng.choice([4096, 2**20, 2 * 2**20])
        n_pages = rng.randint(1, 500)
        resident = rng.randint(0, 10**9)
        budget = resident + n_pages * page_bytes + rng.randint(-n_pages * page_bytes, 10**8)
        cases.append((budget, resident, rng.randint(0, 2 * n_pages * page_bytes), n_pages, page_bytes))
    for budget, resident, activations, n_pages, page_bytes in cases:
        call = f"fn(budget={budget:,}, resident={resident:,}, activations={activations:,}, n_pages={n_pages}, page_bytes={page_bytes:,})"
        got = _run(grader, fn, (budget, resident, activations, n_pages, page_bytes), call)
        want = _pages_to_evict(budget, resident, activations, n_pages, page_bytes)
        grader.expect(
            (got is None and want is None)
            or (want is not None and got == want and not isinstance(got, bool)),
            f"{call}: expected {want!r}, got {got!r}. Hint: everything on the device (resident, the pages, the "
            "activations) must fit in the budget; evicting a page frees page_bytes, and only whole pages move. "
            "If even an empty state leaves too little room, no paging helps.",
        )
    grader.passed(len(cases))
