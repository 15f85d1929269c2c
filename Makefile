# `make swarm` runs a local swarm; `make test` runs the tests. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup swarm test test-unit test-faults clean

setup: $(STAMP)

# torch first and alone: an unpinned resolve would fetch a multi-GB CUDA build.
$(STAMP): pyproject.toml requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -m pip check
	touch $(STAMP)

swarm: $(STAMP)
	$(PY) -m hivetrain.swarm --miners 4 --workdir swarm-run $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q -rs --durations=15 $(PYTEST_ARGS)

# peers in network namespaces (root, iproute2, iptables): NAT, partitions; figures in test-artifacts/faults.json
test-faults: $(STAMP)
	$(PY) -m pytest -q -rs tests/faults $(PYTEST_ARGS)

test-unit: $(STAMP)
	$(PY) -m pytest -q -m "not integration" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) swarm-run .pytest_cache
