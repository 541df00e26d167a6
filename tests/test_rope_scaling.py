"""Position interpolation (course.rope_scaling) equals transformers' own linear RoPE scaling."""

import copy

import pytest
import torch
from transformers import LlamaForCausalLM

import course
from course.rope_scaling import interpolate_positions, rope_angles, rope_inverse_frequencies


def test_rope_angles_worked_example():
    angles = rope_angles(torch.tensor([0, 4]), head_dim=4, theta=100.0, factor=2.0)
    torch.testing.assert_close(angles, torch.tensor([[0.0, 0.0], [2.0, 0.2]]))


def test_interpolated_angle_at_s_m_is_the_plain_angle_at_m():
    plain = rope_angles(torch.arange(8), 64, 100000.0)
    stretched = rope_angles(torch.arange(8) * 4, 64, 100000.0, factor=4)
    torch.testing.assert_close(stretched, plain, atol=1e-6, rtol=1e-6)


def test_inverse_frequencies_equal_the_model_buffer():
    model = course.models.tiny_model()
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    ours = rope_inverse_frequencies(head_dim, config.rope_parameters["rope_theta"])
    assert torch.equal(ours, model.model.rotary_emb.inv_freq)


@pytest.mark.parametrize("factor", [2.0, 4.0])
def test_interpolated_model_equals_transformers_linear_rope_scaling(factor):
    model = course.models.tiny_model()
    config = copy.deepcopy(model.config)
    # transformers 5 spells it rope_parameters; older versions: rope_scaling={"rope_type": "linear", "factor": s}
    config.rope_parameters = dict(config.rope_parameters, rope_type="linear", factor=factor)
    reference = LlamaForCausalLM(config).eval()
    reference.load_state_dict(model.state_dict())
    window = interpolate_positions(model, factor)
    assert window == reference.config.max_position_embeddings * factor
    ids = torch.randint(0, 1000, (2, 48))
    with torch.no_grad():
        ours, theirs = model(input_ids=ids).logits, reference(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)  # the same inv_freq / s: equal to rounding


def test_interpolation_changes_the_model_and_composes():
    model = course.models.tiny_model()
    twice = course.models.tiny_model()
    ids = torch.randint(0, 1000, (1, 32))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        interpolate_positions(model, 4.0)
        after = model(input_ids=ids).logits
        interpolate_positions(twice, 2.0)
        interpolate_positions(twice, 2.0)
    assert not torch.allclose(before, after, atol=1e-4)  # a check that can fail: positions really moved
    assert twice.config.rope_parameters["factor"] == 4.0
    torch.testing.assert_close(twice.model.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq)
