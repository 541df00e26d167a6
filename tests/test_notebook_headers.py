"""Every notebook's stated run time is the one measured in benchmarks/results/notebooks.json.

The first markdown cell of each `notebooks/NN_*.ipynb` carries exactly one line
`**Time:** about N minutes on a 2-core CPU (default run, measured in benchmarks/results/notebooks.md).`
with N = ceil(seconds / 60) of that notebook's row, which `benchmarks/run_notebooks.py --store`
writes. A missing line, a missing row or another N fails, so the header cannot drift from the
measurement again.
"""

import json
import math
import re
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
RESULTS = ROOT / "benchmarks" / "results" / "notebooks.json"
TIME_LINE = re.compile(
    r"^\*\*Time:\*\* about (\d+) minutes? on a 2-core CPU "
    r"\(default run, measured in benchmarks/results/notebooks\.md\)\.$",
    re.MULTILINE,
)


def stated_minutes(markdown: str) -> list[int]:
    """The N of every well-formed time line in a markdown cell's source."""
    return [int(n) for n in TIME_LINE.findall(markdown)]


def header_problem(name: str, markdown: str, results: dict) -> str | None:
    """What is wrong with notebook `name`'s header (its first markdown cell), or None."""
    stated = stated_minutes(markdown)
    if len(stated) != 1:
        return f"{name}: expected exactly one line {TIME_LINE.pattern!r} in the first markdown cell, found {stated}"
    if name not in results:
        return f"{name}: no row in {RESULTS.name}; run benchmarks/run_notebooks.py --store on it"
    measured = math.ceil(results[name]["seconds"] / 60)
    if stated[0] != measured:
        return (
            f"{name}: the header says about {stated[0]} minutes, {RESULTS.name} measured "
            f"{results[name]['seconds']} s, i.e. about {measured}"
        )
    return None


def first_markdown(path: Path) -> str:
    cells = nbformat.read(path, as_version=4).cells
    return next((cell.source for cell in cells if cell.cell_type == "markdown"), "")


LINE = (
    "**Time:** about {} minutes on a 2-core CPU (default run, measured in benchmarks/results/notebooks.md)."
)
ROWS = {"99_x.ipynb": {"seconds": 121.0}}


@pytest.mark.parametrize(
    ("markdown", "wrong"),
    [
        (f"# 99 · X\n\n{LINE.format(3)}\n", False),  # 121 s -> 3 minutes
        (f"# 99 · X\n\n{LINE.format(2)}\n", True),  # rounded down
        (f"# 99 · X\n\n{LINE.format(3)}\n{LINE.format(3)}\n", True),  # two lines
        ("# 99 · X\n\n**Time:** about 2-3 minutes on a laptop CPU.\n", True),  # free-form estimate
        ("# 99 · X\n\nno time line at all\n", True),
        (f"# 99 · X\n\nsee below: {LINE.format(3)}\n", True),  # not a line of its own
    ],
)
def test_header_check_catches_wrong_headers(markdown, wrong):
    problem = header_problem("99_x.ipynb", markdown, ROWS)
    assert (problem is not None) == wrong, problem


def test_header_check_needs_a_measured_row():
    assert "no row" in header_problem("98_y.ipynb", LINE.format(3), ROWS)


def test_there_are_notebooks_to_check():
    assert len(NOTEBOOKS) >= 11


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_stated_time_is_the_measured_time(path):
    results = json.loads(RESULTS.read_text())
    problem = header_problem(path.name, first_markdown(path), results)
    assert problem is None, problem
