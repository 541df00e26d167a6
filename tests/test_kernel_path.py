"""course.kernel_path: bitsandbytes' in-place repack on an AVX512-BF16 CPU, and the course's safe path.

The corruption is shown where this CPU takes the bf16 path (skipped elsewhere); the safe path is
checked on every CPU, with and without double quantization.
"""

import os
import subprocess
import sys
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from bitsandbytes.functional import dequantize_4bit

import course
from course import export, kernel_path

needs_bf16_kernel = pytest.mark.skipif(
    not kernel_path.has_bf16_kernel(), reason="this CPU has no AVX512-BF16: bitsandbytes never repacks here"
)


def _layer(double_quant: bool, seed: int = 0) -> bnb.nn.Linear4bit:
    """A 192 x 576 NF4 layer (the embedded model's k/v projection shape), quantized by bitsandbytes."""
    torch.manual_seed(seed)
    linear = torch.nn.Linear(576, 192, bias=False)
    layer = bnb.nn.Linear4bit(
        576, 192, bias=False, compute_dtype=torch.float32, compress_statistics=double_quant, quant_type="nf4"
    )
    layer.weight = bnb.nn.Params4bit(
        linear.weight.data.clone(), requires_grad=False, compress_statistics=double_quant, quant_type="nf4"
    )
    return layer.to("cpu")  # Params4bit quantizes when moved to a device


def _decode(layer) -> torch.Tensor:
    return dequantize_4bit(layer.weight.data, layer.weight.quant_state).view(192, 576)


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _eval_forward(layer, x):
    layer.eval()
    with torch.no_grad():
        return layer(x)


@needs_bf16_kernel
@pytest.mark.parametrize("double_quant", [True, False])
def test_an_eval_forward_on_the_bf16_path_corrupts_a_later_decode(double_quant):
    layer = _layer(double_quant)
    before = _decode(layer)
    _eval_forward(layer, torch.randn(4, 576))
    assert kernel_path.repacked_layers(layer) == [""]
    assert _relative_error(_decode(layer), before) > 1.0  # uncorrelated: about sqrt(2)
    with pytest.raises(kernel_path.RepackedWeightError, match="repacked in place"):
        export._dense_weight(layer)  # the course refuses instead of decoding the wrong weight
    with pytest.raises(kernel_path.RepackedWeightError, match="load_model"):
        kernel_path.use_reference_kernel(layer)


@needs_bf16_kernel
@pytest.mark.parametrize(("double_quant", "at_least"), [(True, 1e-3), (False, 1e-2)])
def test_bitsandbytes_own_inverse_is_not_exact(double_quant, at_least):
    # why _dense_weight refuses rather than undoing the repack as bitsandbytes' state_dict does:
    # the absmax comes back in bf16 (measured here: 1.8e-3 with double quantization, 2.1e-2 without)
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    layer = _layer(double_quant)
    before = _decode(layer)
    _eval_forward(layer, torch.randn(4, 576))
    data, state = _convert_weight_packed_for_cpu_inverse(layer.weight.data, layer.weight.quant_state)
    assert _relative_error(dequantize_4bit(data, state).view(192, 576), before) > at_least


@pytest.mark.parametrize("double_quant", [True, False])
def test_the_reference_path_keeps_decode_eval_and_training_exact(double_quant):
    layer = _layer(double_quant)
    assert kernel_path.use_reference_kernel(layer) == 1
    assert kernel_path.kernel_path(layer) == kernel_path.REFERENCE
    before = _decode(layer).clone()
    x = torch.randn(4, 576)
    layer.train()
    with torch.no_grad():
        train_before = layer(x)
    evaluated = _eval_forward(layer, x)
    layer.train()
    with torch.no_grad():
        train_after = layer(x)
    assert kernel_path.repacked_layers(layer) == []
    assert torch.equal(_decode(layer), before)
    assert torch.equal(evaluated, train_before)  # eval computes as training does
    assert torch.equal(train_after, train_before)  # an evaluation does not change the rest of a run
    assert torch.equal(evaluated, torch.nn.functional.linear(x, before))
    assert torch.equal(export._dense_weight(layer), before)


def test_allow_bf16_kernel_gives_back_bitsandbytes_choice():
    layer = _layer(double_quant=True)
    kernel_path.use_reference_kernel(layer)
    kernel_path.allow_bf16_kernel(layer)
    want = kernel_path.BF16 if kernel_path.has_bf16_kernel() else kernel_path.REFERENCE
    assert kernel_path.kernel_path(layer) == want


@pytest.fixture
def tiny_nf4(tmp_path, tokenizer):
    from transformers import BitsAndBytesConfig

    course.models.tiny_model().save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    return tmp_path / "tiny", config


def test_load_model_and_evaluation_keep_the_reference_path(tiny_nf4, tokenizer):
    from transformers import AutoModelForCausalLM

    path, config = tiny_nf4
    loaded, _ = course.models.load_model(str(path), quantization="nf4", device="cpu")
    assert kernel_path.kernel_path(loaded) == kernel_path.REFERENCE
    # a model built by transformers directly starts with bitsandbytes' own choice; evaluating pins it
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map={"": "cpu"})
    dataset = course.data.load_task("event_extraction", "validation").select(range(2))
    course.train.perplexity(model, tokenizer, dataset)
    assert kernel_path.kernel_path(model) == kernel_path.REFERENCE
    assert kernel_path.repacked_layers(model) == []


@needs_bf16_kernel
def test_training_refuses_a_model_that_was_already_repacked(tiny_nf4, tokenizer):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    path, config = tiny_nf4
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map={"": "cpu"})
    with torch.no_grad():
        model.eval()(input_ids=torch.tensor([[1, 2, 3]]))  # bitsandbytes' own path: repacks every layer
    model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    dataset = course.data.load_task("event_extraction", "train").select(range(4))
    with pytest.raises(kernel_path.RepackedWeightError, match="train"):
        course.train.train(model, tokenizer, dataset, steps=1, lr=1e-3, batch_size=2, progress=False)
    with pytest.raises(kernel_path.RepackedWeightError):
        export.merge_adapter(model)


_PROBE = """
import bitsandbytes as bnb, torch
from bitsandbytes.functional import has_avx512bf16
layer = bnb.nn.Linear4bit(64, 32, bias=False, compute_dtype=torch.float32, quant_type="nf4")
layer.weight = bnb.nn.Params4bit(torch.randn(32, 64), requires_grad=False, quant_type="nf4")
layer = layer.to("cpu").eval()
with torch.no_grad():
    layer(torch.randn(2, 64))
print(bool(has_avx512bf16()), bool(getattr(layer.weight.quant_state, "packing_format_for_cpu", False)))
"""


def _probe(env_extra: dict) -> list[str]:
    """(bitsandbytes' probe, whether an eval forward repacked) in a fresh Python with `env_extra` set."""

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "ATEN_CPU_CAPABILITY")} | env_extra
    done = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env, check=True)
    return done.stdout.split()[-2:]


def test_the_emulated_cpu_without_bf16_takes_the_reference_path():
    folder = Path(__file__).parent / "cpu_without_bf16"
    assert _probe({"PYTHONPATH": str(folder), "ATEN_CPU_CAPABILITY": "avx2"}) == ["False", "False"]
    if (
        kernel_path.has_bf16_kernel()
    ):  # the counter-example: without the emulation the same script repacks here
        assert _probe({}) == ["True", "True"]
