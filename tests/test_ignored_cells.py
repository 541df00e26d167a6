"""Every cell whose output nbval ignores, and whose printed numbers the text can use, asserts its claim.

`# NBVAL_IGNORE_OUTPUT` keeps timings and rounding-level digits from failing the run, but it also lets a
wrong number pass every test: a corrupted merge once printed its figure in such a cell. So an ignored
cell that prints a number other than a timing must check what it prints (`assert`, or a course check).
The environment report (`course.env.report()`: versions and hardware) is exempt.
"""

import re
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("[0-9][0-9]_*.ipynb"))
MARKER = "NBVAL_IGNORE_OUTPUT"
# "1.9 s", "352 ms", "2.2 s/step", "1.1 s per step", "in 3 min": the machine's speed, not a claim
TIMING = re.compile(r"\d[\d.,]*\s*(?:ms|s|min|seconds)\b(?:/step| per step)?")
# a number standing alone ("210 matrices", "r=16", "45%"), not a digit inside a name ("AdamW8bit", "fp32")
NUMBER = re.compile(r"(?<![A-Za-z_\d])\d")
CHECK = re.compile(r"^\s*assert\b|\bcheck_\w*\(|\bchecks\.\w+\(", re.M)


def printed_text(cell) -> str:
    """What a reader sees as text: streams and plain-text results (a figure's repr is not read)."""
    parts = []
    for out in cell.get("outputs", []):
        if out.get("output_type") == "stream":
            parts.append(out["text"])
        elif "text/plain" in out.get("data", {}) and "image/png" not in out["data"]:
            parts.append(out["data"]["text/plain"])
    return "".join(parts)


def unchecked_numbers(source: str, printed: str) -> bool:
    """True when an ignored cell prints a non-timing number and checks nothing."""
    if MARKER not in source or "course.env.report()" in source:
        return False
    return bool(NUMBER.search(TIMING.sub("", printed))) and not CHECK.search(source)


@pytest.mark.parametrize(
    ("source", "printed", "flagged"),
    [
        (f"# {MARKER}\nprint(n)", "210 matrices in 9 s", True),
        (f"# {MARKER}\nprint(n)\nassert n == 210", "210 matrices in 9 s", False),
        (f"# {MARKER}\nprint(t)", "loaded in 1.91 s; 2.2 s/step, 15 ms", False),
        (f"# {MARKER}\nprint(x)", "Skipped: AdamW8bit on fp32", False),
        (f"# {MARKER}\ncourse.env.report()", "torch 2.13.0", False),
        ("print(n)", "210 matrices", False),  # compared by nbval
    ],
)
def test_the_rule_flags_an_unchecked_number(source, printed, flagged):
    assert unchecked_numbers(source, printed) is flagged


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_ignored_cells_check_the_numbers_they_print(path):
    code = [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
    bad = [i for i, c in enumerate(code) if unchecked_numbers(c.source, printed_text(c))]
    assert bad == [], f"{path.name}: ignored-output code cells {bad} print numbers and assert nothing"
