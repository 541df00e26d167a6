"""Every exercise in every notebook: its grader passes the reference and fails the stub."""

import math
from pathlib import Path

import pytest
import torch

import course
from course import exercises

NOTEBOOKS = sorted(exercises.NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
CELLS = [(path.name, i, src) for path in NOTEBOOKS for i, src in enumerate(exercises.exercise_cells(path))]


def _namespace() -> dict:
    """What an exercise cell may rely on: the course package, torch and math (and nothing else)."""
    return {"course": course, "torch": torch, "math": math}


def test_every_notebook_after_setup_has_an_exercise():
    assert NOTEBOOKS, "no notebooks found"
    with_exercises = {name for name, _, _ in CELLS}
    assert {p.name for p in NOTEBOOKS} <= with_exercises


@pytest.mark.parametrize(("notebook", "index", "source"), CELLS, ids=[f"{n}-{i}" for n, i, _ in CELLS])
def test_grader_passes_reference_and_fails_stub(notebook, index, source):
    assert "course.checks.check_" in source, f"{notebook} exercise {index} calls no grader"
    exec(compile(source, f"{notebook}[{index}]", "exec"), _namespace())  # the reference solution passes
    with pytest.raises(AssertionError, match="not implemented yet"):
        exec(compile(exercises.strip_solutions(source), f"{notebook}[{index}] stub", "exec"), _namespace())


def test_strip_solutions_keeps_indentation_and_everything_else():
    source = (
        "import math\n\ndef f(x):\n    # BEGIN SOLUTION\n    return x + 1\n    # END SOLUTION\n\ncheck(f)"
    )
    assert exercises.strip_solutions(source) == (
        'import math\n\ndef f(x):\n    raise NotImplementedError("Your turn")\n\ncheck(f)'
    )


@pytest.mark.parametrize(
    "source",
    [
        "# BEGIN SOLUTION\nx = 1",
        "x = 1\n# END SOLUTION",
        "# BEGIN SOLUTION\n# BEGIN SOLUTION\n# END SOLUTION",
    ],
)
def test_unbalanced_markers_are_refused(source):
    with pytest.raises(ValueError, match="SOLUTION"):
        exercises.strip_solutions(source)


def test_learner_copy_has_stubs_and_no_outputs(tmp_path):
    import nbformat

    for path in NOTEBOOKS:
        copy = nbformat.read(exercises.learner_copy(path, tmp_path), as_version=4)
        code = [c for c in copy.cells if c.cell_type == "code"]
        assert all(c.outputs == [] and c.execution_count is None for c in code)
        assert not any("# BEGIN SOLUTION" in c.source for c in code)
        assert Path(tmp_path / path.name).exists()
