"""QA-LoRA's exact INT4 merge, S2-Attn's two equivalences, LoftQ's init, and their errors at the door."""

import pytest
import torch
from torch import nn

import course
from course.variants import (
    GroupQuantLinear,
    QALoRALinear,
    add_qalora,
    group_pool,
    loftq_init,
    longlora_trainable,
    merge_qalora,
    packed_batches,
    quantize_groupwise,
    s2_attention,
    s2_attention_mask,
    use_s2_attention,
)

# --- QA-LoRA ------------------------------------------------------------------------------------


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


# --- S2-Attn --------------------------------------------------------------------------------------


def _qkv(batch=2, heads=4, seq=16, dim=8, dtype=torch.float64):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(batch, heads, seq, dim, generator=gen, dtype=dtype) for _ in range(3)]


def test_s2_without_shift_and_one_group_is_full_causal_attention():
    q, k, v = _qkv()
    full = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(s2_attention(q, k, v, group_size=16, shift=False), full, atol=1e-12, rtol=0)


@pytest.mark.parametrize(("seq", "group_size"), [(16, 4), (16, 8), (24, 6), (16, 16)])
def test_s2_equals_full_attention_under_the_explicit_mask(seq, group_size):
    q, k, v = _qkv(heads=5, seq=seq)  # odd head count: heads 2..4 are the shifted "second half"
    masks = {
        False: s2_attention_mask(seq, group_size, shifted=False),
        True: s2_attention_mask(seq, group_size, True),
    }
    want = torch.cat(
        [
            nn.functional.scaled_dot_product_attention(q[:, :2], k[:, :2], v[:, :2], attn_mask=masks[False]),
            nn.functional.scaled_dot_product_attention(q[:, 2:], k[:, 2:], v[:, 2:], attn_mask=masks[True]),
        ],
        dim=1,
    )
    torch.testing.assert_close(s2_attention(q, k, v, group_size), want, atol=1e-12, rtol=0)


def test_shifted_mask_wraps_around():
    mask = s2_attention_mask(8, 4, shifted=True)
    assert mask[3].tolist() == [False, False, True, True, False, False, False, False]  # group {2,3,4,5}
    assert mask[0].tolist() == [True, False, False, False, False, False, True, True]  # last group {6,7,0,1}
    assert int(mask.sum()) == 2 * (4 * 5 // 2)  # two groups of 4, each a causal triangle


@pytest.mark.parametrize(("seq", "group_size"), [(10, 4), (16, 3), (16, 0), (16, 32)])
def test_group_size_must_be_even_and_divide_the_sequence(seq, group_size):
    q, k, v = _qkv(seq=seq)
    with pytest.raises(ValueError, match="divides the sequence length"):
        s2_attention(q, k, v, group_size)


def test_s2_in_a_transformers_model():
    model = course.models.tiny_model()
    ids = torch.randint(0, 1000, (2, 16))
    with torch.no_grad():
        full = model(input_ids=ids).logits
        use_s2_attention(model, group_size=16, shift=False)
        same = model(input_ids=ids).logits
        use_s2_attention(model, group_size=4)
        sparse = model(input_ids=ids).logits
        model.set_attn_implementation("sdpa")
        back = model(input_ids=ids).logits
    torch.testing.assert_close(same, full, atol=1e-5, rtol=1e-5)  # one unshifted group: full causal
    assert not torch.allclose(sparse, full, atol=1e-3)
    assert torch.equal(back, full)


def test_longlora_trainable_adds_embeddings_and_norms():
    model = course.models.tiny_model().requires_grad_(False)
    names = longlora_trainable(model, embeddings=True, norms=True)
    assert "model.embed_tokens.weight" in names and "model.norm.weight" in names
    assert all(p.requires_grad == (n in names) for n, p in model.named_parameters())
    model.requires_grad_(False)
    assert longlora_trainable(model, embeddings=False, norms=True) == [n for n in names if "norm" in n]


def test_packed_batches_are_full_rows_with_completion_labels(tokenizer):
    data = course.data.load_task("event_extraction", "train").select(range(20))
    batches = list(packed_batches(tokenizer, data, seq_len=64, batch_size=2, steps=3))
    assert len(batches) == 3 and all(b["input_ids"].shape == (2, 64) == b["labels"].shape for b in batches)
    labels = batches[0]["labels"]
    assert (labels == -100).any() and (labels != -100).any()
    kept = labels != -100
    assert torch.equal(labels[kept], batches[0]["input_ids"][kept])


# --- LoftQ ---------------------------------------------------------------------------------------


def test_loftq_init_quantizes_with_nf4_and_fits_the_residual():
    import bitsandbytes.functional as F

    weight = torch.randn(48, 64)
    dequantized, A, B = loftq_init(weight, r=4)
    q, state = F.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=False)
    assert torch.equal(dequantized, F.dequantize_4bit(q, state).view(48, 64))
    assert A.shape == (4, 64) and B.shape == (48, 4)
    assert (weight - dequantized - B @ A).norm() < (weight - dequantized).norm()


@pytest.mark.gpu
def test_loftq_init_equals_peft_on_cuda():
    from peft.utils.loftq_utils import loftq_init as peft_loftq_init

    weight = torch.randn(48, 64)
    for num_iter in (1, 2):
        ours = loftq_init(weight, r=4, num_iter=num_iter)
        theirs = peft_loftq_init(weight.cuda(), num_bits=4, reduced_rank=4, num_iter=num_iter)
        for a, b in zip(ours, theirs, strict=True):
            torch.testing.assert_close(a, b.cpu(), atol=1e-4, rtol=1e-4)  # SVD on another device


def test_loftq_needs_an_iteration():
    with pytest.raises(ValueError, match="num_iter"):
        loftq_init(torch.randn(8, 64), r=2, num_iter=0)


def test_s2_refuses_generation_with_a_cache():
    model = course.models.tiny_model()
    use_s2_attention(model, group_size=4)
    with pytest.raises(ValueError, match="set_attn_implementation"):
        model.generate(torch.randint(0, 1000, (1, 8)), max_new_tokens=2, do_sample=False)
