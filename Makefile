# Every target does its own setup: a fresh clone needs only `make test` or `make bench`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# pytest-xdist workers: 2 on the 2-core CI machine; override with `make test WORKERS=8`.
WORKERS ?= 2

.PHONY: test lint pytest bench bench-full clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $(STAMP)

lint: $(STAMP)
	$(PY) -m ruff check optstab benchmarks tests
	$(PY) -m ruff format --check optstab benchmarks tests

pytest: $(STAMP)
	$(PY) -m pytest -n $(WORKERS) --doctest-modules optstab benchmarks tests

test: lint pytest

bench: $(STAMP)
	$(PY) -m benchmarks.run all --quick

bench-full: $(STAMP)
	$(PY) -m benchmarks.run all

clean:
	rm -rf $(VENV) results .pytest_cache .ruff_cache
