# The two commands of the README. Both create .venv and install everything on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
DATA ?= $(or $(BISPIKCLM_DATA),../shared/data)

.PHONY: setup quickstart test test-slow bench

setup:
	VENV=$(VENV) bash scripts/setup.sh

quickstart: setup
	$(VENV)/bin/bispikclm quickstart --data $(DATA)

test: setup
	BISPIKCLM_DATA=$(DATA) $(PY) -m pytest -q

test-slow: setup
	BISPIKCLM_DATA=$(DATA) $(PY) -m pytest -q -m slow

# Every benchmark with the arguments that made the committed results/*.json (about an hour and a half on 2 cores).
# The energy and spike-cost benchmarks use runs/quickstart when it exists (make quickstart first).
bench: setup
	$(PY) benchmarks/train_step.py
	OMP_WAIT_POLICY=PASSIVE PYTHONPATH=. $(PY) benchmarks/engine.py
	$(PY) benchmarks/energy.py $(if $(wildcard runs/quickstart/student),--run-dir runs/quickstart)
	$(PY) benchmarks/distill.py --steps 2
	$(PY) benchmarks/ablation.py --data $(DATA) --tokens 204800 --eval-windows 100
	$(PY) benchmarks/eval.py
	$(if $(wildcard runs/quickstart/teacher),$(PY) benchmarks/spike_cost.py --data $(DATA) --teacher runs/quickstart/teacher)
