"""bitsandbytes' two CPU paths for a 4-bit layer, measured on the embedded model (course.kernel_path).

    .venv/bin/python benchmarks/kernel_path.py

Run it on a CPU with AVX512-BF16 (it refuses elsewhere: there is one path only) and without the
tests/cpu_without_bf16 emulation. It measures, on SmolLM2-135M in NF4 + double quantization with a
LoRA adapter trained for a few steps:

- what one eval-mode forward does to a later decode: the relative error of `dequantize_4bit` after
  it, and of bitsandbytes' own inverse with and without double quantization;
- peft's 4-bit `merge_and_unload` after that evaluation, as notebook 07 section 5 measures it: the
  re-quantization error as a share of the LoRA update, against the same merge on the reference path;
- the bf16 kernel's deviation from fp32 on one layer, beside a bf16 emulation's;
- what the reference path costs: greedy generation of test answers through the 4-bit model,
  repeated, on both paths (course.stats.compare_timings), and whether the answers agree
  (course.stats.compare_hits on the per-example exact-match hits, stored in the report).

Writes benchmarks/results/kernel_path.json and kernel_path.md; notebook 07 section 5b quotes them.
"""

import copy
import json
import platform
import statistics
import time
import warnings
from importlib import metadata
from pathlib import Path

import bitsandbytes as bnb
import torch
from peft import LoraConfig, get_peft_model
from transformers import GenerationConfig
from transformers.utils import logging as hf_logging

import course
from course import kernel_path
from course.stats import compare_hits, compare_timings, repeat_timing

RESULTS = Path(__file__).resolve().parent / "results"
STEPS, LR, R, ALPHA = 5, 2e-3, 16, 32  # a short QLoRA run: the update is of a trained adapter's size
N_ANSWERS, REPEATS, MAX_NEW_TOKENS = 16, 3, 40  # 40 tokens: longer than every reference answer


def _decode(layer) -> torch.Tensor:
    return bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).view(
        layer.weight.quant_state.shape
    )


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _linear4bit(weight: torch.Tensor, double_quant: bool) -> bnb.nn.Linear4bit:
    out_features, in_features = weight.shape
    layer = bnb.nn.Linear4bit(
        in_features, out_features, bias=False, compute_dtype=torch.float32, compress_statistics=double_quant
    )
    layer.weight = bnb.nn.Params4bit(
        weight.clone(), requires_grad=False, compress_statistics=double_quant, quant_type="nf4"
    )
    return layer.to("cpu")


def layer_measures(weight: torch.Tensor) -> dict:
    """Decode after one eval forward, bitsandbytes' inverse, and the bf16 kernel's deviation, on one real weight."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    out = {}
    x = torch.randn(8, weight.shape[1], generator=torch.Generator().manual_seed(0))  # (B, in)
    for double_quant in (True, False):
        layer = _linear4bit(weight, double_quant)
        before = _decode(layer).clone()
        fp32 = torch.nn.functional.linear(x, before)  # (B, out)
        emulation = torch.nn.functional.linear(x.bfloat16(), before.bfloat16()).float()
        with torch.no_grad():
            kernel = layer.eval()(x)  # repacks in place, then the bf16 kernel
        assert kernel_path.is_repacked(layer.weight)
        suffix = "dq" if double_quant else "no_dq"
        out[f"decode_error_{suffix}"] = _relative(_decode(layer), before)
        data, state = _convert_weight_packed_for_cpu_inverse(layer.weight.data, layer.weight.quant_state)
        out[f"inverse_error_{suffix}"] = _relative(
            bnb.functional.dequantize_4bit(data, state).view(before.shape), before
        )
        if double_quant:
            scale = fp32.abs().max().item()
            out["bf16_kernel_deviation"] = {
                "kernel_vs_fp32": (kernel - fp32).abs().max().item() / scale,
                "emulation_vs_fp32": (emulation - fp32).abs().max().item() / scale,
                "kernel_vs_emulation": (kernel - emulation).abs().max().item() / scale,
            }
    return out


def requantization_error(merged_4bit, adapter_model, exact: dict) -> float:
    """||re-quantized merge - exact fp32 merge|| / ||update|| over every 4-bit layer (notebook 07, section 5)."""
    lost = update = 0.0
    for name, m in merged_4bit.named_modules():
        if isinstance(m, bnb.nn.Linear4bit):
            delta = adapter_model.base_model.model.get_submodule(name).get_delta_weight("default")
            lost += (_decode(m) - exact[name]).pow(2).sum().item()
            update += delta.pow(2).sum().item()
    return (lost / update) ** 0.5


def main() -> dict:
    if not kernel_path.has_bf16_kernel():
        raise SystemExit(
            "this CPU has no AVX512-BF16 (or the emulation is on): bitsandbytes takes one path only"
        )
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore")  # peft's 4-bit merge warning and deprecations: measured, not shown
    course.env.seed_everything(0)
    model, tokenizer = course.models.load_model(quantization="nf4", double_quant=True)  # the reference path
    report = {"cpu": f"{platform.machine()} with AVX512-BF16, {torch.get_num_threads()} threads"}
    report |= layer_measures(_decode(model.model.layers[0].mlp.up_proj))  # (1536, 576)
    adapter = get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, target_modules="all-linear"))
    train_set = course.data.load_task("event_extraction", "train")
    course.train.train(adapter, tokenizer, train_set, steps=STEPS, lr=LR, batch_size=8, progress=False)
    exact = {
        name.removesuffix(".base_layer"): _decode(m)
        + adapter.base_model.model.get_submodule(name.removesuffix(".base_layer")).get_delta_weight("default")
        for name, m in adapter.base_model.model.named_modules()
        if isinstance(m, bnb.nn.Linear4bit)
    }  # the exact fp32 merge of every layer
    report["merge_error_reference"] = requantization_error(
        copy.deepcopy(adapter).merge_and_unload(), adapter, exact
    )
    bf16 = copy.deepcopy(adapter)
    kernel_path.allow_bf16_kernel(bf16)
    test_set = course.data.load_task("event_extraction", "test").select(range(N_ANSWERS))
    probe = course.data.collate(
        [course.data.tokenize_for_training(tokenizer, ex) for ex in test_set.select(range(4))],
        tokenizer.pad_token_id,
    )
    with torch.no_grad():
        bf16.eval()(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"])  # one evaluation
    report["layers_repacked"] = len(kernel_path.repacked_layers(bf16))
    report["merge_error_after_eval"] = requantization_error(
        copy.deepcopy(bf16).merge_and_unload(), adapter, exact
    )
    layer = next(m for m in bf16.modules() if isinstance(m, bnb.nn.Linear4bit))
    report["decode_error_after_eval"] = report.pop("decode_error_dq")  # the model's own setting: NF4 + DQ
    assert kernel_path.is_repacked(layer.weight)

    # course.train's evaluation refuses a repacked model, so this one generates with transformers directly
    prompts = [course.data.format_prompt(tokenizer, ex) for ex in test_set]
    enc = course.train.left_padded(tokenizer, prompts, "cpu")  # (B, T) left-padded prompts
    config = GenerationConfig(
        max_new_tokens=MAX_NEW_TOKENS,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    answers, seconds = {}, {}
    for label, m in (("reference", adapter.eval()), ("bf16 kernel", bf16)):

        def run(m=m, label=label):
            out = m.generate(**enc, generation_config=config)  # (B, T + new)
            answers[label] = [
                a.strip()
                for a in tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            ]

        with torch.no_grad():
            seconds[label] = repeat_timing(run, repeats=REPEATS, warmup=1)
    references = list(test_set["output"])
    hits = {label: course.data.exact_match_hits(a, references) for label, a in answers.items()}
    timing = compare_timings("bf16 kernel", seconds["bf16 kernel"], "reference", seconds["reference"])
    report["eval_speed"] = {"seconds": seconds, "verdict": str(timing)}
    report["answers"] = {
        "hits": hits,
        "same_answers": sum(
            a == b for a, b in zip(answers["reference"], answers["bf16 kernel"], strict=True)
        ),
        "n": N_ANSWERS,
        "verdict": str(compare_hits("reference", hits["reference"], "bf16 kernel", hits["bf16 kernel"])),
    }
    report["date"] = time.strftime("%Y-%m-%d")
    report["versions"] = {p: metadata.version(p) for p in ("torch", "bitsandbytes", "peft")}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "kernel_path.json").write_text(json.dumps(report, indent=1) + "\n")
    (RESULTS / "kernel_path.md").write_text(markdown(report))
    print(markdown(report))
    return report


def _median_ratio(r: dict) -> float:
    seconds = r["eval_speed"]["seconds"]
    return statistics.median(seconds["reference"]) / statistics.median(seconds["bf16 kernel"])


def markdown(r: dict) -> str:
    k = r["bf16_kernel_deviation"]
    return "\n".join(
        [
            "# bitsandbytes' two CPU paths (benchmarks/kernel_path.py)",
            "",
            f"Measured on {r['cpu']}, {r['date']} (bitsandbytes {r['versions']['bitsandbytes']}), SmolLM2-135M in",
            f"NF4 + double quantization, LoRA r={R} on all linear layers trained {STEPS} steps at lr {LR:g}.",
            "",
            "## What one eval-mode forward does to the 4-bit weights",
            "",
            f"- weights repacked in place by one evaluation: {r['layers_repacked']} of 210",
            f"- `dequantize_4bit` afterwards, relative error against the decode before: {r['decode_error_after_eval']:.2f}"
            f" with double quantization, {r['decode_error_no_dq']:.2f} without (uncorrelated weights give sqrt(2) = 1.41)",
            f"- bitsandbytes' own inverse (what its state_dict calls): {r['inverse_error_dq']:.1e} with double"
            f" quantization, {r['inverse_error_no_dq']:.1e} without: not exact",
            f"- peft's 4-bit `merge_and_unload` after that evaluation: re-quantization error {r['merge_error_after_eval']:.0%}"
            f" of the LoRA update; on the reference path {r['merge_error_reference']:.0%}",
            "",
            "## The bf16 kernel itself (one 1536 x 576 layer, in units of the largest output)",
            "",
            f"- against fp32: {k['kernel_vs_fp32']:.1e}; a bf16 emulation (F.linear of bf16-rounded input and weight)"
            f" against fp32: {k['emulation_vs_fp32']:.1e}; kernel against emulation: {k['kernel_vs_emulation']:.1e}",
            "",
            "## What the reference path costs",
            "",
            f"Greedy answers to {r['answers']['n']} test examples through the 4-bit model + adapter, {REPEATS} repeats each:",
            "",
            f"- {r['eval_speed']['verdict']}",
            f"- the same answer on {r['answers']['same_answers']} of {r['answers']['n']}; exact match: {r['answers']['verdict']}",
            "",
            f"On this CPU the reference path takes {_median_ratio(r):.1f}x the bf16 kernel's time to generate (medians);",
            "a CPU without AVX512-BF16 has the reference path only. The course keeps every CPU on it",
            "(course.kernel_path.use_reference_kernel, called by course.models.load_model and course.train), so that",
            "its results do not depend on the learner's CPU, and pays that factor where 4-bit layers generate:",
            "notebook 07 generates its test answers with the merged fp32 model instead.",
            "",
        ]
    )


if __name__ == "__main__":
    main()
