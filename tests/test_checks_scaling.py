"""The notebook 12 graders pass a correct answer and reject plausible wrong ones."""

import math

import pytest

from course import checks
from course.zero import model_state_bytes


def _rank_indices(dataset_len, rank, world_size):
    total = math.ceil(dataset_len / world_size) * world_size
    indices = list(range(dataset_len))
    while len(indices) < total:
        indices += indices[: total - len(indices)]
    return indices[rank:total:world_size]


def _contiguous(dataset_len, rank, world_size):  # blocks instead of dealing
    per = math.ceil(dataset_len / world_size)
    padded = (list(range(dataset_len)) * world_size)[: per * world_size]
    return padded[rank * per : (rank + 1) * per]


def _no_padding(dataset_len, rank, world_size):  # ranks get unequal counts
    return list(range(dataset_len))[rank::world_size]


def _drop_last(dataset_len, rank, world_size):
    total = dataset_len // world_size * world_size
    return list(range(total))[rank:total:world_size]


def _stub(*args):
    raise NotImplementedError


def _zero_bytes(num_params, world_size, stage):
    return sum(model_state_bytes(num_params, world_size, stage).values())


def _off_by_one_stage(num_params, world_size, stage):  # stage 1 already shards gradients
    return _zero_bytes(num_params, world_size, min(stage + 1, 3))


def _shards_everything(num_params, world_size, stage):
    return 16 * num_params / (world_size if stage else 1)


def _fp32_everything(num_params, world_size, stage):  # 4 + 4 + 8: our CPU runs, not the paper's
    parts = model_state_bytes(num_params, world_size, stage, weight_bytes=4, grad_bytes=4, optimizer_bytes=8)
    return sum(parts.values())


def test_references_pass(capsys):
    checks.check_rank_indices(_rank_indices)
    checks.check_zero_bytes(_zero_bytes)
    assert capsys.readouterr().out.count("correct") == 2


@pytest.mark.parametrize(
    ("wrong", "hint"),
    [
        (_stub, "not implemented"),
        (_contiguous, "dealt like cards"),
        (_no_padding, "pads"),
        (_drop_last, "pads"),
    ],
)
def test_rank_indices_rejects(wrong, hint):
    with pytest.raises(AssertionError, match=hint):
        checks.check_rank_indices(wrong)


@pytest.mark.parametrize(
    "wrong", [_stub, _off_by_one_stage, _shards_everything, _fp32_everything, lambda n, w, s: "16 GB"]
)
def test_zero_bytes_rejects(wrong):
    with pytest.raises(AssertionError, match="zero_bytes"):
        checks.check_zero_bytes(wrong)
