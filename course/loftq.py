"""LoftQ by hand (Li et al. 2023): start a LoRA adapter on a 4-bit base so that Q + B A is close to W.

QLoRA starts from Q = NF4(W) and B = 0, so training begins with the full quantization error
W - Q. LoftQ instead chooses Q and the rank-r pair together, alternating T times:

    Q_t = NF4(W - B_{t-1} A_{t-1})          B_t A_t = top-r SVD of (W - Q_t)       (B_0 A_0 = 0)

so the adapter starts by absorbing the largest directions of the quantization error, and the
residual ||W - Q - B A|| is smaller than ||W - Q||. With T = 1 (peft's default) it is one NF4
quantization followed by one SVD of its error.

Written here because peft 0.21.2 runs its `loftq_init` on "cuda" only; `course.quant` is bit-exact
with bitsandbytes' NF4 (notebook 04), so the result is the same quantization. As peft's, the
split of the singular values is symmetric (B = U sqrt(S), A = sqrt(S) V^T) and unscaled: with
scaling = alpha / r != 1, divide B by the scaling so that scaling * B A is the fitted term.
"""

import torch


def loftq_init(weight: torch.Tensor, r: int, num_iter: int = 1, blocksize: int = 64):
    """(Q, A, B) with Q the dequantized NF4 weight, A (r, in), B (out, r), and Q + B A close to `weight`.

    Alternates Q = NF4(W - B A) and B A = the top-r SVD of W - Q, starting from B A = 0, as peft's
    `loftq_init` (NF4, blocksize 64, no double quantization). Worked check: for r = min(out, in)
    the SVD fits the residual exactly, so Q + B A = W up to float rounding.
    """
    from course.quant import dequantize_4bit, quantize_4bit

    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point() or weight.dim() != 2:
        got = (
            f"shape {tuple(weight.shape)}, {weight.dtype}"
            if isinstance(weight, torch.Tensor)
            else type(weight).__name__
        )
        raise TypeError(
            f"loftq_init needs a 2-D floating-point weight (out_features, in_features), got {got}"
        )
    if not isinstance(r, int) or isinstance(r, bool) or not 0 < r <= min(weight.shape):
        raise ValueError(f"r must be an integer in 1..min(out, in) = 1..{min(weight.shape)}, got {r!r}")
    if not isinstance(num_iter, int) or num_iter <= 0:
        raise ValueError(f"num_iter must be at least 1 (alternations of quantize and SVD), got {num_iter!r}")
    weight = weight.detach().float()
    residual = weight
    for i in range(num_iter):
        dequantized = dequantize_4bit(quantize_4bit(residual, blocksize, "nf4"))  # Q: (out, in)
        U, S, Vh = torch.linalg.svd(weight - dequantized, full_matrices=False)  # (out, k), (k,), (k, in)
        B = U[:, :r] * S[:r].sqrt()  # L: (out, r)
        A = S[:r].sqrt()[:, None] * Vh[:r]  # R: (r, in)
        if i + 1 < num_iter:
            residual = weight - B @ A  # (out, r) @ (r, in) -> (out, in)
    return dequantized, A, B
