"""Graders for notebook 07 (QLoRA training with transformers, peft and bitsandbytes)."""

from collections.abc import Callable

from course.checks._grader import _Grader, _run

# The QLoRA recipe's 4-bit storage (Dettmers et al. 2023, Sec. 3): NormalFloat-4, double quantization.
_QLORA_FIELDS = {
    "load_in_4bit": (True, "store the frozen base in 4 bits (load_in_4bit=True)"),
    "load_in_8bit": (False, "4 bits, not LLM.int8(): leave load_in_8bit off"),
    "bnb_4bit_quant_type": ("nf4", "the data type is NormalFloat-4, 'nf4' (notebook 04), not 'fp4'"),
    "bnb_4bit_use_double_quant": (
        True,
        "quantize the absmax constants too: bnb_4bit_use_double_quant=True (notebook 05)",
    ),
}


def check_qlora_bnb_config(fn: Callable) -> None:
    """fn(bf16_supported) -> transformers.BitsAndBytesConfig for QLoRA on that GPU.

    NF4 storage, double quantization, 16-bit compute: bf16 where the GPU has it, fp16 otherwise.
    """
    import torch
    from transformers import BitsAndBytesConfig

    grader = _Grader("qlora_bnb_config")
    for bf16_supported, dtype in ((True, torch.bfloat16), (False, torch.float16)):
        config = _run(grader, fn, (bf16_supported,), f"fn({bf16_supported})")
        grader.expect(
            isinstance(config, BitsAndBytesConfig),
            f"fn({bf16_supported}) should return a transformers.BitsAndBytesConfig, got {type(config).__name__}.",
        )
        for field, (want, hint) in _QLORA_FIELDS.items():
            got = getattr(config, field)
            grader.expect(got == want, f"fn({bf16_supported}): {field} is {got!r}; {hint}.")
        got = config.bnb_4bit_compute_dtype
        grader.expect(
            got == dtype,
            f"fn({bf16_supported}): bnb_4bit_compute_dtype is {got}, expected {dtype}. The weights are "
            "dequantized to this dtype for every matmul: bf16 where the GPU supports it (Ampere or newer), "
            "fp16 on older GPUs such as a T4.",
        )
    grader.passed(2)


def _quantized_tiny(seed: int):
    """A tiny Llama whose linear layers are our 4-bit `Linear4bit` (not nn.Linear subclasses)."""
    from course.models import tiny_model
    from course.quant import quantize_linear_layers

    model = tiny_model(seed=seed, hidden_size=32, intermediate_size=64)
    quantize_linear_layers(model, blocksize=32)
    return model


def check_qlora_targets(fn: Callable) -> None:
    """fn(model) -> names of every linear layer to wrap with LoRA, output head excluded, in model order."""
    from course.lora import find_target_modules
    from course.models import tiny_model

    grader = _Grader("qlora_targets")
    untied = tiny_model(seed=1, hidden_size=32, intermediate_size=64, tie_word_embeddings=False)
    cases = {
        "a tiny Llama (nn.Linear layers)": tiny_model(seed=0, hidden_size=32, intermediate_size=64),
        "a tiny Llama quantized by course.quant (Linear4bit layers)": _quantized_tiny(seed=0),
        "a tiny Llama with its own output head": untied,
        "a tiny Llama with 3 layers": tiny_model(
            seed=2, hidden_size=32, intermediate_size=64, num_hidden_layers=3
        ),
    }
    for label, model in cases.items():
        want = find_target_modules(model, "all-linear")
        got = _run(grader, fn, (model,), f"fn(<{label}>)")
        grader.expect(
            isinstance(got, list | tuple), f"expected a list of module names, got {type(got).__name__}."
        )
        got = list(got)
        head = [name for name, m in model.named_modules() if m is model.get_output_embeddings()]
        grader.expect(
            not set(head) & set(got),
            f"for {label}: {head[0]!r} is the output head. It maps to the vocabulary and is tied to (or as large "
            "as) the embeddings: QLoRA keeps it in 16 bits and does not adapt it.",
        )
        missing = [name for name in want if name not in got]
        grader.expect(
            not missing,
            f"for {label}: missing {missing[:3]} ({len(missing)} in all). Hint: a quantized layer is not always an "
            "nn.Linear subclass; recognise a linear layer by its integer in_features and out_features.",
        )
        extra = [name for name in got if name not in want]
        grader.expect(not extra, f"for {label}: {extra[:3]} are not linear layers to adapt.")
        grader.expect(
            got == want, f"for {label}: give each name once, in the order of model.named_modules()."
        )
        grader.expect(
            all(isinstance(model.get_submodule(n).in_features, int) for n in got),
            f"for {label}: every name must be a linear layer.",
        )
    grader.passed(len(cases))
