"""IA3 by hand equals peft's IA3Config on a tiny Llama; its merge is exact; non-linear targets are refused."""

import copy
import warnings

import pytest
import torch
from peft import IA3Config, TaskType, get_peft_model

import course
from course.ia3 import IA3Linear, add_ia3, merge_ia3

TOL = 1e-5  # fp32; measured difference 0.0


@pytest.fixture(scope="module")
def base():
    return course.models.tiny_model()


def _pair(base):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = get_peft_model(copy.deepcopy(base), IA3Config(task_type=TaskType.CAUSAL_LM))
    gen = torch.Generator().manual_seed(2)
    for module in theirs.modules():
        if hasattr(module, "ia3_l"):
            with torch.no_grad():  # a "trained" adapter: away from the all-ones init
                module.ia3_l["default"].copy_(
                    1 + 0.2 * torch.randn(module.ia3_l["default"].shape, generator=gen)
                )
    ours = copy.deepcopy(base)
    add_ia3(ours)
    state = {
        k.replace("base_model.model.", "").replace(".ia3_l.default", ".ia3_l"): v.flatten()
        for k, v in theirs.state_dict().items()
        if "ia3_l" in k
    }
    result = ours.load_state_dict(state, strict=False)
    assert not result.unexpected_keys and not [k for k in result.missing_keys if "ia3_l" in k]
    return theirs, ours


def _logits(model):
    ids = torch.randint(3, 49152, (2, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_ia3_equals_peft_and_counts(base):
    theirs, ours = _pair(base)
    assert (_logits(theirs) - _logits(ours)).abs().max().item() <= TOL
    trainable = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    assert trainable == theirs.get_nb_trainable_parameters()[0] == 2 * (32 + 32 + 128)  # k, v out; down in
    assert (_logits(ours) - _logits(base)).abs().max() > 1e-3  # the check can fail: the scaling matters


def test_merge_is_exact_and_scales_the_right_axis(base):
    _, ours = _pair(base)
    before = _logits(ours)
    merged = copy.deepcopy(ours)
    assert merge_ia3(merged) == 6
    assert not any(isinstance(m, IA3Linear) for m in merged.modules())
    assert (_logits(merged) - before).abs().max() <= 1e-5
    layer = IA3Linear(torch.nn.Linear(3, 2, bias=True), feedforward=False)
    with torch.no_grad():
        layer.ia3_l.copy_(torch.tensor([2.0, 3.0]))
    x = torch.randn(4, 3)
    assert torch.allclose(layer.merge()(x), layer(x), atol=1e-6)  # bias scaled too
    ff = IA3Linear(torch.nn.Linear(3, 2, bias=False), feedforward=True)
    with torch.no_grad():
        ff.ia3_l.copy_(torch.tensor([2.0, 3.0, 4.0]))
    assert torch.equal(ff.merge().weight, ff.base.weight * torch.tensor([[2.0, 3.0, 4.0]]))


def test_non_linear_targets_are_refused(base):
    model = copy.deepcopy(base)
    with pytest.raises(ValueError, match="linear layer"):
        add_ia3(model, target_modules=("k_proj", "input_layernorm"), feedforward_modules=())
    assert not any(isinstance(m, IA3Linear) for m in model.modules())  # refused before anything changed
    with pytest.raises(ValueError, match="must also be in target_modules"):
        add_ia3(copy.deepcopy(base), target_modules=("k_proj",), feedforward_modules=("down_proj",))
    with pytest.raises(ValueError, match="no module"):
        add_ia3(copy.deepcopy(base), target_modules=("nothing",), feedforward_modules=())
