"""Property tests (hypothesis): course.quant against bitsandbytes over shapes, dtypes and block sizes.

The fixed grids of test_quant.py pick shapes by hand; here hypothesis draws them (any 1-D or
2-D shape up to 3,000 elements, fp32/fp16/bf16, every 4-bit blocksize, NF4/FP4, plain or
double-quantized) and shrinks a failure to its smallest case. Few examples (the suite's time
budget), no deadline (bitsandbytes' first call of a kind is slow).

Compared bit for bit: the packed bytes and absmax of `quantize_4bit` (bitsandbytes' CPU
quantizer is pure PyTorch), the 8-bit codes and absmax with the lookup table emulated, and the
dequantized values of a flat tensor. Dequantizing 2-D shapes is left to the grids: on CPU
bitsandbytes' C dequantizer decodes some 2-D shapes (e.g. (10, 96) with blocksize 64, a last
dimension that is a multiple of 32 but not of the blocksize) differently from its own
quantizer's blocks, while its `Linear4bit` forward agrees with ours (test_quant.py).
"""

import bitsandbytes.functional as bnbF
import torch
import torch._dynamo
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from course import quant as Q

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _live(absmax: torch.Tensor, n: int, blocksize: int = 256) -> torch.Tensor:
    """(n,) True where the 8-bit block's absmax is a normal fp32 number.

    bitsandbytes' CPU 8-bit kernel scales by 1/absmax without a floor: an all-zero block gives
    0 * inf = NaN, which its lookup table maps to index 0; we keep the code nearest to 0. Both
    decode to code * 0 = 0 (found by this test, with hypothesis; the decoded values are compared
    everywhere), so only the stored index of such a block differs.
    """
    return (absmax >= torch.finfo(torch.float32).tiny).repeat_interleave(blocksize)[:n]


@st.composite
def tensors(draw, max_elements=3000):
    rows = draw(st.integers(1, 40))
    cols = draw(st.integers(1, max_elements // rows))
    shape = draw(st.sampled_from([(rows * cols,), (rows, cols)]))
    seed = draw(st.integers(0, 2**16))
    scale = draw(st.sampled_from([1e-3, 0.02, 1.0, 30.0]))
    dtype = draw(st.sampled_from(DTYPES))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale
    if x.numel() > 1 and draw(st.booleans()):
        # leading zeros: whole zero blocks (absmax 0). The last value stays nonzero: for an all-zero
        # tensor the double-quantization scale is subnormal (~1e-39) and the two 8-bit kernels
        # then round it differently, for weights that decode to 0 either way.
        x.view(-1)[: draw(st.integers(1, x.numel() - 1))] = 0.0
    return x.to(dtype)


@SETTINGS
@given(
    x=tensors(),
    blocksize=st.sampled_from(Q.VALID_BLOCKSIZES),
    quant_type=st.sampled_from(["nf4", "fp4"]),
    double_quant=st.booleans(),
)
def test_quantize_4bit_equals_bitsandbytes(x, blocksize, quant_type, double_quant):
    packed, state = bnbF.quantize_4bit(
        x, blocksize=blocksize, quant_type=quant_type, compress_statistics=double_quant
    )
    q = Q.quantize_4bit(x, blocksize, quant_type, double_quant=double_quant, emulate_cpu_lut=True)
    assert torch.equal(q.packed, packed)
    assert q.absmax.dtype == state.absmax.dtype
    if not double_quant:
        assert torch.equal(q.absmax, state.absmax)
    else:
        assert torch.equal(q.offset, state.offset) and torch.equal(q.state2.absmax, state.state2.absmax)
        theirs = bnbF.dequantize_blockwise(state.absmax, state.state2) + state.offset
        assert torch.equal(Q.dequantize_absmax(q), theirs)
        live = _live(q.state2.absmax, q.absmax.numel())
        assert torch.equal(q.absmax[live], state.absmax[live])  # the 8-bit codes, see _live
    flat_packed, flat_state = bnbF.quantize_4bit(
        x.reshape(-1), blocksize=blocksize, quant_type=quant_type, compress_statistics=double_quant
    )
    with torch._dynamo.config.patch(disable=True):  # odd lengths: bitsandbytes' compiled path, eagerly
        theirs = bnbF.dequantize_4bit(flat_packed, flat_state)
    ours = Q.dequantize_4bit(q)
    assert ours.dtype == x.dtype and ours.shape == x.shape
    assert torch.equal(ours.reshape(-1), theirs.reshape(-1))


@SETTINGS
@given(
    x=tensors(max_elements=2000),
    blocksize=st.sampled_from([64, 128, 256, 512, 1024, 2048, 4096]),
    signed=st.booleans(),
)
def test_blockwise_8bit_equals_bitsandbytes_with_the_table_emulated(x, blocksize, signed):
    x = x.float() if signed else x.float().abs()
    code = Q.dynamic_code(signed)
    q_bnb, state = bnbF.quantize_blockwise(x, code=code, blocksize=blocksize)
    q, ours = Q.quantize_blockwise_8bit(x, code, blocksize, emulate_cpu_lut=True)
    assert torch.equal(ours.absmax, state.absmax)
    live = _live(ours.absmax, x.numel(), blocksize).view(x.shape)
    assert torch.equal(q[live], q_bnb[live])  # see _live
    assert torch.equal(Q.dequantize_blockwise_8bit(q, ours), bnbF.dequantize_blockwise(q_bnb, state))


@SETTINGS
@given(x=tensors(), blocksize=st.sampled_from(Q.VALID_BLOCKSIZES), quant_type=st.sampled_from(Q.QUANT_TYPES))
def test_round_trip_stays_within_half_a_code_gap_of_each_block(x, blocksize, quant_type):
    """Invariant, no reference needed: |x - deq| <= absmax * (largest code gap / 2) per block."""
    q = Q.quantize_4bit(x, blocksize, quant_type)
    error = (Q.dequantize_4bit(q).float() - x.float()).reshape(-1)  # (n,)
    code = Q.CODES[quant_type].sort().values
    half_gap = (code[1:] - code[:-1]).max() / 2
    absmax = q.absmax.repeat_interleave(blocksize)[: x.numel()]  # (n,) each value's block scale
    rounding = torch.finfo(x.dtype).eps * x.float().abs().reshape(-1)  # the cast back to x's dtype
    assert (error.abs() <= absmax * half_gap * (1 + 1e-6) + rounding).all()
