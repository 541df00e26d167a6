"""Prefix tuning (Li & Liang 2021): trained keys and values that every layer attends to.

Prompt tuning changes only the input; what the model makes of the soft tokens is up to its
frozen layers. Prefix tuning goes deeper: in every layer l, attention sees n extra key/value
pairs (P_k^l, P_v^l) in front of the real ones,

    head = softmax(q [P_k^l ; K]^T / sqrt(d_h)) [P_v^l ; V]

and those prefixes are the trained parameters. A decoder already has a place for keys and values
that come "before" the input: its KV cache. So we deliver the prefix as a `DynamicCache` holding
n positions per layer, extend the attention mask by n ones, and the model does the rest (the
real tokens then sit at positions n, n+1, ..., as after a cached prompt of n tokens; peft does
the same). transformers 5.24 names that forward argument `cache`; peft 0.21.2 still passes the
older `past_key_values`, which transformers renames with a deprecation warning (until 5.40).
A cache is filled by every forward pass, so each call gets a fresh one.

Shapes on a GQA model (SmolLM2: 9 query heads but 3 key/value heads of 64): the cache holds keys
and values *before* they are repeated for the query groups, so each layer's prefix is
(B, 3, n, 64), not (B, 9, n, 64). One virtual token costs L * 2 * kv_heads * head_dim
= 30 * 2 * 3 * 64 = 11,520 numbers.

Reparameterization (Li & Liang, section 4.3): training the prefix directly was unstable and
slightly worse for them, so they train P = MLP(P'), a small embedding P' (n, d') through a
two-layer MLP, and keep only the computed P after training. peft's `prefix_projection=True`:
Linear(d', h) - tanh - Linear(h, L * 2 * kv_dim), with d' = kv_dim = 192 and h = 192 by default.

Parameter names follow peft's PrefixEncoder (`embedding`, `transform`), so a state dict moves
between the two. As peft's, the prefix (and its MLP) stays fp32 on the model's device and is cast
to the model's dtype where it enters the cache: in fp32, fp16 and bf16 the logits equal peft's.
"""

import inspect

import torch
from torch import nn

from course.lora import refuse_non_finite
from course.prompt_tuning import refuse_soft_prompt_model


def _is_count(n) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n > 0


def kv_shape(config) -> tuple[int, int, int]:
    """(num_layers, num_key_value_heads, head_dim) of a transformers decoder config (GQA-aware)."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv_heads, head_dim


class PrefixTuning(nn.Module):
    """A frozen causal LM with trained per-layer key/value prefixes, delivered through its KV cache."""

    def __init__(
        self,
        model,
        num_virtual_tokens: int,
        prefix_projection: bool = False,
        encoder_hidden_size: int | None = None,
    ):
        super().__init__()
        if not _is_count(num_virtual_tokens):
            raise ValueError(
                f"num_virtual_tokens must be a positive integer (a prefix of zero positions changes nothing), "
                f"got {num_virtual_tokens!r}"
            )
        if encoder_hidden_size is not None and not _is_count(encoder_hidden_size):
            raise ValueError(
                f"encoder_hidden_size must be a positive integer (the MLP's width), or None for peft's default "
                f"(the key/value width), got {encoder_hidden_size!r}"
            )
        refuse_soft_prompt_model(model, "PrefixTuning")
        config = getattr(model, "config", None)
        # transformers 5.24 calls the argument `cache` (`past_key_values` is a deprecated alias until 5.40)
        arguments = inspect.signature(model.forward).parameters
        self._cache_argument = next((a for a in ("cache", "past_key_values") if a in arguments), None)
        if config is None or self._cache_argument is None:
            raise ValueError(
                f"prefix tuning delivers its prefix through the model's KV cache, but {type(model).__name__}.forward "
                "takes no `cache` (or `past_key_values`): use a decoder (causal LM) with a cache, "
                "or prompt tuning instead"
            )
        self.model = model
        self.model.requires_grad_(False)
        self.num_virtual_tokens = n = num_virtual_tokens
        self.num_layers, self.kv_heads, self.head_dim = kv_shape(config)
        kv_dim = self.kv_heads * self.head_dim  # 3 * 64 = 192 on SmolLM2, not hidden_size = 576
        out = self.num_layers * 2 * kv_dim  # keys and values of every layer
        self.prefix_projection = prefix_projection
        # the prefix lives beside the model, in fp32 (as peft's)
        device = next(model.parameters(), torch.empty(0)).device
        if prefix_projection:
            h = encoder_hidden_size or kv_dim  # peft's default
            self.embedding = nn.Embedding(n, kv_dim, device=device)  # (n, kv_dim): P'
            self.transform = nn.Sequential(
                nn.Linear(kv_dim, h, device=device), nn.Tanh(), nn.Linear(h, out, device=device)
            )
        else:
            self.embedding = nn.Embedding(n, out, device=device)  # (n, L * 2 * kv_dim): P itself

    def prefix(self) -> torch.Tensor:
        """The (n, L * 2 * kv_dim) prefix: the embedding itself, or its projection through the MLP."""
        p = self.embedding.weight
        return self.transform(p) if self.prefix_projection else p

    def past_key_values(self, batch_size: int, prefix: torch.Tensor | None = None):
        """A fresh DynamicCache holding the prefix's n positions in every layer (forward appends to it).

        prefix: (n, L*2*kv_dim) for every row (default: this module's), or (B, n, L*2*kv_dim), one per row.
        """
        from transformers import DynamicCache

        p = self.prefix() if prefix is None else prefix
        if not isinstance(p, torch.Tensor) or not p.is_floating_point():
            got = f"a {p.dtype} tensor" if isinstance(p, torch.Tensor) else type(p).__name__
            raise TypeError(f"a prefix must be a floating-point tensor, got {got}")
        width = 2 * self.num_layers * self.kv_heads * self.head_dim
        if p.shape[-2:] != (self.num_virtual_tokens, width) or p.ndim not in (2, 3):
            raise ValueError(
                f"a prefix has shape ([B,] {self.num_virtual_tokens}, {width}), got {tuple(p.shape)}"
            )
        p = p.to(self.model.dtype).expand(batch_size, -1, -1)  # (B, n, L*2*kv_dim)
        p = p.reshape(batch_size, self.num_virtual_tokens, 2 * self.num_layers, self.kv_heads, self.head_dim)
        p = p.permute(2, 0, 3, 1, 4)  # (2L, B, kv_heads, n, head_dim): entry 2l keys, 2l+1 values of layer l
        cache = DynamicCache(config=self.model.config)
        for layer in range(self.num_layers):
            cache.update(p[2 * layer], p[2 * layer + 1], layer)  # each (B, kv_heads, n, head_dim)
        return cache

    def forward(
        self,
        input_ids,
        attention_mask=None,
        labels=None,
        logits_to_keep: int | torch.Tensor = 0,
        prefixes: torch.Tensor | None = None,
    ):
        """The model's output with the prefix in every layer. prefixes: (B, n, L*2*kv_dim), one per row (a mixed batch)."""
        batch = input_ids.shape[0]
        if attention_mask is not None:
            ones = attention_mask.new_ones(batch, self.num_virtual_tokens)
            attention_mask = torch.cat([ones, attention_mask], dim=1)  # (B, n + T): the prefix is always seen
        return self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            labels=labels,
            use_cache=True,  # the prefix *is* the cache
            logits_to_keep=logits_to_keep,
            **{self._cache_argument: self.past_key_values(batch, prefixes)},
        )

    def stored_prefix(self) -> torch.Tensor:
        """What a deployment stores: the computed (n, L * 2 * kv_dim) prefix; the MLP is dropped.

        Like a merge it folds the reparameterization away, so a prefix holding NaN or inf is
        refused with a ValueError rather than stored; so is one that the model's dtype cannot hold
        (above fp16's 65,504), which would turn into inf where it enters the cache. It is kept in
        fp32, as peft stores it.
        """
        prefix = self.prefix().detach()  # (n, L * 2 * kv_dim), fp32
        causes = f"training diverged, a NaN was loaded, or a value overflows the model's {self.model.dtype}"
        refuse_non_finite(prefix.to(self.model.dtype), "the prefix", causes, unchanged="nothing stored")
        return prefix
