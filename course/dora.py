"""DoRA by hand (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation").

DoRA splits a weight into a magnitude and a direction and lets LoRA move only the direction:

    W' = m * V / ||V||_row        V = W0 + scaling * B A        m: (out,), one per output feature

m starts as the row norms of W0 (so W' = W0 at the start, B = 0) and trains; ||V||_row is
treated as a constant in backward (the paper's section 4.3: detaching it saves memory and
barely changes the gradient). Applied to x without forming W':

    y = (m / ||V||) * (W0 x + scaling * B A x) + bias

peft computes the same (`use_dora=True`, `peft/tuners/lora/dora.py`). The row norm needs the
whole V = W0 + scaling * B A at every step, an (out, in) matrix: that is DoRA's extra cost
against LoRA (peft measured 20% to 2x, PR #1474).

Precision: the adapter (A, B, m) stays fp32 beside an fp16/bf16 base, as peft's. Our forward
computes the whole output in fp32 and rounds it once to the input's dtype. peft's rounds the base
output W0 x + b to the base dtype first (it reuses the base layer's result), subtracts the bias in
that dtype, and rescales: so in fp16/bf16 the two differ by those roundings (the tests bound the
difference elementwise), in fp32 by fp32 summation order only. `merged_weight` forms
(m / ||V||) * V in fp32 as peft's merge does and rounds once to W0's dtype: equal to peft's.
"""

import math

import torch
from torch import nn

from course.lora import refuse_non_finite


class DoRALinear(nn.Module):
    """A frozen nn.Linear `base` with a trainable magnitude `m` (out,) and a LoRA direction update.

    Names as peft's: lora_A (r, in) kaiming-uniform, lora_B (out, r) zeros, scaling = alpha / r,
    `magnitude` for m. The adapter is kept in fp32.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float):
        super().__init__()
        if isinstance(base, DoRALinear):
            raise ValueError(
                "this layer already has a DoRA adapter (magnitude and direction): train that one, "
                "or wrap a fresh nn.Linear (its `.base` is the frozen W0)"
            )
        if not isinstance(base, nn.Linear) and isinstance(getattr(base, "base", None), nn.Module):
            raise ValueError(
                f"this layer already holds an adapter ({type(base).__name__} around its linear layer): merge that "
                "adapter first (DoRA needs the dense W0 for the row norm), or start from a fresh model"
            )
        if not isinstance(base, nn.Linear):
            raise TypeError(
                f"DoRALinear wraps an nn.Linear (it needs the dense W0 for the row norm), got {type(base).__name__}"
            )
        if (
            not isinstance(r, int)
            or isinstance(r, bool)
            or not 0 < r <= min(base.in_features, base.out_features)
        ):
            raise ValueError(
                f"r must be an integer in 1..min(in_features, out_features) = "
                f"1..{min(base.in_features, base.out_features)}, got {r!r}"
            )
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < math.inf:
            raise ValueError(f"alpha must be a positive, finite number (scaling = alpha / r), got {alpha!r}")
        self.base = base.requires_grad_(False)
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        device = base.weight.device
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=device)  # A: (r, in)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=device)  # B: (out, r)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.magnitude = nn.Parameter(base.weight.detach().float().norm(dim=1))  # m = ||W0||_row: (out,)

    def weight_norm(self) -> torch.Tensor:
        """||W0 + scaling * B A|| per output row, (out,), detached (a constant for backward)."""
        with torch.no_grad():
            delta = self.lora_B.weight @ self.lora_A.weight  # (out, r) @ (r, in) -> (out, in)
            return (self.base.weight.float() + self.scaling * delta).norm(dim=1)  # (out,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        direction = nn.functional.linear(x32, self.base.weight.float())  # W0 x: (..., out)
        direction = direction + self.lora_B(self.lora_A(x32)) * self.scaling  # + scaling B A x
        out = (self.magnitude / self.weight_norm()) * direction  # (out,) broadcast over (..., out)
        if self.base.bias is not None:
            out = out + self.base.bias.float()
        return out.to(x.dtype)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """W' = m * V / ||V||_row as one (out, in) matrix in W0's dtype: what DoRA deploys (no inference overhead).

        Formed in fp32 in peft's order ((m / ||V||) * V) and rounded once to W0's dtype: equal to
        peft's merge. A W' holding NaN or inf (a non-finite adapter, a zero row norm, an overflow
        of W0's dtype) is refused with a ValueError; nothing is changed either way.
        """
        weight = self.base.weight
        V = weight.float() + self.scaling * (self.lora_B.weight @ self.lora_A.weight)  # (out, in)
        merged = ((self.magnitude / V.norm(dim=1))[:, None] * V).to(weight.dtype)  # (out, 1) * (out, in)
        causes = "the adapter holds non-finite values, a row of V is zero, or the result overflows the base's dtype"
        refuse_non_finite(merged, "the merged weight", causes, unchanged="the layer is unchanged")
        return merged

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}"


@torch.no_grad()
def dora_from_peft(peft_layer, adapter: str = "default") -> DoRALinear:
    """Our DoRALinear with the same W0, A, B and m as a peft `lora.Linear` built with use_dora=True."""
    if not hasattr(peft_layer, "lora_magnitude_vector") or adapter not in peft_layer.lora_magnitude_vector:
        raise ValueError(
            f"not a peft DoRA layer with adapter {adapter!r} (build it with LoraConfig(use_dora=True))"
        )
    ours = DoRALinear(peft_layer.base_layer, peft_layer.r[adapter], peft_layer.lora_alpha[adapter])
    ours.scaling = peft_layer.scaling[adapter]  # alpha / r, or alpha / sqrt(r) with use_rslora
    ours.lora_A.weight.copy_(peft_layer.lora_A[adapter].weight)
    ours.lora_B.weight.copy_(peft_layer.lora_B[adapter].weight)
    ours.magnitude.copy_(peft_layer.lora_magnitude_vector[adapter].weight)
    return ours
