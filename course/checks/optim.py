"""Graders for notebook 06 (8-bit and paged optimizers)."""

import math
import random
from collections.abc import Callable

from course.checks._grader import _block_result, _Grader, _run

OPTIMIZERS = ("adam", "adam8bit", "sgd_momentum")


def _state_bytes(optimizer: str, numel: int) -> int:
    """The reference: bytes of optimizer state for one tensor of `numel` elements (codes not counted)."""
    from course.optim import BLOCKSIZE, MIN_8BIT_SIZE

    if optimizer == "adam" or (optimizer == "adam8bit" and numel < MIN_8BIT_SIZE):
        return 8 * numel  # m and v in fp32
    if optimizer == "adam8bit":
        return 2 * numel + 2 * 4 * math.ceil(
            numel / BLOCKSIZE
        )  # m, v in uint8 + one fp32 absmax per block each
    return 4 * numel  # one fp32 momentum buffer


def check_state_bytes(fn: Callable) -> None:
    """fn(optimizer, numel) -> bytes of state for one tensor; optimizer in "adam", "adam8bit", "sgd_momentum"."""
    grader = _Grader("state_bytes")
    rng = random.Random(6)
    sizes = [1, 255, 4095, 4096, 4097, 9216, 2**20, 576 * 1536] + [rng.randint(1, 10**7) for _ in range(4)]
    cases = [(opt, n) for opt in OPTIMIZERS for n in sizes]
    for optimizer, numel in cases:
        got = _run(grader, fn, (optimizer, numel), f"fn({optimizer!r}, {numel:,})")
        want = _state_bytes(optimizer, numel)
        hints = {
            "adam": "two fp32 moments, m and v: 4 + 4 bytes per element.",
            "adam8bit": "m and v in one byte each, plus one fp32 absmax per block of 256 for each "
            "(a short last block still needs its absmax: ceil). Tensors under 4,096 elements keep fp32 states.",
            "sgd_momentum": "one fp32 momentum buffer per element.",
        }
        grader.expect(
            isinstance(got, (int, float)) and abs(got - want) < 0.5,
            f"fn({optimizer!r}, {numel:,}): expected {want:,} bytes, got {got!r}. Hint: {hints[optimizer]}",
        )
    grader.passed(len(cases))


def check_quantize_state_block(fn: Callable) -> None:
    """fn(block, code) -> (indices, absmax): one block of an optimizer state to the 256-value dynamic map."""
    import torch

    from course.quant import dynamic_code

    grader = _Grader("quantize_state_block")
    gen = torch.Generator().manual_seed(6)
    signed, unsigned = dynamic_code(signed=True), dynamic_code(signed=False)
    cases = []
    for size in (1, 5, 100, 256):
        # Optimizer states span decades: m ~ gradients of every size, v = their squares (>= 0).
        m = torch.randn(size, generator=gen) * 10 ** (-6 * torch.rand(size, generator=gen))
        cases += [(m, signed), (m * m, unsigned), (-m.abs(), signed)]
    for block, code in cases:
        name = "m (signed map)" if code is signed else "v (unsigned map)"
        result = _run(
            grader, fn, (block.clone(), code.clone()), f"fn(<{name} block of {block.numel()}>, code)"
        )
        indices, absmax = _block_result(grader, result, block, f"for a {name} block")
        idx = indices.long()
        in_range = bool(((idx >= 0) & (idx < 256)).all())
        distance = (block / block.abs().max()).unsqueeze(1).sub(code.unsqueeze(0)).abs()  # (n, 256)
        chosen = distance.gather(1, idx.clamp(0, 255).unsqueeze(1)).squeeze(1)
        grader.expect(
            in_range and bool((chosen <= distance.min(dim=1).values + 1e-7).all()),
            f"for a {name} block: expected the nearest code, indices {distance.argmin(dim=1)[:6].tolist()}..., "
            f"got {idx[:6].tolist()}.... Hint: divide by absmax, then take the argmin of |scaled - code| "
            "over the 256 code values (use the code you are given: unsigned for v).",
        )
    grader.passed(len(cases))
