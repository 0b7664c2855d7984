# Every target does its own setup: a fresh clone needs only `make test` or `make bench`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The tested versions: `make test` and `make bench` install exactly these (a constraints
# file; pyproject.toml keeps the ranges). `make test-latest` takes the newest allowed.
LOCK := requirements/lock.txt
LATEST := .venv-latest
# Property tests run with this seed; `make test HYPOTHESIS_SEED=7` tries another.
HYPOTHESIS_SEED ?= 0
PYTEST_ARGS = -n $(WORKERS) --hypothesis-seed=$(HYPOTHESIS_SEED) --doctest-modules optstab benchmarks tests
# pytest-xdist workers: 2 on the 2-core CI machine; override with `make test WORKERS=8`.
WORKERS ?= 2

.PHONY: test test-latest lint pytest bench bench-full lock clean

$(STAMP): pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c $(LOCK) pip
	$(PY) -m pip install -q -c $(LOCK) -e '.[test,bench]'
	touch $(STAMP)

lint: $(STAMP)
	$(PY) -m ruff check optstab benchmarks tests
	$(PY) -m ruff format --check optstab benchmarks tests

pytest: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

test: lint pytest

# The newest versions pyproject.toml allows, in a venv of their own (.venv-latest).
test-latest:
	test -x $(LATEST)/bin/python || $(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q --upgrade pip
	$(LATEST)/bin/python -m pip install -q --upgrade --upgrade-strategy eager -e '.[test,bench]'
	$(LATEST)/bin/python -m ruff check optstab benchmarks tests
	$(LATEST)/bin/python -m pytest $(PYTEST_ARGS)

# Rewrites the lock from a fresh install of the newest allowed versions.
lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q --upgrade pip
	.venv-lock/bin/python -m pip install -q -e '.[test,bench]'
	{ echo "# Tested versions (constraints for make test / make bench): pip install -c $(LOCK) -e '.[test,bench]'"; \
	  echo "# Made by 'make lock'; pyproject.toml keeps the ranges library users get."; \
	  echo "pip==$$(.venv-lock/bin/python -m pip --version | cut -d' ' -f2)"; \
	  .venv-lock/bin/python -m pip freeze --exclude-editable; } > $(LOCK)
	rm -rf .venv-lock

bench: $(STAMP)
	$(PY) -m benchmarks.run all --quick

bench-full: $(STAMP)
	$(PY) -m benchmarks.run all

# Only untracked, generated files: the committed results/ stay.
clean:
	rm -rf $(VENV) $(LATEST) .venv-lock .pytest_cache .ruff_cache .hypothesis results/checkpoints
