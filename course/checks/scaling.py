"""Graders for notebook 12 (scaling out: data parallelism, ZeRO, FSDP)."""

import random
from collections.abc import Callable

from course.checks._grader import _Grader, _run


def _sampler_indices(dataset_len: int, rank: int, world_size: int) -> list[int]:
    """torch's DistributedSampler(shuffle=False, drop_last=False): pad by wrapping, then deal."""
    from torch.utils.data import DistributedSampler

    return list(DistributedSampler(range(dataset_len), num_replicas=world_size, rank=rank, shuffle=False))


def check_rank_indices(fn: Callable) -> None:
    """fn(dataset_len, rank, world_size) -> the dataset indices DistributedSampler(shuffle=False) gives rank."""
    grader = _Grader("rank_indices")
    rng = random.Random(12)
    cases = [(8, 0, 2), (8, 1, 2), (10, 2, 4), (10, 3, 4), (5, 2, 3), (3, 3, 4), (1, 1, 2)]
    cases += [(rng.randint(1, 40), 0, 0) for _ in range(10)]
    cases = [(n, r, w) if w else (n, rng.randrange(ws := rng.randint(1, 6)), ws) for n, r, w in cases]
    for n, rank, world_size in cases:
        call = f"fn(dataset_len={n}, rank={rank}, world_size={world_size})"
        got = _run(grader, fn, (n, rank, world_size), call)
        want = _sampler_indices(n, rank, world_size)
        grader.expect(
            isinstance(got, list | tuple) and all(isinstance(i, int) for i in got),
            f"{call}: expected a list of integer indices, got {got!r}.",
        )
        got = list(got)
        grader.expect(
            len(got) == len(want),
            f"{call}: expected {len(want)} indices, got {len(got)}. Hint: every rank must take the same "
            "number of examples per epoch (or the collectives wait forever), so the sampler pads the "
            "dataset to a multiple of world_size by repeating its first examples; it drops nothing.",
        )
        grader.expect(
            got == want,
            f"{call}: expected {want}, got {got}. Hint: the examples are dealt like cards, every "
            "world_size-th one starting at position rank, not cut into contiguous blocks.",
        )
    grader.passed(len(cases))


def check_zero_bytes(fn: Callable) -> None:
    """fn(num_params, world_size, stage) -> model-state bytes per rank, mixed-precision Adam (2 + 2 + 12 bytes)."""
    from course.zero import model_state_bytes

    grader = _Grader("zero_bytes")
    rng = random.Random(3)
    cases = [(7.5e9, 64, s) for s in range(4)] + [(1e6, 1, 3), (1e9, 2, 2), (1e9, 8, 1)]
    cases += [(rng.randint(1, 10**10), rng.choice([2, 4, 8, 16, 256]), rng.randint(0, 3)) for _ in range(12)]
    for num_params, world_size, stage in cases:
        call = f"fn(num_params={num_params:.4g}, world_size={world_size}, stage={stage})"
        got = _run(grader, fn, (num_params, world_size, stage), call)
        want = sum(model_state_bytes(num_params, world_size, stage).values())
        grader.expect(isinstance(got, int | float), f"{call}: expected a number of bytes, got {got!r}.")
        grader.expect(
            abs(got - want) <= 1e-6 * want + 1,
            f"{call}: expected {want / 1e9:.4f} GB, got {got / 1e9:.4f} GB. Hint: stage 1 shards only the "
            "12 bytes of optimizer state, stage 2 adds the 2 bytes of gradient, stage 3 the 2 bytes of "
            "weight; stage 0 (plain data parallelism) shards nothing. The paper's Fig. 1 example is "
            "7.5e9 parameters on 64 ranks.",
        )
    grader.passed(len(cases))
