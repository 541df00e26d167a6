"""Position interpolation by hand (Chen et al. 2023, "Extending Context Window of Large Language
Models via Positional Interpolation"): stretch a RoPE model's window s-fold by scaling positions.

RoPE (Su et al. 2021) rotates each pair i of a query/key's features by the angle m * theta_i,
theta_i = base^(-2i/d), at position m. A model trained on windows of L tokens has only seen
angles for m < L; beyond, the low-frequency pairs reach angles it never saw and attention
breaks down (extrapolation). Position interpolation maps position m to m / s instead:

    angle(m, i) = (m / s) * theta_i          s = new window / old window

so the s-times longer window lands inside the angles the model knows, at the price of a finer
spacing than it was trained on (neighbours s times closer in angle). That price shows as a
higher perplexity right after the change, and a short fine-tune at the new length removes it
(the paper: about 1,000 steps for LLaMA 7B-65B to 32k). LongLoRA uses it for every extension.

Because m/s * theta equals m * (theta/s), scaling the inverse frequencies is the same thing;
transformers offers it as `rope_parameters={"rope_type": "linear", "factor": s, ...}`
(`rope_scaling` in older versions), and `interpolate_positions` does it to a loaded model.

    >>> rope_angles(torch.tensor([0, 4]), head_dim=4, theta=100.0, factor=2.0)  # (T, d/2)
    tensor([[0.0000, 0.0000],
            [2.0000, 0.2000]])
"""

import torch
from torch import nn


def _check_factor(factor) -> None:
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0:
        raise ValueError(
            f"factor must be a positive number (new context / old context, e.g. 4 for 8k -> 32k), got {factor!r}"
        )


def rope_inverse_frequencies(head_dim: int, theta: float) -> torch.Tensor:
    """theta_i = theta^(-2i/d) for i = 0..d/2-1, float32, (d/2,): RoPE's rotation speed per feature pair."""
    if not isinstance(head_dim, int) or isinstance(head_dim, bool) or head_dim <= 0 or head_dim % 2:
        raise ValueError(f"head_dim must be a positive even integer (RoPE rotates pairs), got {head_dim!r}")
    if not isinstance(theta, (int, float)) or not theta > 1:
        raise ValueError(f"theta (RoPE's base) must be a number > 1, e.g. 10000.0, got {theta!r}")
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))  # (d/2,)


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float, factor: float = 1.0) -> torch.Tensor:
    """(T, d/2) rotation angles (m / factor) * theta_i: factor 1 is plain RoPE, factor s interpolates."""
    _check_factor(factor)
    if not isinstance(positions, torch.Tensor) or positions.dim() != 1:
        raise TypeError(f"positions must be a 1-D torch.Tensor of token positions, got {positions!r}")
    inv_freq = rope_inverse_frequencies(head_dim, theta)  # (d/2,)
    return (positions.float() / factor)[:, None] * inv_freq[None, :]  # (T, 1) * (1, d/2) -> (T, d/2)


def rotary_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of `model` that hold RoPE's inverse frequencies (transformers: one `rotary_emb`)."""
    return [m for m in model.modules() if isinstance(getattr(m, "inv_freq", None), torch.Tensor)]


@torch.no_grad()
def interpolate_positions(model: nn.Module, factor: float) -> int:
    """Scale every RoPE position of a loaded transformers model by 1/factor, in place; returns the new window.

    Divides the inverse frequencies (and their saved copy) by `factor`, which turns angle
    m * theta_i into (m / factor) * theta_i, and records the change in the config as
    transformers' linear RoPE scaling, so `save_pretrained` keeps it. Calling it twice
    multiplies the factors.
    """
    _check_factor(factor)
    modules = rotary_modules(model)
    if not modules:
        raise ValueError(
            f"{type(model).__name__} has no rotary embedding (no module with an `inv_freq` buffer): "
            "position interpolation applies to RoPE models such as Llama"
        )
    for module in modules:
        module.inv_freq.div_(factor)
        if isinstance(getattr(module, "original_inv_freq", None), torch.Tensor):
            module.original_inv_freq.div_(factor)
    config = getattr(model, "config", None)
    if config is None:
        return 0
    rope = dict(getattr(config, "rope_parameters", None) or {})
    total = rope.get("factor", 1.0) * factor if rope.get("rope_type") == "linear" else factor
    rope.update(rope_type="linear", factor=total)
    config.rope_parameters = rope
    config.max_position_embeddings = int(config.max_position_embeddings * factor)
    return config.max_position_embeddings
