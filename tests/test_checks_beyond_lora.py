"""The notebook-09 graders (course.checks.beyond_lora) pass a correct answer and reject plausible wrong ones."""

import pytest
import torch

from course import checks


def test_group_pool_accepts_the_reference():
    checks.check_group_pool(lambda x, L: x.unflatten(-1, (-1, L)).mean(-1))


@pytest.mark.parametrize(
    ("wrong", "hint"),
    [
        (lambda x, L: x.unflatten(-1, (-1, L)).sum(-1), "sum"),
        (lambda x, L: x.unflatten(-1, (L, -1)).mean(-2), "consecutive"),
        (lambda x, L: x.unflatten(-1, (-1, L)).mean(-2), "shape"),
        (lambda x, L: x.unflatten(-1, (-1, L)).amax(-1), "average over L"),
    ],
)
def test_group_pool_rejects_wrong_answers(wrong, hint):
    with pytest.raises(AssertionError, match=hint):
        checks.check_group_pool(wrong)


def _shift(x, G, first=0, sign=-1, dim=2, all_heads=False):
    h = 0 if all_heads else x.shape[1] // 2
    rolled = x[:, h:].roll(sign * (G // 2), dims=dim)
    return torch.cat([x[:, :h], rolled], 1)


def test_s2_shift_accepts_the_reference():
    checks.check_s2_shift(lambda x, G: _shift(x, G))


@pytest.mark.parametrize(
    ("wrong", "hint"),
    [
        (lambda x, G: _shift(x, G, all_heads=True), "every head"),
        (lambda x, G: _shift(x, G, sign=1), "-G/2"),
        (
            lambda x, G: torch.cat([x[:, : x.shape[1] // 2].roll(-(G // 2), 2), x[:, x.shape[1] // 2 :]], 1),
            "first half",
        ),
        (lambda x, G: _shift(x, G, dim=3), "dim 2"),
        (lambda x, G: x, "keep heads"),
    ],
)
def test_s2_shift_rejects_wrong_answers(wrong, hint):
    with pytest.raises(AssertionError, match=hint):
        checks.check_s2_shift(wrong)
