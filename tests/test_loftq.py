"""LoftQ by hand (course.loftq): bitsandbytes' NF4 for Q, a residual fit that helps, peft's on CUDA."""

import pytest
import torch

from course.loftq import loftq_init


def test_loftq_init_quantizes_with_nf4_and_fits_the_residual():
    import bitsandbytes.functional as F

    weight = torch.randn(48, 64)
    dequantized, A, B = loftq_init(weight, r=4)
    q, state = F.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=False)
    assert torch.equal(dequantized, F.dequantize_4bit(q, state).view(48, 64))
    assert A.shape == (4, 64) and B.shape == (48, 4)
    assert (weight - dequantized - B @ A).norm() < (weight - dequantized).norm()


@pytest.mark.gpu
def test_loftq_init_equals_peft_on_cuda():
    from peft.utils.loftq_utils import loftq_init as peft_loftq_init

    weight = torch.randn(48, 64)
    for num_iter in (1, 2):
        ours = loftq_init(weight, r=4, num_iter=num_iter)
        theirs = peft_loftq_init(weight.cuda(), num_bits=4, reduced_rank=4, num_iter=num_iter)
        for a, b in zip(ours, theirs, strict=True):
            torch.testing.assert_close(a, b.cpu(), atol=1e-4, rtol=1e-4)  # SVD on another device


def test_loftq_needs_an_iteration():
    with pytest.raises(ValueError, match="num_iter"):
        loftq_init(torch.randn(8, 64), r=2, num_iter=0)
