# The two commands of the README: `make demo` and `make test`. Both set up .venv first.
SHELL := /bin/bash
# LSST middleware needs Python >= 3.12: take the first interpreter that is.
PYTHON ?= $(shell for p in python3.12 python3.13 $$HOME/.pyenv/versions/3.12*/bin/python3.12 \
	$$HOME/.pyenv/versions/3.13*/bin/python3.13; do \
	$$p -c 'import sys; assert sys.version_info >= (3, 12)' 2>/dev/null && { echo $$p; break; }; done)
VENV := .venv
BIN := $(VENV)/bin
# The Rucio server (tests and `make rucio-up` only) has pins of its own: its own venv.
RUCIO_VENV := .rucio-venv
CORES ?= 2

.PHONY: setup system-deps rucio-setup rucio-up rucio-down demo test lint bench bench-rucio bench-planner bench-dryrun clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.lock pyproject.toml
	@test -n "$(PYTHON)" || { echo "No Python >= 3.12 found; set PYTHON=/path/to/python3.12"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.lock
	$(BIN)/pip install -q --no-deps -e .
	touch $@

demo: setup
	time $(BIN)/snakemake --cores $(CORES)
	$(BIN)/multisite summary config/config.yaml

# Debian packages the tests use (run as root): Chromium renders the campaign report;
# PostgreSQL 15 backs the test Rucio server.
system-deps:
	@command -v chromium >/dev/null && test -x /usr/lib/postgresql/15/bin/initdb || \
		{ apt-get update -qq && apt-get install -y -qq chromium postgresql; }

rucio-setup: $(RUCIO_VENV)/.installed

$(RUCIO_VENV)/.installed: requirements-rucio-server.txt
	test -x $(RUCIO_VENV)/bin/python || $(PYTHON) -m venv $(RUCIO_VENV)
	$(RUCIO_VENV)/bin/pip install -q --upgrade pip
	$(RUCIO_VENV)/bin/pip install -q -r requirements-rucio-server.txt
	touch $@

# A local, real Rucio (PostgreSQL, server, daemons) for running the demo with transfer.backend: rucio.
rucio-up: setup system-deps rucio-setup
	scripts/rucio_local.sh up

rucio-down:
	scripts/rucio_local.sh down

test: setup system-deps rucio-setup
	$(BIN)/pytest

lint: setup
	$(BIN)/ruff check multisite scripts tests benchmarks
	$(BIN)/ruff format --check multisite scripts tests benchmarks
	$(BIN)/snakemake --lint

bench: setup
	$(BIN)/python benchmarks/bench_demo.py

bench-rucio: setup system-deps rucio-setup
	$(BIN)/python benchmarks/bench_rucio.py

bench-planner: setup
	$(BIN)/python benchmarks/bench_planner.py

bench-dryrun: setup
	$(BIN)/python benchmarks/bench_dryrun.py

clean:
	rm -rf work .snakemake
