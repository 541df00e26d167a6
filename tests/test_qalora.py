"""QA-LoRA's exact INT4 merge (course.qalora), the contrast with a plain LoRA merge, and its errors."""

import pytest
import torch
from torch import nn

import course
from course.qalora import (
    GroupQuantLinear,
    QALoRALinear,
    add_qalora,
    group_pool,
    merge_qalora,
    quantize_groupwise,
)


def test_quantize_groupwise_worked_example():
    codes, scales, zeros = quantize_groupwise(torch.tensor([[-1.0, 0.0, 0.5, 2.0]]), group_size=4, bits=2)
    assert codes.tolist() == [[0, 1, 2, 3]]
    assert scales.tolist() == [[1.0]] and zeros.tolist() == [[-1.0]]


def test_group_quant_error_is_at_most_half_a_step():
    weight = torch.randn(12, 64)
    layer = GroupQuantLinear(*quantize_groupwise(weight, 16, 4))
    assert layer.codes.dtype == torch.uint8 and int(layer.codes.max()) <= 15
    error = (layer.dequantize() - weight).abs().view(12, 4, 16)  # (out, G, L)
    assert (error <= layer.scales[..., None] / 2 + 1e-6).all()


def _trained_qalora(dtype, group_size=8, r=3):
    torch.manual_seed(0)
    layer = QALoRALinear(nn.Linear(32, 10, dtype=dtype), r=r, alpha=6, group_size=group_size)
    nn.init.normal_(layer.lora_B.weight)  # "trained": B != 0
    return layer


def test_qalora_starts_equal_to_its_quantized_base():
    layer = QALoRALinear(nn.Linear(32, 10), r=2, alpha=4, group_size=8)
    x = torch.randn(5, 32)
    assert torch.equal(layer(x), layer.base(x))
    assert layer.lora_A.weight.shape == (2, 4)  # (r, in / L): the pooled input


def test_qalora_merge_keeps_codes_and_scales_and_is_exact_in_float64():
    layer = _trained_qalora(torch.float64)
    merged = layer.merge()
    assert isinstance(merged, GroupQuantLinear)
    assert torch.equal(merged.codes, layer.base.codes) and torch.equal(merged.scales, layer.base.scales)
    assert not torch.equal(merged.zeros, layer.base.zeros)  # only the zero-points move
    x = torch.randn(7, 32, dtype=torch.float64)
    # float64 rounding of sums of 32 products of O(1) numbers: ~1e-15; 1e-12 leaves room, 1e-6 would not
    torch.testing.assert_close(merged(x), layer(x), atol=1e-12, rtol=0)


def test_qalora_merge_in_float32_within_stated_tolerance():
    layer = _trained_qalora(torch.float32)
    x = torch.randn(7, 32)
    torch.testing.assert_close(layer.merge()(x), layer(x), atol=1e-5, rtol=1e-5)


def test_plain_lora_merged_into_the_int4_grid_leaves_it():
    """The contrast: an unpooled update differs within a group, so no zero-point shift can hold it."""
    base = GroupQuantLinear.from_linear(nn.Linear(32, 10), group_size=8)
    lora = course.lora.LoRALinear(base, r=3, alpha=6)
    nn.init.normal_(lora.lora_B.weight)
    merged = (base.dequantize() + lora.delta_weight()).view(10, 4, 8)  # (out, G, L)
    distinct = max(len(merged[o, g].unique()) for o in range(10) for g in range(4))
    assert distinct == 8  # every entry of a group differs: not 16 levels on a shared scale and zero
    requantized = GroupQuantLinear(*quantize_groupwise(merged.view(10, 32), 8))
    assert (requantized.dequantize() - merged.view(10, 32)).abs().max() > 1e-3  # re-quantizing loses it


def test_group_pool_averages_consecutive_features():
    assert group_pool(torch.tensor([1.0, 3.0, 2.0, 6.0]), 2).tolist() == [2.0, 4.0]


@pytest.mark.parametrize("group_size", [5, 0, 33, 64])
def test_group_size_must_divide_in_features(group_size):
    with pytest.raises(ValueError, match="group_size must divide in_features = 32"):
        QALoRALinear(nn.Linear(32, 10), r=2, alpha=4, group_size=group_size)


def test_qalora_rank_is_bounded_by_the_number_of_groups():
    with pytest.raises(ValueError, match=r"1\.\.4"):
        QALoRALinear(nn.Linear(32, 10), r=5, alpha=4, group_size=8)


def test_add_and_merge_qalora_on_a_tiny_model():
    model = course.models.tiny_model()
    names = add_qalora(model, ["q_proj", "v_proj"], r=2, alpha=4, group_size=16)
    assert len(names) == 4
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    for m in model.modules():
        if isinstance(m, QALoRALinear):
            nn.init.normal_(m.lora_B.weight, std=0.1)
    ids = torch.randint(0, 1000, (2, 12))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        merge_qalora(model)
        after = model(input_ids=ids).logits
    assert not any(isinstance(m, QALoRALinear) for m in model.modules())
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)


# --- peft's QA-LoRA (use_qalora=True) in fp32, fp16 and bf16 ------------------------------------

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _peft_qalora(dtype):
    """peft's GPTQ QA-LoRA layer around our GroupQuantLinear (it only needs in/out_features and a forward)."""
    import warnings

    from peft import LoraConfig
    from peft.tuners.lora.gptq import GPTQLoraLinear

    torch.manual_seed(0)
    base = GroupQuantLinear.from_linear(nn.Linear(64, 10).to(dtype), group_size=16)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["x"], use_qalora=True, qalora_group_size=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = GPTQLoraLinear(base, "default", config=config, r=2, lora_alpha=4)
    with torch.no_grad():
        nn.init.normal_(theirs.lora_B["default"].weight)  # "trained"
    ours = QALoRALinear(base, r=2, alpha=4, group_size=16)
    with torch.no_grad():
        ours.lora_A.weight.copy_(theirs.lora_A["default"].weight)
        ours.lora_B.weight.copy_(theirs.lora_B["default"].weight)
    # peft pools with mean * (in / L) (`x_pooled * pooled_features`); ours with the mean: same update at
    # scaling * in / L. in / L = 4 is a power of two, so moving the factor changes no rounding.
    ours.scaling = theirs.scaling["default"] * (64 // 16)
    return theirs, ours


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_qalora_equals_peft_use_qalora_bit_for_bit(dtype):
    """Same fp32 adapter, same pooling, the update added to the base output in fp32 and rounded once: tolerance 0."""
    theirs, ours = _peft_qalora(dtype)
    assert ours.lora_A.weight.dtype == theirs.lora_A["default"].weight.dtype == torch.float32
    x = torch.randn(2, 5, 64).to(dtype)
    with torch.no_grad():
        mine, peft = ours(x), theirs(x)
    assert mine.dtype == dtype
    assert torch.equal(mine, peft)
    assert not torch.equal(mine, ours.base(x))  # the adapter does contribute


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_merge_in_half_precision_rounds_the_zero_points_once(dtype):
    layer = QALoRALinear(nn.Linear(32, 10).to(dtype), r=3, alpha=6, group_size=8)
    nn.init.normal_(layer.lora_B.weight)
    merged = layer.merge()
    shift = (layer.lora_B.weight @ layer.lora_A.weight) * layer.scaling / 8  # (out, G), fp32
    assert merged.zeros.dtype == dtype
    assert torch.equal(merged.zeros, (layer.base.zeros.float() + shift).to(dtype))


# --- refusals: non-finite merges, QA-LoRA twice, a half-built model --------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_a_non_finite_merge_is_refused_and_changes_nothing(bad):
    model = course.models.tiny_model()
    add_qalora(model, ["q_proj", "v_proj"], r=2, alpha=4, group_size=16)
    with torch.no_grad():
        model.model.layers[1].self_attn.v_proj.lora_B.weight[0, 0] = bad  # the last of the four
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        ValueError, match="merge_qalora refused at model.layers.1.self_attn.v_proj .*NaN or inf"
    ):
        merge_qalora(model)  # the layer that refused is named
    after = model.state_dict()
    assert before.keys() == after.keys()  # no layer replaced, not even the three before the bad one
    assert all(torch.equal(before[k].nan_to_num(), after[k].nan_to_num()) for k in before)


def test_a_merge_that_overflows_half_precision_is_refused():
    """A shift that is finite in fp32 but beyond fp16's 65,504 would write inf into the zero-points."""
    layer = QALoRALinear(nn.Linear(32, 10).half(), r=3, alpha=6, group_size=8)
    with torch.no_grad():
        layer.lora_B.weight.fill_(1e9)
    assert torch.isfinite(layer.lora_B.weight @ layer.lora_A.weight).all()  # finite in the adapter's fp32
    with pytest.raises(ValueError, match="overflows the base's dtype"):
        layer.merge()


def test_qalora_on_top_of_another_adapter_says_what_it_found():
    """Not "wraps an nn.Linear or a GroupQuantLinear, got LoRALinear": merging that adapter is the way out."""
    model = course.models.tiny_model()
    course.lora.add_lora(model, ["q_proj"], r=2, alpha=4)
    with pytest.raises(ValueError, match="already holds an adapter \\(LoRALinear.*merge that adapter first"):
        add_qalora(model, ["q_proj"], r=2, alpha=4, group_size=16)
    ia3_layer = course.ia3.IA3Linear(nn.Linear(32, 10), feedforward=False)
    with pytest.raises(ValueError, match="already holds an adapter \\(IA3Linear"):
        QALoRALinear(ia3_layer, r=2, alpha=4, group_size=8)


def test_qalora_twice_says_so():
    model = course.models.tiny_model()
    add_qalora(model, ["q_proj"], r=2, alpha=4, group_size=16)
    with pytest.raises(ValueError, match="already has QA-LoRA adapters.*merge_qalora.*fresh copy"):
        add_qalora(model, ["q_proj"], r=2, alpha=4, group_size=16)
    with pytest.raises(ValueError, match="already has a QA-LoRA adapter"):
        QALoRALinear(model.model.layers[0].self_attn.q_proj, r=2, alpha=4, group_size=16)
    merge_qalora(model)  # merged, the INT4 layer takes a new adapter
    assert add_qalora(model, ["q_proj"], r=2, alpha=4, group_size=16) == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.q_proj",
    ]


def test_a_refused_add_qalora_leaves_the_model_as_it_was():
    """r = 40 fits q_proj (64 -> 64 at L = 1) but not k_proj (64 -> 32), which comes after it."""
    model = course.models.tiny_model()
    with pytest.raises(ValueError, match=r"1\.\.32"):
        add_qalora(model, ["q_proj", "k_proj"], r=40, alpha=4, group_size=1)
    assert not any(isinstance(m, (QALoRALinear, GroupQuantLinear)) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())  # not frozen either
