"""Prefix tuning by hand equals peft's PrefixTuningConfig on a tiny GQA Llama (4 query heads, 2 KV heads)."""

import copy
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


def _diff(theirs, ours):
    ids, mask = _inputs()
    with torch.no_grad():
        return (theirs(input_ids=ids, attention_mask=mask).logits - ours(ids, mask).logits).abs().max().item()


@pytest.mark.parametrize("projection", [False, True])
def test_prefix_tuning_equals_peft(base, projection):
    theirs, ours = _pair(base, projection)
    assert _diff(theirs, ours) <= TOL
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


def test_a_wrong_prefix_layout_is_detected(base):
    """The comparison can fail: swapping the keys and values of the prefix changes the logits."""
    theirs, ours = _pair(base, False)
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
