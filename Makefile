# `make swarm` runs a local swarm; `make test` runs the tests. Both set up .venv first.
# `make images` builds the three images without Docker Hub (services/build-local.sh; root, a Docker engine);
# `make e2e-compose` builds them on a private dockerd and runs `docker compose up --scale miner=4` end to end.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup swarm test test-unit test-faults images k8s-secrets lock e2e-compose clean

setup: $(STAMP)

# Python 3.11+ checked; torch first and alone, the CPU build unless an NVIDIA GPU is here (TORCH=auto|cpu|cuda):
# an unpinned resolve would fetch PyPI's multi-GB CUDA build (deploy/setup-venv.sh)
TORCH ?= auto
$(STAMP): pyproject.toml requirements.txt requirements-dev.txt deploy/setup-venv.sh
	PYTHON=$(PYTHON) VENV=$(VENV) TORCH=$(TORCH) sh deploy/setup-venv.sh
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

# random Redis passwords for kubectl apply -k k8s/overlays/dev, in its git-ignored redis.env (kept when there)
k8s-secrets:
	sh deploy/k8s-secrets.sh k8s/overlays/dev

images:
	services/build-local.sh

# services/requirements.lock (CPU torch: every image) and services/requirements-cuda.lock (CUDA torch: the GPU
# miner) from their .in files, with hashes, resolved for Debian bookworm's python3 (3.11.2). torch's CPU wheel
# is not on PyPI: TORCH_FIND_LINKS is where it lies (a folder or a find-links page).
UV ?= uv
TORCH_FIND_LINKS ?= https://download.pytorch.org/whl/cpu/torch/
LOCK_FLAGS := --generate-hashes --python-version 3.11.2 --python-platform x86_64-manylinux_2_28
lock:
	$(UV) pip compile services/requirements.in $(LOCK_FLAGS) --find-links $(TORCH_FIND_LINKS) -o services/requirements.lock \
		--custom-compile-command "make lock  (uv pip compile services/requirements.in $(LOCK_FLAGS) --find-links TORCH_FIND_LINKS)"
	$(UV) pip compile services/requirements-cuda.in $(LOCK_FLAGS) -o services/requirements-cuda.lock \
		--custom-compile-command "make lock  (uv pip compile services/requirements-cuda.in $(LOCK_FLAGS))"

# root: starts its own dockerd (temporary data root), builds the images, runs tests/e2e/test_compose.py, stops it all
e2e-compose: $(STAMP)
	HIVE_E2E_COMPOSE=1 $(PY) -m pytest -q -rs tests/e2e $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) swarm-run .pytest_cache
