"""LongLoRA by hand (Chen et al. 2023): shifted sparse attention (S2-Attn) for long-context fine-tuning.

LongLoRA extends a model's context with three pieces: position interpolation (the RoPE
positions scaled down by the extension factor, `course.rope_scaling`), LoRA with the
embeddings and normalization layers also trainable (`longlora_trainable`), and S2-Attn in
training only: each token attends inside its group of G consecutive tokens, and half of the
heads see the groups shifted by G/2, so information crosses group borders. Cost per layer is
O(n G) instead of O(n^2). At inference the model uses full attention again.

The shift wraps around. LongLoRA's reference code rolls the shifted heads by -G/2, so their
last group holds the last G/2 tokens followed by the first G/2: the first tokens of a row
then attend to its last tokens, i.e. to the future (the authors acknowledged it in their
issue #90; full attention at inference hides it, and their later flash-attention code forms
the shifted groups without rolling). `mask_wrapped=True` (our default) masks exactly those
pairs, so the wrapped tokens attend only to each other; `mask_wrapped=False` is the reference
code's behaviour, kept to show the leak.
"""

import torch
from torch import nn


def _check_groups(seq_len: int, group_size: int) -> None:
    if (
        not isinstance(group_size, int)
        or isinstance(group_size, bool)
        or group_size < 2
        or group_size % 2
        or seq_len % group_size
    ):
        raise ValueError(
            f"S2-Attn needs an even group size G that divides the sequence length; got G={group_size!r} for "
            f"{seq_len} tokens. Pack or pad the sequences to a multiple of G, or pick another G."
        )


def _check_qkv(q, k, v) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() != 4:
            got = f"shape {tuple(t.shape)}, {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise TypeError(
                f"{name} must be a floating-point tensor (batch, heads, seq, head_dim), got {got}"
            )
    if not q.shape == k.shape == v.shape:
        raise ValueError(
            f"q, k, v must have the same shape (repeat the KV heads first), got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )


def _group_mask(group_size: int, n_groups: int, mask_wrapped: bool, device) -> torch.Tensor:
    """(n_groups, G, G) bool for the shifted heads, in rolled order: causal, and in the last
    group (the tail's G/2 tokens, then the wrapped first G/2) no wrapped query sees the tail."""
    causal = torch.ones(group_size, group_size, dtype=torch.bool, device=device).tril()  # (G, G)
    mask = causal.expand(n_groups, group_size, group_size).clone()  # (n/G, G, G)
    if mask_wrapped:
        half = group_size // 2
        mask[-1, half:, :half] = False  # wrapped tokens 0..G/2-1 must not see tokens n-G/2..n-1
    return mask


def s2_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group_size: int,
    shift: bool = True,
    mask_wrapped: bool = True,
    scaling=None,
) -> torch.Tensor:
    """Causal attention inside groups of `group_size` tokens; half of the heads shifted by G/2.

    q, k, v: (batch, heads, seq, head_dim), seq a multiple of G (else ValueError: we do not pad
    silently; `packed_batches` builds training rows of a fixed, divisible length).
    Returns (batch, heads, seq, head_dim).
    As LongLoRA's reference code: heads[H//2:] are rolled by -G/2 along the sequence, the
    sequence is cut into seq/G groups attended causally, and those heads' outputs are rolled
    back by +G/2. mask_wrapped=True also masks the wrap-around (see the module docstring).
    """
    _check_qkv(q, k, v)
    batch, heads, seq, head_dim = q.shape
    _check_groups(seq, group_size)
    n_groups, half = seq // group_size, group_size // 2

    def grouped(
        t,
    ):  # (B, h, T, D) -> (B, h * n/G, G, D): one "head" per group, the shape SDPA's CPU kernel takes
        return t.reshape(batch, -1, group_size, head_dim)

    if not shift:
        out = nn.functional.scaled_dot_product_attention(
            grouped(q), grouped(k), grouped(v), is_causal=True, scale=scaling
        )  # (B, H * n/G, G, D)
        return out.reshape(batch, heads, seq, head_dim)
    h = heads // 2
    plain = nn.functional.scaled_dot_product_attention(
        grouped(q[:, :h]), grouped(k[:, :h]), grouped(v[:, :h]), is_causal=True, scale=scaling
    ).reshape(batch, h, seq, head_dim)  # (B, H/2, T, D)
    rolled = [grouped(t[:, h:].roll(-half, dims=2)) for t in (q, k, v)]  # (B, (H - H/2) * n/G, G, D)
    mask = _group_mask(group_size, n_groups, mask_wrapped, q.device).repeat(heads - h, 1, 1)  # (.., G, G)
    shifted = nn.functional.scaled_dot_product_attention(*rolled, attn_mask=mask, scale=scaling)
    shifted = shifted.reshape(batch, heads - h, seq, head_dim).roll(half, dims=2)  # (B, H - H/2, T, D)
    return torch.cat([plain, shifted], dim=1)


def s2_attention_mask(
    seq_len: int, group_size: int, shifted: bool, mask_wrapped: bool = True
) -> torch.Tensor:
    """(seq, seq) bool: may token i attend to token j? The explicit form of s2_attention's pattern.

    Unshifted heads: same group (i // G == j // G) and j <= i. Shifted heads: the same in the
    rolled order, where token t sits at position (t - G/2) mod seq; with mask_wrapped, a pair
    allowed only through the wrap (j after i in the original order) is removed.
    """
    _check_groups(seq_len, group_size)
    token = torch.arange(seq_len)
    position = (token - group_size // 2) % seq_len if shifted else token
    same_group = (position[:, None] // group_size) == (position[None, :] // group_size)
    mask = same_group & (position[None, :] <= position[:, None])
    if shifted and mask_wrapped:
        mask &= token[None, :] <= token[:, None]
    return mask


S2_ATTN = "s2_attn"  # the name registered with transformers' AttentionInterface


def s2_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention-function signature around s2_attention (for `attn_implementation`).

    key/value come with the model's KV heads: repeat them for grouped-query attention. The
    group size, shift and wrap masking are read from the model config (`s2_group_size`,
    `s2_shift`, `s2_mask_wrapped`). Returns (B, T, H, D), None.
    """
    from transformers.integrations.sdpa_attention import repeat_kv

    if query.shape[2] != key.shape[2]:
        raise ValueError(
            "S2-Attn is a training-time attention over whole sequences; for generation with a cache, "
            'switch back with model.set_attn_implementation("sdpa")'
        )
    key, value = repeat_kv(key, module.num_key_value_groups), repeat_kv(value, module.num_key_value_groups)
    config = module.config
    out = s2_attention(
        query,
        key,
        value,
        config.s2_group_size,
        shift=config.s2_shift,
        mask_wrapped=getattr(config, "s2_mask_wrapped", True),
        scaling=scaling,
    )  # (B, H, T, D)
    return out.transpose(1, 2).contiguous(), None


def use_s2_attention(model, group_size: int, shift: bool = True, mask_wrapped: bool = True) -> None:
    """Switch a transformers model to S2-Attn (training); `model.set_attn_implementation("sdpa")` undoes it.

    transformers builds no attention mask for a registered custom function: s2_attention is
    causal by itself. Train on full-length rows (`packed_batches`): no padding, no mask needed.
    """
    from transformers import AttentionInterface

    _check_groups(group_size, group_size)  # even and >= 2; the sequence length is checked per call
    AttentionInterface.register(S2_ATTN, s2_attention_forward)
    model.config.s2_group_size, model.config.s2_shift, model.config.s2_mask_wrapped = (
        group_size,
        shift,
        mask_wrapped,
    )
    model.set_attn_implementation(S2_ATTN)


def longlora_trainable(model, embeddings: bool = True, norms: bool = True) -> list[str]:
    """LongLoRA's improved LoRA: also train the embeddings and normalization layers; returns their names.

    The paper's ablation finds plain LoRA falls behind full fine-tuning at long targets and
    that opening these few parameters (norms are tiny; embeddings are 28 M here, tied with
    the output head) closes most of the gap.
    """
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
    for name, value in (("seq_len", seq_len), ("batch_size", batch_size), ("steps", steps)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if len(dataset) == 0:
        raise ValueError("packed_batches needs a non-empty dataset")
    return _packed(tokenizer, dataset, seq_len, batch_size, steps, seed)


def _packed(tokenizer, dataset, seq_len: int, batch_size: int, steps: int, seed: int):
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
