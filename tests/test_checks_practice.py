"""Notebook 13's graders pass the reference and reject the stub and plausible wrong answers."""

import pytest

from course import checks
from course.sft import early_stop


def _leaks(train, test):
    seen = {" ".join(p.lower().split()) for p in train}
    return [i for i, p in enumerate(test) if " ".join(p.lower().split()) in seen]


def _leaks_exact(train, test):  # compares raw strings: misses "Lights  off" vs "lights off"
    return [i for i, p in enumerate(test) if p in set(train)]


def _leaks_train_side(train, test):  # reports the train positions instead
    normalized = {" ".join(p.lower().split()) for p in test}
    return [i for i, p in enumerate(train) if " ".join(p.lower().split()) in normalized]


def _leaks_strip_only(train, test):  # case-folds but keeps inner double spaces
    seen = {p.strip().lower() for p in train}
    return [i for i, p in enumerate(test) if p.strip().lower() in seen]


def _stub(*args):
    raise NotImplementedError


def test_find_leaks_grader_passes_reference_and_rejects_wrong_answers():
    checks.check_find_leaks(_leaks)
    for wrong in (_stub, _leaks_exact, _leaks_train_side, _leaks_strip_only):
        with pytest.raises(AssertionError, match="find_leaks"):
            checks.check_find_leaks(wrong)


def _stop_last(losses, patience):  # keeps the last checkpoint, not the best
    best, stop = early_stop(losses, patience)
    return stop, stop


def _stop_off_by_one(losses, patience):  # waits one evaluation too many
    best, waited = 0, 0
    for i in range(1, len(losses)):
        if losses[i] < losses[best]:
            best, waited = i, 0
        else:
            waited += 1
            if waited > patience:
                return best, i
    return best, len(losses) - 1


def _stop_ties_improve(losses, patience):  # counts an equal loss as an improvement
    best, waited = 0, 0
    for i in range(1, len(losses)):
        if losses[i] <= losses[best]:
            best, waited = i, 0
        else:
            waited += 1
            if waited >= patience:
                return best, i
    return best, len(losses) - 1


def _best_of_all(losses, patience):  # looks past the stop at evaluations that never ran
    return min(range(len(losses)), key=losses.__getitem__), early_stop(losses, patience)[1]


def test_early_stop_grader_passes_reference_and_rejects_wrong_answers():
    checks.check_early_stop(early_stop)
    for wrong in (_stub, _stop_last, _stop_off_by_one, _stop_ties_improve, _best_of_all):
        with pytest.raises(AssertionError, match="early_stop"):
            checks.check_early_stop(wrong)


def test_early_stop_worked_example_and_errors():
    assert early_stop([3, 2, 2.5, 1.9, 2.0, 2.1], patience=2) == (3, 5)
    assert early_stop([1.0, 0.95, 0.949], patience=1, min_delta=0.01) == (1, 2)
    with pytest.raises(ValueError, match="patience"):
        early_stop([1.0], patience=0)
    with pytest.raises(ValueError, match="at least one"):
        early_stop([], patience=1)
