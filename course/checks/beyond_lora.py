"""Graders for notebook 09 (beyond LoRA): QA-LoRA's group pooling and S2-Attn's shift."""

from collections.abc import Callable

from course.checks._grader import _Grader, _run


def _shape(x) -> str:
    import torch

    return str(tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__


def check_group_pool(fn: Callable) -> None:
    """fn(x, group_size) -> (..., in / group_size): the mean of each group of consecutive features."""
    import torch

    from course.qalora import group_pool

    grader = _Grader("group_pool")
    gen = torch.Generator().manual_seed(9)
    cases = [((4,), 2), ((3, 12), 4), ((2, 5, 64), 32), ((6, 576), 32), ((2, 3, 24), 6), ((1, 8), 8)]
    for batch, group_size in cases:
        x = torch.randn(*batch, generator=gen)
        call = f"fn(x {tuple(x.shape)}, group_size={group_size})"
        got = _run(grader, fn, (x.clone(), group_size), call)
        want = group_pool(x, group_size)
        grader.expect(
            isinstance(got, torch.Tensor) and got.shape == want.shape,
            f"{call}: expected shape {tuple(want.shape)}, got {_shape(got)}. Hint: the last dimension "
            f"becomes in / group_size = {x.shape[-1] // group_size}; all others stay.",
        )
        if not torch.allclose(got, want, atol=1e-6):
            groups = x.shape[-1] // group_size
            strided = x.unflatten(-1, (group_size, groups)).mean(-2)  # pools features j, j+G, j+2G, ...
            if torch.allclose(got, want * group_size, atol=1e-5):
                hint = "that is the sum of each group; QA-LoRA's pooling here is the average (divide by L)."
            elif torch.allclose(got, strided, atol=1e-6):
                hint = (
                    "that pools every G-th feature together. A group is L *consecutive* columns "
                    "(the ones sharing a scale and zero-point): reshape to (..., in / L, L), then mean."
                )
            else:
                hint = "reshape the last dimension to (in / L, L) and average over L."
            grader.expect(False, f"{call}: wrong values. Hint: {hint}")
    grader.passed(len(cases))


def check_s2_shift(fn: Callable) -> None:
    """fn(x, group_size) -> x with heads[H//2:] rolled by -group_size/2 along the sequence (dim 2)."""
    import torch

    grader = _Grader("s2_shift")
    gen = torch.Generator().manual_seed(10)
    cases = [((1, 2, 8, 3), 4), ((2, 4, 16, 2), 8), ((1, 9, 12, 4), 4), ((2, 5, 24, 3), 6), ((1, 3, 6, 1), 2)]
    for shape, group_size in cases:
        x = torch.randn(*shape, generator=gen)  # (B, H, T, D)
        call = f"fn(x {shape}, group_size={group_size})"
        got = _run(grader, fn, (x.clone(), group_size), call)
        heads, half = shape[1], group_size // 2
        want = torch.cat([x[:, : heads // 2], x[:, heads // 2 :].roll(-half, dims=2)], dim=1)
        grader.expect(
            isinstance(got, torch.Tensor) and got.shape == x.shape,
            f"{call}: expected the input's shape {shape}, got {_shape(got)}.",
        )
        if not torch.equal(got, want):
            if torch.equal(got, x.roll(-half, dims=2)):
                hint = "every head was shifted; only the second half, heads[H // 2:], is."
            elif torch.equal(got, torch.cat([x[:, : heads // 2], x[:, heads // 2 :].roll(half, dims=2)], 1)):
                hint = "shift by -G/2 (towards the start); +G/2 is the roll back applied to the output."
            elif torch.equal(got, torch.cat([x[:, : heads // 2].roll(-half, dims=2), x[:, heads // 2 :]], 1)):
                hint = "that shifts the first half of the heads; LongLoRA shifts heads[H // 2:]."
            elif torch.equal(got[:, heads // 2 :], x[:, heads // 2 :].roll(-half, dims=3)):
                hint = "roll along the sequence (dim 2), not the head dimension."
            else:
                hint = "keep heads[:H // 2] as they are and roll heads[H // 2:] by -G // 2 along dim 2."
            grader.expect(False, f"{call}: wrong values. Hint: {hint}")
    grader.passed(len(cases))
