"""Can FSDP shard bitsandbytes' 4-bit weights on CPU processes? `torchrun ... -m course.workers.fsdp_qlora --out F`.

The FSDP + QLoRA recipe (Answer.AI 2024; bitsandbytes' FSDP-QLoRA guide) stores the packed
4-bit weights in a float dtype (`bnb_4bit_quant_storage` = the compute dtype) so that FSDP,
which flattens and shards float tensors, can shard them like any other parameter. This
worker loads the embedded model that way on CPU, adds LoRA, applies FSDP2 (`fully_shard`
on each decoder layer, then the model) and tries one training step. It reports each stage
it reached and, where one fails, the error: the finding, whichever way it goes.
"""

import argparse
import json
import traceback
from pathlib import Path

import torch

from course.data import collate
from course.data_parallel import global_count, setup, shard, summed_answer_loss, teardown
from course.memory import storage_bytes
from course.workers.common import global_batches


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def probe(rank: int, world_size: int, device, storage: torch.dtype, report: dict) -> None:
    """Fill `report` stage by stage, so that a failure still says how far it got."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from transformers.utils import logging as hf_logging

    import course

    compute = course.env.compute_dtype(device)  # fp32 on CPU, bf16 on a recent GPU
    report.update(stages=[], quant_storage=str(storage).removeprefix("torch."), compute_dtype=str(compute))
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_quant_storage=storage,
    )
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # no weight-loading bars in the notebook's output
    model = AutoModelForCausalLM.from_pretrained(
        course.models.model_path(), quantization_config=config, dtype=compute, device_map={"": device}
    )
    q_weight = model.model.layers[0].self_attn.q_proj.weight
    report["stages"].append("loaded in 4-bit")
    report["packed_weight"] = {"dtype": str(q_weight.dtype), "shape": list(q_weight.shape)}
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    four_bit = [m.weight for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    report["four_bit_bytes_before"] = storage_bytes(four_bit)
    tokenizer = course.models.load_tokenizer()
    batch = global_batches(tokenizer, steps=1, batch_size=2 * world_size, max_len=48)[0]
    inputs = {
        k: v.to(device) for k, v in collate(shard(batch, rank, world_size), tokenizer.pad_token_id).items()
    }
    # Train mode (LoRA dropout is 0): in eval mode without grad, bitsandbytes 0.50 on a CPU with AVX512-BF16
    # repacks each 4-bit weight in place for its bf16 kernel, and FSDP would then shard the repacked layout,
    # which bitsandbytes cannot rebuild its quantization state from (`assert module.weight.shape[1] == 1`).
    model.train()
    with torch.no_grad():  # the same batch before sharding: FSDP must not change the function
        loss_sum, count = summed_answer_loss(model, inputs)
    report["loss_unsharded"] = loss_sum.item() / count
    for layer in model.get_base_model().model.layers:
        fully_shard(layer)
    fully_shard(model)
    report["stages"].append("fully_shard applied")
    report["four_bit_bytes_after"] = storage_bytes(
        [_local(m.weight) for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    )
    report["four_bit_weight_type"] = type(four_bit[0]).__name__
    tokenizer = course.models.load_tokenizer()
    batch = global_batches(tokenizer, steps=1, batch_size=2 * world_size, max_len=48)[0]
    inputs = {
        k: v.to(device) for k, v in collate(shard(batch, rank, world_size), tokenizer.pad_token_id).items()
    }
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    loss_sum, count = summed_answer_loss(model, inputs)
    report["stages"].append("forward")
    (world_size * loss_sum / global_count(count, device)).backward()
    report["stages"].append("backward")
    opt.step()
    report["stages"].append("optimizer step")
    report["loss"] = loss_sum.item() / count


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--storage", default="float32", choices=["float32", "bfloat16", "uint8"])
    args = parser.parse_args(argv)
    rank, world_size, device = setup()
    finished = False
    try:
        report = {}
        try:
            probe(rank, world_size, device, getattr(torch, args.storage), report)
            report["ok"] = True
        except (
            Exception
        ) as err:  # the finding is the error: report it (and the stages reached), do not hide it
            where = traceback.format_exc()
            report.update(ok=False, error=f"{type(err).__name__}: {err}"[:300], where=where[-1500:])
            report["failed_in"] = where.strip().splitlines()[-3].strip()[:200]  # the library line that raised
        if rank == 0:
            Path(args.out).write_text(json.dumps(report, indent=1))
            print(json.dumps({k: v for k, v in report.items() if k != "where"}), flush=True)
        finished = report["ok"]  # after a failed probe a peer may be inside a collective
    finally:
        teardown(finished=finished)


if __name__ == "__main__":
    main()
