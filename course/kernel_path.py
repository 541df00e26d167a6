"""Which kernel bitsandbytes runs for a 4-bit layer on a CPU, and how the course keeps one path.

bitsandbytes 0.50 has two CPU paths for `bnb.nn.Linear4bit.forward`:

- **reference**: decode the NF4/FP4 weight (`dequantize_4bit`) and multiply with `F.linear` in
  the compute dtype. Training always takes it, and so does every CPU without AVX512-BF16 (most
  laptops, Apple silicon, ARM, most hosted CI runners).
- **bf16**: on a CPU with AVX512-BF16, in eval mode without grad, the forward first *repacks
  `weight.data` in place* into a tiled layout for a bf16 kernel (`_convert_weight_packed_for_cpu`)
  and sets `quant_state.packing_format_for_cpu`. Everything that decodes the weight afterwards
  (peft's `merge_and_unload`, `dequantize_4bit`, our export) reads the tiled bytes as if they were
  the original layout: uncorrelated garbage (relative error about sqrt(2)). bitsandbytes' inverse
  (`_convert_weight_packed_for_cpu_inverse`, called by its `state_dict`) is not exact: the absmax
  comes back rounded to bf16, and without double quantization the weight comes back wrong.
  The open upstream issue bitsandbytes-foundation/bitsandbytes#2078 reports the same corruption
  through `.to()`.

So a result computed after an eval forward depends on the learner's CPU. The course keeps every
CPU on the reference path: `use_reference_kernel(model)` clears the per-layer switch
(`support_avx512bf16_for_cpu`, which the forward reads before repacking) on every 4-bit layer;
`course.models.load_model` and `course.train.train` call it. A layer that bitsandbytes already
repacked cannot be trusted any more: `check_not_repacked` refuses it with `RepackedWeightError`
instead of decoding a silently different weight. What the switch costs in speed is measured in
`benchmarks/results/kernel_path.md`.

Worked example (a model without 4-bit layers has nothing to switch):

>>> import torch
>>> use_reference_kernel(torch.nn.Linear(4, 2))
0
>>> repacked_layers(torch.nn.Linear(4, 2))
[]
"""

import torch

REFERENCE, BF16 = "reference", "bf16"
UPSTREAM_ISSUE = "bitsandbytes-foundation/bitsandbytes#2078"


class RepackedWeightError(RuntimeError):
    """A 4-bit weight that bitsandbytes' bf16 CPU kernel repacked in place: it no longer decodes to what was trained."""


def has_bf16_kernel() -> bool:
    """bitsandbytes' own probe: would an eval forward on this CPU repack 4-bit weights (AVX512-BF16)?"""
    from bitsandbytes.functional import has_avx512bf16

    return bool(has_avx512bf16())


def _linear4bit_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(name, layer) of every bitsandbytes Linear4bit in `model`; [] without importing bitsandbytes when none can exist."""
    if not any(getattr(p, "quant_state", None) is not None for p in model.parameters()):
        return []
    import bitsandbytes as bnb

    return [(name, m) for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]


def is_repacked(weight: torch.Tensor) -> bool:
    """True when a bitsandbytes 4-bit weight is in the bf16 kernel's tiled layout (it decodes wrongly)."""
    return bool(getattr(getattr(weight, "quant_state", None), "packing_format_for_cpu", False))


def repacked_layers(model: torch.nn.Module) -> list[str]:
    """Names of the 4-bit layers whose weight bitsandbytes has already repacked."""
    return [name for name, layer in _linear4bit_layers(model) if is_repacked(layer.weight)]


def check_not_repacked(model: torch.nn.Module, what: str) -> None:
    """Refuse to `what` (decode, merge, train) a model or layer with a 4-bit weight repacked in place."""
    names = [name or type(model).__name__ for name in repacked_layers(model)]
    if names:
        raise RepackedWeightError(
            f"cannot {what}: {len(names)} 4-bit weights (e.g. {names[0]}) were repacked in place by bitsandbytes' "
            "AVX512-BF16 kernel at an eval-mode forward, and no longer decode to the trained weight "
            f"({UPSTREAM_ISSUE}; its inverse is not exact). Reload the model with course.models.load_model, or call "
            "course.kernel_path.use_reference_kernel(model) before the first eval-mode forward."
        )


def use_reference_kernel(model: torch.nn.Module) -> int:
    """Make every bitsandbytes 4-bit layer of `model` take the reference path; returns how many layers.

    After it, an eval forward decodes and multiplies exactly as training does, on every CPU, and
    leaves `weight.data` untouched. Refuses a model already repacked (`RepackedWeightError`).
    """
    check_not_repacked(model, "switch kernels")
    layers = _linear4bit_layers(model)
    for _, layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def allow_bf16_kernel(model: torch.nn.Module) -> int:
    """Give every 4-bit layer back bitsandbytes' own choice (the bf16 path where the CPU has it): for the lesson and the speed benchmark."""
    enabled = has_bf16_kernel() if (layers := _linear4bit_layers(model)) else False
    for _, layer in layers:
        layer.support_avx512bf16_for_cpu = enabled
    return len(layers)


def kernel_path(model: torch.nn.Module) -> str:
    """ "bf16" when an eval forward of `model` on this CPU would run (and repack for) the bf16 kernel, else "reference"."""
    layers = _linear4bit_layers(model)
    if any(
        getattr(layer, "support_avx512bf16_for_cpu", False) or is_repacked(layer.weight)
        for _, layer in layers
    ):
        return BF16
    return REFERENCE
