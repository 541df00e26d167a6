"""Prompt tuning and P-tuning by hand equal peft's PromptTuningConfig / PromptEncoderConfig on a tiny Llama."""

import copy
import warnings

import pytest
import torch
from peft import PromptEncoderConfig, PromptTuningConfig, TaskType, get_peft_model

import course
from course.p_tuning import PTuning
from course.prompt_tuning import PromptTuning, init_ids_from_text

N = 5  # virtual tokens
TOL = 1e-5  # fp32: the same operations in the same order; measured differences are 0.0


@pytest.fixture(scope="module")
def base():
    return course.models.tiny_model()


def _inputs():
    ids = torch.randint(3, 49152, (2, 7), generator=torch.Generator().manual_seed(0))  # (B, T)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, :2] = 0  # a left-padded row
    return ids, mask


def _peft(base, config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(copy.deepcopy(base), config)


def _same_logits(peft_model, ours):
    ids, mask = _inputs()
    with torch.no_grad():
        theirs = peft_model(input_ids=ids, attention_mask=mask).logits[:, N:]  # peft keeps the soft positions
        mine = ours(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
    assert mine.shape == (2, 7, 49152)
    return (theirs - mine).abs().max().item()


def test_prompt_tuning_text_init_and_logits_equal_peft(base, tokenizer):
    text = "Route it"
    path = course.models.model_path(course.models.EMBEDDED_MODEL)
    config = PromptTuningConfig(
        task_type=TaskType.CAUSAL_LM,
        num_virtual_tokens=N,
        prompt_tuning_init="TEXT",
        prompt_tuning_init_text=text,
        tokenizer_name_or_path=path,
    )
    theirs = _peft(base, config)
    ours = PromptTuning(copy.deepcopy(base), N, init_ids_from_text(tokenizer, text, N))
    assert torch.equal(
        ours.embedding.weight, theirs.prompt_encoder.default.embedding.weight
    )  # same TEXT init
    with torch.no_grad():  # move away from the init, the same way in both
        ours.embedding.weight.add_(torch.randn_like(ours.embedding.weight))
        theirs.prompt_encoder.default.embedding.weight.copy_(ours.embedding.weight)
    assert _same_logits(theirs, ours) <= TOL
    assert theirs.get_nb_trainable_parameters()[0] == sum(
        p.numel() for p in ours.parameters() if p.requires_grad
    )


def test_a_wrong_prompt_is_detected(base):
    """The comparison can fail: a prompt one row off from peft's changes the logits."""
    config = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=N)
    theirs = _peft(base, config)
    ours = PromptTuning(copy.deepcopy(base), N)
    with torch.no_grad():
        ours.embedding.weight.copy_(theirs.prompt_encoder.default.embedding.weight.roll(1, 0))
    assert _same_logits(theirs, ours) > 1e-3


@pytest.mark.parametrize("encoder", ["MLP", "LSTM"])
def test_p_tuning_equals_peft(base, encoder):
    config = PromptEncoderConfig(
        task_type=TaskType.CAUSAL_LM, num_virtual_tokens=N, encoder_reparameterization_type=encoder
    )
    theirs = _peft(base, config)
    ours = PTuning(copy.deepcopy(base), N, encoder=encoder)
    result = ours.load_state_dict(theirs.prompt_encoder.default.state_dict(), strict=False)
    assert not result.unexpected_keys and all(k.startswith("model.") for k in result.missing_keys)
    assert _same_logits(theirs, ours) <= TOL
    assert theirs.get_nb_trainable_parameters()[0] == sum(
        p.numel() for p in ours.parameters() if p.requires_grad
    )


def test_mixed_batch_rows_equal_their_own_tenant(base):
    """Two tenants' prompts in one batch: each row's logits equal that tenant run alone."""
    a, b = PromptTuning(copy.deepcopy(base), N), PromptTuning(copy.deepcopy(base), N)
    b.model = a.model  # one frozen base
    ids, mask = _inputs()
    with torch.no_grad():
        mixed = a(ids, mask, prompts=torch.stack([a.prompts(), b.prompts()])).logits  # (2, T, V)
        alone_a, alone_b = a(ids[:1], mask[:1]).logits, b(ids[1:], mask[1:]).logits
    assert torch.allclose(mixed[:1], alone_a, atol=1e-5) and torch.allclose(mixed[1:], alone_b, atol=1e-5)
    assert not torch.allclose(mixed[1:], a(ids[1:], mask[1:]).logits, atol=1e-3)  # tenants differ


def test_answer_only_logits_and_loss_match_full_logits(base):
    ours = PromptTuning(copy.deepcopy(base), N)
    ids, mask = _inputs()
    labels = ids.clone()
    labels[:, :4] = -100
    keep = torch.nn.functional.pad(labels[:, 1:] != -100, (0, 1))
    with torch.no_grad():
        full = ours(ids, mask, labels=labels)
        sliced = ours(ids, mask, logits_to_keep=keep).logits  # (answer tokens, V)
    assert torch.allclose(full.logits[keep], sliced, atol=1e-5)
    want = torch.nn.functional.cross_entropy(full.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    assert abs(full.loss.item() - want.item()) < 1e-5


def test_bad_configurations_are_refused(base, tokenizer):
    with pytest.raises(ValueError, match="positive"):
        PromptTuning(copy.deepcopy(base), 0)
    with pytest.raises(ValueError, match="positive"):
        PTuning(copy.deepcopy(base), 0)
    with pytest.raises(ValueError, match="only 3 virtual tokens"):
        init_ids_from_text(tokenizer, "a much longer init text than three tokens", 3)
    with pytest.raises(ValueError, match="encoder must be one of"):
        PTuning(copy.deepcopy(base), N, encoder="GRU")
    assert init_ids_from_text(tokenizer, "hi", 3) == (tokenizer("hi")["input_ids"] * 3)[:3]
