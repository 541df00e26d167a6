"""Errors at the door for notebook 09's modules: one table, each bad input with the error that names what was expected."""

import pytest
import torch
from torch import nn

from course import dora, loftq, longlora, qalora, rope_scaling

QKV = torch.randn(1, 2, 8, 4)

CASES = [  # (call, exception, words the message must contain)
    (lambda: qalora.quantize_groupwise([[1.0, 2.0]], 2), TypeError, "floating-point torch.Tensor"),
    (lambda: qalora.quantize_groupwise(torch.ones(4, 8, dtype=torch.int64), 4), TypeError, "floating-point"),
    (lambda: qalora.quantize_groupwise(torch.randn(8), 4), ValueError, "2-D weight"),
    (lambda: qalora.quantize_groupwise(torch.randn(4, 8), 4, bits=9), ValueError, "bits must be in 1..8"),
    (lambda: qalora.quantize_groupwise(torch.randn(4, 8), 3), ValueError, "group_size must divide"),
    (lambda: qalora.group_pool("x", 2), TypeError, "floating-point torch.Tensor"),
    (
        lambda: qalora.QALoRALinear(nn.Conv1d(2, 2, 1), r=1, alpha=1),
        ValueError,
        "nn.Linear or a GroupQuantLinear",
    ),
    (
        lambda: qalora.QALoRALinear(nn.Linear(32, 8), r=2, alpha=0, group_size=8),
        ValueError,
        "alpha must be positive",
    ),
    (lambda: longlora.s2_attention(QKV, QKV, QKV[..., :2], 4), ValueError, "same shape"),
    (lambda: longlora.s2_attention(QKV[0], QKV[0], QKV[0], 4), TypeError, "(batch, heads, seq, head_dim)"),
    (lambda: longlora.s2_attention(QKV, QKV, QKV, 3), ValueError, "even group size"),
    (lambda: longlora.use_s2_attention(None, 5), ValueError, "even group size"),
    (lambda: longlora.packed_batches(None, [1], 0, 1, 1), ValueError, "seq_len must be a positive integer"),
    (lambda: rope_scaling.rope_angles(torch.arange(4), 8, 100.0, factor=0), ValueError, "positive number"),
    (lambda: rope_scaling.rope_angles([0, 1], 8, 100.0), TypeError, "1-D torch.Tensor"),
    (lambda: rope_scaling.rope_inverse_frequencies(7, 100.0), ValueError, "positive even integer"),
    (lambda: rope_scaling.interpolate_positions(nn.Linear(2, 2), 2.0), ValueError, "no rotary embedding"),
    (lambda: loftq.loftq_init(torch.randn(8), r=2), TypeError, "2-D floating-point weight"),
    (lambda: loftq.loftq_init(torch.randn(8, 64), r=9), ValueError, "1..8"),
    (lambda: loftq.loftq_init(torch.randn(8, 64), r=2, num_iter=0), ValueError, "num_iter"),
    (lambda: dora.DoRALinear(nn.Conv1d(2, 2, 1), r=1, alpha=1), TypeError, "wraps an nn.Linear"),
    (lambda: dora.DoRALinear(nn.Linear(8, 4), r=5, alpha=1), ValueError, "1..4"),
    (lambda: dora.DoRALinear(nn.Linear(8, 4), r=2, alpha=-1), ValueError, "alpha must be a positive"),
    (lambda: dora.dora_from_peft(nn.Linear(8, 4)), ValueError, "use_dora=True"),
]


@pytest.mark.parametrize(("call", "error", "words"), CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_bad_input_is_refused_with_a_clear_message(call, error, words):
    with pytest.raises(error) as info:
        call()
    assert words in str(info.value)
