"""How sure is a measured rate? Intervals for exact match, and when two methods tie.

Exact match on n test examples is a proportion k/n; on 100 examples, 97% and 99% are
both inside each other's noise. Every comparison in the course reports the Wilson score
interval (Wilson 1927), which stays inside [0, 1] and behaves at 0% and 100% where the
textbook p ± z·sqrt(p(1-p)/n) collapses to a zero-width interval. A difference between
two methods is judged by Newcombe's interval for p1 - p2 (Newcombe 1998, method 10,
built from the two Wilson intervals): if it contains 0, the two are a tie.

Worked example: 97 of 100 -> (0.915, 0.990); 99 of 100 -> (0.946, 0.998); the
difference 0.97 - 0.99 has interval (-0.075, 0.029), which holds 0: a tie.
"""

import math
from dataclasses import dataclass
from statistics import NormalDist


def _z(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    return NormalDist().inv_cdf(0.5 + confidence / 2)  # 1.95996 for 0.95


def _check_counts(successes: int, n: int) -> None:
    if (
        isinstance(successes, bool)
        or isinstance(n, bool)
        or not isinstance(successes, int)
        or not isinstance(n, int)
    ):
        raise TypeError(f"successes and n must be integers, got {successes!r} and {n!r}")
    if n <= 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n > 0, got successes={successes}, n={n}")


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a proportion: (low, high), both in [0, 1].

    centre = (k + z²/2) / (n + z²),  half = z / (n + z²) · sqrt(k(n-k)/n + z²/4).
    """
    _check_counts(successes, n)
    z = _z(confidence)
    centre = (successes + z * z / 2) / (n + z * z)
    half = z / (n + z * z) * math.sqrt(successes * (n - successes) / n + z * z / 4)
    return max(0.0, centre - half), min(1.0, centre + half)


def difference_interval(k1: int, n1: int, k2: int, n2: int, confidence: float = 0.95) -> tuple[float, float]:
    """Newcombe's hybrid score interval for p1 - p2 (independent samples)."""
    p1, p2 = k1 / n1 if n1 else 0.0, k2 / n2 if n2 else 0.0
    l1, u1 = wilson_interval(k1, n1, confidence)
    l2, u2 = wilson_interval(k2, n2, confidence)
    d = p1 - p2
    return d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2), d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)


@dataclass(frozen=True)
class Rate:
    """k of n, with its Wilson interval; prints as `97% [92%-99%] (97/100)`."""

    successes: int
    n: int
    confidence: float = 0.95

    def __post_init__(self):
        _check_counts(self.successes, self.n)

    @property
    def value(self) -> float:
        return self.successes / self.n

    @property
    def interval(self) -> tuple[float, float]:
        return wilson_interval(self.successes, self.n, self.confidence)

    def __str__(self) -> str:
        low, high = self.interval
        return f"{self.value:.0%} [{low:.0%}-{high:.0%}] ({self.successes}/{self.n})"


def rate_from(share: float, n: int, confidence: float = 0.95) -> Rate:
    """A Rate from a measured share (e.g. `EvalResult.exact_match`) on n examples."""
    successes = round(share * n)
    if not math.isclose(successes / n, share, abs_tol=1e-9):
        raise ValueError(f"{share!r} is not a whole number of successes out of {n}")
    return Rate(successes, n, confidence)


def tie(a: Rate, b: Rate) -> bool:
    """True when the difference between two rates is within the noise (its interval holds 0)."""
    low, high = difference_interval(a.successes, a.n, b.successes, b.n, min(a.confidence, b.confidence))
    return low <= 0.0 <= high
