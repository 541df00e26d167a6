"""Graders for notebooks 04-05 (NF4, double quantization)."""

import random
from collections.abc import Callable

from course.checks._grader import _block_result, _Grader, _run


def _fmt(values) -> str:
    return "[" + ", ".join(f"{v:.4f}" for v in values.tolist()) + "]"


def check_nf4_code(fn: Callable) -> None:
    """fn(offset) -> the 16 NF4 values for that offset: sorted, one exact zero, in [-1, 1]."""
    import torch

    from course.quant import NF4_OFFSET, nf4_code

    grader = _Grader("nf4_code")
    rng = random.Random(4)
    offsets = [NF4_OFFSET, 0.95, 0.99] + [round(rng.uniform(0.9, 0.995), 4) for _ in range(5)]
    for offset in offsets:
        got = grader.call(fn, offset)
        grader.expect(
            isinstance(got, torch.Tensor) and tuple(got.shape) == (16,),
            f"for offset {offset}: expected a tensor of 16 values, got {got!r}.",
        )
        got, want = got.detach().double().cpu(), nf4_code(offset).double()
        grader.expect(
            int((got == 0).sum()) == 1 and int((got > 0).sum()) == 8 and int((got < 0).sum()) == 7,
            f"for offset {offset}: expected 7 negative values, one exact 0.0 and 8 positive values, got "
            f"{_fmt(got)}. Hint: 8 quantiles from linspace(offset, 0.5, 9)[:-1] for the positive half, "
            "7 from linspace(offset, 0.5, 8)[:-1] (negated) for the negative half, plus 0.",
        )
        grader.expect(
            bool((got[1:] > got[:-1]).all()), f"for offset {offset}: values must be sorted, got {_fmt(got)}."
        )
        grader.expect(
            abs(float(got.max()) - 1) < 1e-6 and abs(float(got.min()) + 1) < 1e-6,
            f"for offset {offset}: expected values from -1 to 1, got {_fmt(got)}. "
            "Hint: divide by the largest value.",
        )
        grader.expect(
            torch.allclose(got, want, atol=1e-6, rtol=0),
            f"for offset {offset}: expected {_fmt(want)}, got {_fmt(got)}. "
            "Hint: the quantile of a probability p is statistics.NormalDist().inv_cdf(p).",
        )
    grader.passed(len(offsets))


def max_code_error(code) -> float:
    """The reference of check_max_code_error: worst |s - nearest code value| over s in [-1, 1]."""
    values = code.double().unique()  # sorted, duplicates once
    half_gaps = (values[1:] - values[:-1]) / 2  # a value halfway between two neighbours
    edges = [float(values[0]) + 1, 1 - float(values[-1])]  # -1 or +1 when the code does not reach them
    return max([*half_gaps.tolist(), *edges])


def check_max_code_error(fn: Callable) -> None:
    """fn(code) -> the largest error |s - c| of a scaled value s in [-1, 1] and its nearest code value c."""
    import torch

    from course.quant import FP4_CODE, INT4_CODE, NF4_CODE

    grader = _Grader("max_code_error")
    gen = torch.Generator().manual_seed(4)
    cases = [NF4_CODE, INT4_CODE, FP4_CODE, torch.tensor([-0.5, 0.0, 0.5]), torch.tensor([0.9, -1.0, 0.2])]
    for n in (2, 5, 16):
        cases.append(torch.rand(n, generator=gen) * 1.8 - 0.9)  # neither -1 nor +1 is a code value
    for code in cases:
        got = _run(grader, fn, (code.clone(),), f"fn({_fmt(code)})")
        want = max_code_error(code)
        grader.expect(
            isinstance(got, (int, float, torch.Tensor)) and abs(float(got) - want) < 1e-6,
            f"for the code {_fmt(code)}: expected {want:.4f}, got {got!r}. Hint: where in [-1, 1] is a value "
            "farthest from every code value? Look between neighbours (are the values in order?) and at the two "
            "ends of the interval.",
        )
    grader.passed(len(cases))


def check_quantize_block(fn: Callable) -> None:
    """fn(block, code) -> (indices, absmax): scale one block by its absmax, pick the nearest code."""
    import torch

    from course.quant import INT4_CODE, NF4_CODE

    grader = _Grader("quantize_block")
    gen = torch.Generator().manual_seed(4)
    uneven = torch.tensor([0.1, -3.0, 2.0, 0.5, -0.2])  # the largest magnitude is negative
    cases = [(torch.tensor([0.2, -0.4, 0.1, 0.0]), NF4_CODE), (uneven, NF4_CODE), (uneven, INT4_CODE)]
    for size in (1, 7, 32, 64, 100):
        for code in (NF4_CODE, INT4_CODE):
            scale = float(torch.rand(1, generator=gen))
            cases.append((torch.randn(size, generator=gen) * scale + 1e-3, code))
    for block, code in cases:
        result = grader.call(fn, block.clone(), code.clone())
        indices, absmax = _block_result(grader, result, block, f"for block {_fmt(block[:6])}...")
        scaled = block / block.abs().max()
        distance = (scaled.unsqueeze(1) - code.unsqueeze(0)).abs()  # (blocksize, 16)
        idx = indices.long().clamp(0, len(code) - 1)
        chosen = distance.gather(1, idx.unsqueeze(1)).squeeze(1)
        ok = bool(((indices >= 0) & (indices < len(code))).all()) and bool(
            (chosen <= distance.min(dim=1).values + 1e-6).all()
        )
        grader.expect(
            ok,
            f"for block {_fmt(block[:6])}... with code {_fmt(code[:4])}...: expected indices "
            f"{distance.argmin(dim=1)[:8].tolist()}..., got {indices[:8].tolist()}.... "
            "Hint: divide the block by its absmax, then take the index of the nearest code value "
            "(argmin of the absolute difference).",
        )
    grader.passed(len(cases))


def check_pack_nibbles(pack: Callable, unpack: Callable) -> None:
    """pack(indices) -> uint8 bytes, first index in the high nibble; unpack(packed, n) -> the n indices."""
    import torch

    from course.quant import pack_nibbles, unpack_nibbles

    grader = _Grader("pack_nibbles")
    gen = torch.Generator().manual_seed(4)
    cases = [torch.tensor([12, 0, 10, 7])]
    cases += [torch.randint(0, 16, (2 * k,), generator=gen) for k in (1, 3, 50)]
    for indices in cases:
        want = pack_nibbles(indices).view(-1)
        got = grader.call(pack, indices.clone())
        grader.expect(
            isinstance(got, torch.Tensor) and got.dtype == torch.uint8 and got.numel() == want.numel(),
            f"pack({indices[:6].tolist()}...) should return {want.numel()} uint8 bytes, got {got!r}.",
        )
        grader.expect(
            torch.equal(got.reshape(-1), want),
            f"pack({indices[:4].tolist()}) should give {want[:2].tolist()}, "
            f"got {got.reshape(-1)[:2].tolist()}. "
            "Hint: byte i = indices[2i] << 4 | indices[2i + 1]: the first index goes in the high nibble.",
        )
        for n in (indices.numel(), indices.numel() - 1):
            back = grader.call(unpack, want.clone(), n)
            grader.expect(
                isinstance(back, torch.Tensor)
                and back.numel() == n
                and torch.equal(back.reshape(-1).long(), unpack_nibbles(want, n)),
                f"unpack({want[:2].tolist()}..., n={n}) should give {indices[: min(n, 4)].tolist()}... "
                f"({n} values), got {back!r}. Hint: high nibble byte >> 4, low nibble byte & 0x0F, "
                "interleaved, then keep the first n (an odd count was padded).",
            )
    grader.passed(len(cases))


def check_bits_per_param(fn: Callable) -> None:
    """fn(blocksize, blocksize2) -> stored bits per weight; blocksize2=None means no double quantization."""
    from course.quant import qlora_bits_per_param

    grader = _Grader("bits_per_param")
    rng = random.Random(5)
    cases = [(64, None), (64, 256), (32, 256), (4096, None)]
    cases += [(2 ** rng.randint(5, 12), rng.choice([None, 2 ** rng.randint(6, 10)])) for _ in range(8)]
    for blocksize, blocksize2 in cases:
        got = grader.call(fn, blocksize, blocksize2)
        want = qlora_bits_per_param(blocksize, blocksize2)
        grader.expect(
            isinstance(got, (int, float)) and abs(got - want) < 1e-9,
            f"for blocksize={blocksize}, blocksize2={blocksize2}: expected {want:.6f} bits, got {got!r}. "
            "Hint: 4 bits per weight; one fp32 absmax (32 bits) per block, or with double quantization an "
            "8-bit absmax per block plus one fp32 absmax2 per blocksize2 blocks, i.e. per "
            "blocksize * blocksize2 weights.",
        )
    grader.passed(len(cases))
