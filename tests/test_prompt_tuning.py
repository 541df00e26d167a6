"""Prompt tuning and P-tuning by hand equal peft's PromptTuningConfig / PromptEncoderConfig on a tiny Llama,
in fp32, fp16 and bf16; bad inputs and a second wrapping are refused before the model is touched."""

import copy
import math
import warnings

import pytest
import torch
from peft import PromptEncoderConfig, PromptTuningConfig, TaskType, get_peft_model

import course
from course.p_tuning import PTuning
from course.prompt_tuning import PromptTuning, init_ids_from_text

N = 5  # virtual tokens
TOL = 1e-5  # fp32: the same operations in the same order; measured differences are 0.0
# fp16/bf16: tolerance 0. Both keep the prompt (and encoder) fp32, cast it once to the model's dtype
# where it joins the embeddings, and run the same frozen model on the same deterministic CPU kernels.
DTYPES = [torch.float32, torch.float16, torch.bfloat16]  # torch 2.13 runs fp16 and bf16 matmuls on CPU


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


def _both_logits(peft_model, ours):
    ids, mask = _inputs()
    with torch.no_grad():
        theirs = peft_model(input_ids=ids, attention_mask=mask).logits[:, N:]  # peft keeps the soft positions
        mine = ours(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
    assert mine.shape == (2, 7, 49152) and mine.dtype == theirs.dtype
    return theirs, mine


def _same_logits(peft_model, ours):
    theirs, mine = _both_logits(peft_model, ours)
    return (theirs - mine).abs().max().item()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_prompt_tuning_text_init_and_logits_equal_peft(base, tokenizer, dtype):
    base = copy.deepcopy(base).to(dtype)
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
    assert ours.embedding.weight.dtype == torch.float32  # the prompt stays fp32 beside a half model
    assert torch.equal(
        ours.embedding.weight, theirs.prompt_encoder.default.embedding.weight
    )  # same TEXT init
    with torch.no_grad():  # move away from the init, the same way in both
        ours.embedding.weight.add_(torch.randn_like(ours.embedding.weight))
        theirs.prompt_encoder.default.embedding.weight.copy_(ours.embedding.weight)
    theirs_logits, mine = _both_logits(theirs, ours)
    if dtype == torch.float32:
        assert (theirs_logits - mine).abs().max() <= TOL
    else:
        assert torch.equal(theirs_logits, mine)
    assert theirs.get_nb_trainable_parameters()[0] == sum(
        p.numel() for p in ours.parameters() if p.requires_grad
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_wrong_prompt_is_detected(base, dtype):
    """The comparison can fail: a prompt one row off from peft's changes the logits, in every dtype."""
    base = copy.deepcopy(base).to(dtype)
    config = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=N)
    theirs = _peft(base, config)
    ours = PromptTuning(copy.deepcopy(base), N)
    with torch.no_grad():
        ours.embedding.weight.copy_(theirs.prompt_encoder.default.embedding.weight.roll(1, 0))
    assert _same_logits(theirs, ours) > 1e-3


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("encoder", ["MLP", "LSTM"])
def test_p_tuning_equals_peft(base, encoder, dtype):
    base = copy.deepcopy(base).to(dtype)
    config = PromptEncoderConfig(
        task_type=TaskType.CAUSAL_LM, num_virtual_tokens=N, encoder_reparameterization_type=encoder
    )
    theirs = _peft(base, config)
    ours = PTuning(copy.deepcopy(base), N, encoder=encoder)
    result = ours.load_state_dict(theirs.prompt_encoder.default.state_dict(), strict=False)
    assert not result.unexpected_keys and all(k.startswith("model.") for k in result.missing_keys)
    assert {p.dtype for n, p in ours.named_parameters() if not n.startswith("model.")} == {torch.float32}
    theirs_logits, mine = _both_logits(theirs, ours)
    if dtype == torch.float32:
        assert (theirs_logits - mine).abs().max() <= TOL
    else:
        assert torch.equal(theirs_logits, mine)
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


def test_wrapping_twice_is_refused_with_what_happened(base):
    once = PromptTuning(copy.deepcopy(base), N)
    for wrap in (PromptTuning, PTuning):
        with pytest.raises(ValueError, match="already a PromptTuning with 5 virtual tokens.*`model.model`"):
            wrap(once, N)
    with pytest.raises(ValueError, match="already a PTuning"):
        PromptTuning(PTuning(copy.deepcopy(base), N), N)


def test_a_refused_configuration_leaves_the_model_trainable(base):
    """Checks run before the model is frozen: a refused call changes nothing, not even requires_grad."""
    model = copy.deepcopy(base)
    for call in (
        lambda: PTuning(model, N, encoder="GRU"),
        lambda: PTuning(model, N, encoder_hidden_size=0),
        lambda: PromptTuning(model, 2, [1, 10**6]),
    ):
        with pytest.raises(ValueError):
            call()
        assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=["nan", "inf"])
def test_a_non_finite_prompt_is_not_stored(base, bad):
    ours = PTuning(copy.deepcopy(base), N)
    with torch.no_grad():
        ours.embedding.weight[0, 0] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        ours.soft_prompt()


@pytest.mark.parametrize("method", [PromptTuning, PTuning], ids=["prompt_tuning", "p_tuning"])
def test_a_prompt_that_overflows_the_model_dtype_is_not_stored(base, method):
    """Finite in its fp32 but beyond fp16's 65,504: where it joins the fp16 embeddings it would be inf."""
    ours = method(copy.deepcopy(base).half(), N)
    with torch.no_grad():
        weights = ours.embedding.weight if method is PromptTuning else ours.mlp_head[-1].bias
        weights.view(-1)[0] = 1e6
    assert torch.isfinite(ours.prompts()).all()
    with pytest.raises(ValueError, match="overflows the model's torch.float16"):
        ours.soft_prompt()
    ours.model.float()  # the same prompt beside an fp32 model is stored
    assert ours.soft_prompt().dtype == torch.float32


@pytest.mark.parametrize("encoder", ["MLP", "LSTM"])
def test_the_prompt_is_created_on_the_model_device(base, encoder):
    """A prompt left on the CPU beside a GPU model fails at torch.cat; meta stands in for cuda here."""
    on_meta = copy.deepcopy(base).to("meta")
    for ours in (PromptTuning(on_meta, N), PTuning(on_meta, N, encoder=encoder)):
        assert {p.device.type for n, p in ours.named_parameters() if not n.startswith("model.")} == {"meta"}
