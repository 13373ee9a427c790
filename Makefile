# Fleetwatch: `make demo` and `make test` work on a fresh Debian machine (installs included).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-unit lint down status bench bench-sim bench-bridge clean chaos soak audit

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

## install: Python virtualenv + package, Debian packages (Mosquitto, PostgreSQL), Kafka jars from Maven Central
install: $(STAMP)
	$(BIN)/fleetwatch install

## demo: start the local stack and run a simulated fleet whose worn parts get ordered
demo: install
	$(BIN)/fleetwatch demo

## test: unit, integration (real Kafka, Mosquitto, PostgreSQL) and end-to-end tests
test: install
	$(BIN)/ruff check .
	$(BIN)/fleetwatch audit --timeout 120
	$(BIN)/pytest

## test-unit: only the tests that need no services
test-unit: $(STAMP)
	$(BIN)/pytest -m "not services"

lint: $(STAMP)
	$(BIN)/ruff check .

status: $(STAMP)
	$(BIN)/fleetwatch status

## down: stop every process the demo started
down: $(STAMP)
	$(BIN)/fleetwatch down

## bench: every benchmark (real stack on its own ports), JSON + SUMMARY.md + plots in bench/results/
bench: install
	$(BIN)/pip install -q -e '.[dev,bench]'
	$(BIN)/python -m bench.run_all

## bench-sim: simulator → Mosquitto throughput in gateway mode (10,000 tractors × 1 Hz) vs a bare paho loop
bench-sim: install
	$(BIN)/python -m bench.bench_sim

## bench-bridge: MQTT → Kafka bridge msg/s and readings/s (1 and 2 processes) vs bare paho + producer loops
bench-bridge: install
	$(BIN)/python -m bench.bench_bridge

## bench-runtime: functions runtime records/s through a no-op handler (1 and 2 workers) vs a bare kafka-python loop
.PHONY: bench-runtime
bench-runtime: install
	$(BIN)/python -m bench.bench_runtime

## bench-trends: trend detection readings/s (compute path, full function on Kafka) vs a naive per-record loop
.PHONY: bench-trends
bench-trends: install
	$(BIN)/python -m bench.bench_trends

## acceptance: issue 6's run: full mixed-wear fleet (500 x 180 days) end to end on a fresh stack with PostgreSQL, scored (~40 min)
.PHONY: acceptance
acceptance: install
	$(BIN)/python -m bench.acceptance

## chaos: kill -9 each process in turn during a fleet run, then reconcile; exit 1 if anything was lost or doubled
chaos: install
	$(BIN)/fleetwatch chaos --seed $(or $(SEED),7) --kills $(or $(KILLS),2)

## soak: steady load for DURATION seconds (default 600); memory of each process over time, fails on growth
soak: install
	$(BIN)/fleetwatch soak --duration $(or $(DURATION),600)

## audit: pip-audit; fails only on known vulnerabilities in the dependencies pyproject.toml declares
audit: $(STAMP)
	$(BIN)/fleetwatch audit --timeout 120

clean: down
	rm -rf .run
