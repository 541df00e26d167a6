"""course.export: merged == adapter, fp16 safetensors and GGUF round trips give the same greedy answers."""

import warnings

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model

import course
from course import export

PROMPTS = ["<|im_start|>user\nlights off<|im_end|>\n<|im_start|>assistant\n", "timer 5 min please"]


def _peft(model, seed=0):
    torch.manual_seed(seed)
    with warnings.catch_warnings():  # peft 0.21.2 reads a property transformers 5 deprecates
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
        return get_peft_model(model, config).eval()


def _greedy(model, tokenizer, n=6):
    enc = course.train.left_padded(tokenizer, PROMPTS, "cpu")
    out = model.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return out[:, enc["input_ids"].shape[1] :].tolist()


def _fp16_exact(model):
    """A tiny model whose weights are fp16 values (held in fp32): the F16 round trip must be lossless."""
    return model.to(torch.float16).to(torch.float32)


def test_permute_qk_is_undone_by_transformers_gguf_loader():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    assert export.permute_qk(np.arange(4.0)[:, None], n_head=1)[:, 0].tolist() == [0, 2, 1, 3]
    weight = np.random.default_rng(0).standard_normal((12, 5))
    undo = LlamaTensorProcessor(config={})._reverse_permute_weights
    assert np.array_equal(undo(export.permute_qk(weight, 3), 3, 3), weight)
    assert not np.array_equal(undo(weight, 3, 3), weight)  # without our permutation the loader scrambles q/k
    with pytest.raises(ValueError, match="heads"):
        export.permute_qk(weight, 5)


def test_merge_equals_the_adapter_model_and_fp16_reload_gives_the_same_greedy_answers(tmp_path, tokenizer):
    adapter = _peft(course.models.tiny_model())
    ids = torch.tensor([tokenizer(PROMPTS[0])["input_ids"]])
    merged = export.merge_adapter(adapter)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    with torch.no_grad():
        diff = (merged(ids).logits - adapter(input_ids=ids).logits).abs().max().item()
    assert diff < 1e-5  # fp32: W + scaling * B A folds the same sum in another order
    folder = export.save_fp16(merged, tokenizer, tmp_path / "merged")
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert next(AutoModelForCausalLM.from_pretrained(folder).parameters()).dtype == torch.float16
    assert _greedy(reloaded, tokenizer) == _greedy(adapter, tokenizer)


def test_dequantize_then_merge_matches_the_4bit_adapter_model(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    course.models.tiny_model().save_pretrained(tmp_path / "tiny")
    nf4 = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    base4 = AutoModelForCausalLM.from_pretrained(
        tmp_path / "tiny", quantization_config=nf4, device_map={"": "cpu"}
    )
    course.kernel_path.use_reference_kernel(base4)  # as course.models.load_model does: no in-place repack
    adapter = _peft(base4)
    ids = torch.tensor([tokenizer(PROMPTS[0])["input_ids"]])
    with torch.no_grad():
        want = adapter(input_ids=ids).logits  # eval mode on the reference path: dequantize, then F.linear
    merged = export.merge_adapter(adapter)  # dequantize-then-merge
    with torch.no_grad():
        diff = (merged(ids).logits - want).abs().max().item()
    assert diff < 1e-4
    # counter-example: merging into the original fp32 weights is not what was trained against
    naive = export.merge_adapter(_peft(course.models.tiny_model()))
    with torch.no_grad():
        assert (naive(ids).logits - want).abs().max().item() > 10 * diff


@pytest.mark.parametrize("gguf_type", export.GGUF_TYPES)
def test_gguf_round_trip_through_transformers_loader(tmp_path, tokenizer, gguf_type):
    model = _fp16_exact(export.merge_adapter(_peft(course.models.tiny_model())))
    path = export.write_gguf(model, tokenizer, tmp_path / f"tiny-{gguf_type}.gguf", gguf_type)
    loaded, loaded_tokenizer = export.load_gguf(path, with_tokenizer=gguf_type == "F16")
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert set(ours) == set(theirs)
    errors = {name: (ours[name] - theirs[name]).abs().max().item() for name in ours}
    if gguf_type == "F16":
        assert max(errors.values()) == 0.0  # fp16 values stored as F16: lossless, q/k permutation undone
        assert _greedy(loaded, loaded_tokenizer) == _greedy(model, tokenizer)
        assert loaded_tokenizer.chat_template == tokenizer.chat_template
        assert loaded_tokenizer.eos_token == "<|im_end|>"
    else:  # Q8_0: 32 values share one fp16 scale absmax/127: off by half a step plus the scale's fp16 rounding
        for name, error in errors.items():
            bound = 0.0 if ours[name].ndim == 1 else ours[name].abs().max().item() / 127 * 0.6
            assert error <= bound + 1e-6, name
        assert max(errors.values()) > 0
    with pytest.raises(ValueError, match="F16"):
        export.write_gguf(model, tokenizer, tmp_path / "x.gguf", "Q4_K")


@pytest.mark.embedded
def test_gguf_tokenizer_metadata_equals_the_shipped_smollm2_file(tmp_path, tokenizer):
    import gguf

    from course.models import _gguf_path

    path = export.write_gguf(course.models.tiny_model(num_hidden_layers=1), tokenizer, tmp_path / "t.gguf")
    shipped, ours = gguf.GGUFReader(_gguf_path()), gguf.GGUFReader(path)

    def value(reader, key):
        field = reader.fields[key]
        return [bytes(field.parts[i]) for i in field.data]

    for key in ("tokens", "token_type", "merges", "bos_token_id", "eos_token_id", "padding_token_id", "pre"):
        assert value(ours, f"tokenizer.ggml.{key}") == value(shipped, f"tokenizer.ggml.{key}"), key
    assert value(ours, "tokenizer.chat_template") == value(shipped, "tokenizer.chat_template")


def test_modelfile_has_from_template_and_stop_tokens(tokenizer):
    text = export.modelfile("model-f16.gguf", tokenizer, system="Reply with one call.")
    assert text.startswith("FROM ./model-f16.gguf\n")
    assert "{{ .Prompt }}<|im_end|>" in text and 'PARAMETER stop "<|im_end|>"' in text
    assert 'SYSTEM """Reply with one call."""' in text

    class Other:
        chat_template, eos_token = "[INST] {{ messages }} [/INST]", "</s>"

    with pytest.raises(ValueError, match="ChatML"):
        export.modelfile("m.gguf", Other())
