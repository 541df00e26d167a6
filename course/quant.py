"""Blockwise 4-bit (NF4, FP4, INT4) and 8-bit quantization by hand, bit-exact with bitsandbytes.

The QLoRA recipe (Dettmers et al. 2023) stores the frozen base weights as 4-bit indices into
a 16-value codebook, one fp32 scale (`absmax`) per block of `blocksize` weights (Sec. 2,
"Block-wise k-bit Quantization"), and optionally quantizes those scales again to 8 bits
("Double Quantization", Sec. 3). Everything here is short vectorized torch; the tests prove
the packed bytes, the absmax values and the dequantized weights `torch.equal` to
`bitsandbytes.functional.quantize_4bit` / `dequantize_4bit` on CPU.

Where bitsandbytes' CPU kernels make a choice that a textbook version would not (a
reciprocal multiply for full blocks but a division for the short last block, the tiny
absmax floor of an all-zero last block, a 65,536-entry lookup table in the 8-bit kernel),
we say so next to the line that copies it.
"""

import dataclasses
import math
import statistics
from dataclasses import dataclass

import torch
from torch import nn

# --- codebooks ------------------------------------------------------------------------

# bitsandbytes `create_normal_map(offset=0.9677083)`, "empirically optimized": the largest
# probability whose normal quantile becomes the code value 1.0. It equals 1 - (1/30 + 1/32) / 2;
# bitsandbytes gives no derivation.
NF4_OFFSET = 0.9677083
VALID_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # bitsandbytes' 4-bit blocksizes
QUANT_TYPES = ("nf4", "fp4", "int4")
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DOUBLE_QUANT_BLOCKSIZE = 256  # QLoRA Sec. 3: second-level blocks of 256 first-level constants
ABSMAX_FLOOR = 1e-38  # bitsandbytes divides by max(absmax, 1e-38): an all-zero block stays zero


def nf4_code(offset: float = NF4_OFFSET) -> torch.Tensor:
    """The 16 NormalFloat values: equal-probability bins of N(0, 1), normalized to [-1, 1].

    QLoRA eq. 4 puts each code value halfway between two quantiles of the standard normal,
    so every bin holds the same probability mass and normally distributed weights use all 16
    codes equally often. bitsandbytes builds it asymmetrically so that 0 is exact: 8
    quantiles at evenly spaced probabilities from `offset` towards 0.5 for the positive half,
    7 for the negative half, plus one exact zero, all divided by the largest.

        >>> nf4_code()[[0, 7, 15]].tolist()
        [-1.0, 0.0, 1.0]

    The probabilities are laid out in fp32 (`torch.linspace`) and the quantiles taken in
    float64 (`statistics.NormalDist`, no scipy), exactly as `create_normal_map` does, so the
    result equals bitsandbytes' hard-coded table bit for bit.
    """
    quantile = statistics.NormalDist().inv_cdf
    pos_p = torch.linspace(offset, 0.5, 9)[:-1].tolist()  # 8 probabilities, fp32 like bitsandbytes
    neg_p = torch.linspace(offset, 0.5, 8)[:-1].tolist()  # 7 probabilities
    values = [quantile(p) for p in pos_p] + [0.0] + [-quantile(p) for p in neg_p]
    code = torch.tensor(values, dtype=torch.float32).sort().values  # (16,)
    return code / code.max()


NF4_CODE = nf4_code()
# FP4 (1 sign, 2 exponent, 1 mantissa bit) indexed by bit pattern, bias 2^(e-1) = 2, so that
# index 0b0110 means +2 and 0b1110 means -2. From bitsandbytes `get_4bit_type("fp4")`.
FP4_CODE = torch.tensor([0, 0.0625, 8, 12, 4, 6, 2, 3, -0.0, -0.0625, -8, -12, -4, -6, -2, -3]) / 12
# The naive baseline: symmetric integers -7..7 scaled by 1/7, sorted. Zero appears twice
# (-0 and +0), so only 15 of the 16 codes are distinct: one reason INT4 wastes precision.
INT4_CODE = torch.tensor([-7, -6, -5, -4, -3, -2, -1, -0.0, 0, 1, 2, 3, 4, 5, 6, 7]) / 7
CODES = {"nf4": NF4_CODE, "fp4": FP4_CODE, "int4": INT4_CODE}


def dynamic_code(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """The 8-bit "dynamic" map of Dettmers (2015), used for double quantization and 8-bit Adam.

    Each value is sign * 10^(-e) * fraction: a leading run of zero bits picks the decade
    (up to 7 of them), the remaining bits a fraction on a linear grid in [0.1, 1]. Small
    magnitudes get many codes, large ones fine relative steps. Rebuilt exactly like
    bitsandbytes `create_dynamic_map` (fp32 fractions, sorted, padded with zeros to 256
    entries), for every argument combination it accepts; signed defaults: min -0.99297, max 1.0.
    """
    for name, value in (("max_exponent_bits", max_exponent_bits), ("total_bits", total_bits)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if max_exponent_bits < 0 or not 1 <= total_bits <= 8:
        raise ValueError(
            f"dynamic_code needs max_exponent_bits >= 0 and total_bits in 1..8 (the defaults are 7 and 8), "
            f"got max_exponent_bits={max_exponent_bits}, total_bits={total_bits}"
        )
    non_sign_bits = total_bits - 1
    values = []
    for i in range(max_exponent_bits):  # one decade per exponent, not a loop over elements
        # bitsandbytes truncates with int(): 2^(i - 1) + 1 = 1.5 becomes one bound, no fraction
        n_bounds = int(2 ** (i + non_sign_bits - max_exponent_bits + (0 if signed else 1)) + 1)
        bounds = torch.linspace(0.1, 1, n_bounds)  # (n_bounds,)
        fractions = (bounds[:-1] + bounds[1:]) / 2.0  # bin midpoints
        decade = (10 ** (-(max_exponent_bits - 1) + i)) * fractions
        values += [decade, -decade] if signed else [decade]
    # When fewer exponent bits are allowed than fraction bits exist, bitsandbytes adds the
    # codes of the all-zero exponent in the last decade again ("additional items").
    # Its loop variable is then the last exponent, so these land in the decade 10^0.
    additional = 2 ** (non_sign_bits - max_exponent_bits) - 1
    if additional > 0 and max_exponent_bits == 0:
        raise ValueError(
            f"dynamic_code with max_exponent_bits=0 has no decade for its {additional} fraction codes "
            "(bitsandbytes fails on it too): use max_exponent_bits >= 1"
        )
    if additional > 0:
        bounds = torch.linspace(0.1, 1, additional + 1)  # (additional + 1,)
        fractions = (bounds[:-1] + bounds[1:]) / 2.0  # decade 10^0: the fractions themselves
        values += [fractions, -fractions] if signed else [fractions]
    code = torch.cat(values + [torch.tensor([0.0, 1.0])])
    if code.numel() != 2**total_bits:
        raise ValueError(
            f"dynamic_code(signed={signed}, max_exponent_bits={max_exponent_bits}, total_bits={total_bits}) "
            f"gives {code.numel()} values, not 2^{total_bits}; bitsandbytes refuses these arguments too "
            "(use the defaults, or fewer exponent bits)"
        )
    code = torch.cat([code, torch.zeros(256 - code.numel())])  # bitsandbytes pads with zeros to 256
    return code.sort().values  # (256,)


# --- containers -----------------------------------------------------------------------


def _fields_equal(a, b) -> bool:
    """Field-by-field equality of two states, tensors compared exactly (values, dtype, shape)."""
    if type(a) is not type(b):
        return False
    for field in dataclasses.fields(a):
        x, y = getattr(a, field.name), getattr(b, field.name)
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            same = (
                isinstance(x, torch.Tensor)
                and isinstance(y, torch.Tensor)
                and x.dtype == y.dtype
                and x.device == y.device
                and torch.equal(x, y)
            )
        else:
            same = x == y
        if not same:
            return False
    return True


@dataclass(eq=False)
class State8bit:
    """Blockwise 8-bit state: the fields of bitsandbytes' `QuantState` that 8 bits need.

    `==` compares every field, tensors exactly, as bitsandbytes compares its QuantState.
    """

    absmax: torch.Tensor  # fp32 (n_blocks,)
    code: torch.Tensor  # fp32 (256,)
    blocksize: int = 256
    dtype: torch.dtype = torch.float32  # dtype of the tensor that was quantized

    __eq__ = _fields_equal
    __hash__ = None  # mutable, like any dataclass with an equality


@dataclass(eq=False)
class Quantized4bit:
    """A 4-bit tensor, field for field comparable with bitsandbytes' `QuantState`.

    `==` compares every field, tensors exactly (a copy, a pickle or a state-dict round trip
    equals the original); the quantization constants never carry an autograd graph.
    """

    packed: torch.Tensor  # uint8 ((n + 1) // 2, 1): element 2i in the high nibble, 2i+1 in the low
    absmax: torch.Tensor  # fp32 (n_blocks,); uint8 (n_blocks,) when double-quantized
    shape: torch.Size  # shape of the original tensor
    dtype: torch.dtype  # dtype of the original tensor (and of the dequantized one)
    blocksize: int = 64
    quant_type: str = "nf4"
    code: torch.Tensor | None = None  # fp32 (16,), the codebook
    offset: torch.Tensor | None = None  # fp32 scalar: mean absmax, subtracted before double quant
    state2: State8bit | None = None  # second-level state: absmax2, dynamic code, blocksize 256

    __eq__ = _fields_equal
    __hash__ = None

    @property
    def nested(self) -> bool:
        return self.state2 is not None


# --- checks at the door -----------------------------------------------------------------


def _check_input(x: torch.Tensor, blocksize: int, allowed: tuple | None = VALID_BLOCKSIZES) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.device.type == "meta":
        raise ValueError("x is on the meta device (shapes only, no values): load or materialize it first")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor (fp32, fp16 or bf16), got {x.dtype}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"x has dtype {x.dtype}; bitsandbytes supports fp32, fp16, bf16: use x.float()")
    if x.numel() == 0:
        raise ValueError(f"x is empty (shape {tuple(x.shape)}): there is nothing to quantize")
    _check_blocksize(blocksize, allowed)


def _check_blocksize(blocksize: int, allowed: tuple | None) -> None:
    # bool is an int in Python: blocksize=True would silently mean blocks of 1
    ok = (
        isinstance(blocksize, int)
        and not isinstance(blocksize, bool)
        and blocksize > 0
        and (blocksize & (blocksize - 1)) == 0
    )
    if allowed is not None:
        ok = ok and blocksize in allowed
    if not ok:
        allowed_text = ", ".join(map(str, allowed)) if allowed else "a power of two"
        raise ValueError(f"blocksize must be one of {allowed_text}; got {blocksize!r}")


def _check_code(code: torch.Tensor) -> torch.Tensor:
    """An 8-bit code: a 1-D finite tensor of at most 256 values (its indices must fit in a uint8)."""
    if not isinstance(code, torch.Tensor):
        raise ValueError(f"code must be a 1-D torch.Tensor of at most 256 values, got {type(code).__name__}")
    if code.dim() != 1 or not 2 <= code.numel() <= 256 or not code.is_floating_point():
        raise ValueError(
            f"code must be a 1-D floating-point tensor of 2..256 values (uint8 indices), "
            f"got shape {tuple(code.shape)} and dtype {code.dtype}"
        )
    code = code.detach().float()
    if not bool(torch.isfinite(code).all()):
        raise ValueError("code contains NaN or inf: every code value must be a finite number in [-1, 1]")
    return code


# --- shared pieces ----------------------------------------------------------------------


def _nearest_code(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest code value; a value exactly halfway goes to the lower code.

    Decision boundaries are the fp32 midpoints between neighbouring sorted code values, as in
    bitsandbytes' `torch.bucketize` kernel. For a codebook that is not sorted (FP4 is
    indexed by bit pattern) we sort it, stably, and map the sorted position back.
    """
    if bool((code[1:] >= code[:-1]).all()):  # sorted (NF4, INT4, dynamic): no remapping needed
        return torch.bucketize(scaled, (code[:-1] + code[1:]) / 2)
    order = torch.argsort(code, stable=True)  # (16,): FP4 positions in value order
    sorted_code = code[order]
    bounds = (sorted_code[:-1] + sorted_code[1:]) / 2  # (15,)
    return order[torch.bucketize(scaled, bounds)]


def _absmax_and_scale(flat: torch.Tensor, blocksize: int, kernel: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block absmax (fp32) and the values scaled into [-1, 1]. Blocks span rows.

    Both bitsandbytes CPU kernels scale by multiplying with 1/absmax. The 4-bit one
    (`kernel="4bit"`) divides the short last block by its absmax instead and floors that
    block's stored absmax at 1e-38; the 8-bit one multiplies everywhere. The roundings differ
    in the last bit, so we copy each choice to match the bytes.
    """
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].view(-1, blocksize)  # (n_full_blocks, blocksize)
    absmax = blocks.abs().amax(dim=1)  # (n_full_blocks,)
    scaled = (blocks * (1.0 / absmax.clamp(min=ABSMAX_FLOOR)).unsqueeze(1)).clamp_(-1, 1).view(-1)
    if full < n:
        tail = flat[full:]  # (n % blocksize,)
        tail_absmax = tail.abs().amax()
        safe = tail_absmax.clamp(min=ABSMAX_FLOOR)
        if kernel == "4bit":
            tail_absmax, tail_scaled = safe, tail / safe
        else:
            tail_scaled = tail * (1.0 / safe)
        absmax = torch.cat([absmax, tail_absmax.view(1)])
        scaled = torch.cat([scaled, tail_scaled.clamp(-1, 1)])
    if not bool(torch.isfinite(absmax).all()):  # NaN and inf propagate into their block's absmax
        raise ValueError(
            "x contains NaN or inf: a non-finite value would become its block's absmax and turn every "
            "other weight of the block into 0 or NaN. Find where it came from; we refuse it."
        )
    return absmax, scaled


def _scale_back_(values: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Multiply values (n,) fp32 in place by the absmax of their block, in fp32 like the C kernels."""
    full = values.numel() - values.numel() % blocksize
    values[:full].view(-1, blocksize).mul_(absmax[: full // blocksize].unsqueeze(1))  # (n_full, blocksize)
    if full < values.numel():
        values[full:].mul_(absmax[-1])  # the short last block
    return values


# --- 8-bit blockwise (the double-quantization stage) --------------------------------------


def quantize_blockwise_8bit(
    x: torch.Tensor, code: torch.Tensor | None = None, blocksize: int = 256, emulate_cpu_lut: bool = False
) -> tuple[torch.Tensor, State8bit]:
    """8-bit blockwise quantization with a 256-value code (default: the signed dynamic map).

    Returns uint8 indices of x's shape and a `State8bit` (fp32 absmax per block). Values are
    scaled by multiplying with 1/absmax, as the C kernel does, then rounded to the nearest
    code (exact, the default). bitsandbytes' CPU kernel instead rounds through a
    65,536-entry table: slot k = floor((v + 1) * 32767.5 + 0.5) holds the code nearest to
    -1 + 2k/65535, so a value within half a slot (1.5e-5) of a decision boundary, or in the
    dense region near 0, can land up to 3 codes away. `emulate_cpu_lut=True` reproduces that
    table (identical on every input we measured: random normal values, the absmax values of all
    of SmolLM2's linear layers); it is an aside, not how the format is defined.
    """
    _check_input(x, blocksize, allowed=None)
    code = dynamic_code(signed=True) if code is None else _check_code(code)
    # detach: the constants of a quantized nn.Parameter must not keep its autograd graph
    absmax, scaled = _absmax_and_scale(x.detach().reshape(-1).float(), blocksize, kernel="8bit")
    if emulate_cpu_lut:
        grid = torch.arange(65536, dtype=torch.float32) * (2 / 65535) - 1  # (65536,) slot centres
        slot = torch.floor((scaled + 1) * 32767.5 + 0.5).long().clamp_(0, 65535)
        q = _nearest_code(grid, code)[slot]
    else:
        q = _nearest_code(scaled, code)
    return q.to(torch.uint8).view(x.shape), State8bit(
        absmax=absmax, code=code, blocksize=blocksize, dtype=x.dtype
    )


def dequantize_blockwise_8bit(q: torch.Tensor, state: State8bit) -> torch.Tensor:
    """code[q] * absmax of the block, computed in fp32, returned in the original dtype."""
    if not isinstance(q, torch.Tensor) or q.dtype != torch.uint8:
        raise ValueError(
            f"q must be the uint8 tensor of quantize_blockwise_8bit, got {getattr(q, 'dtype', q)!r}"
        )
    if not isinstance(state, State8bit):
        raise ValueError(
            f"state must be the State8bit of quantize_blockwise_8bit, got {type(state).__name__}"
        )
    values = state.code[q.reshape(-1).long()]  # (n,)
    return _scale_back_(values, state.absmax, state.blocksize).to(state.dtype).view(q.shape)


# --- 4-bit ----------------------------------------------------------------------------


def pack_nibbles(idx: torch.Tensor) -> torch.Tensor:
    """Pack an even count of 4-bit indices two per byte: element 2i high nibble, 2i+1 low."""
    idx = idx.reshape(-1).to(torch.uint8)
    if idx.numel() % 2:
        raise ValueError("pack_nibbles needs an even count; pad with the index of 0.0 first")
    return ((idx[0::2] << 4) | idx[1::2]).unsqueeze(1)  # ((n + 1) // 2, 1)


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of `pack_nibbles`: the first n 4-bit indices, as int64."""
    packed = packed.reshape(-1)
    return torch.stack([packed >> 4, packed & 0x0F], dim=1).view(-1)[:n].long()  # (n,)


def quantize_4bit(
    x: torch.Tensor,
    blocksize: int = 64,
    quant_type: str = "nf4",
    double_quant: bool = False,
    emulate_cpu_lut: bool = False,
) -> Quantized4bit:
    """Blockwise 4-bit quantization (QLoRA Sec. 2), optionally with double quantization (Sec. 3).

    1. Flatten x (blocks span rows) and cut it into blocks of `blocksize` values.
    2. absmax = max |x| per block (fp32); scale the block into [-1, 1].
    3. Replace each scaled value by the index of the nearest code value (4 bits).
    4. Pack two indices per byte, the first in the high nibble.

    A worked example (one short block of 4 values, NF4):

        x      = [0.2, -0.4, 0.1, 0.0]          absmax = 0.4
        scaled = [0.5, -1.0, 0.25, 0.0]         nearest NF4 codes: 0.4407, -1.0, 0.2461, 0.0
        index  = [12, 0, 10, 7]                 packed = [12 << 4 | 0, 10 << 4 | 7] = [192, 167]

    (0.5 lies below the midpoint 0.5017 of codes 0.4407 and 0.5626, so it takes index 12.)

        >>> q = quantize_4bit(torch.tensor([0.2, -0.4, 0.1, 0.0]), blocksize=32)
        >>> q.packed.view(-1).tolist(), q.absmax.tolist()
        ([192, 167], [0.4000000059604645])

    With `double_quant=True` the fp32 absmax values are centred on their mean (`offset`) and
    quantized to 8 bits with the signed dynamic map in blocks of 256 (`state2`), as
    bitsandbytes does with `compress_statistics=True`. `emulate_cpu_lut` selects bitsandbytes'
    CPU lookup-table rounding for that 8-bit stage (see `quantize_blockwise_8bit`).
    """
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    _check_input(x, blocksize)
    code = CODES[quant_type]
    # detach: the constants of a quantized nn.Parameter must not keep its autograd graph
    absmax, scaled = _absmax_and_scale(x.detach().reshape(-1).float(), blocksize, kernel="4bit")
    if scaled.numel() % 2:  # an odd count is padded with one 0.0, as bitsandbytes does
        scaled = nn.functional.pad(scaled, (0, 1))
    packed = pack_nibbles(_nearest_code(scaled, code))
    q = Quantized4bit(packed, absmax, x.shape, x.dtype, blocksize, quant_type, code.clone())
    if double_quant:
        q.offset = absmax.mean()
        q.absmax, q.state2 = quantize_blockwise_8bit(
            absmax - q.offset, dynamic_code(signed=True), DOUBLE_QUANT_BLOCKSIZE, emulate_cpu_lut
        )
    return q


def dequantize_absmax(q: Quantized4bit) -> torch.Tensor:
    """The fp32 absmax per block; for double quantization code2[q] * absmax2 + offset."""
    if not q.nested:
        return q.absmax
    return dequantize_blockwise_8bit(q.absmax, q.state2).float() + q.offset


def dequantize_4bit(q: Quantized4bit) -> torch.Tensor:
    """code[index] * absmax of the block, in fp32, cast to the original dtype and shape."""
    if not isinstance(q, Quantized4bit):
        raise ValueError(f"dequantize_4bit takes the Quantized4bit of quantize_4bit, got {type(q).__name__}")
    n = math.prod(q.shape)
    # One lookup per byte instead of two per nibble: row b of `pairs` is (code[b >> 4], code[b & 15]).
    code = q.code if q.code is not None else CODES[q.quant_type]
    pairs = torch.stack([code.repeat_interleave(16), code.repeat(16)], dim=1)  # (256, 2)
    values = pairs.index_select(0, q.packed.view(-1).int()).view(-1)[:n]  # (n,) fp32
    return _scale_back_(values, dequantize_absmax(q), q.blocksize).to(q.dtype).view(q.shape)


def storage_bits(q: Quantized4bit, include_code: bool = True) -> dict:
    """Every stored bit of a 4-bit tensor, per component.

    `include_code` counts the codebooks too: bitsandbytes writes them into each weight's
    checkpoint entry (`quant_map`, `nested_quant_map`), 512 and 8,192 bits per tensor.
    """
    bits = {"packed": q.packed.numel() * 8, "absmax": q.absmax.numel() * q.absmax.element_size() * 8}
    if q.nested:
        bits["offset"] = 32
        bits["absmax2"] = q.state2.absmax.numel() * 32
    if include_code:
        bits["code"] = q.code.numel() * 32
        if q.nested:
            bits["code2"] = q.state2.code.numel() * 32
    return bits


def bits_per_param(q: Quantized4bit, include_code: bool = True) -> float:
    """Stored bits / parameters. QLoRA's arithmetic: 4 + 32/64 = 4.5 bits without double
    quantization, 4 + 8/64 + 32/(64 * 256) = 4.127 with it (blocksize 64, then 256)."""
    return sum(storage_bits(q, include_code).values()) / math.prod(q.shape)


def qlora_bits_per_param(blocksize: int = 64, blocksize2: int | None = 256) -> float:
    """The QLoRA paper's arithmetic (Sec. 3): 4 bits per weight plus the constants.

    Without double quantization (`blocksize2=None`) each block of `blocksize` weights stores
    one fp32 absmax: 4 + 32/blocksize. With it, each block stores an 8-bit absmax and every
    `blocksize2` of those share one fp32 absmax2: 4 + 8/blocksize + 32/(blocksize*blocksize2).

        >>> qlora_bits_per_param(64, None), round(qlora_bits_per_param(64, 256), 3)
        (4.5, 4.127)
    """
    if blocksize2 is None:
        return 4 + 32 / blocksize
    return 4 + 8 / blocksize + 32 / (blocksize * blocksize2)


# --- a 4-bit linear layer by hand --------------------------------------------------------


class _MatMul4bit(torch.autograd.Function):
    """y = x W^T + b with W decoded from its 4-bit storage in forward, and decoded again in backward.

    A plain `F.linear(x, dequantize_4bit(q))` would let autograd keep the decoded fp32 W of
    every layer until the backward pass, so during training the 4-bit storage would save
    nothing. Like bitsandbytes' `MatMul4Bit`, we keep only a reference to the packed weight
    (already in memory) and pay a second decode instead. W and b are frozen: only x gets a gradient.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: "Linear4bit") -> torch.Tensor:
        ctx.layer = layer
        bias = None if layer.bias is None else layer.bias.to(x.dtype)
        return nn.functional.linear(x, layer.dequantized(x.dtype), bias)  # (..., out_features)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        grad_x = grad_y @ ctx.layer.dequantized(grad_y.dtype) if ctx.needs_input_grad[0] else None
        return grad_x, None  # (..., in_features); no gradient for the layer


class Linear4bit(nn.Module):
    """A frozen linear layer whose weight is stored in 4 bits and dequantized in forward.

    y = x W^T + b with W = dequantize_4bit(weight), cast to x's dtype: the same arithmetic as
    `bnb.nn.Linear4bit` on CPU (dequantize, then `F.linear`). For training, the decoded W is
    not kept for backward but decoded again there (`_MatMul4bit`). The quantized tensors are
    buffers, so `.to()`, `state_dict()` and memory counts see them.

    Like bitsandbytes, `.to(torch.bfloat16)` (or `.half()`) changes the compute dtype only:
    the quantization constants stay fp32 and move devices, never dtypes, so the decoded weight
    does not move. `state_dict()` records the format (shape, dtype, blocksize, quant_type,
    double quantization) and loading a state dict of another format is refused.
    """

    QUANT_BUFFERS = ("absmax", "code", "offset", "absmax2", "code2")  # fp32 constants: never cast

    def __init__(self, weight: Quantized4bit, bias: torch.Tensor | None = None):
        super().__init__()
        if len(weight.shape) != 2:
            raise ValueError(f"Linear4bit needs a 2-D weight (out_features, in_features), got {weight.shape}")
        self.out_features, self.in_features = weight.shape
        self.shape, self.dtype, self.blocksize, self.quant_type = (
            weight.shape,
            weight.dtype,
            weight.blocksize,
            weight.quant_type,
        )
        self.register_buffer("packed", weight.packed)
        self.register_buffer("absmax", weight.absmax)
        self.register_buffer("code", weight.code)
        self.register_buffer("offset", weight.offset)
        self.register_buffer("absmax2", None if weight.state2 is None else weight.state2.absmax)
        self.register_buffer("code2", None if weight.state2 is None else weight.state2.code)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def _apply(self, fn, recurse=True):
        """Module.to / .half / .cuda call this: the constants take fn's device, keep their dtype."""
        constants = {name: self._buffers[name] for name in self.QUANT_BUFFERS}
        super()._apply(fn, recurse)
        for name, before in constants.items():
            after = self._buffers[name]
            if after is not None and after.dtype != before.dtype:
                self._buffers[name] = before.to(after.device)  # from the original: no round trip
        return self

    def _format(self) -> dict:
        return {
            "shape": list(self.shape),
            "dtype": str(self.dtype).removeprefix("torch."),
            "blocksize": self.blocksize,
            "quant_type": self.quant_type,
            "double_quant": self.absmax2 is not None,
        }

    def get_extra_state(self) -> dict:
        return self._format()

    def set_extra_state(self, state) -> None:
        pass  # checked before any tensor was copied, in _load_from_state_dict

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        saved = state_dict.get(prefix + "_extra_state")
        if saved is not None and saved != self._format():
            raise ValueError(
                f"this state dict holds a Linear4bit of another format: saved {saved}, this layer "
                f"{self._format()}. Build the layer with the same quantize_4bit settings, then load."
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @classmethod
    def from_linear(cls, linear: nn.Linear, **quant_kwargs) -> "Linear4bit":
        """Quantize an `nn.Linear` (kwargs as for `quantize_4bit`)."""
        return cls(quantize_4bit(linear.weight.detach(), **quant_kwargs), linear.bias)

    @property
    def weight_q(self) -> Quantized4bit:
        state2 = None if self.absmax2 is None else State8bit(self.absmax2, self.code2, DOUBLE_QUANT_BLOCKSIZE)
        return Quantized4bit(
            self.packed,
            self.absmax,
            self.shape,
            self.dtype,
            self.blocksize,
            self.quant_type,
            self.code,
            self.offset,
            state2,
        )

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight decoded from 4 bits, (out_features, in_features), in `dtype`."""
        return dequantize_4bit(self.weight_q).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() == 0:
            raise ValueError(
                f"Linear4bit takes a floating-point tensor (..., {self.in_features}), got {x!r:.80}"
            )
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"Linear4bit expects inputs of width in_features={self.in_features} (..., {self.in_features}), "
                f"got shape {tuple(x.shape)}"
            )
        return _MatMul4bit.apply(x, self)

    def extra_repr(self) -> str:
        dq = ", double_quant" if self.absmax2 is not None else ""
        return f"{self.in_features}, {self.out_features}, {self.quant_type}, blocksize={self.blocksize}{dq}"


def quantize_linear_layers(model: nn.Module, skip: tuple = ("lm_head",), **quant_kwargs) -> list[str]:
    """Replace every `nn.Linear` of `model` (in place) by our `Linear4bit`; returns their names.

    `skip` keeps modules whose name ends with one of these in full precision; transformers
    does the same for `lm_head` (tied to the embeddings in SmolLM2).
    """
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not name.endswith(tuple(skip))
    ]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Linear4bit.from_linear(module, **quant_kwargs))
    return [name for name, _ in targets]


def dequantize_linear_layers(model: nn.Module) -> list[str]:
    """Replace every `Linear4bit` of `model` (in place) by an `nn.Linear` holding its decoded weight.

    The forward math is unchanged (Linear4bit computes exactly F.linear(x, dequantized W));
    only the decoding happens once instead of at every call. Useful for token-by-token
    generation on CPU, where re-decoding every weight at each step dominates the time.
    """
    targets = [(name, module) for name, module in model.named_modules() if isinstance(module, Linear4bit)]
    for name, module in targets:
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        linear.weight = nn.Parameter(dequantize_4bit(module.weight_q), requires_grad=False)
        if module.bias is not None:
            linear.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=False)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, linear)
    return [name for name, _ in targets]
