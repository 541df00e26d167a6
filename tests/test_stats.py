"""course.stats against published worked examples, or against an independent computation where none was found.

Sources: Newcombe 1998a/b (Stat. Med. 17); the published-example tests of the R packages ratesci
(petelaud/ratesci) and contingencytables (ocbe-uio/contingencytables, Fagerland et al.); R's
t.test on Student's sleep data; the NIST/SEMATECH t table. Each test says which.
"""

import math
import statistics

import pytest
import torch

from course.stats import (
    Rate,
    SeedSummary,
    best_of,
    compare_hits,
    compare_losses,
    compare_timings,
    difference_interval,
    mcnemar_exact,
    paired_bootstrap_interval,
    paired_difference_interval,
    paired_t,
    rate_from,
    repeat_timing,
    t_cdf,
    t_quantile,
    tie,
    wilson_interval,
)


def test_wilson_matches_newcombe_example():
    # Newcombe 1998 (single proportion), 81/263: Wilson score interval 0.2553 to 0.3662.
    low, high = wilson_interval(81, 263)
    assert (round(low, 4), round(high, 4)) == (0.2553, 0.3662)


def test_wilson_stays_inside_unit_interval_at_the_edges():
    assert wilson_interval(0, 12)[0] == 0.0 and wilson_interval(0, 12)[1] > 0.2  # 0/12 is not "exactly 0"
    assert wilson_interval(12, 12)[1] == 1.0 and wilson_interval(12, 12)[0] < 0.8


@pytest.mark.parametrize(
    ("counts", "expected"),
    [((56, 70, 48, 80), (0.0524, 0.3339)), ((9, 10, 3, 10), (0.1705, 0.8090))],  # Newcombe 1998, Table II
)
def test_difference_interval_matches_newcombe_method_10(counts, expected):
    low, high = difference_interval(*counts)
    assert (round(low, 4), round(high, 4)) == expected


def test_tie_within_noise_and_not_beyond():
    assert tie(Rate(97, 100), Rate(99, 100))
    assert not tie(Rate(97, 100), Rate(60, 100))


def test_rate_prints_interval_and_counts():
    assert str(Rate(97, 100)) == "97% [92%-99%] (97/100)"
    assert rate_from(0.97, 100) == Rate(97, 100)


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda: wilson_interval(5, 0), ValueError),
        (lambda: wilson_interval(6, 5), ValueError),
        (lambda: wilson_interval(-1, 5), ValueError),
        (lambda: wilson_interval(1.0, 5), TypeError),
        (lambda: wilson_interval(1, 5, confidence=1.5), ValueError),
        (lambda: rate_from(0.333, 10), ValueError),
    ],
)
def test_bad_counts_are_refused(call, error):
    with pytest.raises(error):
        call()


def _table(e, f, g, h):
    """Per-example hits of A and B with e both right, f A only, g B only, h neither."""
    return [1] * e + [1] * f + [0] * g + [0] * h, [1] * e + [0] * f + [1] * g + [0] * h


@pytest.mark.parametrize(
    ("counts", "digits", "expected"),
    [
        # Newcombe 1998b's own example, method 10, as petelaud/ratesci tests/testthat/test3.R checks it
        # ("example from Newcombe ... against Newcombe's method 10 result").
        ((20, 12, 2, 16), 4, (0.0562, 0.3292)),
        # Fagerland et al. 2014 (Bentur et al. 2009 data), "Newcombe's correlation-corrected method 10" (ratesci).
        ((1, 1, 7, 12), 3, (-0.507, -0.026)),
        # Cavo et al. 2012: ocbe-uio/contingencytables tests/testthat/test-ch8.R, "-0.1186 to -0.0046".
        ((59, 6, 16, 80), 4, (-0.1186, -0.0046)),
        # "Tang(ML) RD 2010 example - MOVER-wilson matches" (ratesci test3.R), Newcombe's correction.
        ((8, 3, 1, 2), 4, (-0.1574, 0.4136)),
    ],
)
def test_paired_interval_matches_published_method_10(counts, digits, expected):
    low, high = paired_difference_interval(*counts)
    assert (round(low, digits), round(high, digits)) == expected


def test_paired_interval_reduces_to_unpaired_when_uncorrelated_and_flips_with_the_order():
    # eh - fg = 6 - 2 = n/2: phi = 0, so method 10 is the independent-samples square-and-add.
    assert paired_difference_interval(3, 2, 1, 2) == pytest.approx(difference_interval(5, 8, 4, 8))
    # eh - fg = -100 < 0: negatively correlated, phi < 0, wider than the unpaired interval.
    low, high = paired_difference_interval(5, 10, 10, 0)
    u_low, u_high = difference_interval(15, 25, 15, 25)
    assert low < u_low and high > u_high
    # Swapping A and B (f <-> g) mirrors the published interval: a wrong-direction implementation fails.
    mirrored = paired_difference_interval(20, 2, 12, 16)
    assert (round(mirrored[0], 4), round(mirrored[1], 4)) == (-0.3292, -0.0562)


def test_mcnemar_exact_against_brute_force_and_published():
    # 11 of 16 discordant one way: 2 * sum_{i<=5} C(16, i) / 2^16 = 2 * 6885 / 65536.
    assert mcnemar_exact(11, 5) == mcnemar_exact(5, 11) == 2 * 6885 / 65536
    assert round(mcnemar_exact(11, 5), 4) == 0.2101
    # Cavo et al. 2012 (b, c) = (6, 16): contingencytables test-ch8.R, "exact conditional test: P = 0.052479".
    assert round(mcnemar_exact(6, 16), 6) == 0.052479
    assert mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(3, 3) == 1.0  # min(1, 2 P) caps at 1
    assert mcnemar_exact(6, 0) == 2 / 64  # all six one way


def test_paired_detects_what_the_unpaired_interval_calls_a_tie():
    # Highly correlated hits: B is right only where A is right. Unpaired, 95% vs 88% holds 0 ...
    a, b = _table(88, 7, 0, 5)
    low, high = difference_interval(95, 100, 88, 100)
    assert low < 0 < high and tie(Rate(95, 100), Rate(88, 100))
    # ... paired, the 7 vs 0 discordant examples are a real difference, in the right direction.
    result = compare_hits("A", a, "B", b)
    assert result.called and result.verdict == "A is better than B"
    assert compare_hits("B", b, "A", a).verdict == "B is worse than A"
    assert result.interval[0] > 0 and result.p_value == 2 / 128


def test_a_difference_needs_the_test_and_the_interval():
    # Cavo 2012: the paired interval (-0.1186, -0.0046) excludes 0 but McNemar p = 0.052: a tie.
    a, b = _table(59, 6, 16, 80)
    result = compare_hits("A", a, "B", b)
    assert result.interval[1] < 0 and result.p_value > 0.05
    assert not result.called and result.verdict == "A and B tie"
    assert compare_hits("A", a, "B", b, alpha=0.06).verdict == "A is worse than B"


def test_compare_hits_prints_counts_interval_test_and_verdict():
    lora, qlora = _table(97, 2, 0, 1)
    line = str(compare_hits("lora", torch.tensor(lora), "qlora_nf4", [bool(x) for x in qlora]))
    assert line == (
        "lora 99/100 vs qlora_nf4 97/100: difference +2.0 points [-2.3, +7.3] (paired, Newcombe); "
        "exact McNemar p = 0.500 on 2 vs 0 discordant: lora and qlora_nf4 tie"
    )
    assert str(compare_hits("x", [1, 0], "y", [1, 0])).endswith("x and y tie")  # identical: b + c = 0, p = 1


@pytest.mark.parametrize(
    ("df", "expected"),
    [(1, 12.706), (2, 4.303), (9, 2.262), (10, 2.228), (29, 2.045), (100, 1.984)],  # NIST/SEMATECH t table
)
def test_t_quantile_matches_the_printed_table(df, expected):
    assert round(t_quantile(0.975, df), 3) == expected


def test_t_cdf_matches_closed_forms():
    # df = 1 is the Cauchy distribution, df = 2 has F(t) = 1/2 + t / (2 sqrt(2 + t^2)); large df -> normal.
    for t in (-3.0, -0.5, 0.0, 0.7, 2.0, 10.0):
        assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)
        assert t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)
        assert t_cdf(t, 1e7) == pytest.approx(statistics.NormalDist().cdf(t), abs=1e-6)
    assert t_quantile(0.025, 9) == -t_quantile(0.975, 9)


SLEEP_1 = [0.7, -1.6, -0.2, -1.2, -0.1, 3.4, 3.7, 0.8, 0.0, 2.0]  # Student 1908 (Cushny & Peebles): drug 1
SLEEP_2 = [1.9, 0.8, 1.1, 0.1, -0.1, 4.4, 5.5, 1.6, 4.6, 3.4]  # drug 2, the same ten patients


def test_paired_t_on_students_sleep_data():
    # R: t.test(extra ~ group, data = sleep, paired = TRUE) -> t = -4.0621, df = 9, p-value = 0.002833,
    # 95 percent CI -2.4598858 -0.7001142, mean difference -1.58 (group 1 - group 2).
    result = paired_t([x - y for x, y in zip(SLEEP_1, SLEEP_2, strict=True)])
    assert result.mean == pytest.approx(-1.58)
    assert round(result.t, 4) == -4.0621 and round(result.p_value, 6) == 0.002833
    assert result.interval == pytest.approx((-2.4598858, -0.7001142), abs=1e-7)


def test_paired_bootstrap_matches_exact_enumeration_and_is_seeded():
    # [0, 0, 3]: a resample's mean is the number k of 3s drawn, k ~ Bin(3, 1/3): P(k=3) = 1/27 = 3.7%
    # and P(k=0) = 8/27 = 29.6%, so the exact 2.5%/97.5% points are 0 and 3, the 5%/95% points 0 and 2.
    assert paired_bootstrap_interval([0, 0, 3]) == (0.0, 3.0)
    assert paired_bootstrap_interval([0, 0, 3], confidence=0.90) == (0.0, 2.0)
    d = [x - y for x, y in zip(SLEEP_1, SLEEP_2, strict=True)]
    spread = torch.randn(30, generator=torch.Generator().manual_seed(0)).tolist()
    assert paired_bootstrap_interval(spread, seed=1) == paired_bootstrap_interval(spread, seed=1)
    assert paired_bootstrap_interval(spread, seed=1) != paired_bootstrap_interval(spread, seed=2)
    # No published bootstrap figure for these data: only that it brackets the mean on the negative side,
    # near the t interval (-2.46, -0.70).
    low, high = paired_bootstrap_interval(d)
    assert -2.6 < low < -1.58 < high < -0.6
    assert paired_bootstrap_interval([0.5] * 7) == (0.5, 0.5)


def test_compare_losses_pairing_cancels_the_per_example_spread():
    # Per-example losses vary a lot (hard and easy examples), B is a steady 0.05 worse on every one.
    gen = torch.Generator().manual_seed(0)
    base = (torch.rand(50, generator=gen) * 4).tolist()
    a = base
    b = [x + 0.05 + 0.01 * ((i % 3) - 1) for i, x in enumerate(base)]
    result = compare_losses("A", a, "B", b)
    assert result.verdict == "A is better than B" and result.interval[1] < 0  # lower loss is better
    assert compare_losses("B", b, "A", a).verdict == "B is worse than A"
    # Unpaired (two independent means), the same numbers are nowhere near a difference:
    se = math.sqrt(statistics.variance(a) / 50 + statistics.variance(b) / 50)
    mean = statistics.fmean(a) - statistics.fmean(b)
    assert mean - 1.96 * se < 0 < mean + 1.96 * se
    # Noise alone is a tie.
    noise = [x + (0.3 if i % 2 else -0.3) for i, x in enumerate(base)]
    assert compare_losses("A", a, "C", noise).verdict == "A and C tie"


def test_compare_losses_prints_the_numbers():
    line = str(compare_losses("drug_2", SLEEP_2, "drug_1", SLEEP_1))
    assert line.startswith("drug_2 mean loss 2.33 vs drug_1 0.75 on 10 examples: difference +1.58 [")
    assert line.endswith(
        "(paired bootstrap, 10000 resamples); paired t p = 0.003: drug_2 is worse than drug_1"
    )


def test_best_of_k_compares_the_winner_with_the_runner_up():
    _, weak = _table(80, 10, 0, 10)  # 80/100
    strong, mid = _table(88, 7, 0, 5)  # 95/100 vs 88/100
    result = best_of({"weak": weak, "strong": strong, "mid": mid})
    assert (result.name_a, result.name_b) == ("strong", "mid")
    assert str(result).startswith("best of 3 (vs the runner-up): strong 95/100 vs mid 88/100")
    assert result.verdict == "strong is better than mid"
    losses = best_of({"x": [1.0, 2.0, 3.0], "y": [0.9, 1.9, 2.9], "z": [5.0, 5.0, 5.0]}, losses=True)
    assert (losses.name_a, losses.name_b) == ("y", "x") and "best of 3" in str(losses)
    with pytest.raises(ValueError, match="at least 2 methods"):
        best_of({"only": [1, 0]})


def test_seed_summary_prints_spread_or_one_run():
    summary = SeedSummary([0.68, 0.71, 0.74])
    assert (summary.n, summary.min, summary.max) == (3, 0.68, 0.74)
    assert summary.mean == pytest.approx(0.71) and summary.std == pytest.approx(0.03)
    assert str(summary) == "0.71 ± 0.03 (3 seeds, 0.68-0.74)"
    assert str(SeedSummary([0.71])) == "0.71 (one run)"
    with pytest.raises(ValueError, match="at least one example"):
        SeedSummary([])
    with pytest.raises(ValueError, match="finite numbers"):
        SeedSummary([0.7, float("nan")])


def test_timings_called_only_when_the_iqrs_do_not_overlap():
    fast, slow = [1.00, 1.01, 1.02, 1.03, 1.04], [1.10, 1.11, 1.12, 1.13, 1.14]
    result = compare_timings("fused", fast, "plain", slow)
    assert (result.median_a, result.median_b) == (1.02, 1.12) and result.iqr_a == pytest.approx((1.01, 1.03))
    assert result.verdict == "faster" and str(result).endswith("fused is faster")
    assert compare_timings("plain", slow, "fused", fast).verdict == "slower"
    noisy = [0.90, 1.00, 1.05, 1.15, 1.30]  # its IQR (1.00-1.15) overlaps fast's (1.01-1.03)
    assert compare_timings("fused", fast, "noisy", noisy).verdict == "not measurable on this CPU"


def test_repeat_timing_counts_calls():
    calls = []
    seconds = repeat_timing(lambda: calls.append(1), repeats=4, warmup=2)
    assert len(seconds) == 4 and len(calls) == 6 and all(s >= 0 for s in seconds)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: compare_hits("a", [1, 0, 1], "b", [1, 0]), "same examples in the same order"),
        (lambda: compare_hits("a", [], "b", []), "at least one example"),
        (lambda: compare_hits("a", [1, 2], "b", [1, 0]), "0/1 or bools"),
        (lambda: compare_hits("a", [1, 0.5], "b", [1, 0]), "0/1 or bools"),
        (lambda: compare_hits("a", torch.ones(2, 2), "b", [1, 0]), "1-D"),
        (lambda: compare_hits("a", [1, 0], "b", [1, 0], alpha=5), "alpha"),
        (lambda: compare_losses("a", [1.0, float("nan")], "b", [1.0, 2.0]), "finite numbers"),
        (lambda: compare_losses("a", [1.0], "b", [2.0]), "at least 2 examples"),
        (lambda: paired_bootstrap_interval([1.0, 2.0], resamples=10), "at least 1000 resamples"),
        (lambda: paired_difference_interval(0, 0, 0, 0), "at least one pair"),
        (lambda: mcnemar_exact(-1, 3), "integers >= 0"),
        (lambda: compare_timings("a", [1.0, 1.1], "b", [1.0, 1.1, 1.2]), "at least 3 repeated timings"),
        (lambda: repeat_timing(lambda: None, repeats=0), "repeats >= 1"),
    ],
)
def test_bad_inputs_are_refused_with_what_was_expected(call, message):
    with pytest.raises(ValueError, match=message):
        call()
