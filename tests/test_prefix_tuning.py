"""Prefix tuning by hand equals peft's PrefixTuningConfig on a tiny GQA Llama (4 query heads, 2 KV heads),
in fp32, fp16 and bf16; bad inputs and a second wrapping are refused before the model is touched."""

import copy
import math
import warnings

import pytest
import torch
from peft import PrefixTuningConfig, TaskType, get_peft_model

import course
from course.prefix_tuning import PrefixTuning, kv_shape

# peft 0.21.2 passes `past_key_values`, which transformers 5.24 renamed to `cache` (a FutureWarning until 5.40)
pytestmark = pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")
N = 4
TOL = 1e-5  # fp32; measured: 0.0 without the MLP, about 2e-7 with it
# fp16/bf16: tolerance 0. Both keep the prefix and its MLP in fp32 and cast the (n, L*2*kv_dim) prefix once
# to the model's dtype before it enters the cache; the frozen model then runs the same CPU kernels.
DTYPES = [torch.float32, torch.float16, torch.bfloat16]  # torch 2.13 runs fp16 and bf16 matmuls on CPU


@pytest.fixture(scope="module")
def base():
    return course.models.tiny_model()


def _inputs():
    ids = torch.randint(3, 49152, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :3] = 0
    return ids, mask


def _pair(base, projection):
    config = PrefixTuningConfig(
        task_type=TaskType.CAUSAL_LM, num_virtual_tokens=N, prefix_projection=projection
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = get_peft_model(copy.deepcopy(base), config)
    ours = PrefixTuning(copy.deepcopy(base), N, prefix_projection=projection)
    result = ours.load_state_dict(theirs.prompt_encoder.default.state_dict(), strict=False)
    assert not result.unexpected_keys
    return theirs, ours


def _both(theirs, ours):
    ids, mask = _inputs()
    with torch.no_grad():
        return theirs(input_ids=ids, attention_mask=mask).logits, ours(ids, mask).logits


def _diff(theirs, ours):
    peft, mine = _both(theirs, ours)
    return (peft - mine).abs().max().item()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("projection", [False, True])
def test_prefix_tuning_equals_peft(base, projection, dtype):
    theirs, ours = _pair(copy.deepcopy(base).to(dtype), projection)
    assert {p.dtype for n, p in ours.named_parameters() if not n.startswith("model.")} == {torch.float32}
    peft, mine = _both(theirs, ours)
    assert mine.dtype == dtype
    if dtype == torch.float32:
        assert (peft - mine).abs().max() <= TOL
    else:
        assert torch.equal(peft, mine)
    assert theirs.get_nb_trainable_parameters()[0] == sum(
        p.numel() for p in ours.parameters() if p.requires_grad
    )


def test_gqa_prefix_has_kv_heads_not_query_heads(base):
    layers, kv_heads, head_dim = kv_shape(base.config)
    assert (layers, kv_heads, head_dim) == (2, 2, 16)  # 4 query heads of 16 share 2 KV heads
    ours = PrefixTuning(copy.deepcopy(base), N)
    assert ours.embedding.weight.shape == (
        N,
        layers * 2 * kv_heads * head_dim,
    )  # not hidden_size = 64 per layer
    cache = ours.past_key_values(3)
    assert cache.layers[0].keys.shape == (3, kv_heads, N, head_dim)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_wrong_prefix_layout_is_detected(base, dtype):
    """The comparison can fail: swapping the keys and values of the prefix changes the logits, in every dtype."""
    theirs, ours = _pair(copy.deepcopy(base).to(dtype), False)
    with torch.no_grad():
        w = ours.embedding.weight.view(N, 2, 2, -1)  # (n, L, k/v, kv_dim)
        ours.embedding.weight.copy_(w.flip(2).reshape(N, -1))
    assert _diff(theirs, ours) > 1e-4


def test_mixed_batch_prefixes(base):
    ours = PrefixTuning(copy.deepcopy(base), N)
    other = torch.randn_like(ours.embedding.weight)
    ids, mask = _inputs()
    with torch.no_grad():
        mixed = ours(ids, mask, prefixes=torch.stack([ours.prefix(), other])).logits
        first = ours(ids[:1], mask[:1]).logits
        second = ours(ids[1:], mask[1:], prefixes=other[None]).logits
    assert torch.allclose(mixed[:1], first, atol=1e-5) and torch.allclose(mixed[1:], second, atol=1e-5)


class _NoCache(torch.nn.Module):
    """A model whose forward has no cache argument (as an encoder-only model)."""

    config = course.models.tiny_model().config

    def forward(self, input_ids, attention_mask=None):
        return input_ids


def test_bad_configurations_are_refused(base):
    with pytest.raises(ValueError, match="positive integer"):
        PrefixTuning(copy.deepcopy(base), 0)
    with pytest.raises(ValueError, match="KV cache"):
        PrefixTuning(_NoCache(), N)
    with pytest.raises(ValueError, match="a prefix has shape"):
        PrefixTuning(copy.deepcopy(base), N).past_key_values(1, torch.zeros(N + 1, 8))


def test_wrapping_twice_is_refused_with_what_happened(base):
    from course.prompt_tuning import PromptTuning

    once = PrefixTuning(copy.deepcopy(base), N)
    with pytest.raises(ValueError, match="already a PrefixTuning with 4 virtual tokens.*`model.model`"):
        PrefixTuning(once, N)  # before: "takes no `cache`", which is not what happened
    with pytest.raises(ValueError, match="already a PromptTuning"):
        PrefixTuning(PromptTuning(copy.deepcopy(base), N), N)


def test_a_refused_configuration_leaves_the_model_trainable(base):
    model = copy.deepcopy(base)
    for n, hidden in ((0, None), (2.5, None), (True, None), (N, 0)):
        with pytest.raises(ValueError, match="positive integer"):
            PrefixTuning(model, n, prefix_projection=True, encoder_hidden_size=hidden)
    assert all(p.requires_grad for p in model.parameters())


def test_a_non_finite_prefix_is_not_stored(base):
    ours = PrefixTuning(copy.deepcopy(base), N, prefix_projection=True)
    with torch.no_grad():
        ours.transform[0].weight[0, 0] = math.nan  # (an inf here would be tamed by the tanh)
    with pytest.raises(ValueError, match="NaN or inf"):
        ours.stored_prefix()


@pytest.mark.parametrize("projection", [False, True], ids=["direct", "mlp"])
def test_a_prefix_that_overflows_the_model_dtype_is_not_stored(base, projection):
    """Finite in its fp32 but beyond fp16's 65,504: in the fp16 KV cache it would be inf."""
    ours = PrefixTuning(copy.deepcopy(base).half(), N, prefix_projection=projection)
    with torch.no_grad():
        (ours.transform[-1].bias if projection else ours.embedding.weight).view(-1)[0] = 1e6
    assert torch.isfinite(ours.prefix()).all()
    with pytest.raises(ValueError, match="overflows the model's torch.float16"):
        ours.stored_prefix()
    ours.model.float()  # the same prefix beside an fp32 model is stored
    assert ours.stored_prefix().dtype == torch.float32


def test_an_integer_prefix_is_refused(base):
    ours = PrefixTuning(copy.deepcopy(base), N)
    with pytest.raises(TypeError, match="floating-point"):
        ours.past_key_values(1, torch.zeros(N, ours.embedding.weight.shape[1], dtype=torch.long))


def test_the_prefix_is_created_on_the_model_device(base):
    """A prefix left on the CPU beside a GPU model fails in attention; meta stands in for cuda here."""
    ours = PrefixTuning(copy.deepcopy(base).to("meta"), N, prefix_projection=True)
    assert {p.device.type for n, p in ours.named_parameters() if not n.startswith("model.")} == {"meta"}
