"""Every worked example in a `course` docstring runs, and prints what the docstring says.

The docstrings' `>>>` examples are the course's smallest teaching (STYLE: "a tiny worked example
for anything numeric"); an example that no longer matches its code would teach the wrong thing.
Each module with examples is one test; `make test` runs them with the unit tests.
"""

import doctest
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "course"
WITH_EXAMPLES = sorted(
    ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    for path in PACKAGE.rglob("*.py")
    if ">>> " in path.read_text()
)


def test_modules_with_examples_are_found():
    assert {"course.stats", "course.quant", "course.kernel_path"} <= set(WITH_EXAMPLES)


@pytest.mark.parametrize("name", WITH_EXAMPLES)
def test_worked_examples_run(name):
    result = doctest.testmod(importlib.import_module(name), report=False)
    assert result.attempted > 0 and result.failed == 0, (
        f"{name}: {result.failed} of {result.attempted} examples fail"
    )


def test_a_wrong_example_fails():
    # the counter-example: an example whose printed result is not what the code gives
    test = doctest.DocTestParser().get_doctest(">>> 1 + 1\n3\n", {}, "wrong", "wrong.py", 0)
    runner = doctest.DocTestRunner(verbose=False)
    runner.run(test, out=lambda _: None)
    assert runner.failures == 1
