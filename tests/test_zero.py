"""ZeRO by hand: the paper's per-rank bytes, shards of 1/N measured, results equal to plain AdamW; FSDP2 too."""

import json

import pytest
import torch

from course.data import collate
from course.data_parallel import summed_answer_loss
from course.launch import launch
from course.memory import LLAMA_2_70B, estimate_per_rank_memory, estimate_training_memory
from course.workers.common import build_model, flat_trainable, global_batches, reference_run
from course.zero import ZeroAdamW, model_state_bytes

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
PAD = 2


def test_paper_figure_1():
    """Rajbhandari et al. 2020, Fig. 1: 7.5B parameters, 64 ranks, K = 12: 120, 31.4, 16.6, 1.9 GB."""
    per_rank = [sum(model_state_bytes(7.5e9, 64, stage).values()) / 1e9 for stage in range(4)]
    assert [round(x, 1) for x in per_rank] == [120.0, 31.4, 16.6, 1.9]
    with pytest.raises(ValueError, match="stage"):
        model_state_bytes(1, 2, 4)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_one_rank_equals_adamw(stage):
    """Without a process group (world size 1) each stage is AdamW on a flat copy: the same numbers."""
    batches = global_batches(None, steps=2, batch_size=2)
    reference, _ = reference_run(build_model("tiny", r=4)[0], batches, pad_id=PAD)
    model, _ = build_model("tiny", r=4)
    zero = ZeroAdamW(model.parameters(), stage=stage, lr=1e-3)

    for batch in batches:
        zero.gather_parameters()
        loss_sum, count = summed_answer_loss(model, collate(batch, PAD))
        (loss_sum / count).backward()
        zero.step()
        zero.zero_grad()
    zero.gather_parameters()
    assert float((flat_trainable(model) - reference).abs().max()) < 1e-6
    with pytest.raises(ValueError, match="stage"):
        ZeroAdamW(model.parameters(), stage=0)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    out = tmp_path_factory.mktemp("zero")
    modes = "zero1,zero2,zero3,fsdp"
    launch("course.workers.train", ["--out", out, "--modes", modes, "--steps", "2"], timeout=240, echo=False)
    reference, losses = reference_run(
        build_model("tiny", r=8)[0], global_batches(None, steps=2, batch_size=4), pad_id=PAD
    )
    return out, reference, losses


@pytest.mark.parametrize("mode", ["zero1", "zero2", "zero3", "fsdp"])
def test_sharded_runs_match_one_process(sharded, mode):
    out, reference, losses = sharded
    record = json.loads((out / f"{mode}.json").read_text())
    assert record["replicas_identical"]
    assert float((torch.load(out / f"{mode}.pt") - reference).abs().max()) < 1e-5
    assert record["losses"] == pytest.approx(losses, rel=1e-5)


def test_each_stage_holds_one_half_of_what_it_shards(sharded):
    out, _, _ = sharded
    held = {m: json.loads((out / f"zero{m}.json").read_text())["held_bytes"] for m in (1, 2, 3)}
    numel = json.loads((out / "zero1.json").read_text())["trainable_numel"]
    full = numel * 4  # fp32; the flat buffer pads to a multiple of 2 ranks (numel is even here)
    assert numel % 2 == 0
    assert held[1] == {"parameters": full, "gradients": full, "optimizer": 2 * full / 2}
    assert held[2] == {"parameters": full, "gradients": full / 2, "optimizer": full}
    assert held[3] == {"parameters": full / 2, "gradients": full / 2, "optimizer": full}
    fsdp = json.loads((out / "fsdp.json").read_text())["held_bytes"]
    by_hand = json.loads((out / "zero1.json").read_text())["held_bytes"]
    assert fsdp["trainable_parameters"] == by_hand["parameters"] / 2  # FSDP2 shards every parameter


def test_per_rank_estimates_divide_what_is_sharded():
    kw = dict(r=16, batch_size=1, seq_len=512, gradient_checkpointing=True)
    one = estimate_training_memory(LLAMA_2_70B, "qlora", **kw)
    ddp = estimate_per_rank_memory(LLAMA_2_70B, "qlora", "ddp", 2, **kw)
    fsdp = estimate_per_rank_memory(LLAMA_2_70B, "qlora", "fsdp", 2, **kw)
    zero1 = estimate_per_rank_memory(LLAMA_2_70B, "qlora", "zero1", 2, **kw)
    assert ddp == one
    assert zero1["optimizer"] == round(one["optimizer"] / 2) and zero1["weights"] == one["weights"]
    assert fsdp["weights"] == round(one["weights"] / 2) and fsdp["activations"] == one["activations"]
    # the published anchor: Llama-2-70B QLoRA trains on two 24 GB GPUs with FSDP, not with DDP
    assert sum(fsdp.values()) < 24e9 < sum(ddp.values())
    with pytest.raises(ValueError, match="strategy"):
        estimate_per_rank_memory(LLAMA_2_70B, "qlora", "zero4", 2)
    with pytest.raises(ValueError, match="world_size"):
        estimate_per_rank_memory(LLAMA_2_70B, "qlora", "fsdp", 0)


@pytest.mark.gpu
@pytest.mark.embedded
def test_fsdp_qlora_with_bf16_storage_on_gpus(tmp_path):
    """The GPU half of the recipe: NF4 weights stored as bf16, sharded by FSDP2 over NCCL, one step."""
    ranks = min(2, torch.cuda.device_count())
    out = tmp_path / "fsdp_qlora.json"
    launch(
        "course.workers.fsdp_qlora", ["--storage", "bfloat16", "--out", out], nproc_per_node=ranks, echo=False
    )
    report = json.loads(out.read_text())
    assert report["ok"], report
    assert report["stages"][-1] == "optimizer step"
    assert report["four_bit_bytes_after"] == pytest.approx(report["four_bit_bytes_before"] / ranks, rel=0.01)
