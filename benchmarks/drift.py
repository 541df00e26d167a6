"""Library drift: does the course still work with the newest releases? (`make test-latest`)

Learners install whatever transformers / peft / bitsandbytes / accelerate / datasets / trl
are current that month. `make test-latest` builds `.venv-latest` with the newest releases
the package registry offers (torch stays on the pinned build) and runs this script in it:
it records the versions against constraints.txt, and where any differ it runs the unit
tests and executes the first half of every notebook (the cells that load, build and check;
the long training runs sit in the second half). The report goes to
benchmarks/results/drift.md: versions, what passed, what broke and the error.
"""

import subprocess
import sys
import time
from datetime import date
from importlib import metadata
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("transformers", "peft", "bitsandbytes", "accelerate", "datasets", "trl", "torch")
KERNEL = "peft-workbook-latest"


def pinned_versions() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        name, sep, version = line.partition("==")
        if sep and not line.startswith("#"):
            pins[name.strip().lower()] = version.strip()
    return {p: pins.get(p, "?") for p in PACKAGES}


def installed_versions() -> dict[str, str]:
    # Local build tags (torch's "+cpu") name the build, not the release.
    return {p: metadata.version(p).split("+")[0] for p in PACKAGES}


def unit_tests() -> tuple[bool, str]:
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "tests", "-m", "not gpu"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    tail = "\n".join(done.stdout.strip().splitlines()[-12:])
    return done.returncode == 0, tail


def smoke(path: Path) -> tuple[bool, str]:
    """Execute the first half of a notebook's code cells in a fresh kernel of this environment."""
    nb = nbformat.read(path, as_version=4)
    code = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"]
    nb.cells = nb.cells[: code[len(code) // 2] + 1] if code else nb.cells
    try:
        NotebookClient(
            nb, kernel_name=KERNEL, timeout=600, resources={"metadata": {"path": str(path.parent)}}
        ).execute()
    except Exception as err:  # the report records any failure, whatever its type
        return False, f"{type(err).__name__}: {str(err).strip().splitlines()[-1][:300]}"
    return True, f"{len(nb.cells)} cells"


def main() -> None:
    pinned, latest = pinned_versions(), installed_versions()
    lines = [
        "# Library drift (`make test-latest`)",
        "",
        f"Run on {date.today().isoformat()} in `.venv-latest`: the newest releases of each library from the",
        "package registry, torch kept on the pinned build.",
        "",
        "| package | pinned (constraints.txt) | newest installed |",
        "|---|---|---|",
        *(
            f"| {p} | {pinned[p]} | {latest[p]}{'' if latest[p] == pinned[p] else ' (newer)'} |"
            for p in PACKAGES
        ),
        "",
    ]
    if all(latest[p] == pinned[p] for p in PACKAGES):
        lines.append(
            "No drift: every library's newest release is the pinned one, so the unit tests and notebooks "
            "would run exactly what `make test` runs. Nothing else was executed; run again after a release."
        )
    else:
        start = time.perf_counter()
        ok, tail = unit_tests()
        lines += [f"## Unit tests: {'passed' if ok else 'FAILED'}", "", "```", tail, "```", ""]
        lines += ["## First half of each notebook", "", "| notebook | result |", "|---|---|"]
        for path in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
            passed, detail = smoke(path)
            lines.append(f"| {path.name} | {'ok' if passed else 'BROKE'}: {detail} |")
            print(lines[-1], flush=True)
        lines += ["", f"Took {(time.perf_counter() - start) / 60:.1f} min."]
    report = ROOT / "benchmarks" / "results" / "drift.md"
    report.write_text("\n".join(lines) + "\n")
    print(report.read_text())


if __name__ == "__main__":
    main()
