"""All-reduce cost: `torchrun --nproc_per_node 2 -m course.workers.comm --numels 4884480,134515008 --out F`.

For each size (fp32 values, as many as a gradient of that many parameters) it times
`all_reduce` (median of --repeats, after one warm-up) and counts the bytes that crossed the
loopback interface during the timed calls (Linux /proc/net/dev: every byte sent between
processes on 127.0.0.1, so also any other traffic on this machine at the time: a few KB).
Rank 0 writes the results as JSON.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

from course.data_parallel import ring_all_reduce_bytes, setup, teardown


def loopback_bytes() -> int | None:
    """Bytes received on the loopback interface so far (None where /proc/net/dev is missing)."""
    try:
        for line in Path("/proc/net/dev").read_text().splitlines():
            name, _, fields = line.partition(":")
            if name.strip() == "lo":
                return int(fields.split()[0])
    except OSError:
        pass
    return None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numels", required=True, help="comma-separated gradient sizes (values)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    rank, world_size, device = setup()
    finished = False
    results = []
    try:
        for numel in map(int, args.numels.split(",")):
            grad = torch.ones(numel, device=device)  # (numel,) fp32, as a flattened gradient bucket
            dist.all_reduce(grad)  # warm-up: connections and buffers
            seconds = []
            dist.barrier()
            before = loopback_bytes()
            for _ in range(args.repeats):
                dist.barrier()
                start = time.perf_counter()
                dist.all_reduce(grad)
                seconds.append(time.perf_counter() - start)
            dist.barrier()
            after = loopback_bytes()
            n_bytes = numel * grad.element_size()
            results.append(
                {
                    "numel": numel,
                    "bytes": n_bytes,
                    "seconds": statistics.median(seconds),
                    "loopback_bytes_per_call": None if before is None else (after - before) / args.repeats,
                    "ring_bytes_all_ranks": ring_all_reduce_bytes(n_bytes, world_size) * world_size,
                }
            )
            del grad
        if rank == 0:
            Path(args.out).write_text(json.dumps({"world_size": world_size, "results": results}, indent=1))
            for row in results:
                print(
                    f"all_reduce of {row['numel']:>11,} fp32 values ({row['bytes'] / 2**20:7.1f} MiB): "
                    f"{row['seconds'] * 1000:7.1f} ms",
                    flush=True,
                )
        finished = True
    finally:
        teardown(finished=finished)


if __name__ == "__main__":
    main()
