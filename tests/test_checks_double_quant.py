"""The notebook 05 graders pass a correct answer and reject the stub and plausible wrong ones."""

import pytest
import torch

from course import checks


def reference_smallest_blocksize(max_bits, double_quant):
    for blocksize in (32, 64, 128, 256, 512, 1024, 2048, 4096):
        bits = 4 + 8 / blocksize + 32 / (blocksize * 256) if double_quant else 4 + 32 / blocksize
        if bits <= max_bits:
            return blocksize
    return None


def test_smallest_blocksize_accepts_the_reference():
    checks.check_smallest_blocksize(reference_smallest_blocksize)


def _largest(max_bits, double_quant):  # the cheapest block instead of the most accurate one that fits
    return 4096 if reference_smallest_blocksize(max_bits, double_quant) else None


@pytest.mark.parametrize(
    "wrong",
    [
        _largest,
        # forgets the fp32 absmax2 that every 256 blocks share
        lambda bits, dq: next(
            (b for b in (32, 64, 128, 256, 512, 1024, 2048, 4096) if (4 + (8 if dq else 32) / b) <= bits),
            None,
        ),
        # counts the 8-bit absmax as fp32 even with double quantization
        lambda bits, dq: reference_smallest_blocksize(bits, False),
        # strict inequality: a budget of exactly 4.5 bits should allow blocks of 64
        lambda bits, dq: next(
            (
                b
                for b in (32, 64, 128, 256, 512, 1024, 2048, 4096)
                if (4 + 8 / b + 32 / (b * 256) if dq else 4 + 32 / b) < bits
            ),
            None,
        ),
        # 4096 when nothing fits, instead of None
        lambda bits, dq: reference_smallest_blocksize(bits, dq) or 4096,
    ],
)
def test_smallest_blocksize_rejects_wrong_answers(wrong):
    with pytest.raises(AssertionError, match="smallest_blocksize"):
        checks.check_smallest_blocksize(wrong)


def reference_dequantize_absmax(q_absmax, code2, absmax2, offset, blocksize2):
    scale = absmax2.repeat_interleave(blocksize2)[: q_absmax.numel()]  # (n,): each code's block constant
    return code2[q_absmax.long()] * scale + offset


def test_dequantize_absmax_accepts_the_reference():
    checks.check_dequantize_absmax(reference_dequantize_absmax)


def test_dequantize_absmax_reference_agrees_with_our_double_quantization():
    from course import quant

    w = torch.randn(64 * 300)
    q = quant.quantize_4bit(w, blocksize=64, double_quant=True)
    plain = quant.quantize_4bit(w, blocksize=64)
    got = reference_dequantize_absmax(q.absmax, q.state2.code, q.state2.absmax, q.offset, q.state2.blocksize)
    assert torch.allclose(got, plain.absmax, rtol=0.05)  # within the 8-bit rounding of the absmax


@pytest.mark.parametrize(
    "wrong",
    [
        lambda q, code2, absmax2, offset, bs2: (
            code2[q.long()] * absmax2.repeat_interleave(bs2)[: q.numel()]
        ),  # no offset
        lambda q, code2, absmax2, offset, bs2: code2[q.long()] * absmax2[0] + offset,  # one absmax2 for all
        lambda q, code2, absmax2, offset, bs2: (
            code2[q.long()] * absmax2.repeat(bs2)[: q.numel()] + offset
        ),  # tiled
        lambda q, code2, absmax2, offset, bs2: (
            q.float() / 127 * absmax2.repeat_interleave(bs2)[: q.numel()] + offset
        ),  # linear
    ],
)
def test_dequantize_absmax_rejects_wrong_answers(wrong):
    with pytest.raises(AssertionError, match="dequantize_absmax"):
        checks.check_dequantize_absmax(wrong)


def test_stubs_fail_with_a_reminder():
    def stub(*args):
        raise NotImplementedError("Your turn")

    for grader in (checks.check_smallest_blocksize, checks.check_dequantize_absmax):
        with pytest.raises(AssertionError, match="not implemented yet"):
            grader(stub)
