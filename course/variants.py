"""Two ideas beyond LoRA, by hand: QA-LoRA's mergeable INT4 adapter and LongLoRA's S2-Attn.

QA-LoRA (Xu et al. 2023). Quantize W group-wise: every row is cut into groups of L input
columns and each group stores 4-bit codes c with one scale s and one zero-point z,

    W[o, j] = s[o, g] * c[o, j] + z[o, g]          g = j // L

A plain LoRA update B A changes every entry of W differently, so merging it leaves the INT4
grid (QLoRA's dilemma: keep a 16/32-bit merged model, or re-quantize and lose accuracy).
QA-LoRA average-pools the adapter's input over the same groups, so lora_A has in/L columns:

    y = W x + scaling * B A pool(x)         pool(x)[g] = mean(x[g*L : (g+1)*L])

The update is then scaling * (B A)[o, g] / L for every column j of group g: one number per
(row, group), exactly the shape of z. Merging adds it to z; codes and scales stay as they are.

LongLoRA (Chen et al. 2023), shifted sparse attention (S2-Attn): during fine-tuning at a long
context, each token attends only inside its group of G consecutive tokens; half of the heads
see groups shifted by G/2, so information crosses group borders. Cost per layer is
O(n G) instead of O(n^2). At inference the model uses full attention again.
"""

import math

import torch
from torch import nn

from course.lora import find_target_modules

# --- QA-LoRA --------------------------------------------------------------------------------


def quantize_groupwise(weight: torch.Tensor, group_size: int = 32, bits: int = 4):
    """Asymmetric min-max INT`bits` per group of `group_size` input columns, as QA-LoRA.

    Returns (codes, scales, zeros): codes (out, in) uint8 in 0..2^bits - 1 (one per byte, for
    readability; a deployment packs two per byte), scales and zeros (out, in / group_size) in
    the weight's dtype. Worked example, one group of 4 with bits=2 (codes 0..3):
    [-1.0, 0.0, 0.5, 2.0] -> zero -1.0, scale (2 - -1) / 3 = 1.0, codes [0, 1, 2, 3]
    (0.5 sits at 1.5 steps, halfway, and rounds to even: 2).
    """
    if weight.dim() != 2:
        raise ValueError(
            f"quantize_groupwise needs a 2-D weight (out_features, in_features), got {weight.shape}"
        )
    _check_group_size(weight.shape[1], group_size)
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8 (codes are stored in uint8), got {bits}")
    out_features, in_features = weight.shape
    groups = weight.detach().reshape(out_features, in_features // group_size, group_size)  # (out, G, L)
    low, high = groups.amin(-1), groups.amax(-1)  # (out, G)
    levels = 2**bits - 1
    scales = ((high - low) / levels).clamp_min(torch.finfo(weight.dtype).tiny)  # a constant group: any scale
    codes = torch.round((groups - low[..., None]) / scales[..., None]).clamp(0, levels)  # (out, G, L)
    return codes.to(torch.uint8).reshape(out_features, in_features), scales, low


def _check_group_size(in_features: int, group_size: int) -> None:
    if not isinstance(group_size, int) or group_size <= 0 or in_features % group_size:
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
    _check_group_size(x.shape[-1], group_size)
    return x.unflatten(-1, (-1, group_size)).mean(-1)  # (..., G, L) -> (..., G)


class QALoRALinear(nn.Module):
    """A group-wise INT`bits` base plus a LoRA adapter on the group-pooled input (QA-LoRA).

    base: an nn.Linear (quantized here) or a GroupQuantLinear. lora_A: (r, in / L), lora_B:
    (out, r), B = 0 at the start, scaling = alpha / r. The adapter lives in the base's float
    dtype (fp32 for the course model; float64 in the exactness test).
    """

    def __init__(self, base: nn.Module, r: int, alpha: float, group_size: int = 32, bits: int = 4):
        super().__init__()
        if isinstance(base, nn.Linear):
            base = GroupQuantLinear.from_linear(base, group_size, bits)
        if not isinstance(base, GroupQuantLinear):
            raise ValueError(
                f"QALoRALinear wraps an nn.Linear or a GroupQuantLinear, got {type(base).__name__}"
            )
        if base.group_size != group_size:
            raise ValueError(f"the base is quantized with group_size={base.group_size}, not {group_size}")
        n_groups = base.in_features // group_size
        if not isinstance(r, int) or not 0 < r <= min(n_groups, base.out_features):
            raise ValueError(
                f"r must be in 1..min(in_features / group_size, out_features) = "
                f"1..{min(n_groups, base.out_features)}, got r={r!r}"
            )
        if not alpha > 0:
            raise ValueError(f"alpha must be positive (scaling = alpha / r), got {alpha!r}")
        self.base = base.requires_grad_(False)
        self.r, self.alpha, self.group_size, self.scaling = r, alpha, group_size, alpha / r
        dtype, device = base.scales.dtype, base.scales.device
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
        pooled = group_pool(x.to(self.lora_A.weight.dtype), self.group_size)  # (..., in / L)
        update = self.lora_B(self.lora_A(pooled)) * self.scaling  # (..., r) -> (..., out)
        return self.base(x) + update.to(x.dtype)

    @torch.no_grad()
    def merge(self) -> GroupQuantLinear:
        """The same layer as one GroupQuantLinear: same codes, same scales, zero-points moved.

        The update for column j of group g is scaling * (B A)[o, g] / L (the 1/L of the mean),
        independent of j, so it folds into zeros[o, g].
        """
        shift = (self.lora_B.weight @ self.lora_A.weight) * self.scaling / self.group_size  # (out, in / L)
        base = self.base
        bias = base.bias
        return GroupQuantLinear(
            base.codes, base.scales, base.zeros + shift.to(base.zeros.dtype), bias, base.bits
        )

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, group_size={self.group_size}"


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def add_qalora(model: nn.Module, target_modules, r: int, alpha: float, group_size: int = 32, bits: int = 4):
    """Freeze `model`, quantize the target linear layers group-wise and give them QA-LoRA adapters."""
    names = find_target_modules(model, target_modules)
    model.requires_grad_(False)
    for name in names:
        _replace(model, name, QALoRALinear(model.get_submodule(name), r, alpha, group_size, bits))
    return names


def merge_qalora(model: nn.Module) -> list[str]:
    """Replace every QALoRALinear by its merged GroupQuantLinear, in place."""
    names = [name for name, m in model.named_modules() if isinstance(m, QALoRALinear)]
    for name in names:
        _replace(model, name, model.get_submodule(name).merge())
    return names


def quantize_layers_groupwise(model: nn.Module, target_modules, group_size: int = 32, bits: int = 4):
    """Replace the target linear layers by GroupQuantLinear (the QLoRA-style base for the contrast)."""
    names = find_target_modules(model, target_modules)
    for name in names:
        _replace(model, name, GroupQuantLinear.from_linear(model.get_submodule(name), group_size, bits))
    return names


# --- LongLoRA S2-Attn -------------------------------------------------------------------------


def _check_groups(seq_len: int, group_size: int) -> None:
    if not isinstance(group_size, int) or group_size < 2 or group_size % 2 or seq_len % group_size:
        raise ValueError(
            f"S2-Attn needs an even group size G that divides the sequence length; got G={group_size!r} for "
            f"{seq_len} tokens. Pack or pad the sequences to a multiple of G, or pick another G."
        )


def s2_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group_size: int, shift: bool = True, scaling=None
) -> torch.Tensor:
    """Causal attention inside groups of `group_size` tokens; half of the heads shifted by G/2.

    q, k, v: (batch, heads, seq, head_dim), seq a multiple of G (else ValueError: we do not pad
    silently; `packed_batches` builds training rows of a fixed, divisible length).
    Returns (batch, heads, seq, head_dim).
    As LongLoRA's reference code: heads[H//2:] are rolled by -G/2 along the sequence, the
    sequence is cut into seq/G groups attended causally, and those heads' outputs are rolled
    back by +G/2. The roll wraps around: in the shifted heads the last group holds the last
    G/2 tokens followed by the first G/2, so the first G/2 tokens also see the last ones.
    """
    batch, heads, seq, head_dim = q.shape
    _check_groups(seq, group_size)
    half = group_size // 2
    if shift:
        q, k, v = (
            torch.cat([t[:, : heads // 2], t[:, heads // 2 :].roll(-half, dims=2)], 1) for t in (q, k, v)
        )
    n_groups = seq // group_size
    # 4-D (B, H * n/G, G, D): every group is one "head" of length G, the shape SDPA's fused CPU kernel takes
    q, k, v = (t.reshape(batch, heads * n_groups, group_size, head_dim) for t in (q, k, v))
    out = nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=True, scale=scaling
    )  # (B, H * n/G, G, D)
    out = out.reshape(batch, heads, seq, head_dim)  # (B, H, T, D)
    if shift:
        out = torch.cat([out[:, : heads // 2], out[:, heads // 2 :].roll(half, dims=2)], 1)
    return out


def s2_attention_mask(seq_len: int, group_size: int, shifted: bool) -> torch.Tensor:
    """(seq, seq) bool: may token i attend to token j? The explicit form of s2_attention's pattern.

    Unshifted heads: same group (i // G == j // G) and j <= i. Shifted heads: the same in the
    rolled order, where token t sits at position (t - G/2) mod seq.
    """
    _check_groups(seq_len, group_size)
    position = torch.arange(seq_len)
    if shifted:
        position = (position - group_size // 2) % seq_len
    same_group = (position[:, None] // group_size) == (position[None, :] // group_size)
    return same_group & (position[None, :] <= position[:, None])


S2_ATTN = "s2_attn"  # the name registered with transformers' AttentionInterface


def s2_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention-function signature around s2_attention (for `attn_implementation`).

    key/value come with the model's KV heads: repeat them for grouped-query attention. The
    group size and shift are read from the model config (`s2_group_size`, `s2_shift`).
    Returns (B, T, H, D), None.
    """
    from transformers.integrations.sdpa_attention import repeat_kv

    if query.shape[2] != key.shape[2]:
        raise ValueError(
            "S2-Attn is a training-time attention over whole sequences; for generation with a cache, "
            'switch back with model.set_attn_implementation("sdpa")'
        )
    key, value = repeat_kv(key, module.num_key_value_groups), repeat_kv(value, module.num_key_value_groups)
    config = module.config
    out = s2_attention(query, key, value, config.s2_group_size, shift=config.s2_shift, scaling=scaling)
    return out.transpose(1, 2).contiguous(), None


def use_s2_attention(model, group_size: int, shift: bool = True) -> None:
    """Switch a transformers model to S2-Attn (training); `model.set_attn_implementation("sdpa")` undoes it.

    transformers builds no attention mask for a registered custom function: s2_attention is
    causal by itself. Train on full-length rows (`packed_batches`): no padding, no mask needed.
    """
    from transformers import AttentionInterface

    AttentionInterface.register(S2_ATTN, s2_attention_forward)
    model.config.s2_group_size, model.config.s2_shift = group_size, shift
    model.set_attn_implementation(S2_ATTN)


def longlora_trainable(model, embeddings: bool = True, norms: bool = True) -> list[str]:
    """LongLoRA's "LoRA+": also train the embeddings and normalization layers; returns their names."""
    names = []
    for name, param in model.named_parameters():
        if (embeddings and "embed" in name) or (norms and "norm" in name):
            param.requires_grad_(True)
            names.append(name)
    return names


def packed_batches(tokenizer, dataset, seq_len: int, batch_size: int, steps: int, seed: int = 0):
    """`steps` batches of `batch_size` rows, each exactly `seq_len` tokens of concatenated examples.

    Long-context training data from short examples: tokenized examples (completion-only labels,
    `course.data.tokenize_for_training`) are laid end to end in a seeded order and cut into rows
    of `seq_len`, so no row needs padding and S2-Attn's groups divide every row.
    """
    from course.data import tokenize_for_training

    generator = torch.Generator().manual_seed(seed)
    ids: list[int] = []
    labels: list[int] = []
    need = seq_len * batch_size * steps
    while len(ids) < need:
        for i in torch.randperm(len(dataset), generator=generator).tolist():
            example = tokenize_for_training(tokenizer, dataset[i])
            ids += example["input_ids"]
            labels += example["labels"]
            if len(ids) >= need:
                break
    ids_t = torch.tensor(ids[:need]).view(steps, batch_size, seq_len)  # (steps, B, T)
    labels_t = torch.tensor(labels[:need]).view(steps, batch_size, seq_len)  # (steps, B, T)
    for step in range(steps):
        yield {"input_ids": ids_t[step], "labels": labels_t[step]}


def loftq_init(weight: torch.Tensor, r: int, num_iter: int = 1, blocksize: int = 64):
    """LoftQ (Li et al. 2023): a 4-bit Q and a rank-r L R with Q + L R close to W; returns (Q, A, B).

    Alternate: Q = NF4(W - L R) and L R = the top-r SVD of W - Q, starting from L R = 0, as
    peft's `loftq_init` (NF4, blocksize 64, no double quantization; A = R, B = L, unscaled).
    Written here because peft 0.21.2 runs it on "cuda" only; course.quant is bit-exact with
    bitsandbytes' NF4, so the result is the same quantization.
    """
    from course.quant import dequantize_4bit, quantize_4bit

    if num_iter <= 0:
        raise ValueError(f"num_iter must be at least 1, got {num_iter}")
    weight = weight.detach().float()
    residual = weight
    for i in range(num_iter):
        dequantized = dequantize_4bit(quantize_4bit(residual, blocksize, "nf4"))  # (out, in)
        U, S, Vh = torch.linalg.svd(weight - dequantized, full_matrices=False)
        B = U[:, :r] * S[:r].sqrt()  # L: (out, r)
        A = S[:r].sqrt()[:, None] * Vh[:r]  # R: (r, in)
        if i + 1 < num_iter:
            residual = weight - B @ A
    return dequantized, A, B
