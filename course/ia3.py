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

Because the scaling is per row of activations, a batch can in principle give each row its own
vectors (a mixed batch of tenants, T-Few section 3.3); once merged, every row gets the same.
"""

import re

import torch
from torch import nn

TARGETS = ("k_proj", "v_proj", "down_proj")  # peft's default for Llama (TRANSFORMERS_MODELS_TO_IA3_...)
FEEDFORWARD = ("down_proj",)


class IA3Linear(nn.Module):
    """A frozen nn.Linear with a learned scaling vector `ia3_l` on its input (feed-forward) or output."""

    def __init__(self, base: nn.Linear, feedforward: bool):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise ValueError(
                f"IA3 rescales the input or output features of a linear layer, got {type(base).__name__}: "
                "target the projections (e.g. k_proj, v_proj, down_proj), not norms or activations"
            )
        self.base = base
        self.base.requires_grad_(False)
        self.feedforward = feedforward
        size = base.in_features if feedforward else base.out_features
        self.ia3_l = nn.Parameter(torch.ones(size))  # ones: the adapted model starts as the base model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.feedforward:
            return self.base(x * self.ia3_l)  # (..., in) * (in,)
        return self.base(x) * self.ia3_l  # (..., out) * (out,)

    def merge(self) -> nn.Linear:
        """An nn.Linear with the scaling multiplied into its weight (and bias): the same outputs, no extra work."""
        merged = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None)
        merged = merged.to(self.base.weight.device, self.base.weight.dtype)
        scale = self.ia3_l.detach().to(self.base.weight.dtype)
        with torch.no_grad():
            if self.feedforward:
                merged.weight.copy_(self.base.weight * scale[None, :])  # (out, in) * (1, in): columns
                if self.base.bias is not None:
                    merged.bias.copy_(self.base.bias)
            else:
                merged.weight.copy_(self.base.weight * scale[:, None])  # (out, in) * (out, 1): rows
                if self.base.bias is not None:
                    merged.bias.copy_(self.base.bias * scale)
        merged.requires_grad_(False)
        return merged


def _matches(name: str, targets) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None  # a regex over the full module name, as peft
    return name.split(".")[-1] in targets  # suffixes, as peft's list form


def add_ia3(model, target_modules=TARGETS, feedforward_modules=FEEDFORWARD) -> list[str]:
    """Freeze `model` and wrap every target module in IA3Linear; returns the wrapped names."""
    if not isinstance(target_modules, str):
        missing = [m for m in feedforward_modules if m not in target_modules]
        if missing:
            raise ValueError(
                f"feedforward_modules {missing} must also be in target_modules {list(target_modules)}"
            )
    names = [name for name, _ in model.named_modules() if name and _matches(name, target_modules)]
    if not names:
        raise ValueError(f"no module of {type(model).__name__} matches target_modules={target_modules!r}")
    layers = {
        name: IA3Linear(model.get_submodule(name), _matches(name, feedforward_modules)) for name in names
    }
    model.requires_grad_(
        False
    )  # only after every target was accepted: a refused call leaves the model as it was
    for name, layer in layers.items():
        layer.ia3_l.requires_grad_(True)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
    return names


def merge_ia3(model) -> int:
    """Replace every IA3Linear by its merged nn.Linear; returns how many were merged."""
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, IA3Linear)]
    for name, layer in layers:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer.merge())
    return len(layers)
