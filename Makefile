# The two commands of the README. Both create .venv and install everything on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
DATA ?= $(or $(BISPIKCLM_DATA),../shared/data)

.PHONY: setup quickstart test test-slow bench bench-engine

setup:
	VENV=$(VENV) bash scripts/setup.sh

quickstart: setup
	$(VENV)/bin/bispikclm quickstart --data $(DATA)

test: setup
	BISPIKCLM_DATA=$(DATA) $(PY) -m pytest -q

test-slow: setup
	BISPIKCLM_DATA=$(DATA) $(PY) -m pytest -q -m slow

# Every benchmark with the arguments that made the committed results/*.json (several hours on 2 cores).
# The energy, ablation, spike-cost, quality and peer benchmarks use runs/quickstart when it exists (make quickstart first).
bench: setup
	$(PY) benchmarks/train_step.py
	OMP_WAIT_POLICY=PASSIVE PYTHONPATH=. $(PY) benchmarks/engine.py
	$(PY) benchmarks/energy.py $(if $(wildcard runs/quickstart/student),--run-dir runs/quickstart)
	$(PY) benchmarks/distill.py --steps 2
	$(PY) benchmarks/ablation.py --data $(DATA) --tokens 204800 --eval-windows 100 $(if $(wildcard runs/quickstart/teacher),--teacher runs/quickstart/teacher)
	$(PY) benchmarks/eval.py
	$(if $(wildcard runs/quickstart/teacher),$(PY) benchmarks/spike_cost.py --data $(DATA) --teacher runs/quickstart/teacher)
	OMP_NUM_THREADS=1 $(PY) benchmarks/memory.py
	$(PY) benchmarks/quality.py --data $(DATA) --run-dir runs/quickstart --tokens 204800 --eval-windows 200 --seeds 0 1 2 --variants paper ann init_all rate_matched learn_threshold_channel
	PYTHONPATH=. $(PY) benchmarks/cli_startup.py
	$(PY) benchmarks/quality_curve.py --data $(DATA) --run-dir runs/quickstart --tokens 249856 499712 999424 1998848 3999744 --variants calibrated_signed calibrated_signed_qkv --ann ann_logits
	$(PY) benchmarks/quality.py --data $(DATA) --run-dir runs/quickstart --results results/quality_lowrate.json --tokens 499712 --eval-windows 200 --seeds 0 1 2 --resume --variants calibrated_logits@train.rate_cost=5
	$(PY) benchmarks/quality.py --data $(DATA) --run-dir runs/quickstart --tokens 499712 --eval-windows 200 --seeds 0 1 2 --resume --results results/quality_signed.json --variants calibrated_logits calibrated_signed calibrated_signed_qkv ann_logits
	$(PY) benchmarks/quality.py --data $(DATA) --run-dir runs/quickstart --tokens 499712 --eval-windows 200 --seeds 0 1 2 --resume --results results/quality_progressive.json --variants calibrated_progressive
	$(PY) benchmarks/quality.py --data $(DATA) --run-dir runs/quickstart --tokens 499712 --eval-windows 200 --seeds 0 --resume --results results/quality_signed_lowrate.json --variants calibrated_logits@train.rate_cost=5 calibrated_signed@train.rate_cost=5 calibrated_signed@train.rate_cost=3 calibrated_signed_qkv@train.rate_cost=3 calibrated_signed_qkv@train.rate_cost=2
	$(MAKE) bench-engine
	$(PY) benchmarks/smollm2.py --data $(DATA) --out runs/smollm2 --tokens 65536 --data-tokens 131072 --test-tokens 16384 --zeroshot-limit 40 --parity results/smollm2/parity.json

# The engine against llama.cpp and PyTorch, every contender in a process of its own (about 25 min on 2 idle cores;
# refuses to write results above load average 1.5): results/engine_peers.json, engine_peers.png, engine_trade.png.
bench-engine: setup
	OMP_WAIT_POLICY=PASSIVE PYTHONPATH=. $(PY) benchmarks/engine_peers.py --data $(DATA) --run-dir runs/quickstart
