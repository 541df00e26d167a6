"""A data-parallel training worker: `torchrun --nproc_per_node 2 -m course.workers.train --out DIR ...`.

For each mode in --modes it builds the model afresh (same seed on every rank), trains
--steps steps on the same global batches, each rank on its shard, and writes what it saw
to DIR/<mode>.json (rank 0; losses, timings, bytes, whether the replicas stayed equal)
and DIR/<mode>.pt (the trained parameters, flat). Modes:

- by_hand: gradients averaged with our all_reduce (course.data_parallel)
- ddp:     torch's DistributedDataParallel
- fsdp:    FSDP2 (`fully_shard` on each decoder layer, then on the model)
- zero1, zero2, zero3: our ZeRO stages (course.zero)

--fail-rank R kills rank R (SIGKILL) at its first step: the launcher must report it.
"""

import argparse
import json
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

from course.data import collate
from course.data_parallel import (
    all_reduce_gradients,
    broadcast_parameters,
    global_count,
    setup,
    shard,
    summed_answer_loss,
    teardown,
)
from course.memory import storage_bytes
from course.workers.common import build_model, flat_trainable, global_batches

MODES = ("by_hand", "ddp", "fsdp", "zero1", "zero2", "zero3")


def _decoder_layers(model):
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.model.layers


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def run_mode(mode: str, args, rank: int, world_size: int, device) -> dict:
    model, tokenizer = build_model(args.model, method=args.method, r=args.r, seed=args.seed)
    model.to(device)
    batches = global_batches(
        tokenizer, steps=args.steps, batch_size=args.batch_size, seed=args.seed, max_len=args.max_len
    )
    pad_id = tokenizer.pad_token_id if tokenizer is not None else 2
    zero = None
    if mode == "by_hand":
        broadcast_parameters(model)
        trained = model
    elif mode == "ddp":
        trained = torch.nn.parallel.DistributedDataParallel(model)
    elif mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in _decoder_layers(model):
            fully_shard(layer)
        fully_shard(model)
        trained = model
    else:
        from course.zero import ZeroAdamW

        trained = model
        zero = ZeroAdamW(model.parameters(), stage=int(mode[-1]), lr=args.lr)
    params = [p for p in trained.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr) if zero is None else None
    record = {
        "mode": mode,
        "world_size": world_size,
        "losses": [],
        "compute_s": [],
        "comm_s": [],
        "step_s": [],
    }
    for step, batch in enumerate(batches):
        if rank == args.fail_rank:
            print(f"rank {rank}: killing myself at step {step} (--fail-rank)", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        inputs = {k: v.to(device) for k, v in collate(shard(batch, rank, world_size), pad_id).items()}
        start = time.perf_counter()
        if zero is not None:
            zero.gather_parameters()
        loss_sum, count = summed_answer_loss(trained, inputs)
        total = global_count(count, device)
        (world_size * loss_sum / total).backward()  # averaged over ranks: the full batch's gradient
        computed = time.perf_counter()
        comm = 0.0
        if mode == "by_hand":
            comm = all_reduce_gradients(model)["seconds"]
        last = step == len(batches) - 1  # keep the last step's gradients, to measure what a rank holds
        if zero is not None:
            zero.step()
            if not last:
                zero.zero_grad()
        else:
            opt.step()
            if not last:
                opt.zero_grad(set_to_none=True)
        record["step_s"].append(time.perf_counter() - start)
        record["compute_s"].append(computed - start)
        record["comm_s"].append(comm)
        mean = loss_sum.detach().clone()
        dist.all_reduce(mean)
        record["losses"].append(mean.item() / total)
    # what this rank holds at the end of the last step
    if zero is not None:
        record["held_bytes"] = zero.held_bytes()
        record["trainable_numel"] = zero.numel
        zero.gather_parameters()  # stage 3: put the full parameters back into the model to read them
    else:
        record["held_bytes"] = {
            "parameters": storage_bytes([_local(p) for p in trained.parameters()]),
            "trainable_parameters": storage_bytes([_local(p) for p in params]),
            "gradients": storage_bytes([_local(p.grad) for p in params if p.grad is not None]),
            "optimizer": storage_bytes(
                [_local(t) for s in opt.state.values() for t in s.values() if t.dim() > 0]
            ),
        }
        record["trainable_numel"] = sum(_local(p).numel() for p in params) * (
            world_size if mode == "fsdp" else 1
        )
    flat = flat_trainable(trained)
    # replicas: every rank's copy of the trained parameters, compared on rank 0
    copies = [torch.empty_like(flat) for _ in range(world_size)]
    dist.all_gather(copies, flat)
    record["replicas_identical"] = all(torch.equal(copies[0], c) for c in copies)
    record["replica_max_diff"] = max(float((copies[0] - c).abs().max()) for c in copies)
    if rank == 0:
        out = Path(args.out)
        torch.save(flat, out / f"{mode}.pt")
        (out / f"{mode}.json").write_text(json.dumps(record, indent=1))
        print(
            f"{mode:8s} {world_size} ranks: losses {', '.join(f'{x:.4f}' for x in record['losses'])}; "
            f"replicas identical: {record['replicas_identical']}",
            flush=True,
        )
    return record


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for <mode>.json and <mode>.pt")
    parser.add_argument("--modes", default="by_hand,ddp", help=f"comma-separated, from {MODES}")
    parser.add_argument("--model", default="tiny", choices=["tiny", "embedded"])
    parser.add_argument("--method", default="lora", choices=["lora", "full"])
    parser.add_argument(
        "--lora-r", dest="r", type=int, default=8, help="LoRA rank (not --r: torchrun would take it)"
    )
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4, help="the global batch: split over the ranks")
    parser.add_argument("--max-len", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fail-rank", type=int, default=-1)
    args = parser.parse_args(argv)
    modes = args.modes.split(",")
    if unknown := set(modes) - set(MODES):
        parser.error(f"unknown modes {sorted(unknown)}; choose from {MODES}")
    rank, world_size, device = setup()
    finished = False
    try:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        for mode in modes:
            run_mode(mode, args, rank, world_size, device)
        finished = True
    finally:
        teardown(finished=finished)


if __name__ == "__main__":
    main()
