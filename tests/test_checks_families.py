"""The notebook-11 graders pass the reference and reject plausible wrong answers; the count matches the module."""

import pytest
import torch

import course
from course import checks
from course.checks.families import prefix_parameter_count
from course.prefix_tuning import PrefixTuning


def _count(n, layers, heads, kv_heads, head_dim, projection, hidden):
    kv = kv_heads * head_dim
    out = layers * 2 * kv
    return n * out if not projection else n * kv + kv * hidden + hidden + hidden * out + out


@pytest.mark.parametrize("projection", [False, True])
def test_reference_count_equals_the_module(projection):
    model = course.models.tiny_model()  # 2 layers, 4 heads, 2 KV heads of 16
    prefix = PrefixTuning(model, 10, prefix_projection=projection, encoder_hidden_size=32)
    trainable = sum(p.numel() for p in prefix.parameters() if p.requires_grad)
    assert trainable == prefix_parameter_count(10, 2, 4, 2, 16, projection, 32)


def test_prefix_count_accepts_the_reference():
    checks.check_prefix_parameter_count(_count)


@pytest.mark.parametrize(
    ("wrong", "hint"),
    [
        (lambda n, L, h, kv, d, p, hid: _count(n, L, h, h, d, p, hid), "query heads"),
        (
            lambda n, L, h, kv, d, p, hid: _count(n, L, h, kv, d, p, hid) - (0 if p else n * L * kv * d),
            "factor 2",
        ),
        (
            lambda n, L, h, kv, d, p, hid: (
                _count(n, L, h, kv, d, p, hid) - (hid + L * 2 * kv * d if p else 0)
            ),
            "bias",
        ),
        (lambda n, L, h, kv, d, p, hid: n * L * 2 * kv * d, "small embedding plus the MLP"),
        (lambda n, L, h, kv, d, p, hid: n * L * h * d, "one virtual token holds"),
    ],
)
def test_prefix_count_rejects_wrong_answers(wrong, hint):
    with pytest.raises(AssertionError, match=hint):
        checks.check_prefix_parameter_count(wrong)


def test_ia3_merge_accepts_the_reference():
    checks.check_ia3_merge(lambda w, s, ff: w * s[None, :] if ff else w * s[:, None])


@pytest.mark.parametrize(
    ("wrong", "hint"),
    [
        (lambda w, s, ff: w * s[:, None] if ff else w * s[None, :], "wrong axis"),
        (lambda w, s, ff: w / s[None, :] if ff else w / s[:, None], "unmerging"),
        (lambda w, s, ff: w + s[None, :] if ff else w + s[:, None], "do not add"),
        (lambda w, s, ff: w * s.mean(), "W \\* l\\[None, :\\]"),
        (lambda w, s, ff: (w * s[None, :] if ff else w * s[:, None]).T, "wrong values"),
    ],
)
def test_ia3_merge_rejects_wrong_answers(wrong, hint):
    with pytest.raises(AssertionError, match=hint):
        checks.check_ia3_merge(wrong)


def test_graders_fail_the_stub():
    def stub(*args):
        raise NotImplementedError

    for grader in (checks.check_prefix_parameter_count, checks.check_ia3_merge):
        with pytest.raises(AssertionError, match="not implemented yet"):
            grader(stub)
    assert torch.is_tensor(torch.ones(1))
