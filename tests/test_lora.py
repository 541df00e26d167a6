"""course.lora: the invariants of a LoRA layer, equality with peft, and errors at the door.

Tolerances: merging adds scaling * B A into W in fp32, so a merged forward differs from the
unmerged one only by rounding: each output sums `in_features` products of magnitude ~1, so
the error is a few ulps of the output (~1e-6 here); we allow 1e-5. Unmerge subtracts the
same delta again: W comes back within one rounding step of its entries (|W| < 1), 1e-6.
"""

import copy
import itertools
import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

import course
from course.lora import (
    LoRALinear,
    add_lora,
    count_parameters,
    find_target_modules,
    load_adapter,
    lora_layers,
    lora_state_dict,
    merge_lora,
    save_adapter,
)

MERGE_ATOL = 1e-5  # see the module docstring
UNMERGE_ATOL = 1e-6


def _layer(in_features=24, out_features=40, r=4, alpha=8, bias=True, **kwargs):
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(in_features, out_features, bias=bias), r=r, alpha=alpha, **kwargs)
    nn.init.normal_(layer.lora_B.weight)  # a trained-looking B, so the update is not zero
    return layer


def _peft_model(model, **config):
    import warnings

    with warnings.catch_warnings():  # peft 0.21.2 reads a property transformers 5 deprecates
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        return get_peft_model(model, LoraConfig(**config))


def _copy_adapters_into_peft(ours, theirs):
    """Give peft's adapters exactly our A and B (module names are the same under base_model.model)."""
    with torch.no_grad():
        for name, layer in lora_layers(ours).items():
            target = theirs.base_model.model.get_submodule(name)
            target.lora_A["default"].weight.copy_(layer.lora_A.weight)
            target.lora_B["default"].weight.copy_(layer.lora_B.weight)


# --- one layer ---------------------------------------------------------------------------------


def test_zero_b_leaves_the_output_equal_to_the_base():
    base = nn.Linear(24, 40)
    layer = LoRALinear(base, r=4, alpha=8)
    x = torch.randn(3, 5, 24)
    assert torch.equal(layer.lora_B.weight, torch.zeros(40, 4))
    assert torch.equal(layer(x), base(x))


def test_forward_is_base_plus_scaled_low_rank_update():
    layer = _layer(r=4, alpha=8)
    x = torch.randn(3, 5, 24)
    A, B, W, b = layer.lora_A.weight, layer.lora_B.weight, layer.base.weight, layer.base.bias
    want = x @ W.T + b + (alpha_over_r := 8 / 4) * (x @ A.T) @ B.T  # (3, 5, 40)
    assert layer.scaling == alpha_over_r
    torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=0)


def test_delta_weight_is_scaling_times_b_a():
    layer = _layer(r=4, alpha=12)
    delta = layer.delta_weight()
    assert delta.shape == (40, 24)
    torch.testing.assert_close(delta, 3.0 * layer.lora_B.weight @ layer.lora_A.weight)
    assert torch.linalg.matrix_rank(delta) <= 4


def test_merge_then_forward_equals_unmerged_forward():
    layer = _layer()
    x = torch.randn(8, 24)
    before = layer(x)
    layer.merge()
    assert layer.merged
    assert (layer(x) - before).abs().max() < MERGE_ATOL


def test_unmerge_restores_the_base_weight():
    layer = _layer()
    w0 = layer.base.weight.detach().clone()
    layer.merge()
    assert not torch.allclose(layer.base.weight, w0)  # merging really changed W
    layer.unmerge()
    assert not layer.merged
    assert (layer.base.weight - w0).abs().max() < UNMERGE_ATOL


def test_merge_twice_and_unmerge_unmerged_are_refused():
    layer = _layer()
    with pytest.raises(ValueError, match="not merged"):
        layer.unmerge()
    layer.merge()
    with pytest.raises(ValueError, match="already merged"):
        layer.merge()


def test_only_a_and_b_train_and_at_init_only_b_gets_a_gradient():
    layer = LoRALinear(nn.Linear(24, 40), r=4, alpha=8)
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_A.weight", "lora_B.weight"]
    layer(torch.randn(6, 24)).pow(2).sum().backward()
    assert layer.base.weight.grad is None
    assert torch.equal(layer.lora_A.weight.grad, torch.zeros(4, 24))  # dL/dA = scaling * B^T (...) = 0
    assert layer.lora_B.weight.grad.abs().sum() > 0


def test_dropout_acts_on_the_lora_branch_only():
    base = nn.Linear(24, 40)
    layer = LoRALinear(base, r=4, alpha=8, dropout=0.5).train()
    x = torch.randn(16, 24)
    assert torch.equal(layer(x), base(x))  # B = 0: the base path is never dropped
    nn.init.normal_(layer.lora_B.weight)
    assert not torch.equal(layer(x), layer(x))  # training: a fresh mask each call
    layer.eval()
    assert torch.equal(layer(x), layer(x))


@pytest.mark.parametrize(("init", "check"), [("kaiming", "bound"), ("gaussian", "std")])
def test_init_of_a_follows_peft(init, check):
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(512, 256), r=8, alpha=8, init=init)
    A = layer.lora_A.weight
    if check == "bound":  # kaiming-uniform with a = sqrt(5): U(-1/sqrt(in), 1/sqrt(in)), as nn.Linear
        bound = 1 / math.sqrt(512)
        assert A.abs().max() <= bound and A.abs().max() > 0.95 * bound
    else:  # N(0, (1/r)^2)
        assert abs(A.std().item() - 1 / 8) < 0.01
    assert torch.equal(layer.lora_B.weight, torch.zeros(256, 8))


@pytest.mark.parametrize("bias", [True, False])
def test_equal_to_peft_bit_for_bit(bias):
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(24, 40, bias=bias))
    theirs = _peft_model(copy.deepcopy(model), r=4, lora_alpha=8, target_modules=["proj"])
    add_lora(model, ["proj"], r=4, alpha=8)
    nn.init.normal_(model.proj.lora_B.weight)
    _copy_adapters_into_peft(model, theirs)
    x = torch.randn(3, 7, 24)
    assert torch.equal(model(x), theirs(x))  # max abs diff 0.0: the same arithmetic
    assert torch.equal(model.proj.delta_weight(), theirs.base_model.model.proj.get_delta_weight("default"))


# --- errors at the door ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"r": 0}, "rank r"),
        ({"r": -2}, "rank r"),
        ({"r": 25}, r"1\.\.24"),  # larger than min(in, out) = 24
        ({"r": 2.0}, "integer"),
        ({"alpha": 0}, "alpha must be positive"),
        ({"alpha": -8}, "alpha must be positive"),
        ({"dropout": -0.1}, r"dropout must be in \[0, 1\)"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"init": "pissa"}, "init must be one of"),
    ],
)
def test_bad_arguments_raise_a_value_error_that_says_what_is_expected(kwargs, message):
    arguments = {"r": 4, "alpha": 8, **kwargs}
    with pytest.raises(ValueError, match=message):
        LoRALinear(nn.Linear(24, 40), **arguments)


def test_wrapping_a_non_linear_module_is_refused():
    with pytest.raises(ValueError, match="wraps a linear layer.*Embedding"):
        LoRALinear(nn.Embedding(100, 16), r=4, alpha=8)
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        LoRALinear(_layer(), r=4, alpha=8)


def test_a_linear_like_layer_with_a_quantized_weight_can_be_wrapped_but_not_merged():
    class Frozen4bitLike(nn.Module):  # what course.quant.Linear4bit looks like from outside
        in_features, out_features = 24, 40

        def __init__(self):
            super().__init__()
            self.register_buffer("packed", torch.zeros(480, dtype=torch.uint8))
            self.linear = nn.Linear(24, 40)

        def forward(self, x):
            return self.linear(x)

    layer = LoRALinear(Frozen4bitLike(), r=4, alpha=8)
    x = torch.randn(2, 24)
    assert torch.equal(layer(x), layer.base(x))
    with pytest.raises(ValueError, match="floating-point base weight"):
        layer.merge()


# --- whole models ------------------------------------------------------------------------------------


@pytest.fixture
def tiny():
    return course.models.tiny_model(seed=0)


def test_add_lora_wraps_exactly_the_targets_and_freezes_the_rest(tiny):
    names = add_lora(tiny, ["q_proj", "v_proj"], r=4, alpha=8)
    assert names == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    assert set(lora_layers(tiny)) == set(names)
    trainable = [n for n, p in tiny.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)


@pytest.mark.parametrize(
    "targets",
    [
        ["q_proj", "v_proj"],
        ["q_proj", "k_proj", "v_proj", "o_proj"],
        "all-linear",
        r".*\.mlp\.(up|down)_proj",
    ],
)
@pytest.mark.parametrize("r", [1, 8])
def test_count_parameters_equals_peft(targets, r):
    ours = course.models.tiny_model(seed=0)
    theirs = _peft_model(course.models.tiny_model(seed=0), r=r, lora_alpha=16, target_modules=targets)
    add_lora(ours, targets, r=r, alpha=16)
    assert count_parameters(ours) == theirs.get_nb_trainable_parameters()


def test_all_linear_skips_the_output_head_like_peft(tiny):
    names = find_target_modules(tiny, "all-linear")
    assert len(names) == 2 * 7 and not any("lm_head" in n for n in names)


def test_whole_model_outputs_equal_peft(tiny):
    theirs = _peft_model(copy.deepcopy(tiny), r=4, lora_alpha=8, target_modules="all-linear")
    add_lora(tiny, "all-linear", r=4, alpha=8)
    for layer in lora_layers(tiny).values():
        nn.init.normal_(layer.lora_B.weight, std=0.02)
    _copy_adapters_into_peft(tiny, theirs)
    ids = torch.randint(0, 1000, (2, 12))
    with torch.no_grad():
        assert torch.equal(tiny(ids).logits, theirs(ids).logits)


@pytest.mark.parametrize(
    ("targets", "message"),
    [
        (["qq_proj"], "matches no module.*q_proj"),
        ("nothing.*", "matches no module"),
        ([], "empty"),
        (["self_attn"], "not a linear layer"),
        (["mlp"], "not a linear layer"),
        (["embed_tokens"], "not a linear layer"),
    ],
)
def test_bad_targets_raise_before_anything_changes(tiny, targets, message):
    with pytest.raises(ValueError, match=message):
        add_lora(tiny, targets, r=4, alpha=8)
    assert not lora_layers(tiny)
    assert all(p.requires_grad for p in tiny.parameters())  # nothing was frozen either


def test_add_lora_twice_is_refused(tiny):
    add_lora(tiny, ["q_proj"], r=4, alpha=8)
    with pytest.raises(ValueError, match="already has LoRA layers"):
        add_lora(tiny, ["v_proj"], r=4, alpha=8)


def test_merge_lora_gives_back_a_plain_model_with_the_same_outputs(tiny):
    add_lora(tiny, "all-linear", r=4, alpha=8)
    for layer in lora_layers(tiny).values():
        nn.init.normal_(layer.lora_B.weight, std=0.02)
    ids = torch.randint(0, 1000, (2, 12))
    with torch.no_grad():
        before = tiny(ids).logits
        merged = merge_lora(tiny)
        after = tiny(ids).logits
    assert len(merged) == 14 and not lora_layers(tiny)
    assert type(tiny.model.layers[0].self_attn.q_proj) is nn.Linear
    assert (after - before).abs().max() < MERGE_ATOL


def test_merge_lora_refuses_before_it_merges_any_layer(tiny):
    add_lora(tiny, "all-linear", r=4, alpha=8)
    layers = list(lora_layers(tiny).values())
    with torch.no_grad():
        layers[-1].lora_B.weight[0, 0] = math.nan  # only the last layer is broken
    before = {name: p.detach().clone() for name, p in tiny.named_parameters()}
    with pytest.raises(
        ValueError, match=r"refused at model\.layers\.1\.mlp\.down_proj \(no layer was merged\)"
    ):
        merge_lora(tiny)
    assert len(lora_layers(tiny)) == 14 and not any(layer.merged for layer in layers)
    assert all(
        torch.allclose(p, before[name], rtol=0, atol=0, equal_nan=True) for name, p in tiny.named_parameters()
    )


def test_a_merge_that_overflows_the_base_dtype_is_refused():
    layer = LoRALinear(nn.Linear(24, 40).half(), r=4, alpha=8)
    with torch.no_grad():
        layer.base.weight[0, 0] = 65_000.0  # fp16's largest finite value is 65,504
        layer.lora_A.weight.zero_()
        layer.lora_A.weight[0, 0] = 1.0
        layer.lora_B.weight[0, 0] = 500.0  # + 2 * 500 = 66,000: finite in fp32, inf in fp16
    before = layer.base.weight.clone()
    with pytest.raises(ValueError, match="overflows W0's dtype"):
        layer.merge()
    assert torch.equal(layer.base.weight, before) and not layer.merged


def test_lora_state_dict_holds_only_the_adapter(tiny):
    add_lora(tiny, ["q_proj"], r=4, alpha=8)
    state = lora_state_dict(tiny)
    assert sorted(state) == sorted(
        f"model.layers.{i}.self_attn.q_proj.lora_{p}.weight" for i in range(2) for p in ("A", "B")
    )
    assert state["model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 64)


def test_save_and_load_adapter_round_trip(tiny, tmp_path):
    add_lora(tiny, ["q_proj", "down_proj"], r=4, alpha=8)
    for layer in lora_layers(tiny).values():
        nn.init.normal_(layer.lora_B.weight, std=0.02)
    size = save_adapter(tiny, tmp_path / "adapter.safetensors")
    n_adapter = count_parameters(tiny)[0]
    assert n_adapter * 4 < size < n_adapter * 4 + 4096  # fp32 weights plus a small header
    fresh = course.models.tiny_model(seed=0)
    names = load_adapter(fresh, tmp_path / "adapter.safetensors")
    assert names == list(lora_layers(tiny))
    ids = torch.randint(0, 1000, (2, 12))
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, tiny(ids).logits)


@pytest.mark.embedded
def test_embedded_model_parameter_count_matches_peft():
    model, _ = course.models.load_model()
    theirs = _peft_model(copy.deepcopy(model), r=16, lora_alpha=32, target_modules="all-linear")
    names = add_lora(model, "all-linear", r=16, alpha=32)
    assert len(names) == 30 * 7
    assert count_parameters(model) == theirs.get_nb_trainable_parameters() == (4_884_480, 139_399_488)


# --- training with LoRA (course.train) ------------------------------------------------------------


def test_lora_training_lowers_the_loss_and_touches_only_the_adapter(tokenizer):
    model = course.models.tiny_model(seed=0)
    add_lora(model, "all-linear", r=4, alpha=8)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    dataset = course.data.load_task("ticket_routing", "train").select(range(4))  # one batch, seen 10 times
    result = course.train.train(model, tokenizer, dataset, steps=10, lr=1e-2, batch_size=4, progress=False)
    # a random tiny model with a frozen output head learns slowly: measured 10.73 -> 10.20
    assert sum(result.losses[-3:]) / 3 < result.losses[0] - 0.3
    assert all(b < a for a, b in itertools.pairwise(result.losses))  # steadily down
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert any(layer.lora_B.weight.abs().sum() > 0 for layer in lora_layers(model).values())


def test_first_steps_of_a_longer_schedule(tokenizer):
    """steps=k, total_steps=n runs exactly the first k steps of an n-step run."""
    dataset = course.data.load_task("ticket_routing", "train").select(range(12))

    def run(**kwargs):
        model = course.models.tiny_model(seed=0)
        add_lora(model, ["q_proj", "v_proj"], r=4, alpha=8)
        nn.init.normal_(model.model.layers[0].self_attn.q_proj.lora_B.weight, std=0.1)  # not a zero start
        return course.train.train(model, tokenizer, dataset, lr=1e-2, batch_size=4, progress=False, **kwargs)

    assert run(steps=3, total_steps=6).losses == run(steps=6).losses[:3]
    assert run(steps=3).losses != run(steps=6).losses[:3]  # a shorter schedule decays faster
    with pytest.raises(ValueError, match="total_steps"):
        run(steps=3, total_steps=2)


def test_ours_and_peft_train_identically_from_the_same_start(tokenizer):
    dataset = course.data.load_task("event_extraction", "train").select(range(8))
    ours = course.models.tiny_model(seed=0)
    theirs = _peft_model(course.models.tiny_model(seed=0), r=4, lora_alpha=8, target_modules="all-linear")
    add_lora(ours, "all-linear", r=4, alpha=8)
    _copy_adapters_into_peft(ours, theirs)
    kwargs = dict(steps=4, lr=1e-2, batch_size=4, progress=False)
    a = course.train.train(ours, tokenizer, dataset, **kwargs).losses
    b = course.train.train(theirs, tokenizer, dataset, **kwargs).losses
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-5


# --- half precision, non-finite values (issue 13) ----------------------------------------------


def _half_layer_and_peft(dtype):
    """Our LoRALinear and peft's around the same (out 256, in 64) base in `dtype`, same A and B (fp32)."""
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(64, 256).to(dtype))
    theirs = _peft_model(copy.deepcopy(model), r=8, lora_alpha=16, target_modules=["proj"])
    add_lora(model, ["proj"], r=8, alpha=16)
    nn.init.normal_(model.proj.lora_B.weight, std=0.5)
    _copy_adapters_into_peft(model, theirs)
    return model, theirs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_half_precision_outputs_and_merges_equal_peft_bit_for_bit(dtype):
    model, theirs = _half_layer_and_peft(dtype)
    layer, peft_layer = model.proj, theirs.base_model.model.proj
    assert layer.lora_A.weight.dtype == peft_layer.lora_A["default"].weight.dtype == torch.float32
    x = torch.randn(4, 64).to(dtype)
    ours = model(x)
    assert ours.dtype == dtype and torch.equal(ours, theirs(x))
    # The counter-example: rounding the update to the base dtype before adding (the old forward).
    with torch.no_grad():
        update = layer.lora_B(layer.lora_A(x.float())) * layer.scaling
        rounded_first = layer.base(x) + update.to(dtype)
    if dtype != torch.float32:  # about a quarter of the outputs differ; this is what the check catches
        assert (rounded_first != theirs(x)).float().mean() > 0.1
    safe = copy.deepcopy(peft_layer)
    layer.merge()
    peft_layer.merge()  # peft's default merge: weight.data += delta_weight (fp32), rounded once
    safe.merge(safe_merge=True)  # rounds delta_weight to the base dtype first, then adds
    assert torch.equal(layer.base.weight, peft_layer.base_layer.weight)
    assert torch.equal(layer.base.weight, safe.base_layer.weight) == (dtype == torch.float32)
    layer.unmerge()
    peft_layer.unmerge()
    assert torch.equal(layer.base.weight, peft_layer.base_layer.weight)


@pytest.mark.parametrize("alpha", [math.inf, -math.inf, math.nan])
def test_non_finite_alpha_is_refused(alpha):
    with pytest.raises(ValueError, match="alpha must be positive and finite"):
        LoRALinear(nn.Linear(24, 40), r=4, alpha=alpha)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_merging_a_non_finite_adapter_is_refused_and_leaves_the_base_unchanged(bad):
    layer = _layer()
    with torch.no_grad():
        layer.lora_B.weight[3, 1] = bad
    before = layer.base.weight.clone()
    with pytest.raises(ValueError, match="NaN or inf"):
        layer.merge()
    assert torch.equal(layer.base.weight, before) and not layer.merged
    finite = _layer()
    finite.merge()
    with torch.no_grad():
        finite.lora_A.weight[0, 0] = bad  # broken after merging: unmerge must not write it either
    merged = finite.base.weight.clone()
    with pytest.raises(ValueError, match="NaN or inf"):
        finite.unmerge()
    assert torch.equal(finite.base.weight, merged) and finite.merged


def test_load_adapter_refuses_a_missing_or_foreign_file(tiny, tmp_path):
    with pytest.raises(ValueError, match="no adapter file"):
        load_adapter(tiny, tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a safetensors file"):
        load_adapter(tiny, tmp_path / "junk.safetensors")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="no adapter metadata"):
        load_adapter(tiny, tmp_path / "plain.safetensors")
    assert not lora_layers(tiny)
