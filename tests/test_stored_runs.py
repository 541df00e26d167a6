"""Every stored notebook is one top-to-bottom run of its current code cells.

`make notebooks` executes a notebook from a fresh kernel and writes it back, so its code cells carry
execution counts 1, 2, ..., n in order. A cell pasted in by hand, run twice or never run breaks the
sequence (a pasted bootstrap stored `[1, 1, 2, ...]`; a cell never executed stores `None`).
"""

from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def execution_problem(counts: list[int | None]) -> str | None:
    """What is wrong with a notebook's code-cell execution counts, or None for one clean run."""
    expected = list(range(1, len(counts) + 1))
    if counts == expected:
        return None
    first = next(i for i, (got, want) in enumerate(zip(counts, expected, strict=True)) if got != want)
    return f"code cell {first} has execution count {counts[first]}, expected {expected[first]}: re-run `make notebooks`"


@pytest.mark.parametrize(
    ("counts", "wrong"),
    [([1, 2, 3], None), ([1, 1, 2], "code cell 1"), ([1, None, 3], "code cell 1"), ([2, 3], "code cell 0")],
)
def test_execution_problem_finds_a_broken_sequence(counts, wrong):
    problem = execution_problem(counts)
    assert (problem is None) if wrong is None else (wrong in problem)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_stored_notebook_is_one_top_to_bottom_run(path):
    cells = nbformat.read(path, as_version=4).cells
    assert execution_problem([c.execution_count for c in cells if c.cell_type == "code"]) is None, path.name
