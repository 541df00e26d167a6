"""Graders for notebook 05 (double quantization of the absmax constants, QLoRA Sec. 3)."""

from collections.abc import Callable

from course.checks._grader import _Grader, _run

BLOCKSIZES = tuple(2**k for k in range(5, 13))  # 32 ... 4096, the block sizes bitsandbytes accepts
BLOCKSIZE2 = 256  # the second level's block size in bitsandbytes (and the QLoRA paper)


def _smallest_blocksize(max_bits: float, double_quant: bool) -> int | None:
    """The reference: the smallest block size whose storage fits `max_bits` bits per weight."""
    from course.quant import qlora_bits_per_param

    for blocksize in BLOCKSIZES:  # smaller blocks: more accurate, more constants
        if qlora_bits_per_param(blocksize, BLOCKSIZE2 if double_quant else None) <= max_bits:
            return blocksize
    return None


def check_smallest_blocksize(fn: Callable) -> None:
    """fn(max_bits, double_quant) -> the smallest block size in 32..4096 (powers of two) that fits, or None."""
    grader = _Grader("smallest_blocksize")
    budgets = [3.9, 4.0, 4.01, 4.05, 4.1255, 4.126, 4.127, 4.13, 4.2, 4.25, 4.5, 4.6, 5.0, 6.0]
    cases = [(bits, dq) for bits in budgets for dq in (False, True)]
    for max_bits, double_quant in cases:
        got = _run(grader, fn, (max_bits, double_quant), f"fn({max_bits}, double_quant={double_quant})")
        want = _smallest_blocksize(max_bits, double_quant)
        grader.expect(
            got == want,
            f"fn({max_bits}, double_quant={double_quant}): expected {want}, got {got!r}. Hint: count the "
            "bits one block stores (its weights' 4-bit indices, its absmax: fp32, or 8 bits when double-"
            f"quantized, plus its share of the fp32 absmax2 that {BLOCKSIZE2} blocks share) and divide by the "
            "weights in the block. Smaller blocks cost more bits, so try the sizes from 32 upwards; return "
            "None when even 4096 does not fit.",
        )
    grader.passed(len(cases))


def _absmax_case(gen, n: int, blocksize2: int):
    import torch

    from course.quant import dynamic_code, quantize_blockwise_8bit

    absmax = torch.rand(n, generator=gen) * 2 + 0.05  # (n,) positive, like the 4-bit blocks' absmax
    absmax[torch.randint(0, n, (1,), generator=gen)] *= 6  # one outlier block
    offset = absmax.mean()
    code2 = dynamic_code(signed=True)  # (256,)
    q, state = quantize_blockwise_8bit(absmax - offset, code2, blocksize=blocksize2)
    want = code2[q.long()] * state.absmax.repeat_interleave(blocksize2)[:n] + offset  # (n,)
    return (q, code2, state.absmax, offset, blocksize2), want


def check_dequantize_absmax(fn: Callable) -> None:
    """fn(q_absmax, code2, absmax2, offset, blocksize2) -> the fp32 absmax values, one per 4-bit block."""
    import torch

    grader = _Grader("dequantize_absmax")
    gen = torch.Generator().manual_seed(5)
    cases = [(n, bs2) for n in (1, 7, 256, 300, 1000, 13824) for bs2 in (256, 64)]
    for n, blocksize2 in cases:
        args, want = _absmax_case(gen, n, blocksize2)
        call = f"fn(<{n} uint8 codes>, code2, <{args[2].numel()} absmax2>, offset, blocksize2={blocksize2})"
        got = _run(grader, fn, tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args), call)
        ok = isinstance(got, torch.Tensor) and got.shape == want.shape
        grader.expect(ok, f"{call} should return a tensor of shape {tuple(want.shape)}, got {got!r}.")
        close = torch.allclose(got.float(), want, rtol=1e-6, atol=1e-7)
        grader.expect(
            close,
            f"{call}: expected {want[:3].tolist()}..., got {got[:3].tolist()}... "
            "Hint: look up each code's value, multiply it by the absmax2 of the block of blocksize2 codes "
            "it sits in, then undo the centring that came before the 8-bit step. "
            "The last block may be shorter.",
        )
    grader.passed(len(cases))
