"""course.families on a tiny Llama: every family builds, trains a little, and stores what its deployment needs."""

import math

import pytest
import torch

import course
from course import families

TINY = families.Setup(
    steps=2, batch_size=2, evaluations=2, validation_examples=4, test_examples=4, num_virtual_tokens=12, r=2
)


@pytest.fixture(scope="module")
def base():
    return course.models.tiny_model()


@pytest.mark.parametrize("family", families.FAMILIES)
def test_each_family_trains_only_its_own_parameters(base, family, tokenizer):
    model = families.build(family, base, tokenizer, TINY)
    frozen = {name for name, p in base.named_parameters()}
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and not any(
        name.split(".", 1)[-1] in frozen and "lora" not in name for name in trainable
    )
    stored = families.stored_tensors(family, model)
    if family in ("prompt_tuning", "p_tuning"):
        assert stored["prompt"].shape == (12, 64)  # (n, d): P-tuning's encoder is not stored
    if family == "prefix_tuning":
        assert stored["prefix"].shape == (12, 2 * 2 * 2 * 16)  # (n, layers * 2 * kv_heads * head_dim)
    assert families.adapter_bytes(family, model) >= 4 * sum(t.numel() for t in stored.values())


def test_run_family_records_a_validation_curve_and_scores(base, tokenizer):
    run = families.run_family("ia3", 1e-2, base, tokenizer, TINY)
    assert run.val_steps == [0, 1, 2] and len(run.val_losses) == 3 and all(map(math.isfinite, run.val_losses))
    assert len(run.train_losses) == 2 and run.row["trainable_params"] == 2 * (32 + 32 + 128)
    rate = families.score_test(run, tokenizer, TINY)
    assert rate.n == 4 and run.row["hits"] == rate.successes
    assert not torch.equal(run.model.model.layers[0].self_attn.k_proj.ia3_l, torch.ones(32))  # it moved


def test_lr_search_keeps_the_lowest_validation_loss(base, tokenizer):
    kept, searched = families.lr_search("prompt_tuning", (1e-4, 3e-1), base, tokenizer, TINY)
    assert [lr for lr, _ in searched] == [1e-4, 3e-1]
    assert kept.lr == min(searched, key=lambda s: s[1])[0] and "exact_match" in kept.row


def test_bad_setups_are_refused(base, tokenizer):
    with pytest.raises(ValueError, match="multiple"):
        families.Setup(steps=5, evaluations=2)
    with pytest.raises(ValueError, match="positive"):
        families.Setup(num_virtual_tokens=0)
    with pytest.raises(ValueError, match="family must be one of"):
        families.build("adapter", base, tokenizer, TINY)
    with pytest.raises(ValueError, match="lr must be positive"):
        families.run_family("ia3", 0.0, base, tokenizer, TINY)
