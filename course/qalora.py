"""QA-LoRA by hand (Xu et al. 2023): a LoRA adapter that merges into an INT4 base exactly.

Quantize W group-wise: every row is cut into groups of L input columns and each group stores
4-bit codes c with one scale s and one zero-point z,

    W[o, j] = s[o, g] * c[o, j] + z[o, g]          g = j // L

A plain LoRA update B A changes every entry of W differently, so merging it leaves the INT4
grid (QLoRA's dilemma: keep a 16/32-bit merged model, or re-quantize and lose accuracy).
QA-LoRA average-pools the adapter's input over the same groups, so lora_A has in/L columns:

    y = W x + scaling * B A pool(x)         pool(x)[g] = mean(x[g*L : (g+1)*L])

The update is then scaling * (B A)[o, g] / L for every column j of group g: one number per
(row, group), exactly the shape of z. Merging adds it to z; codes and scales stay as they are.

The price is capacity: the adapter sees in/L numbers per token instead of in (18 instead of
576 for SmolLM2's q_proj at L = 32), and its input, a mean of L features, is about sqrt(L)
times smaller than one feature when they are weakly correlated, so the same learning rate
moves the output less. The paper quantizes the base with GPTQ (error-compensating rounding);
we use min-max rounding (round to the nearest level between the group's min and max), which
is simpler and has a larger quantization error, but the merge argument is the same.

peft has the method as `LoraConfig(use_qalora=True, qalora_group_size=L)`, for GPTQ layers only
(no merge). Its pooled input is the group mean times in/L (`x_pooled * pooled_features` in
`QALoraLinearVariant.forward`), so peft with scaling s equals ours with scaling s * in / L. As
peft, the adapter stays fp32 beside an fp16/bf16 base and its update is added to the base output
in fp32 before one rounding to the base dtype; our merge likewise adds the shift to the
zero-points in fp32 and rounds once.
"""

import math

import torch
from torch import nn

from course.lora import find_target_modules, refuse_non_finite


def quantize_groupwise(weight: torch.Tensor, group_size: int = 32, bits: int = 4):
    """Asymmetric min-max INT`bits` per group of `group_size` input columns, as QA-LoRA.

    Returns (codes, scales, zeros): codes (out, in) uint8 in 0..2^bits - 1 (one per byte, for
    readability; a deployment packs two per byte), scales and zeros (out, in / group_size) in
    the weight's dtype. Worked example, one group of 4 with bits=2 (codes 0..3):
    [-1.0, 0.0, 0.5, 2.0] -> zero -1.0, scale (2 - -1) / 3 = 1.0, codes [0, 1, 2, 3]
    (0.5 sits at 1.5 steps, halfway, and rounds to even: 2).
    """
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        raise TypeError(f"quantize_groupwise needs a floating-point torch.Tensor, got {_describe(weight)}")
    if weight.dim() != 2:
        raise ValueError(
            f"quantize_groupwise needs a 2-D weight (out_features, in_features), got {weight.shape}"
        )
    _check_group_size(weight.shape[1], group_size)
    if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8 (codes are stored in uint8), got {bits}")
    out_features, in_features = weight.shape
    groups = weight.detach().reshape(out_features, in_features // group_size, group_size)  # (out, G, L)
    low, high = groups.amin(-1), groups.amax(-1)  # (out, G)
    levels = 2**bits - 1
    scales = ((high - low) / levels).clamp_min(torch.finfo(weight.dtype).tiny)  # a constant group: any scale
    codes = torch.round((groups - low[..., None]) / scales[..., None]).clamp(0, levels)  # (out, G, L)
    return codes.to(torch.uint8).reshape(out_features, in_features), scales, low


def _describe(x) -> str:
    return f"a {x.dtype} tensor" if isinstance(x, torch.Tensor) else type(x).__name__


def _check_group_size(in_features: int, group_size: int) -> None:
    if (
        not isinstance(group_size, int)
        or isinstance(group_size, bool)
        or group_size <= 0
        or in_features % group_size
    ):
        divisors = [d for d in (16, 32, 64, 128) if in_features % d == 0]
        raise ValueError(
            f"group_size must divide in_features = {in_features} (each group shares one scale and zero-point), "
            f"got group_size={group_size!r}; e.g. one of {divisors or [1]}"
        )


class GroupQuantLinear(nn.Module):
    """A frozen linear layer stored as group-wise INT codes: W = scale * code + zero per group.

    The codes, scales and zero-points are buffers; forward decodes W and calls F.linear.
    """

    def __init__(
        self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bias=None, bits: int = 4
    ):
        super().__init__()
        if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8 or codes.dim() != 2:
            raise TypeError(
                f"codes must be a 2-D uint8 tensor (out_features, in_features) of INT codes, got {_describe(codes)}: "
                "build the layer with GroupQuantLinear.from_linear or quantize_groupwise"
            )
        if not all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in (scales, zeros)):
            raise TypeError(
                f"scales and zeros must be floating-point tensors, got {_describe(scales)}, {_describe(zeros)}"
            )
        self.out_features, self.in_features = codes.shape
        self.group_size = self.in_features // scales.shape[1]
        if scales.shape != zeros.shape or scales.shape[1] * self.group_size != self.in_features:
            raise ValueError(f"codes {tuple(codes.shape)} do not fit scales {tuple(scales.shape)} and zeros")
        self.bits = bits
        self.register_buffer("codes", codes)  # (out, in) uint8
        self.register_buffer("scales", scales)  # (out, in / L)
        self.register_buffer("zeros", zeros)  # (out, in / L)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 32, bits: int = 4) -> "GroupQuantLinear":
        return cls(*quantize_groupwise(linear.weight, group_size, bits), linear.bias, bits)

    def dequantize(self) -> torch.Tensor:
        L = self.group_size
        codes = self.codes.reshape(self.out_features, -1, L).to(self.scales.dtype)  # (out, G, L)
        weight = codes * self.scales[..., None] + self.zeros[..., None]  # (out, G, L)
        return weight.reshape(self.out_features, self.in_features)  # (out, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return nn.functional.linear(x, self.dequantize().to(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, int{self.bits}, group_size={self.group_size}"


def group_pool(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """Average of every `group_size` consecutive features: (..., in) -> (..., in / group_size).

    >>> group_pool(torch.tensor([1.0, 3.0, 2.0, 6.0]), 2)
    tensor([2., 4.])
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(
            f"group_pool needs a floating-point torch.Tensor (..., in_features), got {_describe(x)}"
        )
    _check_group_size(x.shape[-1], group_size)
    return x.unflatten(-1, (-1, group_size)).mean(-1)  # (..., G, L) -> (..., G)


class QALoRALinear(nn.Module):
    """A group-wise INT`bits` base plus a LoRA adapter on the group-pooled input (QA-LoRA).

    base: an nn.Linear (quantized here) or a GroupQuantLinear. lora_A: (r, in / L), lora_B:
    (out, r), B = 0 at the start, scaling = alpha / r. The adapter lives in the base's float
    dtype (fp32 for the course model; float64 in the exactness test), in fp32 beside an fp16/bf16
    base (as peft's `autocast_adapter_dtype`).
    """

    def __init__(self, base: nn.Module, r: int, alpha: float, group_size: int = 32, bits: int = 4):
        super().__init__()
        if isinstance(base, QALoRALinear):
            raise ValueError(
                "this layer already has a QA-LoRA adapter: train that one, merge it first (merge returns a "
                "GroupQuantLinear that can take a new adapter), or start from a fresh layer"
            )
        if isinstance(base, nn.Linear):
            base = GroupQuantLinear.from_linear(base, group_size, bits)
        if not isinstance(base, GroupQuantLinear) and isinstance(getattr(base, "base", None), nn.Module):
            raise ValueError(
                f"this layer already holds an adapter ({type(base).__name__} around its linear layer): merge that "
                "adapter first (QA-LoRA quantizes a plain nn.Linear), or start from a fresh copy of the base model"
            )
        if not isinstance(base, GroupQuantLinear):
            raise ValueError(
                f"QALoRALinear wraps an nn.Linear or a GroupQuantLinear, got {type(base).__name__}"
            )
        if base.group_size != group_size:
            raise ValueError(f"the base is quantized with group_size={base.group_size}, not {group_size}")
        n_groups = base.in_features // group_size
        if not isinstance(r, int) or isinstance(r, bool) or not 0 < r <= min(n_groups, base.out_features):
            raise ValueError(
                f"r must be in 1..min(in_features / group_size, out_features) = "
                f"1..{min(n_groups, base.out_features)}, got r={r!r}"
            )
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < math.inf:
            raise ValueError(f"alpha must be positive and finite (scaling = alpha / r), got {alpha!r}")
        self.base = base.requires_grad_(False)
        self.r, self.alpha, self.group_size, self.scaling = r, alpha, group_size, alpha / r
        dtype, device = base.scales.dtype, base.scales.device
        dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype  # as peft's autocast
        self.lora_A = nn.Linear(n_groups, r, bias=False, dtype=dtype, device=device)  # A: (r, in / L)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, dtype=dtype, device=device)  # B: (out, r)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # as peft's LoRA
        nn.init.zeros_(self.lora_B.weight)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)  # (..., out), in the base's dtype
        pooled = group_pool(x.to(self.lora_A.weight.dtype), self.group_size)  # (..., in / L)
        update = self.lora_B(self.lora_A(pooled)) * self.scaling  # (..., r) -> (..., out)
        return (result + update).to(result.dtype)  # added in the adapter's dtype, rounded once (as peft)

    @torch.no_grad()
    def merge(self) -> GroupQuantLinear:
        """The same layer as one GroupQuantLinear: same codes, same scales, zero-points moved.

        The update for column j of group g is scaling * (B A)[o, g] / L (the 1/L of the mean),
        independent of j, so it folds into zeros[o, g]. The new zero-points are formed in the
        adapter's dtype and rounded once to the base's; zero-points holding NaN or inf are refused
        with a ValueError (this layer is never changed by a merge).
        """
        shift = (self.lora_B.weight @ self.lora_A.weight) * self.scaling / self.group_size  # (out, in / L)
        base = self.base
        zeros = (base.zeros + shift).to(base.zeros.dtype)  # (out, in / L)
        causes = "the adapter holds non-finite values, or the shift overflows the base's dtype"
        refuse_non_finite(zeros, "the merged zero-points", causes, unchanged="the layer is unchanged")
        return GroupQuantLinear(base.codes, base.scales, zeros, base.bias, base.bits)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, group_size={self.group_size}"


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def qalora_layers(model: nn.Module) -> dict[str, QALoRALinear]:
    """Every QALoRALinear of `model` by name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QALoRALinear)}


def add_qalora(model: nn.Module, target_modules, r: int, alpha: float, group_size: int = 32, bits: int = 4):
    """Freeze `model`, quantize the target linear layers group-wise and give them QA-LoRA adapters.

    Every layer is built before any is replaced: a refused call (a bad rank or group size for
    one target, a model that already has QA-LoRA adapters) leaves the model as it was.
    """
    if existing := qalora_layers(model):
        raise ValueError(
            f"the model already has QA-LoRA adapters ({len(existing)} layers, e.g. {next(iter(existing))!r}): "
            "add_qalora was applied to it before (re-running the cell does that). Train those, merge them with "
            "merge_qalora(model), or start again from a fresh copy of the base model."
        )
    names = find_target_modules(model, target_modules)
    layers = {name: QALoRALinear(model.get_submodule(name), r, alpha, group_size, bits) for name in names}
    model.requires_grad_(False)
    for name, layer in layers.items():
        layer.lora_A.requires_grad_(True)
        layer.lora_B.requires_grad_(True)
        _replace(model, name, layer)
    return names


def merge_qalora(model: nn.Module) -> list[str]:
    """Replace every QALoRALinear by its merged GroupQuantLinear, in place.

    Every layer is merged before any is replaced, so a refused merge (NaN or inf) changes nothing;
    its ValueError names the layer that refused.
    """
    merged = {}
    for name, layer in qalora_layers(model).items():
        try:
            merged[name] = layer.merge()
        except ValueError as err:
            raise ValueError(f"merge_qalora refused at {name} (no layer was replaced): {err}") from None
    for name, layer in merged.items():
        _replace(model, name, layer)
    return list(merged)


def quantize_layers_groupwise(model: nn.Module, target_modules, group_size: int = 32, bits: int = 4):
    """Replace the target linear layers by GroupQuantLinear (the QLoRA-style base for the contrast)."""
    names = find_target_modules(model, target_modules)
    for name in names:
        _replace(model, name, GroupQuantLinear.from_linear(model.get_submodule(name), group_size, bits))
    return names
