# The two commands of the README. Both create .venv and install everything on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
DATA ?= ../shared/data

.PHONY: setup quickstart test test-slow bench

setup:
	VENV=$(VENV) bash scripts/setup.sh

quickstart: setup
	$(VENV)/bin/bispikclm quickstart --data $(DATA)

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

bench: setup
	for b in benchmarks/*.py; do $(PY) $$b || exit 1; done
