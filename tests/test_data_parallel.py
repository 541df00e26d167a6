"""Data parallelism: by hand (one process and two) and DDP equal one process on the whole batch."""

import json

import pytest
import torch

from course.data import collate
from course.data_parallel import (
    effective_batch_size,
    ring_all_reduce_bytes,
    shard,
    simulated_gradient,
    summed_answer_loss,
)
from course.launch import launch
from course.workers.common import build_model, flat_trainable, global_batches, reference_run

PAD = 2  # tiny_model's pad id
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


def test_shard_deals_like_distributed_sampler():
    assert shard(list("abcdef"), 0, 2) == list("ace") and shard(list("abcdef"), 1, 2) == list("bdf")
    with pytest.raises(ValueError, match="multiple of the world size"):
        shard([1, 2, 3], 0, 2)
    with pytest.raises(ValueError, match="rank"):
        shard([1, 2], 2, 2)


def test_batch_and_bytes_formulas():
    assert effective_batch_size(4, 2, 8) == 64
    assert ring_all_reduce_bytes(100, 1) == 0 and ring_all_reduce_bytes(100, 2) == 100
    assert ring_all_reduce_bytes(100, 4) == 150
    with pytest.raises(ValueError):
        effective_batch_size(0, 2)


def _full_gradient(model, batch):
    model.zero_grad(set_to_none=True)
    loss_sum, count = summed_answer_loss(model, collate(batch, PAD))
    (loss_sum / count).backward()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    return grads


def test_averaged_shard_gradients_equal_the_full_batch():
    model, _ = build_model("tiny", r=8)
    model.get_base_model().model.layers[0].self_attn.q_proj.lora_B.default.weight.data.normal_()  # non-zero B
    batch = global_batches(None, steps=1, batch_size=4, seed=1)[0]
    full = _full_gradient(model, batch)
    shards = [collate(shard(batch, r, 2), PAD) for r in range(2)]
    total = sum(int((b["labels"][:, 1:] != -100).sum()) for b in shards)
    averaged = simulated_gradient(model, shards, total)
    worst = max(float((a - f).abs().max()) for a, f in zip(averaged, full, strict=True))
    assert worst < 1e-6  # float rounding only (sums in another order)

    # counter-example: each shard's *mean* loss, averaged, weighs the tokens of the shorter shard more
    counts = [int((b["labels"][:, 1:] != -100).sum()) for b in shards]
    assert counts[0] != counts[1]
    model.zero_grad(set_to_none=True)
    for b, n in zip(shards, counts, strict=True):
        loss_sum, _ = summed_answer_loss(model, b)
        (loss_sum / n / 2).backward()
    naive = [p.grad for p in model.parameters() if p.requires_grad]
    assert max(float((a - f).abs().max()) for a, f in zip(naive, full, strict=True)) > 100 * worst


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("dp")
    launch(
        "course.workers.train",
        ["--out", out, "--modes", "by_hand,ddp", "--steps", "3"],
        timeout=180,
        echo=False,
    )
    model, _ = build_model("tiny", r=8)
    reference, losses = reference_run(model, global_batches(None, steps=3, batch_size=4), pad_id=PAD)
    return out, reference, losses


@pytest.mark.parametrize("mode", ["by_hand", "ddp"])
def test_two_processes_match_one(two_ranks, mode):
    out, reference, losses = two_ranks
    record = json.loads((out / f"{mode}.json").read_text())
    trained = torch.load(out / f"{mode}.pt")
    assert record["world_size"] == 2 and record["replicas_identical"]
    # 3 AdamW steps at lr 1e-3 move parameters by ~3e-3; summation order changes them by < 1e-5
    assert float((trained - reference).abs().max()) < 1e-5
    assert record["losses"] == pytest.approx(losses, rel=1e-5)
    initial = flat_trainable(build_model("tiny", r=8)[0])
    assert float((reference - initial).abs().max()) > 100 * 1e-5  # the tolerance is small against the steps


def test_by_hand_equals_ddp(two_ranks):
    out, _, _ = two_ranks
    assert float((torch.load(out / "by_hand.pt") - torch.load(out / "ddp.pt")).abs().max()) < 1e-6
