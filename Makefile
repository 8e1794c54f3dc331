# inferq: `make demo` runs the whole path on embedded defaults; `make test` runs the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test lint services model bench gptq-report clean

install: $(VENV)/.installed

# torch first, pinned: a range that admits a newer torch pulls several GB of CUDA packages.
$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

model: install
	$(VENV)/bin/inferq model prepare

demo: model
	$(VENV)/bin/inferq demo

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

services:
	bash .ci/services

test: lint services model
	$(VENV)/bin/pytest -q

# The engine benchmark (8-13 minutes on 2 CPU cores); table + PNG under bench/out/.
bench: model
	$(PY) -m pip install -q -c constraints.txt -e '.[bench]'
	$(PY) bench/engine_bench.py --jobs 256 --baseline-jobs 32 --max-num-seqs 128

# GPTQ vs fp: perplexity, size, memory, speed (about 3 minutes); table under bench/out/.
gptq-report: model
	$(PY) bench/gptq_report.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
