#!/usr/bin/env bash
# The one prepared run for a lent CUDA machine (about 8 minutes): the `gpu`-marked tests, every
# notebook's default run timed on the GPU (their GPU cells run there: 06's AdamW8bit vs
# PagedAdamW8bit peak, 07's QLoRA in course.env.compute_dtype, and the later GPU cells), and the
# text those GPU cells print, all written to benchmarks/results/gpu.md.
#
#   PYTHON=/path/to/python bash benchmarks/gpu_check.sh      # default: .venv/bin/python
#
# It executes the notebooks in place and puts the stored outputs back afterwards, so the CPU
# outputs that nbval compares are never replaced by GPU ones.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
REPORT=benchmarks/results/gpu.md
LOG=$(mktemp -d)
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
cp -r notebooks "$LOG/notebooks.orig"
trap 'rm -rf notebooks && cp -r "$LOG/notebooks.orig" notebooks' EXIT

$PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: run this on a GPU machine')" || exit 1

timeout 120 $PY -m pytest -q -m gpu tests >"$LOG/tests.txt" 2>&1
tests_rc=$?
timeout 390 $PY benchmarks/run_notebooks.py --store --report gpu_notebooks ${NOTEBOOKS:-} >"$LOG/notebooks.txt" 2>&1
notebooks_rc=$?

$PY - "$REPORT" "$LOG" "$tests_rc" "$notebooks_rc" <<'PYEOF'
import sys
from pathlib import Path

import nbformat
import torch

import course

report, log, tests_rc, notebooks_rc = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]
lines = [
    "# GPU check (benchmarks/gpu_check.sh)",
    "",
    f"Device: {torch.cuda.get_device_name(0)}, compute dtype {course.env.compute_dtype()}, torch {torch.__version__}.",
    "",
    f"## gpu-marked tests (exit {tests_rc})",
    "```",
    *(log / "tests.txt").read_text().splitlines()[-15:],
    "```",
    f"## Notebooks' default runs on the GPU (exit {notebooks_rc})",
    "",
]
table = Path("benchmarks/results/gpu_notebooks.md")
lines += table.read_text().splitlines() if table.exists() else ["(no notebook finished)"]
lines += ["", "## What the GPU cells printed", ""]
for path in sorted(Path("notebooks").glob("[0-9][0-9]_*.ipynb")):
    for cell in nbformat.read(path, as_version=4).cells:
        if cell.cell_type == "code" and "torch.cuda.is_available()" in cell.source:
            text = "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream")
            lines += [f"### {path.name}", "```", text.strip() or "(no output)", "```"]
report.write_text("\n".join(lines) + "\n")
print(report.read_text())
PYEOF
