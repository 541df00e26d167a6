"""course.stats against the published worked examples (Newcombe 1998, Stat. Med. 17)."""

import pytest

from course.stats import Rate, difference_interval, rate_from, tie, wilson_interval


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
