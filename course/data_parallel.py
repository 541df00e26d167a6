"""Data parallelism by hand: every rank a shard of the batch, gradients averaged with all_reduce.

N processes hold the same model. Each computes the gradient of its shard of the global
batch; `all_reduce` sums the N gradients on every rank, and dividing by N gives each rank
the same averaged gradient, so the same optimizer step keeps the replicas identical. That
is all PyTorch's DistributedDataParallel does (Li et al. 2020, "PyTorch Distributed"),
plus buckets that overlap the reduction with the backward pass.

The average equals the gradient of the whole batch only if each rank's loss is scaled
right. With a loss that is a mean over answer tokens, shards with different token counts
would weigh tokens unequally; so each rank sums its token losses and divides by the
global token count (itself an all_reduce), times N to undo the averaging:

    grad_full = d/dθ (Σ_all tokens ℓ) / T  =  (1/N) Σ_r d/dθ [N (Σ_tokens of r ℓ) / T]

The same functions run with one process (world size 1, no process group), which is how a
notebook shows the equality without starting any.
"""

import os
import time

import torch
import torch.distributed as dist

from course.data import IGNORE_INDEX


def backend_for(device: torch.device) -> str:
    """gloo on CPU, NCCL on CUDA: the same code runs on both."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def setup() -> tuple[int, int, torch.device]:
    """Join the process group torchrun describes in the environment; returns (rank, world_size, device)."""
    if "RANK" not in os.environ:
        raise RuntimeError(
            "setup() expects the environment torchrun sets (RANK, WORLD_SIZE, MASTER_ADDR, ...)"
        )
    local_rank = int(os.environ["LOCAL_RANK"])
    device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend_for(device), device_id=device if device.type == "cuda" else None)
    return dist.get_rank(), dist.get_world_size(), device


def teardown(*, finished: bool = False) -> None:
    """Leave the process group; `finished`: first wait until every rank is done.

    A rank that closes its gloo connections while a peer still reads from them can abort that
    peer ("Connection closed by peer", SIGABRT). After a failure there is no barrier: the peers
    may be inside another collective, and torchrun ends them anyway.
    """
    if dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def world() -> tuple[int, int]:
    """(rank, world_size); (0, 1) without a process group."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def shard(items: list, rank: int, world_size: int) -> list:
    """Rank `rank`'s share of a global batch: every world_size-th item, as DistributedSampler deals them.

    [a, b, c, d, e, f] over 2 ranks -> rank 0 [a, c, e], rank 1 [b, d, f].
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
    if len(items) % world_size:
        raise ValueError(
            f"a global batch of {len(items)} does not split evenly over {world_size} ranks: "
            "use a multiple of the world size"
        )
    return items[rank::world_size]


def summed_answer_loss(model, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(sum of the answer tokens' cross-entropies, how many there are) for one batch.

    Position t predicts token t+1; logits are computed only where a label is set
    (transformers' `logits_to_keep` mask), as in `course.train.answer_loss`.
    """
    targets = inputs["labels"][:, 1:]  # (B, T-1)
    scored = targets != IGNORE_INDEX
    keep = torch.nn.functional.pad(scored, (0, 1))  # (B, T): the last position predicts nothing
    logits = model(
        input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], logits_to_keep=keep
    ).logits  # (answer tokens, V)
    loss = torch.nn.functional.cross_entropy(logits.float(), targets[scored], reduction="sum")
    return loss, int(scored.sum())


def global_count(count: int, device: torch.device | str = "cpu") -> int:
    """The sum of `count` over all ranks (an all_reduce of one number)."""
    total = torch.tensor([count], dtype=torch.long, device=device)
    if dist.is_initialized():
        dist.all_reduce(total)
    return int(total.item())


def trainable_gradients(model) -> list[torch.Tensor]:
    return [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]


def all_reduce_gradients(model) -> dict[str, float]:
    """Average the trainable gradients over all ranks, in place, as one flat bucket.

    Flattening first sends one message instead of one per tensor (DDP does the same
    with 25 MB buckets). Returns {"bytes": bytes reduced, "seconds": time in the collective}.
    """
    grads = trainable_gradients(model)
    if not grads:
        raise ValueError("no gradients to reduce: call backward() first, and train some parameters")
    flat = torch.cat([g.reshape(-1) for g in grads])  # (numel,)
    _, world_size = world()
    start = time.perf_counter()
    if world_size > 1:
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    seconds = time.perf_counter() - start
    flat /= world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
    return {"bytes": flat.numel() * flat.element_size(), "seconds": seconds}


def broadcast_parameters(model, src: int = 0) -> None:
    """Copy rank src's trainable parameters to every rank (replicas must start equal)."""
    if dist.is_initialized():
        for p in model.parameters():
            if p.requires_grad:
                dist.broadcast(p.data, src=src)


def ring_all_reduce_bytes(n_bytes: int, world_size: int) -> float:
    """Bytes each rank sends in a ring all-reduce of n_bytes: 2 (N-1)/N x n_bytes.

    A reduce-scatter ((N-1)/N of the data) followed by an all-gather (the same again); the
    lower bound for any all-reduce, independent of N for large N (Patarasuk & Yuan 2009).
    """
    if world_size < 1 or n_bytes < 0:
        raise ValueError(f"need world_size >= 1 and n_bytes >= 0, got {world_size}, {n_bytes}")
    return 2 * (world_size - 1) / world_size * n_bytes


def effective_batch_size(per_rank: int, world_size: int, accumulation: int = 1) -> int:
    """Examples behind one optimizer step: per-rank batch x processes x accumulation steps."""
    if min(per_rank, world_size, accumulation) < 1:
        raise ValueError(f"all three must be >= 1, got {per_rank}, {world_size}, {accumulation}")
    return per_rank * world_size * accumulation


def simulated_gradient(model, batches: list[dict], total_tokens: int) -> list[torch.Tensor]:
    """What N ranks compute, one after another in this process: the averaged, scaled shard gradients.

    batches: the N ranks' collated shards. Returns the trainable parameters' gradients
    (zeroed first), equal to the full batch's within float rounding.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    n = len(batches)
    summed = [torch.zeros_like(p) for p in params]
    for batch in batches:
        model.zero_grad(set_to_none=True)
        loss_sum, _ = summed_answer_loss(model, batch)
        (n * loss_sum / total_tokens).backward()  # this rank's scaled loss
        for s, p in zip(summed, params, strict=True):
            s += p.grad  # what all_reduce(SUM) adds up
    model.zero_grad(set_to_none=True)
    return [s / n for s in summed]  # the average every rank ends with
