"""DoRA by hand (course.dora) equals peft's use_dora=True: outputs and gradients in fp32, outputs
within peft's own rounding in fp16/bf16, merged weights bit for bit in all three."""

import copy
import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from course.dora import DoRALinear, dora_from_peft


def _peft_dora(bias=True, use_rslora=False, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(48, 24, bias=bias)).to(dtype)
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


DTYPES = [torch.float32, torch.float16, torch.bfloat16]  # torch 2.13 runs fp16 and bf16 matmuls on CPU


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_dora_in_half_precision_is_within_peft_rounding(dtype, bias):
    """Ours rounds once; peft rounds the base output twice more. The difference is bounded elementwise.

    peft reuses the base layer's output base = round(W0 x + b) (error <= u |base|, u = eps/2),
    subtracts the bias in the base dtype (error <= u |base - b|), scales by s = m / ||V|| and
    rounds the sum (<= u |peft|); ours computes the same y in fp32 and rounds it once (<= u |ours|).
    So |ours - peft| <= u (|s| |base| + |s - 1| |base - b| + |ours| + |peft|), plus the spacing
    of subnormals near zero. Measured over 60 random layers per dtype, with and without bias:
    at most 0.96 of this bound; without the |s - 1| |base - b| term it was exceeded 2x.
    """
    theirs = _peft_dora(bias, dtype=dtype)
    ours = dora_from_peft(theirs)
    assert ours.lora_A.weight.dtype == ours.magnitude.dtype == torch.float32  # the adapter stays fp32
    x = torch.randn(64, 48).to(dtype)
    with torch.no_grad():
        mine, peft = ours(x), theirs(x)
        base = theirs.base_layer(x).float()
        s = ours.magnitude / ours.weight_norm()  # (out,)
    assert mine.dtype == peft.dtype == dtype
    mine, peft = mine.float(), peft.float()
    without_bias = base - theirs.base_layer.bias.float() if bias else base
    info = torch.finfo(dtype)
    u = info.eps / 2
    bound = u * (s.abs() * base.abs() + (s - 1).abs() * without_bias.abs() + mine.abs() + peft.abs())
    bound = bound + 2 * info.smallest_normal * info.eps  # subnormals: a fixed spacing, not relative
    assert ((mine - peft).abs() <= bound).all()
    assert (mine != peft).any()  # they do round differently: the bound is what makes them "equal"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_merged_weight_equals_peft_merge_bit_for_bit(dtype):
    theirs = _peft_dora(dtype=dtype)
    ours = dora_from_peft(theirs)
    merged = ours.merged_weight()
    peft_merged = copy.deepcopy(theirs)
    peft_merged.merge()  # W0 <- (m / ||V||) * V in fp32, rounded once to W0's dtype
    assert merged.dtype == dtype
    assert torch.equal(merged, peft_merged.base_layer.weight)


@pytest.mark.parametrize(
    ("part", "value"),
    [("magnitude", math.nan), ("lora_B", math.inf), ("magnitude", 1e6)],
    ids=["nan_magnitude", "inf_B", "fp16_overflow"],
)
def test_a_non_finite_merge_is_refused_and_changes_nothing(part, value):
    ours = dora_from_peft(_peft_dora(dtype=torch.float16))
    with torch.no_grad():
        target = ours.magnitude if part == "magnitude" else ours.lora_B.weight
        target.view(-1)[0] = value  # 1e6 is finite in fp32 but W' overflows fp16's 65,504
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    with pytest.raises(ValueError, match="NaN or inf"):
        ours.merged_weight()
    after = ours.state_dict()
    assert all(torch.equal(before[k].nan_to_num(), after[k].nan_to_num()) for k in before)


def test_a_zero_row_of_v_is_refused_at_merge():
    """m / ||V|| is 0 / 0 for a row of W0 that is zero while B = 0: the merged row would be NaN."""
    base = nn.Linear(16, 8)
    with torch.no_grad():
        base.weight[2] = 0
    with pytest.raises(ValueError, match="a row of V is zero"):
        DoRALinear(base, r=2, alpha=4).merged_weight()


def test_dora_on_top_of_another_adapter_says_what_it_found():
    """Not "wraps an nn.Linear, got LoRALinear": the layer is adapted already, and merging it is the way out."""
    from course.ia3 import IA3Linear
    from course.lora import LoRALinear
    from course.qalora import QALoRALinear

    for adapted in (
        LoRALinear(nn.Linear(16, 8), r=2, alpha=4),
        IA3Linear(nn.Linear(16, 8), feedforward=True),
        QALoRALinear(nn.Linear(16, 8), r=2, alpha=4, group_size=8),
    ):
        name = type(adapted).__name__
        with pytest.raises(ValueError, match=f"already holds an adapter \\({name}.*merge that adapter first"):
            DoRALinear(adapted, r=2, alpha=4)


def test_dora_twice_says_so():
    layer = DoRALinear(nn.Linear(16, 8), r=2, alpha=4)
    with pytest.raises(ValueError, match="already has a DoRA adapter"):
        DoRALinear(layer, r=2, alpha=4)
    with pytest.raises(ValueError, match="finite"):
        DoRALinear(nn.Linear(16, 8), r=2, alpha=math.inf)
