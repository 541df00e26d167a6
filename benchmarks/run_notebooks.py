"""Execute each notebook and record its wall time and peak memory.

    python benchmarks/run_notebooks.py [--store] [--report NAME] [notebooks/03_*.ipynb ...]

Each notebook runs in a fresh child process (with its own Jupyter kernel). The stored
outputs are untouched unless `--store` is given: then the executed notebook is written
back, so one run both times a notebook and stores the outputs its current code prints. Peak memory is the largest resident set of the
kernel process (RUSAGE_CHILDREN of the child, which waits for its kernel). Results go
to benchmarks/results/notebooks.json (merged with earlier runs of other notebooks) and
a markdown table beside it, for the instructor section of notebooks/README.md.
A notebook that uses bitsandbytes runs as on a CPU without AVX512-BF16 (most learners' laptops):
bitsandbytes' native probe answers False (tests/cpu_without_bf16) and torch's kernels run at AVX2,
so what it stores does not rest on a kernel path few learners have (course.kernel_path).
`--report gpu_notebooks` writes another table instead (benchmarks/gpu_check.sh times
the notebooks on a GPU without touching the CPU table the headers quote).
"""

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
KERNEL = "peft-workbook"

_CHILD = """
import resource, sys, nbformat
from nbclient import NotebookClient
nb = nbformat.read(sys.argv[1], as_version=4)
NotebookClient(nb, kernel_name=sys.argv[2], timeout=3600, resources={"metadata": {"path": sys.argv[3]}}).execute()
if sys.argv[4] == "store":
    nbformat.write(nb, sys.argv[1])
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


USES_BITSANDBYTES = re.compile(r'import bitsandbytes|quantization=\\"(nf4|fp4|int8)|fsdp_qlora')
WITHOUT_BF16 = {"PYTHONPATH": str(ROOT / "tests" / "cpu_without_bf16"), "ATEN_CPU_CAPABILITY": "avx2"}


def child_env(path: Path) -> dict:
    """The environment a notebook runs in: as on a CPU without AVX512-BF16 when it uses bitsandbytes."""
    if torch.cuda.is_available() or not USES_BITSANDBYTES.search(path.read_text()):
        return dict(os.environ)
    return {**os.environ, **WITHOUT_BF16}


def run(path: Path, store: bool = False) -> dict:
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path), KERNEL, str(path.parent), "store" if store else "time"],
        capture_output=True,
        text=True,
        check=False,
        env=child_env(path),
    )
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{path.name} failed:\n{done.stderr[-3000:]}")
    peak_kib = int(done.stdout.strip().splitlines()[-1])
    return {"seconds": round(seconds, 1), "peak_rss_mib": round(peak_kib / 1024)}


def markdown(results: dict) -> str:
    lines = ["| notebook | wall time | peak memory (kernel RSS) | measured on |", "|---|---|---|---|"]
    for name, row in sorted(results.items()):
        lines.append(
            f"| {name} | {row['seconds'] / 60:.1f} min ({row['seconds']:.0f} s) | "
            f"{row['peak_rss_mib']:,} MiB | {row['machine']}, {row['date']} |"
        )
    return "\n".join(lines) + "\n"


def main(args: list[str]) -> None:
    parser = argparse.ArgumentParser(description="Execute notebooks; record wall time and peak memory.")
    parser.add_argument("--store", action="store_true", help="write the executed notebooks back")
    parser.add_argument("--report", default="notebooks", help="results file name (default: notebooks)")
    parser.add_argument(
        "--list-bitsandbytes", action="store_true", help="only print the notebooks that use bitsandbytes"
    )
    parser.add_argument("paths", nargs="*")
    options = parser.parse_args(args)
    store, name = options.store, options.report
    notebooks = [Path(p).resolve() for p in options.paths] or sorted(
        (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")
    )
    if options.list_bitsandbytes:
        print(
            " ".join(str(p.relative_to(ROOT)) for p in notebooks if USES_BITSANDBYTES.search(p.read_text()))
        )
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    report = RESULTS / f"{name}.json"
    results = json.loads(report.read_text()) if report.exists() else {}
    machine = f"{platform.machine()} CPU x{torch.get_num_threads()} threads"
    if torch.cuda.is_available():
        machine = torch.cuda.get_device_name(0)
    for path in notebooks:
        print(f"running {path.name} ...", flush=True)
        row = run(path, store)
        results[path.name] = {**row, "machine": machine, "date": date.today().isoformat()}
        print(f"  {row['seconds']:.0f} s, peak {row['peak_rss_mib']} MiB", flush=True)
        report.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")  # keep what is done
    (RESULTS / f"{name}.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main(sys.argv[1:])
