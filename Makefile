# The two commands of the README: `make demo` and `make test`. Both set up .venv first.
SHELL := /bin/bash
# LSST middleware needs Python >= 3.12: take the first interpreter that is.
PYTHON ?= $(shell for p in python3.12 python3.13 $$HOME/.pyenv/versions/3.12*/bin/python3.12 \
	$$HOME/.pyenv/versions/3.13*/bin/python3.13; do \
	$$p -c 'import sys; assert sys.version_info >= (3, 12)' 2>/dev/null && { echo $$p; break; }; done)
VENV := .venv
BIN := $(VENV)/bin
CORES ?= 2

.PHONY: setup system-deps demo test lint bench clean

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

# Debian packages the tests use (run as root): Chromium renders the campaign report.
system-deps:
	@command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium; }

test: setup system-deps
	$(BIN)/pytest

lint: setup
	$(BIN)/ruff check multisite scripts tests benchmarks
	$(BIN)/ruff format --check multisite scripts tests benchmarks
	$(BIN)/snakemake --lint

bench: setup
	$(BIN)/python benchmarks/bench_demo.py

clean:
	rm -rf work .snakemake
