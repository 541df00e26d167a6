"""LoRA by hand: a low-rank update beside a frozen linear layer (Hu et al. 2021).

    h = W0 x + (alpha / r) * B A x        W0: (out, in) frozen,  A: (r, in),  B: (out, r)

Only A and B train: r * (in + out) parameters instead of in * out. B starts at zero, so
the wrapped layer starts out exactly equal to the base (LoRA paper, section 4.1). After
training, W0 + (alpha / r) * B A is one matrix again (`merge`): no extra inference cost.

The arithmetic is peft's one line (`peft/tuners/lora/layer.py`, `Linear.forward`):

    result = result + lora_B(lora_A(dropout(x))) * scaling

with the same parameter names (`lora_A`, `lora_B`, `scaling`), so with the same A and B
the outputs are equal to peft's bit for bit, in fp32, fp16 and bf16 (notebook 02 shows it,
tests assert it). As in peft, the adapter stays fp32 beside a half-precision base: its
update is added to the base output in fp32 and the sum is rounded once to the base dtype.
What peft adds on top (many adapters per layer, DoRA, rsLoRA, PiSSA, LoftQ, quantized
merges, a dispatcher per layer type) belongs in peft; notebook 09 uses it from there.

    >>> layer = LoRALinear(torch.nn.Linear(6, 4), r=2, alpha=4)   # scaling = 4 / 2 = 2.0
    >>> count_parameters(layer)          # A: 2x6, B: 4x2 train; W: 4x6 and bias 4 frozen
    (20, 48)
"""

import math
import re
from pathlib import Path

import torch
from torch import nn

INITS = ("kaiming", "gaussian")
ALL_LINEAR = "all-linear"  # peft's shortcut: every linear layer except the output head
OUTPUT_HEADS = ("lm_head",)


def _is_linear(module: nn.Module) -> bool:
    """nn.Linear, or a linear-like layer that says its shape (e.g. `course.quant.Linear4bit`)."""
    if isinstance(module, nn.Linear):
        return True
    return isinstance(getattr(module, "in_features", None), int) and isinstance(
        getattr(module, "out_features", None), int
    )


def refuse_non_finite(
    tensor: torch.Tensor, what: str, causes: str, unchanged: str = "the base weight is unchanged"
) -> None:
    """ValueError unless every entry of `tensor`, about to be written into a model, is finite.

    A NaN or inf merged into a weight fails silently: the model still runs, and every output
    it touches is NaN from then on. So every merge here (LoRA, IA3, DoRA, QA-LoRA, the stored
    soft prompt and prefix) forms its result first, checks it with this, and only then writes
    it: a refusal changes nothing. peft's `merge(safe_merge=True)` checks the same.
    """
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(
            f"{what} would hold NaN or inf ({causes}): refused, {unchanged}. Check the adapter's training."
        )


class LoRALinear(nn.Module):
    """A frozen linear layer `base` plus a trainable rank-`r` update `B A`, scaled by `alpha / r`.

    init: "kaiming" (peft's default: A kaiming-uniform with a = sqrt(5), as nn.Linear
    initializes its weight) or "gaussian" (A ~ N(0, (1/r)^2), as peft's
    `init_lora_weights="gaussian"`; the LoRA paper uses a Gaussian A). B is zero either way.
    dropout acts on the LoRA branch's input only, never on the base path.
    The adapter is kept in fp32 on the base's device (peft does the same by default); its
    update is added to the base output in fp32 and the sum rounded once to the base output's
    dtype, as in peft's forward (`result.to(torch_result_dtype)` after the fp32 addition).
    """

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, init: str = "kaiming"):
        super().__init__()
        if isinstance(base, LoRALinear):
            raise ValueError("this layer already has a LoRA adapter; wrap its `.base` or merge first")
        if not _is_linear(base):
            raise ValueError(
                f"LoRALinear wraps a linear layer (nn.Linear or one with in_features/out_features), "
                f"got {type(base).__name__}. Target the projections (e.g. 'q_proj'), not their parents."
            )
        in_features, out_features = base.in_features, base.out_features
        max_r = min(in_features, out_features)
        if not isinstance(r, int) or isinstance(r, bool) or not 0 < r <= max_r:
            raise ValueError(
                f"rank r must be an integer in 1..min(in_features, out_features) = 1..{max_r} "
                f"for this {in_features}->{out_features} layer, got r={r!r}"
            )
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
            raise TypeError(f"alpha must be a number (scaling = alpha / r), got {type(alpha).__name__}")
        if not (alpha > 0 and math.isfinite(alpha)):
            raise ValueError(f"alpha must be positive and finite (scaling = alpha / r), got alpha={alpha!r}")
        if not isinstance(dropout, (int, float)) or isinstance(dropout, bool):
            raise TypeError(f"dropout must be a number in [0, 1), got {type(dropout).__name__}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got dropout={dropout!r}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        self.base = base.requires_grad_(False)
        self.r, self.alpha, self.init = r, alpha, init
        self.scaling = alpha / r
        device = next(base.parameters(), next(base.buffers(), torch.empty(0))).device
        self.lora_A = nn.Linear(in_features, r, bias=False, device=device)  # A: (r, in)
        self.lora_B = nn.Linear(r, out_features, bias=False, device=device)  # B: (out, r)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.reset_lora_parameters()

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        if self.init == "kaiming":
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        else:
            nn.init.normal_(self.lora_A.weight, std=1 / self.r)
        nn.init.zeros_(self.lora_B.weight)  # B = 0: the wrapped layer starts equal to the base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)  # (..., out)
        if self.merged:
            return result  # the update already lives in base.weight
        x = x.to(self.lora_A.weight.dtype)
        update = self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling  # (..., r) -> (..., out)
        # As peft: add in the wider dtype (an fp16/bf16 result is promoted to the fp32 update),
        # then round once. Rounding the update first would differ on about a quarter of the outputs.
        return (result + update).to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A: the (out, in) matrix that LoRA adds to W0."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling  # (out, r) @ (r, in) -> (out, in)

    def _base_weight(self) -> torch.Tensor:
        weight = getattr(self.base, "weight", None)
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
            raise ValueError(
                f"merge needs a floating-point base weight; {type(self.base).__name__} stores it quantized. "
                "Dequantize the base first (merging into 4 bits re-quantizes and is lossy, see notebook 07)."
            )
        return weight

    @torch.no_grad()
    def merge(self) -> None:
        """W0 += scaling * B A, in place; forward then costs exactly the base's.

        The sum is formed in fp32 (the adapter's dtype) and rounded once to W0's dtype: equal
        bit for bit to peft's default `merge()` (`weight.data += delta_weight`, promoted) in
        fp32, fp16 and bf16. peft's `merge(safe_merge=True)` rounds the update to W0's dtype
        first (`orig_weight += delta_weight.to(orig_dtype)`): the same in fp32, in fp16/bf16
        one rounding more. Like `safe_merge`, a merge that would put NaN or inf into W0 is
        refused with a ValueError, and W0 is left as it was.
        """
        if self.merged:
            raise ValueError("already merged; call unmerge() first")
        self._base_weight().copy_(self.merged_weight())
        self.merged = True

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """W0 + scaling * B A, formed in the wider dtype and rounded once to W0's: what `merge` writes.

        Checked in W0's dtype, so a sum that is finite in fp32 but beyond fp16's 65,504 is refused
        too; `merge_lora` calls it for every layer before it changes any.
        """
        weight = self._base_weight()
        merged = (weight + self.delta_weight()).to(weight.dtype)  # (out, in)
        refuse_non_finite(
            merged,
            "the merged weight",
            "the adapter holds non-finite values, or W0 + B A overflows W0's dtype",
        )
        return merged

    @torch.no_grad()
    def unmerge(self) -> None:
        """W0 -= scaling * B A: back to the frozen base plus a separate adapter (equal up to rounding).

        As peft's `unmerge()`: the update is rounded to W0's dtype, then subtracted. An update
        holding NaN or inf is refused with a ValueError, W0 left as it was.
        """
        if not self.merged:
            raise ValueError("not merged; nothing to unmerge")
        weight = self._base_weight()
        delta = self.delta_weight().to(weight.dtype)  # (out, in)
        refuse_non_finite(
            delta,
            "the update to subtract (unmerge)",
            "the adapter holds non-finite values, or the update overflows W0's dtype",
        )
        weight -= delta
        self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, merged={self.merged}"


# --- whole models -----------------------------------------------------------------------------


def _matches(name: str, target_modules: str | list[str] | tuple[str, ...]) -> bool:
    """peft's matching rules: a string is a regex that must match the whole name; a list
    entry matches a name equal to it or ending in "." + entry ("q_proj" matches
    "model.layers.0.self_attn.q_proj")."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def _output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None


def find_target_modules(model: nn.Module, target_modules) -> list[str]:
    """Names of the modules `add_lora` would wrap, in model order (nothing is changed)."""
    if target_modules == ALL_LINEAR:
        head = _output_head(model)
        return [
            name
            for name, module in model.named_modules()
            if _is_linear(module) and module is not head and name.split(".")[-1] not in OUTPUT_HEADS
        ]
    if not target_modules:
        raise ValueError(
            "target_modules is empty: give module names like ['q_proj', 'v_proj'], a regex or 'all-linear'"
        )
    names = [name for name, _ in model.named_modules() if name and _matches(name, target_modules)]
    if not names:
        linear_names = sorted({name.split(".")[-1] for name, m in model.named_modules() if _is_linear(m)})
        raise ValueError(
            f"target_modules={target_modules!r} matches no module of {type(model).__name__}. "
            f"Its linear layers are called: {', '.join(linear_names)} (or use 'all-linear')."
        )
    return names


def add_lora(
    model: nn.Module,
    target_modules: str | list[str] | tuple[str, ...],
    r: int,
    alpha: float,
    dropout: float = 0.0,
    init: str = "kaiming",
) -> list[str]:
    """Freeze `model` and wrap every target linear layer in a `LoRALinear`, in place.

    target_modules: names as peft takes them: a list of module names or name endings
    (["q_proj", "v_proj"]), a regex string matched against the whole name, or
    "all-linear" (every linear layer except the output head). Returns the wrapped names.
    A target that matches no module, or matches something that is not a linear layer,
    raises ValueError (before anything is changed).
    """
    if lora_layers(model):
        raise ValueError(
            "the model already has LoRA layers: merge_lora(model) first, or start from a fresh model"
        )
    names = find_target_modules(model, target_modules)
    for name in names:
        module = model.get_submodule(name)
        if not _is_linear(module):
            raise ValueError(
                f"target {name!r} is a {type(module).__name__}, not a linear layer: LoRA wraps linear "
                "projections only. Name the projections (e.g. 'q_proj'), not the block that holds them."
            )
    model.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(getattr(parent, child), r, alpha, dropout=dropout, init=init))
    return names


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every LoRALinear of `model` by name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model: nn.Module) -> list[str]:
    """Merge every adapter into its base weight and put the plain base layer back, in place.

    The result is an ordinary model (same class, same module names as before LoRA) whose
    forward costs exactly the base's. Returns the merged names.
    """
    layers = lora_layers(model)
    for name, layer in layers.items():  # every layer checked before any changes: a refusal changes nothing
        if not layer.merged:
            try:
                layer.merged_weight()
            except ValueError as err:
                raise ValueError(f"merge_lora refused at {name} (no layer was merged): {err}") from None
    for name, layer in layers.items():
        if not layer.merged:
            layer.merge()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.base)
    return list(layers)


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter: `<layer>.lora_A.weight` and `<layer>.lora_B.weight` of every LoRALinear."""
    return {
        f"{name}.{part}.weight": getattr(layer, part).weight.detach().clone()
        for name, layer in lora_layers(model).items()
        for part in ("lora_A", "lora_B")
    }


def save_adapter(model: nn.Module, path: str | Path) -> int:
    """Write the adapter as safetensors (weights; r, alpha, targets as metadata); returns its bytes."""
    from safetensors.torch import save_file

    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers to save (call add_lora first)")
    first = next(iter(layers.values()))
    metadata = {
        "r": str(first.r),
        "alpha": repr(first.alpha),
        "init": first.init,
        "target_modules": ",".join(layers),
    }
    if any((m.r, m.alpha) != (first.r, first.alpha) for m in layers.values()):
        raise ValueError("save_adapter stores one r and alpha; these layers differ")
    save_file(lora_state_dict(model), str(path), metadata=metadata)
    return Path(path).stat().st_size


def _check_adapter_fits(model: nn.Module, state: dict[str, torch.Tensor], targets: list[str], r: int) -> None:
    """ValueError unless every target exists in `model` with the shapes the adapter's A (r, in), B (out, r) need."""
    modules = dict(model.named_modules())
    for name in targets:
        a, b = state.get(f"{name}.lora_A.weight"), state.get(f"{name}.lora_B.weight")
        if a is None or b is None:
            raise ValueError(f"the adapter file lists {name!r} as a target but holds no lora_A/lora_B for it")
        if a.shape[0] != r or b.shape[1] != r:
            raise ValueError(
                f"the adapter says rank r={r} but {name} holds A {tuple(a.shape)} and B {tuple(b.shape)}: "
                "the file was saved for another rank (or edited); save it again with save_adapter"
            )
        module = modules.get(name)
        if module is None or not _is_linear(module):
            raise ValueError(
                f"this adapter was saved for another base model: it adapts {name!r}, which this "
                f"{type(model).__name__} does not have as a linear layer. Load it onto the model it was trained on."
            )
        want = (b.shape[0], a.shape[1])  # (out_features, in_features) the adapter was trained for
        if (module.out_features, module.in_features) != want:
            raise ValueError(
                f"this adapter was saved for another base model: {name} was {want[1]}->{want[0]} there, "
                f"{module.in_features}->{module.out_features} here. Load it onto the model it was trained on."
            )


def load_adapter(model: nn.Module, path: str | Path) -> list[str]:
    """Add LoRA to a fresh base `model` as recorded in `path` and load its weights (strictly).

    An adapter saved for another base (a target layer missing or of another shape) or whose
    tensors disagree with its recorded rank is refused with a ValueError before the model is touched.
    """
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise ValueError(f"no adapter file at {path}: give the .safetensors file that save_adapter wrote")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except SafetensorError as err:
        raise ValueError(
            f"{path} is not a safetensors file ({err}); give the file that save_adapter wrote"
        ) from None
    if not {"r", "alpha", "target_modules"} <= set(metadata):
        raise ValueError(
            f"{path} has no adapter metadata (r, alpha, target_modules): was it written by save_adapter?"
        )
    targets, r = metadata["target_modules"].split(","), int(metadata["r"])
    state = load_file(str(path))
    # Check before add_lora, so a refused adapter leaves the model as it was.
    _check_adapter_fits(model, state, targets, r)
    names = add_lora(model, targets, r=r, alpha=float(metadata["alpha"]))
    expected = set(lora_state_dict(model))
    if set(state) != expected:
        raise ValueError(
            f"adapter keys do not match the model: missing {sorted(expected - set(state))[:3]}, "
            f"unexpected {sorted(set(state) - expected)[:3]}"
        )
    model.load_state_dict(state, strict=False)
    return names


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; shared (tied) tensors count once, as in peft.

    bitsandbytes stores two 4-bit values per byte in a `Params4bit`, so its numel is half the
    weight's; like peft's `get_nb_trainable_parameters` we count the weight's size.
    """
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if type(p).__name__ == "Params4bit":
            n *= 2 * p.element_size()
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total
