"""DoRA by hand (course.dora) equals peft's use_dora=True, in outputs and gradients, in fp32."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from course.dora import DoRALinear, dora_from_peft


def _peft_dora(bias=True, use_rslora=False, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(48, 24, bias=bias))
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["0"], use_dora=True, use_rslora=use_rslora)
    layer = get_peft_model(copy.deepcopy(model), config).base_model.model[0]
    with torch.no_grad():  # "trained": B != 0 and m moved off ||W0||
        nn.init.normal_(layer.lora_B["default"].weight, std=0.1)
        layer.lora_magnitude_vector["default"].weight.mul_(torch.linspace(0.8, 1.2, 24))
    return layer


def test_dora_starts_equal_to_its_base():
    base = nn.Linear(16, 8)
    x = torch.randn(3, 16)
    torch.testing.assert_close(DoRALinear(base, r=2, alpha=4)(x), base(x), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(("bias", "use_rslora"), [(True, False), (False, False), (True, True)])
def test_dora_equals_peft(bias, use_rslora):
    theirs = _peft_dora(bias, use_rslora)
    ours = dora_from_peft(theirs)
    x = torch.randn(6, 48)
    diff = (ours(x) - theirs(x)).abs().max().item()
    assert diff <= 1e-5, (
        diff
    )  # the bound; measured about 2e-7 (fp32 rounding of two summation orders)
    assert diff > 0 or torch.equal(ours(x), theirs(x))


def test_dora_gradients_equal_peft():
    theirs = _peft_dora()
    ours = dora_from_peft(theirs)
    x = torch.randn(6, 48)
    ours(x).square().sum().backward()
    theirs(x).square().sum().backward()
    pairs = [
        (ours.lora_A.weight, theirs.lora_A["default"].weight),
        (ours.lora_B.weight, theirs.lora_B["default"].weight),
        (ours.magnitude, theirs.lora_magnitude_vector["default"].weight),
    ]
    for a, b in pairs:
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-5)


def test_a_wrong_dora_fails_the_comparison():
    """The check can fail: without the division by ||V|| (plain LoRA scaled by m) the outputs differ."""
    theirs = _peft_dora()
    ours = dora_from_peft(theirs)
    x = torch.randn(6, 48)
    with torch.no_grad():
        wrong = ours.magnitude * (ours.base(x) - ours.base.bias + ours.lora_B(ours.lora_A(x)) * ours.scaling)
        assert (wrong + ours.base.bias - theirs(x)).abs().max() > 1e-2


def test_merged_weight_gives_the_same_outputs():
    layer = dora_from_peft(_peft_dora())
    x = torch.randn(5, 48)
    with torch.no_grad():
        merged = nn.functional.linear(x, layer.merged_weight(), layer.base.bias)
        torch.testing.assert_close(merged, layer(x), atol=1e-5, rtol=1e-5)
