"""The notebook 06 graders pass a correct answer and reject plausible wrong ones."""

import math

import pytest
import torch

from course import checks
from course.optim import Adam8bit, optimizer_state_bytes


def reference_state_bytes(optimizer, numel):
    if optimizer == "adam" or (optimizer == "adam8bit" and numel < 4096):
        return 8 * numel
    if optimizer == "adam8bit":
        return 2 * numel + 8 * math.ceil(numel / 256)
    return 4 * numel


def test_state_bytes_accepts_the_reference():
    checks.check_state_bytes(reference_state_bytes)


@pytest.mark.parametrize("numel", [100, 4096, 9216, 5000])
def test_state_bytes_reference_agrees_with_real_optimizers(numel):
    """The grader's arithmetic is what the optimizers allocate (minus the shared codes and step counter)."""
    p = torch.nn.Parameter(torch.randn(numel))
    p.grad = torch.randn(numel)
    for name, opt, extra in [
        ("adam", torch.optim.AdamW([p], lr=1e-3), 4),  # torch keeps the step count in a fp32 tensor
        ("adam8bit", Adam8bit([p], lr=1e-3), 0 if numel < 4096 else 2 * 256 * 4),  # the two codes
        ("sgd_momentum", torch.optim.SGD([p], lr=1e-3, momentum=0.9), 0),
    ]:
        opt.step()
        assert optimizer_state_bytes(opt) == reference_state_bytes(name, numel) + extra


@pytest.mark.parametrize(
    "wrong",
    [
        lambda opt, n: {"adam": 8 * n, "adam8bit": 2 * n, "sgd_momentum": 4 * n}[opt],  # forgets absmax
        lambda opt, n: {"adam": 8 * n, "adam8bit": 2 * n + 8 * (n // 256), "sgd_momentum": 4 * n}[
            opt
        ],  # floor
        lambda opt, n: {"adam": 8 * n, "adam8bit": 2 * n + 8 * math.ceil(n / 256), "sgd_momentum": 4 * n}[
            opt
        ],
        lambda opt, n: reference_state_bytes(opt, n) if opt != "sgd_momentum" else 0,  # plain SGD
    ],
)
def test_state_bytes_rejects_wrong_answers(wrong):
    with pytest.raises(AssertionError, match="state_bytes"):
        checks.check_state_bytes(wrong)


def reference_block(block, code):
    absmax = block.abs().max()
    return (block / absmax).unsqueeze(1).sub(code).abs().argmin(dim=1), absmax


def test_quantize_state_block_accepts_the_reference():
    checks.check_quantize_state_block(reference_block)


@pytest.mark.parametrize(
    "wrong",
    [
        lambda block, code: ((block / block.max()).unsqueeze(1).sub(code).abs().argmin(dim=1), block.max()),
        lambda block, code: (
            (block / block.abs().max() * 127).round().long() + 127,
            block.abs().max(),
        ),  # linear
        lambda block, code: reference_block(block, torch.linspace(-1, 1, 256)),  # ignores the dynamic map
    ],
)
def test_quantize_state_block_rejects_wrong_answers(wrong):
    with pytest.raises(AssertionError, match="quantize_state_block"):
        checks.check_quantize_state_block(wrong)


def test_stubs_fail_with_a_reminder():
    def stub(*args):
        raise NotImplementedError("Your turn")

    for grader in (checks.check_state_bytes, checks.check_quantize_state_block):
        with pytest.raises(AssertionError, match="not implemented yet"):
            grader(stub)
