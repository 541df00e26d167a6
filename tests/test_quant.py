"""course.quant against bitsandbytes on CPU: bit-exact 4-bit, double quantization, Linear4bit.

bitsandbytes dequantizes a tensor whose last dimension is odd through a `torch.compile`d
PyTorch function (the C kernel needs an even last dimension); each new shape, blocksize or
dtype recompiles (seconds each), and after 8 dynamo falls back to eager with a warning.
The large grid of odd shapes therefore runs bitsandbytes' same function eagerly
(`eager_bnb`); `test_odd_shapes_through_compiled_bnb_path` keeps the compiled path covered.

On CPUs with AVX-512, bitsandbytes 0.50.2's C dequantization kernel indexes blocks row by row,
so where a block spans two rows (last dimension not a multiple of the blocksize, e.g. (40, 96)
at 64, (64, 64) at 128) it decodes some values with the wrong block's absmax; its own
pure-PyTorch implementation (the default backend, used for odd shapes) and its scalar kernel
index the flattened tensor. Our bytes and absmax equal bitsandbytes' everywhere; our decoded
values equal its reference implementation everywhere, and its C kernel wherever that kernel
agrees with its reference. The deviation is asserted to happen only on AVX-512 and only where
a block spans rows (`assert_kernel_deviation_is_the_known_one`). SmolLM2's layers (rows of 576
or 1536 at blocksize 64) are not affected.
"""

import copy
import dataclasses
import itertools
import math
import pickle

import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
import pytest
import torch

import course
from course import quant as Q

BLOCKSIZES = (32, 64, 128, 256, 4096)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Weights of a trained layer are roughly N(0, 0.02^2); the exact scale does not matter for
# the bytes (absmax scaling), but keeps fp16 in its normal range.
SCALE = 0.02


@pytest.fixture
def eager_bnb():
    import torch._dynamo

    with torch._dynamo.config.patch(disable=True):
        yield


def bnb_4bit(x, blocksize, quant_type, double_quant=False):
    packed, state = bnbF.quantize_4bit(
        x, blocksize=blocksize, quant_type=quant_type, compress_statistics=double_quant
    )
    return packed, state, bnbF.dequantize_4bit(packed, state)


def bnb_reference_dequantize(packed, absmax, blocksize, quant_type, shape, dtype):
    """bitsandbytes' own pure-PyTorch 4-bit decoding (its default backend), block = flat index."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code

    code = _get_4bit_code(quant_type, packed.device)
    return _dequantize_4bit_compute(
        packed.view(torch.uint8).reshape(-1), absmax, code, blocksize, shape, dtype
    )


def assert_kernel_deviation_is_the_known_one(shape, blocksize):
    """bitsandbytes' C decoder goes wrong only where a block of `blocksize` values spans two rows (notebook 04).

    It decodes a row at a time with the wrong block's absmax for the part of a block in the next row, on
    every CPU capability (AVX512 and AVX2 alike); where it is not used (an odd last dimension, and block
    sizes >= 2048 on AVX512 CPUs, which fall back to its PyTorch decoder) nothing deviates.
    """
    spans_rows = len(shape) == 2 and shape[0] > 1 and shape[1] % blocksize != 0
    assert spans_rows, f"bitsandbytes' C kernel disagrees with its reference at {shape}, {blocksize}"


def assert_bit_exact(x, blocksize, quant_type):
    packed, state, deq = bnb_4bit(x, blocksize, quant_type)
    q = Q.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type)
    assert q.packed.dtype == torch.uint8 and q.packed.shape == ((x.numel() + 1) // 2, 1)
    assert torch.equal(q.packed, packed), "packed bytes differ"
    assert torch.equal(q.absmax, state.absmax), "absmax differs"
    ours = Q.dequantize_4bit(q)
    assert ours.shape == x.shape and ours.dtype == x.dtype == deq.dtype
    # bitsandbytes returns (1, n) for an even-length 1-D tensor on CPU; we keep x's shape.
    reference = bnb_reference_dequantize(packed, state.absmax, blocksize, quant_type, x.shape, x.dtype)
    assert torch.equal(ours, reference), "dequantized values differ from bitsandbytes' reference"
    if not torch.equal(deq.reshape(-1), reference.reshape(-1)):
        assert_kernel_deviation_is_the_known_one(tuple(x.shape), blocksize)


# --- codebooks --------------------------------------------------------------------------


def test_nf4_code_equals_bitsandbytes_and_facts():
    # fmt: off
    facts = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
             -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
             0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
             0.7229568362236023, 1.0]
    # fmt: on
    assert torch.equal(Q.nf4_code(), torch.tensor(facts))
    assert torch.equal(Q.NF4_CODE, bnbF.get_4bit_type("nf4", device="cpu"))
    assert Q.NF4_OFFSET == pytest.approx(1 - (1 / 30 + 1 / 32) / 2, abs=1e-7)


def test_fp4_int4_and_dynamic_codes():
    assert torch.equal(Q.FP4_CODE, bnbF.get_4bit_type("fp4", device="cpu"))
    assert Q.FP4_CODE[0b0110] * 12 == 2 and Q.FP4_CODE[0b1110] * 12 == -2  # sign bit first
    assert torch.equal(
        Q.INT4_CODE, torch.arange(-7, 8).repeat_interleave(torch.tensor([1] * 7 + [2] + [1] * 7)).float() / 7
    )
    assert Q.INT4_CODE.unique().numel() == 15  # -0 and +0: one code wasted
    for signed in (True, False):
        assert torch.equal(Q.dynamic_code(signed), bnbF.create_dynamic_map(signed=signed))
    code = Q.dynamic_code()
    assert code.numel() == 256 and code.max() == 1.0 and code.min() == pytest.approx(-0.99297, abs=1e-5)


def test_nf4_uses_its_codes_most_evenly():
    """The point of NF4: on normal data, codes are used nearly equally often (entropy near 4 bits).

    Not exactly equally: a block of 64 is scaled by its own max (about 2.4 sigma), not by the
    1.85 sigma the code assumes, and the max itself always lands on +-1. Measured entropy on
    N(0, 1): NF4 3.88, FP4 3.72, INT4 3.65 bits.
    """
    torch.manual_seed(0)
    x = torch.randn(1 << 18)
    entropy = {}
    for quant_type in Q.QUANT_TYPES:
        q = Q.quantize_4bit(x, blocksize=64, quant_type=quant_type)
        share = torch.bincount(Q.unpack_nibbles(q.packed, x.numel()), minlength=16).float() / x.numel()
        entropy[quant_type] = -(share[share > 0] * share[share > 0].log2()).sum().item()
    assert entropy["nf4"] > 3.85 and entropy["nf4"] > entropy["fp4"] > entropy["int4"], entropy


# --- 4-bit, bit-exact -------------------------------------------------------------------


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(24, 50), (64, 64), (4, 2048), (2,)])
def test_bit_exact_even_last_dim(shape, dtype, blocksize, quant_type):
    # even last dimension: bitsandbytes' C dequantization kernel
    torch.manual_seed(math.prod(shape) + blocksize)
    assert_bit_exact((torch.randn(shape) * SCALE).to(dtype), blocksize, quant_type)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7, 13), (33, 129), (4097,), (1,)])
def test_bit_exact_odd_shapes(shape, dtype, blocksize, quant_type, eager_bnb):
    torch.manual_seed(math.prod(shape) + blocksize)
    assert_bit_exact((torch.randn(shape) * SCALE).to(dtype), blocksize, quant_type)


def test_odd_shapes_through_compiled_bnb_path():
    torch.manual_seed(0)
    for shape, blocksize, quant_type in [((7, 13), 64, "nf4"), ((33, 129), 128, "fp4")]:
        assert_bit_exact(torch.randn(shape) * SCALE, blocksize, quant_type)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_bit_exact_edge_values(quant_type, eager_bnb):
    """Exact midpoints go to the lower code; zeros, tiny values, a zero block, a zero tail."""
    code = Q.CODES[quant_type].sort().values
    mids = (code[:-1] + code[1:]) / 2
    x = torch.cat([torch.ones(1), mids, -mids, torch.tensor([1e-4, -1e-4, 0.0, -0.0, 0.5, -1.0])])
    x = torch.cat([x, torch.zeros(64), torch.zeros(7)])  # a zero block and a short zero tail
    assert_bit_exact(x, 64, quant_type)


def values_where_reciprocal_and_division_disagree(absmax, thresholds, side_of, ulps=64):
    """fp32 values x near absmax * threshold where side_of(x * (1/absmax)) != side_of(x / absmax).

    The two ways of scaling round differently in the last bit; right at a decision boundary
    that changes the code. bitsandbytes multiplies by the reciprocal, except in the short
    last block of its 4-bit kernel, and only values like these reveal which one a
    re-implementation uses.
    """
    a = torch.tensor(absmax)
    centres = thresholds.float() * a  # (n_thresholds,)
    steps = torch.arange(-ulps, ulps) * torch.finfo(torch.float32).eps  # (2 * ulps,)
    xs = (centres.unsqueeze(1) * (1 + steps)).reshape(-1)  # (n_thresholds * 2 * ulps,)
    xs = xs[xs.abs() < absmax]
    return xs[side_of(xs * (1.0 / a)) != side_of(xs / a)]


def test_bit_exact_scaling_rounding_full_block_and_tail(eager_bnb):
    absmax = 1.3
    bounds = (Q.NF4_CODE[:-1] + Q.NF4_CODE[1:]) / 2
    split = values_where_reciprocal_and_division_disagree(
        absmax, bounds, lambda v: torch.bucketize(v, bounds)
    )
    assert 1 <= split.numel() <= 31
    block = torch.cat([torch.tensor([absmax]), split])
    head = torch.cat([block, torch.zeros(32 - block.numel())])  # one full block of 32
    assert_bit_exact(torch.cat([head, block]), 32, "nf4")  # then the same values as a short last block


def test_8bit_lut_emulation_scales_by_reciprocal():
    code = Q.dynamic_code()
    grid = torch.arange(65536, dtype=torch.float32) * (2 / 65535) - 1
    lut = Q._nearest_code(grid, code)
    changes = torch.nonzero(lut[1:] != lut[:-1]).view(-1) + 1  # slots where the code changes
    thresholds = (changes.double() - 0.5) / 32767.5 - 1

    def lut_index(v):
        return lut[torch.floor((v + 1) * 32767.5 + 0.5).long().clamp(0, 65535)]

    split = values_where_reciprocal_and_division_disagree(0.7, thresholds, lut_index)
    assert 1 <= split.numel() <= 255
    block = torch.cat([torch.tensor([0.7]), split])
    x = torch.cat([block, torch.zeros(256 - block.numel()), block])  # a full block, then a short one
    q_bnb, _ = bnbF.quantize_blockwise(x, code=code, blocksize=256)
    q, _ = Q.quantize_blockwise_8bit(x, code, blocksize=256, emulate_cpu_lut=True)
    assert torch.equal(q, q_bnb)


def test_pack_unpack_nibbles_round_trip():
    idx = torch.randint(0, 16, (1000,))
    packed = Q.pack_nibbles(idx)
    assert packed.shape == (500, 1)
    assert packed[0, 0] == idx[0] * 16 + idx[1]  # first element in the high nibble
    assert torch.equal(Q.unpack_nibbles(packed, 999), idx[:999])


@pytest.mark.parametrize("quant_type", Q.QUANT_TYPES)
def test_round_trip_error_within_half_a_code_gap(quant_type):
    torch.manual_seed(1)
    x = torch.randn(40, 100) * SCALE
    q = Q.quantize_4bit(x, blocksize=64, quant_type=quant_type)
    err = (Q.dequantize_4bit(q) - x).abs().reshape(-1)
    code = q.code.sort().values
    bound = (code.diff().max() / 2 * q.absmax).repeat_interleave(64)[: x.numel()]
    assert (err <= bound * (1 + 1e-6)).all()


def test_mse_ordering_on_normal_weights():
    """NF4 has the lowest MSE on normal data. FP4 loses even to INT4 here (measured 5.9e-6 vs
    4.5e-6 vs NF4 3.3e-6): bitsandbytes' FP4 has no code between 0.0052 and 0.167 of absmax,
    where about a third of normal weights lie. (The QLoRA paper compares perplexity, not MSE.)"""
    torch.manual_seed(2)
    x = torch.randn(256, 256) * SCALE
    mse = {
        t: (Q.dequantize_4bit(Q.quantize_4bit(x, quant_type=t)) - x).pow(2).mean().item()
        for t in Q.QUANT_TYPES
    }
    assert mse["nf4"] < mse["int4"] < mse["fp4"], mse


# --- double quantization -----------------------------------------------------------------


@pytest.mark.parametrize(
    "shape,blocksize", [((4096, 512), 64), ((576, 1536), 64), ((1000, 1000), 32), ((333, 778), 128)]
)
def test_double_quant_against_bitsandbytes(shape, blocksize):
    torch.manual_seed(3)
    x = torch.randn(shape) * SCALE
    packed, state, deq = bnb_4bit(x, blocksize, "nf4", double_quant=True)
    q = Q.quantize_4bit(x, blocksize=blocksize, quant_type="nf4", double_quant=True)
    plain = Q.quantize_4bit(x, blocksize=blocksize, quant_type="nf4")
    assert torch.equal(q.packed, packed)
    assert torch.equal(q.state2.code, state.state2.code)
    assert torch.equal(q.offset, state.offset) and q.offset == plain.absmax.mean()
    assert torch.equal(q.state2.absmax, state.state2.absmax) and q.state2.blocksize == 256
    assert q.absmax.dtype == torch.uint8 and q.absmax.shape == state.absmax.shape
    # 1. Agreement of the 8-bit absmax codes: >= 99.5% (measured 99.8-99.9%).
    agree = (q.absmax == state.absmax).float().mean().item()
    assert agree >= 0.995, agree
    # 2. Ours is exact nearest-code: within half the local gap of the dynamic code.
    absmax2 = q.state2.absmax.repeat_interleave(256)[: q.absmax.numel()]
    ours = Q.dequantize_absmax(q)
    code2 = q.state2.code
    gap = torch.maximum(
        code2.diff()[q.absmax.long().clamp(max=254)], code2.diff()[(q.absmax.long() - 1).clamp(min=0)]
    )
    assert (
        (ours - plain.absmax).abs() <= gap / 2 * absmax2 + 4 * torch.finfo(torch.float32).eps * ours
    ).all()
    # 3. bitsandbytes' reconstruction differs from ours by less than one 8-bit step.
    theirs = bnbF.dequantize_blockwise(state.absmax, state.state2) + state.offset
    ulps = 4 * torch.finfo(torch.float32).eps * ours.abs()  # both add the offset in fp32
    assert ((ours - theirs).abs() <= code2.diff().max() * absmax2 + ulps).all()
    # 4. The reason: the CPU kernel's lookup table. Emulating it makes everything identical.
    lut = Q.quantize_4bit(x, blocksize=blocksize, quant_type="nf4", double_quant=True, emulate_cpu_lut=True)
    assert torch.equal(lut.absmax, state.absmax)
    assert torch.equal(Q.dequantize_4bit(lut), deq)
    # and the nearest-code result is close to theirs
    assert (Q.dequantize_4bit(q) - deq).abs().max() <= code2.diff().max() * absmax2.max() * 1.0


@pytest.mark.parametrize("signed", [True, False])
def test_blockwise_8bit_against_bitsandbytes(signed):
    torch.manual_seed(4)
    x = torch.randn(20_001) if signed else torch.randn(20_001) ** 2
    code = Q.dynamic_code(signed)
    q_bnb, state = bnbF.quantize_blockwise(x, code=code, blocksize=256)
    q, ours = Q.quantize_blockwise_8bit(x, code, blocksize=256)
    assert torch.equal(ours.absmax, state.absmax)
    assert (q == q_bnb).float().mean() > (0.995 if signed else 0.95)
    q_lut, _ = Q.quantize_blockwise_8bit(x, code, blocksize=256, emulate_cpu_lut=True)
    assert torch.equal(q_lut, q_bnb)
    assert torch.equal(Q.dequantize_blockwise_8bit(q_lut, ours), bnbF.dequantize_blockwise(q_bnb, state))


def test_bits_per_param_matches_the_qlora_arithmetic():
    x = torch.zeros(4096, 4096)
    x[0, 0] = 1.0
    assert round(Q.bits_per_param(Q.quantize_4bit(x)), 3) == 4.5
    assert round(Q.bits_per_param(Q.quantize_4bit(x, double_quant=True)), 3) == 4.127
    q = Q.quantize_4bit(torch.randn(576, 576), double_quant=True)
    bits = Q.storage_bits(q)
    n = 576 * 576
    assert bits == {
        "packed": 4 * n,
        "absmax": 8 * n // 64,
        "offset": 32,
        "absmax2": 32 * math.ceil(n / 64 / 256),
        "code": 16 * 32,
        "code2": 256 * 32,
    }
    assert Q.bits_per_param(q, include_code=False) == pytest.approx(4 + 8 / 64 + (32 * 21 + 32) / n)


# --- Linear4bit --------------------------------------------------------------------------


def _bnb_linear4bit(linear, quant_type, double_quant, dtype):
    ref = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        compute_dtype=dtype,
        compress_statistics=double_quant,
        quant_type=quant_type,
    )
    ref.weight = bnb.nn.Params4bit(
        linear.weight.data.clone(),
        requires_grad=False,
        compress_statistics=double_quant,
        quant_type=quant_type,
    )
    ref.bias = torch.nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    return ref.to("cpu")  # Params4bit quantizes when moved to a device


@pytest.mark.parametrize("in_features", [96, 128])  # 96: blocks of 64 span rows; 128: they do not
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear4bit_equals_bitsandbytes(quant_type, double_quant, dtype, in_features):
    torch.manual_seed(5)
    linear = torch.nn.Linear(in_features, 40).to(dtype)
    ref = _bnb_linear4bit(linear, quant_type, double_quant, dtype)  # training mode: decode, then matmul
    ours = Q.Linear4bit.from_linear(
        linear, quant_type=quant_type, double_quant=double_quant, emulate_cpu_lut=True
    )
    state = ref.weight.quant_state
    absmax = (
        bnbF.dequantize_blockwise(state.absmax, state.state2) + state.offset if state.nested else state.absmax
    )
    weight = bnb_reference_dequantize(
        ref.weight.data, absmax, state.blocksize, quant_type, (40, in_features), dtype
    )
    kernel_agrees = torch.equal(bnbF.dequantize_4bit(ref.weight.data, state), weight)
    if not kernel_agrees:
        assert_kernel_deviation_is_the_known_one((40, in_features), state.blocksize)
    x = torch.randn(3, 5, in_features).to(dtype)
    with torch.no_grad():
        assert torch.equal(ours(x), torch.nn.functional.linear(x, weight, ref.bias))
        if kernel_agrees:
            assert torch.equal(ours(x), ref(x))
            assert torch.equal(ours(x[0, :1]), ref(x[0, :1]))  # one token: bitsandbytes' gemv path
    assert torch.equal(ours.packed, ref.weight.data)


def test_bitsandbytes_inference_kernel_on_avx512_bf16():
    # In eval mode without grad, on CPUs with AVX512-BF16, bitsandbytes repacks the weight and runs
    # another kernel: no longer "decode, then F.linear" bit for bit, but within bf16 rounding.
    from bitsandbytes.functional import has_avx512bf16

    torch.manual_seed(3)
    linear = torch.nn.Linear(576, 192)
    ref = _bnb_linear4bit(linear, "nf4", False, torch.float32)
    x = torch.randn(4, 576)
    with torch.no_grad():
        training = ref(x)
        inference = ref.eval()(x)
    if has_avx512bf16():
        assert not torch.equal(training, inference)
        torch.testing.assert_close(inference, training, rtol=2e-2, atol=2e-2)
    else:
        assert torch.equal(training, inference)


@pytest.mark.parametrize("bias", [False, True])
def test_linear4bit_backward_decodes_again_instead_of_keeping_the_weight(bias):
    torch.manual_seed(7)
    linear = torch.nn.Linear(128, 64, bias=bias)
    ours = Q.Linear4bit.from_linear(linear, quant_type="nf4", double_quant=True)
    plain = torch.nn.Linear(128, 64, bias=bias)  # the same decoded weight, autograd's own linear
    plain.weight.data = ours.dequantized(torch.float32)
    if bias:
        plain.bias.data = linear.bias.data.clone()
    x = torch.randn(4, 9, 128, requires_grad=True)
    (grad_ours,) = torch.autograd.grad(ours(x).square().sum(), x)
    (grad_plain,) = torch.autograd.grad(plain(x).square().sum(), x)
    torch.testing.assert_close(grad_ours, grad_plain, rtol=1e-5, atol=1e-6)
    _, saved = course.memory.saved_tensor_bytes(lambda: ours(x), exclude=[x])
    assert saved == 0  # the decoded weight (32 KiB) is not kept for backward


def test_quantize_linear_layers_replaces_all_but_skipped():
    torch.manual_seed(6)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64))
    model.lm_head = torch.nn.Linear(64, 10)
    x = torch.randn(4, 64)
    before = model[2](model[1](model[0](x)))
    names = Q.quantize_linear_layers(model, quant_type="nf4")
    assert names == ["0", "2"]
    assert isinstance(model[0], Q.Linear4bit) and isinstance(model.lm_head, torch.nn.Linear)
    after = model[2](model[1](model[0](x)))
    # 4-bit weights carry ~10% relative error each (uniform init, blocks of 64); two layers
    # give ~12% relative error on the output, measured.
    assert (after - before).norm() < 0.2 * before.norm()
    assert {k for k, _ in model.named_buffers()} >= {"0.packed", "0.absmax", "2.packed"}


# --- bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize("blocksize", [48, 16, 8192, 0, -64, 64.0, "64"])
def test_bad_blocksize(blocksize):
    with pytest.raises(ValueError, match="blocksize must be one of 32, 64"):
        Q.quantize_4bit(torch.randn(128), blocksize=blocksize)


def test_bad_8bit_blocksize():
    with pytest.raises(ValueError, match="power of two"):
        Q.quantize_blockwise_8bit(torch.randn(128), blocksize=100)


@pytest.mark.parametrize(
    "x, kwargs, message",
    [
        (torch.randn(64), {"quant_type": "nf8"}, "quant_type must be one of"),
        (torch.randn(0), {}, "empty"),
        (torch.zeros(3, 0), {}, "empty"),
        (torch.arange(64), {}, "floating-point"),
        (torch.ones(64, dtype=torch.bool), {}, "floating-point"),
        (torch.randn(64, dtype=torch.float64), {}, "x.float()"),
        (torch.tensor([1.0, float("nan"), 2.0]), {}, "NaN or inf"),
        (torch.cat([torch.randn(100), torch.tensor([float("-inf")])]), {}, "NaN or inf"),
        ([1.0, 2.0], {}, "torch.Tensor"),
    ],
)
def test_bad_input(x, kwargs, message):
    with pytest.raises(ValueError, match=message):
        Q.quantize_4bit(x, **kwargs)


def test_nan_refused_in_8bit_too():
    with pytest.raises(ValueError, match="NaN or inf"):
        Q.quantize_blockwise_8bit(torch.tensor([0.5, float("nan")]))


def test_dequantize_linear_layers_keeps_the_outputs():
    torch.manual_seed(7)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64))
    Q.quantize_linear_layers(model, quant_type="fp4", double_quant=True)
    x = torch.randn(4, 64)
    y = model(x)
    assert Q.dequantize_linear_layers(model) == ["0", "2"]
    assert type(model[0]) is torch.nn.Linear and not model[0].weight.requires_grad
    assert torch.equal(model(x), y)  # decoding once = decoding at every call


# --- figures and widget of notebooks 04 / 05 ----------------------------------------------


def test_quant_figures_and_widget_fallback(capsys, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from course import plots, widgets

    figures = [
        plots.codes_on_normal({"INT4": Q.INT4_CODE, "NF4": Q.NF4_CODE}, sigma=0.54),
        plots.weight_histogram(torch.randn(1000), "title"),
        plots.error_vs_blocksize({"NF4": {32: 1e-4, 64: 2e-4}, "INT4": {32: 2e-4, 64: 3e-4}}),
        plots.error_histogram(torch.randn(100), "title"),
        plots.dynamic_code_and_values(Q.dynamic_code(), torch.rand(100)),
        plots.storage_breakdown(
            {"NF4": {"packed": 4.0, "absmax": 0.5}, "NF4 + DQ": {"packed": 4.0, "absmax": 0.127}}
        ),
    ]
    assert all(fig.dpi <= 100 for fig in figures)
    plt.close("all")

    monkeypatch.setenv("COURSE_WIDGETS", "0")
    assert not widgets.has_frontend()
    widgets.quant_error_explorer({("NF4", 64): torch.tensor([0.1, -0.2])})
    assert "NF4   blocksize    64: MSE 2.500e-02, max |error| 2.000e-01" in capsys.readouterr().out
    monkeypatch.delenv("COURSE_WIDGETS")
    monkeypatch.setenv("JPY_SESSION_NAME", "notebooks/04_nf4_quantization.ipynb")  # set by Jupyter Server
    assert widgets.has_frontend()


# --- robustness (issue 13): copies, half precision, state dicts, odd arguments -------------


def test_dynamic_code_equals_bitsandbytes_for_every_argument_it_accepts():
    accepted = 0
    for signed, exponent_bits, total_bits in itertools.product((True, False), range(0, 10), range(1, 9)):
        try:
            reference = bnbF.create_dynamic_map(signed, exponent_bits, total_bits)
        except Exception:  # AssertionError, NameError: bitsandbytes refuses these; so must we
            with pytest.raises(ValueError, match="dynamic_code"):
                Q.dynamic_code(signed, exponent_bits, total_bits)
            continue
        assert torch.equal(Q.dynamic_code(signed, exponent_bits, total_bits), reference), (
            signed,
            exponent_bits,
        )
        accepted += 1
    assert accepted >= 40  # e.g. (True, 8, 8), which used to raise TypeError from torch.linspace
    assert torch.equal(Q.dynamic_code(True, 8, 8), bnbF.create_dynamic_map(True, 8, 8))


@pytest.mark.parametrize("bits", [8, 4])
def test_constants_of_a_quantized_parameter_carry_no_graph_and_copy(bits):
    weight = torch.nn.Parameter(torch.randn(64, 64))
    if bits == 8:
        q, state = Q.quantize_blockwise_8bit(weight)
        assert not q.requires_grad and not state.absmax.requires_grad and state.absmax.grad_fn is None
        assert copy.deepcopy(state) == state
        return
    q = Q.quantize_4bit(weight, double_quant=False)
    assert not q.absmax.requires_grad and q.absmax.grad_fn is None
    layer = Q.Linear4bit(q)
    assert torch.equal(copy.deepcopy(layer).dequantized(torch.float32), layer.dequantized(torch.float32))


@pytest.mark.parametrize("double_quant", [False, True])
def test_quantized4bit_equality_compares_tensors_exactly(double_quant):
    q = Q.quantize_4bit(torch.randn(33, 64), double_quant=double_quant)
    assert q == copy.deepcopy(q) and q == pickle.loads(pickle.dumps(q))
    assert Q.Linear4bit(copy.deepcopy(q)).weight_q == q  # through the layer's buffers
    other = copy.deepcopy(q)
    other.packed[0, 0] ^= 1  # one bit
    assert q != other
    assert q != dataclasses.replace(q, blocksize=128) and q != "a string"
    if double_quant:
        state2 = copy.deepcopy(q.state2)
        state2.absmax = state2.absmax.double()  # same values, another dtype: not equal
        assert q != dataclasses.replace(q, state2=state2)


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linear4bit_to_half_changes_the_compute_dtype_only(double_quant, dtype):
    torch.manual_seed(5)
    layer = Q.Linear4bit.from_linear(torch.nn.Linear(96, 40), double_quant=double_quant)
    weight = layer.dequantized(torch.float32)
    constants = {name: getattr(layer, name) for name in Q.Linear4bit.QUANT_BUFFERS}
    half = copy.deepcopy(layer).to(dtype)
    for name, before in constants.items():
        after = getattr(half, name)
        assert (after is None) == (before is None)
        if before is not None:
            assert after.dtype == before.dtype and torch.equal(after, before), name
    assert torch.equal(half.dequantized(torch.float32), weight)  # used to move by up to 0.45%
    assert half.bias.dtype == dtype
    x = torch.randn(3, 96).to(dtype)
    with torch.no_grad():
        assert torch.equal(half(x), torch.nn.functional.linear(x, weight.to(dtype), half.bias))
    assert torch.equal(half.float().dequantized(torch.float32), weight)  # and back


def test_linear4bit_state_dict_round_trips_and_refuses_another_format(tmp_path):
    torch.manual_seed(6)
    linear = torch.nn.Linear(64, 32)
    layer = Q.Linear4bit.from_linear(linear, double_quant=True)
    torch.save(layer.state_dict(), tmp_path / "layer.pt")
    state = torch.load(tmp_path / "layer.pt", weights_only=True)
    fresh = Q.Linear4bit.from_linear(torch.nn.Linear(64, 32), double_quant=True)
    fresh.load_state_dict(state)
    assert fresh.weight_q == layer.weight_q
    for kwargs in (
        dict(quant_type="fp4", double_quant=True),
        dict(blocksize=128, double_quant=True),
        dict(double_quant=False),
    ):
        other = Q.Linear4bit.from_linear(linear, **kwargs)
        before = {k: v.clone() for k, v in other.state_dict().items() if isinstance(v, torch.Tensor)}
        with pytest.raises(ValueError, match="another format"):
            other.load_state_dict(state)
        after = other.state_dict()
        assert all(torch.equal(after[k], v) for k, v in before.items())  # refused before any copy
    bf16 = Q.Linear4bit.from_linear(linear.to(torch.bfloat16), double_quant=True)
    with pytest.raises(ValueError, match="bfloat16"):
        bf16.load_state_dict(state)


def test_linear4bit_refuses_the_wrong_input_width():
    layer = Q.Linear4bit.from_linear(torch.nn.Linear(64, 32))
    with pytest.raises(ValueError, match="in_features=64"):
        layer(torch.randn(2, 63))


def test_boolean_blocksize_meta_tensors_and_wide_codes_are_refused():
    with pytest.raises(ValueError, match="blocksize"):
        Q.quantize_blockwise_8bit(torch.randn(64), blocksize=True)  # used to mean blocks of 1
    with pytest.raises(ValueError, match="blocksize"):
        Q.quantize_4bit(torch.randn(64), blocksize=True)
    with pytest.raises(ValueError, match="meta device"):
        Q.quantize_4bit(torch.empty(64, 64, device="meta"))
    with pytest.raises(ValueError, match="2..256 values"):
        Q.quantize_blockwise_8bit(torch.randn(512), code=torch.linspace(-1, 1, 300))  # indices would wrap
    with pytest.raises(ValueError, match="NaN or inf"):
        Q.quantize_blockwise_8bit(torch.randn(512), code=torch.tensor([-1.0, float("nan"), 1.0]))
    q, state = Q.quantize_blockwise_8bit(torch.randn(512), code=torch.linspace(-1, 1, 256))  # 256 is fine
    assert q.max() <= 255
