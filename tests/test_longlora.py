"""LongLoRA's S2-Attn (course.longlora): its equivalences, the wrap-around leak and its fix, and the model hooks."""

import pytest
import torch
from torch import nn

import course
from course.longlora import (
    longlora_trainable,
    packed_batches,
    s2_attention,
    s2_attention_mask,
    use_s2_attention,
)


def _qkv(batch=2, heads=4, seq=16, dim=8, dtype=torch.float64):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(batch, heads, seq, dim, generator=gen, dtype=dtype) for _ in range(3)]


def test_s2_without_shift_and_one_group_is_full_causal_attention():
    q, k, v = _qkv()
    full = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(s2_attention(q, k, v, group_size=16, shift=False), full, atol=1e-12, rtol=0)


@pytest.mark.parametrize(("seq", "group_size"), [(16, 4), (16, 8), (24, 6), (16, 16)])
def test_reference_s2_equals_full_attention_under_the_explicit_mask(seq, group_size):
    q, k, v = _qkv(heads=5, seq=seq)  # odd head count: heads 2..4 are the shifted "second half"
    masks = {
        False: s2_attention_mask(seq, group_size, shifted=False, mask_wrapped=False),
        True: s2_attention_mask(seq, group_size, True, mask_wrapped=False),
    }
    want = torch.cat(
        [
            nn.functional.scaled_dot_product_attention(q[:, :2], k[:, :2], v[:, :2], attn_mask=masks[False]),
            nn.functional.scaled_dot_product_attention(q[:, 2:], k[:, 2:], v[:, 2:], attn_mask=masks[True]),
        ],
        dim=1,
    )
    torch.testing.assert_close(
        s2_attention(q, k, v, group_size, mask_wrapped=False), want, atol=1e-12, rtol=0
    )


def test_the_reference_shifted_mask_wraps_around():
    mask = s2_attention_mask(8, 4, shifted=True, mask_wrapped=False)
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


def test_s2_refuses_generation_with_a_cache():
    model = course.models.tiny_model()
    use_s2_attention(model, group_size=4)
    with pytest.raises(ValueError, match="set_attn_implementation"):
        model.generate(torch.randint(0, 1000, (1, 8)), max_new_tokens=2, do_sample=False)


# --- the wrap-around leak (LongLoRA issue #90) ------------------------------------------------


def _assert_causal(mask_wrapped: bool):
    """Changing the last token's key and value must not change the output at any earlier position."""
    q, k, v = _qkv(seq=16)
    out = s2_attention(q, k, v, group_size=8, mask_wrapped=mask_wrapped)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, -1] += 1.0
    v2[:, :, -1] += 1.0
    changed = s2_attention(q, k2, v2, group_size=8, mask_wrapped=mask_wrapped)
    torch.testing.assert_close(changed[:, :, 0], out[:, :, 0], atol=0, rtol=0)  # position 0 sees no future
    torch.testing.assert_close(changed[:, :, :-1], out[:, :, :-1], atol=0, rtol=0)


@pytest.mark.parametrize(
    "mask_wrapped",
    [
        True,
        pytest.param(
            False,
            marks=pytest.mark.xfail(
                strict=True,
                raises=AssertionError,
                reason="the reference code's roll wraps: position 0 sees the end",
            ),
        ),
    ],
)
def test_s2_attention_is_causal_only_with_the_wrap_masked(mask_wrapped):
    _assert_causal(mask_wrapped)


def test_the_leak_is_exactly_the_wrapped_pairs():
    leaky = s2_attention_mask(8, 4, shifted=True, mask_wrapped=False)
    fixed = s2_attention_mask(8, 4, shifted=True, mask_wrapped=True)
    future = torch.ones(8, 8, dtype=torch.bool).triu(1)  # (i, j) with j > i
    assert (leaky & future).nonzero().tolist() == [[0, 6], [0, 7], [1, 6], [1, 7]]
    assert torch.equal(fixed, leaky & ~future)
    assert fixed[0].tolist() == [True] + [False] * 7  # token 0 now sees only itself


@pytest.mark.parametrize(("seq", "group_size"), [(16, 4), (16, 8), (24, 6)])
def test_masked_s2_equals_attention_under_its_mask(seq, group_size):
    q, k, v = _qkv(heads=5, seq=seq)
    masks = [s2_attention_mask(seq, group_size, shifted=s, mask_wrapped=True) for s in (False, True)]
    want = torch.cat(
        [
            nn.functional.scaled_dot_product_attention(q[:, :2], k[:, :2], v[:, :2], attn_mask=masks[0]),
            nn.functional.scaled_dot_product_attention(q[:, 2:], k[:, 2:], v[:, 2:], attn_mask=masks[1]),
        ],
        dim=1,
    )
    torch.testing.assert_close(s2_attention(q, k, v, group_size, mask_wrapped=True), want, atol=1e-12, rtol=0)


def test_the_model_hook_passes_the_wrap_setting():
    model = course.models.tiny_model()
    ids = torch.randint(0, 1000, (1, 16))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % 1000
    with torch.no_grad():
        for mask_wrapped, leaks in ((False, True), (True, False)):
            use_s2_attention(model, group_size=4, mask_wrapped=mask_wrapped)
            first = model(input_ids=ids).logits[0, 0]
            first_changed = model(input_ids=changed).logits[0, 0]
            assert (not torch.equal(first, first_changed)) == leaks
