"""Attention cost vs sequence length: full causal attention against LongLoRA's S2-Attn, on CPU.

    .venv/bin/python benchmarks/s2_attention_cost.py [--repeats 5] [--group-size 256] [--max-len 8192]

One attention call with SmolLM2's shape (9 heads of 64, batch 1), full causal
`scaled_dot_product_attention` versus `course.longlora.s2_attention` with a fixed G, both as
LongLoRA's reference code (the shifted heads' roll wraps around) and leak-free (the wrapped
pairs masked, our default), timed interleaved (benchmarks/timing.py), median per length. Full attention scores n^2 / 2
query-key pairs, S2-Attn n G / 2: the speed-up should grow about linearly with n / G.
Writes benchmarks/results/s2_attention_cost.json and .md.
"""

import argparse
import json
import platform
import statistics
from pathlib import Path

import torch
from timing import interleaved_times

from course.longlora import s2_attention

RESULTS = Path(__file__).resolve().parent / "results"
HEADS, HEAD_DIM = 9, 64  # SmolLM2-135M


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--group-size", type=int, default=256)
    parser.add_argument("--max-len", type=int, default=8192)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    rows = []
    n = 2 * args.group_size
    while n <= args.max_len:
        q, k, v = (torch.randn(1, HEADS, n, HEAD_DIM) for _ in range(3))  # (B, H, n, D)
        times = interleaved_times(
            {
                "full": lambda q=q, k=k, v=v: torch.nn.functional.scaled_dot_product_attention(
                    q, k, v, is_causal=True
                ),
                "s2": lambda q=q, k=k, v=v: s2_attention(q, k, v, args.group_size, mask_wrapped=False),
                "s2_masked": lambda q=q, k=k, v=v: s2_attention(q, k, v, args.group_size, mask_wrapped=True),
            },
            args.repeats,
        )
        full, s2 = statistics.median(times["full"]), statistics.median(times["s2"])
        masked = statistics.median(times["s2_masked"])
        rows.append(
            {
                "seq_len": n,
                "full_ms": round(full * 1e3, 2),
                "s2_ms": round(s2 * 1e3, 2),
                "speedup": round(full / s2, 2),
                "s2_masked_ms": round(masked * 1e3, 2),
                "speedup_masked": round(full / masked, 2),
            }
        )
        print(rows[-1], flush=True)
        n *= 2
    report = {
        "machine": f"{platform.machine()} CPU x{torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "group_size": args.group_size,
        "heads": HEADS,
        "head_dim": HEAD_DIM,
        "repeats": args.repeats,
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "s2_attention_cost.json").write_text(json.dumps(report, indent=1) + "\n")
    lines = [
        f"S2-Attn (G = {args.group_size}) vs full causal attention, {HEADS} heads x {HEAD_DIM}, batch 1, "
        f"{report['machine']}, median of {args.repeats}",
        "",
        "| sequence length | full causal (ms) | S2-Attn, rolled (ms) | speed-up | S2-Attn, wrap masked (ms) | speed-up |",
        "|---|---|---|---|---|---|",
    ] + [
        f"| {r['seq_len']} | {r['full_ms']} | {r['s2_ms']} | {r['speedup']}x | {r['s2_masked_ms']} | "
        f"{r['speedup_masked']}x |"
        for r in rows
    ]
    (RESULTS / "s2_attention_cost.md").write_text("\n".join(lines) + "\n")
    return report


if __name__ == "__main__":
    main()
