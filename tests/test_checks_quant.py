"""The quantization graders (notebooks 04, 05) accept the reference and reject plausible wrong answers."""

import statistics

import pytest
import torch

from course import checks
from course import quant as Q

# --- nf4_code ------------------------------------------------------------------------------


def nf4_symmetric(offset):  # 8 + 8 quantiles, no exact zero
    q = statistics.NormalDist().inv_cdf
    pos = [q(p) for p in torch.linspace(offset, 0.5, 9)[:-1].tolist()]
    values = torch.tensor(sorted(pos + [-v for v in pos]))
    return values / values.max()


def nf4_unnormalized(offset):
    q = statistics.NormalDist().inv_cdf
    pos = [q(p) for p in torch.linspace(offset, 0.5, 9)[:-1].tolist()]
    neg = [-q(p) for p in torch.linspace(offset, 0.5, 8)[:-1].tolist()]
    return torch.tensor(sorted(pos + [0.0] + neg))


def nf4_unsorted(offset):
    return Q.nf4_code(offset).flip(0)


def nf4_fixed_offset(offset):  # ignores the argument
    return Q.nf4_code()


def nf4_paper_eq4_plain(offset):  # 17 evenly spaced quantiles, middle two replaced by one zero
    q = statistics.NormalDist().inv_cdf
    probs = [(i + 0.5) / 17 for i in range(17)]
    values = torch.tensor([q(p) for p in probs])
    values = torch.cat([values[:7], torch.zeros(1), values[9:]])
    return values / values.abs().max()


def test_nf4_code_grader_accepts_reference(capsys):
    checks.check_nf4_code(Q.nf4_code)
    assert "nf4_code: correct" in capsys.readouterr().out


@pytest.mark.parametrize(
    "wrong", [nf4_symmetric, nf4_unnormalized, nf4_unsorted, nf4_fixed_offset, nf4_paper_eq4_plain]
)
def test_nf4_code_grader_rejects(wrong):
    with pytest.raises(AssertionError, match="nf4_code"):
        checks.check_nf4_code(wrong)


# --- max_code_error ------------------------------------------------------------------------

from course.checks.quant import max_code_error  # noqa: E402


def code_error_full_gap(code):  # the whole gap, not half of it
    values = code.double().unique()
    return max([*(values[1:] - values[:-1]).tolist(), float(values[0]) + 1, 1 - float(values[-1])])


def code_error_unsorted(code):  # neighbours in storage order (FP4 is stored by bit pattern)
    values = code.double()
    return max(
        [*((values[1:] - values[:-1]).abs() / 2).tolist(), float(values.min()) + 1, 1 - float(values.max())]
    )


def code_error_no_edges(code):  # forgets that -1 and +1 need not be code values
    values = code.double().unique()
    return float(((values[1:] - values[:-1]) / 2).max())


def test_max_code_error_grader_accepts_reference(capsys):
    checks.check_max_code_error(max_code_error)
    assert "max_code_error: correct" in capsys.readouterr().out


@pytest.mark.parametrize("wrong", [code_error_full_gap, code_error_unsorted, code_error_no_edges])
def test_max_code_error_grader_rejects(wrong):
    with pytest.raises(AssertionError, match="max_code_error"):
        checks.check_max_code_error(wrong)


def test_max_code_error_bounds_the_real_quantizer():
    """Every dequantized value lies within max_code_error(code) x absmax of the original, and nearly reaches it."""
    x = torch.linspace(-1, 1, 4096)  # one block of 4096 values whose absmax is 1
    for quant_type, code in (("nf4", Q.NF4_CODE), ("fp4", Q.FP4_CODE)):
        err = (
            Q.dequantize_4bit(Q.quantize_4bit(x, blocksize=4096, quant_type=quant_type)).reshape(-1) - x
        ).abs()
        assert float(err.max()) <= max_code_error(code) + 1e-6
        assert float(err.max()) >= max_code_error(code) - 1e-3


# --- quantize_block --------------------------------------------------------------------------


def block_reference(block, code):
    absmax = block.abs().max()
    return (block / absmax - code.unsqueeze(1)).abs().argmin(dim=0), absmax


def block_uses_max(block, code):  # max instead of the largest magnitude
    absmax = block.max()
    return (block / absmax - code.unsqueeze(1)).abs().argmin(dim=0), absmax


def block_not_scaled(block, code):
    return (block - code.unsqueeze(1)).abs().argmin(dim=0), block.abs().max()


def block_signed_distance(block, code):  # argmin of (x - c) without abs
    absmax = block.abs().max()
    return (block / absmax - code.unsqueeze(1)).argmin(dim=0), absmax


def block_round_to_int(block, code):  # linear INT4 rounding, whatever the code
    absmax = block.abs().max()
    return (block / absmax * 7).round().long() + 7, absmax


def block_float_indices(block, code):
    indices, absmax = block_reference(block, code)
    return indices.float(), absmax


def test_quantize_block_grader_accepts_reference(capsys):
    checks.check_quantize_block(block_reference)
    assert "quantize_block: correct" in capsys.readouterr().out


@pytest.mark.parametrize(
    "wrong",
    [block_uses_max, block_not_scaled, block_signed_distance, block_round_to_int, block_float_indices],
)
def test_quantize_block_grader_rejects(wrong):
    with pytest.raises(AssertionError, match="quantize_block"):
        checks.check_quantize_block(wrong)


# --- pack_nibbles --------------------------------------------------------------------------


def pack_reference(indices):
    indices = indices.to(torch.uint8)
    return (indices[0::2] << 4) | indices[1::2]


def unpack_reference(packed, n):
    return torch.stack([packed >> 4, packed & 0x0F], dim=1).reshape(-1)[:n]


def pack_low_first(indices):
    indices = indices.to(torch.uint8)
    return (indices[1::2] << 4) | indices[0::2]


def pack_int64(indices):
    return (indices[0::2] << 4) | indices[1::2]


def unpack_no_truncation(packed, n):
    return torch.stack([packed >> 4, packed & 0x0F], dim=1).reshape(-1)


def unpack_concatenated(packed, n):  # all high nibbles, then all low nibbles
    return torch.cat([packed >> 4, packed & 0x0F])[:n]


def test_pack_nibbles_grader_accepts_reference(capsys):
    checks.check_pack_nibbles(pack_reference, unpack_reference)
    checks.check_pack_nibbles(lambda i: Q.pack_nibbles(i), Q.unpack_nibbles)
    assert "pack_nibbles: correct" in capsys.readouterr().out


@pytest.mark.parametrize(
    "pack, unpack",
    [
        (pack_low_first, unpack_reference),
        (pack_int64, unpack_reference),
        (pack_reference, unpack_no_truncation),
        (pack_reference, unpack_concatenated),
    ],
)
def test_pack_nibbles_grader_rejects(pack, unpack):
    with pytest.raises(AssertionError, match="pack_nibbles"):
        checks.check_pack_nibbles(pack, unpack)


# --- bits_per_param ------------------------------------------------------------------------


def bits_reference(blocksize, blocksize2):
    if blocksize2 is None:
        return 4 + 32 / blocksize
    return 4 + 8 / blocksize + 32 / (blocksize * blocksize2)


def test_bits_per_param_grader_accepts_reference(capsys):
    checks.check_bits_per_param(bits_reference)
    checks.check_bits_per_param(Q.qlora_bits_per_param)
    assert "bits_per_param: correct" in capsys.readouterr().out


@pytest.mark.parametrize(
    "wrong",
    [
        lambda b, b2: 4 + 32 / b if b2 is None else 4 + 8 / b,  # forgets the fp32 absmax2
        lambda b, b2: 4 + 32 / b if b2 is None else 4 + 8 / b + 32 / b2,  # absmax2 per blocksize2 weights
        lambda b, b2: 4 + 32 / b,  # ignores double quantization
        lambda b, b2: 4 + 8 / b + 32 / (b * (b2 or 256)),  # always double-quantizes
        lambda b, b2: (4 + 32 / b if b2 is None else 4 + 8 / b + 32 / (b * b2)) / 8,  # bytes, not bits
    ],
)
def test_bits_per_param_grader_rejects(wrong):
    with pytest.raises(AssertionError, match="bits_per_param"):
        checks.check_bits_per_param(wrong)


def test_qlora_arithmetic_agrees_with_counted_bits():
    """The grader's formula is what `bits_per_param` counts on a real tensor (codebooks aside)."""
    x = torch.randn(256 * 64 * 4)
    assert Q.bits_per_param(Q.quantize_4bit(x), include_code=False) == Q.qlora_bits_per_param(64, None)
    counted = Q.bits_per_param(Q.quantize_4bit(x, double_quant=True), include_code=False)
    assert counted == pytest.approx(Q.qlora_bits_per_param(64, 256) + 32 / x.numel())  # + the offset
