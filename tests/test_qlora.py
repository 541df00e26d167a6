"""QLoRA (notebook 07): our 4-bit + LoRA parts against transformers + peft + bitsandbytes,
adapters that refuse the wrong base, and the notebook's graders."""

import warnings

import pytest
import torch

import course
from course import checks, data, lora, quant, train

# --- graders ---------------------------------------------------------------------------------


def _bnb_config(bf16_supported):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16 if bf16_supported else torch.float16,
    )


def _targets(model):
    head = model.get_output_embeddings()
    return [
        name
        for name, m in model.named_modules()
        if isinstance(getattr(m, "in_features", None), int)
        and isinstance(getattr(m, "out_features", None), int)
        and m is not head
    ]


def _stub(*args):
    raise NotImplementedError("Your turn")


def test_bnb_config_grader_passes_the_reference_and_fails_wrong_answers():
    from transformers import BitsAndBytesConfig

    checks.check_qlora_bnb_config(_bnb_config)
    with pytest.raises(AssertionError, match="not implemented yet"):
        checks.check_qlora_bnb_config(_stub)
    fp4 = lambda bf16: BitsAndBytesConfig(  # noqa: E731
        load_in_4bit=True,
        bnb_4bit_quant_type="fp4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    with pytest.raises(AssertionError, match="nf4"):
        checks.check_qlora_bnb_config(fp4)
    no_dq = lambda bf16: BitsAndBytesConfig(  # noqa: E731
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
    )
    with pytest.raises(AssertionError, match="double_quant"):
        checks.check_qlora_bnb_config(no_dq)
    always_bf16 = lambda bf16: _bnb_config(True)  # noqa: E731
    with pytest.raises(AssertionError, match="fp16 on older GPUs"):
        checks.check_qlora_bnb_config(always_bf16)
    with pytest.raises(AssertionError, match="BitsAndBytesConfig"):
        checks.check_qlora_bnb_config(lambda bf16: {"load_in_4bit": True})


def test_targets_grader_passes_the_reference_and_fails_wrong_answers():
    checks.check_qlora_targets(_targets)
    with pytest.raises(AssertionError, match="not implemented yet"):
        checks.check_qlora_targets(_stub)
    with_head = lambda model: [n for n, m in model.named_modules() if hasattr(m, "in_features")]  # noqa: E731
    with pytest.raises(AssertionError, match="output head"):
        checks.check_qlora_targets(with_head)
    only_nn_linear = lambda model: [  # noqa: E731
        n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")
    ]
    with pytest.raises(AssertionError, match="missing"):
        checks.check_qlora_targets(only_nn_linear)
    attention_only = lambda model: [n for n in _targets(model) if "self_attn" in n]  # noqa: E731
    with pytest.raises(AssertionError, match="missing"):
        checks.check_qlora_targets(attention_only)


# --- adapters refuse the wrong base -----------------------------------------------------------


def _saved_adapter(tmp_path, r=4, **config):
    model = course.models.tiny_model(seed=0, **config)
    lora.add_lora(model, "all-linear", r=r, alpha=2 * r)
    path = tmp_path / "adapter.safetensors"
    lora.save_adapter(model, path)
    return path


def test_load_adapter_refuses_another_base_and_leaves_the_model_untouched(tmp_path):
    path = _saved_adapter(tmp_path)
    narrower = course.models.tiny_model(seed=0, hidden_size=32, intermediate_size=64)
    with pytest.raises(ValueError, match="saved for another base model.*64->64 there, 32->32 here"):
        lora.load_adapter(narrower, path)
    assert not lora.lora_layers(narrower)  # refused before anything was wrapped
    shallower = course.models.tiny_model(seed=0, num_hidden_layers=1)
    with pytest.raises(ValueError, match="saved for another base model.*does not have"):
        lora.load_adapter(shallower, path)
    assert not lora.lora_layers(shallower)
    lora.load_adapter(course.models.tiny_model(seed=0), path)  # the right base loads


def test_load_adapter_refuses_tensors_of_another_rank(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = _saved_adapter(tmp_path, r=4)
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    save_file(load_file(str(path)), str(path), metadata={**metadata, "r": "8"})  # header says 8, tensors 4
    with pytest.raises(ValueError, match="rank r=8.*another rank"):
        lora.load_adapter(course.models.tiny_model(seed=0), path)


def test_peft_refuses_an_adapter_saved_for_another_base(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's deprecation note about is_gradient_checkpointing
        model = get_peft_model(course.models.tiny_model(seed=0), LoraConfig(r=4, target_modules="all-linear"))
    model.save_pretrained(tmp_path)
    other = course.models.tiny_model(seed=0, hidden_size=32, intermediate_size=64)
    with pytest.raises(RuntimeError, match="size mismatch for .*q_proj.lora_A"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the same deprecation note
        PeftModel.from_pretrained(other, tmp_path)


# --- our QLoRA against transformers + peft + bitsandbytes -------------------------------------


@pytest.fixture
def qlora_pair(tmp_path):
    """The same tiny Llama as (ours: course.quant.Linear4bit + course.lora) and (bitsandbytes + peft),
    NF4 with double quantization, LoRA r=4 on all linear layers with the same A (B = 0)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    base = course.models.tiny_model(seed=0)
    base.save_pretrained(tmp_path)
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's deprecation note about is_gradient_checkpointing
        theirs = AutoModelForCausalLM.from_pretrained(
            tmp_path, quantization_config=config, device_map={"": "cpu"}
        )
        theirs = get_peft_model(theirs, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    # emulate_cpu_lut: bitsandbytes' CPU rounding of the 8-bit absmax, so the 4-bit weights are identical
    names = quant.quantize_linear_layers(base, double_quant=True, emulate_cpu_lut=True)
    lora.add_lora(base, "all-linear", r=4, alpha=8)
    with torch.no_grad():
        for name, layer in lora.lora_layers(base).items():
            theirs.base_model.model.get_submodule(name).lora_A["default"].weight.copy_(layer.lora_A.weight)
    return base, theirs, names


def test_our_4bit_weights_equal_bitsandbytes(qlora_pair):
    import bitsandbytes as bnb

    ours, theirs, names = qlora_pair
    assert len(names) == 14  # 7 linear layers x 2 decoder layers; lm_head stays in full precision
    for name in names:
        mine = quant.dequantize_4bit(ours.get_submodule(name).base.weight_q)
        layer = theirs.base_model.model.get_submodule(name).base_layer
        assert isinstance(layer, bnb.nn.Linear4bit)
        reference = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
        assert torch.equal(mine, reference.view(mine.shape)), name


def test_our_qlora_trains_like_peft_on_bitsandbytes(qlora_pair, tokenizer):
    """Same weights, same batches, same AdamW: the same losses.

    Both dequantize to the same fp32 weights (bit for bit, tested above) and then run the same
    `F.linear` and the same LoRA arithmetic in fp32 on one CPU, so we expect the very same floats,
    and assert them (a different op order would show as ~1e-6 and fail loudly here).
    """
    ours, theirs, _ = qlora_pair
    dataset = data.load_task("event_extraction", "train").select(range(8))
    hyper = dict(steps=3, lr=1e-2, batch_size=4, progress=False)
    mine = train.train(ours, tokenizer, dataset, **hyper).losses
    reference = train.train(theirs, tokenizer, dataset, **hyper).losses
    assert mine[-1] < mine[0]  # it trains
    assert mine == reference
