"""Our NF4 quantize + dequantize against bitsandbytes' on CPU, in one run.

    .venv/bin/python benchmarks/quant_speed.py [--repeats 15] [--size 4096]

Times the round trip (quantize, then dequantize) of a size x size fp32 tensor, NF4,
blocksize 64, for `course.quant` and `bitsandbytes.functional`, alternating the two so
that both see the same machine load, and reports the ratio of medians:
throughput_ratio = median(bitsandbytes) / median(ours) (1.0 = as fast, goal >= 0.5).
Writes benchmarks/results/quant_speed.json and quant_speed.md.
"""

import argparse
import json
import os
import platform
import statistics
from importlib import metadata
from pathlib import Path

import bitsandbytes.functional as bnbF
import torch
from timing import interleaved_times

from course import quant

RESULTS = Path(__file__).resolve().parent / "results"
GOAL = 0.5  # issue 4: ours at least half of bitsandbytes' throughput


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--size", type=int, default=4096)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    x = torch.randn(args.size, args.size) * 0.02  # (size, size) fp32, weight-like scale
    kwargs = {"blocksize": 64, "quant_type": "nf4"}
    steps = {
        "ours quantize": lambda: quant.quantize_4bit(x, **kwargs),
        "bnb quantize": lambda: bnbF.quantize_4bit(x, **kwargs),
    }
    q = steps["ours quantize"]()
    packed, state = steps["bnb quantize"]()
    assert torch.equal(q.packed, packed) and torch.equal(q.absmax, state.absmax), "not bit-exact"
    assert torch.equal(quant.dequantize_4bit(q), bnbF.dequantize_4bit(packed, state)), "not bit-exact"
    steps |= {
        "ours dequantize": lambda: quant.dequantize_4bit(q),
        "bnb dequantize": lambda: bnbF.dequantize_4bit(packed, state),
        "ours round trip": lambda: quant.dequantize_4bit(quant.quantize_4bit(x, **kwargs)),
        "bnb round trip": lambda: bnbF.dequantize_4bit(*bnbF.quantize_4bit(x, **kwargs)),
    }
    for fn in steps.values():  # warm-up: allocator, thread pools
        fn()
    times = interleaved_times(steps, args.repeats)
    medians = {name: statistics.median(t) for name, t in times.items()}
    ratio = medians["bnb round trip"] / medians["ours round trip"]
    report = {
        "what": f"NF4 quantize + dequantize of a {args.size}x{args.size} fp32 tensor, blocksize 64, CPU",
        "repeats": args.repeats,
        "median_seconds": {name: round(m, 4) for name, m in medians.items()},
        "throughput_ratio_ours_vs_bnb": round(ratio, 3),
        "goal": GOAL,
        "meets_goal": ratio >= GOAL,
        "bit_exact": True,
        "versions": {p: metadata.version(p) for p in ("torch", "bitsandbytes")},
        "torch_threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "load_average_1min_after": round(os.getloadavg()[0], 2),  # other jobs share the CPU: both sides alike
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "quant_speed.json").write_text(json.dumps(report, indent=2) + "\n")
    rows = "\n".join(f"| {name} | {m * 1000:.0f} |" for name, m in medians.items())
    (RESULTS / "quant_speed.md").write_text(
        f"# NF4 quantize + dequantize: course.quant vs bitsandbytes\n\n{report['what']}; "
        f"median of {args.repeats} interleaved runs; torch {report['versions']['torch']}, "
        f"bitsandbytes {report['versions']['bitsandbytes']}, {report['torch_threads']} threads, "
        f"{report['machine']} ({report['cpu_capability']}), load average {report['load_average_1min_after']} "
        "(the machine was shared; the runs alternate, so both sides see the same load).\n\n"
        f"| step | median ms |\n|---|---|\n{rows}\n\n"
        f"**Throughput ratio (ours / bitsandbytes) = {ratio:.2f}** (goal >= {GOAL}; "
        f"{'met' if ratio >= GOAL else 'NOT met'}). Outputs are bit-exact (asserted before timing).\n\n"
        "bitsandbytes quantizes on CPU with a PyTorch kernel (as we do) and dequantizes with a C kernel; "
        "ours dequantizes with one 256-entry table lookup per byte and an in-place multiply.\n"
    )
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
