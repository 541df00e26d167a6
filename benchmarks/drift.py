"""Library drift: does the course still work with the newest releases? (`make test-latest`)

Learners install whatever transformers / peft / bitsandbytes / accelerate / datasets / trl
are current that month. `make test-latest` builds `.venv-latest` with the newest releases
that pip can install from the package registry reachable here (torch stays on the pinned
build) and runs this script in it. It records three versions per library: the pin in
constraints.txt, what pip installed, and the newest that `pip index versions` lists. Where an
installed version differs from its pin it runs the unit tests and executes the first half of
every notebook (the cells that load, build and check; the long training runs sit in the
second half). The report goes to benchmarks/results/drift.md.

What the report can claim is only what this registry held that day: "no drift" means pip
found nothing newer here, not that the libraries are stable. `decide` and `report` are pure
functions of the version data, so both branches are tested with faked versions
(tests/test_drift.py) without pip or notebooks.
"""

import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import date
from importlib import metadata
from pathlib import Path

from packaging.version import InvalidVersion, Version

ROOT = Path(__file__).resolve().parent.parent
REPORT = ROOT / "benchmarks" / "results" / "drift.md"
PACKAGES = ("transformers", "peft", "bitsandbytes", "accelerate", "datasets", "trl", "torch")
KEPT_PINNED = ("torch",)  # the Makefile installs torch==pin in .venv-latest on purpose (one CPU build)
KERNEL = "peft-workbook-latest"
CHECKS = ("unit tests", "first half of each notebook")


@dataclass(frozen=True)
class Versions:
    pinned: dict[str, str]  # constraints.txt
    installed: dict[str, str]  # what pip installed in .venv-latest
    # what `pip index versions` listed, newest first; None: not asked or not answered
    registry: dict[str, tuple[str, ...] | None] = field(default_factory=dict)


@dataclass(frozen=True)
class Decision:
    drifted: tuple[str, ...]  # installed differs from the pin: the checks test these
    held_back: tuple[str, ...]  # the registry lists a newer release than pip installed (torch excluded)
    registry_only_pins: bool  # the registry listed the pinned version and nothing else, for every package
    registry_recorded: bool  # every package has a registry listing
    checks: tuple[str, ...]  # what runs: CHECKS where anything drifted, else nothing


def _newer(a: str, b: str) -> bool:
    """Whether release a is newer than b; False where either is no version ("?": no pin found)."""
    try:
        return Version(a) > Version(b)
    except InvalidVersion:
        return False


def decide(versions: Versions) -> Decision:
    """Which packages drifted and which checks run: pure, so the drift branch is testable with fake versions.

    decide(Versions({"trl": "1.16.0"}, {"trl": "1.17.0"})) -> drifted ("trl",), checks CHECKS.
    """
    packages = tuple(versions.pinned)
    listed = {p: versions.registry.get(p) for p in packages}
    drifted = tuple(p for p in packages if versions.installed[p] != versions.pinned[p])
    held_back = tuple(
        p
        for p in packages
        if p not in KEPT_PINNED and listed[p] and _newer(listed[p][0], versions.installed[p])
    )
    recorded = all(listed[p] is not None for p in packages)
    only_pins = recorded and all(listed[p] == (versions.pinned[p],) for p in packages)
    return Decision(drifted, held_back, only_pins, recorded, CHECKS if drifted else ())


def _listed(versions: tuple[str, ...] | None) -> str:
    if versions is None:
        return "not recorded"
    if not versions:
        return "none"
    return (
        f"{versions[0]} (only version listed)"
        if len(versions) == 1
        else f"{versions[0]} (of {len(versions)})"
    )


def _installed(installed: str, pinned: str) -> str:
    if installed == pinned:
        return installed
    return f"{installed} ({'newer' if _newer(installed, pinned) else 'differs'})"


def report(
    versions: Versions,
    day: str,
    unit: tuple[bool, str] | None = None,
    notebooks: list[tuple[str, bool, str]] | None = None,
    minutes: float | None = None,
) -> str:
    """drift.md's text: the versions, what they mean, and the results of the checks that `decide` chose."""
    decision = decide(versions)
    lines = [
        "# Library drift (`make test-latest`)",
        "",
        f"Run on {day} in `.venv-latest`: the newest release of each library that pip could install from the",
        "package registry reachable here, torch kept on the pinned build.",
        "",
        "| package | pinned (constraints.txt) | installed in .venv-latest | newest listed by `pip index versions` |",
        "|---|---|---|---|",
        *(
            f"| {p} | {versions.pinned[p]} | {_installed(versions.installed[p], versions.pinned[p])} "
            f"| {_listed(versions.registry.get(p))} |"
            for p in versions.pinned
        ),
        "",
    ]
    if decision.registry_only_pins:
        scope = (
            "The registry reachable here lists only the pinned version of each library, so this report cannot "
            "see newer releases: no drift means nothing newer was found here, not that the libraries are stable."
        )
    elif decision.registry_recorded:
        scope = (
            "This is what the registry reachable here listed on that day; it may lag the public index, so no "
            "drift means nothing newer was found here, not that the libraries are stable."
        )
    else:
        scope = (
            "What the registry listed was not recorded in this run, so no drift means only that pip installed "
            "nothing newer here that day, not that newer releases do not exist or that the libraries are stable."
        )
    if decision.held_back:
        scope += (
            f" The registry lists newer releases than pip installed for {', '.join(decision.held_back)}:"
            " a resolver constraint or a local cap held them back, and no check here tested them."
        )
    if not decision.checks:
        lines += [
            "No drift found: pip installed the pinned release of every library, so the unit tests and notebooks "
            "would run exactly what `make test` runs. Nothing else was executed.",
            "",
            scope + " Run again after a release.",
        ]
        return "\n".join(lines) + "\n"
    lines += [f"Drift: {', '.join(decision.drifted)} differ from the pins, so the checks ran.", "", scope, ""]
    if unit is not None:
        ok, tail = unit
        lines += [f"## Unit tests: {'passed' if ok else 'FAILED'}", "", "```", tail, "```", ""]
    if notebooks is not None:
        lines += ["## First half of each notebook", "", "| notebook | result |", "|---|---|"]
        lines += [
            f"| {name} | {'ok' if passed else 'BROKE'}: {detail} |" for name, passed, detail in notebooks
        ]
        lines.append("")
    if minutes is not None:
        lines.append(f"Took {minutes:.1f} min.")
    return "\n".join(lines).rstrip("\n") + "\n"


# --- what this environment holds (run in .venv-latest) ---------------------------------------


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


def parse_pip_index(output: str) -> tuple[str, ...] | None:
    """The versions in `pip index versions` output, newest first (pip prints them so).

    "trl (1.16.0)\\nAvailable versions: 1.16.0, 1.15.2\\n" -> ("1.16.0", "1.15.2").
    """
    found = re.search(r"^Available versions: (.*)$", output, re.M)
    return tuple(v.strip() for v in found.group(1).split(",")) if found else None


def registry_versions() -> dict[str, tuple[str, ...] | None]:
    """What the registry reachable here lists for each package (pip's own configuration and indexes)."""
    listed = {}
    for p in PACKAGES:
        done = subprocess.run(
            [sys.executable, "-m", "pip", "index", "versions", p, "--disable-pip-version-check"],
            capture_output=True,
            text=True,
        )
        listed[p] = parse_pip_index(done.stdout) if done.returncode == 0 else None
    return listed


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
    import nbformat
    from nbclient import NotebookClient

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
    versions = Versions(pinned_versions(), installed_versions(), registry_versions())
    unit = notebooks = minutes = None
    if decide(versions).checks:
        start = time.perf_counter()
        unit, notebooks = unit_tests(), []
        for path in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
            passed, detail = smoke(path)
            notebooks.append((path.name, passed, detail))
            print(f"| {path.name} | {'ok' if passed else 'BROKE'}: {detail} |", flush=True)
        minutes = (time.perf_counter() - start) / 60
    REPORT.write_text(report(versions, date.today().isoformat(), unit, notebooks, minutes))
    print(REPORT.read_text())


if __name__ == "__main__":
    main()
