"""IA3 (Liu et al. 2022, the T-Few paper): learned vectors that rescale activations.

"Infused Adapter by Inhibiting and Amplifying Inner Activations": in every layer, three vectors
multiply, elementwise, the keys, the values and the feed-forward intermediate activation:

    k = l_k * (W_k x)        v = l_v * (W_v x)        y = W_down (l_ff * a),  a = act(W_gate x) * W_up x

all initialized to ones (the model starts unchanged). On SmolLM2 that is 192 + 192 + 1,536 numbers
per layer, 57,600 in all: about 0.04% of the model, fewer than LoRA r=1 on the same layers.

peft's IA3Linear wraps the projection whose output (k_proj, v_proj: `l` of size out_features) or
whose input (down_proj, a "feed-forward module": `l` of size in_features) is scaled. Merging is
an elementwise multiply into the weight, since W (l * x) = (W diag(l)) x and l * (W x) = (diag(l) W) x:

    feed-forward:  W' = W * l[None, :]     (scales the columns)
    keys/values:   W' = W * l[:, None]     (scales the rows; a bias is scaled too)

Worked example: W = [[1, 2], [3, 4]], l = [10, 100]: columns -> [[10, 200], [30, 400]],
rows -> [[10, 20], [300, 400]].

Precision, as peft (`peft/tuners/ia3/layer.py`, `Linear.forward` and `merge`): the vector stays
fp32 beside an fp16/bf16 base (peft's `autocast_adapter_dtype`), the product is formed in fp32 and
rounded once to the base's dtype: the scaled input before the base layer, the scaled output after
it, the scaled weight in a merge. In fp32 every cast is a no-op.

Because the scaling is per row of activations, a batch can in principle give each row its own
vectors (a mixed batch of tenants, T-Few section 3.3); once merged, every row gets the same.
"""

import re

import torch
from torch import nn

from course.lora import _is_linear, find_target_modules, refuse_non_finite

TARGETS = ("k_proj", "v_proj", "down_proj")  # peft's default for Llama (TRANSFORMERS_MODELS_TO_IA3_...)
FEEDFORWARD = ("down_proj",)


def check_base(base: nn.Module) -> None:
    """ValueError unless `base` is a plain nn.Linear; add_ia3 checks every target before it changes anything."""
    if isinstance(base, IA3Linear):
        raise ValueError(
            "this layer already has an IA3 vector (it is an IA3Linear): wrap its `.base`, or merge it first"
        )
    if not isinstance(base, nn.Linear) and isinstance(getattr(base, "base", None), nn.Module):
        raise ValueError(
            f"this layer already holds an adapter ({type(base).__name__} around its linear layer): "
            "merge that adapter first, or start from a fresh model"
        )
    if not isinstance(base, nn.Linear) and _is_linear(base):
        raise ValueError(
            f"IA3Linear wraps a dense nn.Linear (its merge multiplies the vector into the weight), got "
            f"{type(base).__name__}, a linear layer stored quantized: apply IA3 before quantizing (to a fresh "
            "copy of the base model), or use peft's IA3Config, which also wraps bitsandbytes layers"
        )
    if not isinstance(base, nn.Linear):
        raise ValueError(
            f"IA3 rescales the input or output features of a linear layer, got {type(base).__name__}: "
            "target the projections (e.g. k_proj, v_proj, down_proj), not norms or activations"
        )


class IA3Linear(nn.Module):
    """A frozen nn.Linear with a learned scaling vector `ia3_l` on its input (feed-forward) or output."""

    def __init__(self, base: nn.Linear, feedforward: bool):
        super().__init__()
        check_base(base)
        self.base = base
        self.base.requires_grad_(False)
        self.feedforward = feedforward
        size = base.in_features if feedforward else base.out_features
        # ones: the adapted model starts as the base model; fp32 whatever the base's dtype (as peft)
        self.ia3_l = nn.Parameter(torch.ones(size, device=base.weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.feedforward:  # (..., in) * (in,): fp32 product, rounded once to the input's dtype
            return self.base((x * self.ia3_l).to(x.dtype))
        result = self.base(x)  # (..., out)
        return (result * self.ia3_l).to(result.dtype)  # (..., out) * (out,), rounded once

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """An nn.Linear with the scaling multiplied into its weight (and bias): the same outputs, no extra work.

        The product is formed in fp32 and rounded once to the base's dtype: equal bit for bit to
        peft's `merge()`. A vector that would put NaN or inf into the weight is refused with a
        ValueError (as LoRA's merge and peft's `safe_merge`); the layer is left as it was.
        """
        weight, bias = self.base.weight, self.base.bias
        l = self.ia3_l.detach()  # noqa: E741 (the paper's name)
        if self.feedforward:
            new_weight = (weight * l[None, :]).to(weight.dtype)  # (out, in) * (1, in): columns
            new_bias = None if bias is None else bias.detach()
        else:
            new_weight = (weight * l[:, None]).to(weight.dtype)  # (out, in) * (out, 1): rows
            new_bias = None if bias is None else (bias * l).to(bias.dtype)  # (out,) * (out,)
        causes = "the IA3 vector holds non-finite values, or the product overflows the base's dtype"
        refuse_non_finite(new_weight, "the merged weight", causes, unchanged="the layer is unchanged")
        if new_bias is not None:
            refuse_non_finite(new_bias, "the merged bias", causes, unchanged="the layer is unchanged")
        merged = nn.Linear(self.base.in_features, self.base.out_features, bias=bias is not None)
        merged = merged.to(weight.device, weight.dtype)
        merged.weight.copy_(new_weight)
        if bias is not None:
            merged.bias.copy_(new_bias)
        return merged.requires_grad_(False)


def _matches(name: str, targets) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None  # a regex over the full module name, as peft
    return name.split(".")[-1] in targets  # suffixes, as peft's list form


def ia3_layers(model: nn.Module) -> dict[str, IA3Linear]:
    """Every IA3Linear of `model` by name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, IA3Linear)}


def add_ia3(model, target_modules=TARGETS, feedforward_modules=FEEDFORWARD) -> list[str]:
    """Freeze `model` and wrap every target module in IA3Linear; returns the wrapped names.

    target_modules as peft (and course.lora): module names or name endings, or a regex over the
    full name. A refused call (a target that is not a linear layer, a model that already has
    IA3 vectors) leaves the model as it was.
    """
    if existing := ia3_layers(model):
        raise ValueError(
            f"the model already has IA3 vectors ({len(existing)} IA3Linear layers, e.g. {next(iter(existing))!r}): "
            "add_ia3 was applied to it before (re-running the cell does that). Train those vectors, fold them "
            "into the weights with merge_ia3(model), or start again from a fresh copy of the base model."
        )
    if isinstance(feedforward_modules, str) and not isinstance(target_modules, str):
        raise ValueError(
            f"feedforward_modules={feedforward_modules!r} is a string (a regex over full names) but target_modules "
            f"is a list: give feedforward_modules as a list too, e.g. ({feedforward_modules!r},)"
        )
    if not isinstance(target_modules, str):
        missing = [m for m in feedforward_modules if m not in target_modules]
        if missing:
            raise ValueError(
                f"feedforward_modules {missing} must also be in target_modules {list(target_modules)}"
            )
    names = find_target_modules(model, target_modules)  # ValueError naming the linear layers if none match
    for name in names:  # before any IA3Linear freezes its base: a refused call leaves the model as it was
        check_base(model.get_submodule(name))
    layers = {
        name: IA3Linear(model.get_submodule(name), _matches(name, feedforward_modules)) for name in names
    }
    model.requires_grad_(False)
    for name, layer in layers.items():
        layer.ia3_l.requires_grad_(True)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
    return names


def merge_ia3(model) -> int:
    """Replace every IA3Linear by its merged nn.Linear; returns how many were merged.

    Every layer is merged before any is replaced, so a refused merge (NaN or inf) changes nothing;
    its ValueError names the layer that refused.
    """
    merged = {}
    for name, layer in ia3_layers(model).items():
        try:
            merged[name] = layer.merge()
        except ValueError as err:
            raise ValueError(f"merge_ia3 refused at {name} (no layer was replaced): {err}") from None
    for name, linear in merged.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, linear)
    return len(merged)
