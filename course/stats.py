"""How sure is a measured rate, and is one method really better than another? The course's one way to compare.

Exact match on n test examples is a proportion k/n; on 100 examples, 97% and 99% are
both inside each other's noise. Every rate in the course reports the Wilson score
interval (Wilson 1927), which stays inside [0, 1] and behaves at 0% and 100% where the
textbook p ± z·sqrt(p(1-p)/n) collapses to a zero-width interval. Two rates measured on
*different* examples are compared by Newcombe's interval for p1 - p2 (Newcombe 1998a,
Stat. Med. 17:873, method 10, built from the two Wilson intervals): if it holds 0, a tie.

Paired beats unpaired. The course scores every method on the *same* examples, in the same
order. An example that is hard for LoRA is mostly hard for QLoRA too, so the two score lists
are positively correlated, and Var(A - B) = Var(A) + Var(B) - 2·Cov(A, B): the unpaired interval
leaves out the covariance and overstates the noise. Take each example's difference instead and
the shared part cancels: for hits only the discordant examples (one method right, the other
wrong) carry information (McNemar 1947), for losses the per-example differences do.
`compare_hits` and `compare_losses` are the one verdict: a difference is called only when a test
(exact McNemar / paired t) gives p < alpha AND the paired interval (Newcombe 1998b, Stat. Med.
17:2635, method 10 / a paired bootstrap) excludes 0. Anything else is a tie, printed as one.
`best_of` says when the winner was picked from k; `SeedSummary` prints mean ± sd over seeds (or
"one run"); `compare_timings` says "faster" only when the timings' IQRs do not overlap.

Worked examples (run as doctests by tests/test_stats.py): 97 of 100 -> (0.915, 0.990);
99 of 100 -> (0.946, 0.998); their difference has interval (-0.075, 0.029), which holds 0.

>>> [round(x, 3) for x in wilson_interval(97, 100) + wilson_interval(99, 100)]
[0.915, 0.99, 0.946, 0.998]
>>> [round(x, 3) for x in difference_interval(97, 100, 99, 100)]
[-0.075, 0.029]

A is right on 95 of 100 examples, B on 88, and B is never right where A is wrong (7 vs 0
discordant). Unpaired, 95% vs 88% is a tie; paired, it is not:

>>> tie(Rate(95, 100), Rate(88, 100))
True
>>> print(compare_hits("A", [1] * 95 + [0] * 5, "B", [1] * 88 + [0] * 12))
A 95/100 vs B 88/100: difference +7.0 points [+1.6, +13.7] (paired, Newcombe); exact McNemar p = 0.016 on 7 vs 0 discordant: A is better than B
"""

import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import NamedTuple

import torch


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


# --- per-example inputs, checked at the door -----------------------------------------------------------


def _values(what: str, values, hits: bool = False) -> list:
    """One number per example (list, tuple or 1-D tensor): 0/1 or bools for hits, finite numbers otherwise."""
    if hasattr(values, "tolist"):  # a torch tensor (or numpy array)
        if getattr(values, "ndim", 1) != 1:
            raise ValueError(f"{what}: expected one value per example (1-D), got shape {tuple(values.shape)}")
        values = values.tolist()
    values = list(values)
    if not values:
        raise ValueError(f"{what}: expected at least one example, got none")
    for i, v in enumerate(values):
        number = isinstance(v, int | float) and (hits or not isinstance(v, bool))
        if not number or not math.isfinite(v) or (hits and v not in (0, 1)):
            expected = "0/1 or bools" if hits else "finite numbers"
            raise ValueError(f"{what} must be {expected}, one per example; got {v!r} at index {i}")
    return [int(v) for v in values] if hits else [float(v) for v in values]


def _paired(name_a: str, values_a, name_b: str, values_b, alpha: float, hits: bool) -> tuple[list, list]:
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), e.g. 0.05; got {alpha!r}")
    kind = "hits" if hits else "losses"
    a, b = _values(f"{kind} of {name_a!r}", values_a, hits), _values(f"{kind} of {name_b!r}", values_b, hits)
    if len(a) != len(b):
        raise ValueError(
            f"a paired comparison needs the same examples in the same order: "
            f"{name_a!r} has {len(a)} {kind}, {name_b!r} has {len(b)}"
        )
    return a, b


# --- hits: exact McNemar test and Newcombe 1998b method 10 ---------------------------------------------


def mcnemar_exact(b: int, c: int) -> float:
    """Exact McNemar test: the two-sided sign test on the b + c discordant pairs.

    b = A right & B wrong, c = A wrong & B right. With no difference each discordant pair goes either
    way with probability 1/2: p = min(1, 2·P(X <= min(b, c))), X ~ Bin(b + c, 1/2); p = 1 if b + c = 0.
    11 vs 5 -> 2·(C(16,0) + ... + C(16,5)) / 2^16 = 2·6885/65536 = 0.2101.
    """
    if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in (b, c)):
        raise ValueError(f"discordant counts must be integers >= 0, got b={b!r}, c={c!r}")
    m = b + c
    return min(1.0, 2 * sum(math.comb(m, i) for i in range(min(b, c) + 1)) / 2**m) if m else 1.0


def paired_difference_interval(
    e: int, f: int, g: int, h: int, confidence: float = 0.95
) -> tuple[float, float]:
    """Newcombe 1998b method 10: interval for p_A - p_B = (f - g)/n when A and B score the same n examples.

    e = both right, f = A only, g = B only, h = neither. Square-and-add from the Wilson intervals of
    the two marginals, as for independent samples, less a term for their correlation phi (taken as 0
    when 0 <= eh - fg <= n/2, reduced by n/2 above). (20, 12, 2, 16) -> 0.2000 in (0.0562, 0.3292).
    """
    n = sum(x for x in (e, f, g, h) if isinstance(x, int))
    for count in (e, f, g, h):
        _check_counts(count, max(n, 1))
    if n == 0:
        raise ValueError("need at least one pair, got e = f = g = h = 0")
    p1, p2 = (e + f) / n, (e + g) / n
    l1, u1 = wilson_interval(e + f, n, confidence)
    l2, u2 = wilson_interval(e + g, n, confidence)
    margins, cross = (e + f) * (g + h) * (e + g) * (f + h), e * h - f * g
    phi = (cross - n / 2 if cross > n / 2 else min(cross, 0)) / math.sqrt(margins) if margins else 0.0
    down = (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2
    up = (p2 - l2) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1) + (u1 - p1) ** 2
    return p1 - p2 - math.sqrt(max(0.0, down)), p1 - p2 + math.sqrt(max(0.0, up))


# --- losses: paired t (t distribution without scipy) and paired bootstrap ------------------------------


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b) from its continued fraction, evaluated by modified Lentz."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast only below this point
        return 1.0 - _betainc(b, a, 1.0 - x)
    log_beta = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)  # log B(a, b)
    log_front = (
        a * math.log(x) + b * math.log1p(-x) - math.log(a) - log_beta
    )  # log(x^a (1-x)^b / (a B(a, b)))
    tiny, f, c, d = 1e-300, 1e-300, 1e-300, 0.0
    for j in range(2000):  # 1/(1 + d1/(1 + d2/(1 + ...))): numerators 1, d1, d2, ...
        m = j // 2
        if j == 0:
            num = 1.0
        elif j % 2:  # d_{2m+1}
            num = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        else:  # d_{2m}
            num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        d = 1.0 / (1.0 + num * d if abs(1.0 + num * d) > tiny else tiny)
        c = 1.0 + num / c if abs(1.0 + num / c) > tiny else tiny
        f *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return math.exp(log_front) * f


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with df degrees of freedom: 1 - I_{df/(df+t²)}(df/2, 1/2)/2 for t >= 0."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df!r}")
    tail = 0.5 * _betainc(df / 2, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(q: float, df: float) -> float:
    """The t with P(T <= t) = q, by bisection on t_cdf (to ~1e-12): t_quantile(0.975, 9) = 2.262."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"q must be in (0, 1), got {q!r}")
    if q < 0.5:
        return -t_quantile(1.0 - q, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < q:
        low, high = high, 2 * high
    while high - low > 1e-12 * high:
        mid = (low + high) / 2
        low, high = (mid, high) if t_cdf(mid, df) < q else (low, mid)
    return (low + high) / 2


class PairedT(NamedTuple):
    """The paired t test on the per-example differences A - B."""

    mean: float  # mean of the per-example differences A - B
    t: float  # mean / (sd / sqrt(n)), df = n - 1
    p_value: float  # two-sided: I_{df/(df+t²)}(df/2, 1/2)
    interval: tuple[float, float]  # mean ± t_{(1+confidence)/2, df} · sd / sqrt(n)


def paired_t(differences, confidence: float = 0.95) -> PairedT:
    """Paired t test and interval on per-example differences (Student 1908)."""
    d = _values("the differences", differences)
    if len(d) < 2:
        raise ValueError(f"a paired t needs at least 2 examples, got {len(d)}")
    n, mean, sd = len(d), statistics.fmean(d), statistics.stdev(d)
    _z(confidence)  # refuses a confidence outside (0, 1)
    if sd == 0.0:  # every example moved by the same amount: nothing left to call noise
        t = math.copysign(math.inf, mean) if mean else 0.0
        return PairedT(mean, t, 0.0 if mean else 1.0, (mean, mean))
    t = mean / (sd / math.sqrt(n))
    half = t_quantile(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)
    return PairedT(mean, t, _betainc((n - 1) / 2, 0.5, (n - 1) / (n - 1 + t * t)), (mean - half, mean + half))


def paired_bootstrap_interval(
    differences, confidence: float = 0.95, resamples: int = 10_000, seed: int = 0
) -> tuple[float, float]:
    """Percentile interval (low, high) of the mean difference over resamplings of the examples.

    Each resample draws n examples with replacement and keeps each example's two scores together
    (that is what makes it paired). Deterministic for a given seed: a seeded CPU torch.Generator.
    """
    d = torch.tensor(_values("the differences", differences), dtype=torch.float64)  # (n,)
    if not isinstance(resamples, int) or resamples < 1000:
        raise ValueError(f"use at least 1000 resamples (default 10000), got {resamples!r}")
    _z(confidence)  # refuses a confidence outside (0, 1)
    alpha = 1.0 - confidence
    generator, n = torch.Generator().manual_seed(seed), len(d)
    chunk, means = max(1, 1_000_000 // n), []  # chunks bound memory at ~1e6 indices
    for start in range(0, resamples, chunk):
        index = torch.randint(n, (min(chunk, resamples - start), n), generator=generator)  # (chunk, n)
        means.append(d[index].mean(dim=1))  # (chunk,)
    low, high = torch.quantile(
        torch.cat(means), torch.tensor([alpha / 2, 1 - alpha / 2], dtype=torch.float64)
    )
    return low.item(), high.item()


# --- the verdict ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairedComparison:
    """A paired comparison of A with B; `str()` is the line a notebook prints, `.verdict` its last words."""

    name_a: str
    name_b: str
    difference: float  # A - B: a rate difference for hits, a mean loss difference for losses
    interval: tuple[float, float]  # the paired interval for `difference`
    p_value: float  # exact McNemar (hits) or paired t (losses)
    alpha: float
    higher_is_better: bool  # True for hits, False for losses
    summary: str  # the numbers, printed before the verdict
    prefix: str = ""  # e.g. "best of 3 (vs the runner-up): "

    @property
    def called(self) -> bool:
        """A difference is called only when the test AND the interval both say it is not 0."""
        return self.p_value < self.alpha and not self.interval[0] <= 0.0 <= self.interval[1]

    @property
    def verdict(self) -> str:
        if not self.called:
            return f"{self.name_a} and {self.name_b} tie"
        better = (self.interval[0] > 0.0) == self.higher_is_better
        return f"{self.name_a} is {'better' if better else 'worse'} than {self.name_b}"

    def __str__(self) -> str:
        return f"{self.prefix}{self.summary}: {self.verdict}"


def _p(p: float) -> str:
    return f"= {p:.3f}" if p >= 0.001 else "< 0.001"


def compare_hits(name_a: str, hits_a, name_b: str, hits_b, alpha: float = 0.05) -> PairedComparison:
    """Per-example hits (0/1 or bools) of A and B on the same examples -> the paired verdict.

    Called only when the exact McNemar p < alpha and Newcombe's paired (1 - alpha) interval excludes 0.
    """
    a, b = _paired(name_a, hits_a, name_b, hits_b, alpha, hits=True)
    n, e = len(a), sum(x & y for x, y in zip(a, b, strict=True))
    f, g = sum(a) - e, sum(b) - e  # A only, B only: the discordant examples
    low, high = paired_difference_interval(e, f, g, n - e - f - g, 1.0 - alpha)
    p = mcnemar_exact(f, g)
    summary = (
        f"{name_a} {sum(a)}/{n} vs {name_b} {sum(b)}/{n}: difference {100 * (f - g) / n:+.1f} points "
        f"[{100 * low:+.1f}, {100 * high:+.1f}] (paired, Newcombe); exact McNemar p {_p(p)} on {f} vs {g} discordant"
    )
    return PairedComparison(name_a, name_b, (f - g) / n, (low, high), p, alpha, True, summary)


def compare_losses(
    name_a: str, losses_a, name_b: str, losses_b, alpha: float = 0.05, resamples: int = 10_000, seed: int = 0
) -> PairedComparison:
    """Per-example losses of A and B on the same examples -> the paired verdict; lower loss is better.

    Called only when the paired t p < alpha and the paired bootstrap (1 - alpha) interval excludes 0.
    """
    a, b = _paired(name_a, losses_a, name_b, losses_b, alpha, hits=False)
    d = [x - y for x, y in zip(a, b, strict=True)]
    t = paired_t(d, 1.0 - alpha)
    low, high = paired_bootstrap_interval(d, 1.0 - alpha, resamples, seed)
    summary = (
        f"{name_a} mean loss {statistics.fmean(a):.4g} vs {name_b} {statistics.fmean(b):.4g} on {len(d)} examples: "
        f"difference {t.mean:+.4g} [{low:+.4g}, {high:+.4g}] (paired bootstrap, {resamples} resamples); "
        f"paired t p {_p(t.p_value)}"
    )
    return PairedComparison(name_a, name_b, t.mean, (low, high), t.p_value, alpha, False, summary)


def best_of(results: Mapping[str, Sequence], losses: bool = False, alpha: float = 0.05) -> PairedComparison:
    """The best of k methods (most hits, or lowest mean loss), compared with the runner-up.

    The best was picked for doing well on these very examples, which favours it; the line says
    "best of k" so that a reader knows, and a tie means the pick is not established.
    """
    if len(results) < 2:
        raise ValueError(f"best_of needs at least 2 methods to compare, got {len(results)}")

    def score(name: str) -> float:  # lower is better; sorted() is stable, so ties keep the dict's order
        if losses:
            return statistics.fmean(_values(f"losses of {name!r}", results[name]))
        return -sum(_values(f"hits of {name!r}", results[name], hits=True))

    best, runner_up = sorted(results, key=score)[:2]
    compare = compare_losses if losses else compare_hits
    result = compare(best, results[best], runner_up, results[runner_up], alpha=alpha)
    return PairedComparison(**{**result.__dict__, "prefix": f"best of {len(results)} (vs the runner-up): "})


# --- seeds and timings ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SeedSummary:
    """One measure over seeds: `0.71 ± 0.03 (3 seeds, 0.68-0.74)` (± the sample sd), or `0.71 (one run)`."""

    values: tuple[float, ...]
    digits: int = 2

    def __post_init__(self):
        object.__setattr__(self, "values", tuple(_values("the seed values", self.values)))

    n = property(lambda self: len(self.values))
    mean = property(lambda self: statistics.fmean(self.values))
    std = property(lambda self: statistics.stdev(self.values) if self.n > 1 else 0.0)
    min = property(lambda self: min(self.values))
    max = property(lambda self: max(self.values))

    def __str__(self) -> str:
        k = self.digits
        if self.n == 1:
            return f"{self.mean:.{k}f} (one run)"
        return f"{self.mean:.{k}f} ± {self.std:.{k}f} ({self.n} seeds, {self.min:.{k}f}-{self.max:.{k}f})"


def repeat_timing(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> list[float]:
    """Seconds per call of fn (time.perf_counter), `repeats` times after `warmup` untimed calls.

    On a GPU, fn must end with torch.cuda.synchronize(), or the clock stops before the work does.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    for _ in range(warmup):
        fn()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return seconds


def _time(s: float) -> str:
    return f"{s * 1e3:.3g} ms" if s < 1 else f"{s:.3g} s"


@dataclass(frozen=True)
class TimingComparison:
    """Two sets of repeated timings: medians, IQRs and `.verdict` for A against B."""

    name_a: str
    name_b: str
    median_a: float
    median_b: float
    iqr_a: tuple[float, float]  # (first quartile, third quartile) of A's seconds
    iqr_b: tuple[float, float]

    @property
    def verdict(self) -> str:
        """A is "faster" or "slower" only when the two IQRs do not overlap; else "not measurable on this CPU"."""
        if self.iqr_a[1] < self.iqr_b[0] or self.iqr_b[1] < self.iqr_a[0]:
            return "faster" if self.iqr_a[1] < self.iqr_b[0] else "slower"
        return "not measurable on this CPU"

    def __str__(self) -> str:
        verdict = self.verdict
        said = verdict if verdict == "not measurable on this CPU" else f"{self.name_a} is {verdict}"
        return (
            f"{self.name_a} {_time(self.median_a)} [{_time(self.iqr_a[0])}-{_time(self.iqr_a[1])}] vs {self.name_b} "
            f"{_time(self.median_b)} [{_time(self.iqr_b[0])}-{_time(self.iqr_b[1])}] (median [IQR]): {said}"
        )


def compare_timings(name_a: str, seconds_a, name_b: str, seconds_b) -> TimingComparison:
    """Medians and interquartile ranges of two sets of repeated timings (seconds), and a verdict.

    A conservative rule: "faster"/"slower" only when the IQRs do not overlap. A small real speed-up
    on a noisy machine is reported as "not measurable on this CPU" rather than guessed at.
    """
    quartiles = []
    for name, seconds in ((name_a, seconds_a), (name_b, seconds_b)):
        s = _values(f"timings of {name!r}", seconds)
        if len(s) < 3 or min(s) < 0:
            raise ValueError(f"{name!r}: need at least 3 repeated timings in seconds (>= 0), got {s}")
        quartiles.append(statistics.quantiles(s, n=4, method="inclusive"))  # [q1, median, q3]
    (a1, a_median, a3), (b1, b_median, b3) = quartiles
    return TimingComparison(name_a, name_b, a_median, b_median, (a1, a3), (b1, b3))
