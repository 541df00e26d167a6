"""Learner copies of the notebooks: each reference solution replaced by a stub.

A solution lives once, in the notebook, between a `# BEGIN SOLUTION` and an
`# END SOLUTION` line. `python -m course.exercises` (`make exercises`) writes
`notebooks/exercises/<name>.ipynb` with those lines replaced by
`raise NotImplementedError("Your turn")` at the same indentation and all outputs
cleared, so the learner copy can never drift from the graded original.

    def lora_forward(x):            def lora_forward(x):
        # BEGIN SOLUTION      ->        raise NotImplementedError("Your turn")
        return x @ A.T @ B.T
        # END SOLUTION
"""

import re
import sys
from pathlib import Path

import nbformat

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
BEGIN, END = "# BEGIN SOLUTION", "# END SOLUTION"
STUB = 'raise NotImplementedError("Your turn")'
_BEGIN_LINE = re.compile(r"^(?P<indent>[ \t]*)# BEGIN SOLUTION[ \t]*$")


def strip_solutions(source: str) -> str:
    """Replace every marked solution in `source` by a stub; markers must be balanced."""
    out, inside = [], False
    for number, line in enumerate(source.splitlines(), start=1):
        begin = _BEGIN_LINE.match(line)
        if begin:
            if inside:
                raise ValueError(f"line {number}: {BEGIN} inside another solution")
            inside = True
            out.append(f"{begin['indent']}{STUB}")
        elif line.strip() == END:
            if not inside:
                raise ValueError(f"line {number}: {END} without {BEGIN}")
            inside = False
        elif not inside:
            out.append(line)
    if inside:
        raise ValueError(f"{BEGIN} without {END}")
    return "\n".join(out)


def has_solution(source: str) -> bool:
    return any(_BEGIN_LINE.match(line) for line in source.splitlines())


def exercise_cells(path: Path) -> list[str]:
    """Sources of the code cells of a notebook that hold a marked solution."""
    notebook = nbformat.read(path, as_version=4)
    return [c.source for c in notebook.cells if c.cell_type == "code" and has_solution(c.source)]


def learner_copy(path: Path, out_dir: Path) -> Path:
    """Write the learner copy of one notebook into `out_dir`; return its path."""
    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type != "code":
            continue
        cell.source = strip_solutions(cell.source)
        cell.outputs, cell.execution_count = [], None
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / path.name
    nbformat.write(notebook, target)
    return target


def main(notebook_dir: Path = NOTEBOOK_DIR) -> None:
    for path in sorted(Path(notebook_dir).glob("[0-9][0-9]_*.ipynb")):
        print(learner_copy(path, Path(notebook_dir) / "exercises"))


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else NOTEBOOK_DIR)
